//! Fuzz target: the SEQPACKET receive path (`Channel::recv`/`try_recv`),
//! fed arbitrary bytes with 0..N file descriptors attached over a real
//! `Channel::pair()`.
//!
//! Properties, for every message a peer can send:
//! * no panic, and exactly one message is consumed per call;
//! * the outcome is what `proto::decode` says of the same bytes and fd
//!   count: a refusal is `RecvError::Proto` with the same error, an
//!   oversized message is `Proto(Truncated)`, an empty one without fds
//!   reads as the peer closing (`Ok(None)`);
//! * an accepted CONN hands over the very file that was sent;
//! * every fd that arrived is closed once the result is dropped: the
//!   process's open fds (`/proc/self/fd`) are the same before and after.
//!
//! This file holds one test only: counting the process's fds needs no
//! other test running beside it.

#[path = "../../../tests/fuzzing/mod.rs"]
mod fuzzing;

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use baton_sdk::proto::{self, ConnInfo, Msg, ProtoError, MAX_MSG};
use baton_sdk::{Channel, RecvError};
use nix::sys::socket::{self, ControlMessage, MsgFlags};
use nix::sys::stat::fstat;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// The kernel's SCM_MAX_FD: the most fds one message may carry.
const SCM_MAX_FD: usize = 253;

#[derive(Debug, Clone)]
struct Sent {
    bytes: Vec<u8>,
    fds: usize,
    /// Attach the fds in two SCM_RIGHTS control messages rather than one.
    split: bool,
}

fn encoded(m: &Msg) -> Vec<u8> {
    let mut buf = [0u8; MAX_MSG];
    let n = proto::encode(m, &mut buf);
    buf[..n].to_vec()
}

fn seeds() -> Vec<Vec<u8>> {
    [
        Msg::Hello {
            pid: 1,
            capacity: 0,
            flags: baton_sdk::HelloFlags::NONE,
        },
        Msg::Welcome { worker_id: 3 },
        Msg::Conn(ConnInfo {
            id: 5,
            listener: 0,
            peer: "10.0.0.1:4000".parse().unwrap(),
            local: "[fe80::1%2]:80".parse().unwrap(),
        }),
        Msg::Ack(vec![9]),
        Msg::Done((0..64).collect()),
        Msg::Drain,
    ]
    .iter()
    .map(encoded)
    .collect()
}

fn sent() -> impl Strategy<Value = Sent> {
    let seeds = seeds();
    let bytes = prop_oneof![
        2 => prop::sample::select(seeds.clone()),
        4 => fuzzing::mutated(seeds, 4),
        2 => fuzzing::bytes(0..64),
        1 => prop_oneof![Just(0usize), MAX_MSG - 2..MAX_MSG + 3, 0..4 * MAX_MSG]
            .prop_map(|n| vec![1u8; n]),
    ];
    let fds = prop_oneof![
        6 => 0usize..3,
        2 => 0usize..16,
        1 => Just(SCM_MAX_FD),
    ];
    (bytes, fds, any::<bool>()).prop_map(|(bytes, fds, split)| Sent { bytes, fds, split })
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

fn send_raw(ch: &Channel, m: &Sent, fd: RawFd) {
    let raw = vec![fd; m.fds];
    let (a, b) = raw.split_at(if m.split { m.fds / 2 } else { m.fds });
    let mut cmsgs = Vec::new();
    for part in [a, b] {
        if !part.is_empty() {
            cmsgs.push(ControlMessage::ScmRights(part));
        }
    }
    let sent = socket::sendmsg::<()>(
        ch.as_raw_fd(),
        &[IoSlice::new(&m.bytes)],
        &cmsgs,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .expect("sendmsg");
    assert_eq!(sent, m.bytes.len());
}

fn inode(fd: impl AsFd) -> (u64, u64) {
    let st = fstat(fd.as_fd().as_raw_fd()).expect("fstat");
    (st.st_dev, st.st_ino)
}

/// Sends `msgs` on a fresh pair and checks what the other end receives.
fn check(msgs: Vec<Sent>, blocking: bool, close_after: bool) -> Result<(), TestCaseError> {
    let before = open_fds();
    {
        let (tx, rx) = Channel::pair().expect("pair");
        let (pipe_r, _pipe_w): (OwnedFd, OwnedFd) = nix::unistd::pipe().expect("pipe");
        let sent_file = inode(&pipe_r);
        for m in &msgs {
            send_raw(&tx, m, pipe_r.as_raw_fd());
        }
        if close_after {
            drop(tx);
        }
        for m in &msgs {
            let got = if blocking { rx.recv() } else { rx.try_recv() };
            if m.bytes.len() > MAX_MSG {
                prop_assert!(
                    matches!(got, Err(RecvError::Proto(ProtoError::Truncated))),
                    "{} bytes: {:?}",
                    m.bytes.len(),
                    got
                );
                continue;
            }
            if m.bytes.is_empty() && m.fds == 0 {
                // Indistinguishable from the peer closing (recvmsg says 0).
                prop_assert!(matches!(got, Ok(None)), "{:?}", got);
                continue;
            }
            match (proto::decode(&m.bytes, m.fds), got) {
                (Err(want), Err(RecvError::Proto(e))) => prop_assert_eq!(e, want),
                (Ok(want), Ok(Some(r))) => {
                    prop_assert_eq!(&r.msg, &want);
                    prop_assert_eq!(r.fds.len(), m.fds);
                    prop_assert_eq!(r.fds.len(), want.fd_count());
                    for fd in &r.fds {
                        prop_assert_eq!(inode(fd), sent_file, "a different file arrived");
                    }
                }
                (want, got) => {
                    prop_assert!(false, "decode says {:?}, recv said {:?}", want, got)
                }
            }
        }
        // Exactly the messages sent were consumed.
        let last = rx.try_recv();
        if close_after {
            prop_assert!(matches!(last, Ok(None)), "after close: {:?}", last);
        } else {
            prop_assert!(
                matches!(&last, Err(e) if e.would_block()),
                "queue not empty: {:?}",
                last
            );
        }
    }
    let after = open_fds();
    prop_assert_eq!(after, before, "fds leaked (or closed twice)");
    Ok(())
}

#[test]
fn recv_of_any_message_decodes_like_proto_and_closes_every_fd() {
    fuzzing::run(
        "channel-recv",
        2000,
        (
            prop::collection::vec(sent(), 1..4),
            any::<bool>(),
            prop::bool::weighted(0.2),
        ),
        |(msgs, blocking, close_after)| check(msgs, blocking, close_after),
    );
}
