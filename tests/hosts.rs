//! Past one host: the health check (`--health-listen`), `ctl drain-host`,
//! and (as root, with `ip netns` and HAProxy) two baton hosts in network
//! namespaces behind HAProxy sending PROXY v2 to `baton-static
//! --accept-proxy`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
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

// ---- as root: two hosts in network namespaces behind HAProxy -------------

/// Network namespaces and HAProxy of one test, removed on drop (deleting a
/// namespace deletes its veth ends too).
struct Net {
    prefix: String,
    namespaces: Vec<String>,
    haproxy: Option<std::process::Child>,
    dir: std::path::PathBuf,
}

impl Net {
    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    fn ip(&self, args: &[&str]) -> Result<(), String> {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn add_ns(&mut self, name: &str) -> Result<String, String> {
        let ns = self.ns(name);
        self.ip(&["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        self.ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A veth pair between two namespaces, `a_addr` on `a`'s end and
    /// `b_addr` on `b`'s (CIDR), both up.
    fn link(&self, a: &str, a_addr: &str, b: &str, b_addr: &str) -> Result<(), String> {
        let (na, nb) = (
            format!("to-{}", &b[b.len() - 2..]),
            format!("to-{}", &a[a.len() - 2..]),
        );
        self.ip(&[
            "-n", a, "link", "add", &na, "type", "veth", "peer", "name", &nb, "netns", b,
        ])?;
        self.ip(&["-n", a, "addr", "add", a_addr, "dev", &na])?;
        self.ip(&["-n", b, "addr", "add", b_addr, "dev", &nb])?;
        self.ip(&["-n", a, "link", "set", &na, "up"])?;
        self.ip(&["-n", b, "link", "set", &nb, "up"])
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(mut h) = self.haproxy.take() {
            let _ = h.kill();
            let _ = h.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Why the namespace test cannot run here, if it cannot.
fn hosts_unavailable() -> Option<String> {
    if !is_root() {
        return Some("not root (network namespaces need CAP_SYS_ADMIN)".into());
    }
    let have = |cmd: &str, arg: &str| {
        std::process::Command::new(cmd)
            .arg(arg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !have("haproxy", "-v") {
        return Some("haproxy is not installed (scripts/install-deps hosts)".into());
    }
    if !have("ip", "-V") {
        return Some("ip (iproute2) is not installed".into());
    }
    None
}

/// Runs `f` on a thread inside network namespace `ns`.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open the namespace");
        // SAFETY: setns(2) on an open namespace fd; it changes the network
        // namespace of this thread only (its sockets are created there).
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
}

/// `GET /host.txt` on a fresh connection: the host that answered.
fn which_host(addr: SocketAddr) -> Result<String, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /host.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    if !out.starts_with("HTTP/1.1 200") {
        return Err(format!("answer: {:?}", out.lines().next()));
    }
    Ok(out
        .rsplit("\r\n\r\n")
        .next()
        .unwrap_or("")
        .trim()
        .to_string())
}

#[test]
fn two_hosts_behind_haproxy_with_proxy_v2_drain_without_a_failed_request() {
    if let Some(why) = hosts_unavailable() {
        eprintln!("skipping the namespace test: {why}");
        return;
    }
    let started = Instant::now();
    let dir = tempdir("baton-hosts");
    let mut net = Net {
        prefix: format!("bh{}", std::process::id()),
        namespaces: Vec::new(),
        haproxy: None,
        dir: dir.clone(),
    };
    let setup = (|| -> Result<[String; 4], String> {
        let lb = net.add_ns("lb")?;
        let cl = net.add_ns("cl")?;
        let h1 = net.add_ns("h1")?;
        let h2 = net.add_ns("h2")?;
        net.link(&cl, "10.77.100.2/24", &lb, "10.77.100.1/24")?;
        net.link(&lb, "10.77.1.1/24", &h1, "10.77.1.2/24")?;
        net.link(&lb, "10.77.2.1/24", &h2, "10.77.2.2/24")?;
        Ok([lb, cl, h1, h2])
    })();
    let [lb, cl, h1, h2] = match setup {
        Ok(x) => x,
        Err(e) => {
            eprintln!("skipping the namespace test: cannot set up namespaces: {e}");
            return;
        }
    };
    // Each host serves its own name at /host.txt.
    let mut hosts = Vec::new();
    for (i, ns) in [&h1, &h2].into_iter().enumerate() {
        let www = dir.join(format!("www{}", i + 1));
        std::fs::create_dir_all(&www).expect("www");
        std::fs::write(www.join("host.txt"), format!("h{}\n", i + 1)).expect("host.txt");
        let ip = format!("10.77.{}.2", i + 1);
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(bin("baton"));
        let (listen, health) = (format!("{ip}:8080"), format!("{ip}:8404"));
        let static_bin = bin("baton-static").display().to_string();
        let www = www.display().to_string();
        let args = [
            "--listen",
            &listen,
            "--health-listen",
            &health,
            "--workers",
            "2",
            "--drain-grace",
            "1500ms",
            "--",
            &static_bin,
            "--root",
            &www,
            "--accept-proxy",
        ];
        hosts.push(Baton::start_with(cmd, &args, 2));
    }
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        "global\n  maxconn 2000\n\
         defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n  retries 3\n  option redispatch\n\
         frontend fe\n  bind 10.77.100.1:80\n  default_backend be\n\
         backend be\n  balance roundrobin\n  option httpchk GET /health\n  default-server inter 200ms fall 2 rise 1\n\
         \x20 server h1 10.77.1.2:8080 send-proxy-v2 check port 8404\n\
         \x20 server h2 10.77.2.2:8080 send-proxy-v2 check port 8404\n",
    )
    .expect("haproxy.cfg");
    net.haproxy = Some(
        std::process::Command::new("ip")
            .args(["netns", "exec", &lb, "haproxy", "-db", "-f"])
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start haproxy"),
    );
    let front: SocketAddr = "10.77.100.1:80".parse().unwrap();
    // Until both hosts answer through HAProxy (its checks passed).
    let seen = in_netns(&cl, move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < 2 && Instant::now() < deadline {
            if let Ok(h) = which_host(front) {
                seen.insert(h);
            } else {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        seen
    })
    .join()
    .expect("client thread");
    assert_eq!(seen.len(), 2, "both hosts serve through HAProxy: {seen:?}");

    // Load from the client namespace while h2 drains.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            in_netns(&cl, move || {
                let mut served = std::collections::BTreeMap::<String, u64>::new();
                let mut failed = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(15);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline
                {
                    match which_host(front) {
                        Ok(h) => *served.entry(h).or_default() += 1,
                        Err(e) => failed.push(e),
                    }
                }
                (served, failed)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (ok, out, err) = hosts[1].ctl(&["drain-host"]);
    assert!(ok, "{out}{err}");
    let st = hosts[1].wait_exit(Duration::from_secs(15));
    assert!(st.success(), "h2 exits 0 after its drain: {st:?}");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut served = std::collections::BTreeMap::<String, u64>::new();
    let mut failed = Vec::new();
    for t in load {
        let (s, f) = t.join().expect("load thread");
        for (h, n) in s {
            *served.entry(h).or_default() += n;
        }
        failed.extend(f);
    }
    eprintln!("served per host: {served:?}, failed: {}", failed.len());
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(served.get("h1").is_some_and(|n| *n > 0), "{served:?}");
    assert!(served.get("h2").is_some_and(|n| *n > 0), "{served:?}");
    // The real client address, carried by PROXY v2, in h2's access log.
    let peers: Vec<String> = hosts[1]
        .seen
        .iter()
        .filter(|l| l.json["target"] == "access")
        .filter_map(|l| l.field("peer"))
        .collect();
    assert!(!peers.is_empty(), "h2 logged its requests");
    assert!(
        peers.iter().all(|p| p.starts_with("10.77.100.2:")),
        "every access line names the client: {:?}",
        &peers[..peers.len().min(5)]
    );
    hosts[0].stop();
    drop(net);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}
