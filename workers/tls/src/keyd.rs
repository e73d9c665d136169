//! The key process: the only process of baton that holds TLS private keys.
//!
//! # Design (OpenBSD relayd's "ca" process)
//!
//! A TLS server needs its private key once per full handshake, to sign the
//! handshake transcript (CertificateVerify in TLS 1.3, ServerKeyExchange in
//! TLS 1.2). Everything else (parsing ClientHellos, record encryption,
//! HTTP) needs only public data and session keys. So baton splits them:
//! workers, which parse untrusted bytes, hold the certificate chain and a
//! channel to this process; this process holds the keys, parses nothing
//! but a fixed little request format ([`crate::wire`]), and answers
//! signing requests.
//!
//! # Life of the key process
//!
//! 1. [`KeyStore::load`] reads each key file and its certificate and
//!    checks they match (so a mismatch is reported before any client
//!    connects). The file buffers are zeroed.
//! 2. [`confine`] drops everything it can with [`baton_sdk::sandbox`]:
//!    every fd but its channels is closed, its own unprivileged user when
//!    started as root (never the workers' user: a worker with the same uid
//!    could otherwise `ptrace` it, were it not also non-dumpable), no
//!    capabilities, no_new_privs, no core dumps, `RLIMIT_NPROC` 0,
//!    `PR_SET_DUMPABLE` 0 so no process of its uid can read its memory
//!    through `/proc` or `ptrace`, and, instead of the workers' default
//!    seccomp filter, its own narrower one ([`crate::keyd_seccomp`]): no
//!    `open` of any kind, no `socket`, `connect`, `execve` or `clone`.
//!    It can open no file once its keys are loaded. A chroot to an empty
//!    directory (the profile's `chroot`, when root) adds a second wall.
//! 3. [`serve`] answers requests until its control channel closes (the
//!    acceptor is gone), then returns, and [`run`] exits 0.
//!
//! # Channels and peers
//!
//! Every channel is an `AF_UNIX` `SOCK_SEQPACKET` socketpair made by the
//! acceptor: there is no listening socket, so there is no peer to
//! authenticate: a peer is whoever the acceptor gave the other end to,
//! which is the check `SO_PEERCRED` would approximate.
//!
//! * The **control** channel (one, from the acceptor) may also carry
//!   `ADD_PEER` with one fd attached: the key process's end of a new
//!   worker's channel (workers are spawned and restarted while the key
//!   process runs), with the key ids that worker may use
//!   ([`KeyAccess`]): when several pools share
//!   one key process, a pool's workers sign only with its own keys. Its
//!   end of file ends the key process.
//! * **Peer** channels (one per worker) may send `SIGN` and `PING` only.
//!   A peer that sends `ADD_PEER` gets `NotAllowed`; fds a peer attaches
//!   are closed unread.
//!
//! # Threat model
//!
//! A compromised worker holds a peer channel. It can ask for any number
//! of signatures over messages of its choice with any key its channel
//! was given
//! (an oracle, as with relayd: the attacker can impersonate the server
//! while it controls the worker, but cannot take the key away and use it
//! after the worker is restarted or off this host). It cannot read the
//! key: the key process shares no memory with it, runs as another uid
//! when baton is root, is non-dumpable, and parses only fixed-size fields
//! with bounds checked ([`crate::wire`], property-tested). Malformed,
//! oversized or unknown requests get an ERROR reply and the process goes
//! on; a peer that does not read its replies (its socket buffer full) is
//! disconnected rather than allowed to block the process, and peers are
//! served one record per turn, so one flooding peer slows the others at
//! worst by one signature per turn.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;

use baton_sdk::sandbox::{self, Profile, SeccompMode};
use rustls::sign::SigningKey;
use rustls::SignatureScheme;

use crate::keyd_seccomp;
use crate::load::{self, CertChain, LoadError};
use crate::sock;
use crate::wire::{self, ErrorCode, KeyAccess, Reply, Request};

/// Exit status of [`run`] when a key could not be loaded.
pub const EXIT_LOAD: i32 = 2;
/// Exit status of [`run`] when the sandbox could not be applied.
pub const EXIT_SANDBOX: i32 = baton_sdk::EXIT_SANDBOX as i32;
/// Exit status of [`run`] when serving failed on its control channel.
pub const EXIT_IO: i32 = 1;

/// Peers beyond this many are refused (`ADD_PEER` gets `NotAllowed`).
pub const MAX_PEERS: usize = 4096;

/// One key the process loads: the id requests name it by, its
/// certificate (to check they match) and the key file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFiles {
    pub id: u32,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The keys, by id.
pub struct KeyStore {
    keys: HashMap<u32, Arc<dyn SigningKey>>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ids: Vec<_> = self.keys.keys().collect();
        ids.sort();
        f.debug_struct("KeyStore").field("ids", &ids).finish()
    }
}

impl KeyStore {
    /// Loads every key and checks it against its certificate.
    pub fn load(files: &[KeyFiles]) -> Result<KeyStore, LoadError> {
        let mut keys = HashMap::new();
        for f in files {
            let chain = CertChain::load(&f.cert)?;
            let key = load::load_key(&f.key)?;
            let signing = load::check_pair(&chain, &key, &f.key)?;
            drop(key);
            keys.insert(f.id, signing);
        }
        Ok(KeyStore { keys })
    }

    /// A store of keys already loaded (tests, embedding).
    pub fn from_keys(keys: impl IntoIterator<Item = (u32, Arc<dyn SigningKey>)>) -> KeyStore {
        KeyStore {
            keys: keys.into_iter().collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Signs `message` with key `key` in `scheme`.
    pub fn sign(
        &self,
        key: u32,
        scheme: SignatureScheme,
        message: &[u8],
    ) -> Result<Vec<u8>, ErrorCode> {
        let k = self.keys.get(&key).ok_or(ErrorCode::UnknownKey)?;
        let signer = k
            .choose_scheme(&[scheme])
            .ok_or(ErrorCode::UnsupportedScheme)?;
        if signer.scheme() != scheme {
            return Err(ErrorCode::UnsupportedScheme);
        }
        signer.sign(message).map_err(|_| ErrorCode::SignFailed)
    }

    /// The reply to one received record: `truncated` when it was longer
    /// than [`wire::MAX_REQUEST`], `fds` how many fds came with it, `from`
    /// the channel it came on. An `AddPeer` that passes the checks is
    /// [`Handled::AddPeer`]: the caller adds the peer and replies.
    pub fn handle(&self, record: &[u8], truncated: bool, fds: usize, from: From<'_>) -> Handled {
        let id_of = |r: &[u8]| {
            r.get(2..6)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .unwrap_or(0)
        };
        let error = |id, code| Handled::Reply(Reply::Error { id, code });
        if truncated {
            return error(id_of(record), ErrorCode::TooLarge);
        }
        let req = match Request::decode(record) {
            Ok(r) => r,
            Err(e) => return error(e.id, e.code),
        };
        if fds != req.fds() {
            return error(req.id(), ErrorCode::Malformed);
        }
        match req {
            Request::Sign {
                id,
                key,
                scheme,
                message,
            } => {
                if let From::Peer(access) = from {
                    if !access.allows(key) {
                        return error(id, ErrorCode::NotAllowed);
                    }
                }
                match self.sign(key, scheme, &message) {
                    Ok(signature) => Handled::Reply(Reply::Signature { id, signature }),
                    Err(code) => error(id, code),
                }
            }
            Request::Ping { id } => Handled::Reply(Reply::Pong { id }),
            Request::AddPeer { id, access } => match from {
                From::Control => Handled::AddPeer { id, access },
                From::Peer(_) => error(id, ErrorCode::NotAllowed),
            },
        }
    }
}

/// Which channel a record came on.
#[derive(Debug, Clone, Copy)]
pub enum From<'a> {
    /// The acceptor's control channel: every key, and `ADD_PEER`.
    Control,
    /// A worker's channel, with the keys it may use.
    Peer(&'a KeyAccess),
}

/// What to do with a record.
#[derive(Debug, PartialEq, Eq)]
pub enum Handled {
    Reply(Reply),
    /// Add the attached fd as a peer with `access`, then reply PONG with
    /// this id.
    AddPeer {
        id: u32,
        access: KeyAccess,
    },
}

/// A worker's channel in the key process.
struct Peer {
    fd: OwnedFd,
    access: KeyAccess,
}

/// Confines the key process: `profile` (its uid/gid, chroot, seccomp...)
/// with the channels kept, no fork, no core dump, and not dumpable.
/// Must run single-threaded, after the keys are loaded.
pub fn confine(
    profile: &Profile,
    channels: &[RawFd],
) -> Result<sandbox::Applied, sandbox::SandboxError> {
    let mut p = profile.clone();
    for &fd in channels {
        if !p.keep_fds.contains(&fd) {
            p.keep_fds.push(fd);
        }
    }
    p.no_fork = true;
    p.core0 = true;
    // The key process's own filter (no open at all) replaces the SDK's
    // default, where there is one for this architecture.
    let own_filter = p.seccomp == SeccompMode::Default && cfg!(target_arch = "x86_64");
    if own_filter {
        p.seccomp = SeccompMode::Off;
    }
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) takes no pointer; it only changes
    // this process's dumpable flag.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc != 0 {
        return Err(sandbox::SandboxError::Check {
            step: sandbox::Step::Preflight,
            detail: format!(
                "prctl(PR_SET_DUMPABLE, 0) failed: {}",
                io::Error::last_os_error()
            ),
        });
    }
    let mut applied = sandbox::apply(&p)?;
    if own_filter {
        keyd_seccomp::install().map_err(|e| sandbox::SandboxError::Check {
            step: sandbox::Step::Seccomp,
            detail: e.to_string(),
        })?;
        applied.seccomp = true;
    } else if p.seccomp == SeccompMode::Default {
        applied.notes.push(
            "no key process filter for this architecture: the workers' default filter \
             (read-only open allowed) is used"
                .into(),
        );
    }
    Ok(applied)
}

/// Serves requests until the control channel reaches its end (`Ok`), or,
/// without a control channel, until the last peer is gone. `peers` (given
/// at start) may use every key; peers added later get the access their
/// `ADD_PEER` names.
pub fn serve(store: &KeyStore, control: Option<OwnedFd>, peers: Vec<OwnedFd>) -> io::Result<()> {
    let mut peers: Vec<Peer> = peers
        .into_iter()
        .map(|fd| Peer {
            fd,
            access: KeyAccess::All,
        })
        .collect();
    let mut buf = vec![0u8; wire::MAX_REQUEST + 1];
    loop {
        if control.is_none() && peers.is_empty() {
            return Ok(());
        }
        let ready = {
            let mut fds: Vec<_> = control.iter().map(|c| c.as_fd()).collect();
            fds.extend(peers.iter().map(|p| p.fd.as_fd()));
            sock::wait_any(&fds)?
        };
        let offset = usize::from(control.is_some());
        let mut gone = Vec::new();
        let mut added = Vec::new();
        for i in ready {
            let is_control = control.is_some() && i == 0;
            let (fd, from) = if is_control {
                match control.as_ref() {
                    Some(c) => (c.as_fd(), From::Control),
                    None => continue,
                }
            } else {
                match peers.get(i - offset) {
                    Some(p) => (p.fd.as_fd(), From::Peer(&p.access)),
                    None => continue,
                }
            };
            let rec = match sock::recv(fd, &mut buf, true) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if is_control => return Err(e),
                Err(_) => {
                    gone.push(i - offset);
                    continue;
                }
            };
            if rec.len == 0 && rec.fds.is_empty() && !rec.truncated {
                if is_control {
                    return Ok(());
                }
                gone.push(i - offset);
                continue;
            }
            let len = rec.len.min(buf.len());
            let nfds = rec.fds.len();
            let reply = match store.handle(&buf[..len], rec.truncated, nfds, from) {
                Handled::Reply(r) => r,
                Handled::AddPeer { id, access } => {
                    let mut fds = rec.fds;
                    match fds.pop() {
                        Some(peer)
                            if peers.len() + added.len() < MAX_PEERS && is_seqpacket(&peer) =>
                        {
                            added.push(Peer { fd: peer, access });
                            Reply::Pong { id }
                        }
                        _ => Reply::Error {
                            id,
                            code: ErrorCode::NotAllowed,
                        },
                    }
                }
            };
            // Never block on a peer that does not read: disconnect it.
            if let Err(e) = sock::send_nonblocking(fd, &reply.encode()) {
                if is_control {
                    return Err(e);
                }
                gone.push(i - offset);
            }
        }
        gone.sort_unstable();
        gone.dedup();
        for i in gone.into_iter().rev() {
            if i < peers.len() {
                peers.remove(i);
            }
        }
        peers.append(&mut added);
    }
}

fn is_seqpacket(fd: &OwnedFd) -> bool {
    matches!(
        nix::sys::socket::getsockopt(fd, nix::sys::socket::sockopt::SockType),
        Ok(nix::sys::socket::SockType::SeqPacket)
    )
}

/// The key process's whole life, for a freshly forked or exec'd child:
/// load, confine (when `profile` is given), serve, exit. Errors go to
/// stderr with the `baton-keyd:` prefix and the exit status says which
/// step failed ([`EXIT_LOAD`], [`EXIT_SANDBOX`], [`EXIT_IO`]).
pub fn run(
    files: &[KeyFiles],
    control: Option<OwnedFd>,
    peers: Vec<OwnedFd>,
    profile: Option<&Profile>,
) -> ! {
    let store = match KeyStore::load(files) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("baton-keyd: {e}");
            std::process::exit(EXIT_LOAD);
        }
    };
    if let Some(profile) = profile {
        let mut fds: Vec<RawFd> = peers.iter().map(|p| p.as_raw_fd()).collect();
        fds.extend(control.iter().map(|c| c.as_raw_fd()));
        match confine(profile, &fds) {
            Ok(applied) => {
                for note in &applied.notes {
                    eprintln!("baton-keyd: sandbox: {note}");
                }
            }
            Err(e) => {
                eprintln!("baton-keyd: {e}");
                std::process::exit(EXIT_SANDBOX);
            }
        }
    }
    match serve(&store, control, peers) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("baton-keyd: control channel: {e}");
            std::process::exit(EXIT_IO);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> KeyStore {
        let kp = rcgen::KeyPair::generate().expect("keygen");
        let der = rustls::pki_types::PrivateKeyDer::try_from(kp.serialize_der()).expect("der");
        KeyStore::from_keys([(7, load::signing_key(&der).expect("ring"))])
    }

    #[test]
    fn args_round_trip_and_errors() {
        let a = Args {
            files: vec![
                KeyFiles {
                    id: 1,
                    cert: "/etc/a.crt".into(),
                    key: "/etc/a:b.key".into(),
                },
                KeyFiles {
                    id: 2,
                    cert: "b.crt".into(),
                    key: "b.key".into(),
                },
            ],
            control_fd: Some(5),
            peer_fds: vec![7, 8],
        };
        let strings = a
            .to_args()
            .into_iter()
            .map(|s| s.into_string().expect("utf8"))
            .collect::<Vec<_>>();
        assert_eq!(Args::parse(strings), Ok(a));
        let p = |v: &[&str]| Args::parse(v.iter().map(|s| s.to_string()));
        assert!(p(&[]).is_err());
        assert!(p(&["--key", "1:a:b"]).is_err(), "no channel");
        assert!(p(&["--key", "x:a:b", "--peer-fd", "5"]).is_err());
        assert!(p(&["--key", "1:a", "--peer-fd", "5"]).is_err());
        assert!(p(&["--key", "1:a:b", "--key", "1:c:d", "--peer-fd", "5"]).is_err());
        assert!(p(&["--key", "1:a:b", "--peer-fd", "5", "--peer-fd", "5"]).is_err());
        assert!(p(&["--key", "1:a:b", "--peer-fd", "1"]).is_err());
        assert!(p(&["--key", "1:a:b", "--peer-fd"]).is_err());
        assert!(p(&["--key", "1:a:b", "--bogus", "1"]).is_err());
    }

    #[test]
    fn handle_refuses_without_dying() {
        let s = store();
        let sign = |key, scheme| {
            Request::Sign {
                id: 5,
                key,
                scheme,
                message: b"hello".to_vec(),
            }
            .encode()
        };
        let all = KeyAccess::All;
        let peer = From::Peer(&all);
        let ok = s.handle(
            &sign(7, SignatureScheme::ECDSA_NISTP256_SHA256),
            false,
            0,
            peer,
        );
        assert!(matches!(ok, Handled::Reply(Reply::Signature { id: 5, .. })));
        let code = |h| match h {
            Handled::Reply(Reply::Error { code, .. }) => Some(code),
            _ => None,
        };
        let p256 = SignatureScheme::ECDSA_NISTP256_SHA256;
        let h = |rec: &[u8], trunc, fds, from| code(s.handle(rec, trunc, fds, from));
        assert_eq!(
            h(&sign(8, p256), false, 0, peer),
            Some(ErrorCode::UnknownKey)
        );
        let pss = SignatureScheme::RSA_PSS_SHA256;
        assert_eq!(
            h(&sign(7, pss), false, 0, peer),
            Some(ErrorCode::UnsupportedScheme)
        );
        assert_eq!(
            h(b"\x01\x01\x05\0\0\0", true, 0, peer),
            Some(ErrorCode::TooLarge)
        );
        assert_eq!(h(b"xx", false, 0, peer), Some(ErrorCode::Malformed));
        // Access lists: a peer of another pool may not use key 7.
        let other = KeyAccess::Only(vec![1, 2]);
        assert_eq!(
            h(&sign(7, p256), false, 0, From::Peer(&other)),
            Some(ErrorCode::NotAllowed)
        );
        let mine = KeyAccess::Only(vec![7]);
        assert!(matches!(
            s.handle(&sign(7, p256), false, 0, From::Peer(&mine)),
            Handled::Reply(Reply::Signature { .. })
        ));
        let access = KeyAccess::Only(vec![7]);
        let add = Request::AddPeer {
            id: 1,
            access: access.clone(),
        }
        .encode();
        assert_eq!(h(&add, false, 1, peer), Some(ErrorCode::NotAllowed));
        assert_eq!(
            s.handle(&add, false, 1, From::Control),
            Handled::AddPeer { id: 1, access }
        );
        assert_eq!(h(&add, false, 0, From::Control), Some(ErrorCode::Malformed));
        let ping = Request::Ping { id: 2 }.encode();
        assert_eq!(h(&ping, false, 1, peer), Some(ErrorCode::Malformed));
        assert_eq!(
            s.handle(&ping, false, 0, peer),
            Handled::Reply(Reply::Pong { id: 2 })
        );
    }
}

/// Exit status of [`main`] for a bad command line.
pub const EXIT_USAGE: i32 = 64;

/// The command line of the key process (the `baton-keyd` binary, or a
/// `baton keyd` subcommand calling [`main`]):
///
/// ```text
/// --key ID:CERT:KEY [--key ...] [--control-fd N] [--peer-fd N ...]
/// ```
pub const USAGE: &str =
    "baton-keyd --key ID:CERT:KEY [--key ...] [--control-fd N] [--peer-fd N ...]";

/// A parsed key process command line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Args {
    pub files: Vec<KeyFiles>,
    pub control_fd: Option<RawFd>,
    pub peer_fds: Vec<RawFd>,
}

impl Args {
    /// Parses the arguments (without the program name).
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
        let mut out = Args::default();
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            let value = args.next().ok_or_else(|| format!("{a} needs a value"))?;
            match a.as_str() {
                "--key" => {
                    let mut parts = value.splitn(3, ':');
                    let (Some(id), Some(cert), Some(key)) =
                        (parts.next(), parts.next(), parts.next())
                    else {
                        return Err(format!("--key {value:?}: expected ID:CERT:KEY"));
                    };
                    let id = id
                        .parse()
                        .map_err(|_| format!("--key {value:?}: the id is not a number"))?;
                    if out.files.iter().any(|f| f.id == id) {
                        return Err(format!("key id {id} given twice"));
                    }
                    out.files.push(KeyFiles {
                        id,
                        cert: PathBuf::from(cert),
                        key: PathBuf::from(key),
                    });
                }
                "--control-fd" | "--peer-fd" => {
                    let fd: RawFd = value
                        .parse()
                        .map_err(|_| format!("{a}: not an fd number: {value:?}"))?;
                    if fd <= 2 {
                        return Err(format!("{a} {fd}: that is stdio"));
                    }
                    if out.control_fd == Some(fd) || out.peer_fds.contains(&fd) {
                        return Err(format!("fd {fd} given twice"));
                    }
                    if a == "--control-fd" {
                        if out.control_fd.is_some() {
                            return Err("--control-fd given twice".into());
                        }
                        out.control_fd = Some(fd);
                    } else {
                        out.peer_fds.push(fd);
                    }
                }
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        if out.files.is_empty() {
            return Err("no --key given".into());
        }
        if out.control_fd.is_none() && out.peer_fds.is_empty() {
            return Err("no channel given (--control-fd or --peer-fd)".into());
        }
        Ok(out)
    }

    /// The arguments that [`Args::parse`] reads back.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut v = Vec::new();
        for f in &self.files {
            let mut s = OsString::from(format!("{}:", f.id));
            s.push(f.cert.as_os_str());
            s.push(":");
            s.push(f.key.as_os_str());
            v.push(OsString::from("--key"));
            v.push(s);
        }
        if let Some(fd) = self.control_fd {
            v.push("--control-fd".into());
            v.push(fd.to_string().into());
        }
        for fd in &self.peer_fds {
            v.push("--peer-fd".into());
            v.push(fd.to_string().into());
        }
        v
    }
}

/// Takes ownership of an inherited fd after checking that it is an open
/// `SOCK_SEQPACKET` socket.
fn adopt(fd: RawFd) -> Result<OwnedFd, String> {
    // SAFETY: F_GETFD only reads the descriptor table entry.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("fd {fd} is not open"));
    }
    // SAFETY: the fd is open (checked above), was inherited for this
    // process to own, and [`Args::parse`] refused duplicates, so it is
    // wrapped once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    if !is_seqpacket(&owned) {
        return Err(format!("fd {fd} is not a SOCK_SEQPACKET socket"));
    }
    Ok(owned)
}

/// The key process's `main`: parses `args` (without the program name;
/// non-UTF-8 arguments are refused), takes the inherited channels, reads
/// the sandbox profile from `BATON_SANDBOX`, and [`run`]s. A bad command
/// line exits [`EXIT_USAGE`].
pub fn main(args: impl IntoIterator<Item = OsString>) -> ! {
    let usage = |msg: &str| -> ! {
        eprintln!("baton-keyd: {msg}\nusage: {USAGE}");
        std::process::exit(EXIT_USAGE);
    };
    let args: Vec<String> = args
        .into_iter()
        .map(|a| {
            a.into_string()
                .unwrap_or_else(|a| usage(&format!("argument {a:?} is not UTF-8")))
        })
        .collect();
    let args = Args::parse(args).unwrap_or_else(|e| usage(&e));
    let control = args
        .control_fd
        .map(|fd| adopt(fd).unwrap_or_else(|e| usage(&e)));
    let peers = args
        .peer_fds
        .iter()
        .map(|&fd| adopt(fd).unwrap_or_else(|e| usage(&e)))
        .collect();
    let profile = match Profile::from_env() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("baton-keyd: {e}");
            std::process::exit(EXIT_SANDBOX);
        }
    };
    run(&args.files, control, peers, profile.as_ref());
}

/// A key process started by [`spawn`].
#[derive(Debug)]
pub struct Spawned {
    pub child: Child,
    /// The control channel: [`crate::add_peer`] on it for every worker;
    /// dropping it ends the key process.
    pub control: OwnedFd,
}

/// Starts the key process: `program` with `pre_args` (for example
/// `/proc/self/exe` and `["keyd"]` for a subcommand that calls [`main`], or
/// the `baton-keyd` binary and `[]`), the keys, and a new control channel
/// inherited as an fd. `profile` goes to the child in `BATON_SANDBOX`
/// (none: it runs unconfined, for tests and development). The child loads
/// its keys first: a load error is its exit status [`EXIT_LOAD`] with the
/// file named on its stderr, which [`crate::add_peer`] sees as a closed
/// channel.
pub fn spawn(
    program: &Path,
    pre_args: &[OsString],
    files: &[KeyFiles],
    profile: Option<&Profile>,
) -> io::Result<Spawned> {
    let (control, child_end) = sock::pair()?;
    let raw = child_end.as_raw_fd();
    let args = Args {
        files: files.to_vec(),
        control_fd: Some(raw),
        peer_fds: Vec::new(),
    };
    let mut cmd = Command::new(program);
    cmd.args(pre_args).args(args.to_args());
    match profile {
        Some(p) => cmd.env(sandbox::SANDBOX_ENV, p.to_env()),
        None => cmd.env_remove(sandbox::SANDBOX_ENV),
    };
    // SAFETY: runs in the child between fork and exec; fcntl and
    // sigprocmask (on a stack sigset) are async-signal-safe and touch only
    // the child's own state.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            // A signal mask survives exec: a parent that blocks signals
            // for a signalfd (baton's acceptor) must not leave the key
            // process deaf to SIGTERM.
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(child_end);
    Ok(Spawned { child, control })
}
