//! Runtime operations of the acceptor: workers that register themselves,
//! adding, removing (with drain) and rolling-restarting workers, reload and
//! autoscaling (the decision itself is `Pool::scale`).

use std::io;
use std::time::{Duration, Instant};

use baton_sdk::Channel;
use tracing::{error, info, warn};

use super::Acceptor;
use crate::config::Config;
use crate::pool::State;
use crate::unix::{uid_allowed, Peer};

impl Acceptor {
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

    /// Queues every spawned slot not being removed for a rolling restart
    /// (`step_rolling` replaces them one at a time); returns how many.
    pub(super) fn begin_rolling(&mut self) -> usize {
        self.rolling = self
            .slots
            .iter()
            .filter(|(_, s)| !s.retired)
            .map(|(k, _)| k)
            .collect();
        self.rolling.len()
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
        let bounds = crate::pool::ScaleBounds {
            min: self.cfg.min_workers,
            max: self.cfg.max_workers,
            idle: self.cfg.scale_idle_timeout,
        };
        match self.pool.scale(live, bounds, now) {
            crate::pool::Scale::Hold => {}
            crate::pool::Scale::Add => {
                info!(
                    workers = live + 1,
                    max = bounds.max,
                    "autoscale: every worker is full; adding one"
                );
                if let Err(e) = self.add_slot() {
                    error!(error = %e, "autoscale: cannot spawn a worker");
                }
            }
            crate::pool::Scale::Retire(key) => {
                info!(
                    worker = self.pool.workers[key].id,
                    workers = live - 1,
                    min = bounds.min,
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
            self.begin_rolling();
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
}

/// The next pending connection on one of the acceptor's local sockets, or
/// None when there is none (or the socket is not open). Errors other than
/// EAGAIN are logged and end the round.
pub(super) fn accept_local(
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
