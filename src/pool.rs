//! The pool of connected workers: per-worker accounting of the connections
//! in flight, and the choice of a worker for the next connection.
//!
//! Pure bookkeeping, no I/O: the event loop in [`crate::acceptor`] sends and
//! receives, and tells the pool what happened. That keeps the ownership
//! rules of the protocol (the acceptor holds an fd until the worker ACKs it)
//! in one small, testable place.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::time::Instant;

use baton_sdk::proto::ConnInfo;
use baton_sdk::Channel;
use slab::Slab;

use crate::config::Balance;

/// An accepted connection the acceptor still owns: not yet handed to a
/// worker, or handed but not acknowledged.
#[derive(Debug)]
pub struct Held {
    pub info: ConnInfo,
    pub fd: OwnedFd,
    /// When it was first accepted (for logs and metrics).
    pub accepted: Instant,
}

/// Lifecycle of a worker in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    pub id: u32,
    pub chan: Channel,
    pub state: State,
    /// The pid the worker announced (or was spawned as).
    pub pid: Option<i32>,
    /// Index of the supervisor slot that spawned it; None if it registered.
    pub slot: Option<usize>,
    pub capacity: u32,
    /// The capacity the worker announced in HELLO (0: none of its own).
    pub announced: u32,
    /// Since when it has had no connection (for autoscaling).
    pub idle_since: Option<Instant>,
    /// Connections sent and not yet DONE. `Some` holds the acceptor's copy
    /// of a connection not yet ACKed.
    pub in_flight: HashMap<u64, Option<Held>>,
    /// Send order of unacknowledged connections, for the ACK timeout.
    /// Entries already acknowledged are skipped lazily.
    pub unacked_order: VecDeque<(Instant, u64)>,
    /// The socket's send buffer was full: skip until it is writable.
    pub blocked: bool,
    pub handled: u64,
    pub connected: Instant,
    /// While draining for removal: when it is stopped regardless.
    pub drain_deadline: Option<Instant>,
}

impl Worker {
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
            handled: 0,
            connected: Instant::now(),
            drain_deadline: None,
        }
    }

    /// Whether it can take one more connection now.
    pub fn available(&self) -> bool {
        self.state == State::Ready && !self.blocked && (self.in_flight.len() as u32) < self.capacity
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

    pub fn sent(&mut self, held: Held, now: Instant) {
        self.idle_since = None;
        let id = held.info.id;
        self.unacked_order.push_back((now, id));
        self.in_flight.insert(id, Some(held));
    }

    /// The worker acknowledged `id`: the acceptor's copy is closed.
    /// Returns false for an id this worker was never sent or already ACKed.
    pub fn ack(&mut self, id: u64) -> bool {
        match self.in_flight.get_mut(&id) {
            Some(slot @ Some(_)) => {
                *slot = None;
                true
            }
            _ => false,
        }
    }

    /// The worker finished `id`. Returns false for an unknown id.
    pub fn done(&mut self, id: u64) -> bool {
        if self.in_flight.remove(&id).is_some() {
            self.handled += 1;
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
        held
    }
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
    pub fn pick(&mut self) -> Option<usize> {
        let cap = self.workers.capacity().max(1);
        let start = self.next % cap;
        let mut best: Option<(usize, usize)> = None;
        // Keys in rotation order: start..cap, then 0..start.
        for key in (start..cap).chain(0..start) {
            let Some(w) = self.workers.get(key) else {
                continue;
            };
            if !w.available() {
                continue;
            }
            match self.balance {
                Balance::RoundRobin => {
                    best = Some((key, 0));
                    break;
                }
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
        let (key, _) = best?;
        self.next = key + 1;
        Some(key)
    }

    /// Whether any worker could take a connection now.
    pub fn has_capacity(&self) -> bool {
        self.workers.iter().any(|(_, w)| w.available())
    }

    /// Workers that are connected and not draining.
    pub fn live(&self) -> usize {
        self.workers
            .iter()
            .filter(|(_, w)| w.state != State::Draining)
            .count()
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
            accepted: Instant::now(),
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
            let k = p.pick().unwrap();
            p.workers[k].sent(held(id), now);
            order.push(k);
        }
        order.sort();
        assert_eq!(order, vec![0, 1, 2], "ties spread over the pool");
        // Worker 1 finishes: it is the idlest.
        assert!(p.workers[1].ack(1));
        assert!(p.workers[1].done(1));
        assert_eq!(p.pick(), Some(1));
    }

    #[test]
    fn full_workers_are_skipped_and_capacity_ends() {
        let mut p = pool(Balance::RoundRobin, 2, 1);
        let now = Instant::now();
        let a = p.pick().unwrap();
        p.workers[a].sent(held(1), now);
        let b = p.pick().unwrap();
        assert_ne!(a, b);
        p.workers[b].sent(held(2), now);
        assert_eq!(p.pick(), None);
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
        let back: Vec<u64> = w.take_unacked().iter().map(|h| h.info.id).collect();
        assert_eq!(back, vec![5, 9]);
        assert!(w.in_flight.is_empty());
    }
}
