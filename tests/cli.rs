//! What a new operator meets first, on real processes: options checked up
//! front (`--root` as the workers will see it, `baton check` with flags
//! alone), the hint when the control socket is taken, and logs that are one
//! format from every process (JSON lines with `--log-format json`, no
//! colour escapes on a pipe).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{bin, tempdir, Baton};

/// One embedded static worker serving the directory that follows.
const ONE_STATIC_WORKER: [&str; 6] = [
    "--listen",
    "127.0.0.1:0",
    "--workers",
    "1",
    "--no-control",
    "--root",
];

fn baton(args: &[&str]) -> Output {
    Command::new(bin("baton"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run baton")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A directory with one file, readable by anyone.
fn site(prefix: &str) -> std::path::PathBuf {
    let dir = tempdir(prefix);
    std::fs::write(dir.join("index.html"), "<h1>hi</h1>\n").expect("write");
    chmod(&dir, 0o755);
    chmod(&dir.join("index.html"), 0o644);
    dir
}

/// One GET, answered (the static worker logs an access line for it).
fn get(addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn a_root_the_workers_cannot_read_is_refused_up_front() {
    let missing = baton(&["--no-control", "--root", "/nonexistent/baton-root"]);
    assert_eq!(missing.status.code(), Some(2));
    let err = text(&missing.stderr);
    assert!(err.contains("no such directory"), "{err}");

    if !common::is_root() {
        eprintln!("skipped the 0700 part: only root runs workers as another user (nobody)");
        return;
    }
    let dir = tempdir("baton-cli-root");
    chmod(&dir, 0o700);
    let d = dir.to_str().expect("utf-8 path");
    // Started as root without --user, workers run as nobody: refused at
    // once, before any worker starts, saying what to do.
    let out = baton(&["--no-control", "--listen", "127.0.0.1:0", "--root", d]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("nobody") && err.contains("--user") && err.contains("0700"),
        "{err}"
    );
    assert!(
        !err.contains("no worker left") && err.lines().count() == 1,
        "one line, before any worker started: {err}"
    );
    // `baton check` says the same.
    let out = baton(&["check", "--root", d]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("nobody"));
    // Outside the chroot: refused too.
    chmod(&dir, 0o755);
    let jail = tempdir("baton-cli-jail");
    let out = baton(&[
        "check",
        "--root",
        d,
        "--chroot",
        jail.to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("outside --chroot"),
        "{}",
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&jail);
}

#[test]
fn check_validates_flags_without_a_file() {
    let echo = bin("baton-echo");
    let out = baton(&[
        "check",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--balance",
        "round-robin",
        "--",
        echo.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains("1 listener,") && said.contains("1 worker ") && said.contains("round-robin"),
        "{said}"
    );
    let out = baton(&["check", "--backlog", "0"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--backlog must be at least 1"));
}

#[test]
fn a_taken_control_socket_says_what_to_do() {
    let dir = tempdir("baton-cli-control");
    let sock = dir.join("c.sock");
    let s = sock.to_str().expect("utf-8");
    let echo = common::echo_cmd();
    let args = common::echo_args("1", &["--control", s], &echo);
    let mut first = Baton::start(&args, 1);
    let second = baton(&args);
    assert!(!second.status.success());
    let err = text(&second.stderr);
    assert!(
        err.contains("in use") && err.contains("--control PATH") && err.contains("--no-control"),
        "{err}"
    );
    first.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn with_log_format_json_every_line_of_every_process_is_json() {
    let dir = site("baton-cli-json");
    let d = dir.to_str().expect("utf-8");
    let mut args = ONE_STATIC_WORKER.to_vec();
    args.push(d);
    let mut b = Baton::start(&args, 1);
    assert!(get(b.addr()).starts_with("HTTP/1.1 200"));
    // The static worker's own line about the request.
    b.wait_until(Duration::from_secs(10), |l| l.json["target"] == "access")
        .expect("the static worker's access log line");
    b.stop();
    assert!(!b.seen.is_empty());
    let not_json = b.lines_not_json();
    assert!(
        not_json.is_empty(),
        "lines that are not JSON: {not_json:#?}"
    );
    // Both processes spoke.
    assert!(b.seen.iter().any(|l| l.message() == "worker ready"));
    assert!(b
        .seen
        .iter()
        .any(|l| l.json["span"]["name"] == "baton-static"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn text_logs_on_a_pipe_have_no_colour() {
    let dir = site("baton-cli-ansi");
    let mut child = Command::new(bin("baton"))
        .args(ONE_STATIC_WORKER)
        .arg(&dir)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn baton");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut seen = Vec::new();
    let mut next = |seen: &mut Vec<String>| {
        let l = lines
            .next()
            .and_then(Result::ok)
            .unwrap_or_else(|| panic!("baton stopped logging: {seen:#?}"));
        seen.push(l.clone());
        l
    };
    // The listener's address, then the worker's readiness.
    let addr = loop {
        let l = next(&mut seen);
        if l.contains("listening") {
            if let Some(a) = l.split("addr=").nth(1) {
                break a.split_whitespace().next().unwrap_or("").to_string();
            }
        }
    };
    while !next(&mut seen).contains("worker ready") {}
    assert!(get(addr.parse().expect("addr")).starts_with("HTTP/1.1 200"));
    // The static worker's access line.
    while !next(&mut seen).contains("method=GET") {}
    let _ = child.kill();
    let _ = child.wait();
    for l in &seen {
        assert!(!l.contains('\x1b'), "an escape sequence in {l:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reload_keeps_the_flags_over_the_file_and_needs_a_file() {
    let dir = tempdir("baton-cli-reload");
    let file = dir.join("baton.toml");
    let echo = bin("baton-echo");
    let write = |workers: usize| {
        std::fs::write(
            &file,
            format!(
                "listen = [\"127.0.0.1:0\"]\n[pool]\ncommand = [{:?}]\nworkers = {workers}\nbalance = \"least-conn\"\n",
                echo.display().to_string()
            ),
        )
        .expect("write config");
    };
    write(1);
    let f = file.to_str().expect("utf-8");
    let mut b = Baton::start(&["--config", f, "--balance", "round-robin"], 1);
    write(2);
    let (ok, out, err) = b.ctl(&["reload"]);
    assert!(ok, "{err}");
    // The flag still wins over the file's balance: no change there.
    assert!(
        out.contains("workers: added") && !out.contains("balance"),
        "{out}"
    );
    b.wait_for("worker ready", Duration::from_secs(20));
    b.stop();

    // Without --config there is nothing to re-read, and it says so.
    let cmd = common::echo_cmd();
    let mut b = Baton::start(&common::echo_args("1", &[], &cmd), 1);
    let (ok, _, err) = b.ctl(&["reload"]);
    assert!(!ok && err.contains("started without --config"), "{err}");
    b.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
