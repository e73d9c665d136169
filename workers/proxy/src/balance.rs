//! Choosing an upstream server: pure decision code, no I/O.
//!
//! The caller says, for each server, whether it may take this connection
//! ([`Candidate::usable`]: up, and not already tried for it) and how many
//! connections this worker has in flight to it; [`Balancer::pick`] answers
//! with an index. Primary servers are considered first; backups only when
//! no primary is usable. Weights are honoured by every policy:
//!
//! * **round-robin**: smooth weighted round robin (nginx's): weights 5, 1, 1
//!   give `a a b a c a a`, never a burst of one server.
//! * **least-conn**: fewest in flight relative to weight (`n / w`, compared
//!   exactly with cross products); ties go round the list.
//! * **p2c**: two distinct servers drawn at random in proportion to weight,
//!   and the one with less in flight relative to weight (Mitzenmacher's
//!   power of two choices: nearly least-conn's spread, without the herd
//!   effect of every worker choosing the same least loaded server).
//! * **hash**: weighted rendezvous hashing of the key (the client's IP):
//!   score `-w / ln(u)` with `u` a hash of key and server in (0, 1), highest
//!   wins. A client keeps its server while that server is up; when one goes
//!   down only its clients move, and they come back when it returns.

use clap::ValueEnum;

/// A balancing policy (`--balance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Policy {
    RoundRobin,
    LeastConn,
    P2c,
    Hash,
}

/// What the balancer knows of one server for one decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Up, and not already tried for this connection.
    pub usable: bool,
    /// Connections in flight to it from this worker.
    pub outstanding: u32,
}

/// One server's fixed traits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Server {
    pub weight: u32,
    pub backup: bool,
    /// A stable identity for hashing (e.g. a hash of its name), so that a
    /// client maps to the same server whatever the order of the list.
    pub id: u64,
}

/// The state a policy keeps between decisions.
#[derive(Debug, Clone)]
pub struct Balancer {
    policy: Policy,
    servers: Vec<Server>,
    /// Smooth weighted round robin's current weights.
    current: Vec<i64>,
    /// Rotation for ties.
    turn: usize,
    rng: u64,
}

impl Balancer {
    /// `seed` feeds p2c's generator (any value; 0 is replaced).
    pub fn new(policy: Policy, servers: Vec<Server>, seed: u64) -> Balancer {
        Balancer {
            policy,
            current: vec![0; servers.len()],
            servers,
            turn: 0,
            rng: seed | 1,
        }
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// The server for this connection, or None when none is usable.
    /// `state` has one entry per server, in the order given to
    /// [`Balancer::new`]; `key` is what `hash` hashes.
    pub fn pick(&mut self, state: &[Candidate], key: u64) -> Option<usize> {
        let n = self.servers.len().min(state.len());
        let eligible = |backup: bool| -> Vec<usize> {
            (0..n)
                .filter(|&i| state[i].usable && self.servers[i].backup == backup)
                .collect()
        };
        let mut set = eligible(false);
        if set.is_empty() {
            set = eligible(true);
        }
        if set.is_empty() {
            return None;
        }
        let pick = match self.policy {
            Policy::RoundRobin => self.smooth_rr(&set),
            Policy::LeastConn => self.least(&set, state),
            Policy::P2c => self.p2c(&set, state),
            Policy::Hash => self.rendezvous(&set, key),
        };
        Some(pick)
    }

    fn weight(&self, i: usize) -> u64 {
        u64::from(self.servers[i].weight.max(1))
    }

    fn smooth_rr(&mut self, set: &[usize]) -> usize {
        let total: i64 = set.iter().map(|&i| self.weight(i) as i64).sum();
        let mut best = set[0];
        for &i in set {
            self.current[i] += self.weight(i) as i64;
            if self.current[i] > self.current[best] {
                best = i;
            }
        }
        self.current[best] -= total;
        best
    }

    /// Whether `a` carries less than `b` relative to weight.
    fn lighter(&self, a: usize, b: usize, state: &[Candidate]) -> bool {
        u64::from(state[a].outstanding) * self.weight(b)
            < u64::from(state[b].outstanding) * self.weight(a)
    }

    fn least(&mut self, set: &[usize], state: &[Candidate]) -> usize {
        self.turn = self.turn.wrapping_add(1);
        let start = self.turn % set.len();
        let mut best = set[start];
        for k in 1..set.len() {
            let i = set[(start + k) % set.len()];
            if self.lighter(i, best, state) {
                best = i;
            }
        }
        best
    }

    fn next_rand(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// One of `set`, drawn in proportion to weight.
    fn draw(&mut self, set: &[usize]) -> usize {
        let total: u64 = set.iter().map(|&i| self.weight(i)).sum();
        let mut r = self.next_rand() % total;
        for &i in set {
            let w = self.weight(i);
            if r < w {
                return i;
            }
            r -= w;
        }
        set[set.len() - 1]
    }

    fn p2c(&mut self, set: &[usize], state: &[Candidate]) -> usize {
        if set.len() == 1 {
            return set[0];
        }
        let a = self.draw(set);
        let rest: Vec<usize> = set.iter().copied().filter(|&i| i != a).collect();
        let b = self.draw(&rest);
        if self.lighter(b, a, state) {
            b
        } else {
            a
        }
    }

    fn rendezvous(&self, set: &[usize], key: u64) -> usize {
        let mut best = set[0];
        let mut best_score = f64::NEG_INFINITY;
        for &i in set {
            let h = mix(key ^ mix(self.servers[i].id));
            // u in (0, 1): 53 random bits, never 0 nor 1.
            let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let score = -(self.weight(i) as f64) / u.ln();
            if score > best_score {
                best_score = score;
                best = i;
            }
        }
        best
    }
}

/// SplitMix64's finaliser: a cheap, well-spread 64-bit mix.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(weights: &[u32], backups: &[bool]) -> Vec<Server> {
        weights
            .iter()
            .zip(backups)
            .enumerate()
            .map(|(i, (&weight, &backup))| Server {
                weight,
                backup,
                id: mix(i as u64 + 100),
            })
            .collect()
    }

    fn up(n: usize) -> Vec<Candidate> {
        vec![
            Candidate {
                usable: true,
                outstanding: 0
            };
            n
        ]
    }

    fn counts(b: &mut Balancer, state: &[Candidate], rounds: usize) -> Vec<usize> {
        let mut c = vec![0; state.len()];
        for k in 0..rounds {
            c[b.pick(state, mix(k as u64)).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn smooth_round_robin_interleaves_by_weight() {
        let mut b = Balancer::new(Policy::RoundRobin, servers(&[5, 1, 1], &[false; 3]), 1);
        let order: Vec<usize> = (0..7).map(|_| b.pick(&up(3), 0).unwrap()).collect();
        assert_eq!(order, vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(counts(&mut b, &up(3), 700), vec![500, 100, 100]);
    }

    #[test]
    fn backups_only_when_no_primary_is_usable() {
        for policy in [
            Policy::RoundRobin,
            Policy::LeastConn,
            Policy::P2c,
            Policy::Hash,
        ] {
            let mut b = Balancer::new(policy, servers(&[1, 1, 1], &[false, false, true]), 7);
            let mut st = up(3);
            let c = counts(&mut b, &st, 100);
            assert_eq!(c[2], 0, "{policy:?} used the backup: {c:?}");
            st[0].usable = false;
            let c = counts(&mut b, &st, 100);
            assert_eq!(c, vec![0, 100, 0], "{policy:?}");
            st[1].usable = false;
            assert_eq!(counts(&mut b, &st, 10), vec![0, 0, 10], "{policy:?}");
            st[2].usable = false;
            assert_eq!(b.pick(&st, 0), None, "{policy:?}");
        }
    }

    #[test]
    fn least_conn_relative_to_weight_and_ties_rotate() {
        let mut b = Balancer::new(Policy::LeastConn, servers(&[1, 2], &[false; 2]), 1);
        let mut st = up(2);
        st[0].outstanding = 2;
        st[1].outstanding = 3; // 3/2 < 2/1
        assert_eq!(b.pick(&st, 0), Some(1));
        st[1].outstanding = 5; // 5/2 > 2/1
        assert_eq!(b.pick(&st, 0), Some(0));
        let mut b = Balancer::new(Policy::LeastConn, servers(&[1, 1, 1], &[false; 3]), 1);
        let c = counts(&mut b, &up(3), 300);
        assert_eq!(c, vec![100, 100, 100]);
    }

    #[test]
    fn p2c_prefers_the_lighter_and_honours_weights() {
        let mut b = Balancer::new(Policy::P2c, servers(&[1, 1], &[false; 2]), 3);
        let mut st = up(2);
        st[0].outstanding = 10;
        assert_eq!(counts(&mut b, &st, 50), vec![0, 50]);
        let mut b = Balancer::new(Policy::P2c, servers(&[3, 1, 1], &[false; 3]), 3);
        let c = counts(&mut b, &up(3), 5000);
        // With equal load the first of the two draws wins: shares follow
        // the weights.
        assert!(c[0] > 2 * c[1] && c[0] > 2 * c[2], "{c:?}");
        assert!(c[1] > 500 && c[2] > 500, "{c:?}");
    }

    #[test]
    fn hash_is_sticky_and_moves_only_the_lost_servers_clients() {
        let mut b = Balancer::new(Policy::Hash, servers(&[1, 1, 1, 1], &[false; 4]), 1);
        let all = up(4);
        let before: Vec<usize> = (0..1000u64)
            .map(|k| b.pick(&all, mix(k)).unwrap())
            .collect();
        let again: Vec<usize> = (0..1000u64)
            .map(|k| b.pick(&all, mix(k)).unwrap())
            .collect();
        assert_eq!(before, again, "same key, same server");
        let mut spread = [0; 4];
        for &s in &before {
            spread[s] += 1;
        }
        assert!(spread.iter().all(|&n| n > 180), "{spread:?}");
        let mut st = all.clone();
        st[2].usable = false;
        for k in 0..1000u64 {
            let now = b.pick(&st, mix(k)).unwrap();
            if before[k as usize] != 2 {
                assert_eq!(now, before[k as usize], "a client of a live server moved");
            } else {
                assert_ne!(now, 2);
            }
        }
        // Weighted: a server of weight 3 gets about three times the keys.
        let mut b = Balancer::new(Policy::Hash, servers(&[3, 1], &[false; 2]), 1);
        let c = counts(&mut b, &up(2), 4000);
        assert!(c[0] > 2600 && c[0] < 3400, "{c:?}");
    }

    proptest::proptest! {
        /// Whatever the policy, weights, load and key: the pick is usable,
        /// a backup only when no primary is, and None only when nothing is.
        #[test]
        fn picks_obey_the_rules(
            policy in proptest::sample::select(vec![Policy::RoundRobin, Policy::LeastConn, Policy::P2c, Policy::Hash]),
            servers in proptest::collection::vec((1u32..=1000, proptest::bool::ANY, proptest::bool::ANY, 0u32..50), 1..12),
            keys in proptest::collection::vec(proptest::num::u64::ANY, 1..20),
        ) {
            let list: Vec<Server> = servers
                .iter()
                .enumerate()
                .map(|(i, &(weight, backup, _, _))| Server { weight, backup, id: mix(i as u64) })
                .collect();
            let state: Vec<Candidate> = servers
                .iter()
                .map(|&(_, _, usable, outstanding)| Candidate { usable, outstanding })
                .collect();
            let primary_usable = servers.iter().any(|&(_, b, u, _)| u && !b);
            let any_usable = servers.iter().any(|&(_, _, u, _)| u);
            let mut b = Balancer::new(policy, list, 42);
            for k in keys {
                match b.pick(&state, k) {
                    Some(i) => {
                        proptest::prop_assert!(state[i].usable);
                        proptest::prop_assert!(!servers[i].1 || !primary_usable);
                    }
                    None => proptest::prop_assert!(!any_usable),
                }
            }
        }
    }
}
