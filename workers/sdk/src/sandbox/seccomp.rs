//! The `default` seccomp profile: an allowlist fitted to baton's bundled
//! workers, compiled with `seccompiler`.
//!
//! # What it allows
//!
//! What an event-driven (mio) HTTP server and a thread-per-connection echo
//! worker do on sockets they are handed, and nothing to make new ones:
//!
//! * I/O on open descriptors: `read`, `write`, `readv`, `writev`, `pread64`,
//!   `recvfrom`, `sendto`, `recvmsg`, `sendmsg` (the channel, with
//!   `SCM_RIGHTS`), `sendfile`, `lseek`, `close`, `shutdown`,
//!   `getsockopt`/`setsockopt`/`getsockname`/`getpeername`, `fcntl`, and
//!   `ioctl` only for `FIONBIO`, `FIOCLEX`, `FIONCLEX`, `FIONREAD`, `TCGETS`.
//! * Readiness: `epoll_create1`, `epoll_ctl`, `epoll_wait`, `epoll_pwait`,
//!   `epoll_pwait2`, `eventfd2` (mio's waker), `signalfd4` (SIGTERM as an
//!   event, for draining), `poll`, `ppoll`.
//! * Files, **read-only**: `open`/`openat` only without `O_WRONLY`,
//!   `O_RDWR`, `O_CREAT`, `O_TRUNC` or `O_TMPFILE`; `fstat`, `stat`,
//!   `lstat`, `newfstatat`, `statx`, `getdents64`, `readlink`,
//!   `readlinkat`, `getcwd`. No call that creates, renames or removes a file.
//! * Memory, never executable: `mmap` and `mprotect` only without
//!   `PROT_EXEC`, `munmap`, `mremap`, `madvise`, `brk`.
//! * Threads, not processes: `clone` only with `CLONE_THREAD` (and no
//!   `CLONE_NEW*` flag), `set_robust_list`, `rseq`, `futex`, `exit`,
//!   `sched_yield`, `sched_getaffinity`, `gettid`.
//! * Signals and time: `rt_sigaction`, `rt_sigprocmask`, `rt_sigreturn`,
//!   `sigaltstack`, `restart_syscall`, `tgkill` only to this process (what
//!   `abort()` does), `clock_gettime`, `clock_getres`, `clock_nanosleep`,
//!   `nanosleep`, `gettimeofday`, `getrandom`, `exit_group`.
//! * Reading its own state (what `baton audit` checks): `getpid`, `getuid`,
//!   `geteuid`, `getgid`, `getegid`, `getresuid`, `getresgid`, `getgroups`,
//!   `capget`, `getrlimit`, `prlimit64` only to read, and `prctl` only for
//!   `PR_GET_NO_NEW_PRIVS`, `PR_GET_SECCOMP`, `PR_CAPBSET_READ`,
//!   `PR_CAP_AMBIENT`+`IS_SET`, `PR_GET_DUMPABLE`, `PR_SET_NAME`,
//!   `PR_GET_NAME`.
//!
//! Not allowed, among others: `socket`, `connect`, `bind`, `listen`,
//! `accept`, `execve`, `fork`/`vfork`, `ptrace`, `mount`, `unshare`,
//! `setns`, `chroot`, every `set*id`, `kill`, `bpf`, `perf_event_open`,
//! `io_uring_*`, `keyctl`, `userfaultfd`, `getppid`.
//!
//! # The `proxy` profile
//!
//! `baton-proxy` connects to upstream servers, so its profile
//! ([`SeccompMode::Proxy`](super::SeccompMode::Proxy)) is the default
//! allowlist plus exactly what an outbound TCP relay needs:
//!
//! * `socket` only for `AF_INET` or `AF_INET6`, type `SOCK_STREAM` (with
//!   `SOCK_NONBLOCK` and `SOCK_CLOEXEC` allowed and no other bit), protocol
//!   `0` or `IPPROTO_TCP`: no raw, packet, netlink, UDP or Unix socket;
//! * `connect` (on those sockets: nothing else can be created);
//! * `pipe2` and `splice`, to move bytes between two sockets through a pipe
//!   without copying them to user space (`getsockopt`/`setsockopt` are in
//!   the default list already).
//!
//! Still refused: `bind`, `listen`, `accept`, `execve`, every write-mode
//! `open`, and everything else the default list leaves out. `baton audit
//! --seccomp proxy` checks that connect works and bind, raw and Unix
//! sockets do not.
//!
//! # The action: `EPERM`, not kill
//!
//! A call outside the list fails with `EPERM` and the worker goes on. The
//! call never reaches the kernel either way, so killing would not protect
//! more; but `EPERM` lets libraries that probe optional calls fall back
//! instead of crashing the worker into a restart loop, and lets `baton
//! audit` observe each refusal from inside and report it. (The refusal is
//! also visible from outside: a worker that needs a missing call logs the
//! error and the acceptor restarts it with backoff.)
//!
//! Two calls get `ENOSYS` instead, meaning "this kernel has no such call",
//! because their arguments sit in a struct the filter cannot inspect and
//! callers fall back on `ENOSYS` to a call the filter can check:
//! `clone3` (glibc then uses `clone`, whose flags are checked for
//! `CLONE_THREAD`) and `openat2` (callers then use `openat`, whose flags are
//! checked read-only). That is a second filter, installed first: it
//! allows everything but those two, and the allowlist (installed second)
//! lets those two through to it. The kernel runs every filter and keeps the
//! strongest verdict, and an errno beats "allow", so both get `ENOSYS`
//! whatever the order; this order also leaves the allowlist, which refuses
//! `prctl(PR_SET_NO_NEW_PRIVS)`, as the last thing installed.
//!
//! A system call made through another ABI (i386's `int 0x80` on x86_64)
//! kills the process: seccompiler checks the audit arch first. x32 calls
//! share x86_64's audit arch but not its numbers, so they get `EPERM`.
//!
//! # Architectures
//!
//! x86_64 is the supported target. Elsewhere the code compiles, and asking
//! for `seccomp=default` fails at start with a clear error (fail closed);
//! `seccomp=off` works.

// The rule builders serve the x86_64 allowlist only.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use std::collections::BTreeMap;

use super::SeccompMode;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("no default seccomp profile for the {0} architecture (use seccomp=off there)")]
    UnsupportedArch(&'static str),
    #[error("cannot compile the filter: {0}")]
    Compile(String),
    #[error("the kernel refused the filter: {0}")]
    Install(String),
}

/// One condition on an argument: `(arg index, width, op, value)`. An
/// argument the kernel reads as an `int` or `unsigned int` is compared on
/// its low 32 bits ([`d`]), as the kernel ignores the upper half; pointers
/// and `unsigned long`s in full ([`q`]).
type Cond = (u8, SeccompCmpArgLen, SeccompCmpOp, u64);

/// A condition on a 32-bit argument.
fn d(arg: u8, op: SeccompCmpOp, value: u64) -> Cond {
    (arg, SeccompCmpArgLen::Dword, op, value)
}

/// A condition on a 64-bit argument.
fn q(arg: u8, op: SeccompCmpOp, value: u64) -> Cond {
    (arg, SeccompCmpArgLen::Qword, op, value)
}

/// One allowed system call: its name (for docs and tests), its number, and
/// its rules: empty = always; else allowed when any rule's conditions all hold.
pub(crate) struct Allow {
    pub name: &'static str,
    pub nr: i64,
    pub rules: Vec<Vec<Cond>>,
}

fn any(name: &'static str, nr: libc::c_long) -> Allow {
    Allow {
        name,
        nr,
        rules: Vec::new(),
    }
}

fn when(name: &'static str, nr: libc::c_long, rules: Vec<Vec<Cond>>) -> Allow {
    Allow { name, nr, rules }
}

/// Allowed when argument `arg` is one of `values`.
fn one_of(name: &'static str, nr: libc::c_long, arg: u8, values: &[u64]) -> Allow {
    when(
        name,
        nr,
        values
            .iter()
            .map(|v| vec![d(arg, SeccompCmpOp::Eq, *v)])
            .collect(),
    )
}

/// Allowed when none of `mask`'s bits is set in argument `arg`.
fn none_of(name: &'static str, nr: libc::c_long, arg: u8, mask: u64) -> Allow {
    when(
        name,
        nr,
        vec![vec![d(arg, SeccompCmpOp::MaskedEq(mask), 0)]],
    )
}

/// Flags that make `open`/`openat` more than a read.
const OPEN_WRITE_FLAGS: u64 = (libc::O_WRONLY
    | libc::O_RDWR
    | libc::O_CREAT
    | libc::O_TRUNC
    | (libc::O_TMPFILE & !libc::O_DIRECTORY)) as u64;

/// `CLONE_NEW*` flags and others that have no business in a thread.
const CLONE_FORBIDDEN: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_UNTRACED
    | libc::CLONE_VFORK) as u64;

/// The allowlist for x86_64. `pid` is this process's id, the only target
/// `tgkill` may aim at.
#[cfg(target_arch = "x86_64")]
// The `as u64` casts are identities with glibc on x86_64, but the libc
// types of these constants differ between targets and C libraries.
#[allow(clippy::unnecessary_cast)]
pub(crate) fn allowlist(pid: u32) -> Result<Vec<Allow>, SeccompError> {
    use libc::*;
    let thread = CLONE_THREAD as u64;
    Ok(vec![
        // I/O on open descriptors
        any("read", SYS_read),
        any("write", SYS_write),
        any("readv", SYS_readv),
        any("writev", SYS_writev),
        any("pread64", SYS_pread64),
        any("recvfrom", SYS_recvfrom),
        any("sendto", SYS_sendto),
        any("recvmsg", SYS_recvmsg),
        any("sendmsg", SYS_sendmsg),
        any("sendfile", SYS_sendfile),
        any("lseek", SYS_lseek),
        any("close", SYS_close),
        any("shutdown", SYS_shutdown),
        any("getsockopt", SYS_getsockopt),
        any("setsockopt", SYS_setsockopt),
        any("getsockname", SYS_getsockname),
        any("getpeername", SYS_getpeername),
        any("fcntl", SYS_fcntl),
        one_of(
            "ioctl",
            SYS_ioctl,
            1,
            &[
                FIONBIO as u64,
                FIOCLEX as u64,
                FIONCLEX as u64,
                FIONREAD as u64,
                TCGETS as u64,
            ],
        ),
        // readiness
        any("epoll_create1", SYS_epoll_create1),
        any("epoll_ctl", SYS_epoll_ctl),
        any("epoll_wait", SYS_epoll_wait),
        any("epoll_pwait", SYS_epoll_pwait),
        any("epoll_pwait2", SYS_epoll_pwait2),
        any("eventfd2", SYS_eventfd2),
        any("signalfd4", SYS_signalfd4),
        any("poll", SYS_poll),
        any("ppoll", SYS_ppoll),
        // files, read-only
        none_of("open", SYS_open, 1, OPEN_WRITE_FLAGS),
        none_of("openat", SYS_openat, 2, OPEN_WRITE_FLAGS),
        any("fstat", SYS_fstat),
        any("stat", SYS_stat),
        any("lstat", SYS_lstat),
        any("newfstatat", SYS_newfstatat),
        any("statx", SYS_statx),
        any("getdents64", SYS_getdents64),
        any("readlink", SYS_readlink),
        any("readlinkat", SYS_readlinkat),
        any("getcwd", SYS_getcwd),
        // memory, never executable
        none_of("mmap", SYS_mmap, 2, PROT_EXEC as u64),
        none_of("mprotect", SYS_mprotect, 2, PROT_EXEC as u64),
        any("munmap", SYS_munmap),
        any("mremap", SYS_mremap),
        any("madvise", SYS_madvise),
        any("brk", SYS_brk),
        // threads, not processes
        when(
            "clone",
            SYS_clone,
            vec![vec![d(
                0,
                SeccompCmpOp::MaskedEq(thread | CLONE_FORBIDDEN),
                thread,
            )]],
        ),
        any("set_robust_list", SYS_set_robust_list),
        any("rseq", SYS_rseq),
        any("futex", SYS_futex),
        any("exit", SYS_exit),
        any("exit_group", SYS_exit_group),
        any("sched_yield", SYS_sched_yield),
        any("sched_getaffinity", SYS_sched_getaffinity),
        any("gettid", SYS_gettid),
        // signals and time
        any("rt_sigaction", SYS_rt_sigaction),
        any("rt_sigprocmask", SYS_rt_sigprocmask),
        any("rt_sigreturn", SYS_rt_sigreturn),
        any("sigaltstack", SYS_sigaltstack),
        any("restart_syscall", SYS_restart_syscall),
        one_of("tgkill", SYS_tgkill, 0, &[u64::from(pid)]),
        any("clock_gettime", SYS_clock_gettime),
        any("clock_getres", SYS_clock_getres),
        any("clock_nanosleep", SYS_clock_nanosleep),
        any("nanosleep", SYS_nanosleep),
        any("gettimeofday", SYS_gettimeofday),
        any("getrandom", SYS_getrandom),
        // reading its own state
        any("getpid", SYS_getpid),
        any("getuid", SYS_getuid),
        any("geteuid", SYS_geteuid),
        any("getgid", SYS_getgid),
        any("getegid", SYS_getegid),
        any("getresuid", SYS_getresuid),
        any("getresgid", SYS_getresgid),
        any("getgroups", SYS_getgroups),
        any("capget", SYS_capget),
        any("getrlimit", SYS_getrlimit),
        // prlimit64(0, resource, NULL, old): read our own limits only.
        when(
            "prlimit64",
            SYS_prlimit64,
            vec![vec![d(0, SeccompCmpOp::Eq, 0), q(2, SeccompCmpOp::Eq, 0)]],
        ),
        when(
            "prctl",
            SYS_prctl,
            [
                PR_GET_NO_NEW_PRIVS,
                PR_GET_SECCOMP,
                PR_CAPBSET_READ,
                PR_GET_DUMPABLE,
                PR_SET_NAME,
                PR_GET_NAME,
            ]
            .iter()
            .map(|op| vec![d(0, SeccompCmpOp::Eq, *op as u64)])
            .chain(std::iter::once(vec![
                d(0, SeccompCmpOp::Eq, PR_CAP_AMBIENT as u64),
                q(1, SeccompCmpOp::Eq, PR_CAP_AMBIENT_IS_SET as u64),
            ]))
            .collect(),
        ),
    ])
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn allowlist(_pid: u32) -> Result<Vec<Allow>, SeccompError> {
    Err(SeccompError::UnsupportedArch(std::env::consts::ARCH))
}

/// What the `proxy` profile adds to [`allowlist`]: outbound TCP sockets and
/// the calls to relay between two of them (see the [module docs](self)).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::unnecessary_cast)]
pub(crate) fn proxy_extra() -> Vec<Allow> {
    use libc::*;
    // Every bit of the type argument but these two flags must be
    // SOCK_STREAM exactly.
    let type_mask = u64::from(!((SOCK_NONBLOCK | SOCK_CLOEXEC) as u32));
    let mut socket_rules = Vec::new();
    for family in [AF_INET, AF_INET6] {
        for proto in [0, IPPROTO_TCP] {
            socket_rules.push(vec![
                d(0, SeccompCmpOp::Eq, family as u64),
                d(1, SeccompCmpOp::MaskedEq(type_mask), SOCK_STREAM as u64),
                d(2, SeccompCmpOp::Eq, proto as u64),
            ]);
        }
    }
    vec![
        when("socket", SYS_socket, socket_rules),
        any("connect", SYS_connect),
        any("pipe2", SYS_pipe2),
        any("splice", SYS_splice),
    ]
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn proxy_extra() -> Vec<Allow> {
    Vec::new()
}

/// The allowlist of a filtering mode (`off` has none).
fn allowlist_for(mode: SeccompMode, pid: u32) -> Result<Vec<Allow>, SeccompError> {
    let mut list = allowlist(pid)?;
    if mode == SeccompMode::Proxy {
        list.extend(proxy_extra());
    }
    Ok(list)
}

/// The calls that answer `ENOSYS` so that callers fall back to a call the
/// allowlist can inspect.
#[cfg(target_arch = "x86_64")]
fn enosys_list() -> Vec<(&'static str, i64)> {
    vec![("clone3", libc::SYS_clone3), ("openat2", libc::SYS_openat2)]
}

#[cfg(not(target_arch = "x86_64"))]
fn enosys_list() -> Vec<(&'static str, i64)> {
    Vec::new()
}

fn to_rules(list: Vec<Allow>) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let c = |e: seccompiler::BackendError| SeccompError::Compile(e.to_string());
    let mut map = BTreeMap::new();
    for a in list {
        let mut rules = Vec::new();
        for conds in a.rules {
            let mut v = Vec::new();
            for (arg, len, op, value) in conds {
                v.push(SeccompCondition::new(arg, len, op, value).map_err(c)?);
            }
            rules.push(SeccompRule::new(v).map_err(c)?);
        }
        if map.insert(a.nr, rules).is_some() {
            return Err(SeccompError::Compile(format!(
                "{} listed twice in the allowlist",
                a.name
            )));
        }
    }
    Ok(map)
}

fn target() -> Result<seccompiler::TargetArch, SeccompError> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|_| SeccompError::UnsupportedArch(std::env::consts::ARCH))
}

/// The two BPF programs of the default profile, in installation order:
/// the `ENOSYS` list (everything else allowed), then the allowlist
/// (`EPERM` for the rest; the `ENOSYS` calls pass through it to the first).
pub(crate) fn compile_default(pid: u32) -> Result<Vec<BpfProgram>, SeccompError> {
    compile(SeccompMode::Default, pid)
}

/// The two BPF programs of a filtering `mode`, as [`compile_default`].
pub(crate) fn compile(mode: SeccompMode, pid: u32) -> Result<Vec<BpfProgram>, SeccompError> {
    let arch = target()?;
    let c = |e: seccompiler::BackendError| SeccompError::Compile(e.to_string());
    let mut list = allowlist_for(mode, pid)?;
    list.extend(enosys_list().into_iter().map(|(name, nr)| any(name, nr)));
    let allow = SeccompFilter::new(
        to_rules(list)?,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        arch,
    )
    .map_err(c)?;
    let enosys = SeccompFilter::new(
        enosys_list()
            .into_iter()
            .map(|(_, nr)| (nr, Vec::new()))
            .collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(c)?;
    Ok(vec![
        enosys.try_into().map_err(c)?,
        allow.try_into().map_err(c)?,
    ])
}

/// Compiles and installs the filter of a filtering `mode` on the calling
/// thread (the process is single-threaded when `apply` runs, and threads
/// started later inherit the filter). Sets no_new_privs (seccompiler does,
/// before each filter; `apply` already has).
pub(crate) fn install(mode: SeccompMode) -> Result<(), SeccompError> {
    let progs = compile(mode, std::process::id())?;
    for p in &progs {
        seccompiler::apply_filter(p).map_err(|e| SeccompError::Install(e.to_string()))?;
    }
    Ok(())
}

/// Builds the default filter for this architecture without installing it:
/// lets a supervisor find out at start-up that the profile cannot load here.
pub fn check_default() -> Result<(), SeccompError> {
    compile_default(std::process::id()).map(|_| ())
}

/// Builds the filter of `mode` without installing it, as [`check_default`]
/// (`off` always succeeds).
pub fn check(mode: SeccompMode) -> Result<(), SeccompError> {
    if !mode.filtered() {
        return Ok(());
    }
    compile(mode, std::process::id()).map(|_| ())
}

/// The names of the system calls the `proxy` profile allows beyond the
/// default ones (some only with the conditions in the [module docs](self)).
pub fn proxy_additions() -> Vec<&'static str> {
    proxy_extra().into_iter().map(|a| a.name).collect()
}

/// The names of the system calls the default profile allows (some only
/// with the argument conditions in the [module docs](self)), for
/// documentation and audits. Empty on unsupported architectures.
pub fn default_allowlist() -> Vec<&'static str> {
    allowlist(0)
        .map(|l| l.into_iter().map(|a| a.name).collect())
        .unwrap_or_default()
}

/// The calls the default profile answers with `ENOSYS`.
pub fn default_enosys() -> Vec<&'static str> {
    enosys_list().into_iter().map(|(n, _)| n).collect()
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn compiles() {
        let progs = compile_default(std::process::id()).unwrap();
        assert_eq!(progs.len(), 2);
        assert!(progs.iter().all(|p| !p.is_empty() && p.len() < 4096));
    }

    /// Calls no profile allows (the default one refuses `socket` and
    /// `connect` too).
    const NEVER: &[&str] = &[
        "bind",
        "listen",
        "accept",
        "accept4",
        "execve",
        "execveat",
        "fork",
        "vfork",
        "clone3",
        "ptrace",
        "mount",
        "umount2",
        "pivot_root",
        "unshare",
        "setns",
        "chroot",
        "setuid",
        "setgid",
        "setresuid",
        "setresgid",
        "setgroups",
        "capset",
        "kill",
        "bpf",
        "perf_event_open",
        "io_uring_setup",
        "keyctl",
        "userfaultfd",
        "init_module",
        "finit_module",
        "kexec_load",
        "reboot",
        "getppid",
        "openat2",
        "unlink",
        "unlinkat",
        "rename",
        "mkdir",
        "chmod",
        "chown",
        "creat",
        "memfd_create",
        "process_vm_writev",
        "pidfd_open",
        "seccomp",
    ];

    #[test]
    fn dangerous_calls_are_not_allowed() {
        let allowed = default_allowlist();
        for bad in NEVER.iter().chain(&["socket", "connect"]) {
            assert!(!allowed.contains(bad), "{bad} must not be allowed");
        }
        // Every name is unique (to_rules would refuse duplicates too).
        let mut sorted = allowed.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), allowed.len());
        assert_eq!(default_enosys(), vec!["clone3", "openat2"]);
    }

    #[test]
    fn the_proxy_profile_adds_outbound_tcp_only() {
        let progs = compile(SeccompMode::Proxy, std::process::id()).unwrap();
        assert_eq!(progs.len(), 2);
        assert!(progs.iter().all(|p| !p.is_empty() && p.len() < 4096));
        assert_eq!(
            proxy_additions(),
            vec!["socket", "connect", "pipe2", "splice"]
        );
        let all: Vec<&str> = allowlist_for(SeccompMode::Proxy, 0)
            .unwrap()
            .into_iter()
            .map(|a| a.name)
            .collect();
        for bad in NEVER.iter().chain(&["socketpair"]) {
            assert!(!all.contains(bad), "{bad} must not be allowed");
        }
        // The socket rule names the families and the type: nothing
        // unconditional.
        let socket = proxy_extra()
            .into_iter()
            .find(|a| a.name == "socket")
            .unwrap();
        assert_eq!(socket.rules.len(), 4);
        assert!(check(SeccompMode::Proxy).is_ok());
        assert!(check(SeccompMode::Off).is_ok());
    }
}
