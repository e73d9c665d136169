//! Fuzz target: the handoff protocol's codec (`baton_sdk::proto`), the
//! decoder of every byte a worker or a registrant sends the acceptor.
//!
//! Properties, for any input:
//! * `decode(bytes, fds)` never panics;
//! * an `Ok(msg)` re-encodes to exactly `bytes` and carries the fd count
//!   its kind requires: the decoder accepts one encoding per message and
//!   nothing else;
//! * every message encodes and decodes back to itself, and is refused with
//!   any other fd count;
//! * valid encodings mutated byte by byte obey the same rules.
//!
//! `BATON_FUZZ_CASES` / `BATON_FUZZ_SECONDS`: see `tests/fuzzing/mod.rs`.

#[path = "../../../tests/fuzzing/mod.rs"]
mod fuzzing;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::atomic::{AtomicUsize, Ordering};

use baton_sdk::proto::{
    self, ConnInfo, HelloFlags, Kind, Msg, Parked, ProtoError, MAX_BATCH, MAX_IDS, MAX_MSG,
};
use proptest::prelude::*;

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port))),
        // The wire carries no flow info: it is always 0.
        (any::<[u8; 16]>(), any::<u16>(), any::<u32>()).prop_map(|(ip, port, scope)| {
            SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, 0, scope))
        }),
    ]
}

fn ids() -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(any::<u64>(), 1..=MAX_IDS)
}

fn msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        (any::<u32>(), any::<u32>(), any::<bool>()).prop_map(|(pid, capacity, tls)| Msg::Hello {
            pid,
            capacity,
            flags: HelloFlags::NONE.with_tls(tls),
        }),
        any::<u32>().prop_map(|worker_id| Msg::Welcome { worker_id }),
        (any::<u64>(), any::<u16>(), addr(), addr()).prop_map(|(id, listener, peer, local)| {
            Msg::Conn(ConnInfo {
                id,
                listener,
                peer,
                local,
            })
        }),
        ids().prop_map(Msg::Ack),
        ids().prop_map(Msg::Done),
        Just(Msg::Drain),
        prop::collection::vec(info(), 1..=MAX_BATCH).prop_map(Msg::Conns),
        prop::collection::vec(
            (info(), any::<u32>()).prop_map(|(info, idle_ms)| Parked { info, idle_ms }),
            1..=MAX_BATCH
        )
        .prop_map(Msg::Park),
    ]
}

fn info() -> impl Strategy<Value = ConnInfo> {
    (any::<u64>(), any::<u16>(), addr(), addr()).prop_map(|(id, listener, peer, local)| ConnInfo {
        id,
        listener,
        peer,
        local,
    })
}

/// `m` encoded in the highest version (2).
fn encoded(m: &Msg) -> Vec<u8> {
    encoded_v(m, proto::VERSION)
}

fn encoded_v(m: &Msg, version: u8) -> Vec<u8> {
    let mut buf = [0u8; MAX_MSG];
    let n = proto::encode_v(m, version, &mut buf);
    buf[..n].to_vec()
}

/// Bytes that often get past the first checks: version 1, a known kind,
/// zero reserved bytes, one of the lengths the table allows.
fn plausible() -> impl Strategy<Value = Vec<u8>> {
    let len = prop_oneof![
        Just(4usize),
        Just(8),
        Just(16),
        Just(64),
        (1usize..=MAX_IDS).prop_map(|n| 8 + 8 * n),
        (1usize..=MAX_BATCH).prop_map(|n| 8 + 60 * n),
        (1usize..=MAX_BATCH).prop_map(|n| 8 + 64 * n),
        0usize..MAX_MSG + 16,
    ];
    (
        prop_oneof![2 => Just(1u8), 2 => Just(2u8), 1 => any::<u8>()],
        prop_oneof![4 => 1u8..=8, 1 => any::<u8>()],
        prop_oneof![4 => Just(0u16), 1 => any::<u16>()],
        len,
        // The body: mostly zero bytes (what reserved fields need), filled
        // from a seed (a 536-element strategy is slow in a debug build).
        (any::<u64>(), prop_oneof![Just(0u64), Just(4), Just(32)]).prop_map(|(mut x, rate)| {
            let mut body = vec![0u8; MAX_MSG + 16];
            for b in body.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if rate > 0 && x % rate == 0 {
                    *b = (x >> 32) as u8;
                }
            }
            body
        }),
        0u16..=MAX_IDS as u16 + 2,
        prop_oneof![Just(4u8), Just(6u8), any::<u8>()],
        prop_oneof![Just(4u8), Just(6u8), any::<u8>()],
    )
        .prop_map(|(ver, kind, rsv, len, mut body, n, fam1, fam2)| {
            body[0] = ver;
            body[1] = kind;
            body[2..4].copy_from_slice(&rsv.to_le_bytes());
            if kind == 4 || kind == 5 {
                body[4..6].copy_from_slice(&n.to_le_bytes());
            }
            if kind == 3 {
                body[16] = fam1;
                body[40] = fam2;
            }
            if kind == 7 || kind == 8 {
                // A length the count fits, and plausible address families
                // in every record.
                let rec = if kind == 7 { 60 } else { 64 };
                let n = (len.saturating_sub(8) / rec).max(1) as u16;
                body[4..6].copy_from_slice(&n.to_le_bytes());
                for i in 0..usize::from(n) {
                    let at = 8 + rec * i;
                    if at + 36 < body.len() {
                        body[at + 12] = fam1;
                        body[at + 36] = fam2;
                    }
                }
            }
            body.truncate(len);
            body
        })
}

/// The property every decode must satisfy.
fn check_decode(bytes: &[u8], fds: usize) -> Result<(), TestCaseError> {
    match proto::decode(bytes, fds) {
        Ok(m) => {
            prop_assert_eq!(fds, m.fd_count(), "accepted {:?} with {} fds", m, fds);
            prop_assert!(m.kind().since() <= proto::version_of(bytes));
            let again = encoded_v(&m, proto::version_of(bytes));
            prop_assert_eq!(
                &again[..],
                bytes,
                "decoded {:?} does not re-encode to its input",
                m
            );
        }
        Err(e) => {
            if bytes.len() < 4 {
                prop_assert_eq!(&e, &ProtoError::Short(bytes.len()));
            } else if bytes.len() > MAX_MSG {
                prop_assert_eq!(&e, &ProtoError::Oversized(bytes.len()));
            }
            // Every error has a message (Display never panics).
            prop_assert!(!e.to_string().is_empty());
        }
    }
    Ok(())
}

#[test]
fn every_message_roundtrips() {
    fuzzing::run(
        "proto-roundtrip",
        512,
        (msg(), 0usize..4, 1u8..=2),
        |(m, fds, v)| {
            let v = v.max(m.kind().since());
            let b = encoded_v(&m, v);
            prop_assert_eq!(proto::version_of(&b), v);
            // Batches: the right count, or one off it.
            let want = m.fd_count();
            let fds = if want > 1 { want + fds.min(2) - 1 } else { fds };
            let got = proto::decode(&b, fds);
            if fds == want {
                prop_assert_eq!(got, Ok(m));
            } else {
                let refused = matches!(got, Err(ProtoError::FdCount { got, .. }) if got == fds);
                prop_assert!(refused, "{:?} with {} fds", m, fds);
            }
            Ok(())
        },
    );
}

#[test]
fn arbitrary_bytes_never_panic_and_ok_reencodes() {
    fuzzing::run(
        "proto-bytes",
        512,
        (
            fuzzing::bytes(0..MAX_MSG + 32),
            prop_oneof![0usize..300, any::<usize>()],
        ),
        |(b, fds)| check_decode(&b, fds),
    );
}

#[test]
fn plausible_bytes_never_panic_and_ok_reencodes() {
    // How many inputs of each kind were accepted: the generator must reach
    // past the decoder's first checks, or this target proves little.
    let accepted: [AtomicUsize; 9] = Default::default();
    fuzzing::run(
        "proto-plausible",
        8192,
        // usize::MAX: the count the kind byte asks for.
        (
            plausible(),
            prop_oneof![4 => Just(usize::MAX), 1 => 0usize..300],
        ),
        |(b, fds)| {
            let fds = match fds {
                usize::MAX => proto::kind_fd_count(&b),
                n => n,
            };
            if let Ok(m) = proto::decode(&b, fds) {
                accepted[m.kind() as usize].fetch_add(1, Ordering::Relaxed);
            }
            check_decode(&b, fds)
        },
    );
    for (kind, n) in accepted.iter().enumerate().skip(1) {
        assert!(
            n.load(Ordering::Relaxed) > 0,
            "no valid message of kind {kind}"
        );
    }
}

#[test]
fn mutated_encodings_never_panic_and_ok_reencodes() {
    let seeds: Vec<Vec<u8>> = [
        Msg::Hello {
            pid: 4242,
            capacity: 7,
            flags: HelloFlags::TLS,
        },
        Msg::Welcome { worker_id: 9 },
        Msg::Conn(ConnInfo {
            id: 77,
            listener: 1,
            peer: "127.0.0.1:5555".parse().unwrap(),
            local: "[::1%3]:80".parse().unwrap(),
        }),
        Msg::Ack(vec![1, 2, 3]),
        Msg::Done((0..MAX_IDS as u64).collect()),
        Msg::Drain,
        Msg::Conns(vec![
            ConnInfo {
                id: 1,
                listener: 0,
                peer: "10.0.0.1:1".parse().unwrap(),
                local: "[::1]:2".parse().unwrap(),
            };
            3
        ]),
        Msg::Park(vec![Parked {
            info: ConnInfo {
                id: 5,
                listener: 2,
                peer: "127.0.0.1:9".parse().unwrap(),
                local: "127.0.0.1:8".parse().unwrap(),
            },
            idle_ms: 1500,
        }]),
    ]
    .iter()
    .map(encoded)
    .collect();
    fuzzing::run(
        "proto-mutated",
        2048,
        (fuzzing::mutated(seeds, 6), 0usize..3),
        |(b, fds)| check_decode(&b, fds),
    );
}

/// A mutated CONN is still refused when its fd is missing, and the kinds
/// that carry none refuse one.
#[test]
fn fd_counts_are_checked_for_every_kind() {
    for kind in [
        Kind::Hello,
        Kind::Welcome,
        Kind::Conn,
        Kind::Ack,
        Kind::Done,
        Kind::Drain,
    ] {
        let mut b = vec![1u8, kind as u8, 0, 0];
        b.resize(MAX_MSG, 0);
        for fds in 0..4 {
            if fds != kind.fd_count() {
                assert!(
                    matches!(proto::decode(&b, fds), Err(ProtoError::FdCount { .. })),
                    "{kind:?} with {fds} fds"
                );
            }
        }
    }
}
