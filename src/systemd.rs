//! systemd integration, through the `sd-notify` crate: socket activation
//! (`LISTEN_FDS`, `LISTEN_FDNAMES`) and the notify protocol
//! (`Type=notify-reload`: `READY=1`, `RELOADING=1` with `MONOTONIC_USEC`,
//! `STOPPING=1`, `STATUS=`, `MAINPID=`).
//!
//! Without `NOTIFY_SOCKET` every notification is a no-op, and without
//! `LISTEN_PID` naming this process no socket is inherited, so none of this
//! changes a baton started by hand.
//!
//! **Socket activation.** Each inherited socket must be a listening TCP
//! socket. It serves the configured listener whose address it is bound to;
//! one that matches no configured address serves the pool its
//! `FileDescriptorName=` names (so a `.socket` unit can add an address the
//! config file does not list); any other is refused with a log line and
//! closed. A configured address no inherited socket serves is bound as
//! usual. The variables are removed from the environment, so workers do not
//! see them.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};

use sd_notify::NotifyState;
use tracing::{debug, warn};

/// A listening socket the service manager passed (socket activation).
#[derive(Debug)]
pub struct InheritedListener {
    /// `FileDescriptorName=` of its socket unit (systemd's default is the
    /// unit's name).
    pub name: String,
    pub addr: SocketAddr,
    pub fd: OwnedFd,
}

/// Takes the sockets of socket activation, if this process was given any,
/// and removes `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` from the
/// environment. Sockets that are not listening TCP sockets are logged and
/// closed.
///
/// Call it while the process is single-threaded (it changes the
/// environment), before anything else opens a file descriptor.
pub fn take_listeners() -> Vec<InheritedListener> {
    // SAFETY: called from main() before any thread is spawned, as the
    // function's doc requires: nothing reads the environment concurrently.
    let fds = match unsafe { sd_notify::listen_fds_with_names_and_unset_env() } {
        Ok(fds) => fds.collect::<Vec<_>>(),
        Err(e) => {
            warn!(error = %e, "LISTEN_FDS/LISTEN_PID are malformed: no socket inherited");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for (raw, name) in fds {
        // SAFETY: sd_listen_fds' contract: the service manager passed these
        // descriptors to this process (LISTEN_PID is ours), and nothing else
        // in this process owns them; each is taken once.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let s = socket2::SockRef::from(&fd);
        let listening =
            s.r#type().ok() == Some(socket2::Type::STREAM) && s.is_listener().unwrap_or(false);
        match (listening, s.local_addr().ok().and_then(|a| a.as_socket())) {
            (true, Some(addr)) => {
                if let Err(e) = s.set_nonblocking(true) {
                    warn!(fd = raw, name = %name, error = %e, "inherited socket cannot be made non-blocking; closed");
                    continue;
                }
                out.push(InheritedListener { name, addr, fd });
            }
            _ => warn!(
                fd = raw,
                name = %name,
                "inherited socket is not a listening TCP socket; closed (baton takes TCP listeners from systemd)"
            ),
        }
    }
    out
}

/// Sends `states` to the service manager, if there is one; failures are
/// logged, never fatal.
pub fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    } else {
        debug!(states = ?states, "notified the service manager");
    }
}

/// `RELOADING=1` with `MONOTONIC_USEC` (which `Type=notify-reload` needs).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(e) => {
            warn!(error = %e, "cannot read CLOCK_MONOTONIC for RELOADING=1");
            notify(&[NotifyState::Reloading]);
        }
    }
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STOPPING=1`.
pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// Sends `READY=1` (with its status line) when dropped: after a reload,
/// whichever way it ends.
pub struct ReadyWhenDropped(pub &'static str);

impl Drop for ReadyWhenDropped {
    fn drop(&mut self) {
        ready(self.0);
    }
}
