//! Intake: listeners, the accept round, the pending queue, the fd budget,
//! and the hand-off of each round's connections to their workers (batched
//! CONNS).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

use baton_sdk::proto::{ConnInfo, MAX_BATCH};
use baton_sdk::Msg;
use mio::unix::SourceFd;
use mio::{Interest, Token};
use tracing::{debug, error, warn};

use super::*;
use crate::pool::Held;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns it.
pub(super) fn raise_nofile() -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                usize::try_from(hard).unwrap_or(usize::MAX)
            } else {
                usize::try_from(soft).unwrap_or(usize::MAX)
            }
        }
        Err(_) => 1024,
    }
}

/// How many fds this process has open (from /proc/self/fd; the directory's
/// own fd is not counted).
pub(super) fn count_open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(16, |d| d.count().saturating_sub(1))
}

impl Acceptor {
    /// Connections the acceptor holds fds for: waiting for a worker, sent
    /// and not yet acknowledged, or parked.
    pub(super) fn held(&self) -> usize {
        self.held_active() + self.parked.len()
    }

    /// Held connections that cannot be let go to make room: all but the
    /// parked ones.
    pub(super) fn held_active(&self) -> usize {
        self.pools
            .iter()
            .map(|(_, ps)| ps.pending.len() + ps.pool.unacked())
            .sum()
    }

    /// How many connections the acceptor may hold: its fd limit less the
    /// fds it holds anyway and [`FD_RESERVE`].
    pub(super) fn fd_budget(&self) -> usize {
        let fixed = self.fd_fixed
            + self.listeners.len()
            + self.pools.len()
            + self
                .pools
                .iter()
                .map(|(_, ps)| ps.pool.workers.len())
                .sum::<usize>()
            + self.ctl.len()
            + self.scrapers.len()
            + usize::from(self.metrics_listener.is_some())
            + self.health.fds();
        self.fd_limit.saturating_sub(fixed + FD_RESERVE)
    }

    // ---- moving connections -------------------------------------------

    /// Assigns `held` to a worker with room; gives it back if there is
    /// none. The CONN goes out with the worker's other new connections at
    /// the end of the round ([`Acceptor::flush`]), or at once when a full
    /// batch is waiting.
    pub(super) fn dispatch(&mut self, p: usize, held: Held, now: Instant) -> Result<(), Held> {
        let ps = &mut self.pools[p];
        let Some(key) = ps.pool.pick(now) else {
            return Err(held);
        };
        let w = &mut ps.pool.workers[key];
        w.assign(held, now);
        self.stats.handed_off += 1;
        ps.stats.handed_off += 1;
        if w.outbox_len() >= MAX_BATCH {
            self.flush(Wk { pool: p, key });
        }
        Ok(())
    }

    /// Sends a worker the connections assigned to it: version 2, up to
    /// [`MAX_BATCH`] in one CONNS message (one `sendmsg` for all their fds);
    /// version 1, one CONN each. A full channel keeps the rest for when it
    /// is writable (they stay unacknowledged, so they are counted, timed
    /// and given to another worker if this one leaves).
    pub(super) fn flush(&mut self, wk: Wk) {
        loop {
            let Some(w) = self
                .pools
                .get_mut(wk.pool)
                .and_then(|ps| ps.pool.workers.get_mut(wk.key))
            else {
                return;
            };
            if w.outbox_len() == 0 {
                return;
            }
            let batch = if w.chan().version() >= 2 {
                MAX_BATCH
            } else {
                1
            };
            let n = w.outbox_len().min(batch);
            let (infos, fds) = w.next_batch(n);
            self.stats.sends += 1;
            let sent = match infos.len() {
                0 => Ok(()),
                1 if batch == 1 => w.chan().send_fds(&Msg::Conn(infos[0]), &fds),
                _ => w.chan().send_fds(&Msg::Conns(infos), &fds),
            };
            match sent {
                Ok(()) => {
                    w.batch_sent(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Its queue is full: no more for it until it is
                    // writable again.
                    self.set_blocked(wk, true);
                    return;
                }
                Err(e) => {
                    self.close_worker(wk, Gone::SendFailed(format!("CONN could not be sent: {e}")));
                    return;
                }
            }
        }
    }

    /// Sends every worker what was assigned to it in this round.
    pub(super) fn flush_all(&mut self) {
        let wks: Vec<Wk> = self
            .pools
            .iter()
            .flat_map(|(p, ps)| {
                ps.pool
                    .workers
                    .iter()
                    .filter(|(_, w)| w.outbox_len() > 0 && !w.blocked())
                    .map(move |(key, _)| Wk { pool: p, key })
            })
            .collect();
        for wk in wks {
            self.flush(wk);
        }
    }

    /// Marks a worker whose channel send buffer is full (or no longer). Only
    /// a blocked channel is watched for writability: a writable event for
    /// every message a worker reads would be wasted wake-ups.
    pub(super) fn set_blocked(&mut self, wk: Wk, blocked: bool) {
        let Some(w) = self
            .pools
            .get_mut(wk.pool)
            .and_then(|ps| ps.pool.workers.get_mut(wk.key))
        else {
            return;
        };
        if w.blocked() == blocked {
            return;
        }
        w.set_blocked(blocked);
        let interest = if blocked {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        if let Err(e) = self.poll.registry().reregister(
            &mut SourceFd(&w.chan().as_raw_fd()),
            wk.token(),
            interest,
        ) {
            let id = w.id();
            error!(worker = id, error = %e, "epoll_ctl on a worker channel failed");
        }
    }

    /// Moves queued connections to workers, then accepts new ones while
    /// there is room; pauses and resumes the listeners accordingly. Each
    /// pool in turn: a pool whose workers are full pauses only its own
    /// listeners.
    pub(super) fn pump(&mut self) {
        let now = Instant::now();
        let keys: Vec<usize> = self.pools.iter().map(|(k, _)| k).collect();
        for &p in &keys {
            while let Some(h) = self.pools[p].pending.pop_front() {
                if let Err(h) = self.dispatch(p, h, now) {
                    self.pools[p].pending.push_front(h);
                    break;
                }
            }
        }
        if self.shutdown.is_some() {
            self.flush_all();
            for p in keys {
                let ps = &self.pools[p];
                if ps.pending.is_empty() && !ps.drain_sent {
                    self.send_drain(p);
                }
            }
            return;
        }
        for &p in &keys {
            let ps = &self.pools[p];
            let mut accepting = self.emfile_until.is_none()
                && !ps.removing
                && ps.pending.is_empty()
                && ps.pool.has_capacity()
                && self.held_active() < self.fd_budget();
            if accepting {
                self.set_listening(p, true);
                accepting = self.accept_all(p, now);
            }
            if !accepting {
                self.set_listening(p, false);
            }
            let ps = &mut self.pools[p];
            let full = self.emfile_until.is_none() && !ps.removing && !ps.pool.has_capacity();
            if full != ps.paused_for_capacity {
                ps.paused_for_capacity = full;
                if full {
                    self.stats.capacity_pauses += 1;
                    debug!(
                        pool = %ps.cfg.name,
                        pending = ps.pending.len(),
                        "every worker of the pool is full: its accepting paused"
                    );
                } else {
                    debug!(pool = %ps.cfg.name, "capacity freed: accepting resumed");
                }
            }
        }
        self.flush_all();
        let fd_full = self.held_active() >= self.fd_budget();
        if fd_full != self.paused_for_fds {
            self.paused_for_fds = fd_full;
            if fd_full {
                self.stats.fd_pauses += 1;
                if self
                    .fd_logged
                    .is_none_or(|t| now.duration_since(t) >= EMFILE_LOG_EVERY)
                {
                    self.fd_logged = Some(now);
                    warn!(
                        held = self.held(),
                        fd_limit = self.fd_limit,
                        reserve = FD_RESERVE,
                        pauses = self.stats.fd_pauses,
                        "holding as many connections as the fd limit allows: accepting paused until workers acknowledge (clients wait in the backlog)"
                    );
                }
            }
        }
    }

    /// Accepts on every listener of pool `p` until EAGAIN. Returns false
    /// if it had to stop early (no room left, or out of fds).
    pub(super) fn accept_all(&mut self, p: usize, now: Instant) -> bool {
        let budget = self.fd_budget();
        let mut holding = self.held();
        let mine: Vec<usize> = self
            .listeners
            .iter()
            .filter(|(_, l)| l.pool == p)
            .map(|(k, _)| k)
            .collect();
        for i in mine {
            loop {
                if !self.pools[p].pool.has_capacity() {
                    return false;
                }
                if holding >= budget {
                    // Idle parked connections make room; nothing else may.
                    if !self.evict_parked() {
                        return false;
                    }
                    holding -= 1;
                }
                let l = &self.listeners[i];
                match l.sock.accept() {
                    Ok((stream, peer)) => {
                        let local = if l.addr.ip().is_unspecified() {
                            stream.local_addr().unwrap_or(l.addr)
                        } else {
                            l.addr
                        };
                        let id = self.next_conn_id;
                        self.next_conn_id += 1;
                        self.stats.accepted += 1;
                        self.pools[p].stats.accepted += 1;
                        let fd: OwnedFd = stream.into();
                        let held = Held {
                            info: ConnInfo {
                                id,
                                listener: i as u16,
                                peer,
                                local,
                            },
                            fd,
                        };
                        holding += 1;
                        if let Err(h) = self.dispatch(p, held, now) {
                            self.pools[p].pending.push_back(h);
                            return false;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => match e.raw_os_error() {
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                            self.stats.emfile_pauses += 1;
                            self.emfile_unlogged += 1;
                            let now = Instant::now();
                            if self
                                .emfile_logged
                                .is_none_or(|t| now.duration_since(t) >= EMFILE_LOG_EVERY)
                            {
                                warn!(
                                    error = %e,
                                    retry_ms = EMFILE_RETRY.as_millis() as u64,
                                    pauses = self.emfile_unlogged,
                                    "accept: out of file descriptors; pausing accepting and retrying (clients wait in the backlog)"
                                );
                                self.emfile_logged = Some(now);
                                self.emfile_unlogged = 0;
                            }
                            self.emfile_until = Some(now + EMFILE_RETRY);
                            return false;
                        }
                        // The client gave up between SYN and accept, or a
                        // network error on that one connection: next.
                        Some(
                            libc::ECONNABORTED
                            | libc::EPROTO
                            | libc::EPERM
                            | libc::ENETDOWN
                            | libc::ENOPROTOOPT
                            | libc::EHOSTDOWN
                            | libc::ENONET
                            | libc::EHOSTUNREACH
                            | libc::EOPNOTSUPP
                            | libc::ENETUNREACH,
                        ) => continue,
                        _ => {
                            error!(error = %e, listener = %l.addr, "accept failed");
                            break;
                        }
                    },
                }
            }
        }
        true
    }

    pub(super) fn set_listening(&mut self, p: usize, on: bool) {
        for (i, l) in self.listeners.iter_mut() {
            if l.registered == on || l.pool != p {
                continue;
            }
            let r = if on {
                self.poll.registry().register(
                    &mut l.sock,
                    Token(LISTENER_BASE + i),
                    Interest::READABLE,
                )
            } else {
                self.poll.registry().deregister(&mut l.sock)
            };
            match r {
                Ok(()) => l.registered = on,
                Err(e) => error!(error = %e, listener = %l.addr, "epoll_ctl on a listener failed"),
            }
        }
    }
}
