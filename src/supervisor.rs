//! Spawning worker processes and deciding when to restart them.
//!
//! Each spawned worker lives in a [`Slot`]. A slot outlives its process:
//! when the process exits, the slot remembers how often it failed recently
//! and when to try again (exponential backoff), and gives up on a worker
//! that crash-loops. Exits are observed through SIGCHLD (a signalfd in the
//! event loop) followed by `waitpid(-1, WNOHANG)` until nothing is left, so
//! every child is reaped, including ones the pool no longer knows.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use baton_sdk::proto::{CHANNEL_FD_ENV, WORKER_ID_ENV};
use baton_sdk::sandbox::{Profile, SANDBOX_ENV};
use baton_sdk::shared::SHARED_FD_ENV;
use baton_sdk::Channel;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::config::WorkerCommand;

/// First restart delay; doubles with each consecutive failure.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest restart delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Longest restart delay of a worker that had proved it works (said HELLO
/// and was given connections): it is restarted for ever, as nginx does, with
/// a short backoff so that a request that kills every worker cannot make
/// them spin.
pub const BACKOFF_PROVEN_MAX: Duration = Duration::from_secs(1);
/// A proven worker that ran at least this long is restarted at once (it
/// was killed, or crashed after real work); one that keeps dying sooner
/// backs off from [`BACKOFF_START`] to [`BACKOFF_PROVEN_MAX`].
pub const PROVEN_QUICK: Duration = Duration::from_secs(1);

/// Where a slot's process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Life {
    /// No process and none planned: not spawned yet, or stopped at
    /// shutdown.
    Idle,
    /// Its process runs.
    Running { pid: i32 },
    /// Its process exited; the next one is due at `at`.
    Restarting { at: Instant },
    /// It is not restarted again (crash loop, or a sandbox that cannot
    /// apply); `pid` while its last process still runs.
    GivenUp { pid: Option<i32> },
}

/// One spawned worker position in the pool.
#[derive(Debug)]
pub struct Slot {
    life: Life,
    /// The worker id of the current (or last) process.
    worker_id: u32,
    /// Pool key of its channel while connected.
    worker: Option<usize>,
    started: Instant,
    /// Consecutive exits that came sooner than the restart window.
    failures: u32,
    restarts: u32,
    /// Being removed: its worker drains and is not restarted.
    retired: bool,
    /// The current process said HELLO and was given connections: its exit
    /// is never a crash loop.
    proven: bool,
    /// The current process was stopped for want of resources (fds) on the
    /// acceptor's side: its exit is not its failure.
    spared: bool,
    /// Consecutive quick exits of proven processes (for their backoff).
    proven_failures: u32,
}

/// A slot, as a binary upgrade passes it to the next image (times as
/// durations: `Instant`s do not cross an exec).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SlotSnap {
    /// `idle`, `running`, `restarting` or `given-up`.
    pub life: String,
    pub pid: Option<i32>,
    pub restart_in_ms: Option<u64>,
    pub worker_id: u32,
    pub worker: Option<usize>,
    pub started_ms: u64,
    pub failures: u32,
    pub restarts: u32,
    pub retired: bool,
    pub proven: bool,
    pub spared: bool,
    pub proven_failures: u32,
}

impl Slot {
    pub fn snapshot(&self, now: Instant) -> SlotSnap {
        let (life, restart_in_ms) = match self.life {
            Life::Idle => ("idle", None),
            Life::Running { .. } => ("running", None),
            Life::Restarting { at } => (
                "restarting",
                Some(at.saturating_duration_since(now).as_millis() as u64),
            ),
            Life::GivenUp { .. } => ("given-up", None),
        };
        SlotSnap {
            life: life.to_string(),
            pid: self.pid(),
            restart_in_ms,
            worker_id: self.worker_id,
            worker: self.worker,
            started_ms: crate::pool::ago(now, self.started),
            failures: self.failures,
            restarts: self.restarts,
            retired: self.retired,
            proven: self.proven,
            spared: self.spared,
            proven_failures: self.proven_failures,
        }
    }

    pub fn restore(snap: SlotSnap, now: Instant) -> Slot {
        let life = match (snap.life.as_str(), snap.pid) {
            ("running", Some(pid)) => Life::Running { pid },
            ("restarting", _) => Life::Restarting {
                at: now + Duration::from_millis(snap.restart_in_ms.unwrap_or(0)),
            },
            ("given-up", pid) => Life::GivenUp { pid },
            _ => Life::Idle,
        };
        Slot {
            life,
            worker_id: snap.worker_id,
            worker: snap.worker,
            started: crate::pool::before(now, snap.started_ms),
            failures: snap.failures,
            restarts: snap.restarts,
            retired: snap.retired,
            proven: snap.proven,
            spared: snap.spared,
            proven_failures: snap.proven_failures,
        }
    }
}

/// What to do after a worker's process exited.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    Restart(Duration),
    GiveUp,
}

impl Slot {
    /// A slot for a worker about to be spawned.
    pub fn new(now: Instant) -> Slot {
        Slot {
            life: Life::Idle,
            worker_id: 0,
            worker: None,
            started: now,
            failures: 0,
            restarts: 0,
            retired: false,
            proven: false,
            spared: false,
            proven_failures: 0,
        }
    }

    /// A process was spawned for it: worker `id`, pid `pid`, connected as
    /// pool key `worker`.
    pub fn spawned(&mut self, pid: i32, id: u32, worker: usize, now: Instant) {
        self.life = Life::Running { pid };
        self.worker_id = id;
        self.worker = Some(worker);
        self.started = now;
        self.proven = false;
        self.spared = false;
    }

    pub fn life(&self) -> Life {
        self.life
    }

    /// The pid of its process while one runs (until it is reaped).
    pub fn pid(&self) -> Option<i32> {
        match self.life {
            Life::Running { pid } | Life::GivenUp { pid: Some(pid) } => Some(pid),
            _ => None,
        }
    }

    pub fn worker_id(&self) -> u32 {
        self.worker_id
    }

    /// Pool key of its worker's channel, while connected.
    pub fn worker(&self) -> Option<usize> {
        self.worker
    }

    /// Its worker's channel is gone (the process may still run).
    pub fn disconnected(&mut self) {
        self.worker = None;
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// Its process is about to be spawned again.
    pub fn note_restart(&mut self) {
        self.restarts += 1;
    }

    pub fn is_given_up(&self) -> bool {
        matches!(self.life, Life::GivenUp { .. })
    }

    /// Never restart it again (its process, if any, still has to exit).
    pub fn give_up(&mut self) {
        self.life = Life::GivenUp { pid: self.pid() };
    }

    pub fn is_retired(&self) -> bool {
        self.retired
    }

    /// Being removed: not restarted, whatever happens to its process.
    pub fn retire(&mut self) {
        self.retired = true;
        self.cancel_restart();
    }

    /// Its worker said HELLO and was given work (`served`): its exit is
    /// no crash loop.
    pub fn prove(&mut self, served: bool) {
        self.proven |= served;
    }

    /// Its process is stopped for want of resources on the acceptor's side.
    pub fn spare(&mut self) {
        self.spared = true;
    }

    /// Its process was reaped (or killed and waited for).
    pub fn reaped(&mut self) {
        self.life = match self.life {
            Life::GivenUp { .. } => Life::GivenUp { pid: None },
            Life::Running { .. } => Life::Idle,
            other => other,
        };
    }

    /// A planned restart is called off (shutdown, removal).
    pub fn cancel_restart(&mut self) {
        if let Life::Restarting { .. } = self.life {
            self.life = Life::Idle;
        }
    }

    /// When its next process is due, if one is planned.
    pub fn restart_at(&self) -> Option<Instant> {
        match self.life {
            Life::Restarting { at } => Some(at),
            _ => None,
        }
    }

    /// Plans its next process for `at` (a spawn that failed for want of
    /// resources is retried).
    pub fn retry_at(&mut self, at: Instant) {
        if !self.is_given_up() {
            self.life = Life::Restarting { at };
        }
    }

    /// Waiting for a restart (not connected, not given up, not retired).
    pub fn restarting(&self) -> bool {
        self.worker.is_none() && !self.is_given_up() && !self.retired
    }

    /// Applies the restart policy to an exit of this slot's process.
    ///
    /// * A process that proved itself (HELLO, then connections) is always
    ///   restarted: it is no crash loop, whoever killed it. At once if it ran
    ///   [`PROVEN_QUICK`] or longer (as nginx respawns: a pool killed into
    ///   one worker would put every client on the next victim); successive
    ///   exits sooner than that back off up to [`BACKOFF_PROVEN_MAX`].
    /// * A process stopped for want of resources is restarted and not
    ///   counted.
    /// * Otherwise (it never got as far as serving), exits within `window`
    ///   of the start count; past `max_restarts` in a row it is given up.
    ///
    /// A slot already given up stays so.
    pub fn exited(&mut self, now: Instant, window: Duration, max_restarts: u32) -> After {
        self.reaped();
        if self.is_given_up() {
            return After::GiveUp;
        }
        let quick = now.duration_since(self.started) < window;
        if std::mem::take(&mut self.spared) {
            self.proven = false;
            self.life = Life::Restarting {
                at: now + BACKOFF_START,
            };
            return After::Restart(BACKOFF_START);
        }
        if std::mem::take(&mut self.proven) {
            self.failures = 0;
            let ran = now.duration_since(self.started);
            self.proven_failures = if ran < PROVEN_QUICK {
                self.proven_failures + 1
            } else {
                0
            };
            let delay = match self.proven_failures {
                0 => Duration::ZERO,
                n => BACKOFF_START
                    .saturating_mul(1 << (n - 1).min(16))
                    .min(BACKOFF_PROVEN_MAX),
            };
            self.life = Life::Restarting { at: now + delay };
            return After::Restart(delay);
        }
        if !quick {
            self.failures = 0;
        }
        self.failures += 1;
        if self.failures > max_restarts {
            self.life = Life::GivenUp { pid: None };
            return After::GiveUp;
        }
        let delay = BACKOFF_START
            .saturating_mul(1 << (self.failures - 1).min(16))
            .min(BACKOFF_MAX);
        self.life = Life::Restarting { at: now + delay };
        After::Restart(delay)
    }
}

/// Makes `cmd`'s child start with no signal blocked: the acceptor blocks
/// the signals it reads from its signalfd, and a mask survives exec.
pub fn unblock_signals(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: runs in the child between fork and exec; sigprocmask with a
    // stack sigset is async-signal-safe and touches nothing shared.
    unsafe {
        cmd.pre_exec(|| {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// An fd a spawned worker inherits besides its channel.
#[derive(Debug, Clone, Copy)]
pub struct Inherit<'a> {
    /// The environment variable that tells the worker its number.
    pub env: &'static str,
    pub fd: BorrowedFd<'a>,
    /// Kept open through the sandbox (else the worker closes it before).
    pub keep: bool,
}

/// A worker process just spawned, and the acceptor's end of its channel.
#[derive(Debug)]
pub struct Spawned {
    pub pid: i32,
    pub chan: Channel,
}

/// Spawns one worker running `cmd`, with its end of a fresh channel
/// inherited as the fd named in `BATON_CHANNEL_FD`.
///
/// The child's end is made inheritable only for the duration of the spawn;
/// the acceptor is single-threaded, so no other spawn can inherit it. Every
/// other fd of the acceptor is close-on-exec. The signal mask is inherited
/// across fork and exec (std's `Command` does not reset it), so the child
/// unblocks every signal before its exec ([`unblock_signals`]): a worker
/// must get the SIGTERM the acceptor blocks for its own signalfd.
///
/// With a `profile`, the worker finds it in `BATON_SANDBOX` (with the
/// channel as its one kept fd) and confines itself before its HELLO.
///
/// `extra` fds are inherited too, each as a duplicate made inheritable for
/// the spawn and named by its environment variable: the pool's shared
/// memory file (`BATON_SHARED_FD`, which the worker maps and closes before
/// its sandbox, so not kept), a TLS worker's key channel and bundle (kept
/// through the sandbox).
pub fn spawn(
    cmd: &WorkerCommand,
    worker_id: u32,
    profile: Option<&Profile>,
    extra: &[Inherit<'_>],
) -> io::Result<Spawned> {
    let (ours, theirs) = Channel::pair()?;
    let theirs: OwnedFd = theirs.into();
    let raw = theirs.as_raw_fd();
    fcntl(raw, FcntlArg::F_SETFD(FdFlag::empty()))?;
    // Duplicates without close-on-exec; the originals stay the acceptor's.
    let mut dups: Vec<(&Inherit<'_>, OwnedFd)> = Vec::with_capacity(extra.len());
    for x in extra {
        let fd = x.fd.try_clone_to_owned()?;
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))?;
        dups.push((x, fd));
    }
    let mut command = Command::new(&cmd.program);
    command
        .args(&cmd.args)
        .env(CHANNEL_FD_ENV, raw.to_string())
        .env(WORKER_ID_ENV, worker_id.to_string())
        // This acceptor reads HELLO's flags (TLS).
        .env(baton_sdk::worker::HELLO_FLAGS_ENV, "1")
        .env_remove(SANDBOX_ENV)
        .env_remove(SHARED_FD_ENV)
        .env_remove(baton_tls::bundle::KEY_FD_ENV)
        .env_remove(baton_tls::bundle::BUNDLE_FD_ENV)
        // The service manager's socket is the acceptor's, not theirs.
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null());
    for (x, fd) in &dups {
        command.env(x.env, fd.as_raw_fd().to_string());
    }
    if let Some(p) = profile {
        let mut p = p.clone();
        p.keep_fds = vec![raw];
        p.keep_fds.extend(
            dups.iter()
                .filter(|(x, _)| x.keep)
                .map(|(_, fd)| fd.as_raw_fd()),
        );
        command.env(SANDBOX_ENV, p.to_env());
    }
    unblock_signals(&mut command);
    let child = command.spawn();
    // Closing our copy of their end either way: EOF on `ours` then means
    // the worker is gone.
    drop(theirs);
    drop(dups);
    let child = child?;
    // The Child handle is dropped without waiting: the event loop reaps
    // every child with waitpid(-1) on SIGCHLD.
    Ok(Spawned {
        pid: child.id() as i32,
        chan: ours,
    })
}

/// Whether a failed system call failed for want of resources (fds, memory,
/// processes) rather than because of what was asked: such a failure is
/// retried, never counted against a worker.
pub fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EAGAIN | libc::ENOBUFS)
    )
}

/// How a reaped process ended, for the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub pid: i32,
    pub code: Option<i32>,
    pub signal: Option<String>,
}

impl Exit {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
    /// The worker could not apply its sandbox: restarting would fail the
    /// same way.
    pub fn sandbox_failure(&self) -> bool {
        self.code == Some(i32::from(baton_sdk::EXIT_SANDBOX))
    }
    pub fn describe(&self) -> String {
        match (&self.code, &self.signal) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(s)) => format!("killed by {s}"),
            (None, None) => "unknown".to_string(),
        }
    }
}

/// Reaps every child that has exited, without blocking.
pub fn reap() -> Vec<Exit> {
    let mut out = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => out.push(Exit {
                pid: pid.as_raw(),
                code: Some(code),
                signal: None,
            }),
            Ok(WaitStatus::Signaled(pid, sig, _)) => out.push(Exit {
                pid: pid.as_raw(),
                code: None,
                signal: Some(sig.as_str().to_string()),
            }),
            Ok(WaitStatus::StillAlive) => break,
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            // ECHILD: no children left.
            Err(_) => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(started: Instant) -> Slot {
        Slot::new(started)
    }

    #[test]
    fn backoff_doubles_then_gives_up() {
        let now = Instant::now();
        let mut s = slot(now);
        let window = Duration::from_secs(10);
        assert_eq!(s.exited(now, window, 3), After::Restart(BACKOFF_START));
        assert_eq!(s.exited(now, window, 3), After::Restart(BACKOFF_START * 2));
        assert_eq!(s.exited(now, window, 3), After::Restart(BACKOFF_START * 4));
        assert_eq!(s.exited(now, window, 3), After::GiveUp);
        assert!(s.is_given_up());
    }

    #[test]
    fn a_worker_that_served_is_never_given_up() {
        let now = Instant::now();
        let mut s = slot(now);
        let window = Duration::from_secs(10);
        let mut delays = Vec::new();
        for _ in 0..20 {
            s.prove(true);
            match s.exited(now, window, 2) {
                After::Restart(d) => delays.push(d),
                After::GiveUp => panic!("a proven worker was given up"),
            }
        }
        assert_eq!(delays[0], BACKOFF_START);
        assert_eq!(delays[1], BACKOFF_START * 2);
        assert_eq!(*delays.last().unwrap(), BACKOFF_PROVEN_MAX, "capped");
        assert!(!s.is_given_up());
        // One that ran a while is restarted at once.
        s.prove(true);
        assert_eq!(
            s.exited(now + PROVEN_QUICK, window, 2),
            After::Restart(Duration::ZERO)
        );
        // A process that never proved itself still counts.
        assert_eq!(s.exited(now, window, 2), After::Restart(BACKOFF_START));
        assert_eq!(s.exited(now, window, 2), After::Restart(BACKOFF_START * 2));
        assert_eq!(s.exited(now, window, 2), After::GiveUp);
    }

    #[test]
    fn a_resource_failure_is_not_a_crash() {
        let now = Instant::now();
        let mut s = slot(now);
        for _ in 0..10 {
            s.spare();
            assert_eq!(
                s.exited(now, Duration::from_secs(10), 1),
                After::Restart(BACKOFF_START)
            );
        }
        assert_eq!(s.failures, 0);
    }

    #[test]
    fn a_long_run_resets_the_count() {
        let start = Instant::now();
        let mut s = slot(start);
        let window = Duration::from_secs(1);
        s.failures = 3;
        let later = start + Duration::from_secs(5);
        assert_eq!(s.exited(later, window, 3), After::Restart(BACKOFF_START));
    }
}
