//! Zero-downtime binary upgrade: baton re-executes itself in place.
//!
//! `baton ctl upgrade [--binary PATH]` or SIGUSR2:
//!
//! 1. **Check.** The new binary runs, as a separate process, `upgrade-check
//!    --state-version N --pools NAMES` with baton's own command line: it
//!    loads the configuration as a start would and says whether it can take
//!    over this state version and these pools. A check that fails (or takes
//!    longer than [`CHECK_TIMEOUT`]; the loop waits for it, clients wait in
//!    the backlog meanwhile) changes nothing and says why.
//! 2. **Hand-over.** The state (pools, slots, workers and what each holds,
//!    pending and parked connections, ids, counters; times as durations) is
//!    written as JSON to a memfd; every fd it names (listeners, the control,
//!    worker and metrics sockets, worker channels, pool memory files, held
//!    connections, the control client that asked) loses close-on-exec;
//!    `BATON_UPGRADE_STATE` names the memfd.
//! 3. **Exec.** `execv(new binary, the same argv)`: same PID, so workers
//!    stay its children (their exits are SIGCHLDs that stay pending across
//!    the exec, as the blocked signal mask does) and systemd's MAINPID
//!    stays right. No worker is restarted; none notices.
//! 4. **Resume.** The new image finds the state, adopts every fd (close-on-
//!    exec again), rebuilds the acceptor with its pools under the newly
//!    loaded configuration (matched by name: the check made sure every pool
//!    has one), registers everything with a fresh epoll, and answers the
//!    control client. Workers keep the protocol version they negotiated.
//!
//! If the exec fails, the old image restores close-on-exec, keeps running
//! and says why. Control clients other than the one that asked, and metrics
//! scrapers, are disconnected by the exec (they reconnect).
//!
//! A rolling restart afterwards (`ctl restart`) moves workers onto a new
//! worker binary when the operator wants that.

use std::ffi::{CString, OsString};
use std::io::{Read, Seek, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Token};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::*;
use crate::pool::{before, HeldSnap, Worker, WorkerSnap};
use crate::supervisor::SlotSnap;

/// The version of the state this binary writes and reads.
pub const STATE_VERSION: u32 = 1;
/// The environment variable naming the memfd of the state.
pub const STATE_ENV: &str = "BATON_UPGRADE_STATE";
/// How long the new binary's check may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize, Deserialize)]
pub struct State {
    version: u32,
    next_conn_id: u64,
    next_worker_id: u32,
    stats: Stats,
    started_ms: u64,
    ready_sent: bool,
    control: Option<(RawFd, PathBuf)>,
    worker_socket: Option<(RawFd, PathBuf)>,
    metrics: Option<RawFd>,
    /// `--health-listen`'s socket, and what is left of a host drain's
    /// grace (absent from the state of a binary before them).
    #[serde(default)]
    health: Option<RawFd>,
    #[serde(default)]
    drain_host_left_ms: Option<u64>,
    /// The control client that asked for the upgrade: answered by the new
    /// image.
    reply_to: Option<RawFd>,
    /// The binary the old image ran (for the log).
    from: PathBuf,
    pools: Vec<PoolSnap>,
    parked: Vec<ParkedSnap>,
    #[serde(default)]
    keyd: Option<KeydSnap>,
}

/// The key process: still this process's child after the exec.
#[derive(Debug, Serialize, Deserialize)]
struct KeydSnap {
    pid: i32,
    control: RawFd,
    files: Vec<(u32, PathBuf, PathBuf)>,
    failures: u32,
    restart_in_ms: Option<u64>,
}

/// A TLS pool's key ids, bundle and ticket keys.
#[derive(Debug, Serialize, Deserialize)]
struct TlsSnap {
    ids: Vec<u32>,
    bundle: RawFd,
    keys: Vec<u8>,
    rotate_in_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct ListenerSnap {
    fd: RawFd,
    addr: SocketAddr,
    spec: SocketAddr,
}

#[derive(Debug, Serialize, Deserialize)]
struct PoolSnap {
    key: usize,
    name: String,
    listeners: Vec<ListenerSnap>,
    slots: Vec<(usize, SlotSnap)>,
    workers: Vec<(usize, WorkerSnap)>,
    pending: Vec<HeldSnap>,
    rolling: Vec<usize>,
    rolling_current: Option<(usize, usize)>,
    drain_sent: bool,
    removing: bool,
    shared: Option<RawFd>,
    stats: PoolStats,
    #[serde(default)]
    tls: Option<TlsSnap>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ParkedSnap {
    key: usize,
    pool: usize,
    conn: HeldSnap,
    idle_left_ms: u64,
}

/// Takes the state an upgrading image left for this one, if any (and
/// removes [`STATE_ENV`] from the environment: call while single-threaded).
pub fn take_state() -> Result<Option<State>, String> {
    let Some(v) = std::env::var_os(STATE_ENV) else {
        return Ok(None);
    };
    std::env::remove_var(STATE_ENV);
    let fd: RawFd = v
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{STATE_ENV}={v:?} is not an fd number"))?;
    let mut f = std::fs::File::from(adopt(fd));
    f.rewind().map_err(|e| format!("the upgrade state: {e}"))?;
    let mut text = String::new();
    f.read_to_string(&mut text)
        .map_err(|e| format!("the upgrade state: {e}"))?;
    let state: State =
        serde_json::from_str(&text).map_err(|e| format!("the upgrade state: {e}"))?;
    if state.version != STATE_VERSION {
        return Err(format!(
            "the upgrade state is version {}, this binary reads {STATE_VERSION}",
            state.version
        ));
    }
    Ok(Some(state))
}

/// An inherited fd, close-on-exec again, owned.
fn adopt(fd: RawFd) -> OwnedFd {
    let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    // SAFETY: the fd numbers in the state were open in the image that
    // wrote it and stayed open across the exec (close-on-exec cleared);
    // each is named once in the state and adopted once here.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn set_inheritable(fds: &[RawFd], on: bool) {
    for &fd in fds {
        let flags = if on {
            FdFlag::empty()
        } else {
            FdFlag::FD_CLOEXEC
        };
        let _ = fcntl(fd, FcntlArg::F_SETFD(flags));
    }
}

impl Acceptor {
    /// Checks `binary` (default: this one) and, if it can take over,
    /// executes it in place with the state. Returns only on failure, with
    /// why; `reply_to` is a control client to answer from the new image.
    pub(super) fn upgrade(
        &mut self,
        binary: Option<PathBuf>,
        reply_to: Option<RawFd>,
    ) -> Result<std::convert::Infallible, String> {
        if self.shutdown.is_some() {
            return Err("baton is shutting down".to_string());
        }
        let binary = binary.unwrap_or_else(|| self.exe.clone());
        self.check_binary(&binary)?;
        let now = Instant::now();
        let (state, fds) = self.snapshot(now, reply_to);
        let mut mem = std::fs::File::from(
            shared_memory_named("baton-upgrade-state")
                .map_err(|e| format!("cannot create the state file: {e}"))?,
        );
        let text =
            serde_json::to_vec(&state).map_err(|e| format!("cannot encode the state: {e}"))?;
        mem.write_all(&text)
            .map_err(|e| format!("cannot write the state: {e}"))?;
        let mut all = fds;
        all.push(mem.as_raw_fd());
        let argv: Vec<CString> = std::env::args_os()
            .map(|a| CString::new(a.as_bytes().to_vec()))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("an argument holds a NUL byte: {e}"))?;
        let path = CString::new(binary.as_os_str().as_bytes().to_vec())
            .map_err(|e| format!("{}: {e}", binary.display()))?;
        info!(
            binary = %binary.display(),
            workers = self.pools.iter().map(|(_, ps)| ps.pool.workers.len()).sum::<usize>(),
            held = self.held(),
            bytes = text.len(),
            "upgrading: executing the new binary in place (same pid; workers keep running)"
        );
        crate::systemd::notify(&[sd_notify::NotifyState::Status("upgrading")]);
        set_inheritable(&all, true);
        std::env::set_var(STATE_ENV, mem.as_raw_fd().to_string());
        let e = match nix::unistd::execv(&path, &argv) {
            Err(e) => e,
            Ok(never) => match never {},
        };
        // Still here: the exec failed, and this image goes on.
        std::env::remove_var(STATE_ENV);
        set_inheritable(&all, false);
        error!(binary = %binary.display(), error = %e, "upgrade failed: cannot execute the new binary; still running the old one");
        Err(format!("cannot execute {}: {e}", binary.display()))
    }

    /// Runs the new binary's `upgrade-check` with this baton's command
    /// line.
    fn check_binary(&self, binary: &std::path::Path) -> Result<(), String> {
        let names: Vec<String> = self
            .pools
            .iter()
            .filter(|(_, ps)| !ps.removing)
            .map(|(_, ps)| ps.cfg.name.clone())
            .collect();
        let mut args: Vec<OsString> = vec![
            "upgrade-check".into(),
            "--state-version".into(),
            STATE_VERSION.to_string().into(),
            "--pools".into(),
            names.join(",").into(),
        ];
        args.extend(std::env::args_os().skip(1));
        let mut child = std::process::Command::new(binary)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
        let deadline = Instant::now() + CHECK_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "{} did not finish its check within {CHECK_TIMEOUT:?}",
                        binary.display()
                    ));
                }
                Err(e) => return Err(format!("waiting for the check: {e}")),
            }
        };
        // Its pid is reaped here, not by the SIGCHLD handler (which finds
        // no slot for it and only logs at debug).
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        if !status.success() {
            let why = err.trim();
            let why = why
                .strip_prefix("baton upgrade-check: error: ")
                .unwrap_or(why);
            return Err(format!(
                "{} refused to take over: {}",
                binary.display(),
                if why.is_empty() {
                    "(no reason given)"
                } else {
                    why
                }
            ));
        }
        Ok(())
    }

    /// The state to hand over, and every fd it names.
    fn snapshot(&self, now: Instant, reply_to: Option<RawFd>) -> (State, Vec<RawFd>) {
        let mut fds = Vec::new();
        let mut pools = Vec::new();
        for (key, ps) in self.pools.iter() {
            let listeners: Vec<ListenerSnap> = self
                .listeners
                .iter()
                .filter(|(_, l)| l.pool == key)
                .map(|(_, l)| ListenerSnap {
                    fd: l.sock.as_raw_fd(),
                    addr: l.addr,
                    spec: l.spec,
                })
                .collect();
            fds.extend(listeners.iter().map(|l| l.fd));
            let workers: Vec<(usize, WorkerSnap)> = ps
                .pool
                .workers
                .iter()
                .map(|(k, w)| (k, w.snapshot(now)))
                .collect();
            for (_, w) in &workers {
                fds.push(w.chan);
                fds.extend(
                    w.in_flight
                        .iter()
                        .filter_map(|(_, h)| h.as_ref().map(|h| h.fd)),
                );
            }
            let pending: Vec<HeldSnap> = ps.pending.iter().map(HeldSnap::of).collect();
            fds.extend(pending.iter().map(|h| h.fd));
            let shared = ps.shared.as_ref().map(|f| f.as_raw_fd());
            fds.extend(shared);
            let tls = ps.tls.as_ref().map(|t| TlsSnap {
                ids: t.ids.clone(),
                bundle: t.bundle.as_raw_fd(),
                keys: t.keys.encode(),
                rotate_in_ms: t.rotate_at.saturating_duration_since(now).as_millis() as u64,
            });
            fds.extend(tls.as_ref().map(|t| t.bundle));
            pools.push(PoolSnap {
                key,
                name: ps.cfg.name.clone(),
                listeners,
                slots: ps.slots.iter().map(|(k, s)| (k, s.snapshot(now))).collect(),
                workers,
                pending,
                rolling: ps.rolling.iter().copied().collect(),
                rolling_current: ps.rolling_current,
                drain_sent: ps.drain_sent,
                removing: ps.removing,
                shared,
                stats: ps.stats,
                tls,
            });
        }
        let parked: Vec<ParkedSnap> = self
            .parked
            .iter()
            .map(|(key, p)| ParkedSnap {
                key,
                pool: p.pool,
                conn: HeldSnap {
                    id: p.info.id,
                    listener: p.info.listener,
                    peer: p.info.peer,
                    local: p.info.local,
                    fd: p.fd.as_raw_fd(),
                },
                idle_left_ms: p.deadline.saturating_duration_since(now).as_millis() as u64,
            })
            .collect();
        fds.extend(parked.iter().map(|p| p.conn.fd));
        let control = self
            .control
            .as_ref()
            .map(|l| (l.fd.as_raw_fd(), l.path.clone()));
        let worker_socket = self
            .worker_listener
            .as_ref()
            .map(|l| (l.fd.as_raw_fd(), l.path.clone()));
        let metrics = self.metrics_listener.as_ref().map(|l| l.as_raw_fd());
        fds.extend(control.iter().map(|c| c.0));
        fds.extend(worker_socket.iter().map(|c| c.0));
        fds.extend(metrics);
        let (health, drain_host_left_ms) = self.health.snapshot(now);
        fds.extend(health);
        fds.extend(reply_to);
        let keyd = self.keyd.as_ref().map(|k| KeydSnap {
            pid: k.pid,
            control: k.control.as_raw_fd(),
            files: k
                .files
                .iter()
                .map(|f| (f.id, f.cert.clone(), f.key.clone()))
                .collect(),
            failures: k.failures,
            restart_in_ms: k
                .restart_at
                .map(|t| t.saturating_duration_since(now).as_millis() as u64),
        });
        fds.extend(keyd.as_ref().map(|k| k.control));
        let state = State {
            version: STATE_VERSION,
            next_conn_id: self.next_conn_id,
            next_worker_id: self.next_worker_id,
            stats: self.stats,
            started_ms: crate::pool::ago(now, self.started),
            ready_sent: self.ready_sent,
            control,
            worker_socket,
            metrics,
            health,
            drain_host_left_ms,
            reply_to,
            from: self.exe.clone(),
            pools,
            parked,
            keyd,
        };
        (state, fds)
    }

    /// The acceptor an upgrading image handed over, under `cfg` (its pools
    /// matched by name).
    pub fn resume(mut cfg: Config, state: State) -> Result<Acceptor, Error> {
        let now = Instant::now();
        let mut configs = std::mem::take(&mut cfg.pools);
        // `new` binds nothing here: no pools, and the sockets the
        // configuration names are inherited, not opened again.
        let control = cfg.control.take();
        let worker_socket = cfg.worker_socket.take();
        let metrics_listen = cfg.metrics_listen.take();
        let health_listen = cfg.health_listen.take();
        let mut acc = Acceptor::new(cfg, Vec::new())?;
        acc.cfg.control = control;
        acc.cfg.worker_socket = worker_socket;
        acc.cfg.metrics_listen = metrics_listen;
        acc.cfg.health_listen = health_listen;
        let mut adopt_fd = adopt;
        let mut pools = Vec::new();
        for snap in state.pools {
            let Some(i) = configs.iter().position(|c| c.name == snap.name) else {
                warn!(pool = %snap.name, "the configuration has no pool of this name: its connections and workers are closed");
                continue;
            };
            let pc = configs.remove(i);
            let shared = snap.shared.map(adopt);
            let mut ps = PoolState::new_with_shared(pc, shared);
            for l in snap.listeners {
                let sock = tcp_listener(adopt(l.fd));
                acc.listeners.insert(Listener {
                    sock,
                    addr: l.addr,
                    spec: l.spec,
                    registered: false,
                    pool: snap.key,
                });
            }
            ps.slots = snap
                .slots
                .into_iter()
                .map(|(k, s)| (k, crate::supervisor::Slot::restore(s, now)))
                .collect();
            let mut workers = Vec::new();
            for (k, w) in snap.workers {
                let chan = match baton_sdk::Channel::from_fd(adopt(w.chan)) {
                    Ok(c) => c,
                    Err(e) => {
                        error!(worker = w.id, error = %e, "an inherited worker channel is unusable");
                        continue;
                    }
                };
                let _ = chan.set_nonblocking(true);
                workers.push((k, Worker::restore(w, chan, now, &mut adopt_fd)));
            }
            ps.pool.workers = workers.into_iter().collect();
            ps.pending = snap
                .pending
                .into_iter()
                .map(|h| {
                    let fd = adopt(h.fd);
                    h.into_held(fd)
                })
                .collect();
            ps.rolling = snap.rolling.into_iter().collect();
            ps.rolling_current = snap.rolling_current;
            ps.drain_sent = snap.drain_sent;
            ps.removing = snap.removing;
            ps.stats = snap.stats;
            if let Some(t) = snap.tls {
                let bundle = adopt(t.bundle);
                match (
                    baton_tls::bundle::Bundle::read_from(&bundle),
                    baton_tls::ticket::TicketKeys::decode(&t.keys),
                ) {
                    (Ok(bundle_now), Ok(keys)) => {
                        ps.tls = Some(super::tls::PoolTlsState {
                            ids: t.ids,
                            bundle,
                            bundle_now,
                            keys,
                            rotate_at: now + Duration::from_millis(t.rotate_in_ms),
                        })
                    }
                    (b, k) => {
                        error!(pool = %snap.name, bundle = ?b.err(), keys = ?k.err(), "the pool's TLS state did not survive the upgrade; its new workers get no TLS")
                    }
                }
            }
            pools.push((snap.key, ps));
        }
        acc.pools = pools.into_iter().collect();
        for pc in configs {
            info!(pool = %pc.name, "a pool new in the configuration: run `baton ctl reload` to start it");
        }
        // Worker channels into the new epoll.
        for wk in acc.all_workers() {
            let w = &acc.pools[wk.pool].pool.workers[wk.key];
            let interest = if w.blocked() {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            acc.poll
                .registry()
                .register(&mut SourceFd(&w.chan().as_raw_fd()), wk.token(), interest)
                .map_err(Error::Poll)?;
        }
        let mut parked = Vec::new();
        for p in state.parked {
            let fd = adopt(p.conn.fd);
            let deadline = now + Duration::from_millis(p.idle_left_ms);
            if acc.pools.get(p.pool).is_none() {
                continue;
            }
            acc.poll
                .registry()
                .register(
                    &mut SourceFd(&fd.as_raw_fd()),
                    Token(PARKED_BASE + p.key),
                    Interest::READABLE,
                )
                .map_err(Error::Poll)?;
            let conn = p.conn.into_held(fd);
            acc.parked_order.insert((deadline, p.key));
            parked.push((
                p.key,
                ParkedConn {
                    pool: p.pool,
                    info: conn.info,
                    fd: conn.fd,
                    deadline,
                },
            ));
        }
        acc.parked = parked.into_iter().collect();
        let local = |acc: &Acceptor, sock: Option<(RawFd, PathBuf)>, token: Token| {
            sock.map(|(fd, path)| {
                let l = crate::unix::UnixListener {
                    fd: adopt(fd),
                    path,
                };
                acc.poll
                    .registry()
                    .register(&mut SourceFd(&l.fd.as_raw_fd()), token, Interest::READABLE)
                    .map(|()| l)
                    .map_err(Error::Poll)
            })
            .transpose()
        };
        acc.control = local(&acc, state.control, CONTROL)?;
        acc.worker_listener = local(&acc, state.worker_socket, WORKER_SOCKET)?;
        if let Some(fd) = state.metrics {
            let mut l = tcp_listener(adopt(fd));
            acc.poll
                .registry()
                .register(&mut l, METRICS, Interest::READABLE)
                .map_err(Error::Poll)?;
            acc.metrics_listener = Some(l);
        }
        acc.keyd = state.keyd.map(|k| super::tls::Keyd {
            pid: k.pid,
            control: adopt(k.control),
            files: k
                .files
                .into_iter()
                .map(|(id, cert, key)| baton_tls::KeyFiles { id, cert, key })
                .collect(),
            restart_at: k.restart_in_ms.map(|ms| now + Duration::from_millis(ms)),
            failures: k.failures,
        });
        acc.health = super::health::Health::restore(
            &acc.poll,
            state.health.map(adopt),
            state.drain_host_left_ms,
            now,
        )?;
        acc.next_conn_id = state.next_conn_id;
        acc.next_worker_id = state.next_worker_id;
        acc.stats = state.stats;
        acc.started = before(now, state.started_ms);
        acc.ready_sent = state.ready_sent;
        acc.resumed = true;
        let workers: usize = acc.pools.iter().map(|(_, ps)| ps.pool.workers.len()).sum();
        info!(
            from = %state.from.display(),
            to = %acc.exe.display(),
            workers,
            held = acc.held(),
            "upgraded: this binary took over (same pid; every worker kept)"
        );
        if let Some(fd) = state.reply_to {
            let mut s = std::os::unix::net::UnixStream::from(adopt(fd));
            let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
            let reply = crate::control::Reply::ok(serde_json::json!({
                "upgraded": acc.exe.display().to_string(),
                "pid": std::process::id(),
                "workers": workers,
            }));
            let _ = s.write_all(&reply.to_line());
        }
        crate::systemd::notify(&[
            sd_notify::NotifyState::MainPid(std::process::id()),
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status("upgraded"),
        ]);
        Ok(acc)
    }
}

/// A memory file for the state.
fn shared_memory_named(name: &str) -> std::io::Result<OwnedFd> {
    let cname = CString::new(name).map_err(std::io::Error::other)?;
    Ok(nix::sys::memfd::memfd_create(
        &cname,
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )?)
}
