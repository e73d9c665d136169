//! Fuzz target: baton-static's request head parsing, the bytes any TCP
//! client sends. The worker's own connection code (`Conn::drive`, which
//! parses with `baton-http` and answers with `http::respond`) is driven in
//! process over a real loopback socket, on the embedded demo site and on a
//! test directory.
//!
//! Properties, for any bytes a client sends and then closes:
//! * no panic, no hang: the connection is closed within a few seconds;
//! * a head `baton-http` refuses is answered with the status its error
//!   names and the connection closes (a head that fills the whole buffer,
//!   `--max-header-bytes`, without ending is 414 or 431); an incomplete
//!   head cut short by the client gets no answer;
//! * a complete head gets a well-formed response; a method other than
//!   GET/HEAD is 405/501 (or 413, for a body over the limit);
//! * nothing outside the root is ever served;
//! * memory stays bounded: the connection's allocations never exceed the
//!   fixed read buffer and output high-water mark, however much a client
//!   sends (a 4 MiB head is refused after its first kilobyte).

#[path = "../../../tests/fuzzing/mod.rs"]
mod fuzzing;
mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use baton_static::config::Config;
use baton_static::conn::{Conn, Io, Next, HIGH_WATER};
use baton_static::fs::Root;
use baton_static::http::{DateCache, Shared};
use baton_static::site::{Demo, Site};
use clap::Parser;
use proptest::prelude::*;
use support::{TestRoot, SECRET};

/// The read buffer's size in these tests (the smallest allowed is 512).
const MAX_HEAD: usize = 1024;

// --- Allocation accounting, per thread --------------------------------

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let v = live.get() + delta;
        live.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// bookkeeping only touches const-initialised thread-locals (no allocation).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: same contract as ours, passed through.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            note(l.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: same contract as ours, passed through.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            note(l.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from this allocator (System underneath) with `l`.
        unsafe { System.dealloc(p, l) };
        note(-(l.size() as isize));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: `p` came from this allocator (System underneath) with `l`.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            note(new as isize - l.size() as isize);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Bytes allocated on this thread while `f` ran, at most (peak over start).
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let r = f();
    let peak = PEAK.with(Cell::get);
    (r, (peak - start).max(0) as usize)
}

// --- The server under test --------------------------------------------

struct Server {
    cfg: Config,
    demo: Site,
    dir: Site,
    date: DateCache,
    listener: TcpListener,
    _root: TestRoot,
}

impl Server {
    fn new() -> Server {
        let root = TestRoot::new("fuzz");
        let cfg = Config::try_parse_from([
            "baton-static",
            "--demo",
            "--access-log",
            "off",
            "--max-header-bytes",
            &MAX_HEAD.to_string(),
        ])
        .expect("config");
        let dir = Site::Dir(Root::open(&root.www).expect("root"));
        Server {
            cfg,
            demo: Site::Demo(Demo::new(1, 1)),
            dir,
            date: DateCache::default(),
            listener: TcpListener::bind("127.0.0.1:0").expect("bind"),
            _root: root,
        }
    }
}

/// What the client saw.
#[derive(Debug)]
struct Outcome {
    response: Vec<u8>,
    /// Allocation peak of the connection's work, in bytes.
    peak: usize,
}

/// Sends `input` on a fresh connection, closes the sending side, and drives
/// the worker's side until it closes the connection.
fn exchange(s: &Server, demo: bool, input: &[u8]) -> Result<Outcome, String> {
    let sh = Shared {
        cfg: &s.cfg,
        site: if demo { &s.demo } else { &s.dir },
        date: &s.date,
    };
    let mut client =
        TcpStream::connect(s.listener.local_addr().unwrap()).map_err(|e| e.to_string())?;
    let (server, peer) = s.listener.accept().map_err(|e| e.to_string())?;
    server.set_nonblocking(true).unwrap();
    client.set_nonblocking(true).unwrap();
    let mut io = Io::new(&s.cfg);
    let mut response = Vec::new();
    let mut written = 0;
    let mut fin = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    let (closed, peak) = peak_during(|| {
        let mut conn = Conn::new(
            1,
            mio::net::TcpStream::from_std(server),
            peer,
            Instant::now(),
        );
        loop {
            if Instant::now() > deadline {
                return false;
            }
            while written < input.len() {
                match client.write(&input[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    // The worker closed early; what it answered is readable.
                    Err(_) => written = input.len(),
                }
            }
            if written == input.len() && !fin {
                let _ = client.shutdown(Shutdown::Write);
                fin = true;
            }
            io.now = Instant::now();
            conn.ready(true, fin);
            let next = conn.drive(&sh, &mut io);
            read_available(&mut client, &mut response);
            match next {
                Next::Close => {
                    conn.close(&mut io);
                    return true;
                }
                Next::Again => {}
                Next::Wait => std::thread::sleep(Duration::from_micros(200)),
            }
        }
    });
    if !closed {
        return Err(format!(
            "no close within 10 s; answered so far: {response:?}"
        ));
    }
    // Whatever is still in flight, then the FIN.
    client.set_nonblocking(false).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    match client.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => return Err(format!("no EOF after close: {e}")),
    }
    response.extend_from_slice(&rest);
    Ok(Outcome { response, peak })
}

fn read_available(c: &mut TcpStream, into: &mut Vec<u8>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => into.extend_from_slice(&buf[..n]),
            Err(_) => return,
        }
    }
}

/// The first response's status and whether it says `Connection: close`.
fn first_status(resp: &[u8]) -> Option<(u16, bool)> {
    let limits = baton_http::Limits::default();
    let mut fields = limits.fields();
    let r = baton_http::parse_response(resp, &limits, &mut fields).ok()??;
    Some((r.status, !r.keep_alive))
}

/// The properties, given what `baton-http` makes of the bytes the worker can
/// hold (its buffer is `MAX_HEAD` bytes).
fn check(s: &Server, demo: bool, input: &[u8]) -> Result<(), TestCaseError> {
    let out = exchange(s, demo, input).map_err(TestCaseError::fail)?;
    let resp = &out.response;
    let text = String::from_utf8_lossy(resp);
    // Bounded: the read buffer, the output high-water mark and what one
    // response may add past it (the demo page, a small file), not the input.
    prop_assert!(
        out.peak <= MAX_HEAD + HIGH_WATER + 128 * 1024,
        "{} bytes allocated for a {}-byte input",
        out.peak,
        input.len()
    );
    prop_assert!(!text.contains(SECRET), "served the secret");
    let limits = s.cfg.limits();
    let mut fields = limits.fields();
    let first = first_status(resp);
    match baton_http::parse_request(input, &limits, &mut fields) {
        Err(e) => {
            prop_assert_eq!(
                first,
                Some((e.status(), true)),
                "{:?} answered {:?}",
                e,
                text
            );
        }
        Ok(None) => {
            prop_assert!(resp.is_empty(), "answered an incomplete head: {:?}", text);
        }
        Ok(Some(req)) => {
            let Some((status, _)) = first else {
                return Err(TestCaseError::fail(format!("no response: {text:?}")));
            };
            prop_assert!((200..600).contains(&status), "{}", status);
            if req.method != "GET" && req.method != "HEAD" {
                prop_assert!(
                    [405, 413, 501].contains(&status),
                    "{} answered {}",
                    req.method,
                    status
                );
            }
        }
    }
    Ok(())
}

fn seeds() -> Vec<Vec<u8>> {
    [
        "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "HEAD /index.html HTTP/1.0\r\n\r\n",
        "GET /hello.txt HTTP/1.1\r\nHost: a\r\nRange: bytes=0-3\r\nIf-None-Match: \"abc\", W/\"x\"\r\nConnection: keep-alive\r\n\r\n",
        "GET /sub/ HTTP/1.1\r\nHost: a\r\nIf-Modified-Since: Thu, 01 Jan 1970 00:00:00 GMT\r\n\r\nGET /style.css HTTP/1.1\r\nHost: a\r\n\r\n",
        "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET /%2e%2e/secret.txt?q=1 HTTP/1.1\r\nHost: a\r\nIf-Range: Wed, 21 Oct 2015 07:28:00 GMT\r\nRange: bytes=-5\r\n\r\n",
        "GET /link-out HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        "GET http://test/sub HTTP/1.1\r\nHost: a\r\nIf-Match: *\r\nIf-Unmodified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\n",
        "GET /with%20space.txt HTTP/1.1\r\nHost: a\r\nRange: bytes=2-,0-1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        "POST /hello.txt HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: 1\r\n\r\nGET /style.css HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET / HTTP/1.2\r\nHost: [::1]:80\r\nContent-Length: 3, 3\r\nExpect: 100-continue\r\n\r\nabcHEAD / HTTP/1.0\r\n\r\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

#[test]
fn mutated_requests_are_answered_or_refused() {
    let s = Server::new();
    fuzzing::run(
        "static-mutated",
        1500,
        (fuzzing::mutated(seeds(), 3), any::<bool>()),
        |(input, demo)| check(&s, demo, &input),
    );
}

#[test]
fn arbitrary_bytes_are_refused_cleanly() {
    let s = Server::new();
    let input = prop_oneof![
        3 => fuzzing::bytes(0..300),
        1 => fuzzing::bytes(MAX_HEAD - 8..MAX_HEAD + 64),
        // A valid start, then anything.
        2 => fuzzing::bytes(0..200).prop_map(|tail| {
            let mut v = b"GET / HTTP/1.1\r\n".to_vec();
            v.extend_from_slice(&tail);
            v
        }),
    ];
    fuzzing::run(
        "static-bytes",
        800,
        (input, any::<bool>()),
        |(input, demo)| check(&s, demo, &input),
    );
}

/// Heads of every size around and far past the limit: long request lines,
/// many or long header fields, with or without their end.
#[test]
fn oversized_heads_are_refused_not_buffered() {
    let s = Server::new();
    let head = (
        0usize..3,
        1usize..8 * MAX_HEAD,
        any::<bool>(),
        prop_oneof![Just(1usize), Just(64), Just(200)],
    )
        .prop_map(|(shape, size, end, fields)| {
            let mut v = match shape {
                0 => format!("GET /{} HTTP/1.1\r\n", "a".repeat(size)).into_bytes(),
                1 => {
                    let mut h = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
                    for i in 0..fields {
                        h.extend_from_slice(
                            format!("X-{i}: {}\r\n", "v".repeat(size / fields)).as_bytes(),
                        );
                    }
                    h
                }
                _ => {
                    let mut h = b"GET / HTTP/1.1\r\nHost: a\r\nX: ".to_vec();
                    h.resize(h.len() + size, b'z');
                    h
                }
            };
            if end {
                v.extend_from_slice(b"\r\n\r\n");
            }
            v
        });
    fuzzing::run(
        "static-oversized",
        400,
        (head, any::<bool>()),
        |(input, demo)| check(&s, demo, &input),
    );
}

/// A client sending a 4 MiB head: refused once the buffer is full, and the
/// worker's memory does not grow with it.
#[test]
fn an_endless_head_costs_one_buffer() {
    let s = Server::new();
    for line_ends in [false, true] {
        let mut input = b"GET /".to_vec();
        if line_ends {
            input.extend_from_slice(b" HTTP/1.1\r\nX-Long: ");
        }
        input.resize(4 << 20, b'a');
        let out = exchange(&s, true, &input).expect("exchange");
        let want = if line_ends { 431 } else { 414 };
        assert_eq!(first_status(&out.response), Some((want, true)));
        assert!(
            out.peak < 8 * 1024,
            "{} bytes allocated for a 4 MiB head",
            out.peak
        );
    }
}
