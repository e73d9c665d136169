//! The static file worker behind the real acceptor: a real `baton` with two
//! `baton-static` workers on loopback, driven by real clients (curl, and
//! the small Rust HTTP client shared with baton-static's own tests).
//!
//! Large files are made in a temporary directory at test time.

mod common;

#[path = "../workers/static/tests/support/client.rs"]
mod client;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use client::{pattern, request_bytes, Client};
use common::{bin, Baton};

const SECRET: &str = "TOP SECRET: outside the root";

/// A temporary site: `DIR/secret.txt` outside the root, `DIR/www` served.
struct Site {
    dir: PathBuf,
    www: PathBuf,
}

impl Site {
    fn new(name: &str) -> Site {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "baton-static-it-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let www = dir.join("www");
        std::fs::create_dir_all(www.join("sub")).unwrap();
        std::fs::write(dir.join("secret.txt"), SECRET).unwrap();
        std::fs::write(www.join("index.html"), "<h1>home</h1>\n").unwrap();
        std::fs::write(www.join("hello.txt"), "hello, world\n").unwrap();
        std::fs::write(www.join("sub/index.html"), "<p>sub</p>\n").unwrap();
        std::os::unix::fs::symlink("hello.txt", www.join("link-in")).unwrap();
        std::os::unix::fs::symlink("../secret.txt", www.join("link-out")).unwrap();
        std::os::unix::fs::symlink(dir.join("secret.txt"), www.join("link-abs")).unwrap();
        for p in [&dir, &www, &www.join("sub")] {
            readable(p);
        }
        for f in ["index.html", "hello.txt", "sub/index.html"] {
            readable(&www.join(f));
        }
        Site { dir, www }
    }

    fn www(&self) -> &str {
        self.www.to_str().unwrap()
    }

    fn write(&self, rel: &str, bytes: &[u8]) -> PathBuf {
        let p = self.www.join(rel);
        std::fs::write(&p, bytes).unwrap();
        readable(&p);
        p
    }
}

/// Started as root, baton runs its workers as `nobody`: whatever the
/// umask, the site must be readable by others.
fn readable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = if p.is_dir() { 0o755 } else { 0o644 };
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// baton with two static workers serving `site`, worker flags appended.
fn start(site: &Site, worker_flags: &[&str]) -> Baton {
    let worker = bin("baton-static");
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--no-control",
        "--",
        worker.to_str().unwrap(),
        "--root",
        site.www(),
    ];
    args.extend_from_slice(worker_flags);
    Baton::start(&args, 2)
}

fn url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}

/// Runs curl with `args`; returns (stdout, exit status). Always bounded.
fn curl(args: &[&str]) -> (Vec<u8>, bool) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    if !out.status.success() {
        eprintln!("curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    (out.stdout, out.status.success())
}

/// `curl -w '%{http_code}'` with the body thrown away.
fn curl_status(args: &[&str]) -> u16 {
    let mut a = vec!["-o", "/dev/null", "-w", "%{http_code}"];
    a.extend_from_slice(args);
    let (out, ok) = curl(&a);
    assert!(ok, "curl failed");
    String::from_utf8_lossy(&out).parse().expect("status code")
}

fn sha256_file(p: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(p)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// sha256 of curl's download, piped straight into sha256sum.
fn sha256_of_download(u: &str, extra: &[&str]) -> String {
    let mut curl = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "60"])
        .args(extra)
        .arg(u)
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl");
    let out = Command::new("sha256sum")
        .stdin(curl.stdout.take().unwrap())
        .output()
        .expect("sha256sum");
    assert!(curl.wait().unwrap().success(), "curl {u} failed");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn a_100_mib_file_arrives_intact_through_sendfile() {
    let site = Site::new("big");
    let big = pattern(100 * 1024 * 1024 + 4321, 42);
    let path = site.write("big.bin", &big);
    let b = start(&site, &[]);
    let u = url(b.addr(), "/big.bin");
    // curl, checksummed.
    let want = sha256_file(&path);
    assert_eq!(sha256_of_download(&u, &[]), want);
    // The Rust client, compared byte for byte as it streams, twice on one
    // keep-alive connection (the second response must start cleanly).
    let mut c = Client::connect(b.addr());
    for _ in 0..2 {
        c.send(&request_bytes("GET", "/big.bin", &[]));
        let mut at = 0usize;
        let mut same = true;
        let r = c
            .read_with(false, |chunk| {
                same &= big.get(at..at + chunk.len()) == Some(chunk);
                at += chunk.len();
            })
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(at, big.len());
        assert!(same, "body differs from the file");
    }
    // A large range from the middle, through curl.
    let (a, z) = (12_345_678usize, 87_654_321usize);
    let (part, ok) = curl(&["-r", &format!("{a}-{z}"), &u]);
    assert!(ok);
    assert!(part == big[a..=z], "range body differs");
}

#[test]
fn ranges_first_byte_suffix_and_past_the_end() {
    let site = Site::new("ranges");
    let data = pattern(100_000, 3);
    site.write("data.bin", &data);
    let b = start(&site, &[]);
    let u = url(b.addr(), "/data.bin");
    // curl
    assert_eq!(curl(&["-r", "0-0", &u]).0, &data[..1]);
    assert_eq!(curl(&["-r", "-10", &u]).0, &data[data.len() - 10..]);
    assert_eq!(curl_status(&["-r", "0-0", &u]), 206);
    assert_eq!(curl_status(&["-r", "100000-", &u]), 416);
    // Rust client: headers too.
    let mut c = Client::connect(b.addr());
    let r = c.request("GET", "/data.bin", &["Range: bytes=0-0"]);
    assert_eq!((r.status, r.body.as_slice()), (206, &data[..1]));
    assert_eq!(r.header("content-range"), Some("bytes 0-0/100000"));
    let r = c.request("GET", "/data.bin", &["Range: bytes=-10"]);
    assert_eq!(r.header("content-range"), Some("bytes 99990-99999/100000"));
    assert_eq!(r.body, &data[99_990..]);
    let r = c.request("GET", "/data.bin", &["Range: bytes=100000-"]);
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */100000"));
    let r = c.request("GET", "/data.bin", &["Range: bytes=99999-200000"]);
    assert_eq!((r.status, r.body.as_slice()), (206, &data[99_999..]));
}

#[test]
fn conditional_requests_answer_304() {
    let site = Site::new("cond");
    let b = start(&site, &[]);
    let u = url(b.addr(), "/hello.txt");
    let mut c = Client::connect(b.addr());
    let r = c.get("/hello.txt");
    let etag = r.header("etag").unwrap().to_owned();
    let lm = r.header("last-modified").unwrap().to_owned();
    // curl
    let inm = format!("If-None-Match: {etag}");
    assert_eq!(curl_status(&["-H", &inm, &u]), 304);
    assert_eq!(curl_status(&["-H", "If-None-Match: \"nope\"", &u]), 200);
    let ims = format!("If-Modified-Since: {lm}");
    assert_eq!(curl_status(&["-H", &ims, &u]), 304);
    // curl's own --time-cond with a date long past: modified since, 200.
    assert_eq!(
        curl_status(&["-z", "Sun, 06 Nov 1994 08:49:37 GMT", &u]),
        200
    );
    // Rust client, on one connection.
    let r = c.request("GET", "/hello.txt", &[&inm]);
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    assert_eq!(c.request("GET", "/hello.txt", &[&ims]).status, 304);
    assert_eq!(c.get("/hello.txt").status, 200);
}

#[test]
fn head_has_no_body() {
    let site = Site::new("head");
    site.write("data.bin", &pattern(1 << 20, 5));
    let b = start(&site, &[]);
    // curl -I: headers only.
    let (out, ok) = curl(&["-I", &url(b.addr(), "/data.bin")]);
    assert!(ok);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("Content-Length: 1048576"), "{text}");
    // Rust client: a body would be misread as the next response.
    let mut c = Client::connect(b.addr());
    let r = c.request("HEAD", "/data.bin", &[]);
    assert_eq!(r.header("content-length"), Some("1048576"));
    assert_eq!(c.get("/hello.txt").text(), "hello, world\n");
}

#[test]
fn pipelined_requests_come_back_in_order() {
    let site = Site::new("pipeline");
    let data = pattern(300_000, 9);
    site.write("data.bin", &data);
    let b = start(&site, &[]);
    let mut c = Client::connect(b.addr());
    let mut batch = Vec::new();
    for i in 0..30 {
        let p = match i % 3 {
            0 => "/hello.txt",
            1 => "/data.bin",
            _ => "/missing",
        };
        batch.extend(request_bytes("GET", p, &[]));
    }
    c.send(&batch);
    for i in 0..30 {
        let r = c.read(false).unwrap();
        match i % 3 {
            0 => assert_eq!(r.text(), "hello, world\n", "response {i}"),
            1 => assert!(r.body == data, "response {i}"),
            _ => assert_eq!(r.status, 404, "response {i}"),
        }
    }
}

#[test]
fn traversal_attempts_never_leave_the_root() {
    let site = Site::new("traversal");
    let b = start(&site, &[]);
    let a = b.addr();
    for target in [
        "/../secret.txt",
        "/sub/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2e%2e%2fsecret.txt",
        "/sub%2f..%2f..%2fsecret.txt",
        "/.%2E/secret.txt",
        "/link-out",
        "/link-abs",
        "/secret.txt%00",
    ] {
        // curl, sending the path as it is.
        let (out, _) = curl(&["--path-as-is", &url(a, target)]);
        assert!(
            !String::from_utf8_lossy(&out).contains("SECRET"),
            "curl {target} leaked"
        );
        // Rust client, raw bytes.
        let r = client::raw(a, &request_bytes("GET", target, &[]));
        assert_ne!(r.status, 200, "{target}");
        assert!(!r.text().contains("SECRET"), "{target} leaked");
    }
    // A symlink that stays inside is followed, also under the sandbox's
    // seccomp filter (which refuses openat2: the user-space resolver).
    let r = client::get(a, "/link-in", &[]);
    assert_eq!((r.status, r.text().as_str()), (200, "hello, world\n"));
}

#[test]
fn slowloris_is_cut_off_while_others_are_served() {
    let site = Site::new("slowloris");
    let b = start(&site, &["--header-timeout", "1s"]);
    let t0 = Instant::now();
    // One slow client per worker, so that whichever worker serves the
    // others also holds a slow one.
    let mut slow: Vec<Client> = (0..2)
        .map(|_| {
            let mut c = Client::connect(b.addr());
            c.send(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n");
            c
        })
        .collect();
    for _ in 0..50 {
        let (out, ok) = curl(&[&url(b.addr(), "/hello.txt")]);
        assert!(ok);
        assert_eq!(out, b"hello, world\n");
    }
    for c in &mut slow {
        // Still dribbling: it does not buy more time.
        c.send(b"X-Dribble: 1\r\n");
        let r = c.read(false).unwrap();
        assert_eq!(r.status, 408);
        assert!(c.read_to_eof().unwrap().is_empty());
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "cut too early: {took:?}"
    );
    assert!(took < Duration::from_secs(10), "cut too late: {took:?}");
}

#[test]
fn a_thousand_concurrent_keep_alive_clients_are_all_served() {
    const CLIENTS: usize = 1000;
    const THREADS: usize = 10;
    let site = Site::new("thousand");
    let b = start(&site, &["--access-log", "off"]);
    let addr = b.addr();
    // Every connection is opened (and served once) before any is reused,
    // so all 1000 are open at the same time.
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut conns: Vec<Client> = (0..CLIENTS / THREADS)
                    .map(|_| Client::connect(addr))
                    .collect();
                let mut ok = 0;
                for c in &mut conns {
                    if c.get("/hello.txt").text() == "hello, world\n" {
                        ok += 1;
                    }
                }
                barrier.wait();
                for c in &mut conns {
                    let r = c.get("/sub/");
                    if r.status == 200 && r.text() == "<p>sub</p>\n" && !r.closes() {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    let ok: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(ok, 2 * CLIENTS);
}

#[test]
fn baton_serves_the_demo_site_and_a_root_without_a_worker_command() {
    // No worker command: the demo site, naming the worker that answered.
    let mut b = Baton::start(
        &["--listen", "127.0.0.1:0", "--workers", "2", "--no-control"],
        2,
    );
    let r = client::get(b.addr(), "/", &[]);
    assert_eq!(r.status, 200);
    let text = r.text();
    let pid: i32 = text
        .split("<b id=\"pid\">")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .and_then(|s| s.parse().ok())
        .expect("the page names a pid");
    assert!(b.worker_pids().contains(&pid), "{pid} is not a worker");
    b.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(b.wait_exit(Duration::from_secs(30)).success());

    // --root DIR: that directory.
    let site = Site::new("rootflag");
    let b = Baton::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--no-control",
            "--root",
            site.www(),
        ],
        2,
    );
    assert_eq!(
        client::get(b.addr(), "/hello.txt", &[]).text(),
        "hello, world\n"
    );
    let _ = std::io::stderr().flush();
}

#[test]
fn a_worker_started_by_hand_registers_and_serves() {
    let site = Site::new("register");
    let sock = site.dir.join("workers.sock");
    let worker = bin("baton-static");
    let mut b = Baton::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--no-control",
            "--worker-socket",
            sock.to_str().unwrap(),
            "--",
            worker.to_str().unwrap(),
            "--root",
            site.www(),
        ],
        1,
    );
    // Someone else starts a worker (here serving the demo site, so that its
    // answers are told apart) and it joins the pool.
    let mut hand = Command::new(&worker)
        .args(["--register", sock.to_str().unwrap(), "--demo"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn baton-static --register");
    let hand_pid = hand.id();
    b.wait_for("worker ready", Duration::from_secs(20));
    // Connections held open count against their worker, so least-conn
    // spreads these over both.
    let mut conns: Vec<Client> = (0..4).map(|_| Client::connect(b.addr())).collect();
    let bodies: Vec<String> = conns.iter_mut().map(|c| c.get("/").text()).collect();
    let from_hand = format!("<b id=\"pid\">{hand_pid}</b>");
    assert!(bodies.iter().any(|t| t.contains(&from_hand)), "{bodies:?}");
    assert!(bodies.iter().any(|t| t == "<h1>home</h1>\n"), "{bodies:?}");
    drop(conns);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(hand_pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(hand.wait().unwrap().success());
}

#[test]
fn rolling_restart_and_remove_under_keep_alive_load_lose_no_request() {
    // Workers that drain keep an idle keep-alive connection open for its
    // next request (answered with `Connection: close`) instead of closing
    // it under a client whose request may already be on its way.
    let site = Site::new("drain");
    let worker = bin("baton-static");
    let mut b = Baton::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--",
            worker.to_str().unwrap(),
            "--root",
            site.www(),
        ],
        2,
    );
    let addr = b.addr();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut ok, mut errors) = (0u64, Vec::new());
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut c = Client::connect(addr);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if let Err(e) =
                        c.reader
                            .get_mut()
                            .write_all(&request_bytes("GET", "/hello.txt", &[]))
                    {
                        errors.push(format!("send after {ok}: {e}"));
                        c = Client::connect(addr);
                        continue;
                    }
                    match c.read(false) {
                        Ok(r) if r.status == 200 && r.body == b"hello, world\n" => {
                            ok += 1;
                            if r.closes() {
                                c = Client::connect(addr);
                            }
                        }
                        Ok(r) => errors.push(format!("status {}", r.status)),
                        Err(e) => {
                            errors.push(format!("after {ok} requests: {e}"));
                            c = Client::connect(addr);
                        }
                    }
                }
                (ok, errors)
            })
        })
        .collect();
    let (ok, _, err) = b.ctl(&["restart"]);
    assert!(ok, "{err}");
    b.wait_for(
        "rolling restart finished: every worker replaced",
        Duration::from_secs(30),
    );
    // Both old workers drained and left (some lines may be read already).
    let mut left = b.count("worker disconnected");
    while left < 2 {
        b.wait_for("worker disconnected", Duration::from_secs(30));
        left += 1;
    }
    let (ok, _, err) = b.ctl(&["remove", "--count", "1"]);
    assert!(ok, "{err}");
    b.wait_for("worker disconnected", Duration::from_secs(30));
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut errors = Vec::new();
    for c in clients {
        let (n, e) = c.join().expect("client");
        total += n;
        errors.extend(e);
    }
    assert!(total > 100, "the load ran: {total}");
    assert!(errors.is_empty(), "{} errors: {errors:?}", errors.len());
    b.stop();
}
