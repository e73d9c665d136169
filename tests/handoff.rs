//! The acceptor, the handoff protocol and the worker pool, driven end to
//! end: a real `baton`, real `baton-echo`/`baton-chaos` workers, real TCP
//! clients on loopback.

mod common;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::{
    bin, chaos_cmd, connect, echo_args, echo_cmd, echo_many, echo_once, payload, Baton, IO_TIMEOUT,
};
use nix::sys::signal::Signal;

/// Stops baton with SIGTERM, checks it exits 0, and returns the handled
/// count each worker reported on its way out.
fn stop(b: &mut Baton) -> Vec<u64> {
    b.stop();
    b.seen
        .iter()
        .filter(|l| l.message() == "worker disconnected")
        .filter_map(|l| l.field("handled")?.parse().ok())
        .collect()
}

#[test]
fn hundreds_of_concurrent_clients_are_echoed_and_spread_over_every_worker() {
    for balance in ["least-conn", "round-robin"] {
        let cmd = echo_cmd();
        let mut b = Baton::start(&echo_args("4", &["--balance", balance], &cmd), 4);
        let addr = b.addr();
        let n = 300;
        // Every client holds its connection open until all are connected,
        // so that the pool really has hundreds in flight at once.
        let barrier = Arc::new(Barrier::new(n));
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let barrier = barrier.clone();
                std::thread::spawn(move || -> io::Result<bool> {
                    let mut s = connect(addr)?;
                    s.write_all(&payload(i))?;
                    let mut back = vec![0u8; payload(i).len()];
                    s.read_exact(&mut back)?;
                    barrier.wait();
                    s.shutdown(Shutdown::Write)?;
                    let mut rest = Vec::new();
                    s.read_to_end(&mut rest)?;
                    Ok(back == payload(i) && rest.is_empty())
                })
            })
            .collect();
        let ok = handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .filter(|r| matches!(r, Ok(true)))
            .count();
        assert_eq!(ok, n, "{balance}: every client gets its own bytes back");
        let handled = stop(&mut b);
        assert_eq!(
            handled.len(),
            4,
            "{balance}: four workers reported: {handled:?}"
        );
        assert_eq!(
            handled.iter().sum::<u64>(),
            n as u64,
            "{balance}: {handled:?}"
        );
        assert!(
            handled.iter().all(|&h| h >= 30),
            "{balance}: connections spread over all workers: {handled:?}"
        );
    }
}

#[test]
fn a_worker_that_dies_before_acking_loses_no_client() {
    // Worker 1 takes 3 connections without acknowledging them and exits;
    // every other worker (and worker 1's replacement) echoes.
    let cmd = chaos_cmd("die-before-ack", &["--bad-workers", "1", "--count", "3"]);
    let mut b = Baton::start(&echo_args("2", &[], &cmd), 2);
    let (ok, errors) = echo_many(b.addr(), 60);
    assert_eq!(ok, 60, "every client answered: {errors:?}");
    let gone = b
        .find(Duration::from_secs(10), |l| {
            l.message() == "worker disconnected" && l.field("worker").as_deref() == Some("1")
        })
        .expect("worker 1 disconnected");
    // It took 3 and more were queued on its channel: all come back.
    let redispatched: u64 = gone
        .field("redispatched")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(redispatched >= 3, "{}", gone.raw);
    assert_eq!(gone.field("lost").as_deref(), Some("0"), "{}", gone.raw);
    b.wait_until(Duration::from_secs(10), |l| l.message() == "worker ready")
        .expect("a replacement worker comes up");
    stop(&mut b);
    let stopped = b
        .seen
        .iter()
        .rev()
        .find(|l| l.message() == "stopped")
        .expect("stopped line");
    assert_eq!(
        stopped.field("redispatched"),
        Some(redispatched.to_string())
    );
}

#[test]
fn kill_9_under_load_restarts_the_worker_and_loses_only_what_it_had_acked() {
    let cmd = echo_cmd();
    let mut b = Baton::start(&echo_args("2", &[], &cmd), 2);
    let addr = b.addr();
    let victim = b.worker_pids()[0];
    let clients = 8;
    let per_client = 150;
    let barrier = Arc::new(Barrier::new(clients + 1));
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut failed = Vec::new();
                for i in 0..per_client {
                    if i == per_client / 3 {
                        barrier.wait();
                    }
                    let p = payload(c * 1000 + i);
                    match echo_once(addr, &p) {
                        Ok(back) if back == p => {}
                        Ok(back) => failed.push(format!("wrong echo {back:?}")),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                failed
            })
        })
        .collect();
    barrier.wait();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL).expect("kill -9");
    let failures: Vec<String> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("client"))
        .collect();
    let failed = failures.len();
    let exited = b
        .find(Duration::from_secs(10), |l| {
            l.message() == "worker exited" && l.field("pid") == Some(victim.to_string())
        })
        .expect("the kill is seen");
    assert!(exited.raw.contains("SIGKILL"), "{}", exited.raw);
    b.wait_until(Duration::from_secs(10), |l| l.message() == "worker ready")
        .expect("the worker is restarted");
    let gone = b
        .find(Duration::from_secs(10), |l| {
            l.message() == "worker disconnected" && l.field("pid") == Some(victim.to_string())
        })
        .expect("the victim's channel closed");
    let lost: usize = gone.field("lost").and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(
        failed <= lost,
        "{failed} clients failed ({failures:?}), but the killed worker had only {lost} acknowledged connections: {}",
        gone.raw
    );
    // And the pool serves again at full strength.
    let (ok, errors) = echo_many(addr, 40);
    assert_eq!(ok, 40, "{errors:?}");
    assert_eq!(b.worker_pids().len(), 2);
    stop(&mut b);
}

fn misbehaving_worker_is_disconnected(mode: &str, reason: &str, extra: &[&str]) {
    let cmd = chaos_cmd(mode, &["--bad-workers", "1"]);
    let mut b = Baton::start(&echo_args("2", extra, &cmd), 2);
    let (ok, errors) = echo_many(b.addr(), 50);
    assert_eq!(ok, 50, "{mode}: every client answered: {errors:?}");
    let gone = b
        .find(Duration::from_secs(10), |l| {
            l.message() == "worker disconnected" && l.field("worker").as_deref() == Some("1")
        })
        .unwrap_or_else(|| panic!("{mode}: worker 1 was disconnected"));
    assert!(
        gone.field("reason").unwrap_or_default().contains(reason),
        "{mode}: {}",
        gone.raw
    );
    assert_eq!(
        b.child.try_wait().expect("try_wait"),
        None,
        "{mode}: acceptor alive"
    );
    stop(&mut b);
}

#[test]
fn a_worker_sending_garbage_is_disconnected_and_the_others_serve() {
    misbehaving_worker_is_disconnected("garbage", "protocol violation", &[]);
}

#[test]
fn a_worker_sending_the_wrong_fd_count_is_disconnected() {
    misbehaving_worker_is_disconnected("extra-fd", "file descriptors", &[]);
}

#[test]
fn a_hung_worker_is_disconnected_and_its_connections_served_elsewhere() {
    misbehaving_worker_is_disconnected("hang", "unresponsive", &["--ack-timeout", "300ms"]);
}

#[test]
fn a_worker_that_never_says_hello_is_killed() {
    let cmd = chaos_cmd("no-hello", &["--bad-workers", "1"]);
    let mut b = Baton::start(&echo_args("2", &["--hello-timeout", "300ms"], &cmd), 1);
    let gone = b
        .wait_until(Duration::from_secs(10), |l| {
            l.message() == "worker disconnected"
        })
        .expect("the silent worker is disconnected");
    assert!(
        gone.field("reason")
            .unwrap_or_default()
            .contains("no HELLO"),
        "{}",
        gone.raw
    );
    b.wait_for("worker ready", Duration::from_secs(10));
    let (ok, errors) = echo_many(b.addr(), 20);
    assert_eq!(ok, 20, "{errors:?}");
    stop(&mut b);
}

#[test]
fn a_crash_looping_worker_is_given_up_with_a_clear_error() {
    let cmd = chaos_cmd("crash", &[]);
    let mut b = Baton::start(&echo_args("1", &["--max-restarts", "3"], &cmd), 0);
    let st = b.wait_exit(Duration::from_secs(30));
    assert_eq!(st.code(), Some(1), "exits non-zero when no worker is left");
    let delays: Vec<u64> = b
        .seen
        .iter()
        .filter(|l| l.message() == "worker restarting")
        .filter_map(|l| l.field("delay_ms")?.parse().ok())
        .collect();
    assert_eq!(delays, vec![100, 200, 400], "exponential backoff");
    assert!(
        b.seen.iter().any(|l| l.raw.contains("crash-looping")),
        "the log says why it stopped restarting"
    );
}

#[test]
fn with_every_worker_full_clients_wait_in_the_backlog_until_capacity_frees() {
    let cmd = echo_cmd();
    let mut b = Baton::start(&echo_args("1", &["--worker-connections", "2"], &cmd), 1);
    let addr = b.addr();
    let mut held = Vec::new();
    for i in 0..2 {
        let mut s = connect(addr).expect("connect");
        s.write_all(&payload(i)).expect("write");
        let mut back = vec![0u8; payload(i).len()];
        s.read_exact(&mut back).expect("echo while there is room");
        held.push(s);
    }
    // The worker is full: a third client completes its TCP handshake (the
    // kernel's backlog) but nobody answers it.
    let mut third = connect(addr).expect("connect into the backlog");
    third.write_all(b"waiting\n").expect("write");
    third
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut buf = [0u8; 8];
    let e = third.read(&mut buf).expect_err("no answer while full");
    assert!(
        matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        "{e}"
    );
    // One slot frees: the third client is served.
    drop(held.remove(0));
    third.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    third
        .read_exact(&mut buf)
        .expect("served once capacity frees");
    assert_eq!(&buf, b"waiting\n");
    drop(third);
    drop(held);
    stop(&mut b);
}

#[test]
fn sigterm_lets_in_flight_connections_finish_and_exits_0_without_zombies() {
    let cmd = echo_cmd();
    let mut b = Baton::start(&echo_args("2", &[], &cmd), 2);
    let addr = b.addr();
    let workers = b.worker_pids();
    // Ten clients in the middle of a conversation.
    let mut open: Vec<TcpStream> = (0..10)
        .map(|i| {
            let mut s = connect(addr).expect("connect");
            s.write_all(&payload(i)).expect("write");
            let mut back = vec![0u8; payload(i).len()];
            s.read_exact(&mut back).expect("first echo");
            s
        })
        .collect();
    b.signal(Signal::SIGTERM);
    b.wait_for(
        "shutting down: no new connections; workers finish what they have",
        Duration::from_secs(10),
    );
    // New clients are refused now...
    assert!(TcpStream::connect(addr).is_err(), "listener closed");
    // ...while the open ones finish their conversation.
    for (i, s) in open.iter_mut().enumerate() {
        s.write_all(b"and goodbye\n").expect("write after SIGTERM");
        let mut back = [0u8; 12];
        s.read_exact(&mut back).expect("echo after SIGTERM");
        assert_eq!(&back, b"and goodbye\n", "client {i}");
        s.shutdown(Shutdown::Write).expect("half-close");
    }
    drop(open);
    let st = b.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "{st:?}");
    for pid in workers {
        assert!(
            b.seen.iter().any(|l| l.message() == "worker exited"
                && l.field("pid") == Some(pid.to_string())
                && l.raw.contains("exit code 0")),
            "worker {pid} reaped after a clean exit"
        );
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "worker {pid} is gone, not a zombie"
        );
    }
}

#[test]
fn a_second_signal_stops_at_once() {
    let cmd = echo_cmd();
    let mut b = Baton::start(&echo_args("1", &["--shutdown-timeout", "60s"], &cmd), 1);
    let worker = b.worker_pids()[0];
    // An open connection keeps the worker busy: the first SIGTERM waits.
    let _open = {
        let mut s = connect(b.addr()).expect("connect");
        s.write_all(b"x").expect("write");
        let mut one = [0u8; 1];
        s.read_exact(&mut one).expect("echo");
        s
    };
    b.signal(Signal::SIGTERM);
    b.wait_for(
        "shutting down: no new connections; workers finish what they have",
        Duration::from_secs(10),
    );
    b.signal(Signal::SIGINT);
    let st = b.wait_exit(Duration::from_secs(10));
    assert_eq!(st.code(), Some(1), "forced stop");
    assert!(!std::path::Path::new(&format!("/proc/{worker}")).exists());
}

#[test]
fn one_sigterm_delivered_twice_is_still_a_graceful_stop() {
    // GNU timeout sends its signal to the process and to its group: baton
    // sees the same SIGTERM from the same sender twice within a moment.
    let cmd = echo_cmd();
    let mut b = Baton::start(&echo_args("1", &["--shutdown-timeout", "60s"], &cmd), 1);
    let mut open = connect(b.addr()).expect("connect");
    open.write_all(b"x").expect("write");
    let mut one = [0u8; 1];
    open.read_exact(&mut one).expect("echo");
    b.signal(Signal::SIGTERM);
    b.wait_for(
        "shutting down: no new connections; workers finish what they have",
        Duration::from_secs(10),
    );
    b.signal(Signal::SIGTERM);
    b.wait_until(Duration::from_secs(10), |l| {
        l.message().starts_with("the same stop signal again")
    })
    .expect("the duplicate is recognised");
    drop(open);
    let st = b.wait_exit(Duration::from_secs(20));
    assert_eq!(st.code(), Some(0), "still graceful");
}

#[test]
fn out_of_file_descriptors_the_acceptor_pauses_and_recovers() {
    let cmd = echo_cmd();
    let mut b = Baton::start(&echo_args("2", &[], &cmd), 2);
    let pid = b.pid();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count() as u64;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit with a valid pid; a null new limit only reads the
    // current one into `lim`.
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut lim) };
    assert_eq!(r, 0, "prlimit: {}", io::Error::last_os_error());
    // Room for two accepted connections at a time, no more.
    lim.rlim_cur = open + 2;
    // SAFETY: as above, with an initialised new limit and no old one.
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
    assert_eq!(r, 0, "prlimit: {}", io::Error::last_os_error());
    let (ok, errors) = echo_many(b.addr(), 200);
    assert_eq!(ok, 200, "every client served despite EMFILE: {errors:?}");
    assert_eq!(b.child.try_wait().expect("try_wait"), None, "still running");
    stop(&mut b);
    let warnings = b
        .seen
        .iter()
        .filter(|l| l.message().contains("out of file descriptors"))
        .count();
    let stopped = b
        .seen
        .iter()
        .rev()
        .find(|l| l.message() == "stopped")
        .expect("stopped");
    let pauses: u64 = stopped
        .field("emfile_pauses")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(pauses >= 1, "EMFILE was hit: {}", stopped.raw);
    assert_eq!(
        warnings, 1,
        "logged once, not per connection ({pauses} pauses)"
    );
}

#[test]
fn bad_command_lines_fail_with_a_clear_message() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin("baton"))
            .args(args)
            .output()
            .expect("run baton");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--listen", "nonsense", "--", "/bin/true"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--listen nonsense"), "{err}");
    let (code, err) = run(&["--listen", "127.0.0.1:0", "--", "/nonexistent/worker"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("/nonexistent/worker not found"), "{err}");
    let (code, err) = run(&["--workers", "0", "--", "/bin/true"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--workers must be at least 1"), "{err}");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let (code, err) = run(&["--listen", &addr, "--", "/bin/true"]);
    assert_eq!(code, Some(1));
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
    let (code, out) = {
        let out = std::process::Command::new(bin("baton"))
            .arg("--help")
            .output()
            .expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert_eq!(code, Some(0));
    for opt in [
        "--listen",
        "--workers",
        "--worker-connections",
        "--balance",
        "--shutdown-timeout",
        "--log-format",
    ] {
        assert!(out.contains(opt), "--help explains {opt}");
    }
}
