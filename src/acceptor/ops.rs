//! Runtime operations of the acceptor: the control socket (`baton ctl`),
//! workers that register themselves, adding, removing (with drain) and
//! rolling-restarting workers, and the numbers behind `status` and
//! `metrics`.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use baton_sdk::Channel;
use mio::unix::SourceFd;
use mio::{Interest, Token};
use serde_json::json;
use tracing::{debug, error, info, warn};

use super::{Acceptor, CTL_BASE};
use crate::config::Config;
use crate::control::{self, Reply, Request, WorkerRow, MAX_LINE};
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

    fn refused(&mut self, what: &str, peer: Peer, now: Instant) {
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

    fn ctl_read(&mut self, key: usize) {
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
                    Ok(req) => {
                        info!(uid = peer.uid, pid = peer.pid, request = ?req, "control request");
                        self.handle_request(req)
                    }
                    Err(e) => {
                        warn!(uid = peer.uid, pid = peer.pid, error = %e, "control: bad request");
                        Reply::err(e)
                    }
                };
                if let Some(c) = self.ctl.get_mut(key) {
                    c.out.extend(reply.to_line());
                }
            }
        }
    }

    fn ctl_flush(&mut self, key: usize) {
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

    fn handle_request(&mut self, req: Request) -> Reply {
        if self.shutdown.is_some()
            && matches!(
                req,
                Request::Add { .. }
                    | Request::Remove { .. }
                    | Request::Restart {}
                    | Request::Reload {}
            )
        {
            return Reply::err("baton is shutting down");
        }
        match req {
            Request::Workers {} => Reply::ok(json!(self.worker_rows())),
            Request::Status {} => Reply::ok(self.status()),
            Request::Metrics {} => Reply::ok(json!(self.metrics())),
            Request::Add { count } => {
                if count == 0 || count > 1024 {
                    return Reply::err("add: count must be between 1 and 1024");
                }
                match self.add_workers(count) {
                    Ok(ids) => Reply::ok(json!({ "added": ids })),
                    Err(e) => Reply::err(e),
                }
            }
            Request::Remove {
                id,
                count,
                drain_timeout_ms,
            } => {
                match self.remove_workers(id, count, drain_timeout_ms.map(Duration::from_millis)) {
                    Ok(ids) => {
                        let left = self
                            .pool
                            .workers
                            .iter()
                            .filter(|(_, w)| w.state != State::Draining)
                            .count();
                        if left == 0 {
                            let warning = "that was the last worker: no connection will be served until a worker is added (`baton ctl add`) or registers";
                            warn!(workers = ?ids, "{warning}");
                            Reply::ok(json!({ "draining": ids, "warning": warning }))
                        } else {
                            Reply::ok(json!({ "draining": ids }))
                        }
                    }
                    Err(e) => Reply::err(e),
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
            Request::Restart {} => {
                if self.rolling_current.is_some() || !self.rolling.is_empty() {
                    return Reply::err("a rolling restart is already under way");
                }
                self.rolling = self
                    .slots
                    .iter()
                    .filter(|(_, s)| !s.retired)
                    .map(|(k, _)| k)
                    .collect();
                let n = self.rolling.len();
                info!(workers = n, "rolling restart started");
                Reply::ok(json!({ "replacing": n }))
            }
        }
    }

    // ---- adding and removing workers -------------------------------------

    /// Spawns `count` workers from the pool's command; returns their ids.
    pub(super) fn add_workers(&mut self, count: u32) -> Result<Vec<u32>, String> {
        let mut ids = Vec::new();
        for _ in 0..count {
            match self.add_slot() {
                Ok(key) => ids.push(self.slots[key].worker_id),
                Err(e) => {
                    return Err(format!(
                        "spawned {} of {count}: cannot spawn {}: {e}",
                        ids.len(),
                        self.cfg.command.program.display()
                    ))
                }
            }
        }
        Ok(ids)
    }

    /// Drains worker `id`, or the `count` newest workers; returns the ids.
    pub(super) fn remove_workers(
        &mut self,
        id: Option<u32>,
        count: Option<u32>,
        timeout: Option<Duration>,
    ) -> Result<Vec<u32>, String> {
        let timeout = timeout.unwrap_or(self.cfg.drain_timeout);
        let keys: Vec<usize> = match (id, count) {
            (Some(id), None) => {
                let key = self
                    .pool
                    .workers
                    .iter()
                    .find(|(_, w)| w.id == id)
                    .map(|(k, _)| k)
                    .ok_or_else(|| format!("remove: no worker with id {id}"))?;
                if self.pool.workers[key].state == State::Draining {
                    return Err(format!("remove: worker {id} is already draining"));
                }
                vec![key]
            }
            (None, Some(n)) => {
                let mut live: Vec<(u32, usize)> = self
                    .pool
                    .workers
                    .iter()
                    .filter(|(_, w)| w.state != State::Draining)
                    .map(|(k, w)| (w.id, k))
                    .collect();
                if n == 0 || n as usize > live.len() {
                    return Err(format!(
                        "remove: count must be between 1 and the {} workers not already draining",
                        live.len()
                    ));
                }
                live.sort_unstable_by(|a, b| b.cmp(a));
                live.into_iter().take(n as usize).map(|(_, k)| k).collect()
            }
            _ => return Err("remove: give either a worker id or a count".to_string()),
        };
        let mut ids = Vec::new();
        for key in keys {
            ids.push(self.pool.workers[key].id);
            self.retire_worker(key, timeout);
        }
        Ok(ids)
    }

    /// Takes a worker out of the pool for good: no new connections, DRAIN,
    /// stopped at `timeout` if it has not finished; never restarted.
    pub(super) fn retire_worker(&mut self, key: usize, timeout: Duration) {
        let Some(w) = self.pool.workers.get_mut(key) else {
            return;
        };
        w.drain_deadline = Some(Instant::now() + timeout);
        let (id, slot, in_flight) = (w.id, w.slot, w.in_flight.len());
        if let Some(s) = slot.and_then(|s| self.slots.get_mut(s)) {
            s.retired = true;
        }
        info!(
            worker = id,
            in_flight,
            timeout_ms = timeout.as_millis() as u64,
            "worker draining"
        );
        self.drain_worker(key);
    }

    /// Advances a rolling restart: one replacement at a time; the old worker
    /// drains only once its replacement is ready.
    pub(super) fn step_rolling(&mut self) {
        if let Some((old, new)) = self.rolling_current {
            let new_slot = self.slots.get(new);
            let ready = new_slot
                .and_then(|s| s.worker)
                .and_then(|k| self.pool.workers.get(k))
                .is_some_and(|w| w.state == State::Ready);
            if !ready {
                if new_slot.is_none_or(|s| s.given_up) {
                    error!("rolling restart aborted: the replacement worker does not start");
                    self.rolling.clear();
                    self.rolling_current = None;
                }
                return;
            }
            self.rolling_current = None;
            if self.rolling.is_empty() {
                info!("rolling restart finished: every worker replaced");
            }
            if let Some(wkey) = self.slots.get(old).and_then(|s| s.worker) {
                self.retire_worker(wkey, self.cfg.drain_timeout);
            } else if let Some(s) = self.slots.get_mut(old) {
                // Between a crash and its restart: just do not restart it.
                s.retired = true;
                if s.pid.is_none() {
                    self.slots.remove(old);
                }
            }
        }
        while let Some(old) = self.rolling.pop_front() {
            if self.slots.get(old).is_none_or(|s| s.retired) {
                continue;
            }
            match self.add_slot() {
                Ok(new) => {
                    info!(
                        old = self.slots[old].worker_id,
                        new = self.slots[new].worker_id,
                        left = self.rolling.len(),
                        "rolling restart: replacing a worker"
                    );
                    self.rolling_current = Some((old, new));
                }
                Err(e) => {
                    error!(error = %e, "rolling restart aborted: cannot spawn a replacement");
                    self.rolling.clear();
                }
            }
            return;
        }
    }

    /// Spawned workers that are not being removed.
    pub(super) fn spawned_live(&self) -> usize {
        self.slots
            .iter()
            .filter(|(_, s)| !s.retired && !s.given_up)
            .count()
    }

    /// Between `--min-workers` and `--max-workers`: adds a worker while
    /// every one is full and clients wait, retires one idle for
    /// `--scale-idle-timeout`. One step at a time, so a burst does not
    /// spawn a crowd.
    pub(super) fn autoscale(&mut self, now: Instant) {
        if self.shutdown.is_some() || self.rolling_current.is_some() {
            return;
        }
        let live = self.spawned_live();
        let starting = self
            .pool
            .workers
            .iter()
            .any(|(_, w)| w.state == State::Starting && w.slot.is_some());
        // Full means: some workers are ready and none has room. (An empty
        // pool is a crash loop or an operator's choice, not load.)
        let full = self
            .pool
            .workers
            .iter()
            .any(|(_, w)| w.state == State::Ready)
            && !self.pool.has_capacity();
        if live < self.cfg.max_workers && !starting && full {
            info!(
                workers = live + 1,
                max = self.cfg.max_workers,
                "autoscale: every worker is full; adding one"
            );
            if let Err(e) = self.add_slot() {
                error!(error = %e, "autoscale: cannot spawn a worker");
            }
            return;
        }
        if live > self.cfg.min_workers {
            let idle = self.cfg.scale_idle_timeout;
            let victim = self
                .pool
                .workers
                .iter()
                .filter(|(_, w)| {
                    w.slot.is_some()
                        && w.state == State::Ready
                        && w.in_flight.is_empty()
                        && w.idle_since.is_some_and(|t| t + idle <= now)
                })
                .max_by_key(|(_, w)| w.id)
                .map(|(k, w)| (k, w.id));
            if let Some((key, id)) = victim {
                info!(
                    worker = id,
                    workers = live - 1,
                    min = self.cfg.min_workers,
                    "autoscale: retiring an idle worker"
                );
                self.retire_worker(key, self.cfg.drain_timeout);
            }
        }
    }

    /// Re-reads the config file and applies what changed; returns a line
    /// per change. The running configuration is untouched on error.
    pub(super) fn reload(&mut self) -> Result<Vec<String>, String> {
        let Some(loader) = self.reload.as_ref().filter(|l| l.config_path().is_some()) else {
            return Err("nothing to reload: baton was started without --config".to_string());
        };
        let new = loader.load().map_err(|e| e.to_string())?;
        let old = self.cfg.clone();
        let mut changes = Vec::new();

        // Listeners: bind the new ones first, so that an error changes nothing.
        let mut added = Vec::new();
        for l in new.listen.iter().filter(|l| !old.listen.contains(l)) {
            let sock = crate::listener::bind(l.0, new.backlog)
                .map_err(|e| format!("cannot listen on {}: {e}", l.0))?;
            added.push((l.clone(), sock));
        }
        let removed: Vec<usize> = old
            .listen
            .iter()
            .enumerate()
            .filter(|(_, l)| !new.listen.contains(l))
            .map(|(i, _)| i)
            .collect();
        for i in removed.into_iter().rev() {
            let mut l = self.listeners.remove(i);
            if l.registered {
                let _ = self.poll.registry().deregister(&mut l.sock);
            }
            changes.push(format!("stopped listening on {}", l.addr));
        }
        // Re-register the rest under their new indices.
        for l in self.listeners.iter_mut() {
            if l.registered {
                let _ = self.poll.registry().deregister(&mut l.sock);
                l.registered = false;
            }
        }
        for (_, sock) in added {
            let addr = sock.local_addr().map_err(|e| e.to_string())?;
            info!(addr = %addr, listener = self.listeners.len(), "listening");
            changes.push(format!("listening on {addr}"));
            self.listeners.push(super::Listener {
                sock,
                addr,
                registered: false,
            });
        }

        if new.balance != old.balance {
            self.pool.set_balance(new.balance);
            changes.push(format!("balance: {}", new.balance));
        }
        if new.worker_connections != old.worker_connections {
            for (_, w) in self.pool.workers.iter_mut() {
                let announced = w.announced;
                w.set_capacity(announced, new.worker_connections);
            }
            changes.push(format!("worker-connections: {}", new.worker_connections));
        }
        for (what, changed) in [
            ("control socket", new.control != old.control),
            ("worker socket", new.worker_socket != old.worker_socket),
            (
                "log settings",
                new.log_format != old.log_format || new.log_level != old.log_level,
            ),
        ] {
            if changed {
                warn!("reload: a new {what} takes effect only when baton restarts");
            }
        }
        let command_changed =
            new.command.program != old.command.program || new.command.args != old.command.args;
        let target = new.workers;
        // Keep the sockets the process was started with.
        let (control, worker_socket) = (old.control.clone(), old.worker_socket.clone());
        self.cfg = Config {
            control,
            worker_socket,
            ..new
        };
        if command_changed {
            changes.push("worker command changed: rolling restart".to_string());
            self.rolling = self
                .slots
                .iter()
                .filter(|(_, s)| !s.retired)
                .map(|(k, _)| k)
                .collect();
        }
        let live = self.spawned_live();
        if target > live {
            let ids = self.add_workers((target - live) as u32)?;
            changes.push(format!("workers: added {ids:?}"));
        } else if target < live {
            let ids = self.remove_workers(None, Some((live - target) as u32), None)?;
            changes.push(format!("workers: draining {ids:?}"));
        }
        Ok(changes)
    }

    // ---- self-registering workers ----------------------------------------

    pub(super) fn on_worker_socket_accept(&mut self) {
        while let Some((fd, peer)) = accept_local(self.worker_listener.as_ref(), "worker socket") {
            if !uid_allowed(peer.uid, self.own_uid, &self.cfg.worker_allow_uid) {
                self.worker_refused
                    .refused("worker socket", peer, Instant::now());
                continue;
            }
            let chan = match Channel::from_fd(fd) {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "worker socket: unusable connection");
                    continue;
                }
            };
            let id = self.next_worker_id;
            self.next_worker_id += 1;
            if let Err(e) = self.add_to_pool(id, chan, None, peer.pid) {
                error!(error = %e, "worker socket: cannot watch a worker");
                continue;
            }
            info!(
                worker = id,
                pid = peer.pid,
                uid = peer.uid,
                "worker registering"
            );
        }
    }

    // ---- numbers ---------------------------------------------------------

    fn worker_rows(&self) -> Vec<WorkerRow> {
        let now = Instant::now();
        let mut rows: Vec<WorkerRow> = self
            .pool
            .workers
            .iter()
            .map(|(_, w)| {
                let status = w.pid.and_then(read_proc_status);
                let slot = w.slot.and_then(|s| self.slots.get(s));
                WorkerRow {
                    id: w.id,
                    pid: w.pid,
                    user: status
                        .as_ref()
                        .map_or_else(|| "?".to_string(), |s| s.user.clone()),
                    state: match w.state {
                        State::Starting => "starting",
                        State::Ready => "ready",
                        State::Draining => "draining",
                    }
                    .to_string(),
                    origin: if w.slot.is_some() {
                        "spawned"
                    } else {
                        "registered"
                    }
                    .to_string(),
                    in_flight: w.in_flight.len(),
                    handled: w.handled,
                    parked: w.parked,
                    restarts: slot.map_or(0, |s| s.restarts),
                    memory_kib: status.and_then(|s| s.rss_kib),
                    age_s: now.duration_since(w.connected).as_secs_f64(),
                }
            })
            .collect();
        // Slots whose worker is not connected: waiting to restart, or given
        // up (they will not come back without an operator).
        for (_, s) in self.slots.iter() {
            if s.worker.is_some() || s.retired {
                continue;
            }
            let state = if s.given_up {
                "given-up"
            } else if s.pid.is_some() {
                "exiting"
            } else {
                "restarting"
            };
            rows.push(WorkerRow {
                id: s.worker_id,
                pid: s.pid,
                user: "-".to_string(),
                state: state.to_string(),
                origin: "spawned".to_string(),
                in_flight: 0,
                handled: 0,
                parked: 0,
                restarts: s.restarts,
                memory_kib: None,
                age_s: 0.0,
            });
        }
        rows.sort_by_key(|r| r.id);
        rows
    }

    fn status(&self) -> serde_json::Value {
        let count = |st: State| {
            self.pool
                .workers
                .iter()
                .filter(|(_, w)| w.state == st)
                .count()
        };
        let s = self.stats;
        json!({
            "pid": std::process::id(),
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "listeners": self.listeners.iter().map(|l| l.addr.to_string()).collect::<Vec<_>>(),
            "workers": {
                "ready": count(State::Ready),
                "starting": count(State::Starting),
                "draining": count(State::Draining),
                "stalled": self.pool.workers.iter().filter(|(_, w)| w.stalled).count(),
                "restarting": self.slots.iter().filter(|(_, s)| s.worker.is_none() && !s.given_up && !s.retired).count(),
                "crash_looped": self.slots.iter().filter(|(_, s)| s.given_up).count(),
            },
            "in_flight": self.pool.workers.iter().map(|(_, w)| w.in_flight.len()).sum::<usize>(),
            "pending": self.pending.len(),
            "held": self.held(),
            "fd_budget": self.fd_budget(),
            "fd_limit": self.fd_limit,
            "accepted": s.accepted,
            "handed_off": s.handed_off,
            "redispatched": s.redispatched,
            "lost": s.lost,
            "parked": self.parked.len(),
            "parked_total": s.parked,
            "unparked": s.unparked,
            "parked_closed": s.parked_closed,
            "parked_expired": s.parked_expired,
            "parked_evicted": s.parked_evicted,
            "sends": s.sends,
            "capacity_pauses": s.capacity_pauses,
            "emfile_pauses": s.emfile_pauses,
            "fd_pauses": s.fd_pauses,
            "refused_control": self.ctl_refused.total(),
            "refused_workers": self.worker_refused.total(),
            "shutting_down": self.shutdown.is_some(),
            "rolling_restart": self.rolling_current.is_some() || !self.rolling.is_empty(),
        })
    }

    /// Counters and gauges in the Prometheus text exposition format.
    pub(super) fn metrics(&self) -> String {
        use std::fmt::Write as _;
        let s = self.stats;
        let mut m = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(
                m,
                "# HELP baton_{name} {help}\n# TYPE baton_{name} counter\nbaton_{name} {v}"
            );
        };
        counter(
            "connections_accepted_total",
            "Connections accepted.",
            s.accepted,
        );
        counter(
            "connections_handed_off_total",
            "CONN messages sent to workers (a re-dispatched connection counts again).",
            s.handed_off,
        );
        counter(
            "connections_redispatched_total",
            "Connections taken back from a dead worker before its ACK and given to another.",
            s.redispatched,
        );
        counter(
            "connections_lost_total",
            "Acknowledged connections whose worker died before finishing them.",
            s.lost,
        );
        counter(
            "conn_messages_total",
            "CONN and CONNS messages sent (handed_off / this: connections per message).",
            s.sends,
        );
        counter(
            "parked_total",
            "Idle keep-alive connections workers handed back to the acceptor.",
            s.parked,
        );
        counter(
            "unparked_total",
            "Parked connections whose client sent its next request, handed to a worker again.",
            s.unparked,
        );
        counter(
            "parked_closed_total",
            "Parked connections closed by their client.",
            s.parked_closed,
        );
        counter(
            "parked_expired_total",
            "Parked connections closed at their idle timeout.",
            s.parked_expired,
        );
        counter(
            "parked_evicted_total",
            "Parked connections closed to make room for new connections.",
            s.parked_evicted,
        );
        counter(
            "fd_pauses_total",
            "Times accepting paused because the connections held reached the fd budget.",
            s.fd_pauses,
        );
        counter(
            "capacity_pauses_total",
            "Times accepting paused because every worker was full.",
            s.capacity_pauses,
        );
        counter(
            "emfile_pauses_total",
            "Times accepting paused for want of file descriptors.",
            s.emfile_pauses,
        );
        let _ = writeln!(m, "# HELP baton_connections_pending Accepted connections waiting for a worker.\n# TYPE baton_connections_pending gauge\nbaton_connections_pending {}", self.pending.len());
        let _ = writeln!(m, "# HELP baton_connections_parked Idle keep-alive connections the acceptor holds for their next request.\n# TYPE baton_connections_parked gauge\nbaton_connections_parked {}", self.parked.len());
        let _ = writeln!(m, "# HELP baton_connections_held Connections the acceptor holds an fd for (pending or not yet acknowledged).\n# TYPE baton_connections_held gauge\nbaton_connections_held {}", self.held());
        let _ = writeln!(m, "# HELP baton_connections_held_limit The most connections the acceptor may hold (fd limit less its own fds and reserve).\n# TYPE baton_connections_held_limit gauge\nbaton_connections_held_limit {}", self.fd_budget());
        let _ = writeln!(
            m,
            "# HELP baton_workers Workers by state.\n# TYPE baton_workers gauge"
        );
        for (label, st) in [
            ("starting", State::Starting),
            ("ready", State::Ready),
            ("draining", State::Draining),
        ] {
            let n = self
                .pool
                .workers
                .iter()
                .filter(|(_, w)| w.state == st)
                .count();
            let _ = writeln!(m, "baton_workers{{state=\"{label}\"}} {n}");
        }
        let restarting = self
            .slots
            .iter()
            .filter(|(_, s)| s.worker.is_none() && !s.given_up && !s.retired)
            .count();
        let given_up = self.slots.iter().filter(|(_, s)| s.given_up).count();
        let _ = writeln!(m, "baton_workers{{state=\"restarting\"}} {restarting}");
        let _ = writeln!(m, "baton_workers{{state=\"given_up\"}} {given_up}");
        let _ = writeln!(m, "# HELP baton_worker_stalled 1 while a worker is full and has reported no DONE for the stall timeout.\n# TYPE baton_worker_stalled gauge");
        for (_, w) in self.pool.workers.iter() {
            let _ = writeln!(
                m,
                "baton_worker_stalled{{worker=\"{}\"}} {}",
                w.id,
                u8::from(w.stalled)
            );
        }
        let _ = writeln!(m, "# HELP baton_worker_in_flight Connections a worker holds.\n# TYPE baton_worker_in_flight gauge");
        for (_, w) in self.pool.workers.iter() {
            let _ = writeln!(
                m,
                "baton_worker_in_flight{{worker=\"{}\"}} {}",
                w.id,
                w.in_flight.len()
            );
        }
        let _ = writeln!(m, "# HELP baton_worker_handled_total Connections a worker finished.\n# TYPE baton_worker_handled_total counter");
        for (_, w) in self.pool.workers.iter() {
            let _ = writeln!(
                m,
                "baton_worker_handled_total{{worker=\"{}\"}} {}",
                w.id, w.handled
            );
        }
        let _ = writeln!(m, "# HELP baton_worker_restarts_total Restarts of a spawned worker's slot.\n# TYPE baton_worker_restarts_total counter");
        for (_, w) in self.pool.workers.iter() {
            if let Some(s) = w.slot.and_then(|s| self.slots.get(s)) {
                let _ = writeln!(
                    m,
                    "baton_worker_restarts_total{{worker=\"{}\"}} {}",
                    w.id, s.restarts
                );
            }
        }
        m
    }
}

/// The next pending connection on one of the acceptor's local sockets, or
/// None when there is none (or the socket is not open). Errors other than
/// EAGAIN are logged and end the round.
fn accept_local(
    l: Option<&crate::unix::UnixListener>,
    what: &str,
) -> Option<(std::os::fd::OwnedFd, Peer)> {
    let l = l?;
    loop {
        match l.accept() {
            Ok(x) => return Some(x),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!(error = %e, "{what}: accept failed");
                return None;
            }
        }
    }
}

/// What `ctl workers` shows of a process, from /proc/PID/status.
struct ProcInfo {
    user: String,
    rss_kib: Option<u64>,
}

fn read_proc_status(pid: i32) -> Option<ProcInfo> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut uid = None;
    let mut rss = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("Uid:") {
            uid = v
                .split_whitespace()
                .nth(1)
                .and_then(|u| u.parse::<u32>().ok());
        } else if let Some(v) = line.strip_prefix("VmRSS:") {
            rss = v.split_whitespace().next().and_then(|k| k.parse().ok());
        }
    }
    let uid = uid?;
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name);
    Some(ProcInfo { user, rss_kib: rss })
}
