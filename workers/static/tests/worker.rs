//! baton-static driven by a fake acceptor (see `support/fake.rs`): the
//! worker's HTTP behaviour and its side of the handoff protocol, tested
//! without the real acceptor.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::client::{self, request_bytes, Client};
use support::fake::Fake;
use support::{TestRoot, SECRET};

const WAIT: Duration = Duration::from_secs(20);

fn start(root: &TestRoot, extra: &[&str]) -> Fake {
    let mut args = vec!["--root", root.www()];
    args.extend_from_slice(extra);
    Fake::start(&args)
}

#[test]
fn serves_files_with_the_expected_headers() {
    let root = TestRoot::new("headers");
    let w = start(&root, &[]);
    let r = client::get(w.addr, "/hello.txt", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"hello, world\n");
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(r.header("content-length"), Some("13"));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    let date = r.header("date").expect("Date");
    assert!(httpdate_like(date), "{date}");
    let lm = r.header("last-modified").expect("Last-Modified");
    assert!(httpdate_like(lm), "{lm}");
    let etag = r.header("etag").expect("ETag");
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    assert_eq!(r.version, "HTTP/1.1");
    assert!(!r.closes());

    let r = client::get(w.addr, "/style.css", &[]);
    assert_eq!(r.header("content-type"), Some("text/css"));
    let r = client::get(w.addr, "/sub/data.json", &[]);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let r = client::get(w.addr, "/with%20space.txt", &[]);
    assert_eq!((r.status, r.text().as_str()), (200, "spaced\n"));
    let r = client::get(w.addr, "/link-in", &[]);
    assert_eq!((r.status, r.text().as_str()), (200, "hello, world\n"));
    let r = client::get(w.addr, "/hello.txt?x=1&y=2", &[]);
    assert_eq!(r.status, 200);
    // Absolute-form targets are accepted.
    let r = client::get(w.addr, "http://test/hello.txt", &[]);
    assert_eq!(r.status, 200);
}

fn httpdate_like(s: &str) -> bool {
    s.len() == 29 && s.ends_with(" GMT") && s.as_bytes()[3] == b','
}

#[test]
fn head_has_headers_but_no_body() {
    let root = TestRoot::new("head");
    let w = start(&root, &[]);
    let mut c = Client::connect(w.addr);
    let h = c.request("HEAD", "/big.bin", &[]);
    assert_eq!(h.status, 200);
    assert_eq!(
        h.header("content-length").unwrap(),
        root.big.len().to_string()
    );
    assert!(h.body.is_empty());
    // If a body had been sent, it would be read as the next response.
    let g = c.get("/hello.txt");
    assert_eq!((g.status, g.text().as_str()), (200, "hello, world\n"));
    let h = c.request("HEAD", "/missing", &[]);
    assert_eq!(h.status, 404);
    let g = c.get("/hello.txt");
    assert_eq!(g.status, 200);
}

#[test]
fn keep_alive_follows_version_and_connection_header() {
    let root = TestRoot::new("keepalive");
    let w = start(&root, &[]);
    // HTTP/1.1: kept open by default, for many requests.
    let mut c = Client::connect(w.addr);
    for _ in 0..5 {
        let r = c.get("/hello.txt");
        assert_eq!(r.status, 200);
        assert!(!r.closes());
    }
    // Connection: close is honoured.
    let r = c.request("GET", "/hello.txt", &["Connection: close"]);
    assert!(r.closes());
    assert!(c.read_to_eof().unwrap().is_empty());

    // HTTP/1.0: closed by default...
    let mut c = Client::connect(w.addr);
    c.send(b"GET /hello.txt HTTP/1.0\r\n\r\n");
    let r = c.read(false).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.closes());
    assert!(c.read_to_eof().unwrap().is_empty());
    // ...kept open when asked.
    let mut c = Client::connect(w.addr);
    for _ in 0..3 {
        c.send(b"GET /hello.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        let r = c.read(false).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), Some("keep-alive"));
    }
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let root = TestRoot::new("pipeline");
    let w = start(&root, &[]);
    let mut c = Client::connect(w.addr);
    let mut batch = Vec::new();
    let paths = [
        "/hello.txt",
        "/big.bin",
        "/missing",
        "/sub/",
        "/big.bin",
        "/style.css",
    ];
    for p in paths {
        batch.extend(request_bytes("GET", p, &[]));
    }
    batch.extend(request_bytes("HEAD", "/hello.txt", &[]));
    // One write: every request arrives at once.
    c.send(&batch);
    let expect: [(u16, Option<&[u8]>); 6] = [
        (200, Some(b"hello, world\n")),
        (200, Some(&root.big)),
        (404, None),
        (200, Some(b"<p>sub</p>\n")),
        (200, Some(&root.big)),
        (200, Some(b"body { color: red }\n")),
    ];
    for (i, (status, body)) in expect.iter().enumerate() {
        let r = c.read(false).unwrap();
        assert_eq!(r.status, *status, "response {i} ({})", paths[i]);
        if let Some(b) = body {
            assert!(r.body == *b, "body of response {i} ({})", paths[i]);
        }
    }
    let r = c.read(true).unwrap();
    assert_eq!(r.header("content-length"), Some("13"));
    // And the connection is still usable.
    assert_eq!(c.get("/hello.txt").status, 200);
}

#[test]
fn request_bodies_are_skipped_between_pipelined_requests() {
    let root = TestRoot::new("body");
    let w = start(&root, &[]);
    let mut c = Client::connect(w.addr);
    c.send(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nABCDEGET /style.css HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(c.read(false).unwrap().text(), "hello, world\n");
    assert_eq!(c.read(false).unwrap().text(), "body { color: red }\n");
}

#[test]
fn conditional_requests() {
    let root = TestRoot::new("cond");
    let w = start(&root, &[]);
    let mut c = Client::connect(w.addr);
    let r = c.get("/hello.txt");
    let etag = r.header("etag").unwrap().to_owned();
    let lm = r.header("last-modified").unwrap().to_owned();

    let inm = format!("If-None-Match: {etag}");
    let r = c.request("GET", "/hello.txt", &[&inm]);
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    assert_eq!(r.header("etag"), Some(etag.as_str()));
    assert!(r.header("content-length").is_none());
    // Weak comparison, lists and `*`.
    let weak = format!("If-None-Match: \"nope\", W/{etag}");
    assert_eq!(c.request("GET", "/hello.txt", &[&weak]).status, 304);
    assert_eq!(
        c.request("GET", "/hello.txt", &["If-None-Match: *"]).status,
        304
    );
    let r = c.request("GET", "/hello.txt", &["If-None-Match: \"other\""]);
    assert_eq!((r.status, r.text().as_str()), (200, "hello, world\n"));
    // HEAD too.
    assert_eq!(c.request("HEAD", "/hello.txt", &[&inm]).status, 304);

    let ims = format!("If-Modified-Since: {lm}");
    assert_eq!(c.request("GET", "/hello.txt", &[&ims]).status, 304);
    let old = "If-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT";
    assert_eq!(c.request("GET", "/hello.txt", &[old]).status, 200);
    assert_eq!(
        c.request("GET", "/hello.txt", &["If-Modified-Since: garbage"])
            .status,
        200
    );
    // If-None-Match wins over If-Modified-Since.
    assert_eq!(
        c.request("GET", "/hello.txt", &["If-None-Match: \"other\"", &ims])
            .status,
        200
    );
    // If-Match / If-Unmodified-Since.
    let im = format!("If-Match: {etag}");
    assert_eq!(c.request("GET", "/hello.txt", &[&im]).status, 200);
    assert_eq!(
        c.request("GET", "/hello.txt", &["If-Match: \"x\""]).status,
        412
    );
    let ius = "If-Unmodified-Since: Sun, 06 Nov 1994 08:49:37 GMT";
    assert_eq!(c.request("GET", "/hello.txt", &[ius]).status, 412);

    // A changed file has a new tag.
    std::fs::write(root.path("hello.txt"), "hello, again\n").unwrap();
    let r = c.request("GET", "/hello.txt", &[&inm]);
    assert_eq!((r.status, r.text().as_str()), (200, "hello, again\n"));
}

#[test]
fn single_ranges() {
    let root = TestRoot::new("range");
    let w = start(&root, &[]);
    let size = root.big.len();
    let mut c = Client::connect(w.addr);
    let r = c.request("GET", "/big.bin", &["Range: bytes=0-0"]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &root.big[..1]);
    assert_eq!(
        r.header("content-range").unwrap(),
        format!("bytes 0-0/{size}")
    );
    // Suffix.
    let r = c.request("GET", "/big.bin", &["Range: bytes=-100"]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &root.big[size - 100..]);
    assert_eq!(
        r.header("content-range").unwrap(),
        format!("bytes {}-{}/{size}", size - 100, size - 1)
    );
    // Open-ended, large enough for sendfile, from an odd offset.
    let r = c.request("GET", "/big.bin", &["Range: bytes=1001-"]);
    assert_eq!(r.status, 206);
    assert!(r.body == root.big[1001..]);
    // End past the end is clamped.
    let r = c.request(
        "GET",
        "/big.bin",
        &[&format!("Range: bytes=10-{}", size * 2)],
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.body.len(), size - 10);
    // Past the end: 416 with the size.
    let r = c.request("GET", "/big.bin", &[&format!("Range: bytes={size}-")]);
    assert_eq!(r.status, 416);
    assert_eq!(
        r.header("content-range").unwrap(),
        format!("bytes */{size}")
    );
    // Invalid or multiple ranges: the whole file.
    for h in [
        "Range: bytes=5-1",
        "Range: bytes=0-1,5-6",
        "Range: lines=1-2",
    ] {
        let r = c.request("GET", "/hello.txt", &[h]);
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "hello, world\n"),
            "{h}"
        );
    }
    // If-Range: current tag → range; stale tag or date → whole file.
    let etag = c.get("/hello.txt").header("etag").unwrap().to_owned();
    let r = c.request(
        "GET",
        "/hello.txt",
        &["Range: bytes=0-4", &format!("If-Range: {etag}")],
    );
    assert_eq!((r.status, r.text().as_str()), (206, "hello"));
    let r = c.request(
        "GET",
        "/hello.txt",
        &["Range: bytes=0-4", "If-Range: \"stale\""],
    );
    assert_eq!(r.status, 200);
    // HEAD ignores Range.
    let r = c.request("HEAD", "/hello.txt", &["Range: bytes=0-4"]);
    assert_eq!(r.status, 200);
}

#[test]
fn directories_serve_index_and_redirect_without_slash() {
    let root = TestRoot::new("dirs");
    let w = start(&root, &[]);
    let r = client::get(w.addr, "/", &[]);
    assert_eq!((r.status, r.text().as_str()), (200, "<h1>home</h1>\n"));
    assert_eq!(r.header("content-type"), Some("text/html"));
    let r = client::get(w.addr, "/sub/", &[]);
    assert_eq!((r.status, r.text().as_str()), (200, "<p>sub</p>\n"));
    let r = client::get(w.addr, "/sub", &[]);
    assert_eq!(r.status, 301);
    assert_eq!(r.header("location"), Some("/sub/"));
    let r = client::get(w.addr, "/sub?a=b", &[]);
    assert_eq!(r.header("location"), Some("/sub/?a=b"));
    // Never an open redirect to another host.
    let r = client::get(w.addr, "//sub", &[]);
    assert_eq!(r.header("location"), Some("/sub/"));
    let r = client::get(w.addr, "/noindex/", &[]);
    assert_eq!(r.status, 404);
}

#[test]
fn traversal_never_leaks_anything_outside_the_root() {
    let root = TestRoot::new("traversal");
    let w = start(&root, &[]);
    for target in [
        "/../secret.txt",
        "/sub/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E%2Fsecret.txt",
        "/sub/..%2f..%2fsecret.txt",
        "/sub%2f..%2f..%2fsecret.txt",
        "/.%2e/secret.txt",
        "//../secret.txt",
        "/..%5csecret.txt",
        "/secret.txt%00.html",
        "/link-out",
        "/link-abs",
        "/link-out/",
        "http://test/../secret.txt",
        "../secret.txt",
        "/proc/self/root/etc/passwd",
    ] {
        let r = client::raw(w.addr, &request_bytes("GET", target, &[]));
        assert_ne!(r.status, 200, "{target}");
        assert!(!r.text().contains("SECRET"), "{target} leaked");
        assert!(!r.text().contains("root:"), "{target} leaked");
    }
    let _ = SECRET;
}

#[test]
fn error_statuses() {
    let root = TestRoot::new("errors");
    let w = start(&root, &[]);
    let a = w.addr;
    let big_header = format!("X-Big: {}", "a".repeat(20_000));
    let r = client::raw(a, &request_bytes("GET", "/hello.txt", &[&big_header]));
    assert_eq!(r.status, 431);
    assert!(r.closes());
    let many: Vec<String> = (0..120).map(|i| format!("X-H{i}: v")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(
        client::raw(a, &request_bytes("GET", "/", &many)).status,
        431
    );
    let long = format!("/{}", "a".repeat(20_000));
    assert_eq!(
        client::raw(a, &request_bytes("GET", &long, &[])).status,
        414
    );
    let long = format!("/{}", "a".repeat(9_000));
    assert_eq!(
        client::raw(a, &request_bytes("GET", &long, &[])).status,
        414
    );
    assert_eq!(client::raw(a, b"GARBAGE\r\n\r\n").status, 400);
    assert_eq!(
        client::raw(a, b"GET /hello.txt HTTP/1.1\r\n\r\n").status,
        400,
        "no Host"
    );
    assert_eq!(
        client::raw(a, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").status,
        400
    );
    let r = client::raw(
        a,
        &request_bytes("POST", "/hello.txt", &["Content-Length: 3"]),
    );
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    let r = client::raw(a, &request_bytes("BREW", "/pot", &[]));
    assert_eq!(r.status, 501);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    assert_eq!(
        client::raw(a, b"GET / HTTP/2.0\r\nHost: x\r\n\r\n").status,
        505
    );
    // A chunked body is decoded and skipped (more in framing.rs).
    assert_eq!(
        client::raw(
            a,
            b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        .status,
        200
    );
    assert_eq!(
        client::raw(
            a,
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
        )
        .status,
        400
    );
    assert_eq!(client::get(a, "/missing.txt", &[]).status, 404);
    assert_eq!(client::get(a, "/hello.txt/x", &[]).status, 404);
    assert_eq!(client::get(a, "/fifo", &[]).status, 403);
    assert_eq!(client::get(a, "/bad%zz", &[]).status, 400);
    // The worker is still fine.
    assert_eq!(client::get(a, "/hello.txt", &[]).status, 200);
}

#[test]
fn large_file_survives_a_slow_reader() {
    let root = TestRoot::new("slowreader");
    let w = start(&root, &[]);
    let s = TcpStream::connect(w.addr).unwrap();
    // A tiny receive window: the worker's sendfile hits EAGAIN and partial
    // sends over and over, and must resume at the right offset each time.
    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBuf, &32768).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut c = Client {
        reader: std::io::BufReader::with_capacity(1024, s),
    };
    c.send(&request_bytes("GET", "/big.bin", &[]));
    let mut got = Vec::with_capacity(root.big.len());
    let r = c
        .read_with(false, |chunk| got.extend_from_slice(chunk))
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(got == root.big, "body differs");
}

#[test]
fn a_client_leaving_mid_body_is_reported_done() {
    let root = TestRoot::new("leave");
    let w = start(&root, &[]);
    let mut s = TcpStream::connect(w.addr).unwrap();
    s.write_all(&request_bytes("GET", "/big.bin", &[])).unwrap();
    let mut first = [0u8; 1024];
    s.read_exact(&mut first).unwrap();
    drop(s);
    assert!(
        w.wait_record(WAIT, |r| r.done.contains(&1)),
        "no DONE for 1"
    );
    assert_eq!(client::get(w.addr, "/hello.txt", &[]).status, 200);
}

#[test]
fn slowloris_is_cut_after_the_header_timeout_while_others_are_served() {
    let root = TestRoot::new("slowloris");
    let w = start(&root, &["--header-timeout", "1s"]);
    let t0 = Instant::now();
    let mut slow = Client::connect(w.addr);
    slow.send(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n");
    // Others are served meanwhile, including a second partial sender.
    for _ in 0..20 {
        assert_eq!(client::get(w.addr, "/hello.txt", &[]).status, 200);
    }
    slow.send(b"X-Slow: 1\r\n");
    let r = slow.read(false).unwrap();
    assert_eq!(r.status, 408);
    assert!(slow.read_to_eof().unwrap().is_empty());
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "cut too early: {took:?}"
    );
    assert!(took < Duration::from_secs(8), "cut too late: {took:?}");
    // A connection that never sends anything is closed as well.
    let mut silent = Client::connect(w.addr);
    assert!(silent.read_to_eof().unwrap().is_empty());
    assert!(w.wait_record(WAIT, |r| r.done.len() >= 22));
}

#[test]
fn idle_keep_alive_connections_time_out() {
    let root = TestRoot::new("idle");
    let w = start(&root, &["--idle-timeout", "1s"]);
    let mut c = Client::connect(w.addr);
    assert_eq!(c.get("/hello.txt").status, 200);
    let t0 = Instant::now();
    assert!(c.read_to_eof().unwrap().is_empty());
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(took < Duration::from_secs(8), "{took:?}");
}

#[test]
fn max_requests_per_connection() {
    let root = TestRoot::new("maxreq");
    let w = start(&root, &["--max-requests", "3"]);
    let mut c = Client::connect(w.addr);
    assert!(!c.get("/hello.txt").closes());
    assert!(!c.get("/hello.txt").closes());
    let last = c.get("/hello.txt");
    assert_eq!(last.status, 200);
    assert!(last.closes());
    assert!(c.read_to_eof().unwrap().is_empty());
}

#[test]
fn every_connection_is_acked_and_reported_done_once_closed() {
    let root = TestRoot::new("done");
    let w = start(&root, &[]);
    for _ in 0..10 {
        assert_eq!(
            client::get(w.addr, "/hello.txt", &["Connection: close"]).status,
            200
        );
    }
    // Keep-alive connections the client closes.
    for _ in 0..5 {
        let mut c = Client::connect(w.addr);
        assert_eq!(c.get("/hello.txt").status, 200);
    }
    assert!(w.wait_record(WAIT, |r| r.done.len() == 15));
    let mut done = w.done();
    done.sort();
    assert_eq!(done, (1..=15).collect::<Vec<u64>>());
    let mut acked = w.acked();
    acked.sort();
    assert_eq!(acked, done);
}

#[test]
fn drain_finishes_requests_in_flight_then_exits() {
    let root = TestRoot::new("drain");
    let mut w = start(&root, &[]);
    let mut idle = Client::connect(w.addr);
    assert_eq!(idle.get("/hello.txt").status, 200);
    let mut busy = Client::connect(w.addr);
    busy.send(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n");
    // No CONN may follow DRAIN: wait until both were handed over.
    assert!(w.wait_record(WAIT, |r| r.acked.len() == 2));
    w.drain();
    // The idle keep-alive connection is closed politely...
    assert!(idle.read_to_eof().unwrap().is_empty());
    // ...the one in the middle of a request gets its answer, then EOF.
    busy.send(b"\r\n");
    let mut got = Vec::new();
    let r = busy.read_with(false, |c| got.extend_from_slice(c)).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.closes());
    assert!(got == root.big);
    assert!(busy.read_to_eof().unwrap().is_empty());
    let st = w.wait_exit(WAIT);
    assert!(st.success(), "{st:?}");
    let mut done = w.done();
    done.sort();
    assert_eq!(done, vec![1, 2]);
}

#[test]
fn the_acceptor_going_away_drains_too() {
    let root = TestRoot::new("closed");
    let mut w = start(&root, &[]);
    let mut c = Client::connect(w.addr);
    assert_eq!(c.get("/hello.txt").status, 200);
    // SIGTERM: same as DRAIN.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(w.pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(c.read_to_eof().unwrap().is_empty());
    assert!(w.wait_exit(WAIT).success());
}

#[test]
fn access_log_lines_and_switch() {
    let root = TestRoot::new("alog");
    let mut w = start(&root, &[]);
    assert_eq!(client::get(w.addr, "/hello.txt?q=1", &[]).status, 200);
    assert_eq!(client::get(w.addr, "/nope", &[]).status, 404);
    let l = w
        .wait_log("path=/hello.txt?q=1", WAIT)
        .expect("access line");
    for f in ["method=GET", "status=200", "bytes=13", "duration_us="] {
        assert!(l.contains(f), "{f} missing in {l}");
    }
    let l = w.wait_log("path=/nope", WAIT).expect("access line");
    assert!(l.contains("status=404"), "{l}");

    let mut quiet = start(&root, &["--access-log", "off"]);
    assert_eq!(client::get(quiet.addr, "/hello.txt", &[]).status, 200);
    quiet.drain();
    assert!(quiet.wait_exit(WAIT).success());
    // Every line the worker wrote is in by now (its stderr closed).
    assert!(quiet.wait_log("drained", WAIT).is_some());
    assert!(!quiet.collect_logs().iter().any(|l| l.contains("status=")));
}

#[test]
fn demo_site_names_the_worker_pid() {
    let w = Fake::start(&["--demo"]);
    let r = client::get(w.addr, "/", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    assert!(
        r.text().contains(&format!("<b id=\"pid\">{}</b>", w.pid)),
        "{}",
        r.text()
    );
    assert!(r.text().contains("baton"));
    let etag = r.header("etag").unwrap().to_owned();
    let r = client::get(w.addr, "/index.html", &[&format!("If-None-Match: {etag}")]);
    assert_eq!(r.status, 304);
    assert_eq!(client::get(w.addr, "/nope", &[]).status, 404);
}

#[test]
fn help_explains_every_flag() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_baton-static"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--root",
        "--demo",
        "--register",
        "--capacity",
        "--access-log",
        "--header-timeout",
        "--idle-timeout",
        "--send-timeout",
        "--linger-timeout",
        "--max-requests",
        "--max-header-bytes",
        "--max-header-fields",
        "--max-body-bytes",
        "--max-uri-bytes",
        "--sendfile-threshold",
        "--index",
    ] {
        assert!(text.contains(flag), "{flag} missing from --help");
    }
    // Neither --root nor --demo: a usage error, before touching any channel.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_baton-static"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_missing_root_is_a_clear_error() {
    // The root is opened after joining (the sandbox the acceptor passes may
    // chroot, and closes every fd opened before it): the worker says HELLO,
    // then fails with a clear message.
    let mut w = Fake::start(&["--root", "/nonexistent/baton-static-root"]);
    assert!(!w.wait_exit(WAIT).success());
    let l = w.wait_log("root directory", WAIT).expect("error line");
    assert!(l.contains("/nonexistent/baton-static-root"), "{l}");
}

#[test]
fn a_half_closed_client_gets_its_answers_then_eof() {
    let root = TestRoot::new("halfclose");
    let w = start(&root, &[]);
    let mut c = Client::connect(w.addr);
    let mut batch = request_bytes("GET", "/hello.txt", &[]);
    batch.extend(request_bytes("GET", "/big.bin", &[]));
    batch.extend(request_bytes("GET", "/style.css", &[]));
    c.send(&batch);
    c.stream().shutdown(std::net::Shutdown::Write).unwrap();
    let t0 = Instant::now();
    assert_eq!(c.read(false).unwrap().text(), "hello, world\n");
    assert!(c.read(false).unwrap().body == root.big);
    assert_eq!(c.read(false).unwrap().text(), "body { color: red }\n");
    // EOF follows at once, not after the idle timeout.
    assert!(c.read_to_eof().unwrap().is_empty());
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(w.wait_record(WAIT, |r| r.done.len() == 1));
}

#[test]
fn hundreds_of_pipelined_requests_span_several_turns() {
    let root = TestRoot::new("manypipelined");
    let w = start(&root, &[]);
    let mut c = Client::connect(w.addr);
    let one = request_bytes("GET", "/hello.txt", &[]);
    // More than one turn's worth of requests (and over the read buffer):
    // the worker must come back to this connection without a new event.
    let batch: Vec<u8> = one.iter().copied().cycle().take(one.len() * 600).collect();
    let writer = {
        let mut s = c.stream().try_clone().unwrap();
        std::thread::spawn(move || s.write_all(&batch).unwrap())
    };
    for i in 0..600 {
        let r = c.read(false).unwrap();
        assert_eq!((r.status, r.body.len()), (200, 13), "response {i}");
    }
    writer.join().unwrap();
    assert_eq!(c.get("/style.css").status, 200);
}

#[test]
fn an_acceptor_that_falls_behind_slows_the_worker_down_but_loses_nothing() {
    let root = TestRoot::new("backpressure");
    let w = start(&root, &["--access-log", "off"]);
    // The acceptor stops reading: the worker's ACK and DONE messages pile
    // up until its channel is full (a connected Unix socket holds about
    // 200 small messages: its send buffer).
    w.hold(true);
    let addr = w.addr;
    let clients = std::thread::spawn(move || {
        (0..300)
            .filter(|_| client::get(addr, "/hello.txt", &["Connection: close"]).status == 200)
            .count()
    });
    // Wait (bounded) until the worker is blocked sending to the acceptor,
    // rather than failing on EAGAIN and exiting.
    let syscall = format!("/proc/{}/syscall", w.pid);
    let sendmsg = format!("{} ", libc::SYS_sendmsg);
    let t0 = Instant::now();
    while !std::fs::read_to_string(&syscall).is_ok_and(|s| s.starts_with(&sendmsg)) {
        assert!(
            t0.elapsed() < WAIT,
            "the worker never blocked on its channel: {:?}",
            std::fs::read_to_string(&syscall)
        );
        std::thread::yield_now();
    }
    w.hold(false);
    assert_eq!(clients.join().unwrap(), 300);
    assert!(w.wait_record(WAIT, |r| r.done.len() == 300 && r.acked.len() == 300));
    assert_eq!(client::get(addr, "/hello.txt", &[]).status, 200);
}
