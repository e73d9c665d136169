//! Worker sessions: a worker's channel from HELLO to its end. Messages in
//! (HELLO and the sandbox check, ACK, DONE, PARK), and how a worker leaves
//! ([`Gone`]): its channel shut down and read to the end before anything of
//! it goes to another worker.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Instant;

use baton_sdk::{Msg, RecvError};
use mio::unix::SourceFd;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tracing::{debug, error, info, warn};

use super::parked::parked_fd_is;
use super::*;
use crate::pool::State;
use crate::supervisor;

/// Why a worker leaves the pool. It decides whether its process is killed
/// and how the departure is logged.
#[derive(Debug, Clone)]
pub(super) enum Gone {
    /// Its channel reached EOF: it exited or closed it.
    ChannelClosed,
    /// Its process was reaped.
    ProcessExited,
    /// It broke the protocol.
    Protocol(String),
    /// The channel failed with an error other than EOF.
    ChannelError(String),
    /// A message to it could not be sent.
    SendFailed(String),
    /// No HELLO or ACK in time, or its drain timed out.
    Unresponsive(String),
    /// Stopped before its HELLO (shutdown or removal).
    StoppedBeforeHello,
    /// Its process does not match the sandbox profile.
    Sandbox(String),
    /// Its sandbox could not be checked for want of fds on our side.
    Unverifiable(String),
    /// Its pool has TLS and its HELLO did not say it terminates TLS: it
    /// would answer TLS clients in plaintext.
    NoTls,
    /// The shutdown timeout passed (its process was killed already).
    ShutdownTimeout,
}

impl Gone {
    /// Whether a spawned worker's process is killed.
    pub(super) fn kill(&self) -> bool {
        !matches!(
            self,
            Gone::ChannelClosed | Gone::ProcessExited | Gone::ShutdownTimeout
        )
    }

    /// Whether this is how a worker ends that was asked to.
    pub(super) fn orderly(&self) -> bool {
        matches!(self, Gone::ChannelClosed | Gone::ProcessExited)
    }
}

impl std::fmt::Display for Gone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Gone::ChannelClosed => f.write_str("channel closed"),
            Gone::ProcessExited => f.write_str("its process exited"),
            Gone::Protocol(why) => write!(f, "protocol violation: {why}"),
            Gone::ChannelError(e) => write!(f, "channel error: {e}"),
            Gone::SendFailed(why) => f.write_str(why),
            Gone::Unresponsive(why) => write!(f, "unresponsive: {why}"),
            Gone::StoppedBeforeHello => f.write_str("stopped before its HELLO"),
            Gone::Sandbox(why) => write!(f, "sandbox check failed: {why}"),
            Gone::Unverifiable(why) => write!(f, "sandbox check impossible: {why}"),
            Gone::NoTls => f.write_str(
                "refused: the pool has TLS and the worker did not say it terminates TLS",
            ),
            Gone::ShutdownTimeout => f.write_str("shutdown timeout"),
        }
    }
}

/// Reads what a worker queued on its channel, to the end, after the channel
/// was shut down: its ACKs and DONEs are applied, anything else is ignored
/// (the worker is leaving either way).
fn read_to_end(w: &mut crate::pool::Worker) {
    // A shut-down channel cannot grow; the bound is only a guard.
    for _ in 0..100_000 {
        match w.chan().try_recv() {
            Ok(Some(r)) => match r.msg {
                Msg::Ack(ids) => {
                    for id in ids {
                        w.ack(id);
                    }
                }
                Msg::Done(ids) => {
                    for id in ids {
                        w.done(id);
                    }
                }
                _ => {}
            },
            Ok(None) => return,
            Err(RecvError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => continue,
            Err(RecvError::Proto(_) | RecvError::FdDropped { .. }) => continue,
            Err(_) => return,
        }
    }
}

impl Acceptor {
    // ---- workers --------------------------------------------------------

    pub(super) fn on_worker_readable(&mut self, key: Wk) {
        loop {
            let Some(w) = self.worker(key) else {
                return;
            };
            match w.chan().try_recv() {
                Ok(Some(r)) => {
                    if let Err(why) = self.on_worker_msg(key, r) {
                        self.close_worker(key, why);
                        return;
                    }
                }
                Ok(None) => {
                    self.close_worker(key, Gone::ChannelClosed);
                    return;
                }
                Err(e) if e.would_block() => return,
                // The worker exited with messages of ours unread. What it
                // queued before that is still readable, then EOF: read on.
                Err(RecvError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => continue,
                Err(RecvError::Proto(p)) => {
                    self.close_worker(key, Gone::Protocol(p.to_string()));
                    return;
                }
                Err(RecvError::FdDropped { msg, fds }) => {
                    // A PARK whose fds we could not all take (out of fds):
                    // the ones that arrived are parked, the others are gone
                    // (the worker closed its copies).
                    let Msg::Park(ps) = *msg else {
                        self.close_worker(
                            key,
                            Gone::Protocol(format!("{:?} with a file descriptor", msg.kind())),
                        );
                        return;
                    };
                    let got = fds.len();
                    let lost: Vec<u64> = ps[got..].iter().map(|p| p.info.id).collect();
                    let r = baton_sdk::Received {
                        msg: Msg::Park(ps[..got].to_vec()),
                        fds,
                        version: baton_sdk::proto::VERSION,
                    };
                    if got > 0 {
                        if let Err(why) = self.on_worker_msg(key, r) {
                            self.close_worker(key, why);
                            return;
                        }
                    }
                    if let Some(w) = self
                        .pools
                        .get_mut(key.pool)
                        .and_then(|ps| ps.pool.workers.get_mut(key.key))
                    {
                        for id in lost {
                            if w.park(id) {
                                self.stats.parked_closed += 1;
                            }
                        }
                    }
                }
                Err(RecvError::Io(e)) => {
                    self.close_worker(key, Gone::ChannelError(e.to_string()));
                    return;
                }
            }
        }
    }

    pub(super) fn on_worker_msg(&mut self, key: Wk, r: baton_sdk::Received) -> Result<(), Gone> {
        let ps = &mut self.pools[key.pool];
        let max_cap = ps.cfg.worker_connections;
        let drain_now = ps.drain_sent;
        let w = &mut ps.pool.workers[key.key];
        match (w.state(), r.msg) {
            (State::Starting, Msg::Hello { .. }) if r.version > baton_sdk::proto::VERSION => {
                // decode() refuses versions it does not know; belt and braces.
                Err(Gone::Protocol(format!("HELLO of version {}", r.version)))
            }
            (
                State::Starting,
                Msg::Hello {
                    pid,
                    capacity,
                    flags,
                },
            ) => {
                // A pool with TLS takes only workers that say they
                // terminate it: any other would answer TLS clients in
                // plaintext on a port the operator believes is TLS.
                let tls_pool = ps.tls.is_some() || ps.cfg.tls.is_some();
                if tls_pool && !flags.tls() {
                    let real = w.pid().unwrap_or(pid as i32);
                    let spawned = match w.slot().and_then(|k| ps.slots.get_mut(k)) {
                        // The same command would say the same HELLO: no
                        // restart (like a sandbox that does not check out).
                        Some(slot) => {
                            slot.give_up();
                            "; not restarting it"
                        }
                        None => "",
                    };
                    error!(
                        worker = w.id(),
                        pid = real,
                        pool = %ps.cfg.name,
                        "worker {} (pid {real}) of pool `{}` did not say it terminates TLS, but the pool has --tls-cert: it would answer TLS clients in plaintext; refused{spawned}. Use a worker that terminates TLS (baton-static, baton-proxy) or remove --tls-cert (tls-cert in a [[pool]])",
                        w.id(),
                        ps.cfg.name,
                    );
                    return Err(Gone::NoTls);
                }
                if !tls_pool && flags.tls() {
                    // Harmless: it was given no bundle, so whatever it
                    // does, the pool is plaintext as configured.
                    warn!(
                        worker = w.id(),
                        pid = w.pid().unwrap_or(pid as i32),
                        pool = %ps.cfg.name,
                        "worker says it terminates TLS, but its pool has no --tls-cert and gave it no TLS bundle; accepted"
                    );
                }
                // Checked from outside before its first connection: the
                // process (as spawned, or as SO_PEERCRED saw it) must be
                // confined as the pool's profile says.
                let check = w.slot().is_some() || ps.cfg.worker_require_sandbox;
                if let (true, Some(profile), Some(real)) =
                    (check, ps.cfg.sandbox.profile.as_ref(), w.pid())
                {
                    // Out of fds on our side is not the worker's fault: it is
                    // stopped and restarted, never given up for that.
                    if let Err(e) = std::fs::File::open(format!("/proc/{real}/status")) {
                        if supervisor::is_resource_error(&e) {
                            if let Some(slot) = w.slot().and_then(|k| ps.slots.get_mut(k)) {
                                slot.spare();
                            }
                            return Err(Gone::Unverifiable(format!(
                                "cannot open /proc/{real}/status: {e}"
                            )));
                        }
                    }
                    if let Err(m) = baton_sdk::sandbox::verify(real, profile) {
                        // The same profile would fail the same way: no restart.
                        if let Some(slot) = w.slot().and_then(|k| ps.slots.get_mut(k)) {
                            slot.give_up();
                        }
                        return Err(Gone::Sandbox(baton_sdk::sandbox::describe(&m)));
                    }
                }
                w.set_capacity(capacity, max_cap);
                if w.pid().is_some_and(|p| p != pid as i32) {
                    debug!(
                        worker = w.id(),
                        spawned = w.pid(),
                        announced = pid,
                        "worker announced another pid"
                    );
                }
                // The version both speak: what the worker's HELLO says, at
                // most ours. WELCOME goes out in it, and so does everything
                // after.
                w.chan()
                    .set_version(r.version.min(baton_sdk::proto::VERSION));
                w.chan()
                    .send(&Msg::Welcome { worker_id: w.id() }, None)
                    .map_err(|e| Gone::SendFailed(format!("WELCOME could not be sent: {e}")))?;
                w.set_ready(Instant::now());
                info!(
                    worker = w.id(),
                    pid = pid,
                    pool = %ps.cfg.name,
                    capacity = w.capacity(),
                    protocol = w.chan().version(),
                    tls = flags.tls(),
                    "worker ready"
                );
                if drain_now {
                    self.drain_worker(key);
                }
                Ok(())
            }
            (State::Starting, other) => {
                Err(Gone::Protocol(format!("{:?} before HELLO", other.kind())))
            }
            (_, Msg::Ack(ids)) => {
                for id in ids {
                    if !w.ack(id) {
                        return Err(Gone::Protocol(format!(
                            "ACK for connection {id}, which it does not hold unacknowledged"
                        )));
                    }
                }
                // Our copies of those fds are closed now: if accepting was
                // paused for want of fds, try again at once.
                if self.emfile_until.is_some() {
                    self.emfile_until = Some(Instant::now());
                }
                Ok(())
            }
            (_, Msg::Done(ids)) => {
                for id in ids {
                    if !w.done(id) {
                        return Err(Gone::Protocol(format!(
                            "DONE for connection {id}, which it does not hold"
                        )));
                    }
                }
                if w.stalled() {
                    w.set_stalled(false);
                    info!(
                        worker = w.id(),
                        in_flight = w.in_flight(),
                        "worker no longer stalled: it finished a connection"
                    );
                }
                Ok(())
            }
            (_, Msg::Park(ps)) => {
                let now = Instant::now();
                for (p, fd) in ps.into_iter().zip(r.fds) {
                    let Some(w) = self.worker(key) else {
                        return Ok(());
                    };
                    if !w.park(p.info.id) {
                        return Err(Gone::Protocol(format!(
                            "PARK of connection {}, which it does not own",
                            p.info.id
                        )));
                    }
                    // The fd goes to another worker later: it must be that
                    // TCP connection, not whatever the worker can open.
                    match parked_fd_is(&fd, &p.info) {
                        Ok(true) => self.park(key.pool, p, fd, now),
                        // The client is gone already: nothing to hold.
                        Ok(false) => self.stats.parked_closed += 1,
                        Err(why) => {
                            return Err(Gone::Protocol(format!(
                                "PARK of connection {} with {why}",
                                p.info.id
                            )))
                        }
                    }
                }
                Ok(())
            }
            (_, Msg::Hello { .. }) => Err(Gone::Protocol("second HELLO".to_string())),
            (_, other) => Err(Gone::Protocol(format!(
                "{:?} is not a worker-to-acceptor message",
                other.kind()
            ))),
        }
    }

    /// Removes a worker from the pool. Every connection it had not
    /// acknowledged goes back to the front of the queue for another worker;
    /// a spawned worker's process is SIGKILLed when `why` says so.
    ///
    /// First the channel is shut down, so that the worker can send nothing
    /// more, and read to its end: every ACK and DONE it sent is counted
    /// before anything is given to another worker. A connection is then
    /// re-dispatched only if the worker never said it owned it, and it can
    /// no longer say so: nothing is served twice, and the counts (`lost`,
    /// `handled`) are exact.
    pub(super) fn close_worker(&mut self, key: Wk, why: Gone) {
        let Some(w) = self.worker(key) else {
            return;
        };
        let _ = w.chan().shutdown();
        read_to_end(w);
        let ps = &mut self.pools[key.pool];
        let mut w = ps.pool.workers.remove(key.key);
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&w.chan().as_raw_fd()));
        let lost = w.owned();
        let unacked = w.take_unacked();
        let n = unacked.len();
        for h in unacked.into_iter().rev() {
            ps.pending.push_front(h);
        }
        self.stats.redispatched += n as u64;
        self.stats.lost += lost as u64;
        ps.stats.redispatched += n as u64;
        ps.stats.lost += lost as u64;
        let quiet = n == 0 && lost == 0 && !why.kill();
        if (w.state() == State::Draining && why.orderly() && quiet)
            || (quiet && self.shutdown.is_some())
        {
            info!(
                worker = w.id(),
                pid = w.pid(),
                pool = %ps.cfg.name,
                reason = %why,
                handled = w.handled(),
                "worker disconnected"
            );
        } else {
            // `lost`: connections the worker had acknowledged and not
            // finished; they were its to serve and went down with it.
            warn!(
                worker = w.id(),
                pid = w.pid(),
                pool = %ps.cfg.name,
                reason = %why,
                handled = w.handled(),
                redispatched = n,
                lost,
                "worker disconnected"
            );
        }
        if let Some(slot) = w.slot().and_then(|s| ps.slots.get_mut(s)) {
            slot.disconnected();
            // Welcomed and given work: whatever happens to it now is no
            // crash loop.
            slot.prove(w.state() != State::Starting && w.sent_total() > 0);
            if why.kill() {
                if let Some(pid) = slot.pid() {
                    // The pid is still ours: it is only released when we reap
                    // it, which marks the slot reaped first.
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
    }
}
