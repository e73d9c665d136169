//! # baton-static: HTTP/1.1 static files behind baton's acceptor
//!
//! One worker process runs one [mio] event loop on one thread; baton spawns
//! one worker per CPU. The acceptor accepts TCP connections and hands each
//! socket over the worker channel ([`baton_sdk`]); from then on the worker
//! talks to the client directly, and reports the connection DONE once its
//! socket is closed.
//!
//! * [`config`]: the command line (`--help` explains every flag).
//! * [`server`]: the event loop: worker channel, signals, connections, timers.
//! * [`conn`]: one client connection: its PROXY header (`--accept-proxy`),
//!   reading, pipelining, writing with `sendfile(2)`, lingering close.
//! * [`http`]: answering one parsed request (files, conditionals, ranges,
//!   errors). Request heads, their limits and body framing come from
//!   `baton-http`, the HTTP crate baton's workers share.
//! * [`path`]: percent-decoding and normalising request paths.
//! * [`fs`]: opening files beneath the root directory (`openat2`
//!   `RESOLVE_BENEATH`).
//! * [`site`]: what is served: a directory, or the demo site embedded in the
//!   binary.
//!
//! Nothing on the request path panics on client input: every parse result is
//! matched, and errors become HTTP statuses.

pub mod config;
pub mod conn;
pub mod fs;
pub mod http;
pub mod path;
pub mod server;
pub mod site;

/// The whole `baton-static` program: parses `args` (the first is the
/// program name), sets up logging, serves until drained. The `baton` binary
/// embeds it too (`baton static-worker ...`), so that `cargo run` alone
/// serves the demo site.
pub fn main_from<I, T>(args: I) -> std::process::ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::Parser;
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let cfg = config::Config::parse_from(args);
    // The acceptor's log format (BATON_LOG_FORMAT, text by default) on the
    // stderr it shares with us; colour only on a terminal. RUST_LOG
    // filters.
    let json = baton_sdk::log::json_from_env();
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(!json && std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        );
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    let span = tracing::info_span!("baton-static", pid = std::process::id());
    let _entered = span.enter();
    // Confine first (joining the acceptor would), so that what the sandbox
    // notes is logged in our format.
    match baton_sdk::sandbox::apply_from_env() {
        Ok(Some(applied)) => {
            for note in &applied.notes {
                tracing::info!("sandbox: {note}");
            }
        }
        Ok(None) => {}
        Err(e) => {
            tracing::error!("{e}");
            return std::process::ExitCode::from(baton_sdk::EXIT_SANDBOX);
        }
    }
    match server::run(cfg) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::from(e.exit_code())
        }
    }
}
