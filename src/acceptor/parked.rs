//! Parked connections (protocol v2 PARK): idle keep-alive connections
//! handed back by workers, held by the acceptor without reading from them,
//! given to a worker again on the client's next request, closed on hang-up,
//! at their idle timeout, or to make room.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use baton_sdk::proto::ConnInfo;
use mio::unix::SourceFd;
use mio::{Interest, Token};
use tracing::warn;

use super::*;
use crate::pool::Held;

/// An idle keep-alive connection the acceptor holds for its client's next
/// request.
pub(super) struct ParkedConn {
    /// The pool it came from, and goes back to.
    pub(super) pool: usize,
    pub(super) info: ConnInfo,
    pub(super) fd: OwnedFd,
    pub(super) deadline: Instant,
}

/// Whether `fd`, handed back by a worker as connection `info`, is that TCP
/// connection: a stream socket whose local and peer addresses are the
/// connection's. `Ok(false)`: it is, but its client is gone (no peer any
/// more). `Err`: it is something else, which no other worker may be given.
pub(super) fn parked_fd_is(fd: &OwnedFd, info: &ConnInfo) -> Result<bool, String> {
    let s = socket2::SockRef::from(fd);
    match s.r#type() {
        Ok(t) if t == socket2::Type::STREAM => {}
        Ok(_) => return Err("a socket that is not a stream".to_string()),
        Err(e) => return Err(format!("an fd that is not a socket ({e})")),
    }
    let local = s.local_addr().ok().and_then(|a| a.as_socket());
    if local != Some(info.local) {
        return Err(format!(
            "a socket whose local address is {local:?}, not {}",
            info.local
        ));
    }
    match s.peer_addr() {
        Ok(a) if a.as_socket() == Some(info.peer) => Ok(true),
        Ok(a) => Err(format!(
            "a socket connected to {:?}, not {}",
            a.as_socket(),
            info.peer
        )),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(false),
        Err(e) => Err(format!("a socket without a peer ({e})")),
    }
}

impl Acceptor {
    // ---- parked connections -------------------------------------------

    /// Holds a connection a worker handed back idle, watching it for the
    /// client's next request. With the fd budget full, the connection idle
    /// the longest makes room (as nginx reuses idle connections): a new
    /// client never waits because old ones sit idle.
    pub(super) fn park(
        &mut self,
        pool: usize,
        p: baton_sdk::proto::Parked,
        fd: OwnedFd,
        now: Instant,
    ) {
        if self.shutdown.is_some() || self.pools.get(pool).is_none_or(|ps| ps.removing) {
            self.stats.parked_closed += 1;
            return;
        }
        if self.held() >= self.fd_budget() && !self.evict_parked() {
            // Nothing to let go: this one cannot be held.
            self.stats.parked_evicted += 1;
            return;
        }
        let idle = match p.idle_ms {
            0 => PARKED_IDLE,
            ms => Duration::from_millis(u64::from(ms)),
        };
        let deadline = now + idle;
        let key = self.parked.vacant_key();
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&fd.as_raw_fd()),
            Token(PARKED_BASE + key),
            Interest::READABLE,
        ) {
            warn!(error = %e, conn = p.info.id, "cannot watch a parked connection; closing it");
            return;
        }
        self.parked.insert(ParkedConn {
            pool,
            info: p.info,
            fd,
            deadline,
        });
        self.parked_order.insert((deadline, key));
        self.stats.parked += 1;
    }

    /// Takes a parked connection out of the set (and out of epoll).
    pub(super) fn unpark(&mut self, key: usize) -> Option<ParkedConn> {
        let p = self.parked.try_remove(key)?;
        self.parked_order.remove(&(p.deadline, key));
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&p.fd.as_raw_fd()));
        Some(p)
    }

    /// Closes the parked connection idle the longest; false if none.
    pub(super) fn evict_parked(&mut self) -> bool {
        let Some(&(_, key)) = self.parked_order.first() else {
            return false;
        };
        self.unpark(key);
        self.stats.parked_evicted += 1;
        true
    }

    /// A parked connection became readable (the client's next request) or
    /// hung up.
    pub(super) fn on_parked_event(&mut self, key: usize, closed: bool) {
        let Some(p) = self.unpark(key) else {
            return;
        };
        let Some(ps) = self.pools.get_mut(p.pool).filter(|ps| !ps.removing) else {
            // Its pool was removed by a reload: nobody to serve it.
            self.stats.parked_closed += 1;
            return;
        };
        if closed {
            // Dropped: closed.
            self.stats.parked_closed += 1;
            return;
        }
        self.stats.unparked += 1;
        // Like a new connection, to its pool's least loaded worker (pump).
        ps.pending.push_back(Held {
            info: p.info,
            fd: p.fd,
        });
    }

    /// Closes every parked connection whose idle time ran out.
    pub(super) fn expire_parked(&mut self, now: Instant) {
        while let Some(&(deadline, key)) = self.parked_order.first() {
            if deadline > now {
                break;
            }
            self.unpark(key);
            self.stats.parked_expired += 1;
        }
    }

    /// Closes the parked connections of pool `p`, or of every pool.
    pub(super) fn close_all_parked(&mut self, p: Option<usize>) {
        let keys: Vec<usize> = self
            .parked
            .iter()
            .filter(|(_, c)| p.is_none_or(|p| c.pool == p))
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            self.unpark(key);
            self.stats.parked_closed += 1;
        }
    }
}
