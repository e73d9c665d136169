//! `baton audit`: proves the workers' sandbox from inside a worker.
//!
//! It resolves the same sandbox options a pool would get, spawns a probe
//! worker (this binary, hidden subcommand `probe`) that confines itself
//! with exactly the code path of a real worker (`baton_sdk::sandbox`, from
//! `BATON_SANDBOX`), checks it from outside as the acceptor would
//! (`/proc/PID/status`, `/proc/PID/root`), then lets it try to break out
//! and report each attempt. Exit status 1 if any property fails.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::process::{Command, ExitStatus, Stdio};

use baton_sdk::sandbox::audit::{Report, Row, Status};
use baton_sdk::sandbox::{Profile, SANDBOX_ENV};

use crate::sandbox::SandboxArgs;
use crate::ConfigError;

/// `baton audit` options.
#[derive(Debug, Clone, clap::Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub sandbox: SandboxArgs,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,

    /// A TLS private key the workers must not have (repeatable): the audit
    /// checks that the probe holds no fd to it and cannot open it in its
    /// view of the file system.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Vec<std::path::PathBuf>,
}

/// The key files (as the probe sees them) the probe must fail to open.
const KEYS_ENV: &str = "BATON_AUDIT_KEYS";

/// Why the audit could not run (a failing property is not an error: it is
/// a row of the report).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The sandbox options do not resolve.
    #[error(transparent)]
    Sandbox(#[from] ConfigError),
    /// `--no-sandbox` was given.
    #[error("--no-sandbox: there is no sandbox to audit")]
    NoSandbox,
    /// This binary, which is the probe, cannot be found.
    #[error("cannot find this binary: {0}")]
    Exe(#[source] io::Error),
    /// The probe cannot be spawned.
    #[error("cannot start the probe worker: {0}")]
    Spawn(#[source] io::Error),
    /// The probe's standard output is not piped.
    #[error("probe stdout")]
    NoStdout,
    /// The probe exited before it was confined; what it said on stderr.
    #[error("the probe worker could not confine itself ({status}): {stderr}")]
    Confine { status: ExitStatus, stderr: String },
    /// The probe ended without a report it could be read from.
    #[error("the probe worker ({status}) did not report: {source}: {output:?}")]
    NoReport {
        status: ExitStatus,
        source: serde_json::Error,
        output: String,
    },
    /// Waiting for the probe failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Runs the audit; returns the text to print and whether every row passed.
pub fn run(args: &AuditArgs) -> Result<(String, bool), AuditError> {
    let sandbox = args.sandbox.resolve(1024, None)?;
    let Some(profile) = sandbox.profile else {
        return Err(AuditError::NoSandbox);
    };
    let exe = std::env::current_exe().map_err(AuditError::Exe)?;
    let keys: Vec<std::path::PathBuf> = args
        .tls_key
        .iter()
        .map(|k| std::path::absolute(k).unwrap_or_else(|_| k.clone()))
        .collect();
    // Each key as the probe would name it: inside its chroot, the part
    // below the jail; outside it, the key is not in its view at all.
    let in_view: Vec<String> = keys
        .iter()
        .filter_map(|k| match &profile.chroot {
            Some(root) => k
                .strip_prefix(root)
                .ok()
                .map(|rest| format!("/{}", rest.display())),
            None => Some(k.display().to_string()),
        })
        .collect();
    let mut child = Command::new(exe)
        .arg("probe")
        .env(KEYS_ENV, in_view.join("\n"))
        .env(SANDBOX_ENV, profile.to_env())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(AuditError::Spawn)?;
    let pid = child.id() as i32;
    let mut out = BufReader::new(child.stdout.take().ok_or(AuditError::NoStdout)?);
    let mut line = String::new();
    let _ = out.read_line(&mut line);
    if line.trim() != "ready" {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let status = child.wait()?;
        return Err(AuditError::Confine {
            status,
            stderr: err.trim().to_string(),
        });
    }
    // From outside, while it waits: what the acceptor checks before a
    // worker's first connection.
    let outside = outside_row(pid, &profile);
    let key_fds = (!keys.is_empty()).then(|| key_fd_row(pid, &keys));
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"go\n");
    }
    let mut json = String::new();
    let _ = out.read_to_string(&mut json);
    let status = child.wait()?;
    let inside = Report::from_json(json.trim()).map_err(|source| AuditError::NoReport {
        status,
        source,
        output: json,
    })?;
    let mut rows = vec![outside];
    rows.extend(key_fds);
    rows.extend(inside.rows);
    let report = Report::new(rows);
    let text = if args.json {
        report.to_json_pretty()
    } else {
        report.to_table()
    };
    Ok((text, report.pass))
}

/// No fd of the probe is one of the key files (same device and inode).
fn key_fd_row(pid: i32, keys: &[std::path::PathBuf]) -> Row {
    use std::os::unix::fs::MetadataExt;
    let ids: Vec<(u64, u64)> = keys
        .iter()
        .filter_map(|k| std::fs::metadata(k).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    let mut open = Vec::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in dir.flatten() {
            if let Ok(m) = std::fs::metadata(e.path()) {
                if ids.contains(&(m.dev(), m.ino())) {
                    open.push(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
    }
    let (status, observed) = if open.is_empty() {
        (Status::Pass, "no fd refers to a key file".to_string())
    } else {
        (
            Status::Fail,
            format!("fds {} refer to a key file", open.join(", ")),
        )
    };
    Row {
        property: "tls key fd".to_string(),
        tried: format!("stat every /proc/{pid}/fd/* against the --tls-key files"),
        expected: "none is a key file".to_string(),
        observed,
        status,
    }
}

/// Inside the probe: each key file (as it sees it) must not open.
fn key_open_rows() -> Vec<Row> {
    let Ok(list) = std::env::var(KEYS_ENV) else {
        return Vec::new();
    };
    list.lines()
        .filter(|l| !l.is_empty())
        .map(|path| {
            let (status, observed) = match std::fs::File::open(path) {
                Ok(_) => (
                    Status::Fail,
                    "opened: the worker user can read the key (make it 0600, owned by root)"
                        .to_string(),
                ),
                Err(e) => (Status::Pass, format!("refused: {e}")),
            };
            Row {
                property: "tls key unreadable".to_string(),
                tried: format!("open {path} read-only"),
                expected: "refused".to_string(),
                observed,
                status,
            }
        })
        .collect()
}

fn outside_row(pid: i32, profile: &Profile) -> Row {
    let (status, observed) = match baton_sdk::sandbox::verify(pid, profile) {
        Ok(()) => (Status::Pass, "matches the profile".to_string()),
        Err(m) => (Status::Fail, baton_sdk::sandbox::describe(&m)),
    };
    Row {
        property: "outside view".to_string(),
        tried: format!("read /proc/{pid}/status and /proc/{pid}/root from outside"),
        expected: "ids, groups, capabilities, NoNewPrivs, Seccomp and root as the profile says"
            .to_string(),
        observed,
        status,
    }
}

/// The probe worker (`baton probe`, hidden): confines itself from
/// `BATON_SANDBOX`, says "ready", waits for the go, then runs every check
/// and prints the report as one JSON line.
pub fn probe() -> u8 {
    let profile = match Profile::from_env() {
        Ok(Some(p)) => p,
        Ok(None) => {
            eprintln!("baton probe: {SANDBOX_ENV} is not set (run `baton audit`)");
            return 2;
        }
        Err(e) => {
            eprintln!("baton probe: {e}");
            return baton_sdk::EXIT_SANDBOX;
        }
    };
    if let Err(e) = baton_sdk::sandbox::apply(&profile) {
        eprintln!("baton probe: {e}");
        return baton_sdk::EXIT_SANDBOX;
    }
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(b"ready\n");
    let _ = stdout.flush();
    let mut go = [0u8; 3];
    let _ = std::io::stdin().read(&mut go);
    let mut rows = baton_sdk::sandbox::audit::run_probe(&profile);
    rows.extend(key_open_rows());
    let report = Report::new(rows);
    let _ = stdout.write_all(report.to_json().as_bytes());
    let _ = stdout.write_all(b"\n");
    let _ = stdout.flush();
    0
}
