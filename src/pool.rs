//! The pool of connected workers: per-worker accounting of the connections
//! in flight, and the choice of a worker for the next connection.
//!
//! Pure bookkeeping, no I/O: the event loop in [`crate::acceptor`] sends and
//! receives, and tells the pool what happened. That keeps the ownership
//! rules of the protocol (the acceptor holds an fd until the worker ACKs it)
//! in one small, testable place.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use baton_sdk::proto::ConnInfo;
use baton_sdk::Channel;
use slab::Slab;

use crate::config::Balance;

/// A worker whose oldest unacknowledged connection was sent longer ago than
/// this is lagging: while another worker has room, it gets no more. A live
/// worker acknowledges in microseconds; one that takes this long is stuck
/// in something, and every connection sent to it waits as long.
pub const ACK_LAG: Duration = Duration::from_millis(100);

/// An accepted connection the acceptor still owns: not yet handed to a
/// worker, or handed but not acknowledged.
#[derive(Debug)]
pub struct Held {
    pub info: ConnInfo,
    pub fd: OwnedFd,
}

/// Lifecycle of a worker in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum State {
    /// Connected, waiting for its HELLO; gets no connection.
    Starting,
    /// Said HELLO; takes connections.
    Ready,
    /// Was sent DRAIN; gets no new connection, finishes what it has.
    Draining,
}

/// One worker's channel and accounting.
#[derive(Debug)]
pub struct Worker {
    id: u32,
    chan: Channel,
    state: State,
    /// The pid the worker announced (or was spawned as).
    pid: Option<i32>,
    /// Index of the supervisor slot that spawned it; None if it registered.
    slot: Option<usize>,
    capacity: u32,
    /// The capacity the worker announced in HELLO (0: none of its own).
    announced: u32,
    /// Since when it has had no connection (for autoscaling).
    idle_since: Option<Instant>,
    /// Connections sent and not yet DONE. `Some` holds the acceptor's copy
    /// of a connection not yet ACKed.
    in_flight: HashMap<u64, Option<Held>>,
    /// Send order of unacknowledged connections, for the ACK timeout.
    /// Entries already acknowledged are skipped lazily.
    unacked_order: VecDeque<(Instant, u64)>,
    /// The socket's send buffer was full: skip until it is writable.
    blocked: bool,
    /// Connections assigned to it and not sent yet, in order: the acceptor
    /// sends them in as few messages as the worker's version allows once
    /// the current round of accepting is over (they are in `in_flight`,
    /// unacknowledged, meanwhile).
    outbox: Vec<u64>,
    /// Connections it handed back idle (PARK).
    parked: u64,
    /// Connections sent and not yet acknowledged (the `Some` entries of
    /// `in_flight`): fds the acceptor still holds for this worker.
    unacked: usize,
    /// Since when it has been at its capacity without a DONE (for the
    /// stall warning).
    full_since: Option<Instant>,
    /// It was reported stalled (full, no DONE for `--stall-timeout`).
    stalled: bool,
    /// CONN messages it was sent (a worker that was given work proved it
    /// can start).
    sent_total: u64,
    handled: u64,
    connected: Instant,
    /// While draining for removal: when it is stopped regardless.
    drain_deadline: Option<Instant>,
}

impl Worker {
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn chan(&self) -> &Channel {
        &self.chan
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// It said HELLO: it takes connections from now on.
    pub fn set_ready(&mut self, now: Instant) {
        self.state = State::Ready;
        self.idle_since = Some(now);
    }

    /// It was sent DRAIN: no new connection.
    pub fn set_draining(&mut self) {
        self.state = State::Draining;
    }

    /// The pid the worker announced (or was spawned as).
    pub fn pid(&self) -> Option<i32> {
        self.pid
    }

    /// Key of the supervisor slot that spawned it; None if it registered.
    pub fn slot(&self) -> Option<usize> {
        self.slot
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn announced(&self) -> u32 {
        self.announced
    }

    /// Since when it has had no connection.
    pub fn idle_since(&self) -> Option<Instant> {
        self.idle_since
    }

    /// Connections it holds: sent and not yet DONE.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Connections it acknowledged and has not finished: its own to serve.
    pub fn owned(&self) -> usize {
        self.in_flight.values().filter(|h| h.is_none()).count()
    }

    pub fn blocked(&self) -> bool {
        self.blocked
    }

    pub fn set_blocked(&mut self, blocked: bool) {
        self.blocked = blocked;
    }

    /// Connections assigned to it and not sent yet.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// Assigns `held` to it: counted as sent (unacknowledged) at once, and
    /// queued in its outbox for the next message.
    pub fn assign(&mut self, held: Held, now: Instant) {
        let id = held.info.id;
        self.sent(held, now);
        self.outbox.push(id);
    }

    /// The first `n` connections of its outbox, for one message: their
    /// records and the fds the acceptor still holds for them.
    pub fn next_batch(&self, n: usize) -> (Vec<ConnInfo>, Vec<BorrowedFd<'_>>) {
        let mut infos = Vec::with_capacity(n);
        let mut fds = Vec::with_capacity(n);
        for id in &self.outbox[..n.min(self.outbox.len())] {
            // Only an id the worker was sent can be acknowledged, so an
            // entry is missing only if a worker guessed ids; skip it.
            if let Some(Some(h)) = self.in_flight.get(id) {
                infos.push(h.info);
                fds.push(h.fd.as_fd());
            }
        }
        (infos, fds)
    }

    /// The first `n` connections of its outbox went out.
    pub fn batch_sent(&mut self, n: usize) {
        let n = n.min(self.outbox.len());
        self.outbox.drain(..n);
    }

    /// Connections it handed back idle (PARK).
    pub fn parked(&self) -> u64 {
        self.parked
    }

    /// Since when it has been full without a DONE.
    pub fn full_since(&self) -> Option<Instant> {
        self.full_since
    }

    pub fn stalled(&self) -> bool {
        self.stalled
    }

    pub fn set_stalled(&mut self, stalled: bool) {
        self.stalled = stalled;
    }

    /// Connections it was sent, in all.
    pub fn sent_total(&self) -> u64 {
        self.sent_total
    }

    /// Connections it finished, in all.
    pub fn handled(&self) -> u64 {
        self.handled
    }

    /// When its channel joined the pool.
    pub fn connected(&self) -> Instant {
        self.connected
    }

    /// While draining for removal: when it is stopped regardless.
    pub fn drain_deadline(&self) -> Option<Instant> {
        self.drain_deadline
    }

    pub fn set_drain_deadline(&mut self, at: Instant) {
        self.drain_deadline = Some(at);
    }

    pub fn new(id: u32, chan: Channel, slot: Option<usize>, pid: Option<i32>) -> Worker {
        Worker {
            id,
            chan,
            state: State::Starting,
            pid,
            slot,
            capacity: 0,
            announced: 0,
            idle_since: None,
            in_flight: HashMap::new(),
            unacked_order: VecDeque::new(),
            blocked: false,
            outbox: Vec::new(),
            parked: 0,
            unacked: 0,
            full_since: None,
            stalled: false,
            sent_total: 0,
            handled: 0,
            connected: Instant::now(),
            drain_deadline: None,
        }
    }

    /// Whether it can take one more connection now.
    pub fn available(&self) -> bool {
        self.state == State::Ready && !self.blocked && (self.in_flight.len() as u32) < self.capacity
    }

    /// Whether its oldest unacknowledged connection is older than
    /// [`ACK_LAG`] at `now`.
    pub fn lagging(&mut self, now: Instant) -> bool {
        self.oldest_unacked()
            .is_some_and(|t| now.saturating_duration_since(t) > ACK_LAG)
    }

    /// Send time of the oldest connection it has not acknowledged.
    pub fn oldest_unacked(&mut self) -> Option<Instant> {
        while let Some(&(at, id)) = self.unacked_order.front() {
            if matches!(self.in_flight.get(&id), Some(Some(_))) {
                return Some(at);
            }
            self.unacked_order.pop_front();
        }
        None
    }

    /// Records that `held` was sent to this worker.
    /// Sets the capacity from the announced one and the pool's limit.
    pub fn set_capacity(&mut self, announced: u32, pool_max: u32) {
        self.announced = announced;
        self.capacity = if announced == 0 {
            pool_max
        } else {
            announced.min(pool_max)
        };
    }

    fn sent(&mut self, held: Held, now: Instant) {
        self.idle_since = None;
        let id = held.info.id;
        self.unacked_order.push_back((now, id));
        self.in_flight.insert(id, Some(held));
        self.unacked += 1;
        self.sent_total += 1;
        if self.full_since.is_none() && self.in_flight.len() as u32 >= self.capacity {
            self.full_since = Some(now);
        }
    }

    /// The worker acknowledged `id`: the acceptor's copy is closed.
    /// Returns false for an id this worker was never sent or already ACKed.
    pub fn ack(&mut self, id: u64) -> bool {
        match self.in_flight.get_mut(&id) {
            Some(slot @ Some(_)) => {
                *slot = None;
                self.unacked -= 1;
                true
            }
            _ => false,
        }
    }

    /// The worker handed `id` back idle (PARK): it is finished with it, as
    /// with DONE. Returns false unless the worker owned it (acknowledged).
    pub fn park(&mut self, id: u64) -> bool {
        if matches!(self.in_flight.get(&id), Some(None)) {
            self.parked += 1;
            self.done(id)
        } else {
            false
        }
    }

    /// The worker finished `id`. Returns false for an unknown id.
    pub fn done(&mut self, id: u64) -> bool {
        if let Some(held) = self.in_flight.remove(&id) {
            if held.is_some() {
                // DONE without ACK: it owned it all the same.
                self.unacked -= 1;
            }
            self.handled += 1;
            self.full_since = None;
            if self.in_flight.is_empty() {
                self.idle_since = Some(Instant::now());
            }
            true
        } else {
            false
        }
    }

    /// Takes back every connection the worker never acknowledged, oldest
    /// first, so that another worker can serve them.
    pub fn take_unacked(&mut self) -> Vec<Held> {
        let mut held: Vec<Held> = self.in_flight.drain().filter_map(|(_, h)| h).collect();
        held.sort_by_key(|h| h.info.id);
        self.unacked_order.clear();
        self.outbox.clear();
        self.unacked = 0;
        held
    }
}

/// Autoscaling bounds: between `min` and `max` spawned workers; one idle
/// for `idle` above `min` is retired.
#[derive(Debug, Clone, Copy)]
pub struct ScaleBounds {
    pub min: usize,
    pub max: usize,
    pub idle: Duration,
}

/// What autoscaling should do now (one step at a time, so that a burst does
/// not spawn a crowd).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Hold,
    /// Spawn one more worker.
    Add,
    /// Drain and retire the worker with this pool key.
    Retire(usize),
}

/// All connected workers and the balancing policy.
#[derive(Debug)]
pub struct Pool {
    pub workers: Slab<Worker>,
    balance: Balance,
    /// Rotation point: where the next search starts, so that ties (and
    /// round-robin) go round the pool instead of always to the first.
    next: usize,
}

impl Pool {
    /// Changes the balancing policy (on reload).
    pub fn set_balance(&mut self, balance: Balance) {
        self.balance = balance;
    }

    pub fn new(balance: Balance) -> Pool {
        Pool {
            workers: Slab::new(),
            balance,
            next: 0,
        }
    }

    /// The worker for the next connection, or None if every one is full.
    /// A worker that is [`lagging`](Worker::lagging) is chosen only when no
    /// other has room.
    pub fn pick(&mut self, now: Instant) -> Option<usize> {
        let (key, _) = self
            .best(|w| !w.lagging(now))
            .or_else(|| self.best(|_| true))?;
        self.next = key + 1;
        Some(key)
    }

    /// The best available worker among those `eligible` accepts, by the
    /// balancing policy, searching from the rotation point.
    fn best(&mut self, mut eligible: impl FnMut(&mut Worker) -> bool) -> Option<(usize, usize)> {
        let cap = self.workers.capacity().max(1);
        let start = self.next % cap;
        let mut best: Option<(usize, usize)> = None;
        // Keys in rotation order: start..cap, then 0..start.
        for key in (start..cap).chain(0..start) {
            let Some(w) = self.workers.get_mut(key) else {
                continue;
            };
            if !w.available() || !eligible(w) {
                continue;
            }
            match self.balance {
                Balance::RoundRobin => return Some((key, 0)),
                Balance::LeastConn => {
                    let load = w.in_flight.len();
                    if best.is_none_or(|(_, b)| load < b) {
                        best = Some((key, load));
                        if load == 0 {
                            break;
                        }
                    }
                }
            }
        }
        best
    }

    /// The autoscaling decision, with `live` spawned workers that are not
    /// being removed: add one while some are ready and none has room (an
    /// empty pool is a crash loop or an operator's choice, not load) and no
    /// spawned worker is still starting; else retire the newest spawned
    /// worker that has been idle for `bounds.idle`, above `bounds.min`.
    pub fn scale(&self, live: usize, bounds: ScaleBounds, now: Instant) -> Scale {
        let spawned = |w: &&Worker| w.slot.is_some();
        let starting = self
            .workers
            .iter()
            .any(|(_, w)| w.state == State::Starting && spawned(&w));
        let full =
            self.workers.iter().any(|(_, w)| w.state == State::Ready) && !self.has_capacity();
        if live < bounds.max && !starting && full {
            return Scale::Add;
        }
        if live > bounds.min {
            let victim = self
                .workers
                .iter()
                .filter(|(_, w)| {
                    spawned(w)
                        && w.state == State::Ready
                        && w.in_flight.is_empty()
                        && w.idle_since.is_some_and(|t| t + bounds.idle <= now)
                })
                .max_by_key(|(_, w)| w.id)
                .map(|(k, _)| k);
            if let Some(k) = victim {
                return Scale::Retire(k);
            }
        }
        Scale::Hold
    }

    /// Connections sent to workers and not yet acknowledged, in all.
    pub fn unacked(&self) -> usize {
        self.workers.iter().map(|(_, w)| w.unacked).sum()
    }

    /// Whether any worker could take a connection now.
    pub fn has_capacity(&self) -> bool {
        self.workers.iter().any(|(_, w)| w.available())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(id: u64) -> Held {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        Held {
            info: ConnInfo {
                id,
                listener: 0,
                peer: "127.0.0.1:1".parse().unwrap(),
                local: "127.0.0.1:2".parse().unwrap(),
            },
            fd: a.into(),
        }
    }

    fn pool(balance: Balance, n: usize, capacity: u32) -> Pool {
        let mut p = Pool::new(balance);
        for i in 0..n {
            let (c, _) = Channel::pair().unwrap();
            let mut w = Worker::new(i as u32, c, None, None);
            w.state = State::Ready;
            w.capacity = capacity;
            p.workers.insert(w);
        }
        p
    }

    #[test]
    fn least_conn_prefers_the_idlest_and_rotates_ties() {
        let mut p = pool(Balance::LeastConn, 3, 10);
        let now = Instant::now();
        let mut order = Vec::new();
        for id in 0..3 {
            let k = p.pick(now).unwrap();
            p.workers[k].sent(held(id), now);
            order.push(k);
        }
        order.sort();
        assert_eq!(order, vec![0, 1, 2], "ties spread over the pool");
        // Worker 1 finishes: it is the idlest.
        assert!(p.workers[1].ack(1));
        assert!(p.workers[1].done(1));
        assert_eq!(p.pick(now), Some(1));
    }

    #[test]
    fn full_workers_are_skipped_and_capacity_ends() {
        let mut p = pool(Balance::RoundRobin, 2, 1);
        let now = Instant::now();
        let a = p.pick(now).unwrap();
        p.workers[a].sent(held(1), now);
        let b = p.pick(now).unwrap();
        assert_ne!(a, b);
        p.workers[b].sent(held(2), now);
        assert_eq!(p.pick(now), None);
        assert!(!p.has_capacity());
    }

    #[test]
    fn ack_done_and_take_back() {
        let mut p = pool(Balance::LeastConn, 1, 10);
        let now = Instant::now();
        for id in [5, 3, 9] {
            p.workers[0].sent(held(id), now);
        }
        let w = &mut p.workers[0];
        assert!(w.ack(3));
        assert!(!w.ack(3), "double ACK is refused");
        assert!(!w.ack(42), "unknown id is refused");
        assert!(w.done(3));
        assert!(!w.done(3));
        assert_eq!(w.oldest_unacked(), Some(now));
        assert_eq!(w.unacked, 2);
        let back: Vec<u64> = w.take_unacked().iter().map(|h| h.info.id).collect();
        assert_eq!(back, vec![5, 9]);
        assert!(w.in_flight.is_empty());
        assert_eq!(w.unacked, 0);
    }

    #[test]
    fn a_lagging_worker_gets_nothing_while_another_has_room() {
        let mut p = pool(Balance::RoundRobin, 2, 10);
        let t0 = Instant::now();
        // Worker 0 took one and never acknowledged it.
        p.workers[0].sent(held(1), t0);
        let later = t0 + ACK_LAG + Duration::from_millis(1);
        for id in 2..8 {
            let k = p.pick(later).unwrap();
            assert_eq!(k, 1, "connection {id} went to the lagging worker");
            p.workers[k].sent(held(id), later);
            assert!(p.workers[k].ack(id));
        }
        // Once the other is full, the lagging one is better than nothing.
        let mut p = pool(Balance::RoundRobin, 2, 1);
        p.workers[0].sent(held(1), t0);
        p.workers[1].sent(held(2), later);
        assert_eq!(p.pick(later), None, "both full");
        assert!(p.workers[1].done(2));
        assert_eq!(p.pick(later), Some(1));
        // Within the bound it is an ordinary worker.
        let mut p = pool(Balance::RoundRobin, 2, 10);
        p.workers[0].sent(held(1), t0);
        let soon = t0 + ACK_LAG / 2;
        let picks: Vec<usize> = (0..4).map(|_| p.pick(soon).unwrap()).collect();
        assert!(picks.contains(&0) && picks.contains(&1), "{picks:?}");
    }

    #[test]
    fn autoscaling_adds_when_full_and_retires_the_newest_idle() {
        let b = ScaleBounds {
            min: 1,
            max: 3,
            idle: Duration::from_secs(60),
        };
        let now = Instant::now();
        let mut p = pool(Balance::LeastConn, 2, 1);
        for (_, w) in p.workers.iter_mut() {
            w.slot = Some(0);
            w.idle_since = Some(now);
        }
        assert_eq!(
            p.scale(2, b, now),
            Scale::Hold,
            "room, not idle long enough"
        );
        p.workers[0].sent(held(1), now);
        p.workers[1].sent(held(2), now);
        assert_eq!(p.scale(2, b, now), Scale::Add, "every worker full");
        assert_eq!(p.scale(3, b, now), Scale::Hold, "at the maximum");
        p.workers[1].state = State::Starting;
        assert_eq!(p.scale(2, b, now), Scale::Hold, "one is still starting");
        p.workers[1].state = State::Ready;
        // Both finish; after the idle timeout the newest (highest id) goes.
        assert!(p.workers[0].done(1) && p.workers[1].done(2));
        let later = now + b.idle + Duration::from_secs(1);
        assert_eq!(p.scale(2, b, later), Scale::Retire(1));
        assert_eq!(p.scale(1, b, later), Scale::Hold, "at the minimum");
        // A registered worker is never retired by autoscaling.
        p.workers[1].slot = None;
        assert_eq!(p.scale(2, b, later), Scale::Retire(0));
    }

    #[test]
    fn a_full_worker_is_marked_until_its_next_done() {
        let mut p = pool(Balance::LeastConn, 1, 2);
        let now = Instant::now();
        p.workers[0].sent(held(1), now);
        assert_eq!(p.workers[0].full_since, None);
        p.workers[0].sent(held(2), now);
        assert_eq!(p.workers[0].full_since, Some(now));
        assert!(p.workers[0].done(1), "DONE without ACK is accepted");
        assert_eq!(p.workers[0].full_since, None);
        assert_eq!(p.workers[0].unacked, 1);
    }
}

/// A connection the acceptor holds, as a binary upgrade passes it to the
/// next image: its record and the number of its (inherited) fd.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HeldSnap {
    pub id: u64,
    pub listener: u16,
    pub peer: std::net::SocketAddr,
    pub local: std::net::SocketAddr,
    pub fd: std::os::fd::RawFd,
}

impl HeldSnap {
    /// The record of `held`; its fd stays open (and owned by `held`).
    pub fn of(held: &Held) -> HeldSnap {
        use std::os::fd::AsRawFd;
        HeldSnap {
            id: held.info.id,
            listener: held.info.listener,
            peer: held.info.peer,
            local: held.info.local,
            fd: held.fd.as_raw_fd(),
        }
    }

    /// The connection again, owning `fd` (the adopted descriptor).
    pub fn into_held(self, fd: OwnedFd) -> Held {
        Held {
            info: ConnInfo {
                id: self.id,
                listener: self.listener,
                peer: self.peer,
                local: self.local,
            },
            fd,
        }
    }
}

/// How long ago `t` was, in ms (for a snapshot: `Instant`s do not cross
/// an exec).
pub fn ago(now: Instant, t: Instant) -> u64 {
    now.saturating_duration_since(t).as_millis() as u64
}

/// The instant `ms` before `now` (or `now`, if the clock does not go back
/// that far).
pub fn before(now: Instant, ms: u64) -> Instant {
    now.checked_sub(Duration::from_millis(ms)).unwrap_or(now)
}

/// A worker's accounting, as a binary upgrade passes it to the next image.
/// Its channel and the connections it has not acknowledged are fds the
/// next image inherits.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WorkerSnap {
    pub id: u32,
    pub chan: std::os::fd::RawFd,
    pub version: u8,
    pub state: State,
    pub pid: Option<i32>,
    pub slot: Option<usize>,
    pub capacity: u32,
    pub announced: u32,
    pub idle_ms: Option<u64>,
    /// Connections it holds: `Some` while not acknowledged.
    pub in_flight: Vec<(u64, Option<HeldSnap>)>,
    pub unacked_order: Vec<(u64, u64)>,
    pub blocked: bool,
    pub outbox: Vec<u64>,
    pub parked: u64,
    pub full_ms: Option<u64>,
    pub stalled: bool,
    pub sent_total: u64,
    pub handled: u64,
    pub connected_ms: u64,
    pub drain_left_ms: Option<u64>,
}

impl Worker {
    /// Its snapshot at `now`; nothing of it is closed or moved.
    pub fn snapshot(&self, now: Instant) -> WorkerSnap {
        use std::os::fd::AsRawFd;
        WorkerSnap {
            id: self.id,
            chan: self.chan.as_raw_fd(),
            version: self.chan.version(),
            state: self.state,
            pid: self.pid,
            slot: self.slot,
            capacity: self.capacity,
            announced: self.announced,
            idle_ms: self.idle_since.map(|t| ago(now, t)),
            in_flight: self
                .in_flight
                .iter()
                .map(|(id, h)| (*id, h.as_ref().map(HeldSnap::of)))
                .collect(),
            unacked_order: self
                .unacked_order
                .iter()
                .map(|(t, id)| (ago(now, *t), *id))
                .collect(),
            blocked: self.blocked,
            outbox: self.outbox.clone(),
            parked: self.parked,
            full_ms: self.full_since.map(|t| ago(now, t)),
            stalled: self.stalled,
            sent_total: self.sent_total,
            handled: self.handled,
            connected_ms: ago(now, self.connected),
            drain_left_ms: self
                .drain_deadline
                .map(|t| t.saturating_duration_since(now).as_millis() as u64),
        }
    }

    /// The worker of `snap`, with its channel and connections adopted
    /// (`adopt` turns an inherited fd number into an owned fd).
    pub fn restore(
        snap: WorkerSnap,
        chan: Channel,
        now: Instant,
        adopt: &mut dyn FnMut(std::os::fd::RawFd) -> OwnedFd,
    ) -> Worker {
        chan.set_version(snap.version);
        let in_flight: HashMap<u64, Option<Held>> = snap
            .in_flight
            .into_iter()
            .map(|(id, h)| {
                (
                    id,
                    h.map(|h| {
                        let fd = adopt(h.fd);
                        h.into_held(fd)
                    }),
                )
            })
            .collect();
        let unacked = in_flight.values().filter(|h| h.is_some()).count();
        Worker {
            id: snap.id,
            chan,
            state: snap.state,
            pid: snap.pid,
            slot: snap.slot,
            capacity: snap.capacity,
            announced: snap.announced,
            idle_since: snap.idle_ms.map(|ms| before(now, ms)),
            in_flight,
            unacked_order: snap
                .unacked_order
                .into_iter()
                .map(|(ms, id)| (before(now, ms), id))
                .collect(),
            blocked: snap.blocked,
            outbox: snap.outbox,
            parked: snap.parked,
            unacked,
            full_since: snap.full_ms.map(|ms| before(now, ms)),
            stalled: snap.stalled,
            sent_total: snap.sent_total,
            handled: snap.handled,
            connected: before(now, snap.connected_ms),
            drain_deadline: snap.drain_left_ms.map(|ms| now + Duration::from_millis(ms)),
        }
    }
}
