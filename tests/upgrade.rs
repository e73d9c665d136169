//! Zero-downtime binary upgrade: `baton ctl upgrade` and SIGUSR2 re-execute
//! baton in place under load; the pid, the workers and every connection
//! stay; a binary that fails its check changes nothing.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{bin, connect, echo_once, Baton, Load};
use nix::sys::signal::Signal;

/// Clients that each keep one connection open and echo on it in a loop.
struct KeepAlive {
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<(u64, Vec<String>)>>,
}

impl KeepAlive {
    fn start(addr: SocketAddr, clients: usize) -> KeepAlive {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..clients)
            .map(|c| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let (mut ok, mut failed) = (0u64, Vec::new());
                    let mut s = match connect(addr) {
                        Ok(s) => s,
                        Err(e) => return (0, vec![e.to_string()]),
                    };
                    let deadline = Instant::now() + Duration::from_secs(120);
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let p = common::payload(c * 1_000_000 + i);
                        i += 1;
                        let mut back = vec![0u8; p.len()];
                        match s.write_all(&p).and_then(|_| s.read_exact(&mut back)) {
                            Ok(()) if back == p => ok += 1,
                            Ok(()) => failed.push("wrong echo".to_string()),
                            Err(e) => {
                                failed.push(e.to_string());
                                break;
                            }
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        KeepAlive { stop, handles }
    }

    fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut ok = 0;
        let mut failed = Vec::new();
        for h in self.handles {
            let (o, f) = h.join().expect("client thread");
            ok += o;
            failed.extend(f);
        }
        (ok, failed)
    }
}

fn start() -> Baton {
    let echo = bin("baton-echo").display().to_string();
    Baton::start(
        &["--listen", "127.0.0.1:0", "--workers", "2", "--", &echo],
        2,
    )
}

/// Waits until baton has handed off `n` connections (the load is flowing).
fn wait_handed_off(b: &Baton, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.ctl_json(&["status"])["handed_off"].as_u64() < Some(n) {
        assert!(
            Instant::now() < deadline,
            "the load never reached {n} connections"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn sorted(mut v: Vec<i32>) -> Vec<i32> {
    v.sort_unstable();
    v
}

/// `ctl upgrade` `times` times; each must report success and the new
/// image must log that it took over.
fn upgrade_times(b: &mut Baton, times: usize) {
    for n in 0..times {
        let (ok, out, err) = b.ctl(&["upgrade"]);
        assert!(
            ok && out.contains("upgraded in place") && out.contains("workers kept"),
            "upgrade {n}: {out}{err}"
        );
        b.wait_for(
            "upgraded: this binary took over (same pid; every worker kept)",
            Duration::from_secs(20),
        );
    }
}

#[test]
fn ten_upgrades_under_connection_per_request_load_fail_nothing() {
    let mut b = start();
    let (pid, workers) = (b.pid(), sorted(b.worker_pids()));
    let load = Load::start(b.addr(), 4);
    wait_handed_off(&b, 50);
    upgrade_times(&mut b, 10);
    let (ok, failed) = load.stop();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 100, "only {ok} requests");
    assert_eq!(b.pid(), pid);
    assert_eq!(sorted(b.worker_pids()), workers, "no worker was restarted");
    let status = b.ctl_json(&["status"]);
    assert_eq!(status["lost"], 0, "{status}");
    assert_eq!(status["redispatched"], 0, "{status}");
    assert!(
        status["accepted"].as_u64() >= Some(ok),
        "counters carried over: {status}"
    );
    b.stop();
}

#[test]
fn ten_upgrades_under_keep_alive_load_fail_nothing() {
    let mut b = start();
    let (pid, workers) = (b.pid(), sorted(b.worker_pids()));
    let clients = KeepAlive::start(b.addr(), 8);
    wait_handed_off(&b, 8);
    upgrade_times(&mut b, 10);
    // New connections are accepted by the last image too.
    assert_eq!(echo_once(b.addr(), b"after\n").expect("echo"), b"after\n");
    let (ok, failed) = clients.stop();
    assert!(failed.is_empty(), "{failed:?}");
    assert!(ok > 100, "only {ok} round trips");
    assert_eq!(b.pid(), pid);
    assert_eq!(sorted(b.worker_pids()), workers);
    b.stop();
}

#[test]
fn sigusr2_upgrades_too() {
    let mut b = start();
    let pid = b.pid();
    b.signal(Signal::SIGUSR2);
    b.wait_for(
        "upgraded: this binary took over (same pid; every worker kept)",
        Duration::from_secs(20),
    );
    assert_eq!(b.pid(), pid);
    assert_eq!(echo_once(b.addr(), b"usr2\n").expect("echo"), b"usr2\n");
    b.stop();
}

#[test]
fn a_binary_that_fails_its_check_changes_nothing() {
    let mut b = start();
    let (pid, workers) = (b.pid(), sorted(b.worker_pids()));
    let dir = common::tempdir("baton-upgrade-bad");
    let bad = dir.join("baton-new");
    std::fs::write(
        &bad,
        "#!/bin/sh\necho 'baton upgrade-check: error: state version 1 is too old for me' >&2\nexit 1\n",
    )
    .expect("write");
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let bad_s = bad.display().to_string();
    let (ok, _, err) = b.ctl(&["upgrade", "--binary", &bad_s]);
    assert!(
        !ok && err.contains("upgrade failed, nothing changed")
            && err.contains("refused to take over: state version 1 is too old for me"),
        "{err}"
    );
    let (ok, _, err) = b.ctl(&["upgrade", "--binary", "/nonexistent/baton"]);
    assert!(
        !ok && err.contains("cannot run /nonexistent/baton"),
        "{err}"
    );
    // Still the old image, serving.
    assert_eq!(
        b.count("upgraded: this binary took over (same pid; every worker kept)"),
        0
    );
    assert_eq!(echo_once(b.addr(), b"still\n").expect("echo"), b"still\n");
    assert_eq!(b.pid(), pid);
    assert_eq!(sorted(b.worker_pids()), workers);
    let _ = std::fs::remove_dir_all(&dir);
    b.stop();
}

#[test]
fn a_configuration_without_a_running_pool_is_refused() {
    let dir = common::tempdir("baton-upgrade-cfg");
    let file = dir.join("baton.toml");
    let echo = bin("baton-echo").display().to_string();
    let section = |name: &str| {
        format!("[[pool]]\nname = \"{name}\"\nlisten = [\"127.0.0.1:0\"]\ncommand = [\"{echo}\"]\nworkers = 1\n")
    };
    std::fs::write(&file, format!("{}{}", section("a"), section("b"))).expect("write");
    let file_s = file.display().to_string();
    let mut b = Baton::start_counting(
        std::process::Command::new(bin("baton")),
        &["--config", &file_s],
        2,
        2,
    );
    std::fs::write(&file, section("a")).expect("write");
    let (ok, _, err) = b.ctl(&["upgrade"]);
    assert!(
        !ok && err.contains("no longer has pool(s) [\"b\"]") && err.contains("reload first"),
        "{err}"
    );
    assert_eq!(echo_once(b.addr_of("b"), b"b\n").expect("echo"), b"b\n");
    b.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn parked_keep_alives_survive_an_upgrade() {
    let dir = common::tempdir("baton-upgrade-parked");
    let public = dir.join("public");
    std::fs::create_dir_all(&public).expect("mkdir");
    std::fs::write(public.join("index.html"), "parked\n").expect("write");
    for d in [&dir, &public] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let root = public.display().to_string();
    let mut b = Baton::start(
        &["--listen", "127.0.0.1:0", "--workers", "1", "--root", &root],
        1,
    );
    let get = |s: &mut std::net::TcpStream| {
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .expect("send");
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains("parked\n") {
            let n = s.read(&mut buf).expect("read");
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    };
    let mut clients: Vec<_> = (0..3)
        .map(|_| connect(b.addr()).expect("connect"))
        .collect();
    for c in &mut clients {
        assert!(get(c).starts_with("HTTP/1.1 200"));
    }
    // Idle: the worker hands them back to the acceptor (--park-after 1s).
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.ctl_json(&["status"])["parked"].as_u64() < Some(3) {
        assert!(
            Instant::now() < deadline,
            "the connections were never parked"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    upgrade_times(&mut b, 1);
    assert_eq!(
        b.ctl_json(&["status"])["parked"],
        3,
        "the new image holds them"
    );
    // Their next requests reach a worker through the new image.
    for c in &mut clients {
        assert!(get(c).starts_with("HTTP/1.1 200"));
    }
    b.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
