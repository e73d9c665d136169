//! systemd, faked as the code can detect it: a test `NOTIFY_SOCKET` that
//! records what baton tells the service manager, and listening sockets
//! passed the way systemd passes them (fds from 3, `LISTEN_PID`,
//! `LISTEN_FDS`, `LISTEN_FDNAMES`).

mod common;

use std::net::{TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use common::{bin, echo_once, Baton};
use nix::sys::signal::Signal;

/// The next notification datagram, as text.
fn next(sock: &UnixDatagram, within: Duration) -> String {
    sock.set_read_timeout(Some(within)).expect("timeout");
    let mut buf = vec![0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn notifications_come_in_order_with_their_fields() {
    let dir = common::tempdir("baton-notify");
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
    let file = dir.join("baton.toml");
    let echo = bin("baton-echo").display().to_string();
    std::fs::write(
        &file,
        format!("listen = [\"127.0.0.1:0\"]\n[pool]\ncommand = [\"{echo}\"]\nworkers = 2\n"),
    )
    .expect("write config");
    let mut cmd = Command::new(bin("baton"));
    cmd.env("NOTIFY_SOCKET", &path);
    let file_s = file.display().to_string();
    let mut b = Baton::start_with(cmd, &["--config", &file_s], 2);

    let first = next(&sock, Duration::from_secs(10));
    assert!(
        first.lines().any(|l| l == "READY=1")
            && first.lines().any(|l| l.starts_with("STATUS=serving")),
        "{first:?}"
    );
    // READY=1 came once both workers were ready.
    let ready_lines = b.count("worker ready");
    assert_eq!(ready_lines, 2);

    // The workers do not get the service manager's socket.
    for pid in b.worker_pids() {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&env).contains("NOTIFY_SOCKET"),
            "worker {pid} inherited NOTIFY_SOCKET"
        );
    }

    // Reload: RELOADING=1 with MONOTONIC_USEC, then READY=1.
    std::fs::write(
        &file,
        format!("listen = [\"127.0.0.1:0\"]\n[pool]\ncommand = [\"{echo}\"]\nworkers = 3\n"),
    )
    .expect("write config");
    let r = b.ctl_json(&["reload"]);
    assert!(r["changes"].to_string().contains("workers: added"), "{r}");
    let reloading = next(&sock, Duration::from_secs(10));
    let lines: Vec<&str> = reloading.lines().collect();
    assert_eq!(lines.first(), Some(&"RELOADING=1"), "{reloading:?}");
    let usec: u64 = lines
        .iter()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("MONOTONIC_USEC in {reloading:?}"));
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `now` is.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) },
        0
    );
    let now_usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000;
    assert!(
        usec <= now_usec && now_usec - usec < 10_000_000,
        "{usec} vs {now_usec}"
    );
    let again = next(&sock, Duration::from_secs(10));
    assert!(again.lines().any(|l| l == "READY=1"), "{again:?}");

    // A reload that fails still ends with READY=1 (the old configuration
    // keeps running).
    std::fs::write(&file, "[pool]\nworkers = \"many\"\n").expect("write");
    let (ok, _, _) = b.ctl(&["reload"]);
    assert!(!ok);
    assert!(next(&sock, Duration::from_secs(10)).starts_with("RELOADING=1"));
    assert!(next(&sock, Duration::from_secs(10)).contains("READY=1"));

    // Stop: STOPPING=1.
    b.signal(Signal::SIGTERM);
    let stopping = next(&sock, Duration::from_secs(10));
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let st = b.wait_exit(Duration::from_secs(20));
    assert!(st.success(), "{st:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sockets_passed_as_systemd_passes_them_are_served() {
    // Two listening sockets and one that is not a listener, as a socket
    // unit with three ListenStream/ListenDatagram lines would pass them.
    let configured = TcpListener::bind("127.0.0.1:0").expect("bind");
    let extra = TcpListener::bind("127.0.0.1:0").expect("bind");
    let junk = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    let (configured_addr, extra_addr) = (
        configured.local_addr().expect("addr"),
        extra.local_addr().expect("addr"),
    );
    let fds = [configured.as_raw_fd(), extra.as_raw_fd(), junk.as_raw_fd()];
    let mut cmd = Command::new("sh");
    // LISTEN_PID must be baton's own pid: the shell's, which exec keeps.
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=3 LISTEN_FDNAMES=web:default:junk exec \"$0\" \"$@\"")
        .arg(bin("baton"));
    // SAFETY: between fork and exec only async-signal-safe calls (dup2);
    // the source fds stay open in the parent until the child has started.
    unsafe {
        cmd.pre_exec(move || {
            // Place them at 3, 4, 5 (first out of the way, in case a source
            // is already at one of those numbers).
            let high: Vec<i32> = fds
                .iter()
                .map(|&fd| libc::fcntl(fd, libc::F_DUPFD, 100))
                .collect();
            for (i, fd) in high.into_iter().enumerate() {
                if fd < 0 || libc::dup2(fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
            }
            Ok(())
        });
    }
    let echo = bin("baton-echo").display().to_string();
    let listen = configured_addr.to_string();
    let mut b = Baton::start_counting(
        cmd,
        &["--listen", &listen, "--workers", "1", "--", &echo],
        2,
        1,
    );
    drop((configured, extra, junk));
    let from_systemd = b
        .seen
        .iter()
        .filter(|l| l.message() == "listening" && l.field("from").as_deref() == Some("systemd"))
        .count();
    assert_eq!(from_systemd, 2, "both listeners inherited, none bound anew");
    assert!(b
        .seen
        .iter()
        .any(|l| l.message().contains("not a listening TCP socket")));
    for addr in [configured_addr, extra_addr] {
        assert_eq!(
            echo_once(addr, b"activated\n").expect("echo"),
            b"activated\n"
        );
    }
    // The workers see none of it.
    let pids = b.worker_pids();
    assert!(!pids.is_empty());
    for pid in pids {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&env).contains("LISTEN_FDS"));
    }
    b.stop();
}
