//! `baton-chaos`: a worker that breaks the protocol on purpose, for tests.
//!
//! Usage: `baton-chaos --mode MODE [--bad-workers 1,2] [--count N] [--delay-ms N] [--register PATH]`
//!
//! Workers whose id (`BATON_WORKER_ID`) is listed in `--bad-workers`
//! (default: every worker) misbehave as MODE says; the others exec
//! `baton-echo` from the same directory and behave. Restarted workers get
//! new ids, so a listed worker that is killed comes back well-behaved.
//! With `--register PATH` it joins through the acceptor's worker socket
//! instead of an inherited channel (and always misbehaves).
//!
//! Every mode speaks protocol version 1 (its HELLO says 1), so the
//! acceptor sends it one CONN per message.
//!
//! Modes:
//! * `die-before-ack`: takes `--count` connections without acknowledging
//!   any, then exits with status 3;
//! * `garbage`: after its first connection, sends bytes that are no message;
//! * `extra-fd`: after its first connection, ACKs it with an fd attached;
//! * `hang`: says HELLO, then never reads its channel again;
//! * `no-hello`: never says HELLO;
//! * `crash`: exits with status 1 at once;
//! * `forbidden`: after HELLO, tries fork+execve: exits 4 if refused with
//!   EPERM (as the seccomp filter does), 5 if it ran;
//! * `threads-then-sandbox`: starts a thread, then applies its sandbox,
//!   which refuses; exits with the sandbox failure status (78);
//! * `ack-done-die`: takes one connection and waits (without reading) until
//!   a second CONN is queued on its channel; then stops the acceptor
//!   (SIGSTOP, so that it is "busy"), sends it a SIGCHLD (so that the
//!   child-exit event comes first), ACKs the first connection, writes
//!   `partial\n` to it, reports it DONE and exits with status 3, the second
//!   CONN unread. The test continues the acceptor once this process is a
//!   zombie. Needs `--no-sandbox` (seccomp refuses kill);
//! * `slow-ack`: serves connections one at a time like an echo worker, but
//!   waits `--delay-ms` (default 3000) before acknowledging each;
//! * `no-done`: ACKs each connection, reads it to its end, writes
//!   `no done\n`, closes it, and never reports it DONE;
//! * `park-bogus`: speaks version 2, acknowledges its first connection, then
//!   "parks" it with a pipe attached instead of the socket (needs
//!   `--no-sandbox`: seccomp may refuse the pipe);
//! * `v1-echo`: a well-behaved echo worker that speaks protocol version 1
//!   only (its HELLO says 1), one connection at a time: the acceptor must
//!   keep sending it one CONN per message.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::ExitCode;

use baton_sdk::proto::{CHANNEL_FD_ENV, WORKER_ID_ENV};
use baton_sdk::{Channel, Msg};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

/// One stderr line in baton's log style (see `baton_sdk::log`).
fn say(msg: &str) {
    baton_sdk::log::line(
        baton_sdk::log::Level::Info,
        "baton-chaos",
        format_args!("{msg}"),
    );
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn channel() -> io::Result<Channel> {
    if let Some(path) = arg("--register") {
        return Channel::connect(std::path::Path::new(&path));
    }
    let fd: RawFd = std::env::var(CHANNEL_FD_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::other("BATON_CHANNEL_FD not set"))?;
    // SAFETY: the acceptor passed this fd for our exclusive use.
    let chan = Channel::from_fd(unsafe { OwnedFd::from_raw_fd(fd) })?;
    chan.set_nonblocking(false)?;
    Ok(chan)
}

/// Version 2: takes one connection, ACKs it, and hands back a pipe as if it
/// were that connection.
fn park_bogus(chan: &Channel) -> io::Result<()> {
    hello(chan)?;
    chan.set_version(2);
    let (info, _sock) = loop {
        match chan.recv() {
            Ok(Some(r)) => match r.msg {
                Msg::Conns(infos) => break (infos[0], r.fds),
                Msg::Conn(info) => break (info, r.fds),
                _ => continue,
            },
            Ok(None) => return Err(io::Error::other("acceptor closed the channel")),
            Err(e) => return Err(io::Error::other(e.to_string())),
        }
    };
    chan.send(&Msg::Ack(vec![info.id]), None)?;
    let (rd, _wr) = nix::unistd::pipe()?;
    use std::os::fd::AsFd;
    chan.send_fds(
        &Msg::Park(vec![baton_sdk::proto::Parked { info, idle_ms: 0 }]),
        &[rd.as_fd()],
    )?;
    say("parked a pipe as a connection");
    loop {
        std::thread::park();
    }
}

/// Echoes connections one at a time (version 1: one CONN per message),
/// waiting `ack_delay` before acknowledging each.
fn echo_one_by_one(chan: &Channel, ack_delay: std::time::Duration) -> io::Result<()> {
    let mut keep = Vec::new();
    loop {
        let id = take_conn(chan, &mut keep)?;
        std::thread::sleep(ack_delay);
        chan.send(&Msg::Ack(vec![id]), None)?;
        let mut sock = std::net::TcpStream::from(keep.remove(0));
        sock.set_nonblocking(false)?;
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut sock, &mut buf);
        let _ = std::io::Write::write_all(&mut sock, &buf);
        drop(sock);
        chan.send(&Msg::Done(vec![id]), None)?;
    }
}

fn hello(chan: &Channel) -> io::Result<()> {
    chan.send(
        &Msg::Hello {
            pid: std::process::id(),
            capacity: 0,
            flags: baton_sdk::HelloFlags::NONE,
        },
        None,
    )?;
    match chan.recv() {
        Ok(Some(r)) if matches!(r.msg, Msg::Welcome { .. }) => Ok(()),
        other => Err(io::Error::other(format!("no WELCOME: {other:?}"))),
    }
}

/// Receives one CONN and keeps its fd (never acknowledged).
fn take_conn(chan: &Channel, keep: &mut Vec<OwnedFd>) -> io::Result<u64> {
    loop {
        match chan.recv() {
            Ok(Some(r)) => match (r.msg, r.fds.into_iter().next()) {
                (Msg::Conn(info), Some(fd)) => {
                    keep.push(fd);
                    return Ok(info.id);
                }
                // Asked to stop with nothing unfinished (every connection
                // taken so far has been answered or is the mode's to drop).
                (Msg::Drain, _) => std::process::exit(0),
                _ => {}
            },
            Ok(None) => return Err(io::Error::other("acceptor closed the channel")),
            Err(e) => return Err(io::Error::other(e.to_string())),
        }
    }
}

/// Blocks until a message is queued on the channel, without reading it.
fn wait_readable(chan: &Channel) -> io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    loop {
        let mut fds = [PollFd::new(chan.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

fn misbehave(mode: &str, count: usize) -> io::Result<()> {
    if mode == "crash" {
        std::process::exit(1);
    }
    if mode == "threads-then-sandbox" {
        // A worker that starts a thread before confining itself: the
        // sandbox refuses (credentials are per thread) and it must not start.
        let _t = std::thread::spawn(std::thread::park);
        if let Err(e) = baton_sdk::sandbox::apply_from_env() {
            say(&e.to_string());
            std::process::exit(i32::from(baton_sdk::EXIT_SANDBOX));
        }
        return Err(io::Error::other("the sandbox was applied with two threads"));
    }
    // Misbehaving workers are confined like any other.
    if let Err(e) = baton_sdk::sandbox::apply_from_env() {
        say(&e.to_string());
        std::process::exit(i32::from(baton_sdk::EXIT_SANDBOX));
    }
    let chan = channel()?;
    if mode == "no-hello" {
        loop {
            std::thread::park();
        }
    }
    if mode == "park-bogus" {
        return park_bogus(&chan);
    }
    // Misbehaving workers speak protocol version 1 (one CONN per message):
    // the simplest peer to break rules with. `v1-echo` is a well-behaved one.
    chan.set_version(1);
    if mode == "v1-echo" {
        hello(&chan)?;
        return echo_one_by_one(&chan, std::time::Duration::ZERO);
    }
    hello(&chan)?;
    let mut keep = Vec::new();
    match mode {
        "die-before-ack" => {
            for _ in 0..count {
                take_conn(&chan, &mut keep)?;
            }
            say(&format!(
                "took {} connections, dying without ACK",
                keep.len()
            ));
            std::process::exit(3);
        }
        "garbage" => {
            take_conn(&chan, &mut keep)?;
            nix::sys::socket::send(
                chan.as_raw_fd(),
                b"\xde\xad\xbe\xef garbage",
                MsgFlags::empty(),
            )?;
        }
        "extra-fd" => {
            let id = take_conn(&chan, &mut keep)?;
            let mut buf = [0u8; baton_sdk::proto::MAX_MSG];
            let n = baton_sdk::proto::encode(&Msg::Ack(vec![id]), &mut buf);
            let fds = [keep[0].as_raw_fd()];
            sendmsg::<()>(
                chan.as_raw_fd(),
                &[io::IoSlice::new(&buf[..n])],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::empty(),
                None,
            )?;
        }
        "hang" => {}
        "ack-done-die" => {
            let first = take_conn(&chan, &mut keep)?;
            wait_readable(&chan)?;
            let parent = nix::unistd::getppid();
            nix::sys::signal::kill(parent, nix::sys::signal::Signal::SIGSTOP)?;
            nix::sys::signal::kill(parent, nix::sys::signal::Signal::SIGCHLD)?;
            chan.send(&Msg::Ack(vec![first]), None)?;
            let mut sock = std::net::TcpStream::from(keep.remove(0));
            sock.set_nonblocking(false)?;
            std::io::Write::write_all(&mut sock, b"partial\n")?;
            drop(sock);
            chan.send(&Msg::Done(vec![first]), None)?;
            say("acknowledged, answered and reported one connection; dying with another unread");
            std::process::exit(3);
        }
        "slow-ack" => {
            let delay = arg("--delay-ms")
                .and_then(|d| d.parse().ok())
                .unwrap_or(3000u64);
            echo_one_by_one(&chan, std::time::Duration::from_millis(delay))?;
        }
        "no-done" => loop {
            let id = take_conn(&chan, &mut keep)?;
            chan.send(&Msg::Ack(vec![id]), None)?;
            let mut sock = std::net::TcpStream::from(keep.remove(0));
            sock.set_nonblocking(false)?;
            let mut buf = Vec::new();
            let _ = std::io::Read::read_to_end(&mut sock, &mut buf);
            let _ = std::io::Write::write_all(&mut sock, b"no done\n");
        },
        "forbidden" => {
            // A syscall the seccomp allowlist refuses: execve.
            let r = std::process::Command::new("/bin/true").status();
            say(&format!("fork+execve attempted: {r:?}"));
            // 4: refused with EPERM, as the filter says; 5: it ran.
            match r {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => std::process::exit(4),
                _ => std::process::exit(5),
            }
        }
        other => return Err(io::Error::other(format!("unknown --mode {other}"))),
    }
    // Stay alive holding everything until the acceptor kills us.
    loop {
        std::thread::park();
    }
}

fn main() -> ExitCode {
    let mode = arg("--mode").unwrap_or_else(|| "die-before-ack".to_string());
    let count: usize = arg("--count").and_then(|c| c.parse().ok()).unwrap_or(1);
    let me: u32 = std::env::var(WORKER_ID_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bad = arg("--register").is_some()
        || match arg("--bad-workers") {
            Some(list) => list.split(',').any(|s| s.trim().parse() == Ok(me)),
            None => true,
        };
    if !bad {
        let echo = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("baton-echo")))
            .unwrap_or_else(|| "baton-echo".into());
        let e = std::process::Command::new(&echo).exec();
        say(&format!("cannot exec {}: {e}", echo.display()));
        return ExitCode::FAILURE;
    }
    match misbehave(&mode, count) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(&e.to_string());
            ExitCode::FAILURE
        }
    }
}
