//! A worker in another language: `workers/python/`, a standard-library
//! Python module written from the protocol table in `proto.rs`, behind the
//! real acceptor.
//!
//! * its unit tests (`python3 -m unittest`) run as part of `cargo test`;
//! * its codec and `baton_sdk::proto` agree byte for byte, both ways;
//! * a Python worker registered at runtime through `--worker-socket` serves
//!   traffic, and its death is seen and fails no client;
//! * a pool of Python workers spawned by baton (channel inherited through
//!   `BATON_CHANNEL_FD`, `--no-sandbox`) echoes every client and drains
//!   cleanly;
//! * spawned under a sandbox profile, which it cannot apply, the Python
//!   worker fails closed and is not restarted.
//!
//! Each test prints "SKIPPED" and passes when no python3 (3.9 or later) is
//! on PATH.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use baton_sdk::proto::{self, ConnInfo, Msg, MAX_IDS, MAX_MSG};
use common::{bin, connect, echo_many, Baton};
use nix::sys::signal::Signal;
use serde_json::{json, Value};

fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("workers/python")
}

fn echo_worker() -> String {
    python_dir().join("echo_worker.py").display().to_string()
}

/// `python3` with the environment every run here uses: no `__pycache__`
/// written into the source tree.
fn python3() -> Command {
    let mut c = Command::new("python3");
    c.env("PYTHONDONTWRITEBYTECODE", "1");
    c
}

/// Whether a usable python3 is on PATH; prints why not, for the test log.
fn have_python(test: &str) -> bool {
    let ok = python3()
        .args(["-c", "import sys; sys.exit(sys.version_info < (3, 9))"])
        .stdin(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED {test}: python3 not found (3.9 or later is needed)");
    }
    ok
}

fn rows(b: &Baton) -> Vec<Value> {
    b.ctl_json(&["workers"])
        .as_array()
        .cloned()
        .expect("workers is a list")
}

#[test]
fn the_python_unit_tests_pass() {
    if !have_python("the_python_unit_tests_pass") {
        return;
    }
    let out = python3()
        .args(["-m", "unittest", "discover", "-s", "workers/python", "-v"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .output()
        .expect("run python3 -m unittest");
    // unittest reports on stderr.
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python unit tests failed:\n{report}");
    assert!(report.contains("\nOK"), "{report}");
}

// ---- the two codecs agree ---------------------------------------------------

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0, "odd hex {s:?}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// A message as JSON; the Python side (below) describes its own the same way.
fn describe(m: &Msg) -> Value {
    match m {
        Msg::Hello { pid, capacity } => json!({"kind": "HELLO", "pid": pid, "capacity": capacity}),
        Msg::Welcome { worker_id } => json!({"kind": "WELCOME", "worker_id": worker_id}),
        Msg::Conn(c) => json!({
            "kind": "CONN",
            "id": c.id,
            "listener": c.listener,
            "peer": c.peer.to_string(),
            "local": c.local.to_string(),
        }),
        Msg::Ack(ids) => json!({"kind": "ACK", "ids": ids}),
        Msg::Done(ids) => json!({"kind": "DONE", "ids": ids}),
        Msg::Drain => json!({"kind": "DRAIN"}),
        Msg::Conns(cs) => json!({
            "kind": "CONNS",
            "conns": cs.iter().map(|c| json!({
                "id": c.id,
                "listener": c.listener,
                "peer": c.peer.to_string(),
                "local": c.local.to_string(),
            })).collect::<Vec<_>>(),
        }),
        Msg::Park(ps) => json!({
            "kind": "PARK",
            "conns": ps.iter().map(|p| json!({
                "id": p.info.id,
                "listener": p.info.listener,
                "peer": p.info.peer.to_string(),
                "local": p.info.local.to_string(),
                "idle_ms": p.idle_ms,
            })).collect::<Vec<_>>(),
        }),
    }
}

/// `vectors`: prints the unit tests' hand-written vectors; otherwise decodes
/// each hex line of stdin with the Python codec and prints it re-encoded.
/// Every output line is `HEX JSON`.
const CODEC_SCRIPT: &str = r#"
import json, sys
import baton_worker as bw

def addr(a):
    if len(a) == 2:
        return f"{a[0]}:{a[1]}"
    return f"[{a[0]}%{a[3]}]:{a[1]}" if a[3] else f"[{a[0]}]:{a[1]}"

def describe(m):
    d = {"kind": m.kind.name}
    if isinstance(m, bw.Hello):
        d.update(pid=m.pid, capacity=m.capacity)
    elif isinstance(m, bw.Welcome):
        d.update(worker_id=m.worker_id)
    elif isinstance(m, bw.ConnInfo):
        d.update(id=m.id, listener=m.listener, peer=addr(m.peer), local=addr(m.local))
    elif isinstance(m, (bw.Ack, bw.Done)):
        d.update(ids=list(m.ids))
    return json.dumps(d)

if sys.argv[1:] == ["vectors"]:
    import test_baton_worker
    for m, wire in test_baton_worker.VECTORS:
        print(wire.hex(), describe(m))
else:
    for line in sys.stdin:
        b = bytes.fromhex(line.strip())
        m = bw.decode(b, bw.Kind(b[1]).fd_count)
        print(bw.encode(m).hex(), describe(m))
"#;

fn run_codec_script(args: &[&str], input: &str) -> Vec<(Vec<u8>, Value)> {
    let mut child = python3()
        .arg("-c")
        .arg(CODEC_SCRIPT)
        .args(args)
        .current_dir(python_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("feed python3");
    let out = child.wait_with_output().expect("python3 output");
    assert!(
        out.status.success(),
        "python3 codec script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(|l| {
            let (h, j) = l.split_once(' ').expect("HEX JSON");
            (unhex(h), serde_json::from_str(j).expect("json"))
        })
        .collect()
}

fn fds_of(wire: &[u8]) -> usize {
    proto::kind_fd_count(wire)
}

#[test]
fn the_python_codec_and_proto_rs_agree_byte_for_byte() {
    if !have_python("the_python_codec_and_proto_rs_agree_byte_for_byte") {
        return;
    }
    // The Python unit tests' vectors, written by hand from the table, are
    // what proto.rs decodes and encodes.
    let vectors = run_codec_script(&["vectors"], "");
    assert!(vectors.len() >= 6, "{vectors:?}");
    let mut kinds = std::collections::BTreeSet::new();
    for (wire, py) in &vectors {
        let m = proto::decode(wire, fds_of(wire))
            .unwrap_or_else(|e| panic!("proto.rs refuses {}: {e}", hex(wire)));
        kinds.insert(m.kind() as u8);
        assert_eq!(&describe(&m), py, "{}", hex(wire));
        let mut buf = [0u8; MAX_MSG];
        let n = proto::encode_v(&m, proto::version_of(wire), &mut buf);
        assert_eq!(hex(&buf[..n]), hex(wire), "{py}");
    }
    assert!(kinds.len() >= 6, "a vector for every kind");

    // What proto.rs encodes, Python decodes to the same message and encodes
    // back to the same bytes.
    let addr = |s: &str| s.parse().expect("addr");
    let msgs = [
        Msg::Hello {
            pid: u32::MAX,
            capacity: 1,
        },
        Msg::Hello {
            pid: 1,
            capacity: 0,
        },
        Msg::Welcome {
            worker_id: u32::MAX,
        },
        Msg::Conn(ConnInfo {
            id: 0,
            listener: u16::MAX,
            peer: addr("0.0.0.0:0"),
            local: addr("255.255.255.255:65535"),
        }),
        Msg::Conn(ConnInfo {
            id: u64::MAX,
            listener: 1,
            peer: addr("[fe80::1:2:3:4%4294967295]:443"),
            local: addr("[::ffff:10.0.0.1]:8443"),
        }),
        Msg::Ack(vec![u64::MAX]),
        Msg::Ack((0..MAX_IDS as u64).map(|i| (i << 40) | i).collect()),
        Msg::Done(vec![42, 7, 42]),
        Msg::Drain,
    ];
    let wires: Vec<Vec<u8>> = msgs
        .iter()
        .map(|m| {
            let mut buf = [0u8; MAX_MSG];
            let n = proto::encode_v(m, 1, &mut buf);
            buf[..n].to_vec()
        })
        .collect();
    let input: String = wires.iter().map(|w| hex(w) + "\n").collect();
    let back = run_codec_script(&[], &input);
    assert_eq!(back.len(), msgs.len());
    for ((m, wire), (py_wire, py)) in msgs.iter().zip(&wires).zip(&back) {
        assert_eq!(&describe(m), py, "{}", hex(wire));
        assert_eq!(hex(py_wire), hex(wire), "{py}");
    }
}

// ---- the Python worker behind the real acceptor -------------------------------

#[test]
fn a_registered_python_worker_serves_and_its_death_fails_no_client() {
    if !have_python("a_registered_python_worker_serves_and_its_death_fails_no_client") {
        return;
    }
    let echo = bin("baton-echo").display().to_string();
    let dir = common::tempdir("baton-py-reg");
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
    let mut py = python3()
        .args([&echo_worker(), "--register", &sock_s])
        .stdin(Stdio::null())
        .spawn()
        .expect("start the Python worker");
    let pid = py.id().to_string();
    let ready = b.wait_for("worker ready", Duration::from_secs(20));
    assert_eq!(ready.field("pid"), Some(pid.clone()), "{}", ready.raw);
    let id = ready.field("worker").expect("worker id");

    let (ok, errors) = echo_many(b.addr(), 100);
    assert_eq!(ok, 100, "{errors:?}");
    // `handled` counts DONEs, which may reach the acceptor just after a
    // client saw its EOF: ask again until it shows (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    let served = loop {
        let r = rows(&b);
        let reg = r
            .iter()
            .find(|w| w["origin"] == "registered")
            .unwrap_or_else(|| panic!("the Python worker is listed: {r:?}"));
        assert_eq!(reg["id"].to_string(), id, "{r:?}");
        assert_eq!(reg["pid"].to_string(), pid, "{r:?}");
        let handled = reg["handled"].as_u64().unwrap_or(0);
        if handled > 0 || Instant::now() > deadline {
            break handled;
        }
    };
    assert!(served > 0, "the Python worker served some of the traffic");

    // It dies: the acceptor sees it go, does not restart it, and every
    // client is still served, by the worker that is left.
    py.kill().expect("kill the Python worker");
    let _ = py.wait();
    let gone = b
        .find(Duration::from_secs(20), |l| {
            l.message() == "worker disconnected" && l.field("worker") == Some(id.clone())
        })
        .expect("its disconnect is logged");
    assert_eq!(gone.field("pid"), Some(pid), "{}", gone.raw);
    let (ok, errors) = echo_many(b.addr(), 50);
    assert_eq!(ok, 50, "{errors:?}");
    let r = rows(&b);
    assert!(
        r.len() == 1 && r[0]["origin"] == "spawned",
        "only the spawned worker is left: {r:?}"
    );

    b.signal(Signal::SIGTERM);
    let st = b.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "{st:?}");
    assert!(!sock.exists(), "worker socket file removed on exit");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn python_workers_spawned_by_baton_echo_every_client_and_drain_cleanly() {
    if !have_python("python_workers_spawned_by_baton_echo_every_client_and_drain_cleanly") {
        return;
    }
    let script = echo_worker();
    let mut cmd = Command::new(bin("baton"));
    cmd.env("PYTHONDONTWRITEBYTECODE", "1");
    let mut b = Baton::start_with(
        cmd,
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            // It cannot confine itself (see the next test); as root,
            // unconfined workers must be asked for explicitly.
            "--no-sandbox",
            "--allow-root-workers",
            "--",
            "python3",
            &script,
        ],
        2,
    );
    let r = rows(&b);
    assert!(
        r.len() == 2
            && r.iter()
                .all(|w| w["origin"] == "spawned" && w["state"] == "ready"),
        "{r:?}"
    );

    let (ok, errors) = echo_many(b.addr(), 100);
    assert_eq!(ok, 100, "{errors:?}");

    // A connection open when baton is told to stop: both workers get DRAIN,
    // the one holding it keeps serving it, and exits 0 once it is closed.
    let mut c = connect(b.addr()).expect("connect");
    let mut buf = [0u8; 4];
    c.write_all(b"one\n").expect("write");
    c.read_exact(&mut buf).expect("echo");
    assert_eq!(&buf, b"one\n");
    b.signal(Signal::SIGTERM);
    // The idle worker takes its DRAIN and exits; the other one cannot yet.
    let first = b.wait_for("worker exited", Duration::from_secs(20));
    assert!(first.raw.contains("exit code 0"), "{}", first.raw);
    assert_eq!(b.count("worker exited"), 1);
    c.write_all(b"two\n").expect("write while draining");
    c.read_exact(&mut buf).expect("echo while draining");
    assert_eq!(&buf, b"two\n");
    drop(c);
    let st = b.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "{st:?}");
    let clean = b
        .seen
        .iter()
        .filter(|l| l.message() == "worker exited" && l.raw.contains("exit code 0"))
        .count();
    assert_eq!(clean, 2, "both Python workers exit 0 after DRAIN");
    assert_eq!(
        b.count("shutdown timeout reached: killing the workers that are still running"),
        0
    );
}

#[test]
fn a_python_worker_spawned_under_a_sandbox_fails_closed_and_is_not_restarted() {
    if !have_python("a_python_worker_spawned_under_a_sandbox_fails_closed_and_is_not_restarted") {
        return;
    }
    let script = echo_worker();
    let mut cmd = Command::new(bin("baton"));
    cmd.env("PYTHONDONTWRITEBYTECODE", "1");
    // The default sandbox: the acceptor passes a profile in BATON_SANDBOX.
    let mut b = Baton::start_with(
        cmd,
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--",
            "python3",
            &script,
        ],
        0,
    );
    let exited = b.wait_for("worker exited", Duration::from_secs(20));
    assert!(exited.raw.contains("exit code 78"), "{}", exited.raw);
    b.wait_for(
        "worker could not apply its sandbox (its error is above); not restarting it: fix the sandbox options",
        Duration::from_secs(20),
    );
    let st = b.wait_exit(Duration::from_secs(30));
    assert!(!st.success(), "no worker left: {st:?}");
    assert_eq!(b.count("worker ready"), 0, "it never joined the pool");
    assert_eq!(b.count("worker restarting"), 0);
}
