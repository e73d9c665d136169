//! Sandbox integration tests: real child processes confine themselves with
//! `sandbox::apply`, the parent checks them from outside with
//! `sandbox::verify`, and the children prove it from inside with
//! `sandbox::audit::run_probe`, printing JSON the parent asserts on.
//!
//! The children are this very binary, re-executed with `BATON_SANDBOX_TEST_ROLE`
//! set: a process must be single-threaded when it applies its sandbox, and
//! libtest runs every test on a thread of its own, so this file has its own
//! small harness (`harness = false` in Cargo.toml). It prints libtest's
//! lines, takes name filters, `--exact`, `--skip NAME` and `--list`.
//!
//! Tests that need root (setuid, chroot, namespaces) print why they are
//! skipped when not run as root. Every child is killed and reaped when its
//! test ends, whatever happens.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use baton_sdk::sandbox::audit::{run_probe, Report, Status};
use baton_sdk::sandbox::{self, verify, ProcStatus, Profile, SeccompMode, Unshare, SANDBOX_ENV};
use baton_sdk::{proto, Channel, Connection, DoneSender, Event, Msg, Worker};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use serde_json::{json, Value};

const ROLE_ENV: &str = "BATON_SANDBOX_TEST_ROLE";
const NOBODY: u32 = 65534;
const TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- harness

enum Outcome {
    Passed,
    Skipped(String),
}

type TestResult = Result<Outcome, String>;
type Test = (&'static str, fn() -> TestResult);

const TESTS: &[Test] = &[
    (
        "full_sandbox_passes_verify_and_every_audit_row",
        full_sandbox,
    ),
    ("handoff_across_the_uid_boundary_under_seccomp", handoff),
    ("root_without_user_is_refused", root_without_user),
    ("missing_chroot_fails_closed", missing_chroot),
    ("bad_profile_fails_closed", bad_profile),
    ("unprivileged_worker_confines_what_it_can", unprivileged),
    ("unprivileged_chroot_is_an_error", unprivileged_chroot),
    ("seccomp_off_is_reported_not_enforced", seccomp_off),
    ("verify_flags_an_unsandboxed_process", verify_unsandboxed),
];

fn main() -> ExitCode {
    if let Ok(role) = std::env::var(ROLE_ENV) {
        return child_main(&role);
    }
    let mut filters = Vec::new();
    let mut skips = Vec::new();
    let (mut exact, mut list) = (false, false);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--exact" => exact = true,
            "--list" => list = true,
            "--skip" => skips.extend(args.next()),
            "--test-threads" | "--format" | "--color" | "--logfile" | "-Z" | "--shuffle-seed" => {
                args.next();
            }
            f if f.starts_with('-') => {}
            f => filters.push(f.to_string()),
        }
    }
    let selected: Vec<_> = TESTS
        .iter()
        .filter(|(name, _)| {
            let hit = |f: &String| {
                if exact {
                    name == f
                } else {
                    name.contains(f.as_str())
                }
            };
            (filters.is_empty() || filters.iter().any(hit)) && !skips.iter().any(hit)
        })
        .collect();
    if list {
        for (name, _) in &selected {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    let start = Instant::now();
    println!("\nrunning {} tests", selected.len());
    let (mut passed, mut failed, mut ignored) = (0, 0, 0);
    let mut failures = Vec::new();
    for (name, test) in &selected {
        let r = std::panic::catch_unwind(test).unwrap_or_else(|_| Err("panicked".to_string()));
        match r {
            Ok(Outcome::Passed) => {
                passed += 1;
                println!("test {name} ... ok");
            }
            Ok(Outcome::Skipped(why)) => {
                ignored += 1;
                println!("test {name} ... ignored, {why}");
            }
            Err(e) => {
                failed += 1;
                println!("test {name} ... FAILED");
                failures.push(format!("---- {name} ----\n{e}\n"));
            }
        }
    }
    if !failures.is_empty() {
        println!("\nfailures:\n");
        for f in &failures {
            println!("{f}");
        }
    }
    println!(
        "\ntest result: {}. {passed} passed; {failed} failed; {ignored} ignored; 0 measured; {} filtered out; finished in {:.2}s\n",
        if failed == 0 { "ok" } else { "FAILED" },
        TESTS.len() - selected.len(),
        start.elapsed().as_secs_f64()
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn need_root() -> Option<Outcome> {
    if !is_root() {
        return Some(Outcome::Skipped(
            "needs root (setuid, chroot, namespaces); run the tests as root".into(),
        ));
    }
    need_filter()
}

/// The default seccomp profile exists for x86_64 only.
fn need_filter() -> Option<Outcome> {
    sandbox::seccomp::default_allowlist().is_empty().then(|| {
        Outcome::Skipped(format!(
            "no default seccomp profile on {}",
            std::env::consts::ARCH
        ))
    })
}

/// Whether this process holds CAP_SETPCAP, and so could have given its
/// workers an empty bounding set (which verify() then demands).
fn holds_setpcap() -> bool {
    ProcStatus::read(0).is_ok_and(|st| st.cap_eff & (1 << 8) != 0)
}

// ------------------------------------------------------------ child side

fn child_main(role: &str) -> ExitCode {
    match role {
        "probe" => child_probe(),
        "worker" => child_worker(),
        "idle" => {
            println!("ready");
            wait_for_eof();
            ExitCode::SUCCESS
        }
        other => {
            eprintln!("unknown {ROLE_ENV}={other}");
            ExitCode::from(2)
        }
    }
}

/// Blocks until the parent closes our stdin (or goes away).
fn wait_for_eof() {
    let mut buf = [0u8; 64];
    let mut stdin = std::io::stdin();
    while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
}

fn say(v: Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// Applies the profile in `BATON_SANDBOX` (first thing), runs the audit
/// probe, prints `{"applied":…, "report":…}` and waits for the parent to
/// finish looking at it from outside.
fn child_probe() -> ExitCode {
    let applied = sandbox::apply_from_env();
    let profile = match (&applied, Profile::from_env()) {
        (Ok(Some(_)), Ok(Some(p))) => p,
        (Err(e), _) => {
            say(json!({"error": e.to_string(), "step": e.step().as_str()}));
            return ExitCode::from(3);
        }
        _ => {
            say(json!({"error": format!("{SANDBOX_ENV} not set")}));
            return ExitCode::from(3);
        }
    };
    let Ok(Some(a)) = applied else {
        return ExitCode::from(3);
    };
    let report = Report::new(run_probe(&profile));
    // The table goes to stderr, for people reading the test log.
    eprint!("{}", report.to_table());
    say(json!({
        "applied": {"uid": a.uid, "gid": a.gid, "seccomp": a.seccomp,
                    "bounding_dropped": a.bounding_dropped, "notes": a.notes},
        "report": serde_json::to_value(&report).unwrap_or(Value::Null),
    }));
    wait_for_eof();
    ExitCode::SUCCESS
}

/// A small worker in the style of the bundled ones, under the sandbox:
/// channel from the environment, one thread per connection, mio readiness,
/// files opened read-only in the jail and sent with sendfile(2).
fn child_worker() -> ExitCode {
    if let Err(e) = sandbox::apply_from_env() {
        eprintln!("worker: {e}");
        return ExitCode::from(3);
    }
    let mut w = match Worker::from_env(0) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("worker: {e}");
            return ExitCode::from(4);
        }
    };
    let mut threads = Vec::new();
    loop {
        match w.recv() {
            Ok(Event::Conn(c)) => {
                let done = w.done_sender();
                threads.push(std::thread::spawn(move || serve(c, done)));
            }
            Ok(Event::Drain) | Ok(Event::Closed) => break,
            Err(e) => {
                eprintln!("worker: {e}");
                return ExitCode::from(5);
            }
        }
    }
    let results: Vec<String> = threads
        .into_iter()
        .map(|t| match t.join() {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => format!("error: {e}"),
            Err(_) => "panicked".to_string(),
        })
        .collect();
    let create = match File::create("/created-by-worker") {
        Ok(_) => "created".to_string(),
        Err(e) => format!("refused: {e}"),
    };
    let outside = match File::open("/etc/passwd") {
        Ok(_) => "opened".to_string(),
        Err(e) => format!("refused: {e}"),
    };
    say(json!({
        "served": results,
        "create": create,
        "outside": outside,
        "raw": raw_attempts(),
    }));
    ExitCode::SUCCESS
}

/// System calls the filter must refuse, made raw so that no library
/// fallback hides the answer: `name -> errno` (0 if it succeeded).
fn raw_attempts() -> Value {
    fn errno_of(ret: i64) -> i32 {
        if ret == -1 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        } else {
            0
        }
    }
    // SAFETY: an anonymous private mapping touches no existing memory; if
    // it is (wrongly) created it is unmapped at once.
    let mmap_exec = unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            errno_of(-1)
        } else {
            libc::munmap(p, 4096);
            0
        }
    };
    let how = [0u64; 3]; // struct open_how { flags, mode, resolve }
                         // SAFETY: `how` is a live, correctly sized open_how; the path is a
                         // NUL-terminated literal. Any fd returned is closed.
    let openat2 = unsafe {
        let r = libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c"/".as_ptr(),
            how.as_ptr(),
            std::mem::size_of_val(&how),
        );
        if r >= 0 {
            libc::close(r as i32);
        }
        errno_of(r)
    };
    // SAFETY: clone3 with a NULL argument block and size 0 is refused by
    // the kernel (EINVAL) before it could create anything.
    let clone3 = errno_of(unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0) });
    let argv = [std::ptr::null::<libc::c_char>()];
    // SAFETY: the path is a NUL-terminated literal naming nothing; argv and
    // envp are NULL-terminated arrays. It can only fail.
    let execve = errno_of(
        unsafe { libc::execve(c"/nonexistent".as_ptr(), argv.as_ptr(), argv.as_ptr()) }.into(),
    );
    json!({"mmap_exec": mmap_exec, "openat2": openat2, "clone3": clone3, "execve": execve})
}

fn serve(c: Connection, done: DoneSender) -> Result<String, String> {
    use mio::unix::SourceFd;
    use mio::{Events, Interest, Poll, Token};
    let e = |what: &str| {
        let what = what.to_string();
        move |err: std::io::Error| format!("{what}: {err}")
    };
    let stream = c.stream;
    let mut poll = Poll::new().map_err(e("epoll_create"))?;
    let fd = stream.as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&fd), Token(0), Interest::READABLE)
        .map_err(e("epoll_ctl"))?;
    let mut events = Events::with_capacity(4);
    let mut req = Vec::new();
    while !req.contains(&b'\n') {
        poll.poll(&mut events, Some(TIMEOUT))
            .map_err(e("epoll_wait"))?;
        if events.is_empty() {
            return Err("timed out waiting for a request".into());
        }
        let mut buf = [0u8; 256];
        loop {
            match (&stream).read(&mut buf) {
                Ok(0) => return Err("client closed early".into()),
                Ok(n) => req.extend_from_slice(&buf[..n]),
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(err) => return Err(format!("read: {err}")),
            }
        }
    }
    let line = String::from_utf8_lossy(&req);
    let path = line
        .trim()
        .strip_prefix("GET ")
        .ok_or_else(|| format!("bad request {line:?}"))?
        .to_string();
    stream.set_nonblocking(false).map_err(e("ioctl(FIONBIO)"))?;
    let file = File::open(&path).map_err(e("open"))?;
    let len = file.metadata().map_err(e("statx"))?.len();
    let mut sent = 0u64;
    while sent < len {
        // SAFETY: both fds are open for the duration of the call (`file`
        // and `stream` are owned here); a null offset means "use and
        // advance the file's own offset".
        let n = unsafe {
            libc::sendfile(
                stream.as_raw_fd(),
                file.as_raw_fd(),
                std::ptr::null_mut(),
                (len - sent) as usize,
            )
        };
        if n <= 0 {
            return Err(format!("sendfile: {}", std::io::Error::last_os_error()));
        }
        sent += n as u64;
    }
    drop(stream);
    done.done(c.id).map_err(e("DONE"))?;
    Ok(format!("{path}: {sent} bytes"))
}

// ----------------------------------------------------------- parent side

/// A spawned child, killed and reaped on drop.
struct Kid {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
}

impl Kid {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The next line the child prints, within [`TIMEOUT`].
    fn line(&self) -> Result<String, String> {
        self.lines
            .recv_timeout(TIMEOUT)
            .map_err(|e| format!("no line from the child: {e}"))
    }

    fn json(&self) -> Result<Value, String> {
        let l = self.line()?;
        serde_json::from_str(&l).map_err(|e| format!("child printed {l:?}: {e}"))
    }

    /// Closes the child's stdin and waits for it to exit.
    fn finish(mut self) -> Result<i32, String> {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => return Ok(st.code().unwrap_or(-1)),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Ok(None) => return Err("the child did not exit".into()),
                Err(e) => return Err(format!("wait: {e}")),
            }
        }
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lets `fd` survive exec into the next child (the harness is
/// single-threaded, so no other child can inherit it by accident).
fn inheritable(fd: impl AsFd) -> RawFd {
    let raw = fd.as_fd().as_raw_fd();
    fcntl(raw, FcntlArg::F_SETFD(FdFlag::empty())).expect("F_SETFD");
    raw
}

fn spawn(role: &str, env: &[(&str, String)], as_user: Option<u32>) -> Result<Kid, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.env(ROLE_ENV, role)
        .env_remove(SANDBOX_ENV)
        .env_remove(proto::CHANNEL_FD_ENV)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(id) = as_user {
        // std drops supplementary groups (setgroups(0)) when root sets a uid.
        cmd.uid(id).gid(id);
    }
    let mut child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(Kid { child, lines: rx })
}

fn spawn_probe(profile_env: String, as_user: Option<u32>) -> Result<Kid, String> {
    spawn("probe", &[(SANDBOX_ENV, profile_env)], as_user)
}

/// A root-owned 0755 directory under the temp dir, removed on drop.
struct Jail(PathBuf);

impl Jail {
    fn new(tag: &str) -> Result<Jail, String> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "baton-sandbox-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("chmod: {e}"))?;
        Ok(Jail(dir))
    }

    fn put(&self, name: &str, data: &[u8]) -> Result<(), String> {
        let p = self.0.join(name);
        std::fs::write(&p, data).map_err(|e| format!("write {}: {e}", p.display()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| format!("chmod: {e}"))
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn report_of(v: &Value) -> Result<Report, String> {
    if let Some(e) = v.get("error") {
        return Err(format!("the child could not apply its sandbox: {e}"));
    }
    serde_json::from_value(v["report"].clone()).map_err(|e| format!("bad report {v}: {e}"))
}

fn row_status(r: &Report, property: &str) -> Result<Status, String> {
    r.rows
        .iter()
        .find(|row| row.property == property)
        .map(|row| row.status)
        .ok_or_else(|| format!("no row {property:?} in\n{}", r.to_table()))
}

fn expect_error(kid: Kid, step: &str, contains: &str) -> TestResult {
    let v = kid.json()?;
    let code = kid.finish()?;
    ensure!(
        code == 3,
        "child exited {code}, expected 3 (sandbox error); said {v}"
    );
    ensure!(
        v["step"] == step,
        "failed step {}, expected {step}: {v}",
        v["step"]
    );
    let msg = v["error"].as_str().unwrap_or_default();
    ensure!(
        msg.contains(contains) && msg.contains(&format!("`{step}`")),
        "error {msg:?} should name the step and say {contains:?}"
    );
    Ok(Outcome::Passed)
}

// ----------------------------------------------------------------- tests

/// Root → nobody, chrooted, every namespace, no fork, seccomp: the parent's
/// verify() passes and every one of the probe's rows passes (none skipped).
fn full_sandbox() -> TestResult {
    if let Some(skip) = need_root() {
        return Ok(skip);
    }
    let jail = Jail::new("full")?;
    let (_ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
    let leak = File::open("/dev/null").map_err(|e| e.to_string())?;
    let keep = inheritable(&theirs);
    let leaked = inheritable(&leak);
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_err(|e| e.to_string())?;
    let profile = Profile {
        uid: Some(NOBODY),
        gid: Some(NOBODY),
        chroot: Some(jail.0.clone()),
        seccomp: SeccompMode::Default,
        unshare: "mount,pid,ipc,uts,net"
            .parse()
            .map_err(|e| format!("{e}"))?,
        nofile: Some(hard),
        core0: true,
        no_fork: true,
        keep_fds: vec![keep],
        allow_root: false,
    };
    let kid = spawn_probe(profile.to_env(), None)?;
    drop((theirs, leak));
    let v = kid.json()?;
    let report = report_of(&v)?;
    ensure!(
        v["applied"]["uid"] == NOBODY && v["applied"]["seccomp"] == true,
        "applied: {}",
        v["applied"]
    );
    let bad: Vec<_> = report
        .rows
        .iter()
        .filter(|r| r.status != Status::Pass)
        .collect();
    ensure!(
        bad.is_empty(),
        "rows not passing: {bad:#?}\n{}",
        report.to_table()
    );
    ensure!(report.pass, "report.pass is false");
    // The kept fd survived, the leaked one (not in keep_fds) was closed.
    let fds = &report.rows[0];
    ensure!(
        fds.observed == format!("[0, 1, 2, {keep}]") && leaked != keep,
        "fd row: {fds:?} (kept {keep}, leaked {leaked})"
    );
    if let Err(m) = verify(kid.pid(), &profile) {
        return Err(format!("verify: {}", sandbox::describe(&m)));
    }
    let st = ProcStatus::read(kid.pid())?;
    ensure!(
        st.seccomp_filters.unwrap_or(2) == 2 && st.threads == Some(1),
        "status: {st:?}"
    );
    let code = kid.finish()?;
    ensure!(code == 0, "probe exited {code}");
    Ok(Outcome::Passed)
}

/// A mini acceptor (root) hands a TCP connection over SCM_RIGHTS to a worker
/// that confined itself to nobody in a chroot with seccomp, verified on
/// HELLO like the acceptor does; the worker serves a file with sendfile
/// from a thread it spawned under the filter, and reports DONE.
fn handoff() -> TestResult {
    if let Some(skip) = need_root() {
        return Ok(skip);
    }
    let jail = Jail::new("handoff")?;
    let body: Vec<u8> = (0..300 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    jail.put("hello.txt", &body)?;
    let (acc, wrk) = Channel::pair().map_err(|e| e.to_string())?;
    let wfd = inheritable(&wrk);
    let profile = Profile {
        uid: Some(NOBODY),
        gid: Some(NOBODY),
        chroot: Some(jail.0.clone()),
        unshare: "mount,ipc,uts,net".parse().map_err(|e| format!("{e}"))?,
        keep_fds: vec![wfd],
        ..Profile::default()
    };
    let kid = spawn(
        "worker",
        &[
            (SANDBOX_ENV, profile.to_env()),
            (proto::CHANNEL_FD_ENV, wfd.to_string()),
        ],
        None,
    )?;
    drop(wrk);
    acc.set_nonblocking(false).map_err(|e| e.to_string())?;
    set_timeout(&acc)?;
    let recv = |what: &str| -> Result<baton_sdk::Received, String> {
        acc.recv()
            .map_err(|e| format!("waiting for {what}: {e}"))?
            .ok_or_else(|| format!("channel closed while waiting for {what}"))
    };
    match recv("HELLO")?.msg {
        Msg::Hello { pid, .. } => ensure!(pid as i32 == kid.pid(), "HELLO from pid {pid}"),
        m => return Err(format!("expected HELLO, got {m:?}")),
    }
    // The acceptor's check, before WELCOME and any connection.
    if let Err(m) = verify(kid.pid(), &profile) {
        return Err(format!("verify on HELLO: {}", sandbox::describe(&m)));
    }
    acc.send(&Msg::Welcome { worker_id: 1 }, None)
        .map_err(|e| e.to_string())?;

    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let mut client = TcpStream::connect(listener.local_addr().map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    client
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let (server, peer) = listener.accept().map_err(|e| e.to_string())?;
    server.set_nonblocking(true).map_err(|e| e.to_string())?;
    let info = proto::ConnInfo {
        id: 42,
        listener: 0,
        peer,
        local: server.local_addr().map_err(|e| e.to_string())?,
    };
    acc.send(&Msg::Conn(info), Some(server.as_fd()))
        .map_err(|e| e.to_string())?;
    match recv("ACK")?.msg {
        Msg::Ack(ids) => ensure!(ids == [42], "ACK {ids:?}"),
        m => return Err(format!("expected ACK, got {m:?}")),
    }
    drop(server); // acknowledged: the worker owns it now
    client
        .write_all(b"GET /hello.txt\n")
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    client
        .read_to_end(&mut got)
        .map_err(|e| format!("client read: {e}"))?;
    ensure!(
        got == body,
        "client got {} bytes, expected {}",
        got.len(),
        body.len()
    );
    match recv("DONE")?.msg {
        Msg::Done(ids) => ensure!(ids == [42], "DONE {ids:?}"),
        m => return Err(format!("expected DONE, got {m:?}")),
    }
    acc.send(&Msg::Drain, None).map_err(|e| e.to_string())?;
    let v = kid.json()?;
    let code = kid.finish()?;
    ensure!(code == 0, "worker exited {code}: {v}");
    ensure!(
        v["served"] == json!(["/hello.txt: 307200 bytes"]),
        "served: {v}"
    );
    let create = v["create"].as_str().unwrap_or_default();
    ensure!(
        create.starts_with("refused"),
        "creating a file in the jail: {create}"
    );
    let outside = v["outside"].as_str().unwrap_or_default();
    ensure!(
        outside.starts_with("refused"),
        "opening /etc/passwd: {outside}"
    );
    // The filter itself answered: EPERM where the kernel would have said
    // otherwise (execve of a missing file: ENOENT), ENOSYS for the calls
    // whose callers fall back.
    let want = json!({"mmap_exec": libc::EPERM, "openat2": libc::ENOSYS,
                      "clone3": libc::ENOSYS, "execve": libc::EPERM});
    ensure!(v["raw"] == want, "raw calls: {}, expected {want}", v["raw"]);
    Ok(Outcome::Passed)
}

fn set_timeout(chan: &Channel) -> Result<(), String> {
    let tv = nix::sys::time::TimeVal::new(TIMEOUT.as_secs() as i64, 0);
    nix::sys::socket::setsockopt(chan, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
        .map_err(|e| e.to_string())
}

fn root_without_user() -> TestResult {
    if let Some(skip) = need_root() {
        return Ok(skip);
    }
    let kid = spawn_probe(Profile::default().to_env(), None)?;
    expect_error(kid, "preflight", "refusing to run a worker as root")
}

fn missing_chroot() -> TestResult {
    if let Some(skip) = need_root() {
        return Ok(skip);
    }
    let profile = Profile {
        uid: Some(NOBODY),
        gid: Some(NOBODY),
        chroot: Some(PathBuf::from("/nonexistent/baton-jail")),
        ..Profile::default()
    };
    let kid = spawn_probe(profile.to_env(), None)?;
    expect_error(kid, "chroot", "ENOENT")
}

fn bad_profile() -> TestResult {
    let kid = spawn_probe("v=1;uid=65534;gid=65534;sekcomp=off".into(), None)?;
    expect_error(kid, "profile", "unknown key \"sekcomp\"")
}

/// The user to run unprivileged children as: nobody when we are root,
/// else ourselves.
fn unprivileged_user() -> Option<u32> {
    is_root().then_some(NOBODY)
}

/// Started as an ordinary user with an unprivileged profile: fds closed,
/// capabilities cleared, no_new_privs, seccomp. The bounding set and the
/// groups cannot be changed without privilege: those rows are skipped,
/// none fails.
fn unprivileged() -> TestResult {
    if let Some(skip) = need_filter() {
        return Ok(skip);
    }
    let profile = Profile::default();
    let kid = spawn_probe(profile.to_env(), unprivileged_user())?;
    let v = kid.json()?;
    let report = report_of(&v)?;
    ensure!(report.pass, "failing rows:\n{}", report.to_table());
    for (prop, want) in [
        ("uid", Status::Pass),
        ("no_new_privs", Status::Pass),
        ("seccomp mode", Status::Pass),
        ("seccomp refuses an unlisted call", Status::Pass),
        ("capabilities: effective", Status::Pass),
        ("capabilities: bounding", Status::Skip),
        ("setuid(0) refused", Status::Pass),
        ("user namespace refused", Status::Pass),
        ("outside the chroot unreachable", Status::Skip),
    ] {
        let got = row_status(&report, prop)?;
        ensure!(
            got == want,
            "{prop}: {got}, expected {want}\n{}",
            report.to_table()
        );
    }
    match verify(kid.pid(), &profile) {
        Ok(()) => ensure!(
            !holds_setpcap(),
            "a verifier holding CAP_SETPCAP must flag the worker's full bounding set"
        ),
        Err(m) => {
            // A verifier holding CAP_SETPCAP could have given its workers
            // an empty bounding set, so it demands one: the only thing this
            // unprivileged worker could not do.
            ensure!(
                holds_setpcap() && m.len() == 1 && m[0].field == "CapBnd",
                "verify: {}",
                sandbox::describe(&m)
            );
        }
    }
    let code = kid.finish()?;
    ensure!(code == 0, "probe exited {code}");
    Ok(Outcome::Passed)
}

fn unprivileged_chroot() -> TestResult {
    let profile = Profile {
        chroot: Some(std::env::temp_dir()),
        ..Profile::default()
    };
    let kid = spawn_probe(profile.to_env(), unprivileged_user())?;
    expect_error(kid, "chroot", "needs root")
}

/// seccomp=off: verify does not ask for a filter, the probe reports the
/// filter rows as skipped, and everything else still holds.
fn seccomp_off() -> TestResult {
    if let Some(skip) = need_root() {
        return Ok(skip);
    }
    let jail = Jail::new("nofilter")?;
    let profile = Profile {
        uid: Some(NOBODY),
        gid: Some(NOBODY),
        chroot: Some(jail.0.clone()),
        seccomp: SeccompMode::Off,
        ..Profile::default()
    };
    let kid = spawn_probe(profile.to_env(), None)?;
    let v = kid.json()?;
    let report = report_of(&v)?;
    ensure!(report.pass, "failing rows:\n{}", report.to_table());
    for (prop, want) in [
        ("seccomp mode", Status::Skip),
        ("seccomp refuses an unlisted call", Status::Skip),
        ("fork refused", Status::Skip),
        ("setuid(0) refused", Status::Pass),
        ("setgid(0) refused", Status::Pass),
        ("setgroups refused", Status::Pass),
        ("raw sockets refused", Status::Pass),
        ("bind below 1024 refused", Status::Pass),
        ("ptrace of another process refused", Status::Pass),
        // Refused by the kernel itself inside a chroot.
        ("user namespace refused", Status::Pass),
        ("outside the chroot unreachable", Status::Pass),
        ("/etc/shadow unreadable", Status::Pass),
        ("/ not writable", Status::Pass),
    ] {
        let got = row_status(&report, prop)?;
        ensure!(
            got == want,
            "{prop}: {got}, expected {want}\n{}",
            report.to_table()
        );
    }
    if let Err(m) = verify(kid.pid(), &profile) {
        return Err(format!("verify: {}", sandbox::describe(&m)));
    }
    let code = kid.finish()?;
    ensure!(code == 0, "probe exited {code}");
    Ok(Outcome::Passed)
}

/// verify() against a process that applied nothing lists what is missing.
fn verify_unsandboxed() -> TestResult {
    let kid = spawn("idle", &[], None)?;
    ensure!(kid.line()? == "ready", "idle child did not start");
    let profile = Profile {
        uid: Some(12345),
        gid: Some(12345),
        chroot: Some(PathBuf::from("/var/empty-jail")),
        unshare: Unshare {
            net: true,
            ..Unshare::NONE
        },
        ..Profile::default()
    };
    let m = verify(kid.pid(), &profile).err().ok_or("verify passed")?;
    let fields: Vec<&str> = m.iter().map(|m| m.field.as_str()).collect();
    let mut want = vec![
        "Uid",
        "Gid",
        "Groups",
        "NoNewPrivs",
        "Seccomp",
        "root",
        "ns/net",
    ];
    if is_root() {
        want.extend(["CapEff", "CapPrm"]);
    }
    if holds_setpcap() {
        want.push("CapBnd");
    }
    for f in want {
        ensure!(
            fields.contains(&f),
            "{f} not flagged: {}",
            sandbox::describe(&m)
        );
    }
    let code = kid.finish()?;
    ensure!(code == 0, "idle child exited {code}");
    Ok(Outcome::Passed)
}
