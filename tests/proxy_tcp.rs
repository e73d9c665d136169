//! baton-proxy in TCP mode behind a real acceptor: `baton --seccomp proxy
//! -- baton-proxy --mode tcp --upstream ...`, with upstream servers written
//! here (threads on loopback) that count what they see. Tests synchronise
//! on log lines and on what the upstreams report, never on sleeps.

mod common;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_sdk::proxy_protocol::{self, Parsed};
use common::{bin, connect, echo_once, Baton};

/// What a test upstream does with each connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Echoes everything; after the client's EOF writes `BYE <n>\n` (n =
    /// bytes received) and closes.
    Echo,
    /// Reads a PROXY header first and reports it, then echoes.
    ProxyHeader,
    /// Writes `HELLO\n` and shuts its side down at once, then reads to
    /// the client's EOF, adding what it got to `moved`.
    GreetThenListen,
    /// Writes without end (as fast as the other side takes it), adding
    /// what it wrote to `moved`.
    Flood,
}

/// A small upstream server on loopback.
struct Upstream {
    addr: SocketAddr,
    /// Connections that sent at least one byte (health probes send none).
    conns: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    headers: Arc<Mutex<Vec<Result<proxy_protocol::Header, String>>>>,
    /// Bytes read (GreetThenListen) or written (Flood).
    moved: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Upstream {
    fn start(kind: Kind) -> Upstream {
        Upstream::start_on("127.0.0.1:0".parse().unwrap(), kind)
    }

    fn start_on(addr: SocketAddr, kind: Kind) -> Upstream {
        // std sets SO_REUSEADDR: a restarted upstream gets its port back.
        let l = TcpListener::bind(addr).expect("bind upstream");
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let headers = Arc::new(Mutex::new(Vec::new()));
        let moved = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (conns, stop, headers) = (conns.clone(), stop.clone(), headers.clone());
            let moved = moved.clone();
            std::thread::spawn(move || {
                for s in l.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(s) = s else { continue };
                    let (headers, conns) = (headers.clone(), conns.clone());
                    let moved = moved.clone();
                    std::thread::spawn(move || serve(s, kind, &headers, &conns, &moved));
                }
                // The listener closes here: connects are refused from now.
            })
        };
        Upstream {
            addr,
            conns,
            stop,
            headers,
            moved,
            thread: Some(thread),
        }
    }

    fn count(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }

    fn arg(&self) -> String {
        self.addr.to_string()
    }

    /// Stops listening (new connects are refused).
    fn kill(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

fn serve(
    mut s: TcpStream,
    kind: Kind,
    headers: &Mutex<Vec<Result<proxy_protocol::Header, String>>>,
    conns: &AtomicUsize,
    moved: &AtomicUsize,
) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let mut buf = vec![0u8; 256 * 1024];
    match kind {
        Kind::GreetThenListen => {
            conns.fetch_add(1, Ordering::SeqCst);
            if s.write_all(b"HELLO\n").is_err() || s.shutdown(Shutdown::Write).is_err() {
                return;
            }
            while let Ok(n @ 1..) = s.read(&mut buf) {
                moved.fetch_add(n, Ordering::SeqCst);
            }
            return;
        }
        Kind::Flood => {
            conns.fetch_add(1, Ordering::SeqCst);
            let _ = s.set_write_timeout(Some(Duration::from_secs(60)));
            while let Ok(n @ 1..) = s.write(&buf) {
                moved.fetch_add(n, Ordering::SeqCst);
            }
            return;
        }
        Kind::Echo | Kind::ProxyHeader => {}
    }
    let mut pending = Vec::new();
    let mut counted = false;
    let mut count = |n: usize| {
        if n > 0 && !counted {
            counted = true;
            conns.fetch_add(1, Ordering::SeqCst);
        }
    };
    if kind == Kind::ProxyHeader {
        let mut head = Vec::new();
        let r = loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break Err("eof before a header".to_string()),
                Ok(n) => {
                    count(n);
                    head.extend_from_slice(&buf[..n]);
                }
            }
            match proxy_protocol::parse(&head) {
                Ok(Parsed::Incomplete) => continue,
                Ok(Parsed::Complete { header, len }) => {
                    pending = head[len..].to_vec();
                    break Ok(header);
                }
                Err(e) => break Err(e.to_string()),
            }
        };
        let bad = r.is_err();
        headers.lock().unwrap().push(r);
        if bad {
            return;
        }
    }
    let mut total = pending.len();
    if s.write_all(&pending).is_err() {
        return;
    }
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                count(n);
                total += n;
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    let _ = s.write_all(format!("BYE {total}\n").as_bytes());
}

/// `baton --seccomp proxy -- baton-proxy --mode tcp ARGS`, `workers`
/// workers, each logging "worker N ready: tcp mode".
fn start(workers: usize, proxy_args: &[String]) -> Baton {
    start_with(workers, &[], proxy_args)
}

/// As [`start`], with `baton_args` for the acceptor (before `--`).
fn start_with(workers: usize, baton_args: &[&str], proxy_args: &[String]) -> Baton {
    let w = workers.to_string();
    let proxy = bin("baton-proxy").display().to_string();
    let mut args: Vec<&str> = vec!["--listen", "127.0.0.1:0", "--workers", &w, "--no-control"];
    args.extend_from_slice(baton_args);
    args.extend([
        // No --seccomp: `auto` gives baton-proxy the proxy profile, so the
        // issue's command line works as written.
        "--", &proxy, "--mode", "tcp",
    ]);
    args.extend(proxy_args.iter().map(|s| s.as_str()));
    let mut b = Baton::start(&args, workers);
    for _ in 0..workers {
        b.find(Duration::from_secs(20), |l| {
            l.message().contains("ready: tcp mode")
        })
        .expect("the proxy worker says it is ready");
    }
    b
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// `--upstream A --upstream B --balance POLICY EXTRA`.
fn two(a: &str, b: &str, policy: &str, extra: &[&str]) -> Vec<String> {
    let mut v = args(&["--upstream", a, "--upstream", b, "--balance", policy]);
    v.extend(args(extra));
    v
}

fn expect_echo(addr: SocketAddr, payload: &[u8]) {
    let back = echo_once(addr, payload).expect("exchange through the proxy");
    let mut want = payload.to_vec();
    want.extend_from_slice(format!("BYE {}\n", payload.len()).as_bytes());
    assert_eq!(back, want);
}

/// FNV-1a, as a checksum.
fn checksum(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h ^= u64::from(*b);
        *h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

#[test]
fn a_large_transfer_both_ways_arrives_intact() {
    let up = Upstream::start(Kind::Echo);
    let mut b = start(1, &args(&["--upstream", &up.arg()]));
    const TOTAL: usize = 64 << 20;
    let mut s = connect(b.addr()).unwrap();
    let mut r = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let mut chunk = vec![0u8; 1 << 16];
        let mut sent = 0usize;
        let mut x = 0x1234_5678u32;
        while sent < TOTAL {
            for c in chunk.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *c = x as u8;
            }
            s.write_all(&chunk).unwrap();
            checksum(&mut h, &chunk);
            sent += chunk.len();
        }
        s.shutdown(Shutdown::Write).unwrap();
        h
    });
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let mut tail = Vec::new();
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        let body = n.min(TOTAL.saturating_sub(got));
        checksum(&mut h, &buf[..body]);
        got += body;
        tail.extend_from_slice(&buf[body..n]);
    }
    let sent = writer.join().unwrap();
    assert_eq!(got, TOTAL);
    assert_eq!(h, sent, "checksum of what came back");
    assert_eq!(tail, format!("BYE {TOTAL}\n").into_bytes());
    let line = b
        .wait_until(Duration::from_secs(10), |l| l.message().contains("done,"))
        .expect("the connection's closing line");
    assert!(
        line.message().contains(&format!(
            "{TOTAL} bytes up, {} bytes down",
            TOTAL + tail.len()
        )),
        "{}",
        line.message()
    );
    b.stop();
}

#[test]
fn half_close_still_delivers_the_rest() {
    let up = Upstream::start(Kind::Echo);
    let b = start(1, &args(&["--upstream", &up.arg()]));
    let mut s = connect(b.addr()).unwrap();
    s.write_all(b"first part").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    // The upstream saw the FIN (it says how many bytes it got, which it
    // does only after EOF), and its answer still arrives after ours.
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"first partBYE 10\n");
    // The other way: the upstream's answer keeps flowing while the client
    // has not closed; the client reads part, then shuts, then reads on.
    let mut s = connect(b.addr()).unwrap();
    s.write_all(&[7u8; 100_000]).unwrap();
    let mut first = vec![0u8; 50_000];
    s.read_exact(&mut first).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert_eq!(first.len() + rest.len(), 100_000 + b"BYE 100000\n".len());
    assert!(rest.ends_with(b"BYE 100000\n"));
}

#[test]
fn connections_are_spread_by_weight() {
    let a = Upstream::start(Kind::Echo);
    let c = Upstream::start(Kind::Echo);
    let weighted = format!("{},weight=3", c.arg());
    let b = start(1, &two(&a.arg(), &weighted, "round-robin", &[]));
    for i in 0..40 {
        expect_echo(b.addr(), format!("request {i}").as_bytes());
    }
    assert_eq!((a.count(), c.count()), (10, 30));
}

#[test]
fn least_conn_and_hash_spread_and_stick() {
    let a = Upstream::start(Kind::Echo);
    let c = Upstream::start(Kind::Echo);
    let b = start(1, &two(&a.arg(), &c.arg(), "least-conn", &[]));
    // Two connections held open at once go to two servers.
    let mut s1 = connect(b.addr()).unwrap();
    s1.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    s1.read_exact(&mut one).unwrap();
    let mut s2 = connect(b.addr()).unwrap();
    s2.write_all(b"y").unwrap();
    s2.read_exact(&mut one).unwrap();
    assert_eq!((a.count(), c.count()), (1, 1));
    drop((s1, s2));
    drop(b);
    // hash: every connection of one client address goes to one server.
    let b = start(2, &two(&a.arg(), &c.arg(), "hash", &[]));
    let before = (a.count(), c.count());
    for i in 0..10 {
        expect_echo(b.addr(), format!("sticky {i}").as_bytes());
    }
    let (da, dc) = (a.count() - before.0, c.count() - before.1);
    assert!((da, dc) == (10, 0) || (da, dc) == (0, 10), "{da} and {dc}");
}

#[test]
fn a_dead_upstream_is_taken_out_and_comes_back() {
    let mut a = Upstream::start(Kind::Echo);
    let c = Upstream::start(Kind::Echo);
    let a_addr = a.addr;
    let mut b = start(
        2,
        &two(
            &a.arg(),
            &c.arg(),
            "round-robin",
            &["--health-check", "tcp"],
        ),
    );
    for i in 0..4 {
        expect_echo(b.addr(), format!("before {i}").as_bytes());
    }
    assert!(a.count() >= 1 && c.count() >= 1, "both serve at first");
    a.kill();
    let killed = Instant::now();
    let down = format!("upstream {a_addr} down");
    b.wait_until(Duration::from_secs(5), |l| l.message().starts_with(&down))
        .unwrap_or_else(|| panic!("no {down:?} line"));
    let took = killed.elapsed();
    assert!(took < Duration::from_millis(2500), "down after {took:?}");
    // Every worker sees it (the second worker's own probe, or the pool's
    // shared state once the acceptor passes BATON_SHARED_FD): no client
    // is refused, none goes to the dead server.
    let c_before = c.count();
    for i in 0..10 {
        expect_echo(b.addr(), format!("during {i}").as_bytes());
    }
    assert_eq!(c.count() - c_before, 10);
    // It returns on the same port: back in rotation at the next probe.
    let a2 = Upstream::start_on(a_addr, Kind::Echo);
    let returned = Instant::now();
    let up = format!("upstream {a_addr} up");
    b.wait_until(Duration::from_secs(5), |l| l.message().starts_with(&up))
        .unwrap_or_else(|| panic!("no {up:?} line"));
    assert!(returned.elapsed() < Duration::from_secs(2));
    // Both workers' views: wait for the second one's line too, then a round
    // of requests reaches the returned server.
    let _ = b.wait_until(Duration::from_secs(3), |l| l.message().starts_with(&up));
    for i in 0..8 {
        expect_echo(b.addr(), format!("after {i}").as_bytes());
    }
    assert!(
        a2.count() >= 2,
        "the returned server serves again: {}",
        a2.count()
    );
}

#[test]
fn a_refused_connect_is_retried_on_another_server() {
    // A port nobody listens on.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let c = Upstream::start(Kind::Echo);
    let mut b = start(
        1,
        &two(
            &dead.to_string(),
            &c.arg(),
            "round-robin",
            &["--max-fails", "2"],
        ),
    );
    for i in 0..6 {
        expect_echo(b.addr(), format!("retry {i}").as_bytes());
    }
    assert_eq!(c.count(), 6);
    b.find(Duration::from_secs(5), |l| {
        l.message().contains(&format!("connect to {dead}"))
            && l.message().contains("trying another server")
    })
    .expect("the retry is logged");
    // Passive health took it out after two failures.
    b.find(Duration::from_secs(5), |l| {
        l.message()
            .starts_with(&format!("upstream {dead} down after 2"))
    })
    .expect("passive health took the dead server out");
}

#[test]
fn the_upstream_gets_a_proxy_v2_header_with_the_client_address() {
    let up = Upstream::start(Kind::ProxyHeader);
    let b = start(1, &args(&["--upstream", &up.arg(), "--send-proxy", "v2"]));
    let mut s = connect(b.addr()).unwrap();
    let me = s.local_addr().unwrap();
    s.write_all(b"after the header").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"after the headerBYE 16\n");
    let h = up.headers.lock().unwrap()[0]
        .clone()
        .expect("a valid header");
    assert_eq!(h.version, 2);
    assert_eq!(h.addrs, Some((me, b.addr())));
}

#[test]
fn accept_proxy_takes_good_headers_and_refuses_the_rest() {
    let up = Upstream::start(Kind::ProxyHeader);
    let mut b = start(
        1,
        &args(&[
            "--upstream",
            &up.arg(),
            "--send-proxy",
            "v2",
            "--accept-proxy",
        ]),
    );
    let addr = b.addr();
    let send = |head: &[u8], body: &[u8]| -> Vec<u8> {
        let mut s = connect(addr).unwrap();
        // In two pieces: an incomplete header is waited for, not refused.
        // A refused one is closed at once, so later writes may fail.
        let cut = head.len() / 2;
        s.write_all(&head[..cut]).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        let _ = s
            .write_all(&head[cut..])
            .and_then(|_| s.write_all(body))
            .and_then(|_| s.shutdown(Shutdown::Write));
        let mut back = Vec::new();
        let _ = s.read_to_end(&mut back);
        back
    };
    let client: SocketAddr = "192.0.2.7:4242".parse().unwrap();
    let front: SocketAddr = "198.51.100.1:443".parse().unwrap();
    let v1 = proxy_protocol::encode_v1(client, front);
    assert_eq!(send(v1.as_bytes(), b"v1 body"), b"v1 bodyBYE 7\n");
    let client6: SocketAddr = "[2001:db8::7]:5555".parse().unwrap();
    let front6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
    let v2 = proxy_protocol::encode_v2(client6, front6);
    assert_eq!(send(&v2, b"v2 body"), b"v2 bodyBYE 7\n");
    {
        let h = up.headers.lock().unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].clone().unwrap().addrs, Some((client, front)));
        assert_eq!(h[1].clone().unwrap().addrs, Some((client6, front6)));
    }
    b.find(Duration::from_secs(5), |l| {
        l.message().contains("from 192.0.2.7:4242 via")
    })
    .expect("the header's address is the one logged");
    // No header, a malformed one: closed, logged, the upstream never hears.
    let before = up.count();
    assert_eq!(send(b"GET / HTTP/1.1\r\n\r\n", b""), b"");
    assert_eq!(send(b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n", b"x"), b"");
    let mut bad_v2 = proxy_protocol::encode_v2(client, front);
    bad_v2[12] = 0x31; // version 3
    assert_eq!(send(&bad_v2, b"x"), b"");
    for _ in 0..3 {
        b.wait_until(Duration::from_secs(5), |l| {
            l.message().contains("PROXY header refused")
        })
        .expect("each refusal is logged");
    }
    assert_eq!(up.count(), before, "nothing reached the upstream");
}

#[test]
fn help_describes_upstreams_and_balancing() {
    // HTTP mode, the default, is tested in tests/proxy_http.rs.
    let help = std::process::Command::new(bin("baton-proxy"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("weight=N") && help.contains("[default: least-conn]"),
        "{help}"
    );
}

/// A baton-proxy started by hand that joins `baton --worker-socket`, with
/// the pool's shared region inherited in BATON_SHARED_FD (as the acceptor
/// will pass it to the workers it spawns), its JSON log lines sent to `tx`.
fn registered_proxy(
    sock: &str,
    region: &std::os::fd::OwnedFd,
    proxy_args: &[String],
    tx: std::sync::mpsc::Sender<String>,
) -> std::process::Child {
    use std::io::BufRead;
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = region.as_raw_fd();
    let mut cmd = std::process::Command::new(bin("baton-proxy"));
    cmd.args(["--register", sock, "--mode", "tcp"])
        .args(proxy_args)
        .env("BATON_LOG_FORMAT", "json")
        .env(baton_sdk::shared::SHARED_FD_ENV, fd.to_string())
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: between fork and exec the closure only calls fcntl(2), which
    // is async-signal-safe, on an fd this process owns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let mut child = cmd.spawn().expect("start baton-proxy");
    let stderr = child.stderr.take().expect("piped");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            let msg = v["fields"]["message"].as_str().unwrap_or(&line).to_string();
            if tx.send(msg).is_err() {
                break;
            }
        }
    });
    child
}

/// The next message satisfying `pred` within `timeout`.
fn next_line(
    rx: &std::sync::mpsc::Receiver<String>,
    timeout: Duration,
    pred: impl Fn(&str) -> bool,
) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(m) if pred(&m) => return Some(m),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

#[test]
fn workers_of_one_pool_share_health_through_the_region() {
    let mut a = Upstream::start(Kind::Echo);
    let c = Upstream::start(Kind::Echo);
    let a_addr = a.addr;
    let region = baton_sdk::shared::create_region("baton-proxy-test").unwrap();
    let dir = common::tempdir("baton-proxy-shared");
    let sock = dir.join("workers.sock").display().to_string();
    let mut b = Baton::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "0",
            "--no-control",
            "--worker-socket",
            &sock,
        ],
        0,
    );
    // Probes every 300 ms, one failure takes a server down: with private
    // state each worker would report every change itself within 300 ms.
    let opts = two(
        &a.arg(),
        &c.arg(),
        "round-robin",
        &[
            "--health-check",
            "tcp",
            "--health-interval",
            "300ms",
            "--health-timeout",
            "300ms",
            "--health-fall",
            "1",
        ],
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let mut workers: Vec<_> = (0..2)
        .map(|_| registered_proxy(&sock, &region, &opts, tx.clone()))
        .collect();
    drop(tx);
    for _ in 0..2 {
        next_line(&rx, Duration::from_secs(20), |m| {
            m.contains("ready: tcp mode") && m.contains("health state shared with the pool")
        })
        .expect("each worker maps the pool's region");
        b.wait_for("worker ready", Duration::from_secs(20));
    }
    // One worker reports each change, and nobody a second time: the other
    // worker saw the shared slot (three more probe intervals of its own go
    // by, in which it would have reported it with state of its own).
    let once = |prefix: String| {
        next_line(&rx, Duration::from_secs(3), |m| m.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line"));
        let again = next_line(&rx, Duration::from_millis(900), |m| m.starts_with(&prefix));
        assert_eq!(again, None, "reported twice: state not shared");
    };
    a.kill();
    once(format!("upstream {a_addr} down"));
    let c_before = c.count();
    for i in 0..8 {
        expect_echo(b.addr(), format!("shared {i}").as_bytes());
    }
    assert_eq!(c.count() - c_before, 8);
    let a2 = Upstream::start_on(a_addr, Kind::Echo);
    once(format!("upstream {a_addr} up"));
    for i in 0..8 {
        expect_echo(b.addr(), format!("back {i}").as_bytes());
    }
    assert!(
        a2.count() >= 2,
        "both workers send to it again: {}",
        a2.count()
    );
    for w in &mut workers {
        let _ = w.kill();
        let _ = w.wait();
    }
}

/// An HTTP server answering every request with the status in `status`
/// (its health-check endpoint, as far as the proxy knows); counts requests
/// whose path is `/healthz`.
fn http_status_server(status: Arc<std::sync::atomic::AtomicU16>) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            if head.starts_with(b"GET /healthz HTTP/1.1\r\n") {
                h.fetch_add(1, Ordering::SeqCst);
            }
            let code = status.load(Ordering::SeqCst);
            let _ =
                s.write_all(format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n").as_bytes());
        }
    });
    (addr, hits)
}

#[test]
fn http_health_checks_follow_the_status() {
    let status = Arc::new(std::sync::atomic::AtomicU16::new(200));
    let (a, hits) = http_status_server(status.clone());
    let c = Upstream::start(Kind::Echo);
    let mut b = start(
        1,
        &two(
            &a.to_string(),
            &c.arg(),
            "round-robin",
            &[
                "--health-check",
                "http",
                "--health-path",
                "/healthz",
                "--health-interval",
                "200ms",
                "--health-timeout",
                "200ms",
            ],
        ),
    );
    status.store(503, Ordering::SeqCst);
    let down = format!("upstream {a} down");
    let line = b
        .wait_until(Duration::from_secs(5), |l| l.message().starts_with(&down))
        .expect("a 503 takes it down");
    assert!(line.message().contains("status 503"), "{}", line.message());
    assert!(
        hits.load(Ordering::SeqCst) >= 2,
        "probes asked for /healthz"
    );
    status.store(204, Ordering::SeqCst);
    let up = format!("upstream {a} up (health check passed)");
    b.wait_until(Duration::from_secs(5), |l| l.message() == up)
        .expect("a 2xx brings it back");
}

#[test]
fn drain_lets_a_relayed_connection_finish() {
    let up = Upstream::start(Kind::Echo);
    let mut b = start(1, &args(&["--upstream", &up.arg()]));
    let mut s = connect(b.addr()).unwrap();
    s.write_all(b"before the drain ").unwrap();
    let mut first = [0u8; 17];
    s.read_exact(&mut first).unwrap();
    b.signal(nix::sys::signal::Signal::SIGTERM);
    b.wait_until(Duration::from_secs(10), |l| {
        l.message().starts_with("DRAIN from the acceptor")
    })
    .expect("the worker is told to drain");
    // The connection is still relayed, both ways, to its end.
    s.write_all(b"and after").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"and afterBYE 26\n");
    b.wait_until(Duration::from_secs(10), |l| {
        l.message().contains("drained, exiting")
    })
    .expect("then the worker exits");
    let st = b.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "baton exited with {st:?}");
}

#[test]
fn under_the_default_seccomp_profile_it_says_to_use_proxy() {
    let proxy = bin("baton-proxy").display().to_string();
    let mut b = Baton::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--no-control",
            "--seccomp",
            "default",
            "--",
            &proxy,
            "--mode",
            "tcp",
            "--upstream",
            "127.0.0.1:1",
        ],
        0,
    );
    b.wait_until(Duration::from_secs(20), |l| {
        l.message()
            .contains("the sandbox refuses to create sockets")
            && l.message().contains("--seccomp proxy")
    })
    .expect("the worker says what to do");
    // Exit 78: not restarted; with no worker left, baton stops.
    let st = b.wait_exit(Duration::from_secs(30));
    assert!(!st.success());
}

// ---- TLS offload: the pool has --tls-cert, --mode tcp ------------------------

use common::pki::{have_openssl, pki};
use std::path::Path;

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A rustls client config trusting the test CA (ring provider).
fn tls_config(dir: &Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let ca =
        rustls::pki_types::CertificateDer::from_pem_file(dir.join("ca.crt")).expect("the test CA");
    roots.add(ca).expect("add the CA");
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// A TLS session over `sock` (SNI `localhost`), handshake done.
fn tls_over(dir: &Path, sock: TcpStream) -> TlsStream {
    let name = "localhost".try_into().expect("a server name");
    let conn = rustls::ClientConnection::new(tls_config(dir), name).expect("a TLS client");
    let mut t = rustls::StreamOwned::new(conn, sock);
    t.sock
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    while t.conn.is_handshaking() {
        t.conn
            .complete_io(&mut t.sock)
            .expect("a TLS handshake with the proxy");
    }
    t
}

fn tls_connect(dir: &Path, addr: SocketAddr) -> TlsStream {
    tls_over(dir, connect(addr).expect("connect to the proxy"))
}

/// `baton --tls-cert localhost.crt --tls-key localhost.key -- baton-proxy
/// --mode tcp ARGS`, one worker.
fn start_tls(dir: &Path, proxy_args: &[String]) -> Baton {
    let cert = dir.join("localhost.crt").display().to_string();
    let key = dir.join("localhost.key").display().to_string();
    start_with(1, &["--tls-cert", &cert, "--tls-key", &key], proxy_args)
}

/// How the test client ends its side.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ClientEnd {
    /// close_notify, the TCP connection left open.
    CloseNotify,
    /// A bare FIN, no close_notify.
    Fin,
}

/// Sends `data` over `t` while reading what comes back (both at once,
/// non-blocking, so that an echo cannot deadlock), then ends as `end`
/// says. Returns what came back, and whether the proxy ended it with
/// close_notify (false: a bare FIN).
fn exchange(mut t: TlsStream, data: &[u8], end: ClientEnd) -> (Vec<u8>, bool) {
    let (conn, sock) = (&mut t.conn, &mut t.sock);
    sock.set_nonblocking(true).unwrap();
    let (mut sent, mut ended, mut fin) = (0, false, false);
    let mut peer_end = None;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            Instant::now() < deadline,
            "exchange stuck: sent {sent}, got {}",
            got.len()
        );
        let mut progress = false;
        if sent < data.len() {
            let n = conn
                .writer()
                .write(&data[sent..(sent + (1 << 16)).min(data.len())])
                .unwrap();
            sent += n;
            progress |= n > 0;
        } else if !ended {
            if end == ClientEnd::CloseNotify {
                conn.send_close_notify();
            }
            ended = true;
            progress = true;
        }
        while conn.wants_write() {
            match conn.write_tls(sock) {
                Ok(n) => progress |= n > 0,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("write to the proxy: {e}"),
            }
        }
        if ended && !fin && end == ClientEnd::Fin && !conn.wants_write() {
            sock.shutdown(Shutdown::Write).unwrap();
            fin = true;
        }
        if peer_end.is_none() {
            match conn.read_tls(sock) {
                Ok(_) => {
                    conn.process_new_packets().expect("TLS from the proxy");
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("read from the proxy: {e}"),
            }
            loop {
                match conn.reader().read(&mut buf) {
                    Ok(0) => break peer_end = Some(true),
                    Ok(n) => {
                        got.extend_from_slice(&buf[..n]);
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        break peer_end = Some(false)
                    }
                    Err(e) => panic!("read from the proxy: {e}"),
                }
            }
        }
        if let Some(clean) = peer_end {
            if ended && !conn.wants_write() {
                return (got, clean);
            }
        }
        if !progress {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// `n` bytes of a pseudo-random pattern.
fn pattern(n: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9u32;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn tls_offload_carries_16_mib_each_way_to_a_plain_upstream() {
    if !have_openssl("tls_offload_carries_16_mib_each_way_to_a_plain_upstream") {
        return;
    }
    const TOTAL: usize = 16 << 20;
    let dir = pki(&["localhost"]);
    let up = Upstream::start(Kind::Echo);
    let mut b = start_tls(&dir, &args(&["--upstream", &up.arg()]));
    b.find(Duration::from_secs(10), |l| {
        l.message()
            .contains("TLS: handshakes signed by baton's key process")
    })
    .expect("the worker says it terminates TLS");
    let data = pattern(TOTAL);
    let (back, clean) = exchange(tls_connect(&dir, b.addr()), &data, ClientEnd::CloseNotify);
    assert_eq!(back.len(), TOTAL + format!("BYE {TOTAL}\n").len());
    assert!(back[..TOTAL] == data[..], "the echo arrives intact");
    assert_eq!(&back[TOTAL..], format!("BYE {TOTAL}\n").as_bytes());
    assert!(clean, "the proxy ends with close_notify");
    let line = b
        .wait_until(Duration::from_secs(10), |l| l.message().contains("done,"))
        .expect("the connection's closing line");
    assert!(
        line.message()
            .contains(&format!("{TOTAL} bytes up, {} bytes down", back.len())),
        "{}",
        line.message()
    );
    assert_eq!(up.count(), 1);
    b.stop();
}

#[test]
fn tls_offload_half_closes_both_ways() {
    if !have_openssl("tls_offload_half_closes_both_ways") {
        return;
    }
    let dir = pki(&["localhost"]);
    let up = Upstream::start(Kind::Echo);
    let b = start_tls(&dir, &args(&["--upstream", &up.arg()]));
    // The client ends with close_notify only (its TCP side stays open):
    // the upstream sees EOF (it says BYE only then), its answer follows.
    let t = tls_connect(&dir, b.addr());
    let (back, clean) = exchange(t, b"first part", ClientEnd::CloseNotify);
    assert_eq!(back, b"first partBYE 10\n");
    assert!(clean);
    // With a bare FIN instead: the same.
    let t = tls_connect(&dir, b.addr());
    let (back, clean) = exchange(t, &[7u8; 100_000], ClientEnd::Fin);
    assert_eq!(back.len(), 100_000 + b"BYE 100000\n".len());
    assert!(back.ends_with(b"BYE 100000\n"));
    assert!(clean);
    // The upstream ends first: the client gets its bytes and close_notify,
    // and may still send; the upstream receives all of it.
    let greeter = Upstream::start(Kind::GreetThenListen);
    let b = start_tls(&dir, &args(&["--upstream", &greeter.arg()]));
    let mut t = tls_connect(&dir, b.addr());
    let mut hello = Vec::new();
    t.read_to_end(&mut hello).expect("read until close_notify");
    assert_eq!(hello, b"HELLO\n");
    t.write_all(&[1u8; 100_000])
        .expect("the client may still send after the upstream's FIN");
    t.conn.send_close_notify();
    t.flush().unwrap();
    let t0 = Instant::now();
    while greeter.moved.load(Ordering::SeqCst) < 100_000 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the upstream got all"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(greeter.moved.load(Ordering::SeqCst), 100_000);
    // Both ways over: the proxy closes.
    let mut rest = [0u8; 16];
    assert_eq!(t.sock.read(&mut rest).unwrap_or(0), 0);
}

#[test]
fn tls_offload_takes_the_proxy_header_before_the_handshake() {
    if !have_openssl("tls_offload_takes_the_proxy_header_before_the_handshake") {
        return;
    }
    let dir = pki(&["localhost"]);
    let up = Upstream::start(Kind::ProxyHeader);
    let mut b = start_tls(
        &dir,
        &args(&[
            "--upstream",
            &up.arg(),
            "--accept-proxy",
            "--send-proxy",
            "v2",
        ]),
    );
    let client: SocketAddr = "192.0.2.9:4343".parse().unwrap();
    let front: SocketAddr = "198.51.100.2:443".parse().unwrap();
    for header in [
        proxy_protocol::encode_v1(client, front).into_bytes(),
        proxy_protocol::encode_v2(client, front),
    ] {
        let mut s = connect(b.addr()).unwrap();
        s.write_all(&header).unwrap();
        let t = tls_over(&dir, s);
        let (back, clean) = exchange(t, b"over tls", ClientEnd::CloseNotify);
        assert_eq!(back, b"over tlsBYE 8\n");
        assert!(clean);
    }
    {
        let h = up.headers.lock().unwrap();
        assert_eq!(h.len(), 2);
        for got in h.iter() {
            assert_eq!(got.clone().unwrap().addrs, Some((client, front)));
        }
    }
    b.find(Duration::from_secs(5), |l| {
        l.message().contains("from 192.0.2.9:4343 via")
    })
    .expect("the header's address is the one logged");
    // A TLS ClientHello where the header should be: refused as a header.
    let mut s = connect(b.addr()).unwrap();
    s.write_all(b"\x16\x03\x01\x00\x05hello").unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(got.is_empty());
    b.wait_until(Duration::from_secs(5), |l| {
        l.message().contains("PROXY header refused")
    })
    .expect("logged");
    assert_eq!(up.headers.lock().unwrap().len(), 2);
}

#[test]
fn tls_offload_closes_plaintext_garbage_and_stalled_handshakes() {
    if !have_openssl("tls_offload_closes_plaintext_garbage_and_stalled_handshakes") {
        return;
    }
    let dir = pki(&["localhost"]);
    let up = Upstream::start(Kind::Echo);
    let mut b = start_tls(
        &dir,
        &args(&["--upstream", &up.arg(), "--tls-handshake-timeout", "1s"]),
    );
    let addr = b.addr();
    let send = |bytes: &[u8]| -> Vec<u8> {
        let mut s = connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(bytes);
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        got
    };
    // Plain HTTP: closed without an answer (the service need not be HTTP).
    assert_eq!(send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), b"");
    b.wait_until(Duration::from_secs(5), |l| {
        l.message()
            .contains("TLS handshake failed (plaintext-http)")
            && l.message().contains("without an answer")
    })
    .expect("plaintext HTTP is logged");
    // Bytes that are not TLS at all: the same.
    assert_eq!(send(&[0u8; 64]), b"");
    b.wait_until(Duration::from_secs(5), |l| {
        l.message().contains("TLS handshake failed (not-tls)")
    })
    .expect("garbage is logged");
    // A client that opens and says nothing is closed at the deadline.
    let t0 = Instant::now();
    let mut s = connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(s.read(&mut [0u8; 16]).unwrap_or(0), 0, "closed, no byte");
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    b.wait_until(Duration::from_secs(5), |l| {
        l.message()
            .contains("TLS handshake not finished within --tls-handshake-timeout 1s")
    })
    .expect("the stall is logged");
    // Garbage after a good handshake: the connection ends, the upstream
    // never gets a byte of it.
    let mut t = tls_connect(&dir, addr);
    t.sock.write_all(b"this is not a TLS record\r\n").unwrap();
    let mut buf = [0u8; 64];
    match t.read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("plaintext back after garbage: {:?}", &buf[..n]),
    }
    // (Logged as a relay error, or as a handshake error when the client's
    // Finished and the garbage were read together.)
    b.wait_until(Duration::from_secs(5), |l| {
        l.message().contains("client I/O error: TLS (tls)")
            || l.message().contains("TLS handshake failed (tls)")
    })
    .expect("the garbage is logged");
    assert_eq!(up.count(), 0, "nothing reached the upstream");
    // The worker still serves.
    let (back, _) = exchange(tls_connect(&dir, addr), b"ok", ClientEnd::CloseNotify);
    assert_eq!(back, b"okBYE 2\n");
}

/// The resident set of `pid`, in KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The pid of the pool's baton-proxy worker.
fn proxy_pid(b: &Baton) -> i32 {
    b.worker_pids()
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == "baton-proxy")
        })
        .expect("a baton-proxy worker")
}

#[test]
fn tls_clients_that_never_read_cost_bounded_memory() {
    if !have_openssl("tls_clients_that_never_read_cost_bounded_memory") {
        return;
    }
    const CLIENTS: usize = 16;
    let dir = pki(&["localhost"]);
    let flood = Upstream::start(Kind::Flood);
    let b = start_tls(&dir, &args(&["--upstream", &flood.arg()]));
    let pid = proxy_pid(&b);
    // One connection first, so that the worker's steady allocations are
    // in the baseline.
    drop(tls_connect(&dir, b.addr()));
    std::thread::sleep(Duration::from_millis(200));
    let before = rss_kib(pid);
    // Clients that finish the handshake and never read, under an upstream
    // that writes without end: what the proxy holds must stay bounded.
    let clients: Vec<TlsStream> = (0..CLIENTS).map(|_| tls_connect(&dir, b.addr())).collect();
    // Until the flood stalls (backpressure reached the upstream).
    let t0 = Instant::now();
    let mut last = 0;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = flood.moved.load(Ordering::SeqCst);
        if now == last && now > 0 {
            break;
        }
        last = now;
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the upstream keeps writing: {now} bytes (nothing stops it)"
        );
    }
    let after = rss_kib(pid);
    let grew = after.saturating_sub(before);
    eprintln!(
        "{CLIENTS} non-reading TLS clients: worker RSS {before} KiB -> {after} KiB (+{grew} KiB, \
         {} KiB per client); the upstream wrote {} KiB in all before it blocked",
        grew / CLIENTS as u64,
        last / 1024
    );
    assert!(before > 0, "VmRSS read from /proc/{pid}/status");
    // 64 KiB of ours plus rustls's 64 KiB per client, and slack.
    assert!(
        grew < (CLIENTS as u64) * 512,
        "the worker grew by {grew} KiB for {CLIENTS} clients"
    );
    assert_eq!(flood.count(), CLIENTS + 1);
    drop(clients);
}
