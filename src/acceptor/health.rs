//! Past one host: the health check an L4 balancer polls
//! (`--health-listen ADDR`) and `baton ctl drain-host`.
//!
//! fd passing works within one host, so several baton hosts go behind an
//! existing L4 balancer (IPVS/keepalived, HAProxy in TCP mode, nftables).
//! What baton gives that balancer:
//!
//! * **The health check.** The same small HTTP server as the metrics
//!   endpoint (`scrape.rs`: one request head in 8 KiB, 5 s to send it,
//!   then the connection is closed), any path, `GET` or `HEAD`. It answers
//!   `200 OK` with a one-line body while baton accepts and every pool has
//!   at least one ready worker, and `503 Service Unavailable` with the
//!   reason otherwise: `shutting down`, `draining host`, or `no ready worker
//!   in pool NAME`. A full pool is not unhealthy (clients wait in the
//!   backlog, as on one host); a pool with no worker that can take a
//!   connection is. The endpoint stays open while baton shuts down, so a
//!   balancer sees 503 rather than a refused connection until baton is
//!   gone.
//! * **`ctl drain-host`**, to take a host out without a failed request:
//!   the health check turns 503 at once; the listeners keep accepting for
//!   the grace (`--drain-grace`, 5 s by default), which must outlast the
//!   balancer's checks (interval × fall count), so that every connection
//!   the balancer still sends is served; then the listeners close and baton
//!   finishes what it holds and exits exactly as on SIGTERM
//!   ([`Acceptor::begin_shutdown`](super::Acceptor)). `ctl status` shows
//!   `draining_host` (and when the listeners close).
//! * **SIGTERM** keeps its behaviour (the listeners close at once): the
//!   health check says 503 from then on, but a balancer may still send a
//!   connection or two before it notices, which meet a closed port. To
//!   take a host out behind a balancer, use `drain-host` (or have the
//!   service manager run `baton ctl drain-host` as its stop command).
//!
//! An in-place upgrade hands the health listener over, and a host drain
//! in progress with what is left of its grace.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use mio::Interest;
use serde_json::json;
use tracing::{info, warn};

use super::{Acceptor, HEALTH};
use crate::control::Reply;
use crate::pool::State;
use crate::{listener, Error};

/// The health endpoint's listener and the host drain, if one was asked for.
#[derive(Default)]
pub struct Health {
    pub listener: Option<mio::net::TcpListener>,
    drain: Option<HostDrain>,
}

/// A `ctl drain-host` under way.
#[derive(Debug, Clone, Copy)]
struct HostDrain {
    since: Instant,
    /// When the listeners close and the shutdown begins.
    close_at: Instant,
}

impl Health {
    /// Binds `--health-listen` (if given) and watches it.
    pub fn open(poll: &mio::Poll, addr: Option<std::net::SocketAddr>) -> Result<Health, Error> {
        let Some(addr) = addr else {
            return Ok(Health::default());
        };
        let mut l = listener::bind(addr, 64).map_err(|source| Error::Bind { addr, source })?;
        let bound = l
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?;
        poll.registry()
            .register(&mut l, HEALTH, Interest::READABLE)
            .map_err(Error::Poll)?;
        info!(addr = %bound, "health check listening");
        Ok(Health {
            listener: Some(l),
            drain: None,
        })
    }

    /// What an upgrade hands over: the listener's fd and, during a host
    /// drain, how much of its grace is left.
    pub fn snapshot(&self, now: Instant) -> (Option<RawFd>, Option<u64>) {
        (
            self.listener.as_ref().map(|l| l.as_raw_fd()),
            self.drain
                .map(|d| d.close_at.saturating_duration_since(now).as_millis() as u64),
        )
    }

    /// The same, taken over by the new image: the listener watched again,
    /// the drain's grace going on where it was.
    pub fn restore(
        poll: &mio::Poll,
        fd: Option<OwnedFd>,
        drain_left_ms: Option<u64>,
        now: Instant,
    ) -> Result<Health, Error> {
        let listener = match fd {
            Some(fd) => {
                let mut l = mio::net::TcpListener::from_std(std::net::TcpListener::from(fd));
                poll.registry()
                    .register(&mut l, HEALTH, Interest::READABLE)
                    .map_err(Error::Poll)?;
                Some(l)
            }
            None => None,
        };
        Ok(Health {
            listener,
            drain: drain_left_ms.map(|ms| HostDrain {
                since: now,
                close_at: now + Duration::from_millis(ms),
            }),
        })
    }

    /// Whether `ctl drain-host` was asked for.
    pub fn draining(&self) -> bool {
        self.drain.is_some()
    }

    /// When the host drain's grace ends.
    fn deadline(&self) -> Option<Instant> {
        self.drain.map(|d| d.close_at)
    }

    /// The fds it holds (for the fd budget).
    pub fn fds(&self) -> usize {
        usize::from(self.listener.is_some())
    }
}

impl Acceptor {
    /// The health check's answer: its status line and one line of body.
    pub(super) fn health_answer(&self) -> (&'static str, String) {
        const DOWN: &str = "503 Service Unavailable";
        if self.shutdown.is_some() {
            return (DOWN, "shutting down\n".to_string());
        }
        if let Some(d) = self.health.drain {
            let left = d.close_at.saturating_duration_since(Instant::now());
            return (
                DOWN,
                format!(
                    "draining host: listeners close in {} ms\n",
                    left.as_millis()
                ),
            );
        }
        let mut ready = 0;
        for (_, ps) in self.pools.iter().filter(|(_, ps)| !ps.removing) {
            let n = ps
                .pool
                .workers
                .iter()
                .filter(|(_, w)| w.state() == State::Ready)
                .count();
            if n == 0 {
                return (DOWN, format!("no ready worker in pool {}\n", ps.cfg.name));
            }
            ready += n;
        }
        let pools = self.pools.iter().filter(|(_, ps)| !ps.removing).count();
        (
            "200 OK",
            format!("ok: accepting, {pools} pool(s), {ready} ready worker(s)\n"),
        )
    }

    /// `ctl drain-host`: fail the health check now, close the listeners
    /// after `grace` (default `--drain-grace`), then shut down.
    pub(super) fn drain_host(&mut self, grace: Option<Duration>) -> Reply {
        if self.shutdown.is_some() {
            return Reply::err("baton is shutting down already");
        }
        let now = Instant::now();
        let d = match self.health.drain {
            Some(d) => d,
            None => {
                let grace = grace.unwrap_or(self.cfg.drain_grace);
                let d = HostDrain {
                    since: now,
                    close_at: now + grace,
                };
                self.health.drain = Some(d);
                if self.health.listener.is_none() {
                    warn!("drain-host without --health-listen: no balancer can see it; the listeners close after the grace all the same");
                }
                info!(
                    grace_ms = grace.as_millis() as u64,
                    "draining the host: health check failing; the listeners keep accepting for the grace, then close, and baton finishes what it holds and exits"
                );
                d
            }
        };
        Reply::ok(json!({
            "draining_host": true,
            "since_s": now.duration_since(d.since).as_secs_f64(),
            "listeners_close_in_ms": d.close_at.saturating_duration_since(now).as_millis() as u64,
        }))
    }

    /// Ends the host drain's grace when it is due: the shutdown path
    /// (listeners closed, workers drained, exit).
    pub(super) fn on_drain_host_timer(&mut self, now: Instant) {
        let Some(d) = self.health.drain else {
            return;
        };
        if self.shutdown.is_none() && d.close_at <= now {
            info!(
                drained_ms = now.duration_since(d.since).as_millis() as u64,
                "drain-host: grace over; closing the listeners"
            );
            self.begin_shutdown("drain-host");
        }
    }

    /// When the host drain's grace ends, while it has not yet.
    pub(super) fn drain_host_deadline(&self) -> Option<Instant> {
        self.health.deadline().filter(|_| self.shutdown.is_none())
    }
}
