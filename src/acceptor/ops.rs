//! Runtime operations of the acceptor: workers that register themselves,
//! adding, removing (with drain) and rolling-restarting workers, reload
//! (pools and listeners added and removed) and autoscaling (the decision
//! itself is `Pool::scale`). Each acts on one pool.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use baton_sdk::Channel;
use tracing::{error, info, warn};

use super::{Acceptor, Listener, PoolState, Wk};
use crate::config::PoolConfig;
use crate::pool::State;
use crate::unix::{uid_allowed, Peer};
use crate::ConfigError;

/// Why an operation on the running acceptor (from `baton ctl` or a
/// signal) was refused or failed. The control socket replies with the
/// message, prefixed with the request where it does not say it already.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpError {
    /// No live pool has that name.
    #[error("no pool named `{name}` (pools: {})", pools.join(", "))]
    NoSuchPool { name: String, pools: Vec<String> },
    /// No live pool at all.
    #[error("no pool")]
    NoPool,
    /// No pool named, and there is more than one.
    #[error("there are several pools ({}): say which with --pool NAME", pools.join(", "))]
    SeveralPools { pools: Vec<String> },
    /// A worker could not be spawned; `spawned` of `count` were.
    #[error("spawned {spawned} of {count}: cannot spawn {}: {source}", program.display())]
    Spawn {
        spawned: usize,
        count: u32,
        program: PathBuf,
        source: io::Error,
    },
    /// No worker `id` (in any pool).
    #[error("remove: no worker with id {id}")]
    NoWorker { id: u32 },
    /// No worker `id` in pool `pool`.
    #[error("remove: no worker with id {id} in pool `{pool}`")]
    NoWorkerInPool { id: u32, pool: String },
    /// Worker `id` is draining already.
    #[error("remove: worker {id} is already draining")]
    AlreadyDraining { id: u32 },
    /// A count of 0, or more than the `live` workers not draining.
    #[error("remove: count must be between 1 and the {live} workers not already draining")]
    BadCount { live: usize },
    /// A count without a pool.
    #[error("remove: a count needs a pool")]
    CountNeedsPool,
    /// Neither an id nor a count, or both.
    #[error("remove: give either a worker id or a count")]
    IdOrCount,
    /// Reload without a config file.
    #[error("nothing to reload: baton was started without --config")]
    NoConfig,
    /// New TLS certificates or keys that cannot be loaded.
    #[error("TLS: {why}")]
    Tls { why: String },
    /// The reloaded configuration is refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener new in the reloaded configuration cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    /// A new listener's address cannot be read back.
    #[error("{0}")]
    LocalAddr(#[source] io::Error),
}

impl Acceptor {
    // ---- adding and removing workers -------------------------------------

    /// Spawns `count` workers from pool `p`'s command; returns their ids.
    pub(super) fn add_workers(&mut self, p: usize, count: u32) -> Result<Vec<u32>, OpError> {
        let mut ids = Vec::new();
        for _ in 0..count {
            match self.add_slot(p) {
                Ok(key) => ids.push(self.pools[p].slots[key].worker_id()),
                Err(source) => {
                    return Err(OpError::Spawn {
                        spawned: ids.len(),
                        count,
                        program: self.pools[p].cfg.command.program.clone(),
                        source,
                    })
                }
            }
        }
        Ok(ids)
    }

    /// Drains worker `id` (of any pool, or of `pool` when given), or the
    /// `count` newest workers of `pool`; returns the ids.
    pub(super) fn remove_workers(
        &mut self,
        pool: Option<usize>,
        id: Option<u32>,
        count: Option<u32>,
        timeout: Option<Duration>,
    ) -> Result<Vec<u32>, OpError> {
        let wks: Vec<Wk> = match (id, count, pool) {
            (Some(id), None, _) => {
                let wk = self
                    .pools
                    .iter()
                    .filter(|(k, _)| pool.is_none_or(|p| p == *k))
                    .find_map(|(p, ps)| {
                        ps.pool
                            .workers
                            .iter()
                            .find(|(_, w)| w.id() == id)
                            .map(|(key, _)| Wk { pool: p, key })
                    })
                    .ok_or_else(|| match pool {
                        Some(p) => OpError::NoWorkerInPool {
                            id,
                            pool: self.pools[p].cfg.name.clone(),
                        },
                        None => OpError::NoWorker { id },
                    })?;
                if self.pools[wk.pool].pool.workers[wk.key].state() == State::Draining {
                    return Err(OpError::AlreadyDraining { id });
                }
                vec![wk]
            }
            (None, Some(n), Some(p)) => {
                let mut live: Vec<(u32, usize)> = self.pools[p]
                    .pool
                    .workers
                    .iter()
                    .filter(|(_, w)| w.state() != State::Draining)
                    .map(|(k, w)| (w.id(), k))
                    .collect();
                if n == 0 || n as usize > live.len() {
                    return Err(OpError::BadCount { live: live.len() });
                }
                live.sort_unstable_by(|a, b| b.cmp(a));
                live.into_iter()
                    .take(n as usize)
                    .map(|(_, key)| Wk { pool: p, key })
                    .collect()
            }
            (None, Some(_), None) => return Err(OpError::CountNeedsPool),
            _ => return Err(OpError::IdOrCount),
        };
        let mut ids = Vec::new();
        for wk in wks {
            let ps = &self.pools[wk.pool];
            ids.push(ps.pool.workers[wk.key].id());
            let t = timeout.unwrap_or(ps.cfg.drain_timeout);
            self.retire_worker(wk, t);
        }
        Ok(ids)
    }

    /// Takes a worker out of its pool for good: no new connections, DRAIN,
    /// stopped at `timeout` if it has not finished; never restarted.
    pub(super) fn retire_worker(&mut self, wk: Wk, timeout: Duration) {
        let Some(ps) = self.pools.get_mut(wk.pool) else {
            return;
        };
        let Some(w) = ps.pool.workers.get_mut(wk.key) else {
            return;
        };
        w.set_drain_deadline(Instant::now() + timeout);
        let (id, slot, in_flight) = (w.id(), w.slot(), w.in_flight());
        if let Some(s) = slot.and_then(|s| ps.slots.get_mut(s)) {
            s.retire();
        }
        info!(
            worker = id,
            pool = %ps.cfg.name,
            in_flight,
            timeout_ms = timeout.as_millis() as u64,
            "worker draining"
        );
        self.drain_worker(wk);
    }

    /// Advances every pool's rolling restart.
    pub(super) fn step_rolling(&mut self) {
        let keys: Vec<usize> = self.pools.iter().map(|(k, _)| k).collect();
        for p in keys {
            self.step_rolling_pool(p);
        }
    }

    /// Advances pool `p`'s rolling restart: one replacement at a time; the
    /// old worker drains only once its replacement is ready.
    fn step_rolling_pool(&mut self, p: usize) {
        let ps = &mut self.pools[p];
        if let Some((old, new)) = ps.rolling_current {
            let new_slot = ps.slots.get(new);
            let ready = new_slot
                .and_then(|s| s.worker())
                .and_then(|k| ps.pool.workers.get(k))
                .is_some_and(|w| w.state() == State::Ready);
            if !ready {
                if new_slot.is_none_or(|s| s.is_given_up()) {
                    error!(pool = %ps.cfg.name, "rolling restart aborted: the replacement worker does not start");
                    ps.rolling.clear();
                    ps.rolling_current = None;
                }
                return;
            }
            ps.rolling_current = None;
            if ps.rolling.is_empty() {
                info!(pool = %ps.cfg.name, "rolling restart finished: every worker replaced");
            }
            if let Some(wkey) = ps.slots.get(old).and_then(|s| s.worker()) {
                let t = ps.cfg.drain_timeout;
                self.retire_worker(Wk { pool: p, key: wkey }, t);
            } else if let Some(s) = ps.slots.get_mut(old) {
                // Between a crash and its restart: just do not restart it.
                s.retire();
                if s.pid().is_none() {
                    ps.slots.remove(old);
                }
            }
        }
        while let Some(old) = self.pools[p].rolling.pop_front() {
            if self.pools[p].slots.get(old).is_none_or(|s| s.is_retired()) {
                continue;
            }
            match self.add_slot(p) {
                Ok(new) => {
                    let ps = &mut self.pools[p];
                    info!(
                        pool = %ps.cfg.name,
                        old = ps.slots[old].worker_id(),
                        new = ps.slots[new].worker_id(),
                        left = ps.rolling.len(),
                        "rolling restart: replacing a worker"
                    );
                    ps.rolling_current = Some((old, new));
                }
                Err(e) => {
                    let ps = &mut self.pools[p];
                    error!(pool = %ps.cfg.name, error = %e, "rolling restart aborted: cannot spawn a replacement");
                    ps.rolling.clear();
                }
            }
            return;
        }
    }

    /// Queues every spawned slot of pool `p` not being removed for a
    /// rolling restart (`step_rolling` replaces them one at a time);
    /// returns how many.
    pub(super) fn begin_rolling(&mut self, p: usize) -> usize {
        let ps = &mut self.pools[p];
        ps.rolling = ps
            .slots
            .iter()
            .filter(|(_, s)| !s.is_retired())
            .map(|(k, _)| k)
            .collect();
        ps.rolling.len()
    }

    /// Between `--min-workers` and `--max-workers`, per pool: adds a worker
    /// while every one is full and clients wait, retires one idle for
    /// `--scale-idle-timeout`. One step at a time, so a burst does not
    /// spawn a crowd.
    pub(super) fn autoscale(&mut self, now: Instant) {
        if self.shutdown.is_some() {
            return;
        }
        let keys: Vec<usize> = self.pools.iter().map(|(k, _)| k).collect();
        for p in keys {
            let ps = &self.pools[p];
            if ps.rolling_current.is_some() || ps.removing {
                continue;
            }
            let live = ps.spawned_live();
            let bounds = crate::pool::ScaleBounds {
                min: ps.cfg.min_workers,
                max: ps.cfg.max_workers,
                idle: ps.cfg.scale_idle_timeout,
            };
            match ps.pool.scale(live, bounds, now) {
                crate::pool::Scale::Hold => {}
                crate::pool::Scale::Add => {
                    info!(
                        pool = %ps.cfg.name,
                        workers = live + 1,
                        max = bounds.max,
                        "autoscale: every worker is full; adding one"
                    );
                    if let Err(e) = self.add_slot(p) {
                        error!(error = %e, "autoscale: cannot spawn a worker");
                    }
                }
                crate::pool::Scale::Retire(key) => {
                    info!(
                        pool = %ps.cfg.name,
                        worker = ps.pool.workers[key].id(),
                        workers = live - 1,
                        min = bounds.min,
                        "autoscale: retiring an idle worker"
                    );
                    let t = ps.cfg.drain_timeout;
                    self.retire_worker(Wk { pool: p, key }, t);
                }
            }
        }
    }

    /// Re-reads the config file and applies what changed; returns a line
    /// per change. The running configuration is untouched on error: new
    /// listeners are bound before anything else changes.
    ///
    /// Pools are matched by name. A new pool is started; a pool no longer
    /// in the file stops listening and its workers drain (it goes once
    /// they have); a listener the file gives to another pool moves to it
    /// without closing. For a pool kept, a changed worker command or
    /// sandbox means a rolling restart, and its worker count is met by
    /// adding or draining workers.
    pub(super) fn reload(&mut self) -> Result<Vec<String>, OpError> {
        let Some(loader) = self.reload.as_ref().filter(|l| l.config_path().is_some()) else {
            return Err(OpError::NoConfig);
        };
        // RELOADING=1 now, READY=1 once this returns, whatever it returns.
        crate::systemd::reloading();
        let _ready_again = crate::systemd::ReadyWhenDropped("reloaded");
        let mut new = loader.load()?;
        // TLS that changed: the new keys are checked (in a throwaway
        // process) and loaded by a new key process before anything else
        // changes; the TLS pools' workers move to it by rolling restart.
        let tls_changed = new.pools.iter().any(|pc| {
            let now = self
                .pools
                .iter()
                .find(|(_, ps)| !ps.removing && ps.cfg.name == pc.name)
                .map(|(_, ps)| &ps.cfg.tls);
            match now {
                Some(old) => *old != pc.tls,
                None => pc.tls.is_some(),
            }
        });
        let new_tls = if tls_changed {
            Some(self.reload_tls(&new).map_err(|why| OpError::Tls { why })?)
        } else {
            None
        };
        let mut changes = Vec::new();
        let several = new.pools.len() > 1 || self.pools.len() > 1;
        let say = |changes: &mut Vec<String>, pool: &str, what: String| {
            changes.push(if several {
                format!("pool `{pool}`: {what}")
            } else {
                what
            });
        };

        // Listeners: bind the new ones first, so that an error changes nothing.
        let mut added = Vec::new();
        // A port-0 listener ("any free port") is the same listener only for
        // the pool that had it; any other address is matched across pools.
        let same = |acc: &Acceptor, x: &Listener, pool: &str, spec: std::net::SocketAddr| {
            x.spec == spec
                && (spec.port() != 0 || acc.pools.get(x.pool).is_some_and(|ps| ps.cfg.name == pool))
        };
        for pc in &new.pools {
            for l in &pc.listen {
                if self
                    .listeners
                    .iter()
                    .any(|(_, x)| same(self, x, &pc.name, l.0))
                {
                    continue;
                }
                let sock = crate::listener::bind(l.0, new.backlog)
                    .map_err(|source| OpError::Listen { addr: l.0, source })?;
                let addr = sock.local_addr().map_err(OpError::LocalAddr)?;
                added.push((pc.name.clone(), l.0, addr, sock));
            }
        }

        // Pools no longer in the file.
        let gone: Vec<usize> = self
            .pools
            .iter()
            .filter(|(_, ps)| !ps.removing && !new.pools.iter().any(|n| n.name == ps.cfg.name))
            .map(|(k, _)| k)
            .collect();
        for p in gone {
            let name = self.pools[p].cfg.name.clone();
            self.remove_pool(p);
            changes.push(format!(
                "pool `{name}` removed: it stops listening and its workers drain"
            ));
        }

        // Pools new in the file, and each kept pool's configuration.
        let mut fresh = Vec::new();
        for pc in std::mem::take(&mut new.pools) {
            let existing = self
                .pools
                .iter()
                .find(|(_, ps)| !ps.removing && ps.cfg.name == pc.name)
                .map(|(k, _)| k);
            match existing {
                Some(p) => self.reconfigure(p, pc, &mut changes, &say)?,
                None => {
                    let name = pc.name.clone();
                    let workers = pc.workers;
                    let p = self.pools.insert(PoolState::new(pc));
                    info!(pool = %name, workers, "pool added");
                    changes.push(format!("pool `{name}` added"));
                    fresh.push(p);
                }
            }
        }

        // Listeners: each goes to the pool that claims it now, or closes.
        let claims = |acc: &Acceptor, spec: std::net::SocketAddr, now: Option<usize>| {
            acc.pools
                .iter()
                .filter(|(k, _)| spec.port() != 0 || now.is_none_or(|n| n == *k))
                .find(|(_, ps)| !ps.removing && ps.cfg.listen.iter().any(|l| l.0 == spec))
                .map(|(k, _)| k)
        };
        let keys: Vec<usize> = self.listeners.iter().map(|(k, _)| k).collect();
        for k in keys {
            let spec = self.listeners[k].spec;
            match claims(self, spec, Some(self.listeners[k].pool)) {
                Some(q) if q == self.listeners[k].pool => {}
                Some(q) => {
                    let l = &mut self.listeners[k];
                    if l.registered {
                        let _ = self.poll.registry().deregister(&mut l.sock);
                        l.registered = false;
                    }
                    l.pool = q;
                    let addr = l.addr;
                    let name = self.pools[q].cfg.name.clone();
                    info!(addr = %addr, pool = %name, "listener moved to another pool");
                    say(
                        &mut changes,
                        &name,
                        format!("listening on {addr} (moved from another pool)"),
                    );
                }
                None => {
                    let mut l = self.listeners.remove(k);
                    if l.registered {
                        let _ = self.poll.registry().deregister(&mut l.sock);
                    }
                    let name = self
                        .pools
                        .get(l.pool)
                        .map(|ps| ps.cfg.name.clone())
                        .unwrap_or_default();
                    info!(addr = %l.addr, pool = %name, "stopped listening");
                    say(
                        &mut changes,
                        &name,
                        format!("stopped listening on {}", l.addr),
                    );
                }
            }
        }
        for (name, spec, addr, sock) in added {
            let Some(pool) = self
                .pools
                .iter()
                .find(|(_, ps)| !ps.removing && ps.cfg.name == name)
                .map(|(k, _)| k)
            else {
                continue;
            };
            info!(addr = %addr, pool = %name, "listening");
            say(&mut changes, &name, format!("listening on {addr}"));
            self.listeners.insert(Listener {
                sock,
                addr,
                spec,
                registered: false,
                pool,
            });
        }

        for (what, changed) in [
            ("control socket", new.control != self.cfg.control),
            ("worker socket", new.worker_socket != self.cfg.worker_socket),
            (
                "log settings",
                new.log_format != self.cfg.log_format || new.log_level != self.cfg.log_level,
            ),
        ] {
            if changed {
                warn!("reload: a new {what} takes effect only when baton restarts");
            }
        }
        // Keep the sockets the process was started with.
        new.control = self.cfg.control.clone();
        new.worker_socket = self.cfg.worker_socket.clone();
        self.cfg = new;

        if let Some(mut states) = new_tls {
            let keys: Vec<usize> = self
                .pools
                .iter()
                .filter(|(_, ps)| !ps.removing)
                .map(|(k, _)| k)
                .collect();
            for p in keys {
                let name = self.pools[p].cfg.name.clone();
                let had = self.pools[p].tls.is_some();
                self.pools[p].tls = states.remove(&name);
                let has = self.pools[p].tls.is_some();
                if (had || has) && !fresh.contains(&p) {
                    let n = self.begin_rolling(p);
                    say(
                        &mut changes,
                        &name,
                        format!("TLS certificates reloaded: replacing {n} workers"),
                    );
                }
            }
        }
        for p in fresh {
            let n = self.pools[p].cfg.workers as u32;
            let ids = self.add_workers(p, n)?;
            let name = self.pools[p].cfg.name.clone();
            say(&mut changes, &name, format!("workers: added {ids:?}"));
        }
        Ok(changes)
    }

    /// Applies a kept pool's new configuration.
    fn reconfigure(
        &mut self,
        p: usize,
        pc: PoolConfig,
        changes: &mut Vec<String>,
        say: &dyn Fn(&mut Vec<String>, &str, String),
    ) -> Result<(), OpError> {
        let ps = &mut self.pools[p];
        let name = pc.name.clone();
        if pc.balance != ps.cfg.balance {
            ps.pool.set_balance(pc.balance);
            say(changes, &name, format!("balance: {}", pc.balance));
        }
        if pc.worker_connections != ps.cfg.worker_connections {
            for (_, w) in ps.pool.workers.iter_mut() {
                let announced = w.announced();
                w.set_capacity(announced, pc.worker_connections);
            }
            say(
                changes,
                &name,
                format!("worker-connections: {}", pc.worker_connections),
            );
        }
        let command_changed =
            pc.command.program != ps.cfg.command.program || pc.command.args != ps.cfg.command.args;
        let sandbox_changed = pc.sandbox != ps.cfg.sandbox;
        let target = pc.workers;
        ps.cfg = pc;
        if command_changed || sandbox_changed {
            let what = if command_changed {
                "worker command"
            } else {
                "sandbox"
            };
            say(changes, &name, format!("{what} changed: rolling restart"));
            self.begin_rolling(p);
        } else if self.pools[p]
            .cfg
            .command
            .program
            .file_name()
            .is_some_and(|n| n == "baton-proxy")
        {
            // A proxy resolves its upstream names once, before its sandbox
            // (a chrooted worker has no resolver): new workers resolve them
            // again.
            let n = self.begin_rolling(p);
            say(
                changes,
                &name,
                format!(
                    "baton-proxy: rolling restart of {n} workers to resolve upstream names again"
                ),
            );
        }
        let live = self.pools[p].spawned_live();
        if target > live {
            let ids = self.add_workers(p, (target - live) as u32)?;
            say(changes, &name, format!("workers: added {ids:?}"));
        } else if target < live {
            let ids = self.remove_workers(Some(p), None, Some((live - target) as u32), None)?;
            say(changes, &name, format!("workers: draining {ids:?}"));
        }
        Ok(())
    }

    /// Takes pool `p` out of service: its listeners close, its parked
    /// connections close, its workers drain and are not restarted; the
    /// loop forgets it once they have gone.
    pub(super) fn remove_pool(&mut self, p: usize) {
        let ps = &mut self.pools[p];
        ps.removing = true;
        ps.rolling.clear();
        ps.rolling_current = None;
        for (_, s) in ps.slots.iter_mut() {
            s.retire();
        }
        let t = ps.cfg.drain_timeout;
        info!(pool = %ps.cfg.name, workers = ps.pool.workers.len(), "pool removed: its workers drain");
        let keys: Vec<usize> = ps.pool.workers.iter().map(|(k, _)| k).collect();
        // Listeners it keeps in the new configuration are moved, not
        // closed, by the caller; the others close here.
        self.close_all_parked(Some(p));
        for key in keys {
            self.retire_worker(Wk { pool: p, key }, t);
        }
    }

    // ---- self-registering workers ----------------------------------------

    /// Workers that register themselves join the first pool.
    pub(super) fn on_worker_socket_accept(&mut self) {
        while let Some((fd, peer)) = accept_local(self.worker_listener.as_ref(), "worker socket") {
            if !uid_allowed(peer.uid, self.own_uid, &self.cfg.worker_allow_uid) {
                self.worker_refused
                    .refused("worker socket", peer, Instant::now());
                continue;
            }
            let Some(p) = self.first_pool() else {
                warn!(pid = peer.pid, "worker socket: no pool to join");
                continue;
            };
            let chan = match Channel::from_fd(fd) {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "worker socket: unusable connection");
                    continue;
                }
            };
            let id = self.next_worker_id;
            self.next_worker_id += 1;
            if let Err(e) = self.add_to_pool(p, id, chan, None, peer.pid) {
                error!(error = %e, "worker socket: cannot watch a worker");
                continue;
            }
            info!(
                worker = id,
                pid = peer.pid,
                uid = peer.uid,
                pool = %self.pools[p].cfg.name,
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
