//! What the proxy speaks: the boundary HTTP mode plugs into.
//!
//! Each mode is one module behind [`select`]: TCP mode is
//! [`crate::tcp`] driven by [`crate::server`]. HTTP mode (phase 2) will be
//! built on the `baton-http` crate (request heads, framing rules, limits,
//! response writing, shared with baton-static), which does not exist yet;
//! until then asking for it is an error at start-up, never a fallback to
//! something else.

use crate::config::ModeArg;

/// A mode this build can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Tcp,
}

/// A mode that is not built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModeError {
    #[error(
        "--mode http: the HTTP reverse proxy is not built yet (it comes with the baton-http crate); \
         this build relays TCP only: pass --mode tcp"
    )]
    HttpNotBuilt,
}

/// The mode for `--mode`, or why it cannot run.
pub fn select(arg: ModeArg) -> Result<Mode, ModeError> {
    match arg {
        ModeArg::Tcp => Ok(Mode::Tcp),
        ModeArg::Http => http::start(),
    }
}

/// HTTP mode's entry point, a placeholder that refuses (see the module
/// docs).
mod http {
    use super::{Mode, ModeError};

    pub(super) fn start() -> Result<Mode, ModeError> {
        Err(ModeError::HttpNotBuilt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_is_refused_until_built() {
        assert_eq!(select(ModeArg::Tcp), Ok(Mode::Tcp));
        let e = select(ModeArg::Http).unwrap_err().to_string();
        assert!(
            e.contains("not built yet") && e.contains("--mode tcp"),
            "{e}"
        );
    }
}
