//! Status and metrics: `ctl workers`, `ctl status` and the Prometheus
//! text (`ctl metrics`, `--metrics-listen`).

use std::time::Instant;

use serde_json::json;

use super::{Acceptor, PoolState};
use crate::control::WorkerRow;
use crate::pool::State;
use crate::supervisor::Life;

impl PoolState {
    /// Spawned slots whose worker is gone and will be restarted.
    fn slots_restarting(&self) -> usize {
        self.slots.iter().filter(|(_, s)| s.restarting()).count()
    }

    /// Slots given up on (crash loop, or a sandbox that cannot apply).
    fn slots_given_up(&self) -> usize {
        self.slots.iter().filter(|(_, s)| s.is_given_up()).count()
    }

    fn count(&self, st: State) -> usize {
        self.pool
            .workers
            .iter()
            .filter(|(_, w)| w.state() == st)
            .count()
    }

    fn in_flight(&self) -> usize {
        self.pool.workers.iter().map(|(_, w)| w.in_flight()).sum()
    }

    fn stalled(&self) -> usize {
        self.pool
            .workers
            .iter()
            .filter(|(_, w)| w.stalled())
            .count()
    }
}

impl Acceptor {
    // ---- numbers ---------------------------------------------------------

    /// One row per worker of pool `only` (every pool when None), and per
    /// slot waiting to restart or given up.
    pub(super) fn worker_rows(&self, only: Option<usize>) -> Vec<WorkerRow> {
        let now = Instant::now();
        let mut rows = Vec::new();
        for (p, ps) in self.pools.iter() {
            if only.is_some_and(|o| o != p) {
                continue;
            }
            let name = &ps.cfg.name;
            rows.extend(ps.pool.workers.iter().map(|(_, w)| {
                let status = w.pid().and_then(read_proc_status);
                let slot = w.slot().and_then(|s| ps.slots.get(s));
                WorkerRow {
                    id: w.id(),
                    pool: name.clone(),
                    pid: w.pid(),
                    user: status
                        .as_ref()
                        .map_or_else(|| "?".to_string(), |s| s.user.clone()),
                    state: match w.state() {
                        State::Starting => "starting",
                        State::Ready => "ready",
                        State::Draining => "draining",
                    }
                    .to_string(),
                    origin: if w.slot().is_some() {
                        "spawned"
                    } else {
                        "registered"
                    }
                    .to_string(),
                    in_flight: w.in_flight(),
                    handled: w.handled(),
                    parked: w.parked(),
                    restarts: slot.map_or(0, |s| s.restarts()),
                    memory_kib: status.and_then(|s| s.rss_kib),
                    age_s: now.duration_since(w.connected()).as_secs_f64(),
                }
            }));
            // Slots whose worker is not connected: waiting to restart, or
            // given up (they will not come back without an operator).
            for (_, s) in ps.slots.iter() {
                if s.worker().is_some() || s.is_retired() {
                    continue;
                }
                let state = match s.life() {
                    Life::GivenUp { .. } => "given-up",
                    Life::Running { .. } => "exiting",
                    Life::Restarting { .. } | Life::Idle => "restarting",
                };
                rows.push(WorkerRow {
                    id: s.worker_id(),
                    pool: name.clone(),
                    pid: s.pid(),
                    user: "-".to_string(),
                    state: state.to_string(),
                    origin: "spawned".to_string(),
                    in_flight: 0,
                    handled: 0,
                    parked: 0,
                    restarts: s.restarts(),
                    memory_kib: None,
                    age_s: 0.0,
                });
            }
        }
        rows.sort_by_key(|r| r.id);
        rows
    }

    pub(super) fn status(&self) -> serde_json::Value {
        let pools = || self.pools.iter().map(|(_, ps)| ps);
        let sum = |f: &dyn Fn(&PoolState) -> usize| pools().map(f).sum::<usize>();
        let s = self.stats;
        let per_pool: Vec<serde_json::Value> = self
            .pools
            .iter()
            .map(|(p, ps)| {
                json!({
                    "name": ps.cfg.name,
                    "listeners": self.listeners.iter().filter(|(_, l)| l.pool == p).map(|(_, l)| l.addr.to_string()).collect::<Vec<_>>(),
                    "command": ps.cfg.command.program.display().to_string(),
                    "balance": ps.cfg.balance.as_str(),
                    "workers": {
                        "ready": ps.count(State::Ready),
                        "starting": ps.count(State::Starting),
                        "draining": ps.count(State::Draining),
                        "stalled": ps.stalled(),
                        "restarting": ps.slots_restarting(),
                        "crash_looped": ps.slots_given_up(),
                    },
                    "in_flight": ps.in_flight(),
                    "pending": ps.pending.len(),
                    "accepted": ps.stats.accepted,
                    "handed_off": ps.stats.handed_off,
                    "redispatched": ps.stats.redispatched,
                    "lost": ps.stats.lost,
                    "removing": ps.removing,
                    "rolling_restart": ps.rolling(),
                })
            })
            .collect();
        json!({
            "pid": std::process::id(),
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "listeners": self.listeners.iter().map(|(_, l)| l.addr.to_string()).collect::<Vec<_>>(),
            "workers": {
                "ready": sum(&|ps| ps.count(State::Ready)),
                "starting": sum(&|ps| ps.count(State::Starting)),
                "draining": sum(&|ps| ps.count(State::Draining)),
                "stalled": sum(&|ps| ps.stalled()),
                "restarting": sum(&|ps| ps.slots_restarting()),
                "crash_looped": sum(&|ps| ps.slots_given_up()),
            },
            "in_flight": sum(&|ps| ps.in_flight()),
            "pending": sum(&|ps| ps.pending.len()),
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
            "draining_host": self.health.draining(),
            "health": self.health_answer().1.trim_end(),
            "rolling_restart": pools().any(|ps| ps.rolling()),
            "pools": per_pool,
        })
    }

    /// Counters and gauges in the Prometheus text exposition format. What
    /// is a pool's carries a `pool` label; what is the acceptor's own (the
    /// fd budget, parked connections, pauses) has none.
    pub(super) fn metrics(&self) -> String {
        use std::fmt::Write as _;
        let s = self.stats;
        let mut m = String::new();
        let pools: Vec<&PoolState> = self.pools.iter().map(|(_, ps)| ps).collect();
        let per_pool =
            |m: &mut String, name: &str, kind: &str, help: &str, v: &dyn Fn(&PoolState) -> u64| {
                let _ = writeln!(m, "# HELP baton_{name} {help}\n# TYPE baton_{name} {kind}");
                for ps in &pools {
                    let _ = writeln!(m, "baton_{name}{{pool=\"{}\"}} {}", ps.cfg.name, v(ps));
                }
            };
        per_pool(
            &mut m,
            "connections_accepted_total",
            "counter",
            "Connections accepted.",
            &|ps| ps.stats.accepted,
        );
        per_pool(
            &mut m,
            "connections_handed_off_total",
            "counter",
            "CONN messages sent to workers (a re-dispatched connection counts again).",
            &|ps| ps.stats.handed_off,
        );
        per_pool(
            &mut m,
            "connections_redispatched_total",
            "counter",
            "Connections taken back from a dead worker before its ACK and given to another.",
            &|ps| ps.stats.redispatched,
        );
        per_pool(
            &mut m,
            "connections_lost_total",
            "counter",
            "Acknowledged connections whose worker died before finishing them.",
            &|ps| ps.stats.lost,
        );
        per_pool(
            &mut m,
            "connections_pending",
            "gauge",
            "Accepted connections waiting for a worker.",
            &|ps| ps.pending.len() as u64,
        );
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(
                m,
                "# HELP baton_{name} {help}\n# TYPE baton_{name} counter\nbaton_{name} {v}"
            );
        };
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
            "Times accepting paused because every worker of a pool was full.",
            s.capacity_pauses,
        );
        counter(
            "emfile_pauses_total",
            "Times accepting paused for want of file descriptors.",
            s.emfile_pauses,
        );
        let _ = writeln!(m, "# HELP baton_connections_parked Idle keep-alive connections the acceptor holds for their next request.\n# TYPE baton_connections_parked gauge\nbaton_connections_parked {}", self.parked.len());
        let _ = writeln!(m, "# HELP baton_connections_held Connections the acceptor holds an fd for (pending or not yet acknowledged).\n# TYPE baton_connections_held gauge\nbaton_connections_held {}", self.held());
        let _ = writeln!(m, "# HELP baton_connections_held_limit The most connections the acceptor may hold (fd limit less its own fds and reserve).\n# TYPE baton_connections_held_limit gauge\nbaton_connections_held_limit {}", self.fd_budget());
        let _ = writeln!(
            m,
            "# HELP baton_workers Workers by pool and state.\n# TYPE baton_workers gauge"
        );
        for ps in &pools {
            let pool = &ps.cfg.name;
            for (label, n) in [
                ("starting", ps.count(State::Starting)),
                ("ready", ps.count(State::Ready)),
                ("draining", ps.count(State::Draining)),
                ("restarting", ps.slots_restarting()),
                ("given_up", ps.slots_given_up()),
            ] {
                let _ = writeln!(m, "baton_workers{{pool=\"{pool}\",state=\"{label}\"}} {n}");
            }
        }
        let per_worker =
            |m: &mut String,
             name: &str,
             kind: &str,
             help: &str,
             v: &dyn Fn(&PoolState, &crate::pool::Worker) -> Option<u64>| {
                let _ = writeln!(m, "# HELP baton_{name} {help}\n# TYPE baton_{name} {kind}");
                for ps in &pools {
                    for (_, w) in ps.pool.workers.iter() {
                        if let Some(v) = v(ps, w) {
                            let _ = writeln!(
                                m,
                                "baton_{name}{{pool=\"{}\",worker=\"{}\"}} {v}",
                                ps.cfg.name,
                                w.id()
                            );
                        }
                    }
                }
            };
        per_worker(
            &mut m,
            "worker_stalled",
            "gauge",
            "1 while a worker is full and has reported no DONE for the stall timeout.",
            &|_, w| Some(u64::from(w.stalled())),
        );
        per_worker(
            &mut m,
            "worker_in_flight",
            "gauge",
            "Connections a worker holds.",
            &|_, w| Some(w.in_flight() as u64),
        );
        per_worker(
            &mut m,
            "worker_handled_total",
            "counter",
            "Connections a worker finished.",
            &|_, w| Some(w.handled()),
        );
        per_worker(
            &mut m,
            "worker_restarts_total",
            "counter",
            "Restarts of a spawned worker's slot.",
            &|ps, w| {
                w.slot()
                    .and_then(|s| ps.slots.get(s))
                    .map(|s| u64::from(s.restarts()))
            },
        );
        m
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
