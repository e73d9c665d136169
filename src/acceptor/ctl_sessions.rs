//! Control sessions: `baton ctl` clients on the control socket (peers
//! checked with SO_PEERCRED, refusals summarised), their JSON-lines
//! requests and the replies; the operations themselves are in `ops.rs`,
//! the numbers in `status.rs`.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Token};
use serde_json::json;
use tracing::{debug, error, info, warn};

use super::ops::accept_local;
use super::{Acceptor, CTL_BASE};
use crate::control::{self, Reply, Request, MAX_LINE};
use crate::pool::State;
use crate::unix::{uid_allowed, Peer};

/// Peers refused on one of the local sockets, logged in summary: the first
/// refusal at once, then at most one line per [`Refusals::EVERY`] with how
/// many were refused since, so that a flood of refused peers cannot flood
/// the log.
#[derive(Debug, Default)]
pub struct Refusals {
    unlogged: u64,
    logged_at: Option<Instant>,
    total: u64,
}

impl Refusals {
    pub const EVERY: Duration = Duration::from_secs(60);

    pub(super) fn refused(&mut self, what: &str, peer: Peer, now: Instant) {
        self.unlogged += 1;
        self.total += 1;
        if self
            .logged_at
            .is_none_or(|t| now.duration_since(t) >= Self::EVERY)
        {
            warn!(
                uid = peer.uid,
                pid = peer.pid,
                refused = self.unlogged,
                total = self.total,
                "{what}: refused a peer whose uid is not allowed (refused: how many since the last such line; at most one line a minute)"
            );
            self.unlogged = 0;
            self.logged_at = Some(now);
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }
}

/// One connected `baton ctl` client.
pub struct CtlClient {
    stream: UnixStream,
    peer: Peer,
    buf: Vec<u8>,
    out: Vec<u8>,
    /// Closed when this passes without a complete request.
    pub deadline: Instant,
    /// Close once `out` is flushed.
    closing: bool,
}

impl CtlClient {
    /// Its socket's fd (handed to the next image by an upgrade).
    pub(super) fn raw_fd(&self) -> std::os::fd::RawFd {
        self.stream.as_raw_fd()
    }
}

impl Acceptor {
    // ---- control socket ------------------------------------------------

    pub(super) fn on_control_accept(&mut self) {
        while let Some((fd, peer)) = accept_local(self.control.as_ref(), "control socket") {
            let mut stream = UnixStream::from(fd);
            if !uid_allowed(peer.uid, self.own_uid, &self.cfg.control_allow_uid) {
                self.ctl_refused
                    .refused("control socket", peer, Instant::now());
                let _ =
                    stream.write_all(&Reply::err("permission denied: uid not allowed").to_line());
                continue;
            }
            let key = self.ctl.vacant_key();
            if let Err(e) = self.poll.registry().register(
                &mut SourceFd(&stream.as_raw_fd()),
                Token(CTL_BASE + key),
                Interest::READABLE,
            ) {
                error!(error = %e, "control socket: cannot watch a client");
                continue;
            }
            debug!(uid = peer.uid, pid = peer.pid, "control client connected");
            self.ctl.insert(CtlClient {
                stream,
                peer,
                buf: Vec::new(),
                out: Vec::new(),
                deadline: Instant::now() + self.cfg.control_idle_timeout,
                closing: false,
            });
        }
    }

    pub(super) fn close_ctl(&mut self, key: usize, why: &str) {
        if !self.ctl.contains(key) {
            return;
        }
        let c = self.ctl.remove(key);
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&c.stream.as_raw_fd()));
        debug!(
            uid = c.peer.uid,
            pid = c.peer.pid,
            why,
            "control client closed"
        );
    }

    pub(super) fn on_ctl_event(&mut self, key: usize, readable: bool, writable: bool) {
        if readable {
            self.ctl_read(key);
        }
        if writable || readable {
            self.ctl_flush(key);
        }
    }

    pub(super) fn ctl_read(&mut self, key: usize) {
        let idle = self.cfg.control_idle_timeout;
        let mut chunk = [0u8; 4096];
        loop {
            let Some(c) = self.ctl.get_mut(key) else {
                return;
            };
            if c.closing {
                return;
            }
            match c.stream.read(&mut chunk) {
                Ok(0) => {
                    self.close_ctl(key, "client closed");
                    return;
                }
                Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.close_ctl(key, &format!("read error: {e}"));
                    return;
                }
            }
            // Answer every complete line, then police the remainder's size.
            while let Some(c) = self.ctl.get_mut(key) {
                let Some(nl) = c.buf.iter().position(|b| *b == b'\n') else {
                    if c.buf.len() > MAX_LINE {
                        warn!(
                            uid = c.peer.uid,
                            pid = c.peer.pid,
                            "control client sent an oversized request"
                        );
                        c.out.extend(
                            Reply::err(format!("request longer than {MAX_LINE} bytes")).to_line(),
                        );
                        c.closing = true;
                        c.buf.clear();
                    }
                    break;
                };
                let line: Vec<u8> = c.buf.drain(..=nl).collect();
                let peer = c.peer;
                c.deadline = Instant::now() + idle;
                let line = line.strip_suffix(b"\n").unwrap_or(&line);
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                let reply = match control::parse_request(line) {
                    Ok(Request::Upgrade { binary }) if self.shutdown.is_none() => {
                        // Answered by the new image (or, if it fails, by
                        // this one), once this round of events is over.
                        info!(uid = peer.uid, pid = peer.pid, binary = ?binary, "control request: upgrade");
                        self.upgrade_asked =
                            Some((binary.map(std::path::PathBuf::from), Some(key)));
                        continue;
                    }
                    Ok(req) => {
                        info!(uid = peer.uid, pid = peer.pid, request = ?req, "control request");
                        self.handle_request(req)
                    }
                    Err(e) => {
                        warn!(uid = peer.uid, pid = peer.pid, error = %e, "control: bad request");
                        Reply::err(e.to_string())
                    }
                };
                if let Some(c) = self.ctl.get_mut(key) {
                    c.out.extend(reply.to_line());
                }
            }
        }
    }

    /// Queues `reply` for control client `key` and sends what it can.
    pub(super) fn ctl_reply(&mut self, key: usize, reply: Reply) {
        if let Some(c) = self.ctl.get_mut(key) {
            c.out.extend(reply.to_line());
        }
        self.ctl_flush(key);
    }

    pub(super) fn ctl_flush(&mut self, key: usize) {
        let Some(c) = self.ctl.get_mut(key) else {
            return;
        };
        while !c.out.is_empty() {
            match c.stream.write(&c.out) {
                Ok(n) => {
                    c.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.close_ctl(key, &format!("write error: {e}"));
                    return;
                }
            }
        }
        let (pending, closing, fd) = (!c.out.is_empty(), c.closing, c.stream.as_raw_fd());
        if closing && !pending {
            self.close_ctl(key, "closed after an error reply");
            return;
        }
        let interest = if pending {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        let _ =
            self.poll
                .registry()
                .reregister(&mut SourceFd(&fd), Token(CTL_BASE + key), interest);
    }

    pub(super) fn handle_request(&mut self, req: Request) -> Reply {
        if self.shutdown.is_some()
            && matches!(
                req,
                Request::Add { .. }
                    | Request::Remove { .. }
                    | Request::Restart { .. }
                    | Request::Reload {}
            )
        {
            return Reply::err("baton is shutting down");
        }
        match req {
            Request::Workers { pool } => {
                let only = match pool.as_deref().map(|n| self.pool_named(Some(n))) {
                    Some(Ok(p)) => Some(p),
                    Some(Err(e)) => return Reply::err(format!("workers: {e}")),
                    None => None,
                };
                Reply::ok(json!(self.worker_rows(only)))
            }
            Request::Status {} => Reply::ok(self.status()),
            Request::Metrics {} => Reply::ok(json!(self.metrics())),
            Request::Add { count, pool } => {
                if count == 0 || count > 1024 {
                    return Reply::err("add: count must be between 1 and 1024");
                }
                let p = match self.pool_named(pool.as_deref()) {
                    Ok(p) => p,
                    Err(e) => return Reply::err(format!("add: {e}")),
                };
                match self.add_workers(p, count) {
                    Ok(ids) => Reply::ok(json!({ "added": ids })),
                    Err(e) => Reply::err(e.to_string()),
                }
            }
            Request::Remove {
                id,
                count,
                drain_timeout_ms,
                pool,
            } => {
                // By id, any pool will do unless one is named; by count,
                // the pool must be known.
                let p = match (&pool, id) {
                    (None, Some(_)) => None,
                    _ => match self.pool_named(pool.as_deref()) {
                        Ok(p) => Some(p),
                        Err(e) => return Reply::err(format!("remove: {e}")),
                    },
                };
                let timeout = drain_timeout_ms.map(Duration::from_millis);
                match self.remove_workers(p, id, count, timeout) {
                    Ok(ids) => {
                        let emptied: Vec<String> = self
                            .pools
                            .iter()
                            .filter(|(_, ps)| {
                                !ps.removing
                                    && ps.pool.workers.iter().any(|(_, w)| ids.contains(&w.id()))
                                    && ps
                                        .pool
                                        .workers
                                        .iter()
                                        .all(|(_, w)| w.state() == State::Draining)
                            })
                            .map(|(_, ps)| ps.cfg.name.clone())
                            .collect();
                        if let Some(name) = emptied.first() {
                            let warning = format!("that was the last worker of pool `{name}`: none of its connections will be served until a worker is added (`baton ctl add`) or registers");
                            warn!(workers = ?ids, pool = %name, "{warning}");
                            Reply::ok(json!({ "draining": ids, "warning": warning }))
                        } else {
                            Reply::ok(json!({ "draining": ids }))
                        }
                    }
                    Err(e) => Reply::err(e.to_string()),
                }
            }
            Request::Reload {} => match self.reload() {
                Ok(changes) => {
                    info!(changes = ?changes, "configuration reloaded");
                    Reply::ok(json!({ "changes": changes }))
                }
                Err(e) => {
                    error!(error = %e, "reload failed; the running configuration is unchanged");
                    Reply::err(format!("reload failed, nothing changed: {e}"))
                }
            },
            Request::Upgrade { .. } => Reply::err("baton is shutting down: no upgrade now"),
            Request::DrainHost { grace_ms } => self.drain_host(grace_ms.map(Duration::from_millis)),
            Request::Restart { pool } => {
                let p = match self.pool_named(pool.as_deref()) {
                    Ok(p) => p,
                    Err(e) => return Reply::err(format!("restart: {e}")),
                };
                if self.pools[p].rolling() {
                    return Reply::err("a rolling restart of that pool is already under way");
                }
                let n = self.begin_rolling(p);
                info!(workers = n, pool = %self.pools[p].cfg.name, "rolling restart started");
                Reply::ok(json!({ "replacing": n }))
            }
        }
    }
}
