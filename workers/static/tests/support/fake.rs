//! A fake acceptor: enough of baton's side of the handoff protocol to drive
//! one `baton-static` process from a test, without the real acceptor.
//!
//! It creates the SEQPACKET pair, passes one end to the worker as
//! `BATON_CHANNEL_FD`, answers HELLO with WELCOME, accepts TCP connections
//! on 127.0.0.1:0 and hands each one over in a CONN message, and records
//! the worker's ACK and DONE messages.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use baton_sdk::{Channel, ConnInfo, Msg};

#[derive(Default, Debug)]
pub struct Record {
    pub acked: Vec<u64>,
    pub done: Vec<u64>,
    pub closed: bool,
}

pub struct Fake {
    pub child: Child,
    /// Where clients connect.
    pub addr: SocketAddr,
    pub pid: u32,
    chan: Arc<Channel>,
    record: Arc<(Mutex<Record>, Condvar)>,
    hold: Arc<(Mutex<bool>, Condvar)>,
    logs: Receiver<String>,
    pub seen_logs: Vec<String>,
    next_id: Arc<AtomicU64>,
    claimed_peer: Arc<Mutex<Option<SocketAddr>>>,
}

impl Fake {
    /// Starts `baton-static ARGS` as a worker of this fake acceptor.
    pub fn start(args: &[&str]) -> Fake {
        let (ours, theirs) = Channel::pair().expect("channel pair");
        ours.set_nonblocking(false).expect("blocking");
        let child_fd = theirs.as_raw_fd();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_baton-static"));
        cmd.args(args)
            .env("BATON_CHANNEL_FD", child_fd.to_string())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the forked child before exec and only
        // calls fcntl(2), which is async-signal-safe. Clearing FD_CLOEXEC
        // there (not in the parent) keeps the channel out of every other
        // process that concurrently running tests spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(child_fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn baton-static");
        drop(theirs);
        let (tx, logs) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[baton-static] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // HELLO, then WELCOME.
        let hello = ours
            .recv()
            .expect("recv hello")
            .expect("worker closed the channel before HELLO");
        let pid = match hello.msg {
            Msg::Hello { pid, .. } => pid,
            other => panic!("expected HELLO, got {other:?}"),
        };
        assert_eq!(pid, child.id());
        // A version 1 acceptor: one CONN per message, no parking, so that
        // these tests see the worker's own drain and timeouts.
        ours.set_version(1);
        ours.send(&Msg::Welcome { worker_id: 1 }, None)
            .expect("welcome");
        let chan = Arc::new(ours);
        let record = Arc::new((Mutex::new(Record::default()), Condvar::new()));
        let hold = Arc::new((Mutex::new(false), Condvar::new()));
        {
            let chan = chan.clone();
            let record = record.clone();
            let hold = hold.clone();
            std::thread::spawn(move || loop {
                {
                    let (m, cv) = &*hold;
                    let mut held = m.lock().unwrap();
                    while *held {
                        held = cv.wait(held).unwrap();
                    }
                }
                let r = chan.recv();
                let (m, cv) = &*record;
                let mut rec = m.lock().unwrap();
                match r {
                    Ok(Some(r)) => match r.msg {
                        Msg::Ack(ids) => rec.acked.extend(ids),
                        Msg::Done(ids) => rec.done.extend(ids),
                        other => panic!("worker sent {other:?}"),
                    },
                    Ok(None) | Err(_) => {
                        rec.closed = true;
                        cv.notify_all();
                        return;
                    }
                }
                cv.notify_all();
            });
        }
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let next_id = Arc::new(AtomicU64::new(1));
        let claimed_peer = Arc::new(Mutex::new(None));
        {
            let chan = chan.clone();
            let next_id = next_id.clone();
            let claimed_peer = claimed_peer.clone();
            std::thread::spawn(move || {
                for s in listener.incoming() {
                    let Ok(s) = s else { continue };
                    let info = ConnInfo {
                        id: next_id.fetch_add(1, Ordering::SeqCst),
                        listener: 0,
                        peer: claimed_peer
                            .lock()
                            .unwrap()
                            .unwrap_or_else(|| s.peer_addr().expect("peer")),
                        local: s.local_addr().expect("local"),
                    };
                    if chan.send(&Msg::Conn(info), Some(s.as_fd())).is_err() {
                        return;
                    }
                    // The fd in flight keeps the socket open; our copy goes.
                }
            });
        }
        Fake {
            pid,
            child,
            addr,
            chan,
            record,
            hold,
            logs,
            seen_logs: Vec::new(),
            next_id,
            claimed_peer,
        }
    }

    /// Hands the next connections over with `peer` as their client address
    /// instead of the socket's (what an acceptor does with a connection a
    /// worker parked after reading its PROXY header); None: the socket's.
    pub fn claim_peer(&self, peer: Option<SocketAddr>) {
        *self.claimed_peer.lock().unwrap() = peer;
    }

    /// Ids handed over so far.
    pub fn handed(&self) -> u64 {
        self.next_id.load(Ordering::SeqCst) - 1
    }

    /// Stops (true) or resumes (false) reading the worker's messages, as a
    /// busy acceptor would.
    pub fn hold(&self, held: bool) {
        let (m, cv) = &*self.hold;
        *m.lock().unwrap() = held;
        cv.notify_all();
    }

    pub fn drain(&self) {
        self.chan.send(&Msg::Drain, None).expect("send DRAIN");
    }

    /// Waits until `pred` holds for the ACK/DONE record.
    pub fn wait_record(&self, timeout: Duration, pred: impl Fn(&Record) -> bool) -> bool {
        let (m, cv) = &*self.record;
        let deadline = Instant::now() + timeout;
        let mut rec = m.lock().unwrap();
        while !pred(&rec) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            rec = cv.wait_timeout(rec, left).unwrap().0;
        }
        true
    }

    pub fn done(&self) -> Vec<u64> {
        self.record.0.lock().unwrap().done.clone()
    }

    pub fn acked(&self) -> Vec<u64> {
        self.record.0.lock().unwrap().acked.clone()
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        if let Some(l) = self.seen_logs.iter().find(|l| l.contains(needle)) {
            return Some(l.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.logs.recv_timeout(left) {
                Ok(l) => {
                    self.seen_logs.push(l.clone());
                    if l.contains(needle) {
                        return Some(l);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Collects the log lines that arrived so far.
    pub fn collect_logs(&mut self) -> &[String] {
        while let Ok(l) = self.logs.try_recv() {
            self.seen_logs.push(l);
        }
        &self.seen_logs
    }

    /// Waits for the worker to exit, and for everything it sent before
    /// exiting to be recorded (the channel's EOF comes after its messages).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                assert!(
                    self.wait_record(timeout, |r| r.closed),
                    "channel never closed"
                );
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "worker did not exit in {timeout:?}"
            );
            // Poll the exit through the record's condvar rather than sleep.
            self.wait_record(Duration::from_millis(10), |r| r.closed);
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
