//! Test helpers: certificates made at test time, a key process run as a
//! real child (the `baton-keyd` binary), a worker-like TLS server on
//! loopback driving `TlsConn`, and a rustls client.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_tls::{CertChain, TlsConn, TlsError};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ServerConfig};

/// A fresh directory under the system temp dir.
pub fn tempdir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "baton-tls-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tempdir");
    d
}

pub fn have_openssl() -> bool {
    Command::new("openssl")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA.
pub struct Ca {
    pub cert: rcgen::Certificate,
    pub key: rcgen::KeyPair,
    pub pem_path: PathBuf,
}

/// A leaf certificate and its key, written to files.
pub struct Leaf {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub cert_der: CertificateDer<'static>,
    /// The PKCS#8 DER of the key.
    pub key_der: Vec<u8>,
}

pub fn ca(dir: &Path) -> Ca {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("ca key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "baton test CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).expect("ca cert");
    let pem_path = dir.join("ca.crt");
    std::fs::write(&pem_path, cert.pem()).expect("write ca");
    Ca {
        cert,
        key,
        pem_path,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    P256,
    /// RSA-2048, made by the openssl CLI (rcgen with ring cannot generate
    /// RSA keys).
    Rsa2048,
}

/// A leaf for `names`, signed by `ca`; `None` when the algorithm needs a
/// tool that is missing (the caller prints why it skips).
pub fn leaf(dir: &Path, ca: &Ca, stem: &str, names: &[&str], alg: Alg) -> Option<Leaf> {
    let key = match alg {
        Alg::P256 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key"),
        Alg::Rsa2048 => {
            if !have_openssl() {
                return None;
            }
            let p = dir.join(format!("{stem}.rsa.pem"));
            openssl(&[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                p.to_str().expect("utf8"),
            ]);
            let pem = std::fs::read_to_string(&p).expect("read rsa");
            rcgen::KeyPair::from_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256).expect("rsa key")
        }
    };
    let params =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("params");
    let cert = params
        .signed_by(&key, &ca.cert, &ca.key)
        .expect("sign leaf");
    let cert_path = dir.join(format!("{stem}.crt"));
    let key_path = dir.join(format!("{stem}.key"));
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    Some(Leaf {
        cert_path,
        key_path,
        cert_der: cert.der().clone(),
        key_der: key.serialize_der(),
    })
}

/// A running `baton-keyd` child and the test's ends of its channels.
pub struct Keyd {
    pub child: Child,
    pub control: OwnedFd,
    pub peers: Vec<OwnedFd>,
}

impl Keyd {
    /// Starts the key process with `keys` (id, leaf) and `n_peers` peer
    /// channels; sandboxed (own uid, seccomp) when the test runs as root.
    pub fn start(keys: &[(u32, &Leaf)], n_peers: usize) -> Keyd {
        Self::start_with(keys, n_peers, true).expect("keyd starts")
    }

    pub fn start_with(
        keys: &[(u32, &Leaf)],
        n_peers: usize,
        sandbox: bool,
    ) -> std::io::Result<Keyd> {
        let (control, control_child) = baton_tls::key_channel_pair()?;
        let mut peers = Vec::new();
        let mut child_fds = vec![control_child];
        for _ in 0..n_peers {
            let (mine, theirs) = baton_tls::key_channel_pair()?;
            peers.push(mine);
            child_fds.push(theirs);
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_baton-keyd"));
        for (id, leaf) in keys {
            cmd.arg("--key").arg(format!(
                "{id}:{}:{}",
                leaf.cert_path.display(),
                leaf.key_path.display()
            ));
        }
        let raws: Vec<RawFd> = child_fds.iter().map(|f| f.as_raw_fd()).collect();
        cmd.arg("--control-fd").arg(raws[0].to_string());
        for r in &raws[1..] {
            cmd.arg("--peer-fd").arg(r.to_string());
        }
        if sandbox {
            cmd.env(baton_sdk::sandbox::SANDBOX_ENV, keyd_profile().to_env());
        } else {
            cmd.env_remove(baton_sdk::sandbox::SANDBOX_ENV);
        }
        let inherit = raws.clone();
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls fcntl, which is async-signal-safe, on fds it owns.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &inherit {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.stderr(Stdio::piped()).spawn()?;
        drop(child_fds);
        let k = Keyd {
            child,
            control,
            peers,
        };
        Ok(k)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    /// Kills the child and collects it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn take_peer(&mut self) -> OwnedFd {
        self.peers.remove(0)
    }
}

impl Drop for Keyd {
    fn drop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
        self.kill();
    }
}

/// The key process's sandbox in tests: nobody when root, default seccomp.
pub fn keyd_profile() -> baton_sdk::sandbox::Profile {
    let mut p = baton_sdk::sandbox::Profile::default();
    if nix::unistd::geteuid().is_root() {
        p.uid = Some(65534);
        p.gid = Some(65534);
    }
    p
}

/// What the server side saw of one connection.
#[derive(Debug)]
pub struct Served {
    pub sni: Option<String>,
    pub alpn: Option<Vec<u8>>,
    pub resumed: bool,
    pub version: Option<rustls::ProtocolVersion>,
    pub elapsed: Duration,
}

/// Serves one connection like a worker would: non-blocking socket,
/// `TlsConn` driven by poll; answers "ping\n" with "pong\n", then
/// close_notify.
pub fn serve_one(config: Arc<ServerConfig>, listener: &TcpListener) -> Result<Served, TlsError> {
    serve_one_within(config, listener, Duration::from_secs(5))
}

/// [`serve_one`] with a handshake deadline of `deadline`.
pub fn serve_one_within(
    config: Arc<ServerConfig>,
    listener: &TcpListener,
    deadline: Duration,
) -> Result<Served, TlsError> {
    let (sock, _) = listener.accept()?;
    let start = Instant::now();
    sock.set_nonblocking(true)?;
    let mut tls = TlsConn::new(config, sock)?;
    tls.set_handshake_deadline(deadline);
    let mut got = Vec::new();
    let mut answered = false;
    loop {
        let want = tls.interest();
        let mut flags = PollFlags::empty();
        if want.readable {
            flags |= PollFlags::POLLIN;
        }
        if want.writable {
            flags |= PollFlags::POLLOUT;
        }
        let fd = tls.get_ref().as_fd();
        let mut p = [PollFd::new(fd, flags)];
        let _ = nix::poll::poll(&mut p, PollTimeout::from(50u16));
        tls.check_deadline(Instant::now())?;
        tls.on_readable()?;
        let mut buf = [0u8; 256];
        loop {
            match tls.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(TlsError::from_io(e)),
            }
        }
        if !answered && got.ends_with(b"ping\n") {
            tls.write_all(b"pong\n").map_err(TlsError::from_io)?;
            answered = true;
        }
        if answered && !tls.is_handshaking() {
            tls.close()?;
            let c = tls.connection();
            let served = Served {
                sni: c.server_name().map(str::to_string),
                alpn: c.alpn_protocol().map(<[u8]>::to_vec),
                resumed: c.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
                version: c.protocol_version(),
                elapsed: start.elapsed(),
            };
            // Let the close_notify go out before the socket closes.
            let _ = tls.flush_tls();
            return Ok(served);
        }
        if tls.peer_closed() {
            return Err(TlsError::EofInHandshake);
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err(TlsError::HandshakeTimeout(Duration::from_secs(10)));
        }
    }
}

/// A listener on loopback and a thread serving one connection on it.
pub fn spawn_server(
    config: Arc<ServerConfig>,
) -> (
    SocketAddr,
    std::thread::JoinHandle<Result<Served, TlsError>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let h = std::thread::spawn(move || serve_one(config, &listener));
    (addr, h)
}

/// One server connection with `config` while `client` fetches `name`:
/// what each side got.
pub fn exchange(
    config: &Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: &str,
) -> (std::io::Result<Fetched>, Result<Served, TlsError>) {
    let (addr, server) = spawn_server(config.clone());
    let fetched = fetch(client, addr, name);
    (fetched, server.join().expect("server thread"))
}

/// [`exchange`] where both sides must succeed.
pub fn ok_exchange(
    config: &Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: &str,
) -> (Fetched, Served) {
    let (f, s) = exchange(config, client, name);
    (f.expect("client"), s.expect("server"))
}

/// [`exchange`] where both sides must fail: the server's error.
pub fn failed_exchange(
    config: &Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: &str,
) -> TlsError {
    let (f, s) = exchange(config, client, name);
    assert!(f.is_err(), "the client succeeded");
    s.expect_err("the server succeeded")
}

/// A temp dir, a CA, and a P-256 leaf for `localhost`.
pub fn site(tag: &str) -> (PathBuf, Ca, Leaf) {
    let dir = tempdir(tag);
    let ca = ca(&dir);
    let l = leaf(&dir, &ca, "site", &["localhost"], Alg::P256).expect("leaf");
    (dir, ca, l)
}

pub fn roots(ca: &Ca) -> rustls::RootCertStore {
    let mut r = rustls::RootCertStore::empty();
    r.add(ca.cert.der().clone()).expect("add root");
    r
}

pub fn client_config(
    ca: &Ca,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut c = ClientConfig::builder_with_provider(baton_tls::provider())
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots(ca))
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

/// What the client saw.
#[derive(Debug)]
pub struct Fetched {
    pub reply: Vec<u8>,
    pub peer_leaf: Option<CertificateDer<'static>>,
    pub resumed: bool,
}

/// Connects, says "ping\n", reads to close_notify.
pub fn fetch(
    config: Arc<ClientConfig>,
    addr: SocketAddr,
    name: &str,
) -> Result<Fetched, std::io::Error> {
    let sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let server_name =
        ServerName::try_from(name.to_string()).map_err(|e| std::io::Error::other(e.to_string()))?;
    let conn = rustls::ClientConnection::new(config, server_name).map_err(std::io::Error::other)?;
    let mut s = rustls::StreamOwned::new(conn, sock);
    s.write_all(b"ping\n")?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)?;
    Ok(Fetched {
        reply,
        peer_leaf: s.conn.peer_certificates().and_then(|c| c.first().cloned()),
        resumed: s.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
    })
}

/// The worker side of TLS: public chains of `keys` and `peer` as the key
/// channel.
pub fn worker_config(
    keys: &[(u32, &Leaf)],
    peer: OwnedFd,
    ticket_keys: Option<baton_tls::TicketKeys>,
    options: baton_tls::TlsOptions,
) -> baton_tls::BuiltTls {
    let certs = keys
        .iter()
        .map(|(id, l)| (*id, CertChain::load(&l.cert_path).expect("chain")))
        .collect();
    baton_tls::WorkerTls {
        certs,
        key_channel: peer,
        ticket_keys,
        ticket_lifetime: 3600,
        options,
    }
    .build()
    .expect("server config")
}

/// A certificate verifier that accepts any certificate but still checks
/// handshake signatures (to see which certificate the server chose for a
/// name it does not cover).
#[derive(Debug)]
pub struct AnyCert(pub Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

pub fn any_cert_client() -> Arc<ClientConfig> {
    let provider = baton_tls::provider();
    let mut c = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

/// Reads one line from a child's stdout.
pub fn read_line(r: &mut impl BufRead) -> String {
    let mut s = String::new();
    let _ = r.read_line(&mut s);
    s
}

pub fn stdout_reader(child: &mut Child) -> BufReader<std::process::ChildStdout> {
    BufReader::new(child.stdout.take().expect("piped stdout"))
}
