//! `baton-echo`: the smallest baton worker, and the protocol's living example.
//!
//! It takes its channel from the acceptor that spawned it (or registers with
//! `--register PATH`), and echoes every byte of every connection back to the
//! client, one thread per connection. When a client closes, the worker
//! reports the connection DONE. On DRAIN it stops taking connections, lets
//! the open ones finish (the acceptor stops it at its drain timeout), and
//! exits 0. When the acceptor goes away (even `kill -9`), the connections it
//! holds are still its own: it finishes them, for at most `--drain-timeout`
//! (the acceptor can no longer stop it), then exits.

use std::fmt::Arguments;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use baton_sdk::{Connection, DoneSender, Event, Worker};

const USAGE: &str = "\
baton-echo: echoes every byte a client sends back to it

Usage: baton-echo [--register PATH] [--capacity N] [--drain-timeout SECS]

Started by `baton ... -- baton-echo`, it takes its channel from the
acceptor. With --register PATH it connects to the acceptor's worker socket
instead and joins the pool. --capacity N caps its concurrent connections
(0, the default, leaves the limit to the acceptor's --worker-connections and
this process's fd limit). If the acceptor goes away, open connections get
--drain-timeout seconds (default 30) to finish before the worker exits.";

struct Args {
    register: Option<PathBuf>,
    capacity: u32,
    drain_timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        register: None,
        capacity: 0,
        drain_timeout: Duration::from_secs(30),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--register" => {
                args.register = Some(it.next().ok_or("--register needs a PATH")?.into());
            }
            "--capacity" => {
                let v = it.next().ok_or("--capacity needs a number")?;
                args.capacity = v
                    .parse()
                    .map_err(|_| format!("--capacity: {v:?} is not a number"))?;
            }
            "--drain-timeout" => {
                let v = it
                    .next()
                    .ok_or("--drain-timeout needs a number of seconds")?;
                let secs: u64 = v
                    .parse()
                    .map_err(|_| format!("--drain-timeout: {v:?} is not a number of seconds"))?;
                args.drain_timeout = Duration::from_secs(secs);
            }
            "-V" | "--version" => {
                println!("baton-echo {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    Ok(args)
}

/// Writes one log line to stderr in baton's log style (text or JSON, as
/// the acceptor says; see `baton_sdk::log`), in a single write(2).
fn log(args: Arguments<'_>) {
    baton_sdk::log::line(baton_sdk::log::Level::Info, "baton-echo", args);
}

/// Counts open connections so that the worker can wait for them on exit.
#[derive(Default)]
struct InFlight {
    count: Mutex<usize>,
    zero: Condvar,
}

fn echo(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}

fn serve(conn: Connection, done: DoneSender, inflight: Arc<InFlight>) {
    let id = conn.id;
    if let Err(e) = echo(conn.stream) {
        log(format_args!("connection {id}: {e}"));
    }
    // The stream is closed by now: only then is the connection done.
    if let Err(e) = done.done(id) {
        // After the acceptor is gone there is nobody to tell.
        if e.kind() != io::ErrorKind::BrokenPipe {
            log(format_args!("cannot report connection {id} done: {e}"));
        }
    }
    let mut n = inflight.count.lock().unwrap_or_else(|p| p.into_inner());
    *n -= 1;
    if *n == 0 {
        inflight.zero.notify_all();
    }
}

fn run(args: Args) -> Result<(), baton_sdk::Error> {
    // Confine first (the SDK would do it on joining), so that what the
    // sandbox notes goes out in our log style.
    if let Some(applied) = baton_sdk::sandbox::apply_from_env()? {
        for note in &applied.notes {
            log(format_args!("sandbox: {note}"));
        }
    }
    let mut worker = match &args.register {
        Some(path) => Worker::register(path, args.capacity)?,
        None => Worker::from_env(args.capacity)?,
    };
    let inflight = Arc::new(InFlight::default());
    static SERVED: AtomicUsize = AtomicUsize::new(0);
    // Connections until DRAIN or the acceptor goes away.
    let orphaned = loop {
        match worker.recv()? {
            Event::Conn(conn) => {
                SERVED.fetch_add(1, Ordering::Relaxed);
                *inflight.count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                let done = worker.done_sender();
                let inflight = inflight.clone();
                std::thread::spawn(move || serve(conn, done, inflight));
            }
            Event::Drain => break false,
            Event::Closed => break true,
        }
    };
    // Finish what we have, then exit. Draining, the acceptor bounds this;
    // orphaned, nobody else will, so the drain timeout does.
    let deadline = orphaned.then(|| Instant::now() + args.drain_timeout);
    let mut n = inflight.count.lock().unwrap_or_else(|p| p.into_inner());
    if orphaned && *n > 0 {
        log(format_args!(
            "the acceptor is gone: finishing {} connection(s) (at most {:?})",
            *n, args.drain_timeout
        ));
    }
    while *n > 0 {
        match deadline {
            None => n = inflight.zero.wait(n).unwrap_or_else(|p| p.into_inner()),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    log(format_args!(
                        "drain timeout: exiting with {} connection(s) open",
                        *n
                    ));
                    break;
                }
                n = inflight
                    .zero
                    .wait_timeout(n, left)
                    .map_or_else(|p| p.into_inner().0, |(g, _)| g);
            }
        }
    }
    drop(n);
    log(format_args!(
        "worker {} exiting after {} connections",
        worker.id(),
        SERVED.load(Ordering::Relaxed)
    ));
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            // A person typed this: plain words, with the usage.
            eprintln!("baton-echo: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log(format_args!("{e}"));
            ExitCode::from(e.exit_code())
        }
    }
}
