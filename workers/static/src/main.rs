//! `baton-static`: the binary. Everything lives in the library; see
//! `baton_static` (and `baton-static --help`).

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use baton_static::config::Config;

fn main() -> ExitCode {
    let cfg = Config::parse();
    // Plain text lines on stderr: the acceptor passes them through as
    // worker output. RUST_LOG filters them.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let span = tracing::info_span!("baton-static", pid = std::process::id());
    let _entered = span.enter();
    match baton_static::server::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
