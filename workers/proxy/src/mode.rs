//! What the proxy speaks: the boundary between the two modes.
//!
//! Each mode is one module driven by the same event loop
//! ([`crate::server`]), upstream list, balancer and shared health: TCP mode
//! is [`crate::tcp`] (bytes both ways, spliced; copied through rustls
//! when the pool terminates TLS, [`crate::tls_relay`]), HTTP mode is
//! [`crate::http`] (requests one by one, over keep-alive pools, on the
//! `baton-http` crate).

use crate::config::ModeArg;

/// A mode this build can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Tcp,
    Http,
}

impl Mode {
    /// File descriptors one client connection costs: for TCP the two
    /// sockets and two pipes (with TLS no pipes: fewer; this is the most);
    /// for HTTP the two sockets and a share of the pool.
    pub fn fds_per_conn(self) -> u32 {
        match self {
            Mode::Tcp => 6,
            Mode::Http => 3,
        }
    }
}

/// The mode for `--mode`.
pub fn select(arg: ModeArg) -> Mode {
    match arg {
        ModeArg::Tcp => Mode::Tcp,
        ModeArg::Http => Mode::Http,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_modes_are_built() {
        assert_eq!(select(ModeArg::Tcp), Mode::Tcp);
        assert_eq!(select(ModeArg::Http), Mode::Http);
    }
}
