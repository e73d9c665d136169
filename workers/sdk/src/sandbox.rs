//! The worker sandbox: a declarative [`Profile`], [`apply`] to confine the
//! calling worker, [`verify()`] to check a worker from outside, and the
//! [`audit`] probe that proves it from inside.
//!
//! # Where and when
//!
//! The acceptor resolves `--user`/`--group` to numbers (before any chroot,
//! while it can still read `/etc/passwd`), encodes the pool's [`Profile`]
//! in the environment variable [`SANDBOX_ENV`] and spawns the worker. The
//! worker applies it to itself right after exec, as the very first thing,
//! before it says HELLO and before it reads a byte of input: the way
//! OpenBSD's relayd and httpd confine their children. Applying after exec,
//! rather than between fork and exec, keeps the worker's binary and
//! libraries out of the jail, and the window before confinement is only the
//! dynamic loader and Rust's runtime start, neither of which reads input.
//! The acceptor then checks the worker from outside with [`verify()`] when it
//! says HELLO, before WELCOME and any connection.
//!
//! ```no_run
//! // First thing in a worker's main():
//! if let Some(applied) = baton_sdk::sandbox::apply_from_env()? {
//!     for note in &applied.notes {
//!         eprintln!("sandbox: {note}");
//!     }
//! }
//! # Ok::<(), baton_sdk::sandbox::SandboxError>(())
//! ```
//!
//! # Rules for the caller
//!
//! * Apply before anything else: before a thread starts (checked: a
//!   process with more than one thread is refused) and before the worker
//!   opens any file, socket, signalfd or directory. Step 1 closes every fd
//!   not listed in `keep_fds`, so an fd opened earlier would be closed under
//!   the feet of the Rust object owning it; and a directory opened before
//!   the chroot would be a way out of it. Open files after, inside the jail.
//! * `keep_fds` must list the inherited channel (the fd in
//!   `BATON_CHANNEL_FD`), or it is closed and the handshake fails.
//! * The acceptor verifies with [`verify()`] on HELLO; see its docs for the
//!   capabilities that takes.
//!
//! # The steps, in order
//!
//! [`apply`] follows the order of the best privilege-separated daemons. Each
//! step fails closed with a [`SandboxError`] naming it ([`Step`]); the
//! process must then exit without serving anything.
//!
//! 0. **preflight**: the profile is valid; the process has a single thread
//!    (credentials, capabilities and the filter are per thread at the
//!    system-call level, so confining one thread of several would leave the
//!    others free); started as root, the profile must name a non-root uid
//!    and gid unless `allow_root`.
//! 1. **close-fds**: every descriptor but stdio and `keep_fds` is closed
//!    (`close_range`, or `/proc/self/fd` on kernels before 5.9). A kept fd
//!    that is not open is an error.
//! 2. **nofile**: `RLIMIT_NOFILE` is raised. This is done here, before the
//!    drop, rather than with the other limits, because raising the hard
//!    limit needs `CAP_SYS_RESOURCE`, gone after step 6. When even that is
//!    refused, the soft limit goes up to the hard one and a note says so.
//! 3. **unshare**: namespaces (see [`Unshare`]; `pid` only affects
//!    children). The mount namespace's propagation is made private.
//! 4. **chroot**: `chroot(dir)` then `chdir("/")`.
//! 5. **bounding**: every capability is dropped from the bounding set
//!    (`PR_CAPBSET_DROP` until the kernel says there are no more, so
//!    capabilities newer than this code are dropped too), securebits are
//!    locked (`NOROOT`, `KEEP_CAPS` off, no ambient raise) and the ambient
//!    set is cleared. This must precede the uid change: it needs
//!    `CAP_SETPCAP`, which the uid change takes away.
//! 6. **groups**, **gid**, **uid**: `setgroups([gid])`, `setresgid`,
//!    `setresuid`, in that order.
//! 7. **verify-drop**: like OpenSSH's `permanently_set_uid()`: the real,
//!    effective and saved ids must be the new ones only, the groups exactly
//!    `[gid]`, and `setuid(0)` and `setgid(0)` must fail, else abort.
//! 8. **caps**: effective, permitted and inheritable sets are emptied and
//!    all five sets are read back: they must be empty (the bounding set
//!    only where it could be emptied, see below).
//! 9. **no-new-privs**: `PR_SET_NO_NEW_PRIVS`, read back.
//! 10. **rlimits**: `RLIMIT_CORE` 0 (`core0`), `RLIMIT_NPROC` 0
//!     (`no_fork`; the kernel counts threads here too).
//! 11. **seccomp**: the allowlist last (see [`seccomp`]), mode read back.
//!
//! # Started without privileges
//!
//! A worker started as an ordinary user keeps its ids; a `uid`/`gid` equal
//! to the current ones is a no-op, any other is an error, as are a chroot
//! and namespaces (they need root). It cannot empty its bounding set nor
//! drop supplementary groups (a note says so), but it still closes fds,
//! clears every other capability set, sets no_new_privs (which makes the
//! bounding set moot: execve can no longer grant anything) and installs the
//! filter.

pub mod audit;
pub mod profile;
pub mod seccomp;
mod sys;
pub mod verify;

pub use profile::{Profile, ProfileError, SeccompMode, Unshare, PROFILE_VERSION, SANDBOX_ENV};
pub use seccomp::SeccompError;
pub use verify::{describe, verify, Mismatch, ProcStatus, StatusError};

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::sys::resource::Resource;

/// The steps of [`apply`], named in errors and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Profile,
    Preflight,
    CloseFds,
    Nofile,
    Unshare,
    Chroot,
    Bounding,
    Groups,
    Gid,
    Uid,
    VerifyDrop,
    Caps,
    NoNewPrivs,
    Rlimits,
    Seccomp,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Profile => "profile",
            Step::Preflight => "preflight",
            Step::CloseFds => "close-fds",
            Step::Nofile => "nofile",
            Step::Unshare => "unshare",
            Step::Chroot => "chroot",
            Step::Bounding => "bounding",
            Step::Groups => "groups",
            Step::Gid => "gid",
            Step::Uid => "uid",
            Step::VerifyDrop => "verify-drop",
            Step::Caps => "caps",
            Step::NoNewPrivs => "no-new-privs",
            Step::Rlimits => "rlimits",
            Step::Seccomp => "seccomp",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the sandbox could not be applied. Every variant names its [`Step`];
/// the worker must not start.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The profile in [`SANDBOX_ENV`] is malformed.
    #[error("sandbox step `profile`: {SANDBOX_ENV}: {0}")]
    Profile(#[from] ProfileError),
    /// The profile would run the worker as root and does not allow it.
    #[error("sandbox step `preflight`: refusing to run a worker as root: {0} (set allow_root to permit it)")]
    Root(String),
    /// A system call failed.
    #[error("sandbox step `{step}`: {call} failed: {errno}")]
    Os {
        step: Step,
        call: String,
        #[source]
        errno: Errno,
    },
    /// The profile asks for something this process lacks the privilege for.
    #[error("sandbox step `{step}`: {what} needs root (the process runs as uid {euid} without the capability)")]
    NeedsPrivilege { step: Step, what: String, euid: u32 },
    /// A step ran but its result is not what it must be (for example
    /// `setuid(0)` succeeded after the drop).
    #[error("sandbox step `{step}`: {detail}")]
    Check { step: Step, detail: String },
    /// The seccomp filter could not be built or installed.
    #[error("sandbox step `seccomp`: {0}")]
    Seccomp(#[from] SeccompError),
}

impl SandboxError {
    /// The step that failed.
    pub fn step(&self) -> Step {
        match self {
            SandboxError::Profile(_) => Step::Profile,
            SandboxError::Root(_) => Step::Preflight,
            SandboxError::Os { step, .. }
            | SandboxError::NeedsPrivilege { step, .. }
            | SandboxError::Check { step, .. } => *step,
            SandboxError::Seccomp(_) => Step::Seccomp,
        }
    }
}

fn os(step: Step, call: impl Into<String>) -> impl FnOnce(Errno) -> SandboxError {
    let call = call.into();
    move |errno| SandboxError::Os { step, call, errno }
}

fn check(step: Step, detail: impl Into<String>) -> SandboxError {
    SandboxError::Check {
        step,
        detail: detail.into(),
    }
}

/// What [`apply`] did: the resulting state, and notes on anything it
/// skipped and why (log them).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Applied {
    /// Started as root (effective uid 0).
    pub started_as_root: bool,
    /// The ids the worker now runs under.
    pub uid: u32,
    pub gid: u32,
    /// The chroot in force, if any.
    pub chroot: Option<PathBuf>,
    pub unshared: Unshare,
    /// The bounding set was emptied.
    pub bounding_dropped: bool,
    /// The `RLIMIT_NOFILE` soft limit in force, when the profile raised it.
    pub nofile: Option<u64>,
    /// A seccomp filter was installed.
    pub seccomp: bool,
    /// Things skipped for lack of privilege, or adjusted.
    pub notes: Vec<String>,
}

/// What the audit probe needs to know about the apply that ran in this
/// process: the result, and identities of the roots around the chroot.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub applied: Applied,
    /// `(dev, ino)` of the root before the chroot (the host's root).
    pub outside_root: Option<(u64, u64)>,
    /// `(dev, ino)` of the jail directory, seen before the chroot.
    pub jail: Option<(u64, u64)>,
}

static RECORD: OnceLock<Record> = OnceLock::new();

pub(crate) fn record() -> Option<&'static Record> {
    RECORD.get()
}

/// Reads the profile from [`SANDBOX_ENV`] and applies it. `Ok(None)` when
/// the variable is not set (a worker started by hand, unsandboxed).
///
/// Call it first thing in `main`, before any thread starts or any file is
/// opened; [`Worker::from_env`](crate::Worker::from_env) is the usual caller.
///
/// Applying is once per process: when this process already applied a
/// sandbox (a worker that confines itself, then calls
/// [`Worker::from_env`](crate::Worker::from_env)), it returns `Ok(None)`.
pub fn apply_from_env() -> Result<Option<Applied>, SandboxError> {
    if RECORD.get().is_some() {
        return Ok(None);
    }
    match Profile::from_env()? {
        Some(p) => apply(&p).map(Some),
        None => Ok(None),
    }
}

/// Confines the calling process as `profile` says, in the documented order
/// (see the [module docs](self)). Everything or nothing: on error the
/// process is partly confined and must exit.
///
/// Must run while the process is single-threaded (checked) and before it
/// opens anything it means to keep: descriptors not in `keep_fds` are
/// closed, and a Rust object owning one would be left dangling.
pub fn apply(profile: &Profile) -> Result<Applied, SandboxError> {
    profile.validate()?;
    let mut a = Applied::default();

    // 0. preflight
    let st = ProcStatus::read(0).map_err(|e| {
        check(
            Step::Preflight,
            format!("cannot count threads: {e} (is /proc mounted?)"),
        )
    })?;
    if st.threads != Some(1) {
        let n = st
            .threads
            .map_or_else(|| "an unknown number of".to_string(), |n| n.to_string());
        return Err(check(
            Step::Preflight,
            format!("the process has {n} threads; apply the sandbox before any thread starts"),
        ));
    }
    let (ruid, euid, suid) = sys::getresuid();
    let (rgid, egid, sgid) = sys::getresgid();
    let caps = sys::capget().map_err(os(Step::Preflight, "capget"))?;
    let has = |cap: u32| caps.effective & (1u64 << cap) != 0;
    a.started_as_root = euid == 0;
    let any_root = ruid == 0 || euid == 0 || suid == 0;
    if !profile.allow_root {
        match (profile.uid, profile.gid) {
            (Some(0), _) => return Err(SandboxError::Root("the profile's uid is 0".into())),
            (_, Some(0)) if any_root => {
                return Err(SandboxError::Root("the profile's gid is 0".into()))
            }
            (None, _) if any_root => {
                return Err(SandboxError::Root(format!(
                    "started as uid {ruid}/{euid}/{suid} and the profile names no uid"
                )))
            }
            (Some(_), None) if any_root => {
                return Err(SandboxError::Root(
                    "started as root and the profile names no gid: the worker would keep group 0"
                        .into(),
                ))
            }
            _ => {}
        }
    }

    // 1. close-fds
    for fd in &profile.keep_fds {
        if !sys::fd_is_open(*fd) {
            return Err(check(
                Step::CloseFds,
                format!("fd {fd} is listed in keep_fds but is not open"),
            ));
        }
    }
    sys::close_fds_except(&profile.keep_fds).map_err(os(Step::CloseFds, "close_range"))?;

    // 2. nofile (before the drop: raising the hard limit needs CAP_SYS_RESOURCE)
    if let Some(want) = profile.nofile {
        a.nofile = Some(raise_nofile(want, &mut a.notes)?);
    }

    // 3. unshare
    if !profile.unshare.is_empty() {
        if !has(sys::CAP_SYS_ADMIN) {
            return Err(SandboxError::NeedsPrivilege {
                step: Step::Unshare,
                what: format!("unshare({})", profile.unshare),
                euid,
            });
        }
        sys::unshare(profile.unshare.clone_flags())
            .map_err(os(Step::Unshare, format!("unshare({})", profile.unshare)))?;
        if profile.unshare.mount {
            sys::make_mounts_private()
                .map_err(os(Step::Unshare, "mount(\"/\", MS_REC|MS_PRIVATE)"))?;
        }
        a.unshared = profile.unshare;
    }

    // 4. chroot
    let mut outside_root = None;
    let mut jail = None;
    if let Some(dir) = &profile.chroot {
        if !has(sys::CAP_SYS_CHROOT) {
            return Err(SandboxError::NeedsPrivilege {
                step: Step::Chroot,
                what: format!("chroot to {}", dir.display()),
                euid,
            });
        }
        outside_root = sys::dev_ino(Path::new("/")).ok();
        jail =
            Some(sys::dev_ino(dir).map_err(os(Step::Chroot, format!("stat({})", dir.display())))?);
        sys::chroot(dir).map_err(os(Step::Chroot, format!("chroot({})", dir.display())))?;
        sys::chdir(Path::new("/")).map_err(os(Step::Chroot, "chdir(\"/\")"))?;
        if sys::dev_ino(Path::new("/")).ok() != jail {
            return Err(check(
                Step::Chroot,
                "after chroot, / is not the jail directory",
            ));
        }
        a.chroot = Some(dir.clone());
    }

    // 5. bounding set, securebits, ambient set (needs CAP_SETPCAP: before the uid change)
    if has(sys::CAP_SETPCAP) {
        sys::drop_bounding_set().map_err(|(cap, errno)| SandboxError::Os {
            step: Step::Bounding,
            call: format!("prctl(PR_CAPBSET_DROP, {cap})"),
            errno,
        })?;
        sys::lock_securebits().map_err(os(Step::Bounding, "prctl(PR_SET_SECUREBITS)"))?;
        a.bounding_dropped = true;
    } else {
        a.notes.push(
            "bounding set kept: emptying it needs CAP_SETPCAP (no_new_privs makes it unusable)"
                .into(),
        );
    }
    sys::clear_ambient().map_err(os(Step::Bounding, "prctl(PR_CAP_AMBIENT_CLEAR_ALL)"))?;

    // 6. groups, gid, uid
    let mut set_groups = false;
    if let Some(g) = profile.gid {
        if has(sys::CAP_SETGID) {
            sys::setgroups(&[g]).map_err(os(Step::Groups, format!("setgroups([{g}])")))?;
            set_groups = true;
        } else {
            a.notes
                .push("supplementary groups kept: setgroups needs CAP_SETGID".into());
        }
        if (rgid, egid, sgid) != (g, g, g) {
            sys::setresgid(g).map_err(os(Step::Gid, format!("setresgid({g}, {g}, {g})")))?;
        }
    }
    if let Some(u) = profile.uid {
        if (ruid, euid, suid) != (u, u, u) {
            sys::setresuid(u).map_err(os(Step::Uid, format!("setresuid({u}, {u}, {u})")))?;
        }
    }

    // 7. verify-drop
    let now_uid = sys::getresuid();
    let now_gid = sys::getresgid();
    if let Some(u) = profile.uid {
        if now_uid != (u, u, u) {
            return Err(check(
                Step::VerifyDrop,
                format!("uids are {now_uid:?} after setresuid({u})"),
            ));
        }
    }
    if let Some(g) = profile.gid {
        if now_gid != (g, g, g) {
            return Err(check(
                Step::VerifyDrop,
                format!("gids are {now_gid:?} after setresgid({g})"),
            ));
        }
    }
    if set_groups {
        let groups = sys::getgroups().map_err(os(Step::VerifyDrop, "getgroups"))?;
        if groups != [now_gid.0] {
            return Err(check(
                Step::VerifyDrop,
                format!("groups are {groups:?} after setgroups([{}])", now_gid.0),
            ));
        }
    }
    let holds_uid0 = [now_uid.0, now_uid.1, now_uid.2].contains(&0);
    let holds_gid0 = [now_gid.0, now_gid.1, now_gid.2].contains(&0);
    if !holds_uid0 && sys::raw_setuid(0).is_ok() {
        return Err(check(
            Step::VerifyDrop,
            "setuid(0) succeeded after the privilege drop: the drop is reversible",
        ));
    }
    if !holds_gid0 && sys::raw_setgid(0).is_ok() {
        return Err(check(
            Step::VerifyDrop,
            "setgid(0) succeeded after the privilege drop: the drop is reversible",
        ));
    }
    if holds_uid0 && !profile.allow_root {
        return Err(SandboxError::Root(format!(
            "uids are still {now_uid:?} after the drop"
        )));
    }
    a.uid = now_uid.1;
    a.gid = now_gid.1;

    // 8. caps
    sys::clear_caps().map_err(os(Step::Caps, "capset(0, 0, 0)"))?;
    let c = sys::capget().map_err(os(Step::Caps, "capget"))?;
    let amb = sys::ambient_set().map_err(os(Step::Caps, "prctl(PR_CAP_AMBIENT_IS_SET)"))?;
    let bnd = sys::bounding_set().map_err(os(Step::Caps, "prctl(PR_CAPBSET_READ)"))?;
    for (name, v) in [
        ("effective", c.effective),
        ("permitted", c.permitted),
        ("inheritable", c.inheritable),
        ("ambient", amb),
    ] {
        if v != 0 {
            return Err(check(
                Step::Caps,
                format!("the {name} capability set is {v:#x} after clearing it"),
            ));
        }
    }
    if a.bounding_dropped && bnd != 0 {
        return Err(check(
            Step::Caps,
            format!("the bounding set is {bnd:#x} after dropping every capability"),
        ));
    }

    // 9. no-new-privs
    sys::set_no_new_privs().map_err(os(Step::NoNewPrivs, "prctl(PR_SET_NO_NEW_PRIVS)"))?;
    if sys::no_new_privs() != Ok(true) {
        return Err(check(Step::NoNewPrivs, "no_new_privs reads back unset"));
    }

    // 10. rlimits
    if profile.core0 {
        sys::setrlimit(Resource::RLIMIT_CORE, 0, 0)
            .map_err(os(Step::Rlimits, "setrlimit(RLIMIT_CORE, 0)"))?;
    }
    if profile.no_fork {
        sys::setrlimit(Resource::RLIMIT_NPROC, 0, 0)
            .map_err(os(Step::Rlimits, "setrlimit(RLIMIT_NPROC, 0)"))?;
        if now_uid.0 == 0 {
            a.notes.push(
                "RLIMIT_NPROC does not bind a root user: no_fork relies on seccomp here".into(),
            );
        }
    }

    // 11. seccomp, last
    if profile.seccomp.filtered() {
        seccomp::install(profile.seccomp)?;
        if sys::seccomp_mode() != Ok(2) {
            return Err(check(
                Step::Seccomp,
                "seccomp mode reads back other than 2 (filter)",
            ));
        }
        a.seccomp = true;
    }

    let _ = RECORD.set(Record {
        applied: a.clone(),
        outside_root,
        jail,
    });
    Ok(a)
}

/// Raises `RLIMIT_NOFILE` to at least `want` (never lowers it); returns the
/// soft limit in force.
fn raise_nofile(want: u64, notes: &mut Vec<String>) -> Result<u64, SandboxError> {
    let (soft, hard) = sys::getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(os(Step::Nofile, "getrlimit(RLIMIT_NOFILE)"))?;
    if soft >= want {
        return Ok(soft);
    }
    if want <= hard {
        sys::setrlimit(Resource::RLIMIT_NOFILE, want, hard).map_err(os(
            Step::Nofile,
            format!("setrlimit(RLIMIT_NOFILE, {want})"),
        ))?;
        return Ok(want);
    }
    match sys::setrlimit(Resource::RLIMIT_NOFILE, want, want) {
        Ok(()) => Ok(want),
        Err(Errno::EPERM) => {
            sys::setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(os(
                Step::Nofile,
                format!("setrlimit(RLIMIT_NOFILE, {hard})"),
            ))?;
            notes.push(format!(
                "open-file limit raised to the hard limit {hard}, not {want}: raising the hard limit was refused (needs CAP_SYS_RESOURCE and fs.nr_open >= {want})"
            ));
            Ok(hard)
        }
        Err(e) => Err(os(
            Step::Nofile,
            format!("setrlimit(RLIMIT_NOFILE, {want})"),
        )(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_multithreaded_process_before_touching_it() {
        // Keep a second thread alive for the call, whatever the harness does.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || rx.recv());
        let e = apply(&Profile::default()).unwrap_err();
        drop(tx);
        let _ = t.join();
        assert_eq!(e.step(), Step::Preflight);
        assert!(e.to_string().contains("threads"), "{e}");
        // Nothing was applied.
        assert!(record().is_none());
    }

    #[test]
    fn errors_name_their_step() {
        let e = SandboxError::Os {
            step: Step::Chroot,
            call: "chroot(/x)".into(),
            errno: Errno::ENOENT,
        };
        assert_eq!(e.step(), Step::Chroot);
        assert_eq!(
            e.to_string(),
            "sandbox step `chroot`: chroot(/x) failed: ENOENT: No such file or directory"
        );
        let e = Profile::from_env_str("v=9").unwrap_err();
        assert_eq!(e.step(), Step::Profile);
    }
}
