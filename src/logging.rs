//! Log set-up: tracing to stderr, human-readable or JSON lines, colour only
//! when stderr is a terminal. The workers baton spawns get the format in
//! `BATON_LOG_FORMAT` (see `baton_sdk::log`) and log in the same one.

use std::io::IsTerminal;

use tracing_subscriber::filter::ParseError;
use tracing_subscriber::util::{SubscriberInitExt, TryInitError};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Why the logs could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// `RUST_LOG` is set to something that is not a filter.
    #[error("RUST_LOG={value:?}: {source}")]
    EnvFilter { value: String, source: ParseError },
    /// `--log-level` (or `log-level` in the file) is not a filter.
    #[error("--log-level {value:?}: {source}")]
    Level { value: String, source: ParseError },
    /// A global subscriber (or `log` logger) is already installed.
    #[error(transparent)]
    Install(#[from] TryInitError),
}

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `level`.
pub fn init(format: LogFormat, level: &str) -> Result<(), LogError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => {
            EnvFilter::try_new(&v).map_err(|source| LogError::EnvFilter { value: v, source })?
        }
        _ => EnvFilter::try_new(level).map_err(|source| LogError::Level {
            value: level.to_string(),
            source,
        })?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(format == LogFormat::Text && std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.finish().try_init()?,
        LogFormat::Json => builder.json().finish().try_init()?,
    }
    Ok(())
}
