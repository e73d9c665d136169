//! Upstream health, as every worker of the pool sees it: the rules that
//! turn successes and failures into up/down, applied to the pool's shared
//! slots ([`baton_sdk::shared::Slot`]).
//!
//! * **Passive** (always on): each connect or I/O failure of real traffic
//!   counts; [`Rules::max_fails`] in a row take the server down, with a
//!   retry time `fail_backoff * 2^(k-1)` (capped) for the `k`-th time in a
//!   row. Without an active check, a down server becomes usable again at
//!   its retry time: the next connection is a trial; its success brings
//!   the server up, its failure takes it down again with the next backoff.
//!   Any success resets the failure count.
//! * **Active** (`--health-check`): one worker per interval probes each
//!   server (the lease in the slot decides which); [`Rules::fall`] failed
//!   probes in a row take it down, [`Rules::rise`] successful ones bring it
//!   back at once (no backoff: it answers, so traffic returns), and while an
//!   active check runs a down server gets no trial traffic.
//!
//! Every transition is a CAS on the slot's `down` word, so exactly one
//! worker of the pool reports each (that worker logs it).

use std::sync::atomic::Ordering;

use baton_sdk::shared::Slot;

/// The thresholds, from the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    pub max_fails: u32,
    pub backoff_ms: u64,
    pub backoff_max_ms: u64,
    /// Whether an active check decides when a down server is back.
    pub active: bool,
    pub rise: u32,
    pub fall: u32,
}

/// A change of state this caller made (and should log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Taken down; tried again in `retry_ms` (passive) or when a probe
    /// succeeds (active).
    Down {
        fails: u32,
        retry_ms: u64,
    },
    Up,
}

/// The backoff before the `downs`-th trial in a row (1-based).
pub fn backoff_ms(rules: &Rules, downs: u32) -> u64 {
    let shift = downs.saturating_sub(1).min(20);
    rules
        .backoff_ms
        .saturating_mul(1u64 << shift)
        .min(rules.backoff_max_ms)
        .max(1)
}

/// Whether new connections may go to this server at `now_ms`.
pub fn usable(rules: &Rules, slot: &Slot, now_ms: u64) -> bool {
    !slot.is_down() || (!rules.active && now_ms >= slot.retry_at.load(Ordering::Acquire))
}

/// A failure of real traffic (connect refused, timed out, reset).
pub fn on_failure(rules: &Rules, slot: &Slot, now_ms: u64) -> Option<Transition> {
    fail(rules, slot, now_ms, rules.max_fails)
}

fn fail(rules: &Rules, slot: &Slot, now_ms: u64, threshold: u32) -> Option<Transition> {
    slot.probe_ok.store(0, Ordering::Release);
    let fails = slot.fails.fetch_add(1, Ordering::AcqRel).saturating_add(1);
    if fails < threshold {
        return None;
    }
    if slot.set_down(true) {
        slot.downs.store(1, Ordering::Release);
        let retry = backoff_ms(rules, 1);
        slot.retry_at.store(now_ms + retry, Ordering::Release);
        return Some(Transition::Down {
            fails,
            retry_ms: retry,
        });
    }
    // Already down: a failed trial (its retry time had come) backs off
    // further. Failures of connections started before it went down do not.
    if now_ms >= slot.retry_at.load(Ordering::Acquire) {
        let downs = slot.downs.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        slot.retry_at
            .store(now_ms + backoff_ms(rules, downs), Ordering::Release);
    }
    None
}

/// A success of real traffic (connected; bytes moved).
pub fn on_success(rules: &Rules, slot: &Slot) -> Option<Transition> {
    if slot.fails.load(Ordering::Acquire) != 0 {
        slot.fails.store(0, Ordering::Release);
    }
    if slot.is_down() && !rules.active && slot.set_down(false) {
        slot.downs.store(0, Ordering::Release);
        return Some(Transition::Up);
    }
    None
}

/// The result of an active probe.
pub fn on_probe(rules: &Rules, slot: &Slot, now_ms: u64, ok: bool) -> Option<Transition> {
    if !ok {
        return fail(rules, slot, now_ms, rules.fall);
    }
    slot.fails.store(0, Ordering::Release);
    let streak = slot
        .probe_ok
        .fetch_add(1, Ordering::AcqRel)
        .saturating_add(1);
    if slot.is_down() && streak >= rules.rise && slot.set_down(false) {
        slot.downs.store(0, Ordering::Release);
        return Some(Transition::Up);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_sdk::shared::Shared;

    fn rules(active: bool) -> Rules {
        Rules {
            max_fails: 3,
            backoff_ms: 1000,
            backoff_max_ms: 5000,
            active,
            rise: 2,
            fall: 2,
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let r = rules(false);
        let b: Vec<u64> = (1..=5).map(|k| backoff_ms(&r, k)).collect();
        assert_eq!(b, vec![1000, 2000, 4000, 5000, 5000]);
        assert_eq!(backoff_ms(&r, 99), 5000);
    }

    #[test]
    fn passive_down_trial_and_back() {
        let sh = Shared::anonymous(1, 1).unwrap();
        let s = sh.slot(0).unwrap();
        let r = rules(false);
        assert_eq!(on_failure(&r, s, 100), None);
        assert_eq!(on_failure(&r, s, 100), None);
        assert!(usable(&r, s, 100));
        assert_eq!(
            on_failure(&r, s, 100),
            Some(Transition::Down {
                fails: 3,
                retry_ms: 1000
            })
        );
        assert!(!usable(&r, s, 500));
        // A late failure of an older connection does not push it further.
        assert_eq!(on_failure(&r, s, 600), None);
        assert_eq!(s.retry_at.load(Ordering::Acquire), 1100);
        assert!(usable(&r, s, 1100), "trial time");
        // The trial fails: twice the backoff.
        assert_eq!(on_failure(&r, s, 1100), None);
        assert_eq!(s.retry_at.load(Ordering::Acquire), 3100);
        assert!(!usable(&r, s, 2000));
        // The next trial succeeds: up, counts reset.
        assert_eq!(on_success(&r, s), Some(Transition::Up));
        assert_eq!(on_success(&r, s), None);
        assert!(usable(&r, s, 2000));
        assert_eq!(on_failure(&r, s, 4000), None, "one failure after a success");
    }

    #[test]
    fn active_checks_decide_the_return() {
        let sh = Shared::anonymous(1, 1).unwrap();
        let s = sh.slot(0).unwrap();
        let r = rules(true);
        assert_eq!(on_probe(&r, s, 0, false), None);
        assert!(matches!(
            on_probe(&r, s, 0, false),
            Some(Transition::Down { fails: 2, .. })
        ));
        assert!(
            !usable(&r, s, 1_000_000),
            "no trial traffic under active checks"
        );
        assert_eq!(on_success(&r, s), None, "traffic does not bring it back");
        assert_eq!(on_probe(&r, s, 10, true), None);
        assert_eq!(on_probe(&r, s, 20, false), None);
        assert_eq!(on_probe(&r, s, 30, true), None, "rise needs a streak");
        assert_eq!(on_probe(&r, s, 40, true), Some(Transition::Up));
        assert!(usable(&r, s, 40));
        // Passive failures take it down under active checks too.
        for _ in 0..2 {
            assert_eq!(on_failure(&r, s, 50), None);
        }
        assert!(matches!(
            on_failure(&r, s, 50),
            Some(Transition::Down { .. })
        ));
    }

    #[test]
    fn two_workers_one_transition() {
        let fd = baton_sdk::shared::create_region("t").unwrap();
        let a = Shared::from_fd(&fd, 5, 1).unwrap();
        let b = Shared::from_fd(&fd, 5, 1).unwrap();
        let r = rules(false);
        let mut seen = 0;
        for i in 0..6 {
            let sh = if i % 2 == 0 { &a } else { &b };
            if on_failure(&r, sh.slot(0).unwrap(), 10).is_some() {
                seen += 1;
            }
        }
        assert_eq!(seen, 1);
        assert!(!usable(&r, b.slot(0).unwrap(), 20));
    }
}
