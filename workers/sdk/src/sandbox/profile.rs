//! The sandbox profile: one declarative struct saying what a pool's workers
//! may do, and its one-line text encoding in [`SANDBOX_ENV`].
//!
//! # Encoding (version 1)
//!
//! One line of `key=value` fields separated by `;`, version first:
//!
//! ```text
//! v=1;uid=65534;gid=65534;chroot=/srv/www;seccomp=default;unshare=mount,ipc;nofile=65536;core0=1;no_fork=0;keep_fds=3;allow_root=0
//! ```
//!
//! | key          | value                                                        | when absent |
//! |--------------|--------------------------------------------------------------|-------------|
//! | `v`          | `1`; must be the first field                                 | required    |
//! | `uid`, `gid` | `keep`, or a decimal id below 4294967295                     | `keep`      |
//! | `chroot`     | `none`, or an absolute path, percent-encoded (below)         | `none`      |
//! | `seccomp`    | `default`, `proxy` or `off`                                  | `default`   |
//! | `unshare`    | `none`, or a comma list of `mount`, `pid`, `ipc`, `uts`, `net` | `none`    |
//! | `nofile`     | `keep`, or a decimal open-file limit of at least 1           | `keep`      |
//! | `core0`      | `0` or `1`                                                   | `1`         |
//! | `no_fork`    | `0` or `1`                                                   | `0`         |
//! | `keep_fds`   | `none`, or a comma list of decimal fds                        | `none`      |
//! | `allow_root` | `0` or `1`                                                   | `0`         |
//!
//! Parsing is strict: an unknown key, a key given twice, an empty field,
//! whitespace, a bad number, an unknown name or a bad escape is an error,
//! never ignored. Absent keys take the value in the last column, which is the
//! safe one ([`Profile::default`]); [`Profile::to_env`] always writes every key.
//!
//! A chroot path is written byte by byte: ASCII letters, digits and
//! `/ . _ - + ~ @ : ,` as themselves, every other byte as `%XX` (two hex
//! digits). So any path, including non-UTF-8 ones, survives the trip, and
//! `;` or `=` in a path can never be read as a separator.

use std::ffi::OsString;
use std::fmt;
use std::os::fd::RawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::str::FromStr;

use super::SandboxError;

/// The environment variable a spawned worker finds its profile in.
pub const SANDBOX_ENV: &str = "BATON_SANDBOX";
/// The encoding version [`Profile::to_env`] writes and the parser accepts.
pub const PROFILE_VERSION: u32 = 1;

/// Which seccomp filter to install.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// The allowlist that fits baton's bundled workers (see
    /// [`seccomp`](super::seccomp)).
    #[default]
    Default,
    /// The default allowlist plus outbound TCP: `socket` for
    /// `AF_INET`/`AF_INET6` `SOCK_STREAM` only, `connect`, `pipe2` and
    /// `splice` (see [`seccomp`](super::seccomp)), for `baton-proxy`.
    Proxy,
    /// No filter.
    Off,
}

impl SeccompMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SeccompMode::Default => "default",
            SeccompMode::Proxy => "proxy",
            SeccompMode::Off => "off",
        }
    }

    /// Whether a filter is installed (every mode but `off`).
    pub fn filtered(self) -> bool {
        self != SeccompMode::Off
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SeccompMode {
    type Err = ProfileError;
    /// `default`, `proxy` or `off`, as `--seccomp` takes them.
    fn from_str(s: &str) -> Result<Self, ProfileError> {
        match s {
            "default" => Ok(SeccompMode::Default),
            "proxy" => Ok(SeccompMode::Proxy),
            "off" => Ok(SeccompMode::Off),
            _ => Err(ProfileError::BadValue {
                key: "seccomp",
                value: s.to_string(),
                reason: "expected `default`, `proxy` or `off`",
            }),
        }
    }
}

/// Which namespaces the worker moves into before the chroot.
///
/// * `mount`: a private copy of the mount table (propagation is made private,
///   so nothing the worker could mount leaks back).
/// * `pid`: a new pid namespace **for the worker's children only**: the
///   worker itself keeps its pid (that is how `unshare(CLONE_NEWPID)` works),
///   and its first child would be pid 1 there. Useful only to workers that
///   fork; harmless otherwise.
/// * `ipc`, `uts`: System V IPC objects and host name of its own.
/// * `net`: an empty network namespace (only a down loopback). Sockets the
///   acceptor hands over keep working, since a socket belongs to the
///   namespace it was created in, but the worker can make no outbound
///   connection: only for workers that never connect anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Unshare {
    pub mount: bool,
    pub pid: bool,
    pub ipc: bool,
    pub uts: bool,
    pub net: bool,
}

impl Unshare {
    /// No namespace at all.
    pub const NONE: Unshare = Unshare {
        mount: false,
        pid: false,
        ipc: false,
        uts: false,
        net: false,
    };

    pub fn is_empty(&self) -> bool {
        *self == Unshare::NONE
    }

    /// The names of the namespaces asked for, in a fixed order.
    pub fn names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        for (on, name) in [
            (self.mount, "mount"),
            (self.pid, "pid"),
            (self.ipc, "ipc"),
            (self.uts, "uts"),
            (self.net, "net"),
        ] {
            if on {
                v.push(name);
            }
        }
        v
    }

    /// The `CLONE_NEW*` flags for `unshare(2)`.
    pub(crate) fn clone_flags(&self) -> libc::c_int {
        let mut f = 0;
        if self.mount {
            f |= libc::CLONE_NEWNS;
        }
        if self.pid {
            f |= libc::CLONE_NEWPID;
        }
        if self.ipc {
            f |= libc::CLONE_NEWIPC;
        }
        if self.uts {
            f |= libc::CLONE_NEWUTS;
        }
        if self.net {
            f |= libc::CLONE_NEWNET;
        }
        f
    }
}

impl fmt::Display for Unshare {
    /// `none`, or the comma list [`Unshare::from_str`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&self.names().join(","))
        }
    }
}

impl FromStr for Unshare {
    type Err = ProfileError;
    /// `none`, or a comma list of `mount`, `pid`, `ipc`, `uts`, `net`
    /// (as `--unshare` takes it). An empty string or element is an error.
    fn from_str(s: &str) -> Result<Self, ProfileError> {
        let bad = |reason| ProfileError::BadValue {
            key: "unshare",
            value: s.to_string(),
            reason,
        };
        if s == "none" {
            return Ok(Unshare::NONE);
        }
        let mut u = Unshare::NONE;
        for name in s.split(',') {
            let slot = match name {
                "mount" => &mut u.mount,
                "pid" => &mut u.pid,
                "ipc" => &mut u.ipc,
                "uts" => &mut u.uts,
                "net" => &mut u.net,
                "" => return Err(bad("empty namespace name")),
                _ => return Err(bad("namespaces are mount, pid, ipc, uts and net")),
            };
            if *slot {
                return Err(bad("namespace listed twice"));
            }
            *slot = true;
        }
        Ok(u)
    }
}

/// What a pool's workers may do: the sandbox [`apply`](super::apply)
/// confines a worker to and [`verify`](super::verify()) checks from outside.
///
/// Like the process table of OpenBSD's relayd, one value says it all; the
/// acceptor builds it from `--user`/`--group` (already resolved to numbers,
/// before any chroot), `--chroot`, `--seccomp`, `--unshare`, and the pool's
/// limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// The user to run as; `None` keeps the current one (refused when that
    /// is root, unless `allow_root`).
    pub uid: Option<u32>,
    /// The group to run as, also the only supplementary group; `None` keeps
    /// the current one.
    pub gid: Option<u32>,
    /// The directory to chroot into (absolute).
    pub chroot: Option<PathBuf>,
    pub seccomp: SeccompMode,
    pub unshare: Unshare,
    /// Raise `RLIMIT_NOFILE` to this (never lowered), for receiving many fds.
    pub nofile: Option<u64>,
    /// Set `RLIMIT_CORE` to 0: no core dump of a worker's memory.
    pub core0: bool,
    /// Set `RLIMIT_NPROC` to 0. The kernel counts threads as processes here,
    /// so this also forbids new threads: only for workers that never fork
    /// and never spawn a thread after the sandbox is applied.
    pub no_fork: bool,
    /// Descriptors besides stdio that survive the sandbox (the channel).
    pub keep_fds: Vec<RawFd>,
    /// Let the worker run as root (uid 0, or started as root without `uid`).
    pub allow_root: bool,
}

impl Default for Profile {
    /// The safe default for every field: keep ids (refused as root), no
    /// chroot, the default seccomp allowlist, no namespace, no core dumps.
    fn default() -> Profile {
        Profile {
            uid: None,
            gid: None,
            chroot: None,
            seccomp: SeccompMode::Default,
            unshare: Unshare::NONE,
            nofile: None,
            core0: true,
            no_fork: false,
            keep_fds: Vec::new(),
            allow_root: false,
        }
    }
}

/// Why a profile was refused. Each names the offending key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    #[error("empty profile")]
    Empty,
    #[error("the profile must start with `v={PROFILE_VERSION}`, found {0:?}")]
    NoVersion(String),
    #[error("unsupported profile version {0:?} (this library reads version {PROFILE_VERSION})")]
    Version(String),
    #[error("field {0:?} is not key=value")]
    Syntax(String),
    #[error("unknown key {0:?}")]
    UnknownKey(String),
    #[error("key {0:?} given twice")]
    DuplicateKey(String),
    #[error("{key}={value:?}: {reason}")]
    BadValue {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
}

const KEYS: [&str; 10] = [
    "uid",
    "gid",
    "chroot",
    "seccomp",
    "unshare",
    "nofile",
    "core0",
    "no_fork",
    "keep_fds",
    "allow_root",
];

impl Profile {
    /// Encodes the profile for [`SANDBOX_ENV`] (every key, version first).
    pub fn to_env(&self) -> String {
        fn id(v: Option<u32>) -> String {
            v.map_or_else(|| "keep".to_string(), |v| v.to_string())
        }
        fn flag(b: bool) -> &'static str {
            if b {
                "1"
            } else {
                "0"
            }
        }
        let chroot = match &self.chroot {
            Some(p) => encode_path(p.as_os_str().as_bytes()),
            None => "none".to_string(),
        };
        let nofile = self
            .nofile
            .map_or_else(|| "keep".to_string(), |n| n.to_string());
        let keep_fds = if self.keep_fds.is_empty() {
            "none".to_string()
        } else {
            let v: Vec<String> = self.keep_fds.iter().map(|fd| fd.to_string()).collect();
            v.join(",")
        };
        format!(
            "v={PROFILE_VERSION};uid={};gid={};chroot={chroot};seccomp={};unshare={};nofile={nofile};core0={};no_fork={};keep_fds={keep_fds};allow_root={}",
            id(self.uid),
            id(self.gid),
            self.seccomp,
            self.unshare,
            flag(self.core0),
            flag(self.no_fork),
            flag(self.allow_root),
        )
    }

    /// Decodes a profile written by [`Profile::to_env`] (or by hand, in the
    /// format of the [module docs](self)).
    pub fn from_env_str(s: &str) -> Result<Profile, SandboxError> {
        Ok(parse(s)?)
    }

    /// Reads [`SANDBOX_ENV`]: `Ok(None)` when it is not set.
    pub fn from_env() -> Result<Option<Profile>, SandboxError> {
        match std::env::var_os(SANDBOX_ENV) {
            None => Ok(None),
            Some(v) => {
                let s = v.into_string().map_err(|v| ProfileError::BadValue {
                    key: "v",
                    value: v.to_string_lossy().into_owned(),
                    reason: "the profile is not UTF-8",
                })?;
                Profile::from_env_str(&s).map(Some)
            }
        }
    }

    /// Checks what the type alone cannot: the chroot is absolute and has no
    /// NUL, fds are not negative, ids are not -1 (which `setresuid` reads as
    /// "unchanged"), `nofile` is at least 1.
    pub fn validate(&self) -> Result<(), ProfileError> {
        for (key, v) in [("uid", self.uid), ("gid", self.gid)] {
            if v == Some(u32::MAX) {
                return Err(ProfileError::BadValue {
                    key,
                    value: u32::MAX.to_string(),
                    reason: "4294967295 means `unchanged` to the kernel",
                });
            }
        }
        if let Some(p) = &self.chroot {
            let b = p.as_os_str().as_bytes();
            if b.first() != Some(&b'/') || b.contains(&0) {
                return Err(ProfileError::BadValue {
                    key: "chroot",
                    value: p.display().to_string(),
                    reason: "must be an absolute path without NUL bytes",
                });
            }
        }
        if self.nofile == Some(0) {
            return Err(ProfileError::BadValue {
                key: "nofile",
                value: "0".into(),
                reason: "must be at least 1",
            });
        }
        if let Some(fd) = self.keep_fds.iter().find(|fd| **fd < 0) {
            return Err(ProfileError::BadValue {
                key: "keep_fds",
                value: fd.to_string(),
                reason: "file descriptors are not negative",
            });
        }
        Ok(())
    }

    /// Whether the profile asks for anything only a privileged process can
    /// do: other ids, a chroot, namespaces, or running as root.
    pub fn needs_privilege(&self) -> bool {
        self.uid.is_some()
            || self.gid.is_some()
            || self.chroot.is_some()
            || !self.unshare.is_empty()
            || self.allow_root
    }
}

fn parse(s: &str) -> Result<Profile, ProfileError> {
    if s.is_empty() {
        return Err(ProfileError::Empty);
    }
    let mut fields = s.split(';');
    let first = fields.next().unwrap_or_default();
    match first.split_once('=') {
        Some(("v", v)) if v == PROFILE_VERSION.to_string() => {}
        Some(("v", v)) => return Err(ProfileError::Version(v.to_string())),
        _ => return Err(ProfileError::NoVersion(first.to_string())),
    }
    let mut p = Profile::default();
    let mut seen = [false; KEYS.len()];
    for field in fields {
        let (key, value) = field
            .split_once('=')
            .ok_or_else(|| ProfileError::Syntax(field.to_string()))?;
        let Some(i) = KEYS.iter().position(|k| *k == key) else {
            return Err(if key == "v" {
                ProfileError::DuplicateKey(key.to_string())
            } else if key.is_empty() {
                ProfileError::Syntax(field.to_string())
            } else {
                ProfileError::UnknownKey(key.to_string())
            });
        };
        if seen[i] {
            return Err(ProfileError::DuplicateKey(key.to_string()));
        }
        seen[i] = true;
        let key = KEYS[i];
        match key {
            "uid" => p.uid = parse_id(key, value)?,
            "gid" => p.gid = parse_id(key, value)?,
            "chroot" => {
                p.chroot = if value == "none" {
                    None
                } else {
                    Some(PathBuf::from(OsString::from_vec(decode_path(value)?)))
                }
            }
            "seccomp" => p.seccomp = value.parse()?,
            "unshare" => p.unshare = value.parse()?,
            "nofile" => {
                p.nofile = if value == "keep" {
                    None
                } else {
                    Some(parse_num(key, value)?)
                }
            }
            "core0" => p.core0 = parse_flag(key, value)?,
            "no_fork" => p.no_fork = parse_flag(key, value)?,
            "keep_fds" => {
                p.keep_fds = if value == "none" {
                    Vec::new()
                } else {
                    let mut v = Vec::new();
                    for fd in value.split(',') {
                        let n: u64 = parse_num(key, fd)?;
                        let fd = RawFd::try_from(n).map_err(|_| ProfileError::BadValue {
                            key,
                            value: fd.to_string(),
                            reason: "not a file descriptor number",
                        })?;
                        if v.contains(&fd) {
                            return Err(ProfileError::BadValue {
                                key,
                                value: value.to_string(),
                                reason: "fd listed twice",
                            });
                        }
                        v.push(fd);
                    }
                    v
                }
            }
            "allow_root" => p.allow_root = parse_flag(key, value)?,
            _ => return Err(ProfileError::UnknownKey(key.to_string())),
        }
    }
    p.validate()?;
    Ok(p)
}

/// A plain decimal: ASCII digits only (no sign, no space), no overflow.
fn parse_num<T: FromStr>(key: &'static str, value: &str) -> Result<T, ProfileError> {
    let bad = |reason| ProfileError::BadValue {
        key,
        value: value.to_string(),
        reason,
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("expected a decimal number"));
    }
    if value.len() > 1 && value.starts_with('0') {
        return Err(bad("no leading zeros"));
    }
    value.parse().map_err(|_| bad("number out of range"))
}

fn parse_id(key: &'static str, value: &str) -> Result<Option<u32>, ProfileError> {
    if value == "keep" {
        return Ok(None);
    }
    parse_num(key, value).map(Some)
}

fn parse_flag(key: &'static str, value: &str) -> Result<bool, ProfileError> {
    match value {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(ProfileError::BadValue {
            key,
            value: value.to_string(),
            reason: "expected 0 or 1",
        }),
    }
}

fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"/._-+~@:,".contains(&b)
}

fn encode_path(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        if is_plain(b) {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

fn decode_path(s: &str) -> Result<Vec<u8>, ProfileError> {
    let bad = |reason| ProfileError::BadValue {
        key: "chroot",
        value: s.to_string(),
        reason,
    };
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .ok_or_else(|| bad("truncated %XX escape"))?;
                let hex = std::str::from_utf8(hex).map_err(|_| bad("bad %XX escape"))?;
                if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                    return Err(bad("bad %XX escape"));
                }
                let v = u8::from_str_radix(hex, 16).map_err(|_| bad("bad %XX escape"))?;
                out.push(v);
                i += 3;
            }
            c if is_plain(c) => {
                out.push(c);
                i += 1;
            }
            _ => {
                return Err(bad(
                    "a byte other than A-Z a-z 0-9 / . _ - + ~ @ : , must be %XX-escaped",
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> ProfileError {
        match parse(s) {
            Err(e) => e,
            Ok(p) => panic!("{s:?} parsed as {p:?}"),
        }
    }

    fn full() -> Profile {
        Profile {
            uid: Some(65534),
            gid: Some(65533),
            chroot: Some(PathBuf::from("/srv/my www;x=1%/ü")),
            seccomp: SeccompMode::Off,
            unshare: Unshare {
                mount: true,
                pid: false,
                ipc: true,
                uts: false,
                net: true,
            },
            nofile: Some(65536),
            core0: false,
            no_fork: true,
            keep_fds: vec![3, 7],
            allow_root: true,
        }
    }

    #[test]
    fn roundtrip() {
        for p in [Profile::default(), full()] {
            let s = p.to_env();
            assert!(!s.contains(' ') && !s.contains('\n'), "{s}");
            assert_eq!(Profile::from_env_str(&s).unwrap(), p, "{s}");
        }
        // Non-UTF-8 paths survive too.
        let p = Profile {
            chroot: Some(PathBuf::from(OsString::from_vec(b"/a\xff\x01b".to_vec()))),
            ..Profile::default()
        };
        assert_eq!(parse(&p.to_env()).unwrap(), p);
    }

    #[test]
    fn exact_encoding() {
        assert_eq!(
            Profile::default().to_env(),
            "v=1;uid=keep;gid=keep;chroot=none;seccomp=default;unshare=none;nofile=keep;core0=1;no_fork=0;keep_fds=none;allow_root=0"
        );
        assert!(full()
            .to_env()
            .contains("chroot=/srv/my%20www%3Bx%3D1%25/%C3%BC;"));
    }

    #[test]
    fn absent_keys_take_safe_defaults() {
        assert_eq!(parse("v=1").unwrap(), Profile::default());
        let p = parse("v=1;uid=1000;keep_fds=3").unwrap();
        assert_eq!(p.uid, Some(1000));
        assert_eq!(p.keep_fds, vec![3]);
        assert_eq!(p.seccomp, SeccompMode::Default);
        assert!(p.core0 && !p.allow_root);
    }

    #[test]
    fn strict_errors() {
        assert_eq!(err(""), ProfileError::Empty);
        assert!(matches!(err("uid=1;v=1"), ProfileError::NoVersion(_)));
        assert!(matches!(err("v=2"), ProfileError::Version(_)));
        assert!(matches!(err("v=01"), ProfileError::Version(_)));
        assert!(matches!(err("v=1;v=1"), ProfileError::DuplicateKey(_)));
        assert!(matches!(
            err("v=1;uid=1;uid=2"),
            ProfileError::DuplicateKey(_)
        ));
        assert!(matches!(err("v=1;user=1"), ProfileError::UnknownKey(_)));
        assert!(matches!(err("v=1;UID=1"), ProfileError::UnknownKey(_)));
        assert!(matches!(err("v=1;"), ProfileError::Syntax(_)));
        assert!(matches!(err("v=1;;uid=1"), ProfileError::Syntax(_)));
        assert!(matches!(err("v=1;uid"), ProfileError::Syntax(_)));
        assert!(matches!(err("v=1;=1"), ProfileError::Syntax(_)));
        // A raw ';' in a path ends the field: the rest is no key=value.
        assert!(matches!(err("v=1;chroot=/a;b"), ProfileError::Syntax(_)));
        for bad in [
            "v=1;uid=-1",
            "v=1;uid=+1",
            "v=1;uid= 1",
            "v=1;uid=1 ",
            "v=1;uid=",
            "v=1;uid=01",
            "v=1;uid=4294967295",
            "v=1;uid=4294967296",
            "v=1;uid=nobody",
            "v=1;gid=0x10",
            "v=1;chroot=relative/dir",
            "v=1;chroot=",
            "v=1;chroot=/a b",
            "v=1;chroot=/a%2",
            "v=1;chroot=/a%zz",
            "v=1;chroot=/a%00b",
            "v=1;chroot=%2Fa%",
            "v=1;seccomp=on",
            "v=1;seccomp=",
            "v=1;unshare=",
            "v=1;unshare=mount,",
            "v=1;unshare=mount,mount",
            "v=1;unshare=user",
            "v=1;unshare=none,pid",
            "v=1;nofile=0",
            "v=1;nofile=-5",
            "v=1;nofile=18446744073709551616",
            "v=1;core0=yes",
            "v=1;core0=true",
            "v=1;no_fork=2",
            "v=1;allow_root=",
            "v=1;keep_fds=",
            "v=1;keep_fds=-1",
            "v=1;keep_fds=3,",
            "v=1;keep_fds=3,3",
            "v=1;keep_fds=2147483648",
        ] {
            assert!(
                matches!(err(bad), ProfileError::BadValue { .. }),
                "{bad}: {:?}",
                err(bad)
            );
        }
        // The encoded %2F is a plain '/' once decoded: still absolute.
        assert_eq!(
            parse("v=1;chroot=%2Fa").unwrap().chroot,
            Some(PathBuf::from("/a"))
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let e = Profile::from_env_str("v=1;seccomp=strict").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("seccomp=\"strict\""), "{msg}");
        assert!(msg.contains(SANDBOX_ENV), "{msg}");
    }

    #[test]
    fn validate_catches_struct_values() {
        let mut p = Profile {
            uid: Some(u32::MAX),
            ..Profile::default()
        };
        assert!(p.validate().is_err());
        p.uid = None;
        p.keep_fds = vec![-3];
        assert!(p.validate().is_err());
        p.keep_fds = vec![];
        p.chroot = Some(PathBuf::from("srv"));
        assert!(p.validate().is_err());
    }

    #[test]
    fn option_parsers() {
        assert_eq!("off".parse::<SeccompMode>().unwrap(), SeccompMode::Off);
        assert_eq!("proxy".parse::<SeccompMode>().unwrap(), SeccompMode::Proxy);
        let p = Profile {
            seccomp: SeccompMode::Proxy,
            ..Profile::default()
        };
        assert_eq!(Profile::from_env_str(&p.to_env()).unwrap(), p);
        let u: Unshare = "pid,net".parse().unwrap();
        assert!(u.pid && u.net && !u.mount);
        assert_eq!(u.to_string(), "pid,net");
        assert_eq!(Unshare::NONE.to_string(), "none");
        assert_eq!(u.clone_flags(), libc::CLONE_NEWPID | libc::CLONE_NEWNET);
    }
}
