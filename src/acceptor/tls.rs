//! TLS in the workers, keys out of them: the acceptor's part.
//!
//! When a pool has `--tls-cert`/`--tls-key`, baton starts its **key
//! process** (`baton keyd`, [`baton_tls::keyd`]) before any worker: it
//! reads the private keys, checks each against its certificate, confines
//! itself (its own unprivileged user when root, no files, no sockets, its
//! own seccomp filter) and signs handshakes on request. One key process
//! serves every TLS pool; each key has an id, and each worker may use only
//! its pool's.
//!
//! Each worker of a TLS pool is spawned with
//! * its own key channel: a socketpair whose other end the acceptor gives
//!   the key process (`ADD_PEER`, limited to the pool's key ids);
//! * the pool's **bundle** ([`baton_tls::bundle`]): the certificate chains
//!   as DER (public; a chrooted worker could not read the PEM files), the
//!   minimum version and the session-ticket keys, which the acceptor
//!   generates, gives every worker of the pool (a client resumes on any),
//!   and rotates every [`TICKET_ROTATE`] keeping the previous ones.
//!
//! Neither the acceptor nor a worker ever reads a private key. If the key
//! process dies, new full handshakes fail cleanly (the workers' signer
//! times out or sees the channel closed) while baton restarts it, then
//! rolls the TLS pools' workers over to channels to the new one.

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use baton_tls::bundle::Bundle;
use baton_tls::ticket::TicketKeys;
use baton_tls::wire::KeyAccess;
use baton_tls::KeyFiles;
use tracing::{error, info, warn};

use super::*;
use crate::config::PoolTls;

/// Session-ticket keys are replaced this often (the previous ones still
/// decrypt tickets for [`TICKET_KEEP`] - 1 more periods).
pub const TICKET_ROTATE: Duration = Duration::from_secs(6 * 3600);
/// Ticket keys kept: the current one and the previous.
pub const TICKET_KEEP: usize = 3;
/// How long the acceptor waits for the key process to take a new peer.
const ADD_PEER_TIMEOUT: Duration = Duration::from_secs(1);
/// A key process that died is started again after this (doubling, capped).
const KEYD_BACKOFF: Duration = Duration::from_millis(200);
const KEYD_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The kTLS probe, once per acceptor (before any sandbox; a reload or a
/// key process restart reuses it).
fn ktls() -> &'static baton_tls::ktls::Ktls {
    static KTLS: std::sync::OnceLock<baton_tls::ktls::Ktls> = std::sync::OnceLock::new();
    KTLS.get_or_init(baton_tls::ktls::probe)
}

/// The key process as the acceptor runs it.
pub(crate) struct Keyd {
    pub(super) pid: i32,
    pub(super) control: OwnedFd,
    pub(super) files: Vec<KeyFiles>,
    /// When to start it again after it died.
    pub(super) restart_at: Option<Instant>,
    pub(super) failures: u32,
}

/// A TLS pool's part: its key ids and its bundle.
pub(crate) struct PoolTlsState {
    pub(super) ids: Vec<u32>,
    pub(super) bundle: OwnedFd,
    pub(super) bundle_now: Bundle,
    pub(super) keys: TicketKeys,
    pub(super) rotate_at: Instant,
}

impl PoolTlsState {
    /// The bundle of a pool with `tls`, its keys numbered from `first_id`;
    /// returns it and the key files for the key process.
    pub(super) fn new(
        tls: &PoolTls,
        first_id: u32,
        now: Instant,
    ) -> Result<(PoolTlsState, Vec<KeyFiles>), String> {
        let mut files = Vec::new();
        let mut certs = Vec::new();
        for (i, (cert, key)) in tls.pairs.iter().enumerate() {
            let id = first_id + i as u32;
            let chain = baton_tls::CertChain::load(cert).map_err(|e| e.to_string())?;
            certs.push((id, chain.chain.iter().map(|d| d.to_vec()).collect()));
            files.push(KeyFiles {
                id,
                cert: cert.clone(),
                key: key.clone(),
            });
        }
        let keys = TicketKeys::generate().map_err(|e| format!("ticket keys: {e}"))?;
        let bundle_now = Bundle {
            generation: 1,
            min_version: tls.min_version,
            ticket_keys: keys.encode(),
            certs,
            ktls: ktls().clone(),
        };
        let bundle = baton_sdk::shared::create_region("baton-tls-bundle")
            .map_err(|e| format!("cannot create the TLS bundle: {e}"))?;
        bundle_now
            .write_to(&bundle)
            .map_err(|e| format!("cannot write the TLS bundle: {e}"))?;
        Ok((
            PoolTlsState {
                ids: files.iter().map(|f| f.id).collect(),
                bundle,
                bundle_now,
                keys,
                rotate_at: now + TICKET_ROTATE,
            },
            files,
        ))
    }

    /// New current ticket key; the workers pick it up from the bundle.
    fn rotate(&mut self, now: Instant) -> Result<(), String> {
        self.keys
            .rotate(TICKET_KEEP)
            .map_err(|e| format!("ticket keys: {e}"))?;
        self.bundle_now.generation += 1;
        self.bundle_now.ticket_keys = self.keys.encode();
        self.rotate_at = now + TICKET_ROTATE;
        self.bundle_now
            .write_to(&self.bundle)
            .map_err(|e| format!("cannot write the TLS bundle: {e}"))
    }
}

/// The profile the key process confines itself to: the workers' user
/// (nobody as root), no chroot, its own seccomp filter.
fn keyd_profile(pools: &Slab<PoolState>) -> Option<baton_sdk::sandbox::Profile> {
    let p = pools
        .iter()
        .find_map(|(_, ps)| ps.tls.as_ref().and(ps.cfg.sandbox.profile.as_ref()))?;
    Some(baton_sdk::sandbox::Profile {
        uid: p.uid,
        gid: p.gid,
        allow_root: p.allow_root,
        ..baton_sdk::sandbox::Profile::default()
    })
}

impl Acceptor {
    /// Starts the key process for every TLS pool's keys, and waits until
    /// it has loaded them (or says why it cannot).
    pub(super) fn start_keyd(&mut self, files: Vec<KeyFiles>) -> Result<(), String> {
        let exe = self.exe.clone();
        let profile = keyd_profile(&self.pools);
        let sp = baton_tls::keyd::spawn(&exe, &["keyd".into()], &files, profile.as_ref())
            .map_err(|e| format!("cannot start the key process: {e}"))?;
        let pid = sp.child.id() as i32;
        // Its first answer says the keys loaded: a probe peer with no key.
        let (probe, _other) =
            baton_tls::key_channel_pair().map_err(|e| format!("cannot make a key channel: {e}"))?;
        if let Err(e) = baton_tls::add_peer(
            &sp.control,
            &probe,
            KeyAccess::Only(Vec::new()),
            Duration::from_secs(5),
        ) {
            let mut child = sp.child;
            let _ = child.kill();
            let st = child.wait().map(|s| s.to_string()).unwrap_or_default();
            return Err(format!(
                "the key process did not start ({e}; {st}): its error, naming the file, is above"
            ));
        }
        info!(
            pid,
            keys = files.len(),
            "key process ready: it holds the private keys; workers ask it to sign"
        );
        // Which path records take: with kernel TLS the workers hand each
        // session's keys to the kernel after the handshake, and large
        // files go out with sendfile(2); without it they encrypt in
        // userspace. The workers are told in the bundle.
        let ktls = ktls();
        info!(ktls = %ktls, "TLS record path: {}", ktls.record_path());
        self.keyd = Some(Keyd {
            pid,
            control: sp.control,
            files,
            restart_at: None,
            failures: 0,
        });
        Ok(())
    }

    /// The key channel a new worker of pool `p` inherits (None for a pool
    /// without TLS). An error (out of fds...) fails the spawn, which is
    /// retried later: a worker spawned without its TLS would be refused.
    pub(super) fn tls_channel(&mut self, p: usize) -> io::Result<Option<OwnedFd>> {
        let ps = &self.pools[p];
        let Some(tls) = ps.tls.as_ref() else {
            return Ok(None);
        };
        let (worker_end, keyd_end) = baton_tls::key_channel_pair().map_err(|e| {
            warn!(pool = %ps.cfg.name, error = %e, "cannot make a key channel for a new TLS worker; the spawn is retried");
            e
        })?;
        match &self.keyd {
            Some(k) if k.restart_at.is_none() => {
                if let Err(e) = baton_tls::add_peer(
                    &k.control,
                    &keyd_end,
                    KeyAccess::Only(tls.ids.clone()),
                    ADD_PEER_TIMEOUT,
                ) {
                    warn!(pool = %ps.cfg.name, error = %e, "the key process did not take the new worker: its full handshakes fail until it is replaced");
                }
            }
            _ => {
                warn!(pool = %ps.cfg.name, "the key process is restarting: this worker's full handshakes fail until it is replaced")
            }
        }
        Ok(Some(worker_end))
    }

    /// The key process exited (`pid` was reaped): schedule its restart.
    /// Returns false if `pid` is not the key process.
    pub(super) fn keyd_exited(&mut self, pid: i32, status: &str, now: Instant) -> bool {
        let Some(k) = self.keyd.as_mut().filter(|k| k.pid == pid) else {
            return false;
        };
        k.failures += 1;
        let delay = KEYD_BACKOFF
            .saturating_mul(1 << (k.failures - 1).min(10))
            .min(KEYD_BACKOFF_MAX);
        k.restart_at = Some(now + delay);
        if self.shutdown.is_none() {
            error!(
                pid,
                status,
                delay_ms = delay.as_millis() as u64,
                "key process exited: TLS full handshakes fail until it is back; restarting it"
            );
        }
        true
    }

    /// Restarts a dead key process when due, then replaces the TLS pools'
    /// workers (their channels went to the old one); rotates ticket keys.
    pub(super) fn tls_timers(&mut self, now: Instant) {
        let due = self
            .keyd
            .as_ref()
            .is_some_and(|k| k.restart_at.is_some_and(|t| t <= now));
        if due && self.shutdown.is_none() {
            let Some(old) = self.keyd.take() else {
                return;
            };
            match self.start_keyd(old.files.clone()) {
                Ok(()) => {
                    let tls_pools: Vec<usize> = self
                        .pools
                        .iter()
                        .filter(|(_, ps)| ps.tls.is_some() && !ps.removing)
                        .map(|(k, _)| k)
                        .collect();
                    for p in tls_pools {
                        let n = self.begin_rolling(p);
                        info!(pool = %self.pools[p].cfg.name, workers = n, "key process back: replacing the pool's workers");
                    }
                }
                Err(e) => {
                    error!(error = %e, "cannot restart the key process; trying again");
                    let failures = old.failures + 1;
                    let delay = KEYD_BACKOFF
                        .saturating_mul(1 << failures.min(10))
                        .min(KEYD_BACKOFF_MAX);
                    self.keyd = Some(Keyd {
                        restart_at: Some(now + delay),
                        failures,
                        ..old
                    });
                }
            }
        }
        for (_, ps) in self.pools.iter_mut() {
            let name = ps.cfg.name.clone();
            if let Some(t) = ps.tls.as_mut().filter(|t| t.rotate_at <= now) {
                match t.rotate(now) {
                    Ok(()) => {
                        info!(pool = %name, generation = t.bundle_now.generation, "session-ticket keys rotated")
                    }
                    Err(e) => {
                        error!(pool = %name, error = %e, "cannot rotate the session-ticket keys")
                    }
                }
            }
        }
    }

    /// The next TLS deadline (key process restart, ticket rotation).
    pub(super) fn tls_deadline(&self) -> Option<Instant> {
        let keyd = self.keyd.as_ref().and_then(|k| k.restart_at);
        let rotate = self
            .pools
            .iter()
            .filter_map(|(_, ps)| ps.tls.as_ref().map(|t| t.rotate_at))
            .min();
        match (keyd, rotate) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The pool's bundle, to inherit.
    pub(super) fn tls_bundle(&self, p: usize) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.pools[p].tls.as_ref().map(|t| t.bundle.as_fd())
    }

    /// For a reload whose TLS changed: each TLS pool's new state (by pool
    /// name), with the new keys checked by a throwaway process and loaded
    /// by a new key process. The old key process is retired, not stopped:
    /// it signs for the old workers until the rolling restart replaced
    /// them and they have drained. On error nothing changed.
    pub(super) fn reload_tls(
        &mut self,
        new: &crate::config::Config,
    ) -> Result<std::collections::HashMap<String, PoolTlsState>, String> {
        let now = Instant::now();
        let mut states = std::collections::HashMap::new();
        let mut files = Vec::new();
        for pc in &new.pools {
            let Some(t) = &pc.tls else { continue };
            let (state, f) = PoolTlsState::new(t, files.len() as u32 + 1, now)
                .map_err(|e| format!("pool `{}`: {e}", pc.name))?;
            files.extend(f);
            states.insert(pc.name.clone(), state);
        }
        if !files.is_empty() {
            check_keys(&self.exe, &files)?;
        }
        let old = self.keyd.take();
        if files.is_empty() {
            self.retired_keyds.extend(old);
            return Ok(states);
        }
        match self.start_keyd(files) {
            Ok(()) => {
                self.retired_keyds.extend(old);
                Ok(states)
            }
            Err(e) => {
                self.keyd = old;
                Err(e)
            }
        }
    }

    /// Stops key processes a reload replaced, once no pool still rolls its
    /// workers over and no worker it replaced is still draining (closing
    /// the control channel ends one). A draining worker may hold
    /// connections whose handshake has yet to be signed: stopping the old
    /// key process under it would fail them.
    pub(super) fn drop_retired_keyds(&mut self) {
        if self.retired_keyds.is_empty() {
            return;
        }
        let in_use = self.pools.iter().any(|(_, ps)| {
            ps.rolling()
                || ps
                    .slots
                    .iter()
                    .any(|(_, s)| s.is_retired() && s.pid().is_some())
        });
        if !in_use {
            let n = self.retired_keyds.len();
            self.retired_keyds.clear();
            info!(
                retired = n,
                "the old key process is stopped: every TLS worker uses the new one"
            );
        }
    }
}

/// Checks that every key loads and matches its certificate, in a child
/// process (`baton tls-check`), so that no key is ever read by the
/// acceptor itself. Its error names the file.
fn check_keys(exe: &std::path::Path, files: &[KeyFiles]) -> Result<(), String> {
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("tls-check");
    for f in files {
        cmd.arg(&f.cert).arg(&f.key);
    }
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run the key check: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(err
            .trim()
            .strip_prefix("baton tls-check: error: ")
            .unwrap_or(err.trim())
            .to_string())
    }
}
