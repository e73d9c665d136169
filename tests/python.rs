//! A worker in another language: `workers/python/`, a standard-library
//! Python module written from the protocol table in `proto.rs`, behind the
//! real acceptor.
//!
//! * its unit tests (`python3 -m unittest`) run as part of `cargo test`;
//! * its codec and `baton_sdk::proto` agree byte for byte, both ways, in
//!   versions 1 and 2 (CONNS and PARK included, with their fd counts), and
//!   refuse the same malformed batch messages;
//! * a Python worker registered at runtime through `--worker-socket`
//!   negotiates version 2, serves traffic, and its death is seen and fails
//!   no client;
//! * a pool of Python workers spawned by baton (channel inherited through
//!   `BATON_CHANNEL_FD`, `--no-sandbox`) joins in version 2 (or 1 when
//!   forced with `--protocol 1`), echoes every client, takes connections
//!   accepted together in one CONNS per worker (version 1: one CONN each),
//!   and drains cleanly;
//! * a Python worker that parks each connection after its reply
//!   (`Worker.park`) gets it back, same id, on the client's next request,
//!   and the acceptor closes it when the client leaves;
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

use baton_sdk::proto::{self, ConnInfo, Msg, Parked, MAX_BATCH, MAX_IDS, MAX_MSG};
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
        // The Python worker never sets a flag (it does not terminate TLS).
        Msg::Hello { pid, capacity, .. } => {
            json!({"kind": "HELLO", "pid": pid, "capacity": capacity})
        }
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

/// `vectors`: prints the unit tests' hand-written vectors; `refuse`: says
/// of each `HEX FDS` line of stdin whether the Python codec refuses it;
/// otherwise decodes each `HEX FDS` line of stdin (FDS: how many fds
/// proto.rs says the message carries) with the Python codec and prints it
/// re-encoded in its own version. Every output line is `HEX FDS JSON`, FDS
/// being the fd count the Python codec gives the message.
const CODEC_SCRIPT: &str = r#"
import json, sys
import baton_worker as bw

def addr(a):
    if len(a) == 2:
        return f"{a[0]}:{a[1]}"
    return f"[{a[0]}%{a[3]}]:{a[1]}" if a[3] else f"[{a[0]}]:{a[1]}"

def record(c):
    return dict(id=c.id, listener=c.listener, peer=addr(c.peer), local=addr(c.local))

def describe(m):
    d = {"kind": m.kind.name}
    if isinstance(m, bw.Hello):
        d.update(pid=m.pid, capacity=m.capacity)
    elif isinstance(m, bw.Welcome):
        d.update(worker_id=m.worker_id)
    elif isinstance(m, bw.ConnInfo):
        d.update(record(m))
    elif isinstance(m, (bw.Ack, bw.Done)):
        d.update(ids=list(m.ids))
    elif isinstance(m, bw.Conns):
        d.update(conns=[record(c) for c in m.conns])
    elif isinstance(m, bw.Park):
        d.update(conns=[dict(record(p.info), idle_ms=p.idle_ms) for p in m.conns])
    return json.dumps(d)

if sys.argv[1:] == ["vectors"]:
    import test_baton_worker
    for m, wire in test_baton_worker.VECTORS:
        print(wire.hex(), bw.fd_count(m), describe(m))
elif sys.argv[1:] == ["refuse"]:
    for line in sys.stdin:
        text, fds = line.split()
        try:
            bw.decode(bytes.fromhex(text), int(fds))
            print(text, fds, json.dumps("accepted"))
        except bw.ProtocolError as e:
            print(text, fds, json.dumps(f"refused: {e}"))
else:
    for line in sys.stdin:
        text, fds = line.split()
        b, fds = bytes.fromhex(text), int(fds)
        # The fd count read from the bytes is the one proto.rs gives, and
        # no other count is accepted: one fd per record, exactly.
        assert bw.kind_fd_count(b) == fds, (text, bw.kind_fd_count(b), fds)
        for wrong in {fds - 1, fds + 1} - {-1}:
            try:
                bw.decode(b, wrong)
            except bw.ProtocolError:
                pass
            else:
                raise AssertionError(f"{text} decoded with {wrong} fds")
        m = bw.decode(b, fds, version=b[0])
        print(bw.encode(m, version=b[0]).hex(), bw.fd_count(m), describe(m))
"#;

/// One `(bytes, fds, JSON)` per output line of the codec script.
fn run_codec_script(args: &[&str], input: &str) -> Vec<(Vec<u8>, usize, Value)> {
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
            let mut parts = l.splitn(3, ' ');
            let (h, f, j) = (
                parts.next().expect("HEX"),
                parts.next().expect("FDS"),
                parts.next().expect("JSON"),
            );
            (
                unhex(h),
                f.parse().expect("fd count"),
                serde_json::from_str(j).expect("json"),
            )
        })
        .collect()
}

fn encode_v(m: &Msg, version: u8) -> Vec<u8> {
    let mut buf = [0u8; MAX_MSG];
    let n = proto::encode_v(m, version, &mut buf);
    buf[..n].to_vec()
}

#[test]
fn the_python_codec_and_proto_rs_agree_byte_for_byte() {
    if !have_python("the_python_codec_and_proto_rs_agree_byte_for_byte") {
        return;
    }
    // The Python unit tests' vectors, written by hand from the table, are
    // what proto.rs decodes and encodes, with the fds both say they carry.
    let vectors = run_codec_script(&["vectors"], "");
    let mut kinds = std::collections::BTreeSet::new();
    for (wire, fds, py) in &vectors {
        assert_eq!(*fds, proto::kind_fd_count(wire), "{py}");
        let m = proto::decode(wire, *fds)
            .unwrap_or_else(|e| panic!("proto.rs refuses {}: {e}", hex(wire)));
        assert_eq!(m.fd_count(), *fds, "{py}");
        kinds.insert((proto::version_of(wire), m.kind() as u8));
        assert_eq!(&describe(&m), py, "{}", hex(wire));
        assert_eq!(
            hex(&encode_v(&m, proto::version_of(wire))),
            hex(wire),
            "{py}"
        );
    }
    let want: std::collections::BTreeSet<(u8, u8)> = (1..=2u8)
        .flat_map(|v| (1..=if v == 1 { 6 } else { 8 }).map(move |k| (v, k)))
        .collect();
    assert_eq!(
        kinds, want,
        "a vector for every kind in every version it exists in"
    );

    // What proto.rs encodes, Python decodes to the same message (with the
    // fd count proto.rs gives it, and no other) and encodes back to the
    // same bytes, in the same version.
    let addr = |s: &str| s.parse().expect("addr");
    let info = |id: u64, peer: &str, local: &str| ConnInfo {
        id,
        listener: (id % 3) as u16,
        peer: addr(peer),
        local: addr(local),
    };
    let one_of_each = [
        Msg::Hello {
            pid: u32::MAX,
            capacity: 1,
            flags: proto::HelloFlags::NONE,
        },
        Msg::Hello {
            pid: 1,
            capacity: 0,
            flags: proto::HelloFlags::NONE,
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
    let batches = [
        Msg::Conns(vec![info(1, "127.0.0.1:40000", "127.0.0.1:8080")]),
        Msg::Conns(vec![
            info(u64::MAX, "[2001:db8::1]:1", "[fe80::2%7]:443"),
            info(0, "10.0.0.1:65535", "0.0.0.0:0"),
            info(1 << 63, "[::]:0", "192.168.1.1:80"),
        ]),
        Msg::Conns(
            (0..MAX_BATCH as u64)
                .map(|i| info(i * 1_000_003, "127.0.0.1:1234", "[::1]:80"))
                .collect(),
        ),
        Msg::Park(vec![Parked {
            info: info(9, "[::1%1]:5", "127.0.0.1:6"),
            idle_ms: u32::MAX,
        }]),
        Msg::Park(
            (0..MAX_BATCH as u64)
                .map(|i| Parked {
                    info: info(i, "10.9.8.7:4321", "[2001:db8::53]:53"),
                    idle_ms: (i as u32) * 1000,
                })
                .collect(),
        ),
    ];
    let mut msgs: Vec<(Msg, u8)> = one_of_each.iter().map(|m| (m.clone(), 1)).collect();
    msgs.extend(one_of_each.iter().map(|m| (m.clone(), 2)));
    msgs.extend(batches.iter().map(|m| (m.clone(), 2)));
    let wires: Vec<Vec<u8>> = msgs.iter().map(|(m, v)| encode_v(m, *v)).collect();
    assert_eq!(wires.last().map(Vec::len), Some(MAX_MSG), "a full PARK");
    let input: String = msgs
        .iter()
        .zip(&wires)
        .map(|((m, _), w)| format!("{} {}\n", hex(w), m.fd_count()))
        .collect();
    let back = run_codec_script(&[], &input);
    assert_eq!(back.len(), msgs.len());
    for (((m, _), wire), (py_wire, py_fds, py)) in msgs.iter().zip(&wires).zip(&back) {
        assert_eq!(&describe(m), py, "{}", hex(wire));
        assert_eq!(*py_fds, m.fd_count(), "{py}");
        assert_eq!(hex(py_wire), hex(wire), "{py}");
    }

    // What proto.rs refuses, Python refuses too: the batch kinds broken in
    // each way the table forbids.
    let three = encode_v(&batches[1], 2);
    let park = encode_v(&batches[3], 2);
    let set = |w: &[u8], at: usize, v: u8| {
        let mut w = w.to_vec();
        w[at] = v;
        w
    };
    let bad: Vec<(Vec<u8>, usize)> = vec![
        (set(&three, 0, 1), 3),                 // CONNS in a version 1 header
        (set(&park, 0, 1), 1),                  // PARK in a version 1 header
        (set(&three, 0, 3), 3),                 // unknown version
        (three.clone(), 2),                     // one fd short
        (three.clone(), 4),                     // one fd too many
        (park.clone(), 0),                      // PARK without its fd
        (set(&three, 4, 0), 0),                 // count 0
        (set(&three, 4, 2), 2),                 // count below the records there
        (set(&three, 4, 4), 4),                 // count above them
        (set(&three, 4, 65), 65),               // count over 64
        (set(&three, 6, 1), 3),                 // reserved u16 @6
        (set(&three, 8 + 60 + 10, 1), 3),       // reserved u16 of the 2nd record
        (set(&park, 8 + 11, 1), 1),             // reserved u16 of a PARK record
        (set(&three, 8 + 120 + 36, 5), 3),      // bad family in the 3rd record
        (set(&three, 8 + 12 + 1, 1), 3),        // reserved byte of an address
        (three[..three.len() - 1].to_vec(), 3), // truncated
        ([park.as_slice(), &[0]].concat(), 1),  // a byte too many
        (three[..6].to_vec(), 3),               // shorter than its count
    ];
    let input: String = bad
        .iter()
        .map(|(w, f)| format!("{} {f}\n", hex(w)))
        .collect();
    let verdicts = run_codec_script(&["refuse"], &input);
    assert_eq!(verdicts.len(), bad.len());
    for ((wire, fds), (_, _, py)) in bad.iter().zip(&verdicts) {
        let rust = proto::decode(wire, *fds);
        assert!(
            rust.is_err(),
            "proto.rs accepts {} with {fds} fds",
            hex(wire)
        );
        let py = py.as_str().expect("verdict");
        assert!(
            py.starts_with("refused: "),
            "Python {py} {} with {fds} fds (proto.rs: {:?})",
            hex(wire),
            rust
        );
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
    assert_eq!(
        ready.field("protocol").as_deref(),
        Some("2"),
        "the Python worker negotiates version 2: {}",
        ready.raw
    );
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

/// A pool of two Python echo workers spawned by baton, offering protocol
/// `protocol` (`--protocol`): each joins in that version, every client is
/// echoed, connections that arrive together go out in one message per
/// worker in version 2 and one each in version 1, and a drain is clean.
fn spawned_python_pool(protocol: u8) {
    let script = echo_worker();
    let protocol_arg = protocol.to_string();
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
            "--protocol",
            &protocol_arg,
        ],
        2,
    );
    let ready: Vec<&common::LogLine> = b
        .seen
        .iter()
        .filter(|l| l.message() == "worker ready")
        .collect();
    assert_eq!(ready.len(), 2);
    for l in &ready {
        assert_eq!(
            l.field("protocol"),
            Some(protocol_arg.clone()),
            "the acceptor agreed on version {protocol}: {}",
            l.raw
        );
    }
    let r = rows(&b);
    assert!(
        r.len() == 2
            && r.iter()
                .all(|w| w["origin"] == "spawned" && w["state"] == "ready"),
        "{r:?}"
    );

    let (ok, errors) = echo_many(b.addr(), 100);
    assert_eq!(ok, 100, "{errors:?}");

    // Connections that one wake-up of the acceptor accepts: with the
    // acceptor stopped, 8 clients complete their handshake in the backlog;
    // once it runs again it accepts them all in one round and sends each
    // worker its share in one CONNS (version 2), or one CONN each.
    let before = b.ctl_json(&["status"]);
    b.signal(Signal::SIGSTOP);
    let waiting: Vec<_> = (0..8)
        .map(|i| {
            let mut c = connect(b.addr()).expect("connect to the stopped acceptor");
            c.write_all(&common::payload(i)).expect("write");
            c
        })
        .collect();
    b.signal(Signal::SIGCONT);
    for (i, mut c) in waiting.into_iter().enumerate() {
        let want = common::payload(i);
        let mut back = vec![0u8; want.len()];
        c.read_exact(&mut back).expect("echo after the batch");
        assert_eq!(back, want);
    }
    let after = b.ctl_json(&["status"]);
    let delta = |k: &str| after[k].as_u64().expect(k) - before[k].as_u64().expect(k);
    assert_eq!(delta("handed_off"), 8, "{after}");
    if protocol == 1 {
        assert_eq!(delta("sends"), 8, "version 1: one CONN per connection");
    } else {
        assert!(
            delta("sends") <= 2,
            "version 2: one CONNS per worker for the round, not {} messages",
            delta("sends")
        );
    }

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
    // The Python workers log in baton's style: with --log-format json (the
    // harness's), every line of every process is JSON, theirs included.
    let py = |l: &&common::LogLine| l.json["span"]["name"] == "baton-echo-py";
    let theirs: Vec<&common::LogLine> = b.seen.iter().filter(py).collect();
    assert!(
        theirs
            .iter()
            .any(|l| l.message().contains("ready (protocol"))
            && theirs.iter().any(|l| l.message().contains("exiting after")),
        "{theirs:?}"
    );
    let not_json = b.lines_not_json();
    assert!(
        not_json.is_empty(),
        "lines that are not JSON: {not_json:#?}"
    );
}

#[test]
fn python_workers_spawned_by_baton_echo_every_client_and_drain_cleanly() {
    if !have_python("python_workers_spawned_by_baton_echo_every_client_and_drain_cleanly") {
        return;
    }
    spawned_python_pool(2);
}

#[test]
fn python_workers_forced_to_protocol_1_still_work() {
    if !have_python("python_workers_forced_to_protocol_1_still_work") {
        return;
    }
    spawned_python_pool(1);
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

/// A Python worker that answers one line per request and then parks the
/// connection (`Worker.park`): reads byte by byte so that nothing of the
/// next request is ever buffered here.
const PARKING_WORKER: &str = r#"
import baton_worker as bw

w = bw.Worker.from_env()
assert w.can_park, w.version
for ev in w:
    if not isinstance(ev, bw.Conn):
        break
    line = b""
    while not line.endswith(b"\n"):
        b = ev.sock.recv(1)
        if not b:
            break
        line += b
    if not line.endswith(b"\n"):
        ev.sock.close()
        w.done(ev.id)
        continue
    ev.sock.sendall(b"%d %s" % (ev.id, line))
    w.park([(ev, 30000)])
"#;

/// Polls `ctl status` until `pred` holds (bounded): the acceptor's counters
/// move when it reads the worker's messages, which is after the client saw
/// the reply.
fn status_until(b: &Baton, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = b.ctl_json(&["status"]);
        if pred(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "{what}: {st}");
    }
}

#[test]
fn a_python_worker_parks_idle_connections_and_gets_them_back() {
    if !have_python("a_python_worker_parks_idle_connections_and_gets_them_back") {
        return;
    }
    let mut cmd = Command::new(bin("baton"));
    cmd.env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONPATH", python_dir());
    let mut b = Baton::start_with(
        cmd,
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--no-sandbox",
            "--allow-root-workers",
            "--",
            "python3",
            "-c",
            PARKING_WORKER,
        ],
        1,
    );
    let mut c = connect(b.addr()).expect("connect");
    let mut reader = std::io::BufReader::new(c.try_clone().expect("clone"));
    let mut ask = |c: &mut std::net::TcpStream, what: &str| {
        c.write_all(format!("{what}\n").as_bytes()).expect("write");
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).expect("reply");
        let (id, said) = line.trim_end().split_once(' ').expect("ID LINE");
        assert_eq!(said, what);
        id.to_string()
    };
    let first = ask(&mut c, "one");
    let st = status_until(&b, "the connection is parked", |s| s["parked"] == 1);
    assert_eq!(
        st["in_flight"], 0,
        "a parked connection is not in flight: {st}"
    );
    // Its next request: the acceptor hands it to the worker again, under
    // the same id, and it is parked again after.
    let second = ask(&mut c, "two");
    assert_eq!(first, second, "the same connection");
    let st = status_until(&b, "parked again", |s| {
        s["parked"] == 1 && s["parked_total"] == 2
    });
    assert_eq!(st["unparked"], 1, "{st}");
    // The client leaves while parked: the acceptor closes it.
    drop(c);
    drop(reader);
    status_until(&b, "closed by its client", |s| {
        s["parked"] == 0 && s["parked_closed"] == 1
    });
    b.stop();
    let exited = b
        .find(Duration::from_secs(5), |l| l.message() == "worker exited")
        .expect("the worker exits");
    assert!(exited.raw.contains("exit code 0"), "{}", exited.raw);
    let stopped = b
        .find(Duration::from_secs(5), |l| l.message() == "stopped")
        .expect("the acceptor's last line");
    // One client, handed off twice, nothing lost.
    assert_eq!(
        stopped.field("accepted").as_deref(),
        Some("1"),
        "{}",
        stopped.raw
    );
    assert_eq!(
        stopped.field("handed_off").as_deref(),
        Some("2"),
        "{}",
        stopped.raw
    );
    assert_eq!(
        stopped.field("lost").as_deref(),
        Some("0"),
        "{}",
        stopped.raw
    );
}
