//! The key process's seccomp filter: narrower than the workers' default.
//!
//! baton-sdk's `default` allowlist fits workers that serve files, so it
//! allows read-only `open`. The key process must open nothing once its
//! keys are loaded, so [`keyd::confine`](crate::keyd::confine) applies the
//! SDK sandbox with its filter off, then installs this one, which allows
//! only what serving signatures takes:
//!
//! * its channels: `recvmsg`, `sendmsg`, `poll`/`ppoll`, `getsockopt`
//!   (checking an `ADD_PEER` fd is a SEQPACKET socket), `close`;
//! * `write` (its stderr log lines), `getrandom` (ECDSA nonces, RSA
//!   blinding);
//! * memory, never executable: `mmap`/`mprotect` without `PROT_EXEC`,
//!   `munmap`, `mremap`, `brk`, `madvise`;
//! * `futex`, `clock_gettime`, `sched_yield`, signal returns and masks,
//!   `sigaltstack`, `restart_syscall`, `exit`, `exit_group`; `getpid`,
//!   `gettid` and `tgkill` only to itself (what `abort()` does).
//!
//! No `open`/`openat` at all, no `socket`, `connect`, `execve`, `fork`,
//! `clone`, `ptrace`, `prctl`. A refused call fails with `EPERM` (as in
//! the SDK's filter, so a library probing an optional call falls back);
//! a call through another ABI kills the process. x86_64 only: elsewhere
//! [`install`] returns an error and `confine` falls back to the SDK's
//! `default` filter, which it says in a note.

use std::collections::BTreeMap;

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

/// Why the filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("no key process seccomp filter for the {0} architecture")]
    UnsupportedArch(&'static str),
    #[error("cannot compile the key process filter: {0}")]
    Compile(String),
    #[error("the kernel refused the key process filter: {0}")]
    Install(String),
}

/// The names of the allowed calls (for docs, tests and logs).
pub fn allowed_names() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        rules(0).into_iter().map(|(name, _, _)| name).collect()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Vec::new()
    }
}

type Rule = (&'static str, i64, Vec<SeccompRule>);

#[cfg(target_arch = "x86_64")]
#[allow(clippy::unnecessary_cast)]
fn rules(pid: u32) -> Vec<Rule> {
    use libc::*;
    let cond = |arg: u8, op: SeccompCmpOp, v: u64| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, v)
            .map_err(|e| e.to_string())
            .and_then(|c| SeccompRule::new(vec![c]).map_err(|e| e.to_string()))
    };
    let no_exec = |arg: u8| {
        cond(arg, SeccompCmpOp::MaskedEq(PROT_EXEC as u64), 0)
            .map(|r| vec![r])
            .unwrap_or_default()
    };
    let this = |arg: u8| {
        cond(arg, SeccompCmpOp::Eq, u64::from(pid))
            .map(|r| vec![r])
            .unwrap_or_default()
    };
    let any = Vec::new;
    vec![
        ("recvmsg", SYS_recvmsg, any()),
        ("sendmsg", SYS_sendmsg, any()),
        ("poll", SYS_poll, any()),
        ("ppoll", SYS_ppoll, any()),
        ("getsockopt", SYS_getsockopt, any()),
        ("close", SYS_close, any()),
        ("write", SYS_write, any()),
        ("getrandom", SYS_getrandom, any()),
        ("mmap", SYS_mmap, no_exec(2)),
        ("mprotect", SYS_mprotect, no_exec(2)),
        ("munmap", SYS_munmap, any()),
        ("mremap", SYS_mremap, any()),
        ("brk", SYS_brk, any()),
        ("madvise", SYS_madvise, any()),
        ("futex", SYS_futex, any()),
        ("clock_gettime", SYS_clock_gettime, any()),
        ("sched_yield", SYS_sched_yield, any()),
        ("rt_sigreturn", SYS_rt_sigreturn, any()),
        ("rt_sigprocmask", SYS_rt_sigprocmask, any()),
        ("sigaltstack", SYS_sigaltstack, any()),
        ("restart_syscall", SYS_restart_syscall, any()),
        ("exit", SYS_exit, any()),
        ("exit_group", SYS_exit_group, any()),
        ("getpid", SYS_getpid, any()),
        ("gettid", SYS_gettid, any()),
        ("tgkill", SYS_tgkill, this(0)),
    ]
}

/// Installs the filter on the calling thread. Needs no_new_privs (the SDK
/// sandbox sets it) or `CAP_SYS_ADMIN`.
pub fn install() -> Result<(), FilterError> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for (name, nr, rules) in rules(std::process::id()) {
            // A conditional call whose condition could not be built is left
            // out (refused), never allowed without it.
            let conditional = matches!(name, "mmap" | "mprotect" | "tgkill");
            if conditional && rules.is_empty() {
                continue;
            }
            map.insert(nr, rules);
        }
        let filter = SeccompFilter::new(
            map,
            SeccompAction::Errno(libc::EPERM as u32),
            SeccompAction::Allow,
            seccompiler::TargetArch::x86_64,
        )
        .map_err(|e| FilterError::Compile(e.to_string()))?;
        let prog: seccompiler::BpfProgram = filter
            .try_into()
            .map_err(|e: seccompiler::BackendError| FilterError::Compile(e.to_string()))?;
        seccompiler::apply_filter(&prog).map_err(|e| FilterError::Install(e.to_string()))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Err(FilterError::UnsupportedArch(std::env::consts::ARCH))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn no_file_calls_are_allowed() {
        let names = super::allowed_names();
        for bad in [
            "open", "openat", "openat2", "socket", "connect", "execve", "clone", "prctl",
        ] {
            assert!(!names.contains(&bad), "{bad} is allowed");
        }
        assert!(names.contains(&"recvmsg") && names.contains(&"getrandom"));
    }
}
