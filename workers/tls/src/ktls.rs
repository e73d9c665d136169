//! Does this kernel offer kTLS (`TCP_ULP` "tls")?
//!
//! With kTLS the kernel encrypts TLS records itself once user space has
//! done the handshake and handed it the traffic keys, so `sendfile(2)`
//! keeps working on a TLS connection (baton-static's large bodies). This
//! module only **detects** it, at run time, for a start-up log line:
//!
//! 1. `/proc/sys/net/ipv4/tcp_available_ulp` lists the ULPs registered
//!    now; `tls` there means yes.
//! 2. Otherwise the `tls` module may still be loadable (the kernel loads
//!    `tcp-ulp-tls` on demand for a process with `CAP_NET_ADMIN`), so
//!    [`probe`] tries `setsockopt(TCP_ULP, "tls")` on a connected loopback
//!    socket: only that says for sure. The probe costs a socket pair on
//!    127.0.0.1 and is meant for start-up, before any sandbox.
//!
//! The key hand-off (rustls's `dangerous_extract_secrets` into
//! `TLS_TX`/`TLS_RX` `setsockopt`s, with record sequence numbers, per
//! cipher suite) is **not implemented**: this machine's kernel has no
//! `tls` ULP to test it against, and an untested key path is worse than
//! none. Connections are encrypted by rustls in user space; a worker that
//! serves TLS falls back from `sendfile` to read-and-write.

use std::fmt;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;

const AVAILABLE_ULP: &str = "/proc/sys/net/ipv4/tcp_available_ulp";

/// What [`probe`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ktls {
    /// `tls` is registered (listed in `tcp_available_ulp`).
    Available,
    /// Not listed, but `setsockopt(TCP_ULP, "tls")` worked: the module was
    /// loaded on demand.
    Loadable,
    /// The kernel refused: with the reason (errno of the probe, or that
    /// the list lacks it and probing was not asked for).
    Unavailable(String),
}

impl Ktls {
    pub fn is_available(&self) -> bool {
        matches!(self, Ktls::Available | Ktls::Loadable)
    }
}

impl fmt::Display for Ktls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ktls::Available => f.write_str("kTLS available (tcp_available_ulp lists tls)"),
            Ktls::Loadable => f.write_str("kTLS available (the tls module loaded on demand)"),
            Ktls::Unavailable(why) => write!(f, "kTLS unavailable: {why}"),
        }
    }
}

/// Parses the content of `tcp_available_ulp` (space-separated names).
pub fn ulp_list_has_tls(list: &str) -> bool {
    list.split_whitespace().any(|w| w == "tls")
}

/// Looks at `tcp_available_ulp` only (no socket).
pub fn listed() -> Ktls {
    match std::fs::read_to_string(AVAILABLE_ULP) {
        Ok(s) if ulp_list_has_tls(&s) => Ktls::Available,
        Ok(s) => Ktls::Unavailable(format!("{AVAILABLE_ULP} lists only \"{}\"", s.trim())),
        Err(e) => Ktls::Unavailable(format!("cannot read {AVAILABLE_ULP}: {e}")),
    }
}

/// The list, then a real `setsockopt(TCP_ULP, "tls")` on a loopback
/// connection when the list lacks it.
pub fn probe() -> Ktls {
    let listed = listed();
    if listed.is_available() {
        return listed;
    }
    match try_ulp() {
        Ok(()) => Ktls::Loadable,
        Err(e) => Ktls::Unavailable(format!("setsockopt(TCP_ULP, \"tls\") failed: {e}")),
    }
}

fn try_ulp() -> io::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let client = TcpStream::connect(listener.local_addr()?)?;
    let _server = listener.accept()?;
    let name = b"tls";
    // SAFETY: `client` is an open TCP socket for the whole call; the value
    // pointer and length describe the 3-byte `name` array.
    let rc = unsafe {
        libc::setsockopt(
            client.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_list() {
        assert!(ulp_list_has_tls("espintcp mptcp tls\n"));
        assert!(!ulp_list_has_tls("espintcp mptcp\n"));
        assert!(!ulp_list_has_tls("tlsx"));
    }

    #[test]
    fn probe_gives_a_reason() {
        let k = probe();
        println!("{k}");
        if let Ktls::Unavailable(why) = &k {
            assert!(!why.is_empty());
        }
    }
}
