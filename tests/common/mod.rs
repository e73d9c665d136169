//! Shared harness of the integration tests: starts a real `baton` with real
//! workers on loopback and follows its JSON log, so that tests synchronise on
//! what the acceptor says it did, never on sleeps.
#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

pub mod pki;

/// Path of a binary built by this workspace (same profile as the tests).
pub fn bin(name: &str) -> PathBuf {
    // CARGO_BIN_EXE_* is only set for this package's own binaries; the
    // workers live in sibling packages built into the same target dir.
    let mut p = PathBuf::from(env!("CARGO_BIN_EXE_baton"));
    p.pop();
    p.push(name);
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --workspace` (the test command does)",
        p.display()
    );
    p
}

/// One JSON log line of the acceptor.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub raw: String,
    pub json: serde_json::Value,
}

impl LogLine {
    pub fn message(&self) -> &str {
        self.json["fields"]["message"].as_str().unwrap_or("")
    }
    pub fn field(&self, name: &str) -> Option<String> {
        let v = &self.json["fields"][name];
        match v {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        }
    }
}

/// A running acceptor whose stderr (JSON logs) is followed line by line.
pub struct Baton {
    pub child: Child,
    lines: Receiver<LogLine>,
    /// Every line seen so far, for assertions and for failure messages.
    pub seen: Vec<LogLine>,
    pub addrs: Vec<SocketAddr>,
    /// Its control socket (unless the test passed its own).
    pub control: PathBuf,
    /// A scratch directory removed with the Baton.
    pub dir: PathBuf,
}

impl Baton {
    /// Starts `baton --log-format json ARGS`, waits for every listener's
    /// "listening" line and for `workers` "worker ready" lines.
    pub fn start(args: &[&str], workers: usize) -> Baton {
        Baton::start_with(Command::new(bin("baton")), args, workers)
    }

    pub fn start_with(cmd: Command, args: &[&str], workers: usize) -> Baton {
        let listeners = args.iter().filter(|a| **a == "--listen").count().max(1);
        Baton::start_counting(cmd, args, listeners, workers)
    }

    /// Like [`Baton::start_with`], waiting for `listeners` "listening"
    /// lines (a config file may give several pools their own).
    pub fn start_counting(
        mut cmd: Command,
        args: &[&str],
        listeners: usize,
        workers: usize,
    ) -> Baton {
        // Every acceptor gets its own control socket, so tests run in
        // parallel without fighting over the default path.
        let dir = tempdir("baton-test");
        let given = args
            .iter()
            .position(|a| *a == "--control")
            .and_then(|i| args.get(i + 1));
        let control = match given {
            Some(p) => PathBuf::from(p),
            None => dir.join("control.sock"),
        };
        cmd.arg("--log-format").arg("json");
        if given.is_none() && !args.contains(&"--no-control") {
            cmd.arg("--control").arg(&control);
        }
        cmd.args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn baton");
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let json = serde_json::from_str(&line).unwrap_or(serde_json::Value::Null);
                if json.is_null() {
                    // A worker's own stderr line; keep it visible in test output.
                    eprintln!("[worker] {line}");
                }
                if tx.send(LogLine { raw: line, json }).is_err() {
                    break;
                }
            }
        });
        let mut b = Baton {
            child,
            lines: rx,
            seen: Vec::new(),
            addrs: Vec::new(),
            control,
            dir,
        };
        for _ in 0..listeners {
            let l = b.wait_for("listening", Duration::from_secs(20));
            let addr = l.field("addr").expect("listening line has addr");
            b.addrs.push(addr.parse().expect("addr parses"));
        }
        for _ in 0..workers {
            b.wait_for("worker ready", Duration::from_secs(20));
        }
        b
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// The first address pool `pool` listens on (from its "listening"
    /// line).
    pub fn addr_of(&self, pool: &str) -> SocketAddr {
        self.seen
            .iter()
            .find(|l| l.message() == "listening" && l.field("pool").as_deref() == Some(pool))
            .and_then(|l| l.field("addr"))
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("pool {pool} logged no listening line"))
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for the next log line whose message is `message`.
    pub fn wait_for(&mut self, message: &str, timeout: Duration) -> LogLine {
        self.wait_until(timeout, |l| l.message() == message)
            .unwrap_or_else(|| panic!("no {message:?} log line within {timeout:?}"))
    }

    /// Waits for the next log line satisfying `pred`; None on timeout or exit.
    pub fn wait_until(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&LogLine) -> bool,
    ) -> Option<LogLine> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return Some(l);
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    return None
                }
            }
        }
    }

    /// The first line seen so far, or logged within `timeout`, satisfying
    /// `pred`: for events that may already have been read past.
    pub fn find(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&LogLine) -> bool,
    ) -> Option<LogLine> {
        if let Some(l) = self.seen.iter().find(|l| pred(l)) {
            return Some(l.clone());
        }
        self.wait_until(timeout, pred)
    }

    /// Collects every line logged until the process exits (or `timeout`).
    pub fn drain_logs(&mut self, timeout: Duration) {
        let _ = self.wait_until(timeout, |_| false);
    }

    /// All lines seen so far with this message.
    pub fn count(&self, message: &str) -> usize {
        self.seen.iter().filter(|l| l.message() == message).count()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("kill");
    }

    /// SIGTERM, then asserts the graceful stop: exit status 0 within 30 s.
    pub fn stop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let st = self.wait_exit(Duration::from_secs(30));
        assert!(st.success(), "baton exited with {st:?}");
    }

    /// Waits for the acceptor to exit, up to `timeout`; kills it if it hangs.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                self.drain_logs(Duration::from_secs(2));
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("baton did not exit within {timeout:?}");
            }
            // Poll the child's state; the log reader thread keeps collecting.
            let _ = self.wait_until(Duration::from_millis(20), |_| false);
        }
    }

    /// Runs `baton ctl --control <this baton's socket> ARGS`; returns the
    /// exit status, stdout and stderr.
    pub fn ctl(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(bin("baton"))
            .arg("ctl")
            .arg("--control")
            .arg(&self.control)
            .args(args)
            .output()
            .expect("run baton ctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `baton ctl --json ARGS`, parsed; panics with stderr on failure.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let (ok, out, err) = self.ctl(&a);
        assert!(ok, "baton ctl {args:?} failed: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ctl {args:?}: {e}: {out}"))
    }

    /// Every line seen so far that is not JSON (with `--log-format json`,
    /// which the harness passes, there should be none, from any process).
    pub fn lines_not_json(&self) -> Vec<&str> {
        self.seen
            .iter()
            .filter(|l| l.json.is_null())
            .map(|l| l.raw.as_str())
            .collect()
    }

    /// Pids of the live workers, read from the acceptor's children.
    pub fn worker_pids(&self) -> Vec<i32> {
        let path = format!("/proc/{}/task/{}/children", self.pid(), self.pid());
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

/// A fresh, empty directory under the system temp dir.
pub fn tempdir(prefix: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

impl Drop for Baton {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Ok(None) = self.child.try_wait() {
            let pids = self.worker_pids();
            let _ = self.child.kill();
            let _ = self.child.wait();
            for p in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

// ---- worker commands ----------------------------------------------------

/// `--listen 127.0.0.1:0 --workers N EXTRA -- CMD`.
pub fn echo_args<'a>(workers: &'a str, extra: &[&'a str], cmd: &'a [String]) -> Vec<&'a str> {
    let mut v = vec!["--listen", "127.0.0.1:0", "--workers", workers];
    v.extend_from_slice(extra);
    v.push("--");
    v.extend(cmd.iter().map(|s| s.as_str()));
    v
}

pub fn echo_cmd() -> Vec<String> {
    vec![bin("baton-echo").display().to_string()]
}

/// `baton-chaos --mode MODE EXTRA`: a worker that breaks a rule on purpose.
pub fn chaos_cmd(mode: &str, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        bin("baton-chaos").display().to_string(),
        "--mode".to_string(),
        mode.to_string(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

// ---- echo clients -------------------------------------------------------

pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Sends `payload`, half-closes, reads everything back.
pub fn echo_once(addr: SocketAddr, payload: &[u8]) -> io::Result<Vec<u8>> {
    let mut s = connect(addr)?;
    s.write_all(payload)?;
    s.shutdown(Shutdown::Write)?;
    let mut back = Vec::new();
    s.read_to_end(&mut back)?;
    Ok(back)
}

pub fn payload(i: usize) -> Vec<u8> {
    format!("client {i} says hello through baton\n").into_bytes()
}

/// Runs `n` clients at once (threads), each sending its own payload; returns
/// how many got exactly their payload back.
pub fn echo_many(addr: SocketAddr, n: usize) -> (usize, Vec<String>) {
    let handles: Vec<_> = (0..n)
        .map(|i| std::thread::spawn(move || (i, echo_once(addr, &payload(i)))))
        .collect();
    let mut ok = 0;
    let mut errors = Vec::new();
    for h in handles {
        let (i, r) = h.join().expect("client thread");
        match r {
            Ok(back) if back == payload(i) => ok += 1,
            Ok(back) => errors.push(format!("client {i}: wrong echo {back:?}")),
            Err(e) => errors.push(format!("client {i}: {e}")),
        }
    }
    (ok, errors)
}

/// Whether the tests run as root (for the sandbox tests).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A bounded background load: `threads` clients echoing in a loop until
/// stopped (or at most 60 s / 20 000 requests each, whichever comes first).
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handles: Vec<std::thread::JoinHandle<(u64, Vec<String>)>>,
}

impl Load {
    pub fn start(addr: SocketAddr, threads: usize) -> Load {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let handles = (0..threads)
            .map(|t| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(60);
                    let (mut ok, mut failed) = (0u64, Vec::new());
                    for i in 0..20_000 {
                        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                            break;
                        }
                        let p = payload(t * 100_000 + i);
                        match echo_once(addr, &p) {
                            Ok(back) if back == p => ok += 1,
                            Ok(back) => failed.push(format!("wrong echo {back:?}")),
                            Err(e) => failed.push(e.to_string()),
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        Load { stop, handles }
    }

    /// Stops the clients; returns how many requests succeeded and every
    /// failure.
    pub fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut ok = 0;
        let mut failed = Vec::new();
        for h in self.handles {
            let (o, f) = h.join().expect("load thread");
            ok += o;
            failed.extend(f);
        }
        (ok, failed)
    }
}
