//! `baton-keyd`: the key process as a program, for tests and for an
//! acceptor that prefers fork+exec to fork alone.
//!
//! ```text
//! baton-keyd --key ID:CERT:KEY [--key ...] [--control-fd N] [--peer-fd N ...]
//! ```
//!
//! The fds are inherited `SOCK_SEQPACKET` sockets (checked). The sandbox
//! profile, if any, comes from `BATON_SANDBOX` as for workers (its
//! `keep_fds` are extended with the channels). Exit status: 0 when the
//! control channel (or, without one, the last peer) closed, 2 when a key
//! could not be loaded, 78 when the sandbox failed, 1 otherwise; 64 for
//! a bad command line.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use baton_sdk::sandbox::Profile;
use baton_tls::keyd::{self, KeyFiles};

const USAGE: &str =
    "usage: baton-keyd --key ID:CERT:KEY [--key ...] [--control-fd N] [--peer-fd N ...]";

fn fail(msg: &str) -> ! {
    eprintln!("baton-keyd: {msg}\n{USAGE}");
    std::process::exit(64);
}

/// Takes ownership of an inherited fd after checking it is an open
/// SEQPACKET socket.
fn inherited(arg: &str) -> OwnedFd {
    let fd: RawFd = arg
        .parse()
        .unwrap_or_else(|_| fail(&format!("not an fd number: {arg:?}")));
    if fd <= 2 {
        fail(&format!("fd {fd} is stdio"));
    }
    // SAFETY: F_GETFD only queries the descriptor table entry.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        fail(&format!("fd {fd} is not open"));
    }
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `ty` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || ty != libc::SOCK_SEQPACKET {
        fail(&format!("fd {fd} is not a SOCK_SEQPACKET socket"));
    }
    // SAFETY: the fd is open, inherited for this process to own, and is
    // wrapped once (duplicates on the command line are refused below).
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn main() {
    let mut files = Vec::new();
    let mut control = None;
    let mut peers = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| fail(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--key" => {
                let v = value();
                let mut parts = v.splitn(3, ':');
                let (Some(id), Some(cert), Some(key)) = (parts.next(), parts.next(), parts.next())
                else {
                    fail(&format!("--key {v:?}: expected ID:CERT:KEY"));
                };
                let id = id
                    .parse()
                    .unwrap_or_else(|_| fail(&format!("--key {v:?}: the id is not a number")));
                files.push(KeyFiles {
                    id,
                    cert: PathBuf::from(cert),
                    key: PathBuf::from(key),
                });
            }
            "--control-fd" | "--peer-fd" => {
                let v = value();
                if seen.contains(&v) {
                    fail(&format!("fd {v} given twice"));
                }
                seen.push(v.clone());
                let fd = inherited(&v);
                if a == "--control-fd" {
                    if control.is_some() {
                        fail("--control-fd given twice");
                    }
                    control = Some(fd);
                } else {
                    peers.push(fd);
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            other => fail(&format!("unknown argument {other:?}")),
        }
    }
    if files.is_empty() {
        fail("no --key given");
    }
    if control.is_none() && peers.is_empty() {
        fail("no channel given (--control-fd or --peer-fd)");
    }
    let profile = match Profile::from_env() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("baton-keyd: {e}");
            std::process::exit(keyd::EXIT_SANDBOX);
        }
    };
    keyd::run(&files, control, peers, profile.as_ref());
}
