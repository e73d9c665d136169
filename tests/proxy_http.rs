//! baton-proxy in HTTP mode (the default) behind a real acceptor:
//! `baton -- baton-proxy --upstream ...`, with upstream servers written
//! here (threads on loopback) that count connections and requests and
//! report what they saw, some of them misbehaving on purpose, and
//! baton-static behind a second acceptor, and TLS terminated in the proxy
//! (a Rust client, curl). Tests synchronise on responses,
//! on what the upstreams count and on log lines, never on sleeps.

mod common;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{bin, connect, Baton};

/// What a test upstream does with each request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// Answers 200 with the head it saw and the body's length and checksum
    /// (`/download/N`: N bytes, chunked); keeps the connection open.
    Echo,
    /// As Echo, then closes the connection (without saying so): every
    /// pooled connection to it is stale when reused.
    CloseAfterEach,
    /// Answers bytes that are not HTTP.
    Garbage,
    /// Reads the request and closes without a byte.
    SilentClose,
    /// Reads the request and never answers.
    Never,
    /// Sends a head promising 1000 bytes, 10 of them, and closes.
    Cut,
    /// Answers an Upgrade with 101, then echoes raw bytes.
    WebSocket,
}

struct Upstream {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    reqs: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Upstream {
    fn start(kind: Kind) -> Upstream {
        Upstream::start_on("127.0.0.1:0".parse().unwrap(), kind)
    }

    fn start_on(addr: SocketAddr, kind: Kind) -> Upstream {
        let l = TcpListener::bind(addr).expect("bind upstream");
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let reqs = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (conns, reqs, stop) = (conns.clone(), reqs.clone(), stop.clone());
            std::thread::spawn(move || {
                for s in l.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(s) = s else { continue };
                    conns.fetch_add(1, Ordering::SeqCst);
                    let (reqs, stop) = (reqs.clone(), stop.clone());
                    std::thread::spawn(move || {
                        let _ = serve(s, kind, &reqs, &stop);
                    });
                }
            })
        };
        Upstream {
            addr,
            conns,
            reqs,
            stop,
            thread: Some(thread),
        }
    }

    fn arg(&self) -> String {
        self.addr.to_string()
    }

    fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }

    fn reqs(&self) -> usize {
        self.reqs.load(Ordering::SeqCst)
    }

    /// Stops listening, and closes its connections at their next request.
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

/// FNV-1a, as a checksum.
fn fnv(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h ^= u64::from(*b);
        *h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

const FNV0: u64 = 0xcbf2_9ce4_8422_2325;

/// Deterministic bytes for bodies.
fn pattern(seed: u32, buf: &mut [u8]) -> u32 {
    let mut x = seed | 1;
    for b in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    x
}

/// A request head as the upstream saw it.
struct SeenHead {
    raw: String,
    target: String,
    length: Option<u64>,
    chunked: bool,
    upgrade: bool,
}

fn read_head(r: &mut impl BufRead) -> io::Result<Option<SeenHead>> {
    let mut raw = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        raw.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut fields);
    req.parse(raw.as_bytes())
        .map_err(|e| io::Error::other(e.to_string()))?;
    let target = req.path.unwrap_or("").to_string();
    let mut length = None;
    let (mut chunked, mut upgrade) = (false, false);
    for f in req.headers.iter() {
        let v = String::from_utf8_lossy(f.value).to_ascii_lowercase();
        if f.name.eq_ignore_ascii_case("content-length") {
            length = v.trim().parse().ok();
        } else if f.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.contains("chunked");
        } else if f.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    Ok(Some(SeenHead {
        raw,
        target,
        length,
        chunked,
        upgrade,
    }))
}

/// Reads a body framed by `length` or chunked: (bytes, checksum).
fn read_body(r: &mut impl BufRead, length: Option<u64>, chunked: bool) -> io::Result<(u64, u64)> {
    let mut h = FNV0;
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let mut take = |r: &mut dyn BufRead, mut n: u64, h: &mut u64| -> io::Result<()> {
        while n > 0 {
            let want = n.min(buf.len() as u64) as usize;
            r.read_exact(&mut buf[..want])?;
            fnv(h, &buf[..want]);
            n -= want as u64;
            total += want as u64;
        }
        Ok(())
    };
    if chunked {
        loop {
            let mut line = String::new();
            r.read_line(&mut line)?;
            let size = u64::from_str_radix(line.trim_end().split(';').next().unwrap_or(""), 16)
                .map_err(|e| io::Error::other(format!("chunk size {line:?}: {e}")))?;
            if size == 0 {
                // Trailers until the empty line.
                loop {
                    let mut t = String::new();
                    r.read_line(&mut t)?;
                    if t == "\r\n" || t.is_empty() {
                        break;
                    }
                }
                break;
            }
            take(r, size, &mut h)?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
        }
    } else if let Some(n) = length {
        take(r, n, &mut h)?;
    }
    Ok((total, h))
}

fn serve(s: TcpStream, kind: Kind, reqs: &AtomicUsize, stop: &AtomicBool) -> io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    loop {
        let Some(head) = read_head(&mut r)? else {
            return Ok(());
        };
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        reqs.fetch_add(1, Ordering::SeqCst);
        let (len, sum) = read_body(&mut r, head.length, head.chunked)?;
        match kind {
            Kind::Garbage => {
                w.write_all(b"HELLO THIS IS NOT HTTP\r\n\r\n")?;
                return Ok(());
            }
            Kind::SilentClose => return Ok(()),
            Kind::Never => {
                // Until the proxy gives up and closes.
                let mut sink = Vec::new();
                let _ = r.read_to_end(&mut sink);
                return Ok(());
            }
            Kind::Cut => {
                w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")?;
                return Ok(());
            }
            Kind::WebSocket if head.upgrade => {
                w.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
                )?;
                // Raw echo until EOF, then close.
                let mut buf = [0u8; 4096];
                loop {
                    let n = r.read(&mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    w.write_all(&buf[..n])?;
                }
            }
            _ => {}
        }
        if let Some(n) = head.target.strip_prefix("/length/") {
            let n: usize = n.parse().unwrap_or(0);
            w.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n").as_bytes())?;
            let mut chunk = vec![0u8; 65536];
            let (mut sent, mut seed) = (0, 7u32);
            while sent < n {
                let k = chunk.len().min(n - sent);
                seed = pattern(seed, &mut chunk[..k]);
                w.write_all(&chunk[..k])?;
                sent += k;
            }
        } else if let Some(n) = head.target.strip_prefix("/download/") {
            let n: usize = n.parse().unwrap_or(0);
            w.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")?;
            let mut chunk = vec![0u8; 65536];
            let (mut sent, mut seed) = (0, 7u32);
            while sent < n {
                let k = chunk.len().min(n - sent);
                seed = pattern(seed, &mut chunk[..k]);
                w.write_all(format!("{k:x}\r\n").as_bytes())?;
                w.write_all(&chunk[..k])?;
                w.write_all(b"\r\n")?;
                sent += k;
            }
            w.write_all(b"0\r\n\r\n")?;
        } else {
            let body = format!("{}body {len} {sum:016x}\n", head.raw);
            w.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Upstream: yes\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )?;
        }
        if kind == Kind::CloseAfterEach {
            return Ok(());
        }
    }
}

// ---- the client side --------------------------------------------------------

#[derive(Debug)]
struct Response {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Response {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn field(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// Reads one response (skipping 100 Continue).
fn read_response(r: &mut impl BufRead) -> io::Result<Response> {
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("eof in head {head:?}"),
                ));
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {head:?}")))?;
        if status == 100 {
            continue;
        }
        let mut resp = Response {
            status,
            head,
            body: Vec::new(),
        };
        let length = resp
            .field("content-length")
            .and_then(|v| v.parse::<usize>().ok());
        let chunked = resp
            .field("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"));
        if chunked {
            loop {
                let mut line = String::new();
                r.read_line(&mut line)?;
                let size = usize::from_str_radix(line.trim_end(), 16).map_err(io::Error::other)?;
                if size == 0 {
                    let mut end = String::new();
                    r.read_line(&mut end)?;
                    break;
                }
                let at = resp.body.len();
                resp.body.resize(at + size, 0);
                r.read_exact(&mut resp.body[at..])?;
                let mut crlf = [0u8; 2];
                r.read_exact(&mut crlf)?;
            }
        } else if let Some(n) = length {
            resp.body.resize(n, 0);
            r.read_exact(&mut resp.body)?;
        } else if status != 101 && status != 204 && status != 304 {
            r.read_to_end(&mut resp.body)?;
        }
        return Ok(resp);
    }
}

/// A client connection that sends requests and reads responses.
struct Client {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Client {
    fn new(addr: SocketAddr) -> Client {
        let s = connect(addr).expect("connect to the proxy");
        Client {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        }
    }
    fn send(&mut self, raw: &[u8]) -> io::Result<Response> {
        self.w.write_all(raw)?;
        read_response(&mut self.r)
    }
    fn get(&mut self, path: &str) -> Response {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: test.example\r\n\r\n").as_bytes())
            .expect("a response")
    }
    /// Whether the proxy closed the connection (EOF, nothing more).
    fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        matches!(self.r.read_to_end(&mut rest), Ok(0)) || rest.is_empty()
    }
}

fn one(addr: SocketAddr, raw: &[u8]) -> Response {
    Client::new(addr).send(raw).expect("a response")
}

/// `baton -- baton-proxy ARGS` (HTTP mode, the default), `workers`
/// workers, each logging "worker N ready: http mode".
fn start(workers: usize, proxy_args: &[&str]) -> Baton {
    start_with(workers, &[], proxy_args)
}

/// [`start`] with more arguments for baton itself.
fn start_with(workers: usize, baton_args: &[&str], proxy_args: &[&str]) -> Baton {
    let w = workers.to_string();
    let proxy = bin("baton-proxy").display().to_string();
    let mut args: Vec<&str> = vec!["--listen", "127.0.0.1:0", "--workers", &w, "--no-control"];
    args.extend_from_slice(baton_args);
    args.extend_from_slice(&["--", &proxy]);
    args.extend_from_slice(proxy_args);
    let mut b = Baton::start(&args, workers);
    for _ in 0..workers {
        b.find(Duration::from_secs(20), |l| {
            l.message().contains("ready: http mode")
        })
        .expect("the proxy worker says it is ready");
    }
    b
}

fn wait_line(b: &mut Baton, needle: &str) -> String {
    b.find(Duration::from_secs(10), |l| l.message().contains(needle))
        .unwrap_or_else(|| panic!("no log line with {needle:?}"))
        .message()
        .to_string()
}

// ---- tests --------------------------------------------------------------------

#[test]
fn keep_alive_reuses_upstream_connections_and_logs_each_request() {
    let up = Upstream::start(Kind::Echo);
    let mut b = start(1, &["--upstream", &up.arg()]);
    let mut c = Client::new(b.addr());
    for i in 0..50 {
        let r = c.get(&format!("/ka/{i}"));
        assert_eq!(r.status, 200);
        assert!(
            r.text().starts_with(&format!("GET /ka/{i} HTTP/1.1\r\n")),
            "{}",
            r.text()
        );
    }
    // New client connections, one request each, reuse the same upstream
    // connection too.
    for i in 0..50 {
        let r = one(
            b.addr(),
            format!("GET /new/{i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.field("connection").as_deref(), Some("close"));
    }
    assert_eq!(up.reqs(), 100);
    assert_eq!(
        up.conns(),
        1,
        "one upstream connection for 100 sequential requests"
    );
    let line = wait_line(&mut b, "\"GET /new/49 HTTP/1.1\"");
    assert!(
        line.contains(&format!("upstream {} status 200", up.arg())),
        "{line}"
    );
    for f in [
        "bytes_in 0",
        "bytes_out",
        "connect_ms -",
        "first_byte_ms",
        "total_ms",
    ] {
        assert!(line.contains(f), "{f} not in {line}");
    }
}

#[test]
fn stale_pooled_connections_are_retried_never_502() {
    let up = Upstream::start(Kind::CloseAfterEach);
    let b = start(1, &["--upstream", &up.arg()]);
    let mut bad = Vec::new();
    let mut c = Client::new(b.addr());
    for i in 0..300 {
        let r = if i % 2 == 0 {
            c.get(&format!("/s/{i}"))
        } else {
            one(
                b.addr(),
                format!("POST /s/{i} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
                    .as_bytes(),
            )
        };
        if r.status != 200 {
            bad.push((i, r.status));
        }
    }
    assert!(bad.is_empty(), "non-200 answers: {bad:?}");
    assert_eq!(up.reqs(), 300);
}

#[test]
fn forwarded_headers_as_the_upstream_saw_them() {
    let up = Upstream::start(Kind::Echo);
    let raw = b"GET /h HTTP/1.1\r\nHost: site.example:8080\r\nX-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Real-IP: 6.6.6.6\r\nConnection: keep-alive, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\nX-Kept: 1\r\n\r\n";
    {
        let b = start(1, &["--upstream", &up.arg(), "--x-real-ip"]);
        let r = one(b.addr(), raw);
        assert_eq!(r.status, 200);
        let seen = r.text();
        for gone in [
            "6.6.6.6",
            "X-Hop",
            "Keep-Alive",
            "TE:",
            "Proxy-Connection",
            "https",
            "Connection:",
        ] {
            assert!(!seen.contains(gone), "{gone} reached the upstream:\n{seen}");
        }
        for want in [
            "Host: site.example:8080\r\n",
            "X-Kept: 1\r\n",
            "X-Forwarded-For: 127.0.0.1\r\n",
            "X-Forwarded-Proto: http\r\n",
            "X-Forwarded-Host: site.example:8080\r\n",
            "Forwarded: for=127.0.0.1;host=\"site.example:8080\";proto=http\r\n",
            "X-Real-IP: 127.0.0.1\r\n",
            "Via: 1.1 baton\r\n",
        ] {
            assert!(seen.contains(want), "{want:?} not seen:\n{seen}");
        }
        assert_eq!(r.field("via").as_deref(), Some("1.1 baton"));
        assert_eq!(r.field("x-upstream").as_deref(), Some("yes"));
    }
    // A trusted peer's chain is extended; --host rewrites Host.
    let b = start(
        1,
        &[
            "--upstream",
            &up.arg(),
            "--trusted-proxy",
            "127.0.0.0/8",
            "--host",
            "inner.example",
        ],
    );
    let seen = one(b.addr(), raw).text();
    for want in [
        "Host: inner.example\r\n",
        "X-Forwarded-For: 6.6.6.6, 127.0.0.1\r\n",
        "X-Forwarded-Proto: https\r\n",
        "Forwarded: for=6.6.6.6, for=127.0.0.1;",
    ] {
        assert!(seen.contains(want), "{want:?} not seen:\n{seen}");
    }
}

#[test]
fn accept_proxy_gives_the_client_address() {
    let up = Upstream::start(Kind::Echo);
    let b = start(1, &["--upstream", &up.arg(), "--accept-proxy"]);
    let mut c = Client::new(b.addr());
    c.w.write_all(b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 80\r\n")
        .unwrap();
    let seen = c.get("/p").text();
    assert!(seen.contains("X-Forwarded-For: 203.0.113.9\r\n"), "{seen}");
}

#[test]
fn smuggling_attempts_are_refused() {
    let up = Upstream::start(Kind::Echo);
    let b = start(1, &["--upstream", &up.arg()]);
    let attempts: [(&[u8], u16); 9] = [
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\0b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\nGET /smuggled HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ];
    for (raw, status) in attempts {
        let mut c = Client::new(b.addr());
        let r = c.send(raw).expect("an answer");
        assert_eq!(r.status, status, "{:?}", String::from_utf8_lossy(raw));
        assert_eq!(r.field("connection").as_deref(), Some("close"));
        assert!(c.closed(), "the connection is closed after the refusal");
    }
    assert_eq!(up.reqs(), 0, "no refused request reached the upstream");
    // A bad chunk in the middle of a streamed body: the head went on, the
    // request is cut there (the upstream never sees a whole request).
    let mut c = Client::new(b.addr());
    c.w.write_all(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n\r\n",
    )
    .unwrap();
    let _ = read_response(&mut c.r);
    assert!(c.closed());
    // Upstream responses are held to the same rules (502).
    let bad_up = Upstream::start(Kind::Garbage);
    let b2 = start(1, &["--upstream", &bad_up.arg()]);
    assert_eq!(
        one(b2.addr(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").status,
        502
    );
    let body_limit = start(1, &["--upstream", &up.arg(), "--max-body-bytes", "10"]);
    let r = one(
        body_limit.addr(),
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n",
    );
    assert_eq!(r.status, 413);
}

#[test]
fn upstream_failures_answer_502_503_504_with_a_log_line() {
    let garbage = Upstream::start(Kind::Garbage);
    let silent = Upstream::start(Kind::SilentClose);
    let never = Upstream::start(Kind::Never);
    let cut = Upstream::start(Kind::Cut);
    let req = b"GET /f HTTP/1.1\r\nHost: x\r\n\r\n";
    for (up, status) in [(&garbage, 502), (&silent, 502), (&never, 504)] {
        let mut b = start(1, &["--upstream", &up.arg(), "--response-timeout", "300ms"]);
        let r = one(b.addr(), req);
        assert_eq!(r.status, status, "{:?}", r);
        assert!(r.text().contains(&format!("<h1>{status} ")), "{}", r.text());
        let line = wait_line(&mut b, &format!("answering {status}"));
        assert!(line.contains(&up.arg()), "names the upstream: {line}");
    }
    // Cut in the middle of the body: the head went out, so the client
    // sees the connection closed early.
    let b = start(1, &["--upstream", &cut.arg()]);
    let mut c = Client::new(b.addr());
    c.w.write_all(req).unwrap();
    assert!(
        read_response(&mut c.r).is_err(),
        "a cut body is not passed off as whole"
    );
    // Nobody listening: 502 while attempts fail, 503 once it is down.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut b = start(
        1,
        &[
            "--upstream",
            &dead,
            "--max-fails",
            "1",
            "--fail-backoff",
            "30s",
            "--fail-backoff-max",
            "30s",
        ],
    );
    assert_eq!(one(b.addr(), req).status, 502);
    let r = one(b.addr(), req);
    assert_eq!(r.status, 503);
    let line = wait_line(&mut b, "answering 503");
    assert!(line.contains("no upstream is up"), "{line}");
}

#[test]
fn balancing_spreads_and_health_flips_out_and_back() {
    let mut a = Upstream::start(Kind::Echo);
    let c = Upstream::start(Kind::Echo);
    let a_addr = a.addr;
    let mut b = start(
        2,
        &[
            "--upstream",
            &a.arg(),
            "--upstream",
            &c.arg(),
            "--balance",
            "round-robin",
            "--health-check",
            "http",
            "--health-interval",
            "100ms",
            "--health-timeout",
            "100ms",
        ],
    );
    let mut cl = Client::new(b.addr());
    for i in 0..40 {
        assert_eq!(cl.get(&format!("/rr/{i}")).status, 200);
    }
    // Probes count as requests too: compare the proxied ones.
    let (ra, rc) = (a.reqs(), c.reqs());
    assert!(ra >= 20 && rc >= 20, "spread: {ra} and {rc}");
    a.kill();
    let down = format!("upstream {a_addr} down");
    b.wait_until(Duration::from_secs(5), |l| l.message().starts_with(&down))
        .unwrap_or_else(|| panic!("no {down:?} line"));
    let before = c.reqs();
    let mut cl = Client::new(b.addr());
    for i in 0..20 {
        assert_eq!(
            cl.get(&format!("/down/{i}")).status,
            200,
            "no request fails while {a_addr} is down"
        );
    }
    assert!(c.reqs() - before >= 20);
    let a2 = Upstream::start_on(a_addr, Kind::Echo);
    let upl = format!("upstream {a_addr} up");
    b.wait_until(Duration::from_secs(5), |l| l.message().starts_with(&upl))
        .unwrap_or_else(|| panic!("no {upl:?} line"));
    let before = a2.reqs();
    let mut cl = Client::new(b.addr());
    for i in 0..20 {
        assert_eq!(cl.get(&format!("/back/{i}")).status, 200);
    }
    assert!(a2.reqs() - before >= 5, "the returned server serves again");
}

#[test]
fn large_bodies_stream_both_ways_intact() {
    const TOTAL: usize = 16 << 20;
    let up = Upstream::start(Kind::Echo);
    let b = start(1, &["--upstream", &up.arg()]);
    let mut body = vec![0u8; TOTAL];
    pattern(42, &mut body);
    let mut sum = FNV0;
    fnv(&mut sum, &body);
    let want = format!("body {TOTAL} {sum:016x}\n");
    // Content-Length upload.
    let mut c = Client::new(b.addr());
    let w = {
        let mut w = c.w.try_clone().unwrap();
        let body = body.clone();
        std::thread::spawn(move || {
            w.write_all(
                format!("PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: {TOTAL}\r\n\r\n")
                    .as_bytes(),
            )
            .unwrap();
            w.write_all(&body).unwrap();
        })
    };
    let r = read_response(&mut c.r).unwrap();
    w.join().unwrap();
    assert_eq!(r.status, 200);
    assert!(r.text().ends_with(&want), "{}", r.text());
    assert!(r.text().contains(&format!("Content-Length: {TOTAL}\r\n")));
    // Chunked upload, odd chunk sizes, on the same connection.
    let w = {
        let mut w = c.w.try_clone().unwrap();
        let body = body.clone();
        std::thread::spawn(move || {
            w.write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
                .unwrap();
            for part in body.chunks(100_003) {
                w.write_all(format!("{:x};ext=1\r\n", part.len()).as_bytes())
                    .unwrap();
                w.write_all(part).unwrap();
                w.write_all(b"\r\n").unwrap();
            }
            w.write_all(b"0\r\nX-Trailer: t\r\n\r\n").unwrap();
        })
    };
    let r = read_response(&mut c.r).unwrap();
    w.join().unwrap();
    assert_eq!(r.status, 200);
    assert!(r.text().ends_with(&want), "{}", r.text());
    assert!(r.text().contains("Transfer-Encoding: chunked\r\n"));
    // Chunked download.
    let r = c.get(&format!("/download/{TOTAL}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), TOTAL);
    let mut expect = vec![0u8; TOTAL];
    let mut seed = 7u32;
    for part in expect.chunks_mut(65536) {
        seed = pattern(seed, part);
    }
    assert!(r.body == expect, "the download arrives intact");
    // The same with Content-Length (spliced), twice on one connection.
    for _ in 0..2 {
        let r = c.get(&format!("/length/{TOTAL}"));
        assert_eq!((r.status, r.body.len()), (200, TOTAL));
        assert!(r.body == expect, "the spliced download arrives intact");
    }
    // An HTTP/1.0 client gets it unchunked, until close.
    let r = one(b.addr(), b"GET /download/100000 HTTP/1.0\r\n\r\n");
    assert_eq!((r.status, r.body.len()), (200, 100_000));
    assert_eq!(r.field("transfer-encoding"), None);
}

#[test]
fn expect_100_continue_is_answered() {
    let up = Upstream::start(Kind::Echo);
    let b = start(1, &["--upstream", &up.arg()]);
    let mut c = Client::new(b.addr());
    c.w.write_all(
        b"POST /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    )
    .unwrap();
    let mut line = String::new();
    c.r.read_line(&mut line).unwrap();
    assert_eq!(line, "HTTP/1.1 100 Continue\r\n");
    let mut empty = String::new();
    c.r.read_line(&mut empty).unwrap();
    c.w.write_all(b"hello").unwrap();
    let r = read_response(&mut c.r).unwrap();
    assert_eq!(r.status, 200);
    assert!(!r.text().contains("Expect"), "{}", r.text());
    assert!(r.text().contains("body 5 "), "{}", r.text());
}

#[test]
fn websocket_upgrade_becomes_a_tunnel() {
    let up = Upstream::start(Kind::WebSocket);
    let b = start(1, &["--upstream", &up.arg()]);
    let mut c = Client::new(b.addr());
    let r = c
        .send(b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .unwrap();
    assert_eq!(r.status, 101);
    assert_eq!(r.field("upgrade").as_deref(), Some("websocket"));
    for i in 0..20 {
        let msg = format!("frame {i} {}", "x".repeat(i * 100));
        c.w.write_all(msg.as_bytes()).unwrap();
        let mut back = vec![0u8; msg.len()];
        c.r.read_exact(&mut back).unwrap();
        assert_eq!(back, msg.as_bytes());
    }
    c.w.shutdown(Shutdown::Write).unwrap();
    assert!(c.closed(), "the upstream's close ends the tunnel");
}

#[test]
fn a_static_upstream_through_the_proxy() {
    let dir = common::tempdir("proxy-http-site");
    std::fs::write(dir.join("index.html"), "hello from baton-static\n").unwrap();
    let site = dir.display().to_string();
    let mut s = Baton::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--no-control",
            "--root",
            &site,
        ],
        1,
    );
    let _ = s.find(Duration::from_secs(5), |l| l.message() == "worker ready");
    let up = s.addr().to_string();
    let b = start(1, &["--upstream", &up]);
    let mut c = Client::new(b.addr());
    let started = Instant::now();
    for _ in 0..20 {
        let r = c.get("/index.html");
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "hello from baton-static\n");
    }
    assert_eq!(c.get("/missing").status, 404);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn send_proxy_connections_are_never_shared_between_clients() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let conns = Arc::new(AtomicUsize::new(0));
    {
        let conns = conns.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                conns.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut w = s.try_clone().unwrap();
                    let mut r = BufReader::new(s);
                    let mut proxy = String::new();
                    if r.read_line(&mut proxy).is_err() {
                        return;
                    }
                    while let Ok(Some(_)) = read_head(&mut r) {
                        let body = proxy.clone();
                        let _ = w.write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            )
                            .as_bytes(),
                        );
                    }
                });
            }
        });
    }
    let b = start(1, &["--upstream", &addr, "--send-proxy", "v1"]);
    let mut c1 = Client::new(b.addr());
    let mut c2 = Client::new(b.addr());
    for _ in 0..3 {
        for c in [&mut c1, &mut c2] {
            let r = c.get("/");
            assert!(
                r.text().starts_with("PROXY TCP4 127.0.0.1 127.0.0.1 "),
                "{}",
                r.text()
            );
        }
    }
    let p1 = c1.get("/").text();
    let p2 = c2.get("/").text();
    assert_ne!(p1, p2, "each client has its own upstream connection");
    assert_eq!(conns.load(Ordering::SeqCst), 2);
}

// ---- TLS in the proxy ---------------------------------------------------------

use common::pki::{client_config, have_openssl, pki};
use std::path::Path;

/// A rustls client connection to the proxy, trusting the test CA, with SNI
/// `localhost` and ALPN `h2, http/1.1` offered.
struct TlsClient {
    r: BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
}

impl TlsClient {
    fn new(dir: &Path, addr: SocketAddr) -> TlsClient {
        let config = client_config(dir, false, &[b"h2", b"http/1.1"]);
        let name = "localhost".try_into().expect("a server name");
        let conn = rustls::ClientConnection::new(config, name).expect("a TLS client");
        let sock = connect(addr).expect("connect to the proxy");
        TlsClient {
            r: BufReader::new(rustls::StreamOwned::new(conn, sock)),
        }
    }
    fn send(&mut self, raw: &[u8]) -> io::Result<Response> {
        self.r.get_mut().write_all(raw)?;
        self.r.get_mut().flush()?;
        read_response(&mut self.r)
    }
    fn get(&mut self, path: &str) -> Response {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
            .expect("a response over TLS")
    }
    fn alpn(&self) -> Option<Vec<u8>> {
        self.r.get_ref().conn.alpn_protocol().map(<[u8]>::to_vec)
    }
}

/// `baton --tls-cert localhost.crt --tls-key localhost.key -- baton-proxy
/// ARGS`, as issue 13 writes it (on a free port).
fn start_tls(dir: &Path, workers: usize, proxy_args: &[&str]) -> Baton {
    let (cert, key) = tls_args(dir);
    start_with(
        workers,
        &["--tls-cert", &cert, "--tls-key", &key],
        proxy_args,
    )
}

fn tls_args(dir: &Path) -> (String, String) {
    (
        dir.join("localhost.crt").display().to_string(),
        dir.join("localhost.key").display().to_string(),
    )
}

#[test]
fn tls_ends_in_the_proxy_and_the_upstream_is_told_https() {
    if !have_openssl("tls_ends_in_the_proxy_and_the_upstream_is_told_https") {
        return;
    }
    let dir = pki(&["localhost"]);
    let up = Upstream::start(Kind::Echo);
    let mut b = start_tls(&dir, 1, &["--upstream", &up.arg()]);
    wait_line(&mut b, "TLS: handshakes signed by baton's key process");
    // curl, as the issue writes it.
    let port = b.addr().port();
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(dir.join("ca.crt"))
        .arg("--resolve")
        .arg(format!("localhost:{port}:127.0.0.1"))
        .arg(format!("https://localhost:{port}/seen"))
        .output()
        .expect("run curl");
    let seen = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "GET /seen HTTP/1.1\r\n",
        "X-Forwarded-Proto: https\r\n",
        ";proto=https\r\n",
    ] {
        assert!(seen.contains(want), "{want:?} not seen:\n{seen}");
    }
    // A Rust client: ALPN picks http/1.1; one TLS connection carries many
    // requests, over one upstream connection.
    let mut c = TlsClient::new(&dir, b.addr());
    for i in 0..50 {
        let r = c.get(&format!("/r{i}"));
        assert_eq!(r.status, 200, "{}", r.head);
        assert!(r.text().starts_with(&format!("GET /r{i} HTTP/1.1")));
    }
    assert_eq!(c.alpn().as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(up.reqs(), 51);
    assert_eq!(up.conns(), 1, "the upstream connection is reused");
    // A client that claims it came over http is not believed.
    let r = c
        .send(b"GET /claim HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-Proto: http\r\n\r\n")
        .unwrap();
    assert!(
        r.text().contains("X-Forwarded-Proto: https\r\n"),
        "{}",
        r.text()
    );
    assert!(
        !r.text().contains("X-Forwarded-Proto: http\r\n"),
        "{}",
        r.text()
    );
}

#[test]
fn large_bodies_and_tunnels_over_tls_arrive_intact() {
    if !have_openssl("large_bodies_and_tunnels_over_tls_arrive_intact") {
        return;
    }
    const TOTAL: usize = 16 << 20;
    let dir = pki(&["localhost"]);
    let up = Upstream::start(Kind::Echo);
    let b = start_tls(&dir, 1, &["--upstream", &up.arg()]);
    let mut body = vec![0u8; TOTAL];
    pattern(42, &mut body);
    let mut sum = FNV0;
    fnv(&mut sum, &body);
    let want = format!("body {TOTAL} {sum:016x}\n");
    let mut c = TlsClient::new(&dir, b.addr());
    // A Content-Length upload (spliced past the replay window without TLS).
    let mut raw =
        format!("PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: {TOTAL}\r\n\r\n").into_bytes();
    raw.extend_from_slice(&body);
    let r = c.send(&raw).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.text().ends_with(&want), "{}", r.text());
    // Downloads, chunked and Content-Length (spliced without TLS).
    let mut expect = vec![0u8; TOTAL];
    let mut seed = 7u32;
    for part in expect.chunks_mut(65536) {
        seed = pattern(seed, part);
    }
    for path in ["/download", "/length", "/length"] {
        let r = c.get(&format!("{path}/{TOTAL}"));
        assert_eq!((r.status, r.body.len()), (200, TOTAL), "{path}");
        assert!(r.body == expect, "{path}: the download arrives intact");
    }
    // A WebSocket tunnel through TLS.
    let ws = Upstream::start(Kind::WebSocket);
    let b = start_tls(&dir, 1, &["--upstream", &ws.arg()]);
    let mut c = TlsClient::new(&dir, b.addr());
    let r = c
        .send(b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .unwrap();
    assert_eq!(r.status, 101);
    for i in 0..20 {
        let msg = format!("frame {i} {}", "x".repeat(i * 1000));
        c.r.get_mut().write_all(msg.as_bytes()).unwrap();
        let mut back = vec![0u8; msg.len()];
        c.r.read_exact(&mut back).unwrap();
        assert_eq!(back, msg.as_bytes());
    }
}

#[test]
fn plaintext_garbage_and_stalled_handshakes_on_the_tls_port_are_closed() {
    if !have_openssl("plaintext_garbage_and_stalled_handshakes_on_the_tls_port_are_closed") {
        return;
    }
    let dir = pki(&["localhost"]);
    let up = Upstream::start(Kind::Echo);
    let mut b = start_tls(
        &dir,
        1,
        &["--upstream", &up.arg(), "--tls-handshake-timeout", "1s"],
    );
    // Plain HTTP: told, in plain HTTP, to use https.
    let r = one(b.addr(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(r.status, 400);
    assert!(r.text().contains("use https://"), "{}", r.text());
    wait_line(&mut b, "the client sent plaintext HTTP");
    // Bytes that are not TLS: closed, no HTTP answer.
    let mut s = connect(b.addr()).unwrap();
    s.write_all(&[0u8; 64]).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(!got.starts_with(b"HTTP/"), "{got:?}");
    // A client that opens and says nothing is closed at the deadline.
    let t0 = Instant::now();
    let mut s = connect(b.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let n = s.read(&mut [0u8; 16]).unwrap_or(0);
    assert_eq!(n, 0, "closed without a byte");
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    wait_line(
        &mut b,
        "TLS handshake not finished within --tls-handshake-timeout 1s",
    );
    // Nothing reached the upstream, and the worker still serves.
    assert_eq!(up.reqs(), 0);
    let mut c = TlsClient::new(&dir, b.addr());
    assert_eq!(c.get("/after").status, 200);
}

#[test]
fn tcp_mode_terminates_tls_and_relays_the_bytes_untouched() {
    if !have_openssl("tcp_mode_terminates_tls_and_relays_the_bytes_untouched") {
        return;
    }
    let dir = pki(&["localhost"]);
    let up = Upstream::start(Kind::Echo);
    let proxy = bin("baton-proxy").display().to_string();
    let (cert, key) = tls_args(&dir);
    let up_arg = up.arg();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--no-control",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--",
        &proxy,
        "--mode",
        "tcp",
        "--upstream",
        &up_arg,
    ];
    let mut b = Baton::start(&args, 1);
    wait_line(&mut b, "ready: tcp mode");
    wait_line(&mut b, "TLS: handshakes signed by baton's key process");
    // The request goes through as the client wrote it: TCP mode adds no
    // forwarded header, and offers no ALPN (the client's offer of h2 and
    // http/1.1 is ignored, not refused).
    let mut c = TlsClient::new(&dir, b.addr());
    let r = c.get("/seen");
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(
        r.text().starts_with("GET /seen HTTP/1.1\r\n"),
        "{}",
        r.text()
    );
    assert!(!r.text().contains("X-Forwarded-Proto"), "{}", r.text());
    assert_eq!(c.alpn(), None);
    assert_eq!(c.get("/again").status, 200, "the same TLS connection");
}

#[test]
fn a_tls_client_that_half_closes_after_its_request_gets_the_whole_response() {
    if !have_openssl("a_tls_client_that_half_closes_after_its_request_gets_the_whole_response") {
        return;
    }
    let dir = pki(&["localhost"]);
    let up = Upstream::start(Kind::Echo);
    let mut b = start_tls(&dir, 1, &["--upstream", &up.arg()]);
    // Sizes around what the kernel's socket buffers hold: the proxy is done
    // with the upstream while the end of the response still waits in the
    // worker (rustls's buffer, `out`) for a client that reads later.
    for n in [1usize << 20, 3 << 20, 4 << 20, 4_200_000, 5 << 20] {
        let mut c = TlsClient::new(&dir, b.addr());
        c.r.get_mut()
            .write_all(format!("GET /length/{n} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        c.r.get_mut().flush().unwrap();
        c.r.get_ref().sock.shutdown(Shutdown::Write).unwrap();
        // The proxy has the whole response from the upstream (logged) before
        // the client reads a byte, when the buffers hold enough of it.
        let line = format!("\"GET /length/{n} HTTP/1.1\"");
        let _ = b.find(Duration::from_secs(5), |l| l.message().contains(&line));
        let r = read_response(&mut c.r).expect("the response");
        assert_eq!((r.status, r.body.len()), (200, n), "{n}-byte body");
        let mut expect = vec![0u8; n];
        let mut seed = 7u32;
        for part in expect.chunks_mut(65536) {
            seed = pattern(seed, part);
        }
        assert!(r.body == expect, "{n}-byte body intact");
    }
}
