//! Shared harness of the fuzz targets (`tests/fuzz_*.rs`,
//! `workers/*/tests/fuzz_*.rs`): bounded property tests with proptest, on
//! the stable toolchain, plus a byte-level mutator of valid encodings.
//!
//! * `BATON_FUZZ_CASES=N`: cases per target (default: the target's own
//!   small count, so that `cargo test` stays fast).
//! * `BATON_FUZZ_SECONDS=S`: keep running batches of N cases, each from a
//!   fresh random seed, until S seconds have passed (`scripts/fuzz`).
//!   Without it the suite's run is deterministic (a fixed seed).
//!
//! A failure panics with proptest's shrunk, minimal input; add it to the
//! target as a fixed regression case.
//!
//! The sdk and static crates include this file by path (one copy).
#![allow(dead_code)]

use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};

/// Cases per target: `BATON_FUZZ_CASES`, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("BATON_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

fn budget() -> Option<Duration> {
    std::env::var("BATON_FUZZ_SECONDS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .map(Duration::from_secs_f64)
}

/// Runs `test` on values of `strategy`: `cases(default_cases)` of them, or
/// batches of that many until `BATON_FUZZ_SECONDS` have passed. Prints one
/// line (`fuzz NAME: N cases passed in T s`) and panics with the minimal
/// failing input on failure.
pub fn run<S, F>(name: &str, default_cases: u32, strategy: S, test: F)
where
    S: Strategy,
    S::Value: std::fmt::Debug,
    F: Fn(S::Value) -> Result<(), TestCaseError>,
{
    let batch = cases(default_cases);
    let budget = budget();
    let started = Instant::now();
    let mut total: u64 = 0;
    loop {
        let config = Config {
            cases: batch,
            failure_persistence: None,
            max_shrink_iters: 2048,
            ..Config::default()
        };
        let mut runner = match budget {
            // The suite: the same inputs every run.
            None => {
                TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha))
            }
            Some(_) => TestRunner::new(config),
        };
        match runner.run(&strategy, &test) {
            Ok(()) => {}
            // One line for the input (proptest's own message spreads a byte
            // vector over a line per byte).
            Err(TestError::Fail(why, input)) => panic!(
                "fuzz {name}: FAILED after {total} earlier cases: {why}\n\
                 minimal failing input: {}",
                readable(&format!("{input:?}"))
            ),
            Err(e) => panic!("fuzz {name}: FAILED after {total} earlier cases: {e}"),
        }
        total += u64::from(batch);
        match budget {
            Some(b) if started.elapsed() < b => continue,
            _ => break,
        }
    }
    eprintln!(
        "fuzz {name}: {total} cases passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// `Debug` text with every list of 4 or more bytes (`[71, 69, ...]`)
/// shown as a byte string (`b"GE..."`), so that a failing input reads.
pub fn readable(debug: &str) -> String {
    let mut out = String::new();
    let mut rest = debug;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let bytes = after.find(']').and_then(|close| {
            let v: Option<Vec<u8>> = after[..close]
                .split(',')
                .map(|n| n.trim().parse::<u8>().ok())
                .collect();
            v.filter(|v| v.len() >= 4).map(|v| (v, close))
        });
        match bytes {
            Some((v, close)) => {
                out.push_str(&format!("b\"{}\"", v.escape_ascii()));
                rest = &after[close + 1..];
            }
            None => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// One byte-level edit of an input.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// XOR one byte with a mask.
    Flip(Index, u8),
    /// Overwrite one byte (often with an "interesting" value).
    Set(Index, u8),
    /// Insert bytes.
    Insert(Index, Vec<u8>),
    /// Delete up to n bytes.
    Delete(Index, usize),
    /// Cut the input short.
    Truncate(Index),
    /// Copy a chunk of another seed (or of this input) over a position.
    Splice(Index, usize, Index, usize),
    /// Repeat a chunk in place.
    Duplicate(Index, usize, u8),
}

fn interesting_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        3 => any::<u8>(),
        1 => prop::sample::select(vec![
            0u8, 1, 2, 3, 4, 5, 6, 0x7f, 0x80, 0xfe, 0xff, b'\r', b'\n', b' ', b'\t', b':',
            b'"', b'\\', b'[', b']', b'{', b'}', b',', b'=', b'#', b'.', b'-', b'0', b'9',
        ]),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 1u8..=255).prop_map(|(i, m)| Mutation::Flip(i, m)),
        (any::<Index>(), interesting_byte()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (
            any::<Index>(),
            prop::collection::vec(interesting_byte(), 1..8)
        )
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        (any::<Index>(), 1usize..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), any::<usize>(), any::<Index>(), 1usize..32)
            .prop_map(|(at, seed, from, n)| Mutation::Splice(at, seed, from, n)),
        (any::<Index>(), 1usize..16, 1u8..4).prop_map(|(i, n, k)| Mutation::Duplicate(i, n, k)),
    ]
}

/// Applies `muts` to `input`; `seeds` are the splice sources.
pub fn apply(input: &[u8], muts: &[Mutation], seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut v = input.to_vec();
    for m in muts {
        // An index into the input, or one past its end where that makes sense.
        let at = |i: &Index, len: usize| if len == 0 { 0 } else { i.index(len + 1) };
        match m {
            Mutation::Flip(i, mask) if !v.is_empty() => {
                let p = i.index(v.len());
                v[p] ^= mask;
            }
            Mutation::Set(i, b) if !v.is_empty() => {
                let p = i.index(v.len());
                v[p] = *b;
            }
            Mutation::Insert(i, bytes) => {
                let p = at(i, v.len());
                v.splice(p..p, bytes.iter().copied());
            }
            Mutation::Delete(i, n) if !v.is_empty() => {
                let p = i.index(v.len());
                let end = (p + n).min(v.len());
                v.drain(p..end);
            }
            Mutation::Truncate(i) => {
                let p = at(i, v.len());
                v.truncate(p);
            }
            Mutation::Splice(to, seed, from, n) => {
                let src = if seeds.is_empty() {
                    v.clone()
                } else {
                    seeds[seed % seeds.len()].clone()
                };
                if !src.is_empty() {
                    let a = from.index(src.len());
                    let chunk = &src[a..(a + n).min(src.len())];
                    let p = at(to, v.len());
                    let end = (p + chunk.len()).min(v.len());
                    v.splice(p..end, chunk.iter().copied());
                }
            }
            Mutation::Duplicate(i, n, k) if !v.is_empty() => {
                let p = i.index(v.len());
                let chunk: Vec<u8> = v[p..(p + n).min(v.len())].to_vec();
                for _ in 0..*k {
                    v.splice(p..p, chunk.iter().copied());
                }
            }
            _ => {}
        }
    }
    v
}

/// A seed from `seeds` with 1..=`max_muts` byte-level edits applied.
pub fn mutated(seeds: Vec<Vec<u8>>, max_muts: usize) -> impl Strategy<Value = Vec<u8>> {
    assert!(!seeds.is_empty());
    (
        0..seeds.len(),
        prop::collection::vec(mutation(), 1..=max_muts),
    )
        .prop_map(move |(s, muts)| apply(&seeds[s], &muts, &seeds))
}

/// Arbitrary bytes, biased towards the structural ones, of length `len`.
pub fn bytes(len: std::ops::Range<usize>) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(interesting_byte(), len)
}
