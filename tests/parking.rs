//! Protocol v2 end to end: idle keep-alive connections parked in the
//! acceptor, and version 1 workers beside it. A real `baton`, real
//! `baton-static` workers (the demo site, which names the worker process
//! that answered), real HTTP clients on loopback.

mod common;

#[path = "../workers/static/tests/support/client.rs"]
mod client;

use std::time::{Duration, Instant};

use client::Client;
use common::{bin, chaos_cmd, echo_args, echo_many, Baton};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// baton with `workers` demo-site static workers that park after 200 ms.
fn start(workers: &str, extra: &[&str]) -> Baton {
    let worker = bin("baton-static");
    let mut args = vec!["--listen", "127.0.0.1:0", "--workers", workers];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[
        "--",
        worker.to_str().expect("path"),
        "--demo",
        "--park-after",
        "200ms",
        "--access-log",
        "off",
    ]);
    let n = workers.parse().expect("a number");
    Baton::start(&args, n)
}

/// Polls `ctl status` until `field` reaches `want` (the acceptor's own
/// count of what happened), or fails after 20 s.
fn wait_status(b: &Baton, field: &str, want: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = b.ctl_json(&["status"]);
        if st[field].as_u64() == Some(want) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "{field} never reached {want}: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn get_ok(c: &mut Client) -> String {
    let r = c.get("/");
    assert_eq!(r.status, 200);
    r.text()
}

#[test]
fn idle_keep_alives_twice_the_capacity_do_not_lock_out_a_new_client() {
    // Two workers of 20: 80 clients make one request each and stay
    // connected, idle. Parked in the acceptor, they count against no
    // worker, so a new client is served at once.
    let mut b = start("2", &["--worker-connections", "20"]);
    let addr = b.addr();
    let mut idle: Vec<Client> = (0..80)
        .map(|_| {
            let mut c = Client::connect(addr);
            get_ok(&mut c);
            c
        })
        .collect();
    wait_status(&b, "parked", 80);
    let start = Instant::now();
    let mut fresh = Client::connect(addr);
    get_ok(&mut fresh);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "a new client waited {:?}",
        start.elapsed()
    );
    drop(fresh);
    // Every idle client can go on: its next request goes to a worker.
    for c in idle.iter_mut() {
        get_ok(c);
    }
    let st = b.ctl_json(&["status"]);
    assert!(st["unparked"].as_u64() >= Some(80), "{st}");
    // A parked connection whose client leaves is reaped.
    wait_status(&b, "parked", 80);
    let before = b.ctl_json(&["status"])["parked_closed"]
        .as_u64()
        .expect("parked_closed");
    idle.truncate(70);
    wait_status(&b, "parked", 70);
    wait_status(&b, "parked_closed", before + 10);
    let rows = b.ctl_json(&["workers"]);
    let parked_by_workers: u64 = rows
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(|r| r["parked"].as_u64())
        .sum();
    assert!(parked_by_workers >= 160, "{rows}");
    drop(idle);
    b.stop();
}

#[test]
fn a_parked_connection_outlives_the_worker_that_served_it() {
    let mut b = start("1", &[]);
    let first = b.worker_pids()[0];
    let mut c = Client::connect(b.addr());
    let page = get_ok(&mut c);
    assert!(page.contains(&first.to_string()), "served by {first}");
    wait_status(&b, "parked", 1);
    kill(Pid::from_raw(first), Signal::SIGKILL).expect("kill -9");
    let ready = b
        .wait_until(Duration::from_secs(20), |l| {
            l.message() == "worker ready" && l.field("pid") != Some(first.to_string())
        })
        .expect("a replacement");
    let second = ready.field("pid").expect("pid");
    // Same connection, next request: the new worker answers it.
    let page = get_ok(&mut c);
    assert!(
        page.contains(&second) && !page.contains(&first.to_string()),
        "the next request went to the replacement {second}"
    );
    let gone = b
        .find(Duration::from_secs(5), |l| {
            l.message() == "worker disconnected" && l.field("pid") == Some(first.to_string())
        })
        .expect("the killed worker left");
    assert!(
        gone.field("lost").is_none_or(|l| l == "0"),
        "a parked connection is not the worker's to lose: {}",
        gone.raw
    );
    b.stop();
}

#[test]
fn a_worker_that_parks_anything_but_its_connection_is_disconnected() {
    // A parked fd goes to another worker later: a worker must not be able
    // to pass anything else along that way (a file, a pipe to talk to its
    // neighbours).
    let cmd = chaos_cmd("park-bogus", &["--bad-workers", "1"]);
    let extra = ["--no-sandbox", "--allow-root-workers"];
    let mut b = Baton::start(&echo_args("2", &extra, &cmd), 2);
    // Its first connection goes to worker 1, which acknowledges it and
    // never serves it: that one is lost with the worker.
    let _ = common::echo_once(b.addr(), b"first\n");
    let gone = b
        .find(Duration::from_secs(10), |l| {
            l.message() == "worker disconnected" && l.field("worker").as_deref() == Some("1")
        })
        .expect("worker 1 is disconnected");
    let reason = gone.field("reason").unwrap_or_default();
    assert!(
        reason.contains("PARK of connection") && reason.contains("not a socket"),
        "{}",
        gone.raw
    );
    let (ok, errors) = echo_many(b.addr(), 20);
    assert_eq!(ok, 20, "{errors:?}");
    b.stop();
}

#[test]
fn a_version_1_worker_still_serves() {
    let cmd = chaos_cmd("v1-echo", &[]);
    let mut b = Baton::start(&echo_args("2", &[], &cmd), 0);
    for _ in 0..2 {
        let l = b.wait_for("worker ready", Duration::from_secs(20));
        assert_eq!(l.field("protocol").as_deref(), Some("1"), "{}", l.raw);
    }
    let (ok, errors) = echo_many(b.addr(), 40);
    assert_eq!(ok, 40, "{errors:?}");
    let st = b.ctl_json(&["status"]);
    assert_eq!(
        st["sends"], st["handed_off"],
        "one CONN per message for version 1: {st}"
    );
    b.stop();
}

#[test]
fn version_2_workers_negotiate_version_2() {
    let mut b = Baton::start(
        &echo_args("1", &[], &[bin("baton-echo").display().to_string()]),
        0,
    );
    let l = b.wait_for("worker ready", Duration::from_secs(20));
    assert_eq!(l.field("protocol").as_deref(), Some("2"), "{}", l.raw);
    b.stop();
}
