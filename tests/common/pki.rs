//! Certificates for the TLS tests, made with the `openssl` command: a test
//! CA and, per name, an ECDSA P-256 certificate it signed (SAN = the
//! name), in a temporary directory with a `public/` site beside them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Whether the `openssl` command is here; if not, prints why `test` is
/// skipped.
pub fn have_openssl(test: &str) -> bool {
    let ok = Command::new("openssl")
        .arg("version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED {test}: no openssl command (scripts/install-deps installs it)");
    }
    ok
}

pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A new P-256 key, as `openssl req` is told to make it.
const EC: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// In a [`pki`] directory: a new key and a certificate for `name` signed by
/// its CA, as STEM.key and STEM.crt.
pub fn issue(dir: &Path, name: &str, stem: &str) {
    let (key, csr, crt, ext) = (
        format!("{stem}.key"),
        format!("{stem}.csr"),
        format!("{stem}.crt"),
        format!("{stem}.ext"),
    );
    std::fs::write(dir.join(&ext), format!("subjectAltName=DNS:{name}\n")).expect("ext");
    let subj = format!("/CN={name}");
    let mut req = vec!["req"];
    req.extend(EC);
    req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
    openssl(dir, &req);
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
    );
}

/// A CA and, signed by it, a P-256 certificate for each of `names` (files
/// NAME.crt / NAME.key), plus a site to serve.
pub fn pki(names: &[&str]) -> PathBuf {
    let dir = super::tempdir("baton-tls");
    let mut ca = vec!["req", "-x509"];
    ca.extend(EC);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=baton test CA",
    ]);
    openssl(&dir, &ca);
    for name in names {
        issue(&dir, name, name);
    }
    let public = dir.join("public");
    std::fs::create_dir_all(&public).expect("mkdir");
    std::fs::write(public.join("index.html"), "hello over tls\n").expect("write");
    use std::os::unix::fs::PermissionsExt;
    for d in [dir.as_path(), public.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    dir
}

/// A rustls client config (ring) trusting the test CA; `resume` keeps
/// rustls's in-memory session cache (each connection resumes with a ticket
/// of an earlier one), else every handshake is a full one; `alpn` is what
/// it offers.
pub fn client_config(
    dir: &Path,
    resume: bool,
    alpn: &[&[u8]],
) -> std::sync::Arc<rustls::ClientConfig> {
    let ca = baton_tls::CertChain::load(dir.join("ca.crt")).expect("the test CA");
    let mut roots = rustls::RootCertStore::empty();
    for der in ca.chain {
        roots.add(der).expect("a CA certificate");
    }
    let mut c = rustls::ClientConfig::builder_with_provider(baton_tls::provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    if !resume {
        c.resumption = rustls::client::Resumption::disabled();
    }
    std::sync::Arc::new(c)
}

/// `curl --cacert ca.crt https://NAME:PORT/` with NAME resolved to `addr`:
/// the body, or curl's error.
pub fn curl(dir: &Path, name: &str, addr: SocketAddr) -> Result<String, String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(dir.join("ca.crt"))
        .arg("--resolve")
        .arg(format!("{name}:{}:127.0.0.1", addr.port()))
        .arg(format!("https://{name}:{}/", addr.port()))
        .output()
        .expect("run curl");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}
