//! Past one host: the health check (`--health-listen`), `ctl drain-host`,
//! and (as root, with `ip netns` and HAProxy) two baton hosts in network
//! namespaces behind HAProxy sending PROXY v2 to `baton-static
//! --accept-proxy`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

/// One request to the health endpoint: (status code, body).
fn health(addr: &str, method: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the health endpoint");
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    write!(s, "{method} /health HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

fn health_addr(b: &mut Baton) -> String {
    b.find(Duration::from_secs(10), |l| {
        l.message() == "health check listening"
    })
    .and_then(|l| l.field("addr"))
    .expect("health address")
}

#[test]
fn health_is_200_then_503_at_once_on_drain_host_and_listeners_close_after_the_grace() {
    let echo = echo_cmd();
    let mut b = Baton::start(
        &echo_args(
            "2",
            &["--health-listen", "127.0.0.1:0", "--drain-grace", "1500ms"],
            &echo,
        ),
        2,
    );
    let h = health_addr(&mut b);
    let (code, body) = health(&h, "GET");
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("ok: accepting"), "{body}");
    let (code, body) = health(&h, "HEAD");
    assert_eq!((code, body.as_str()), (200, ""));
    assert_eq!(b.ctl_json(&["status"])["draining_host"], false);

    let asked = Instant::now();
    let (ok, out, err) = b.ctl(&["drain-host"]);
    assert!(ok, "{err}");
    assert!(out.contains("draining the host"), "{out}");
    let (code, body) = health(&h, "GET");
    assert_eq!(code, 503, "{body}");
    assert!(body.starts_with("draining host"), "{body}");
    let st = b.ctl_json(&["status"]);
    assert_eq!(st["draining_host"], true, "{st}");
    // The listeners keep serving during the grace.
    let (served, errors) = echo_many(b.addr(), 20);
    assert_eq!(served, 20, "{errors:?}");
    b.wait_for(
        "drain-host: grace over; closing the listeners",
        Duration::from_secs(10),
    );
    assert!(
        asked.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        asked.elapsed()
    );
    // Then baton stops as on SIGTERM: exit status 0.
    let st = b.wait_exit(Duration::from_secs(20));
    assert!(st.success(), "{st:?}");
    assert!(
        TcpStream::connect(b.addr()).is_err(),
        "the listener is closed once baton is gone"
    );
}

#[test]
fn health_is_503_while_a_pool_has_no_ready_worker() {
    let echo = echo_cmd();
    let mut b = Baton::start(
        &echo_args("1", &["--health-listen", "127.0.0.1:0"], &echo),
        1,
    );
    let h = health_addr(&mut b);
    assert_eq!(health(&h, "GET").0, 200);
    let (ok, _, err) = b.ctl(&["remove", "--count", "1"]);
    assert!(ok, "{err}");
    let (code, body) = health(&h, "GET");
    assert_eq!(code, 503, "{body}");
    assert_eq!(body, "no ready worker in pool default\n");
    b.wait_for("worker exited", Duration::from_secs(10));
    let (ok, _, err) = b.ctl(&["add", "1"]);
    assert!(ok, "{err}");
    b.wait_for("worker ready", Duration::from_secs(10));
    assert_eq!(health(&h, "GET").0, 200);
    assert_eq!(health(&h, "POST").0, 405);
    b.stop();
}

#[test]
fn sigterm_closes_the_listeners_at_once_and_health_says_shutting_down() {
    // A worker holding a connection keeps baton in its shutdown long
    // enough to ask the health endpoint.
    let echo = echo_cmd();
    let mut b = Baton::start(
        &echo_args("1", &["--health-listen", "127.0.0.1:0"], &echo),
        1,
    );
    let h = health_addr(&mut b);
    let mut held = connect(b.addr()).expect("connect");
    held.write_all(b"hi").expect("send");
    let mut two = [0u8; 2];
    held.read_exact(&mut two).expect("echo");
    b.signal(nix::sys::signal::Signal::SIGTERM);
    b.wait_for(
        "shutting down: no new connections; workers finish what they have",
        Duration::from_secs(10),
    );
    let (code, body) = health(&h, "GET");
    assert_eq!((code, body.as_str()), (503, "shutting down\n"));
    assert!(TcpStream::connect(b.addr()).is_err());
    drop(held);
    let st = b.wait_exit(Duration::from_secs(20));
    assert!(st.success(), "{st:?}");
}
