//! The handoff's promises under faults: nothing lost, nothing served twice,
//! nothing wedged. Each test drives a real `baton` with real workers
//! (`baton-echo`, `baton-static`, or a `baton-chaos` worker that breaks a
//! rule on purpose) and real TCP clients on loopback, and fails without the
//! fix it names.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    bin, chaos_cmd, connect, echo_args as args, echo_cmd, echo_once, payload, Baton, IO_TIMEOUT,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// `--no-sandbox` for workers that must do what the seccomp filter refuses
/// (a chaos worker signalling its parent), or keep the fd limit they
/// inherit; as root that takes `--allow-root-workers` too.
const NO_SANDBOX: [&str; 2] = ["--no-sandbox", "--allow-root-workers"];

/// A baton command whose RLIMIT_NOFILE (soft and hard) is `n`.
fn with_nofile(n: u64) -> Command {
    let mut cmd = Command::new(bin("baton"));
    // SAFETY: setrlimit is async-signal-safe; the closure allocates nothing
    // and touches no lock, as a pre_exec hook must.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, n, n)
                .map_err(std::io::Error::from)
        });
    }
    cmd
}

/// Waits until process `pid` has exited (gone, or a zombie nobody reaped).
fn wait_dead(pid: i32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return,
            Ok(stat) => {
                // The state follows the command name, which is in parentheses.
                let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                if state.starts_with('Z') || state.starts_with('X') {
                    return;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} still alive after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn field_u64(l: &common::LogLine, name: &str) -> u64 {
    l.field(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {name} in {}", l.raw))
}

/// Sends `p`, half-closes, and returns everything that comes back.
fn client(addr: std::net::SocketAddr, p: Vec<u8>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut s = connect(addr).expect("connect");
        s.write_all(&p).expect("write");
        s.shutdown(Shutdown::Write).expect("half-close");
        let mut back = Vec::new();
        let _ = s.read_to_end(&mut back);
        back
    })
}

#[test]
fn an_acknowledged_connection_is_never_served_twice_when_its_worker_dies_busy() {
    // Worker 1 acknowledges connection A, answers part of it, reports it
    // DONE and dies with connection B unread on its channel, while the
    // acceptor is stopped: on waking, the acceptor sees the child exit first
    // and a channel that reports ECONNRESET before its queued ACK and DONE.
    // Those messages are facts: A must not go to a second worker (its
    // client would get a second answer after the first), B must.
    let cmd = chaos_cmd("ack-done-die", &["--bad-workers", "1"]);
    let mut b = Baton::start(&args("1", &NO_SANDBOX, &cmd), 1);
    let addr = b.addr();
    let victim = b.worker_pids()[0];
    let a = client(addr, b"first client\n".to_vec());
    // B only once A is with the worker, so that B is the one left unread.
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.ctl_json(&["status"])["handed_off"] != 1 {
        assert!(Instant::now() < deadline, "A was never handed off");
        std::thread::sleep(Duration::from_millis(10));
    }
    let second = client(addr, b"second client\n".to_vec());
    // The worker stopped the acceptor and died: continue it.
    wait_dead(victim, Duration::from_secs(20));
    kill(Pid::from_raw(b.pid()), Signal::SIGCONT).expect("SIGCONT");
    let got_a = a.join().expect("client A");
    let got_b = second.join().expect("client B");
    assert_eq!(
        String::from_utf8_lossy(&got_a),
        "partial\n",
        "A is answered once, by the worker that acknowledged it"
    );
    assert_eq!(got_b, b"second client\n", "B goes to the replacement");
    let gone = b
        .find(Duration::from_secs(10), |l| {
            l.message() == "worker disconnected" && l.field("pid") == Some(victim.to_string())
        })
        .expect("the dead worker is disconnected");
    assert_eq!(field_u64(&gone, "lost"), 0, "A was done: {}", gone.raw);
    assert_eq!(field_u64(&gone, "handled"), 1, "{}", gone.raw);
    assert_eq!(field_u64(&gone, "redispatched"), 1, "only B: {}", gone.raw);
    let st = b.ctl_json(&["status"]);
    assert_eq!(st["lost"], 0, "{st}");
    assert_eq!(st["redispatched"], 1, "{st}");
    b.stop();
}

#[test]
fn a_worker_that_drains_reports_exact_counts() {
    // A removed worker drains and exits 0: every DONE it sent is counted
    // (lost=0, at INFO), and its handled count is the one it counted itself.
    let cmd = echo_cmd();
    let mut b = Baton::start(&args("2", &[], &cmd), 2);
    let addr = b.addr();
    for round in 0..5 {
        let load = common::Load::start(addr, 4);
        let (ok, errors) = (0..40)
            .map(|i| echo_once(addr, &payload(round * 100 + i)))
            .fold((0, Vec::new()), |(ok, mut e), r| match r {
                Ok(_) => (ok + 1, e),
                Err(err) => {
                    e.push(err.to_string());
                    (ok, e)
                }
            });
        assert_eq!(ok, 40, "{errors:?}");
        let rows = b.ctl_json(&["workers"]);
        let id = rows[0]["id"].as_u64().expect("a worker id");
        let pid = rows[0]["pid"].as_i64().expect("its pid");
        let (okr, _, err) = b.ctl(&["remove", &id.to_string()]);
        assert!(okr, "{err}");
        let gone = b
            .wait_until(Duration::from_secs(20), |l| {
                l.message() == "worker disconnected" && l.field("worker") == Some(id.to_string())
            })
            .expect("the removed worker leaves");
        let (ok_load, failed) = load.stop();
        assert!(failed.is_empty(), "{failed:?}");
        assert!(ok_load > 0);
        assert_eq!(
            gone.json["level"], "INFO",
            "a clean drain is no warning: {}",
            gone.raw
        );
        assert!(gone.field("lost").is_none(), "{}", gone.raw);
        let own = b
            .find(Duration::from_secs(10), |l| {
                l.json["target"] == "baton-echo"
                    && l.json["span"]["pid"] == pid
                    && l.message().contains("exiting after")
            })
            .expect("the worker's own count");
        let counted: u64 = own
            .raw
            .split("exiting after ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("a number");
        assert_eq!(
            field_u64(&gone, "handled"),
            counted,
            "the acceptor's count is the worker's: {}",
            gone.raw
        );
        let (oka, _, err) = b.ctl(&["add", "1"]);
        assert!(oka, "{err}");
        b.wait_for("worker ready", Duration::from_secs(20));
    }
    b.stop();
}

#[test]
fn at_its_fd_limit_the_acceptor_pauses_and_still_spawns_and_answers_control() {
    // The acceptor may hold 256 fds. Both workers are stopped, so nothing it
    // sends is acknowledged: it must stop accepting at its budget (clients
    // wait in the backlog), keep answering `baton ctl`, spawn and verify a
    // new worker, and serve everyone once the workers continue.
    let cmd = echo_cmd();
    let mut b = Baton::start_with(
        with_nofile(256),
        &args("2", &["--ack-timeout", "60s"], &cmd),
        2,
    );
    let addr = b.addr();
    let workers = b.worker_pids();
    for &p in &workers {
        kill(Pid::from_raw(p), Signal::SIGSTOP).expect("SIGSTOP");
    }
    let n = 400;
    let clients: Vec<_> = (0..n).map(|i| client(addr, payload(i))).collect();
    b.wait_until(Duration::from_secs(20), |l| {
        l.message()
            .starts_with("holding as many connections as the fd limit allows")
    })
    .expect("accepting pauses at the fd budget");
    let st = b.ctl_json(&["status"]);
    let held = st["held"].as_u64().expect("held");
    let budget = st["fd_budget"].as_u64().expect("budget");
    assert!(held >= budget && held < 256, "{st}");
    let (ok, out, err) = b.ctl(&["add", "1"]);
    assert!(ok, "a worker can be spawned at the limit: {out} {err}");
    b.wait_for("worker ready", Duration::from_secs(20));
    for &p in &workers {
        kill(Pid::from_raw(p), Signal::SIGCONT).expect("SIGCONT");
    }
    let mut wrong = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let back = c.join().expect("client");
        if back != payload(i) {
            wrong.push(i);
        }
    }
    assert!(wrong.is_empty(), "clients not echoed: {wrong:?}");
    assert_eq!(b.child.try_wait().expect("try_wait"), None, "baton alive");
    assert!(
        !b.seen.iter().any(|l| l.raw.contains("cannot spawn")
            || l.raw.contains("crash-looping")
            || l.raw.contains("sandbox check")),
        "no resource failure was taken for a worker's"
    );
    b.stop();
}

#[test]
fn a_worker_announces_only_what_its_fd_limit_can_hold() {
    // The worker inherits an fd limit of 100 (no sandbox, so nothing raises
    // it) while --worker-connections is 1024. It must announce less than
    // 100, the acceptor must never send more, and 150 clients held open all
    // get served in turn: none is lost to a CONN whose fd could not arrive.
    let cmd = echo_cmd();
    let mut b = Baton::start_with(with_nofile(100), &args("1", &NO_SANDBOX, &cmd), 0);
    let ready = b.wait_for("worker ready", Duration::from_secs(20));
    let capacity = field_u64(&ready, "capacity");
    assert!(
        (1..100).contains(&capacity),
        "announced within the fd limit: {}",
        ready.raw
    );
    let addr = b.addr();
    let n = 150;
    let mut open: Vec<TcpStream> = (0..n)
        .map(|i| {
            let mut s = connect(addr).expect("connect");
            s.write_all(&payload(i)).expect("write");
            s
        })
        .collect();
    for (i, s) in open.iter_mut().enumerate() {
        let mut back = vec![0u8; payload(i).len()];
        s.read_exact(&mut back)
            .unwrap_or_else(|e| panic!("client {i} not served: {e}"));
        assert_eq!(back, payload(i));
        s.shutdown(Shutdown::Both).expect("close");
    }
    drop(open);
    assert!(
        !b.seen.iter().any(|l| l.message() == "worker exited"),
        "the worker never died"
    );
    b.stop();
}

#[test]
fn a_worker_that_served_is_restarted_however_often_it_is_killed() {
    // --max-restarts 1 would give up on a worker that cannot start; one
    // that said HELLO and served is no crash loop, whoever kills it.
    let cmd = echo_cmd();
    let mut b = Baton::start(
        &args(
            "1",
            &["--max-restarts", "1", "--restart-window", "60s"],
            &cmd,
        ),
        1,
    );
    let addr = b.addr();
    for i in 0..6 {
        let p = payload(i);
        assert_eq!(echo_once(addr, &p).expect("served"), p);
        let pid = b.worker_pids()[0];
        kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill -9");
        b.wait_until(Duration::from_secs(20), |l| {
            l.message() == "worker ready" && l.field("pid") != Some(pid.to_string())
        })
        .unwrap_or_else(|| panic!("kill {i}: the worker comes back"));
    }
    assert!(!b.seen.iter().any(|l| l.raw.contains("crash-looping")));
    let st = b.ctl_json(&["status"]);
    assert_eq!(st["workers"]["crash_looped"], 0, "{st}");
    assert_eq!(st["workers"]["ready"], 1, "{st}");
    b.stop();
}

#[test]
fn a_worker_that_never_reports_done_is_flagged_stalled_and_the_pool_serves() {
    let cmd = chaos_cmd("no-done", &["--bad-workers", "1"]);
    let mut b = Baton::start(
        &args(
            "2",
            &["--worker-connections", "1", "--stall-timeout", "300ms"],
            &cmd,
        ),
        2,
    );
    let addr = b.addr();
    // Fill worker 1 (it answers "no done" and closes, but never says so).
    let mut answers = Vec::new();
    for i in 0..4 {
        answers.push(echo_once(addr, &payload(i)).expect("answered"));
    }
    let stalled = b
        .wait_until(Duration::from_secs(10), |l| {
            l.message().starts_with("worker stalled")
        })
        .expect("the stall is logged");
    assert_eq!(
        stalled.field("worker").as_deref(),
        Some("1"),
        "{}",
        stalled.raw
    );
    let st = b.ctl_json(&["status"]);
    assert_eq!(st["workers"]["stalled"], 1, "{st}");
    let metrics = b.ctl_json(&["metrics"]);
    let text = metrics.as_str().expect("metrics text");
    assert!(
        text.contains("baton_worker_stalled{pool=\"default\",worker=\"1\"} 1"),
        "{text}"
    );
    // The other worker serves everyone from now on.
    for i in 10..40 {
        let p = payload(i);
        assert_eq!(echo_once(addr, &p).expect("served"), p, "client {i}");
    }
    b.stop();
}

#[test]
fn a_slow_worker_gets_no_more_connections_while_another_has_room() {
    // Worker 1 waits 1.5 s before acknowledging each connection. With
    // round-robin it would get one client in three, each waiting 1.5 s or
    // more; once its oldest CONN is unacknowledged past a small bound, it
    // gets nothing while the others have room.
    let cmd = chaos_cmd("slow-ack", &["--bad-workers", "1", "--delay-ms", "1500"]);
    let mut b = Baton::start(
        &args(
            "3",
            &["--balance", "round-robin", "--ack-timeout", "30s"],
            &cmd,
        ),
        3,
    );
    let addr = b.addr();
    let n = 30;
    let clients: Vec<_> = (0..n)
        .map(|i| {
            // A steady arrival rate: 30 clients over 0.6 s.
            std::thread::sleep(Duration::from_millis(20));
            std::thread::spawn(move || {
                let start = Instant::now();
                let p = payload(i);
                let back = echo_once(addr, &p).expect("served");
                assert_eq!(back, p, "client {i}");
                start.elapsed()
            })
        })
        .collect();
    let slow = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .filter(|d| *d > Duration::from_millis(1000))
        .count();
    assert!(
        slow <= 4,
        "{slow} of {n} clients waited for the slow worker (one in three without the bound)"
    );
    b.stop();
}

#[test]
fn a_download_in_progress_completes_after_kill_9_of_the_acceptor() {
    let dir = common::tempdir("baton-faults-big");
    let size: u64 = 100 << 20;
    let f = std::fs::File::create(dir.join("big.bin")).expect("create");
    f.set_len(size).expect("sparse 100 MiB");
    drop(f);
    let root = dir.display().to_string();
    let mut b = Baton::start(
        &["--listen", "127.0.0.1:0", "--workers", "1", "--root", &root],
        1,
    );
    let worker = b.worker_pids()[0];
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    // A small receive buffer keeps most of the body in the worker's hands.
    sock.set_recv_buffer_size(64 * 1024).expect("SO_RCVBUF");
    sock.connect(&b.addr().into()).expect("connect");
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s.write_all(b"GET /big.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut buf = vec![0u8; 1 << 20];
    let mut got = s.read(&mut buf).expect("first bytes");
    assert!(got > 0);
    b.child.kill().expect("kill -9 the acceptor");
    let _ = b.child.wait();
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => panic!("download cut after {got} bytes: {e}"),
        }
    }
    let head_len = 512; // the response head is far shorter than this
    assert!(
        got as u64 > size && (got as u64) < size + head_len,
        "received {got} bytes, expected the head and {size}"
    );
    // Orphaned, the worker exits once it has nothing left.
    wait_dead(worker, Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_stop_at_the_shutdown_timeout_says_how_many_connections_it_cut() {
    let cmd = echo_cmd();
    let mut b = Baton::start(&args("1", &["--shutdown-timeout", "300ms"], &cmd), 1);
    let mut s = connect(b.addr()).expect("connect");
    s.write_all(b"hold\n").expect("write");
    let mut back = [0u8; 5];
    s.read_exact(&mut back).expect("echo");
    b.stop();
    let cut = b
        .seen
        .iter()
        .find(|l| l.message().starts_with("shutdown timeout reached"))
        .expect("the timeout is logged");
    assert_eq!(field_u64(cut, "connections"), 1, "{}", cut.raw);
    let stopped = b
        .seen
        .iter()
        .find(|l| l.message() == "stopped")
        .expect("stopped");
    assert_eq!(field_u64(stopped, "cut_at_shutdown"), 1, "{}", stopped.raw);
}

#[test]
fn refused_registrations_are_summarised_not_logged_one_by_one() {
    if !common::is_root() {
        println!("skipped: needs root to connect as another uid");
        return;
    }
    let dir = common::tempdir("baton-faults-refuse");
    let sock = dir.join("workers.sock");
    let sock_s = sock.display().to_string();
    let cmd = echo_cmd();
    let mut b = Baton::start(
        &args(
            "1",
            &["--worker-socket", &sock_s, "--worker-allow-uid", "4242"],
            &cmd,
        ),
        1,
    );
    let script = format!(
        "import socket\nfor _ in range(50):\n    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n    s.connect({sock_s:?})\n    s.close()\n"
    );
    let st = Command::new("python3")
        .arg("-c")
        .arg(script)
        .uid(65534)
        .gid(65534)
        .status()
        .expect("python3");
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = b.ctl_json(&["status"]);
        if st["refused_workers"] == 50 {
            break;
        }
        assert!(Instant::now() < deadline, "refusals not counted: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
    b.stop();
    let lines = b
        .seen
        .iter()
        .filter(|l| l.message().starts_with("worker socket: refused"))
        .count();
    assert_eq!(lines, 1, "one summary line, not one per refusal");
    let _ = std::fs::remove_dir_all(&dir);
}
