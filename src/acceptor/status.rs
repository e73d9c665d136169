//! Status and metrics: `ctl workers`, `ctl status` and the Prometheus
//! text (`ctl metrics`, `--metrics-listen`).

use std::time::Instant;

use serde_json::json;

use super::Acceptor;
use crate::control::WorkerRow;
use crate::pool::State;

impl Acceptor {
    /// Spawned slots whose worker is gone and will be restarted.
    fn slots_restarting(&self) -> usize {
        self.slots
            .iter()
            .filter(|(_, s)| s.worker.is_none() && !s.given_up && !s.retired)
            .count()
    }

    /// Slots given up on (crash loop, or a sandbox that cannot apply).
    fn slots_given_up(&self) -> usize {
        self.slots.iter().filter(|(_, s)| s.given_up).count()
    }

    // ---- numbers ---------------------------------------------------------

    pub(super) fn worker_rows(&self) -> Vec<WorkerRow> {
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

    pub(super) fn status(&self) -> serde_json::Value {
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
                "restarting": self.slots_restarting(),
                "crash_looped": self.slots_given_up(),
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
        let (restarting, given_up) = (self.slots_restarting(), self.slots_given_up());
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
