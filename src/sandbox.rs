//! The acceptor's side of the worker sandbox: turning `--user`, `--chroot`,
//! `--seccomp`... into a [`Profile`] (names resolved here, before any
//! chroot), and reducing the acceptor's own capabilities to the few it
//! needs.
//!
//! Where the sandbox is applied: the worker applies the profile to itself
//! right after exec, before it says HELLO (see `baton_sdk::sandbox`); the
//! acceptor checks the result from outside in `/proc/PID/status` and
//! `/proc/PID/root` before the worker's first connection. A chroot set up
//! between fork and exec would need the worker's binary and libraries
//! inside the jail; exec-then-confine does not, and nothing in the window
//! reads input.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use baton_sdk::sandbox::{Profile, SeccompMode, Unshare};
use nix::unistd::{Gid, Group, Uid, User};

use crate::ConfigError;

/// Sandbox options, shared by `baton` (flattened into the pool's options,
/// so also keys of the file's `[pool]` table) and `baton audit`. Declared
/// once here: the flag, its help, its default and its file key.
#[derive(Debug, Clone, clap::Args, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct SandboxArgs {
    /// Run workers as this user (name or uid). Started as root without it,
    /// workers run as `nobody`.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// Run workers with this group (name or gid), also their only
    /// supplementary group. [default: the user's primary group]
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,

    /// Confine workers to this directory (chroot, needs root).
    #[arg(long, value_name = "DIR")]
    pub chroot: Option<PathBuf>,

    /// Seccomp filter: `default` (an allowlist fitting the bundled workers:
    /// no exec, no new sockets, read-only files), `proxy` (the same plus
    /// outbound TCP: stream sockets, connect, pipe2, splice; still no bind,
    /// listen or raw sockets), `off`, or `auto`: `proxy` for a worker
    /// command named baton-proxy, else `default`.
    #[arg(long, value_name = "PROFILE", default_value = "auto", value_parser = parse_seccomp)]
    #[serde(with = "crate::options::text")]
    pub seccomp: SeccompChoice,

    /// New namespaces for workers: a comma list of mount, pid, ipc, uts,
    /// net (net only for workers that make no outbound connection), or none.
    #[arg(long, value_name = "LIST", default_value = "none", value_parser = parse_unshare)]
    #[serde(with = "crate::options::text")]
    pub unshare: Unshare,

    /// RLIMIT_NPROC 0: workers may not fork nor start threads (not for
    /// baton-echo, which starts a thread per connection).
    #[arg(long)]
    pub no_fork: bool,

    /// Started as root, let workers run as root when no --user is given.
    #[arg(long)]
    pub allow_root_workers: bool,

    /// Run workers unconfined (no profile, no check), as baton's own user:
    /// for workers that cannot apply a sandbox themselves. It cannot be
    /// combined with --user, --group or --chroot (baton does not change a
    /// worker's ids itself); as root, it needs --allow-root-workers.
    #[arg(long)]
    pub no_sandbox: bool,
}

impl Default for SandboxArgs {
    /// The defaults the flags declare.
    fn default() -> Self {
        crate::options::defaults()
    }
}

fn parse_seccomp(s: &str) -> Result<SeccompChoice, String> {
    s.parse::<SeccompChoice>()
}

/// `--seccomp`: a profile, or `auto` (chosen by the worker command).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeccompChoice {
    Auto,
    Mode(SeccompMode),
}

impl SeccompChoice {
    /// The profile for workers running `program` (None: the embedded
    /// static worker, or a probe).
    pub fn for_program(self, program: Option<&Path>) -> SeccompMode {
        match self {
            SeccompChoice::Mode(m) => m,
            SeccompChoice::Auto => {
                let proxy = program
                    .and_then(|p| p.file_name())
                    .is_some_and(|n| n == "baton-proxy");
                if proxy {
                    SeccompMode::Proxy
                } else {
                    SeccompMode::Default
                }
            }
        }
    }
}

impl std::str::FromStr for SeccompChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<SeccompChoice, String> {
        if s == "auto" {
            return Ok(SeccompChoice::Auto);
        }
        s.parse::<SeccompMode>()
            .map(SeccompChoice::Mode)
            .map_err(|e| format!("{e} (or `auto`)"))
    }
}

impl std::fmt::Display for SeccompChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SeccompChoice::Auto => f.write_str("auto"),
            SeccompChoice::Mode(m) => f.write_str(m.as_str()),
        }
    }
}

fn parse_unshare(s: &str) -> Result<Unshare, String> {
    s.parse::<Unshare>().map_err(|e| e.to_string())
}

fn resolve_user(s: &str) -> Result<User, ConfigError> {
    let found = match s.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(s),
    };
    match found {
        Ok(Some(u)) => Ok(u),
        Ok(None) => Err(ConfigError::Invalid(format!("--user {s}: no such user"))),
        Err(e) => Err(ConfigError::Invalid(format!("--user {s}: {e}"))),
    }
}

fn resolve_group(s: &str) -> Result<u32, ConfigError> {
    let found = match s.parse::<u32>() {
        Ok(gid) => Group::from_gid(Gid::from_raw(gid)),
        Err(_) => Group::from_name(s),
    };
    match found {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(ConfigError::Invalid(format!("--group {s}: no such group"))),
        Err(e) => Err(ConfigError::Invalid(format!("--group {s}: {e}"))),
    }
}

/// The resolved sandbox of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// None: workers run unconfined (`--no-sandbox`).
    pub profile: Option<Profile>,
    /// Why the ids are what they are, for the log (e.g. "nobody by default").
    pub note: Option<String>,
}

impl SandboxArgs {
    /// Resolves names to ids and checks what can be checked before any
    /// worker starts: the user and group exist, the chroot is a directory,
    /// privileges suffice.
    /// `program` is the worker command's (None for the embedded static
    /// worker): `--seccomp auto` chooses by it.
    pub fn resolve(
        &self,
        worker_connections: u32,
        program: Option<&Path>,
    ) -> Result<Sandbox, ConfigError> {
        let root = nix::unistd::geteuid().is_root();
        if self.no_sandbox {
            let ignored: Vec<&str> = [
                ("--user", self.user.is_some()),
                ("--group", self.group.is_some()),
                ("--chroot", self.chroot.is_some()),
            ]
            .into_iter()
            .filter_map(|(flag, given)| given.then_some(flag))
            .collect();
            if !ignored.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "--no-sandbox runs workers unconfined, as baton's own user, so it cannot honour {}: drop --no-sandbox to run them sandboxed as that user{}",
                    ignored.join(", "),
                    if root { ", or add --allow-root-workers (without --user) to run them unconfined as root" } else { "" }
                )));
            }
            if root && !self.allow_root_workers {
                return Err(ConfigError::Invalid(
                    "--no-sandbox as root would run workers as root: add --allow-root-workers to mean it".to_string(),
                ));
            }
            return Ok(Sandbox {
                profile: None,
                note: Some("workers run unconfined (--no-sandbox)".to_string()),
            });
        }
        let mut note = None;
        let (uid, mut gid) = match &self.user {
            Some(u) => {
                let user = resolve_user(u)?;
                (Some(user.uid.as_raw()), Some(user.gid.as_raw()))
            }
            None if root && !self.allow_root_workers => {
                let nobody = resolve_user("nobody").map_err(|_| {
                    ConfigError::Invalid(
                        "started as root without --user, and there is no `nobody` user to run workers as: give --user".to_string(),
                    )
                })?;
                note = Some(format!(
                    "started as root without --user: workers run as nobody (uid {})",
                    nobody.uid
                ));
                (Some(nobody.uid.as_raw()), Some(nobody.gid.as_raw()))
            }
            None => (None, None),
        };
        if let Some(g) = &self.group {
            gid = Some(resolve_group(g)?);
        }
        if !root {
            let me = nix::unistd::geteuid().as_raw();
            if uid.is_some_and(|u| u != me) {
                return Err(ConfigError::Invalid(format!(
                    "--user {}: running workers as another user needs root",
                    self.user.as_deref().unwrap_or_default()
                )));
            }
            // Unprivileged workers keep their ids and groups: nothing to
            // change, and nothing to demand of /proc.
            if self.group.is_some() && gid != Some(nix::unistd::getegid().as_raw()) {
                return Err(ConfigError::Invalid(
                    "--group: running workers with another group needs root".to_string(),
                ));
            }
            if self.chroot.is_some() {
                return Err(ConfigError::Invalid("--chroot needs root".to_string()));
            }
            if !self.unshare.is_empty() {
                return Err(ConfigError::Invalid("--unshare needs root".to_string()));
            }
        }
        if let Some(dir) = &self.chroot {
            if !dir.is_absolute() {
                return Err(ConfigError::Invalid(format!(
                    "--chroot {}: must be an absolute path",
                    dir.display()
                )));
            }
            match std::fs::metadata(dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(ConfigError::Invalid(format!(
                        "--chroot {}: not a directory",
                        dir.display()
                    )))
                }
                Err(e) => {
                    return Err(ConfigError::Invalid(format!(
                        "--chroot {}: {e}",
                        dir.display()
                    )))
                }
            }
        }
        let seccomp = self.seccomp.for_program(program);
        // Build the filter here once, so that a profile that cannot load on
        // this machine stops baton at start-up, not every worker.
        baton_sdk::sandbox::seccomp::check(seccomp).map_err(|e| {
            ConfigError::Invalid(format!(
                "--seccomp {seccomp} cannot be used here: {e} (use --seccomp off)"
            ))
        })?;
        let (uid, gid) = if root { (uid, gid) } else { (None, None) };
        let profile = Profile {
            uid,
            gid,
            chroot: self.chroot.clone(),
            seccomp,
            unshare: self.unshare,
            // Room for every connection a worker may hold, and its files.
            nofile: Some(u64::from(worker_connections) + 256),
            core0: true,
            no_fork: self.no_fork,
            keep_fds: Vec::new(),
            allow_root: self.allow_root_workers,
        };
        profile
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("sandbox: {e}")))?;
        Ok(Sandbox {
            profile: Some(profile),
            note,
        })
    }
}

/// Checks `--root DIR` as the workers will see it, so that a directory
/// they cannot use is one clear error at start-up instead of a crash loop:
/// it exists and is a directory, lies inside the chroot if there is one,
/// and the worker user may enter every directory on the way to it and read
/// it (mode bits, for that uid and its single group, the way the kernel
/// checks them; ACLs are not consulted). Returns the path to give the
/// worker: absolute, and inside the jail when there is one.
pub fn check_root(root: &Path, sandbox: &Sandbox) -> Result<PathBuf, ConfigError> {
    let bad = |why: String| ConfigError::Invalid(format!("--root {}: {why}", root.display()));
    match std::fs::metadata(root) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(bad("not a directory".to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(bad("no such directory".to_string()))
        }
        Err(e) => return Err(bad(e.to_string())),
    }
    let abs = root.canonicalize().map_err(|e| bad(e.to_string()))?;
    let profile = sandbox.profile.as_ref();
    let (seen_as, start) = match profile.and_then(|p| p.chroot.as_ref()) {
        Some(jail) => {
            let jail = jail
                .canonicalize()
                .map_err(|e| bad(format!("--chroot {}: {e}", jail.display())))?;
            let Ok(rel) = abs.strip_prefix(&jail) else {
                return Err(bad(format!(
                    "outside --chroot {}: the workers see only what is inside the jail; serve a directory under it",
                    jail.display()
                )));
            };
            (Path::new("/").join(rel), jail)
        }
        None => (abs.clone(), PathBuf::from("/")),
    };
    match profile.and_then(|p| p.uid.map(|u| (u, p.gid))) {
        Some((uid, gid)) if uid != 0 => {
            let gid = gid.unwrap_or_else(|| nix::unistd::getegid().as_raw());
            let who = match User::from_uid(Uid::from_raw(uid)) {
                Ok(Some(u)) => format!("{} (uid {uid}, gid {gid})", u.name),
                _ => format!("uid {uid} (gid {gid})"),
            };
            // Every directory from the jail (or /) down needs search; the
            // root itself read and search too.
            let mut dir = start.clone();
            let below = abs.strip_prefix(&start).unwrap_or(Path::new(""));
            let mut steps = vec![dir.clone()];
            for c in below.components() {
                dir.push(c);
                steps.push(dir.clone());
            }
            for (i, d) in steps.iter().enumerate() {
                let last = i + 1 == steps.len();
                let want = if last { 0o5 } else { 0o1 };
                let m = std::fs::metadata(d).map_err(|e| bad(format!("{}: {e}", d.display())))?;
                if !permits(&m, uid, gid, want) {
                    return Err(bad(format!(
                        "the workers run as {who} and cannot {} {} (mode {:04o}, owner {}:{}): make it readable by that user (e.g. chmod o+{} {}) or pass --user with one who can read it",
                        if last { "read" } else { "enter" },
                        d.display(),
                        m.mode() & 0o7777,
                        m.uid(),
                        m.gid(),
                        if last { "rx" } else { "x" },
                        d.display(),
                    )));
                }
            }
        }
        // Workers keep baton's own ids: ask the kernel as ourselves.
        _ => {
            use nix::unistd::AccessFlags;
            nix::unistd::access(&abs, AccessFlags::R_OK | AccessFlags::X_OK).map_err(|e| {
                bad(format!(
                    "the workers (running as baton's own user) cannot read it: {e}"
                ))
            })?;
        }
    }
    Ok(seen_as)
}

/// Whether mode bits grant `want` (0o4 read, 0o1 search...) to `uid` with
/// the single group `gid`, as the kernel picks the owner, group or other
/// class.
fn permits(m: &std::fs::Metadata, uid: u32, gid: u32, want: u32) -> bool {
    let mode = m.mode();
    let class = if m.uid() == uid {
        mode >> 6
    } else if m.gid() == gid {
        mode >> 3
    } else {
        mode
    };
    class & want == want
}

/// Capabilities the acceptor keeps when started as root: to spawn workers
/// that confine themselves (they inherit at most these), to check them in
/// /proc, to signal them, and to bind new listeners on reload.
const KEEP: &[caps::Capability] = &[
    caps::Capability::CAP_SETUID,
    caps::Capability::CAP_SETGID,
    caps::Capability::CAP_SETPCAP,
    caps::Capability::CAP_SYS_CHROOT,
    caps::Capability::CAP_SYS_ADMIN,
    caps::Capability::CAP_SYS_RESOURCE,
    caps::Capability::CAP_SYS_PTRACE,
    caps::Capability::CAP_KILL,
    caps::Capability::CAP_NET_BIND_SERVICE,
];

/// Why the acceptor's own capabilities could not be reduced.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    /// `cap` could not be dropped from the bounding set.
    #[error("cannot drop {cap} from the bounding set: {source}")]
    DropBounding {
        cap: caps::Capability,
        source: caps::errors::CapsError,
    },
    /// Set `set` could not be read.
    #[error("{source}")]
    Read {
        set: caps::CapSet,
        source: caps::errors::CapsError,
    },
    /// Set `set` could not be replaced.
    #[error("{source}")]
    Set {
        set: caps::CapSet,
        source: caps::errors::CapsError,
    },
}

/// Drops every capability the acceptor does not need, from its bounding,
/// effective, permitted and inheritable sets. A no-op when not root.
/// Returns the capabilities kept, for the log.
pub fn reduce_own_capabilities() -> Result<Vec<String>, CapsError> {
    use caps::{CapSet, Capability};
    if !nix::unistd::geteuid().is_root() {
        return Ok(Vec::new());
    }
    let keep: caps::CapsHashSet = KEEP.iter().copied().collect();
    for cap in caps::all() {
        if !keep.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, cap)
                .map_err(|source| CapsError::DropBounding { cap, source })?;
        }
    }
    let permitted: caps::CapsHashSet = caps::read(None, CapSet::Permitted)
        .map_err(|source| CapsError::Read {
            set: CapSet::Permitted,
            source,
        })?
        .intersection(&keep)
        .copied()
        .collect();
    let set = |set: CapSet, value: &caps::CapsHashSet| {
        caps::set(None, set, value).map_err(|source| CapsError::Set { set, source })
    };
    set(CapSet::Inheritable, &caps::CapsHashSet::new())?;
    set(CapSet::Effective, &permitted)?;
    set(CapSet::Permitted, &permitted)?;
    let mut kept: Vec<String> = permitted.iter().map(Capability::to_string).collect();
    kept.sort();
    Ok(kept)
}
