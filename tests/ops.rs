//! Runtime operations, end to end: `baton ctl` against a real acceptor
//! under load, workers added, drained, restarted, and workers that register
//! themselves through the worker socket.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{bin, connect, echo_many, is_root, Baton, Load, IO_TIMEOUT};
use nix::sys::signal::Signal;

fn echo() -> String {
    bin("baton-echo").display().to_string()
}

fn rows(b: &Baton) -> Vec<serde_json::Value> {
    b.ctl_json(&["workers"])
        .as_array()
        .cloned()
        .expect("workers is a list")
}

fn wait_exited(b: &mut Baton, id: u64) -> common::LogLine {
    b.find(Duration::from_secs(20), |l| {
        l.message() == "worker exited" && l.field("worker") == Some(id.to_string())
    })
    .unwrap_or_else(|| panic!("worker {id} exits"))
}

#[test]
fn add_remove_and_restart_under_load_fail_no_request() {
    let echo = echo();
    let mut b = Baton::start(
        &["--listen", "127.0.0.1:0", "--workers", "2", "--", &echo],
        2,
    );
    let load = Load::start(b.addr(), 4);

    let added = b.ctl_json(&["add", "2"]);
    assert_eq!(added["added"].as_array().map(Vec::len), Some(2), "{added}");
    for _ in 0..2 {
        b.wait_for("worker ready", Duration::from_secs(20));
    }
    let r = rows(&b);
    assert_eq!(r.len(), 4, "{r:?}");
    assert!(r
        .iter()
        .all(|w| w["state"] == "ready" && w["origin"] == "spawned"));

    let removed = b.ctl_json(&["remove", "--count", "1", "--drain-timeout", "20s"]);
    let id = removed["draining"][0].as_u64().expect("an id");
    let exited = wait_exited(&mut b, id);
    assert!(
        exited.raw.contains("exit code 0"),
        "drained cleanly: {}",
        exited.raw
    );
    assert_eq!(rows(&b).len(), 3);

    let old: Vec<u64> = rows(&b).iter().filter_map(|w| w["id"].as_u64()).collect();
    let restart = b.ctl_json(&["restart"]);
    assert_eq!(restart["replacing"], 3, "{restart}");
    b.wait_for(
        "rolling restart finished: every worker replaced",
        Duration::from_secs(60),
    );
    for id in &old {
        wait_exited(&mut b, *id);
    }
    let r = rows(&b);
    assert_eq!(r.len(), 3, "{r:?}");
    assert!(
        r.iter()
            .all(|w| !old.contains(&w["id"].as_u64().unwrap_or(0)) && w["state"] == "ready"),
        "every worker replaced: {r:?}"
    );

    let (ok, failed) = load.stop();
    assert!(
        failed.is_empty(),
        "{} failed requests: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 0);
    b.stop();
}

#[test]
fn a_draining_worker_finishes_its_connections_and_one_that_does_not_is_stopped_at_the_timeout() {
    let echo = echo();
    let mut b = Baton::start(
        &["--listen", "127.0.0.1:0", "--workers", "1", "--", &echo],
        1,
    );
    let mut c = connect(b.addr()).expect("connect");
    c.write_all(b"one\n").expect("write");
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).expect("echo");
    let id = rows(&b)[0]["id"].as_u64().expect("id");

    let removed = b.ctl_json(&["remove", &id.to_string(), "--drain-timeout", "30s"]);
    assert_eq!(removed["draining"][0].as_u64(), Some(id));
    let r = rows(&b);
    assert_eq!(r[0]["state"], "draining");
    assert_eq!(r[0]["in_flight"], 1);
    // The connection it holds is still served while it drains...
    c.write_all(b"two\n").expect("write while draining");
    c.read_exact(&mut buf).expect("echo while draining");
    assert_eq!(&buf, b"two\n");
    // ...and the worker stops, cleanly, once it is closed.
    drop(c);
    let exited = wait_exited(&mut b, id);
    assert!(exited.raw.contains("exit code 0"), "{}", exited.raw);

    // A worker whose connection never finishes is stopped at the timeout.
    let added = b.ctl_json(&["add", "1"]);
    let id = added["added"][0].as_u64().expect("id");
    b.wait_for("worker ready", Duration::from_secs(20));
    let mut c = connect(b.addr()).expect("connect");
    c.write_all(b"one\n").expect("write");
    c.read_exact(&mut buf).expect("echo");
    b.ctl_json(&["remove", &id.to_string(), "--drain-timeout", "300ms"]);
    let gone = b
        .find(Duration::from_secs(20), |l| {
            l.message() == "worker disconnected" && l.field("worker") == Some(id.to_string())
        })
        .expect("stopped");
    assert!(
        gone.field("reason")
            .unwrap_or_default()
            .contains("drain timeout"),
        "{}",
        gone.raw
    );
    assert_eq!(gone.field("lost").as_deref(), Some("1"), "{}", gone.raw);
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the held connection is closed");
    b.stop();
}

#[test]
fn sigttin_adds_and_sigttou_removes_a_worker() {
    let echo = echo();
    let mut b = Baton::start(
        &["--listen", "127.0.0.1:0", "--workers", "1", "--", &echo],
        1,
    );
    b.signal(Signal::SIGTTIN);
    b.wait_for("worker ready", Duration::from_secs(20));
    assert_eq!(rows(&b).len(), 2);
    b.signal(Signal::SIGTTOU);
    b.wait_for("worker exited", Duration::from_secs(20));
    assert_eq!(rows(&b).len(), 1);
    let (ok, errors) = echo_many(b.addr(), 20);
    assert_eq!(ok, 20, "{errors:?}");
    b.stop();
}

#[test]
fn the_control_socket_survives_garbage_oversized_lines_and_silent_clients() {
    let echo = echo();
    let mut b = Baton::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--control-idle-timeout",
            "500ms",
            "--",
            &echo,
        ],
        1,
    );
    let mode = std::fs::metadata(&b.control)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "control socket is private");

    let talk = |s: &mut BufReader<UnixStream>, line: &[u8]| -> serde_json::Value {
        s.get_mut().write_all(line).expect("write");
        let mut reply = String::new();
        s.read_line(&mut reply).expect("reply");
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{e}: {reply:?}"))
    };
    let open = || {
        let s = UnixStream::connect(&b.control).expect("connect");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        BufReader::new(s)
    };

    // A silent client, connected first, must not hold up the others.
    let mut silent = UnixStream::connect(&b.control).expect("connect");
    silent.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");

    let mut s = open();
    let r = talk(&mut s, b"garbage\n");
    assert_eq!(r["ok"], false);
    assert!(
        r["error"]
            .as_str()
            .unwrap_or_default()
            .contains("bad request"),
        "{r}"
    );
    let r = talk(&mut s, b"{\"cmd\":\"frobnicate\"}\n");
    assert_eq!(r["ok"], false, "{r}");
    let r = talk(&mut s, b"{\"cmd\":\"workers\",\"extra\":true}\n");
    assert_eq!(r["ok"], false, "{r}");
    let r = talk(&mut s, b"{\"cmd\":\"status\"}\n");
    assert_eq!(r["ok"], true, "the same connection still works: {r}");
    assert_eq!(r["result"]["workers"]["ready"], 1);

    let mut s = open();
    let big = vec![b'a'; 70 * 1024];
    let r = talk(&mut s, &big);
    assert_eq!(r["ok"], false);
    assert!(
        r["error"]
            .as_str()
            .unwrap_or_default()
            .contains("longer than"),
        "{r}"
    );
    // Closed after an oversized line (a reset, when the rest of the line
    // was still unread, is a close too).
    let mut rest = String::new();
    match s.read_line(&mut rest) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the connection closed, got {other:?} {rest:?}"),
    }

    // The silent client is cut off at the idle timeout.
    let mut buf = [0u8; 1];
    assert_eq!(silent.read(&mut buf).expect("eof"), 0);

    // And the acceptor still serves clients and ctl.
    let (ok, errors) = echo_many(b.addr(), 10);
    assert_eq!(ok, 10, "{errors:?}");
    let (ok, out, _) = b.ctl(&["status"]);
    assert!(ok && out.contains("handed_off"), "{out}");
    b.stop();
}

#[test]
fn registered_workers_serve_and_their_disconnect_loses_no_unacknowledged_connection() {
    let echo = echo();
    let dir = common::tempdir("baton-reg");
    let sock = dir.join("workers.sock");
    let sock_s = sock.display().to_string();
    let mut b = Baton::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--worker-socket",
            &sock_s,
            "--",
            &echo,
        ],
        1,
    );
    let mut ext = Command::new(bin("baton-echo"))
        .args(["--register", &sock_s])
        .stdin(Stdio::null())
        .spawn()
        .expect("start a worker by hand");
    let ready = b.wait_for("worker ready", Duration::from_secs(20));
    assert_eq!(ready.field("pid"), Some(ext.id().to_string()));
    let (ok, errors) = echo_many(b.addr(), 100);
    assert_eq!(ok, 100, "{errors:?}");
    let r = rows(&b);
    let reg = r
        .iter()
        .find(|w| w["origin"] == "registered")
        .expect("registered worker listed");
    assert!(
        reg["handled"].as_u64().unwrap_or(0) > 0,
        "it got traffic: {r:?}"
    );

    // A registered worker that takes connections and vanishes before ACK.
    let mut chaos = Command::new(bin("baton-chaos"))
        .args([
            "--mode",
            "die-before-ack",
            "--count",
            "3",
            "--register",
            &sock_s,
        ])
        .stdin(Stdio::null())
        .spawn()
        .expect("start chaos");
    let ready = b.wait_for("worker ready", Duration::from_secs(20));
    let chaos_id = ready.field("worker").expect("id");
    let (ok, errors) = echo_many(b.addr(), 60);
    assert_eq!(ok, 60, "every client answered: {errors:?}");
    let gone = b
        .find(Duration::from_secs(20), |l| {
            l.message() == "worker disconnected" && l.field("worker") == Some(chaos_id.clone())
        })
        .expect("chaos disconnected");
    assert_eq!(gone.field("lost").as_deref(), Some("0"), "{}", gone.raw);
    let _ = chaos.wait();

    // The hand-started worker leaves: it is not restarted.
    ext.kill().expect("kill");
    let _ = ext.wait();
    b.find(Duration::from_secs(20), |l| {
        l.message() == "worker disconnected" && l.field("pid") == Some(ext.id().to_string())
    })
    .expect("its disconnect is seen");
    let r = rows(&b);
    assert!(r.iter().all(|w| w["origin"] == "spawned"), "{r:?}");
    b.stop();
    assert!(!sock.exists(), "worker socket file removed on exit");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unauthorised_uids_are_refused_on_both_sockets() {
    if !is_root() {
        eprintln!("SKIPPED unauthorised_uids_are_refused_on_both_sockets: needs root to run clients as another uid (setpriv)");
        return;
    }
    let echo = echo();
    let dir = common::tempdir("baton-uid");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let sock = dir.join("workers.sock").display().to_string();
    let control = dir.join("control.sock").display().to_string();
    let mut b = Baton::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--control",
            &control,
            "--control-allow-uid",
            "4242",
            "--worker-socket",
            &sock,
            "--worker-allow-uid",
            "4242",
            "--",
            &echo,
        ],
        1,
    );
    let as_nobody = |prog: &str, args: &[&str]| {
        Command::new("setpriv")
            .args([
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                prog,
            ])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("setpriv")
    };
    let out = as_nobody(
        &bin("baton").display().to_string(),
        &["ctl", "--control", &control, "status"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");
    let refused = b
        .find(Duration::from_secs(10), |l| {
            l.message().starts_with("control socket: refused")
        })
        .expect("refusal logged");
    assert_eq!(refused.field("uid").as_deref(), Some("65534"));

    let out = as_nobody(&echo, &["--register", &sock]);
    assert!(!out.status.success(), "the worker is turned away");
    let refused = b
        .find(Duration::from_secs(10), |l| {
            l.message().starts_with("worker socket: refused")
        })
        .expect("refusal logged");
    assert_eq!(refused.field("uid").as_deref(), Some("65534"));
    assert_eq!(rows(&b).len(), 1, "no worker joined");
    b.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_validates_a_config_file_and_points_at_mistakes() {
    let dir = common::tempdir("baton-check");
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        format!(
            "listen = [\"127.0.0.1:0\"]\n[pool]\ncommand = [\"{}\"]\nworkers = 3\n",
            echo()
        ),
    )
    .expect("write");
    let out = Command::new(bin("baton"))
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 workers"));

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "listen = [\"127.0.0.1:0\"]\n\n[pool]\nwrokers = 3\n").expect("write");
    let out = Command::new(bin("baton"))
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml: line 4, column 1") && err.contains("wrokers"),
        "{err}"
    );

    let missing_cmd = dir.join("cmd.toml");
    std::fs::write(
        &missing_cmd,
        "[pool]\ncommand = [\"/nonexistent/worker\"]\n",
    )
    .expect("write");
    let out = Command::new(bin("baton"))
        .args(["check", "--config"])
        .arg(&missing_cmd)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/worker not found"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reload_applies_the_difference_under_load_without_failures() {
    let dir = common::tempdir("baton-reload");
    let file = dir.join("baton.toml");
    let write = |workers: usize, balance: &str| {
        std::fs::write(
            &file,
            format!(
                "listen = [\"127.0.0.1:0\"]\n[pool]\ncommand = [\"{}\"]\nworkers = {workers}\nbalance = \"{balance}\"\ndrain-timeout = \"20s\"\n",
                echo()
            ),
        )
        .expect("write config");
    };
    write(1, "least-conn");
    let file_s = file.display().to_string();
    let mut b = Baton::start(&["--config", &file_s], 1);
    let load = Load::start(b.addr(), 3);

    write(3, "round-robin");
    let r = b.ctl_json(&["reload"]);
    let changes = r["changes"].to_string();
    assert!(
        changes.contains("balance: round-robin") && changes.contains("workers: added"),
        "{changes}"
    );
    for _ in 0..2 {
        b.wait_for("worker ready", Duration::from_secs(20));
    }
    assert_eq!(rows(&b).len(), 3);

    // SIGHUP does the same; a mistake changes nothing.
    std::fs::write(&file, "[pool]\nworkers = \"many\"\n").expect("write");
    let (ok, _, err) = b.ctl(&["reload"]);
    assert!(
        !ok && err.contains("reload failed, nothing changed"),
        "{err}"
    );
    assert_eq!(rows(&b).len(), 3);
    write(2, "round-robin");
    b.signal(Signal::SIGHUP);
    b.wait_for("worker exited", Duration::from_secs(20));
    assert_eq!(rows(&b).len(), 2);

    let (ok, failed) = load.stop();
    assert!(failed.is_empty(), "{:?}", &failed[..failed.len().min(5)]);
    assert!(ok > 0);
    b.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn autoscaling_adds_workers_when_full_and_retires_them_when_idle() {
    let echo = echo();
    let mut b = Baton::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--min-workers",
            "1",
            "--max-workers",
            "2",
            "--worker-connections",
            "2",
            "--scale-idle-timeout",
            "300ms",
            "--",
            &echo,
        ],
        1,
    );
    let mut held = Vec::new();
    for i in 0..3 {
        let mut s = connect(b.addr()).expect("connect");
        s.write_all(format!("{i}\n").as_bytes()).expect("write");
        if i < 2 {
            let mut one = [0u8; 2];
            s.read_exact(&mut one).expect("echo");
        }
        held.push(s);
    }
    // The third client is waiting: a second worker comes up and serves it.
    b.wait_for(
        "autoscale: every worker is full; adding one",
        Duration::from_secs(20),
    );
    b.wait_for("worker ready", Duration::from_secs(20));
    let mut one = [0u8; 2];
    held[2]
        .read_exact(&mut one)
        .expect("served by the new worker");
    assert_eq!(&one, b"2\n");
    assert_eq!(rows(&b).len(), 2);
    // Idle again: back to the minimum.
    drop(held);
    b.wait_for(
        "autoscale: retiring an idle worker",
        Duration::from_secs(20),
    );
    b.wait_for("worker exited", Duration::from_secs(20));
    assert_eq!(rows(&b).len(), 1);
    b.stop();
}

#[test]
fn metrics_are_served_over_http_in_the_prometheus_format() {
    let echo = echo();
    let mut b = Baton::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--metrics-listen",
            "127.0.0.1:0",
            "--",
            &echo,
        ],
        2,
    );
    let addr = b
        .find(Duration::from_secs(10), |l| {
            l.message() == "metrics listening"
        })
        .and_then(|l| l.field("addr"))
        .expect("metrics address");
    let (ok, errors) = echo_many(b.addr(), 30);
    assert_eq!(ok, 30, "{errors:?}");
    let get = |method: &str| {
        let out = Command::new("curl")
            .args(["-s", "-i", "-X", method, &format!("http://{addr}/metrics")])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // DONE may reach the acceptor just after a client saw its EOF: scrape
    // until every connection is counted as handled (bounded).
    let handled_in = |page: &str| -> u64 {
        page.lines()
            .filter(|l| l.starts_with("baton_worker_handled_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut page = get("GET");
    while handled_in(&page) < 30 && std::time::Instant::now() < deadline {
        page = get("GET");
    }
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.contains("# TYPE baton_connections_accepted_total counter"),
        "{page}"
    );
    assert!(
        page.contains("baton_connections_accepted_total{pool=\"default\"} 30"),
        "{page}"
    );
    assert!(
        page.contains("baton_worker_handled_total{pool=\"default\",worker=\"1\"}"),
        "{page}"
    );
    assert_eq!(handled_in(&page), 30, "{page}");
    // The same text as `baton ctl metrics`.
    let (ok, text, _) = b.ctl(&["metrics"]);
    assert!(
        ok && text.contains("baton_connections_accepted_total{pool=\"default\"} 30"),
        "{text}"
    );
    assert!(get("POST").starts_with("HTTP/1.1 405"));
    b.stop();
}

#[test]
fn a_worker_starts_with_no_signal_blocked_and_drains_on_its_own_sigterm() {
    // The acceptor blocks the signals it reads from its signalfd; a mask
    // survives exec, so a worker must be given an empty one.
    let mut b = Baton::start(&["--listen", "127.0.0.1:0", "--workers", "1"], 1);
    let pid = b.worker_pids()[0];
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let blocked = status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .map(str::trim)
        .expect("SigBlk");
    assert_eq!(
        blocked, "0000000000000000",
        "worker {pid} starts with signals blocked"
    );
    // The static worker drains on SIGTERM (its own handler) and exits 0.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM).expect("kill");
    let exited = b
        .find(Duration::from_secs(10), |l| {
            l.message() == "worker exited" && l.field("pid") == Some(pid.to_string())
        })
        .expect("the worker exits");
    assert!(exited.raw.contains("exit code 0"), "{}", exited.raw);
    assert!(b.seen.iter().any(|l| l.message() == "draining"));
    b.stop();
}
