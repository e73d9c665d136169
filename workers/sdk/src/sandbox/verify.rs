//! Checking a worker's sandbox from outside, the way the acceptor does
//! before giving it a connection: trust, but verify.
//!
//! [`verify()`] reads `/proc/PID/status` (world-readable), `/proc/PID/root`
//! and `/proc/PID/ns/*`. The last two need ptrace-read access to the worker:
//! an acceptor running as root needs `CAP_SYS_PTRACE` for that (the worker
//! runs under another uid and is not dumpable after its uid change). A
//! check that cannot be made is a mismatch, never a pass.
//!
//! When to call it: a spawned worker applies its profile before it says
//! HELLO, so the acceptor verifies on HELLO, before WELCOME and the first
//! CONN. The acceptor should hold a pidfd for the worker, so that the pid
//! it reads is the worker's and not a recycled one.

use std::fmt;
use std::path::{Path, PathBuf};

use super::profile::Profile;
use super::sys;

/// What `/proc/PID/status` says about a process's privileges.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcStatus {
    /// `Name:` (the command name, at most 15 bytes).
    pub name: String,
    /// `Threads:`, when present.
    pub threads: Option<u32>,
    /// `Uid:` real, effective, saved, filesystem.
    pub uid: [u32; 4],
    /// `Gid:` real, effective, saved, filesystem.
    pub gid: [u32; 4],
    /// `Groups:` the supplementary groups.
    pub groups: Vec<u32>,
    /// `NoNewPrivs:` (absent before Linux 4.10).
    pub no_new_privs: Option<bool>,
    /// `Seccomp:` 0 off, 1 strict, 2 filter (absent without CONFIG_SECCOMP).
    pub seccomp: Option<u8>,
    /// `Seccomp_filters:` how many filters are installed (Linux 5.9+).
    pub seccomp_filters: Option<u32>,
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    /// `CapAmb:` (absent before Linux 4.3).
    pub cap_amb: Option<u64>,
}

/// Why a status text could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatusError {
    #[error("/proc status has no {0} line")]
    Missing(&'static str),
    #[error("/proc status line {key}: {value:?} is malformed")]
    Malformed { key: &'static str, value: String },
    #[error("/proc status has {0} twice")]
    Duplicate(&'static str),
}

const REQUIRED: [&str; 7] = [
    "Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd",
];

impl ProcStatus {
    /// Parses the text of a `/proc/PID/status` file. Lines it does not use
    /// are skipped; a line it uses that is malformed or repeated is an error.
    pub fn parse(text: &str) -> Result<ProcStatus, StatusError> {
        let mut st = ProcStatus::default();
        let mut seen: Vec<&'static str> = Vec::new();
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            let key: &'static str = match key {
                "Name" => "Name",
                "Threads" => "Threads",
                "Uid" => "Uid",
                "Gid" => "Gid",
                "Groups" => "Groups",
                "NoNewPrivs" => "NoNewPrivs",
                "Seccomp" => "Seccomp",
                "Seccomp_filters" => "Seccomp_filters",
                "CapInh" => "CapInh",
                "CapPrm" => "CapPrm",
                "CapEff" => "CapEff",
                "CapBnd" => "CapBnd",
                "CapAmb" => "CapAmb",
                _ => continue,
            };
            if seen.contains(&key) {
                return Err(StatusError::Duplicate(key));
            }
            seen.push(key);
            let bad = || StatusError::Malformed {
                key,
                value: value.to_string(),
            };
            let num = |s: &str| s.parse::<u32>().map_err(|_| bad());
            let cap = |s: &str| {
                if s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
                    u64::from_str_radix(s, 16).map_err(|_| bad())
                } else {
                    Err(bad())
                }
            };
            let four = |s: &str| -> Result<[u32; 4], StatusError> {
                let v: Vec<u32> = s.split_whitespace().map(num).collect::<Result<_, _>>()?;
                <[u32; 4]>::try_from(v).map_err(|_| bad())
            };
            match key {
                "Name" => st.name = value.to_string(),
                "Threads" => st.threads = Some(num(value)?),
                "Uid" => st.uid = four(value)?,
                "Gid" => st.gid = four(value)?,
                "Groups" => {
                    st.groups = value
                        .split_whitespace()
                        .map(num)
                        .collect::<Result<_, _>>()?
                }
                "NoNewPrivs" => {
                    st.no_new_privs = Some(match value {
                        "0" => false,
                        "1" => true,
                        _ => return Err(bad()),
                    })
                }
                "Seccomp" => {
                    st.seccomp = Some(match value {
                        "0" => 0,
                        "1" => 1,
                        "2" => 2,
                        _ => return Err(bad()),
                    })
                }
                "Seccomp_filters" => st.seccomp_filters = Some(num(value)?),
                "CapInh" => st.cap_inh = cap(value)?,
                "CapPrm" => st.cap_prm = cap(value)?,
                "CapEff" => st.cap_eff = cap(value)?,
                "CapBnd" => st.cap_bnd = cap(value)?,
                "CapAmb" => st.cap_amb = Some(cap(value)?),
                _ => {}
            }
        }
        if let Some(k) = REQUIRED.iter().find(|k| !seen.contains(k)) {
            return Err(StatusError::Missing(k));
        }
        Ok(st)
    }

    /// Reads and parses `/proc/PID/status` (`pid` 0: this process).
    pub fn read(pid: i32) -> Result<ProcStatus, String> {
        let path = if pid == 0 {
            PathBuf::from("/proc/self/status")
        } else {
            PathBuf::from(format!("/proc/{pid}/status"))
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        ProcStatus::parse(&text).map_err(|e| e.to_string())
    }
}

/// One way a process differs from its profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// What was checked, named as in `/proc/PID/status` (`Uid`, `CapEff`…),
    /// or `root`, `ns/mnt`…, or `status` when nothing could be read.
    pub field: String,
    pub expected: String,
    pub observed: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: expected {}, observed {}",
            self.field, self.expected, self.observed
        )
    }
}

/// Formats mismatches on one line, for a log.
pub fn describe(mismatches: &[Mismatch]) -> String {
    let v: Vec<String> = mismatches.iter().map(|m| m.to_string()).collect();
    v.join("; ")
}

/// Checks process `pid` from outside against `profile`, after it applied it.
///
/// What is expected:
///
/// * `Uid`, `Gid`: all four ids equal to the profile's; when the profile
///   keeps the ids, all four equal to each other, and not 0 unless
///   `allow_root`.
/// * `Groups`: exactly the profile's gid when it sets one (no group 0
///   when it keeps ids, unless `allow_root`).
/// * `NoNewPrivs: 1`; `Seccomp: 2` when the profile asks for a filter.
/// * `CapEff`, `CapPrm`, `CapInh`, `CapAmb` empty. `CapBnd` empty too when
///   the verifier itself holds `CAP_SETPCAP`: a worker it spawned had the
///   privilege to empty it. (A worker started unprivileged cannot empty its
///   bounding set; no_new_privs makes that set unusable to it anyway.)
/// * `/proc/PID/root`: the chroot directory, or `/` without one.
/// * `/proc/PID/ns/*`: different from the verifier's for each namespace
///   the profile unshares (`pid`: the namespace for its children, which
///   the kernel reports as absent until a first child exists in it).
pub fn verify(pid: i32, profile: &Profile) -> Result<(), Vec<Mismatch>> {
    let mut out = Vec::new();
    let mut miss = |field: &str, expected: String, observed: String| {
        out.push(Mismatch {
            field: field.to_string(),
            expected,
            observed,
        })
    };
    let st = match ProcStatus::read(pid) {
        Ok(st) => st,
        Err(e) => {
            miss("status", format!("/proc/{pid}/status readable"), e);
            return Err(out);
        }
    };

    for (field, ids, want) in [("Uid", st.uid, profile.uid), ("Gid", st.gid, profile.gid)] {
        let observed = format!("{} {} {} {}", ids[0], ids[1], ids[2], ids[3]);
        match want {
            Some(v) => {
                if ids.iter().any(|i| *i != v) {
                    miss(field, format!("{v} {v} {v} {v}"), observed);
                }
            }
            None => {
                if ids.iter().any(|i| *i != ids[0]) {
                    miss(field, "four equal ids".into(), observed);
                } else if ids[0] == 0 && !profile.allow_root {
                    miss(field, "not 0 (allow_root not set)".into(), observed);
                }
            }
        }
    }

    let groups = format!("{:?}", st.groups);
    match profile.gid {
        Some(g) => {
            if st.groups != [g] {
                miss("Groups", format!("[{g}]"), groups);
            }
        }
        None => {
            if st.groups.contains(&0) && !profile.allow_root {
                miss("Groups", "no group 0".into(), groups);
            }
        }
    }

    if st.no_new_privs != Some(true) {
        miss("NoNewPrivs", "1".into(), opt(st.no_new_privs.map(u8::from)));
    }
    if profile.seccomp.filtered() && st.seccomp != Some(2) {
        miss("Seccomp", "2 (filter)".into(), opt(st.seccomp));
    }

    for (field, v) in [
        ("CapEff", Some(st.cap_eff)),
        ("CapPrm", Some(st.cap_prm)),
        ("CapInh", Some(st.cap_inh)),
        ("CapAmb", st.cap_amb),
    ] {
        match v {
            Some(0) => {}
            Some(v) => miss(field, format!("{:016x}", 0), format!("{v:016x}")),
            // No ambient set on this kernel: nothing to hold either.
            None => {}
        }
    }
    let verifier_can_drop = sys::capget()
        .map(|c| c.effective & (1 << sys::CAP_SETPCAP) != 0)
        .unwrap_or(true);
    if verifier_can_drop && st.cap_bnd != 0 {
        miss(
            "CapBnd",
            format!("{:016x}", 0),
            format!("{:016x}", st.cap_bnd),
        );
    }

    let root_link = format!("/proc/{pid}/root");
    let want_root = match &profile.chroot {
        Some(dir) => std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone()),
        None => PathBuf::from("/"),
    };
    match std::fs::read_link(&root_link) {
        Ok(p) if p == want_root => {}
        Ok(p) => miss(
            "root",
            want_root.display().to_string(),
            p.display().to_string(),
        ),
        Err(e) => miss(
            "root",
            want_root.display().to_string(),
            format!("cannot read {root_link}: {e}"),
        ),
    }

    for (on, theirs, ours) in [
        (profile.unshare.mount, "mnt", "mnt"),
        (profile.unshare.ipc, "ipc", "ipc"),
        (profile.unshare.uts, "uts", "uts"),
        (profile.unshare.net, "net", "net"),
        (profile.unshare.pid, "pid_for_children", "pid"),
    ] {
        if !on {
            continue;
        }
        let field = format!("ns/{theirs}");
        let t = std::fs::read_link(format!("/proc/{pid}/ns/{theirs}"));
        let o = std::fs::read_link(Path::new("/proc/self/ns").join(ours));
        match (t, o) {
            (Ok(t), Ok(o)) if t != o => {}
            // The kernel answers ENOENT for a pid namespace created by
            // unshare until its first process (its init) exists: a new
            // namespace by construction, ours would read fine.
            (Err(e), Ok(_))
                if theirs == "pid_for_children"
                    && e.kind() == std::io::ErrorKind::NotFound
                    && Path::new(&format!("/proc/{pid}")).exists() => {}
            (Ok(t), Ok(o)) => miss(
                &field,
                format!("other than {}", o.display()),
                t.display().to_string(),
            ),
            (Err(e), _) | (_, Err(e)) => {
                miss(&field, "a new namespace".into(), format!("unreadable: {e}"))
            }
        }
    }

    if out.is_empty() {
        Ok(())
    } else {
        Err(out)
    }
}

fn opt<T: fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "absent".to_string(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from a worker sandboxed as nobody on Linux 6.18 (trimmed
    /// of the memory lines, which the parser skips anyway).
    const SANDBOXED: &str = "\
Name:\tbaton-static
Umask:\t0022
State:\tS (sleeping)
Tgid:\t4242
Ngid:\t0
Pid:\t4242
PPid:\t4200
TracerPid:\t0
Uid:\t65534\t65534\t65534\t65534
Gid:\t65534\t65534\t65534\t65534
FDSize:\t64
Groups:\t65534 
NStgid:\t4242
NSpid:\t4242
NSpgid:\t4200
NSsid:\t4100
Kthread:\t0
VmPeak:\t   10340 kB
VmRSS:\t    2176 kB
Threads:\t1
SigQ:\t0/15515
SigPnd:\t0000000000000000
ShdPnd:\t0000000000000000
SigBlk:\t0000000000000000
SigIgn:\t0000000000001000
SigCgt:\t0000000000000440
CapInh:\t0000000000000000
CapPrm:\t0000000000000000
CapEff:\t0000000000000000
CapBnd:\t0000000000000000
CapAmb:\t0000000000000000
NoNewPrivs:\t1
Seccomp:\t2
Seccomp_filters:\t2
Speculation_Store_Bypass:\tthread vulnerable
SpeculationIndirectBranch:\tconditional enabled
Cpus_allowed:\tf
Cpus_allowed_list:\t0-3
Mems_allowed:\t00000000,00000001
Mems_allowed_list:\t0
voluntary_ctxt_switches:\t3
nonvoluntary_ctxt_switches:\t0
x86_Thread_features:\t
x86_Thread_features_locked:\t
";

    #[test]
    fn parses_a_sandboxed_worker() {
        let st = ProcStatus::parse(SANDBOXED).unwrap();
        assert_eq!(st.name, "baton-static");
        assert_eq!(st.threads, Some(1));
        assert_eq!(st.uid, [65534; 4]);
        assert_eq!(st.gid, [65534; 4]);
        assert_eq!(st.groups, vec![65534]);
        assert_eq!(st.no_new_privs, Some(true));
        assert_eq!(st.seccomp, Some(2));
        assert_eq!(st.seccomp_filters, Some(2));
        assert_eq!(
            (st.cap_inh, st.cap_prm, st.cap_eff, st.cap_bnd, st.cap_amb),
            (0, 0, 0, 0, Some(0))
        );
    }

    #[test]
    fn parses_root_and_old_kernels() {
        let text = SANDBOXED
            .replace("Uid:\t65534\t65534\t65534\t65534", "Uid:\t0\t0\t0\t0")
            .replace("Groups:\t65534 ", "Groups:\t0 1 2 ")
            .replace("CapEff:\t0000000000000000", "CapEff:\t000001ffffffffff")
            .replace("NoNewPrivs:\t1\n", "")
            .replace("CapAmb:\t0000000000000000\n", "");
        let st = ProcStatus::parse(&text).unwrap();
        assert_eq!(st.uid, [0; 4]);
        assert_eq!(st.groups, vec![0, 1, 2]);
        assert_eq!(st.cap_eff, 0x1ff_ffff_ffff);
        assert_eq!(st.no_new_privs, None);
        assert_eq!(st.cap_amb, None);
        // No supplementary group at all: an empty Groups line.
        let st = ProcStatus::parse(&SANDBOXED.replace("Groups:\t65534 ", "Groups:\t")).unwrap();
        assert!(st.groups.is_empty());
    }

    #[test]
    fn refuses_malformed_status() {
        let cases: [(&str, &str); 7] = [
            (
                "Uid:\t65534\t65534\t65534\t65534",
                "Uid:\t65534\t65534\t65534",
            ),
            ("Uid:\t65534\t65534\t65534\t65534", "Uid:\t1 2 3 4 5"),
            ("Gid:\t65534\t65534\t65534\t65534", "Gid:\t-1 0 0 0"),
            ("CapEff:\t0000000000000000", "CapEff:\t00"),
            ("CapBnd:\t0000000000000000", "CapBnd:\tzzzzzzzzzzzzzzzz"),
            ("Seccomp:\t2", "Seccomp:\t3"),
            ("NoNewPrivs:\t1", "NoNewPrivs:\tyes"),
        ];
        for (from, to) in cases {
            let text = SANDBOXED.replace(from, to);
            assert!(
                matches!(ProcStatus::parse(&text), Err(StatusError::Malformed { .. })),
                "{to}"
            );
        }
        let no_uid = SANDBOXED.replace("Uid:\t65534\t65534\t65534\t65534\n", "");
        assert_eq!(ProcStatus::parse(&no_uid), Err(StatusError::Missing("Uid")));
        let twice = format!("{SANDBOXED}CapEff:\t0000000000000000\n");
        assert_eq!(
            ProcStatus::parse(&twice),
            Err(StatusError::Duplicate("CapEff"))
        );
        assert!(ProcStatus::parse("").is_err());
        assert!(ProcStatus::parse("garbage\n\0\u{fffd}").is_err());
    }

    #[test]
    fn reads_this_process() {
        let st = ProcStatus::read(0).unwrap();
        let (r, e, s) = sys::getresuid();
        assert_eq!(&st.uid[..3], &[r, e, s]);
        assert!(st.threads.unwrap_or(1) >= 1);
    }

    #[test]
    fn verify_reports_an_unsandboxed_process() {
        // This test process has applied no sandbox: no_new_privs is off, no
        // filter, and (as root) capabilities are held.
        let profile = Profile {
            uid: Some(12345),
            gid: Some(12345),
            chroot: Some(PathBuf::from("/nonexistent-jail")),
            ..Profile::default()
        };
        let m = verify(std::process::id() as i32, &profile).unwrap_err();
        let fields: Vec<&str> = m.iter().map(|m| m.field.as_str()).collect();
        for f in ["Uid", "Gid", "Groups", "NoNewPrivs", "root"] {
            assert!(fields.contains(&f), "{f} missing from {}", describe(&m));
        }
        let m = verify(i32::MAX, &profile).unwrap_err();
        assert_eq!(m[0].field, "status");
    }
}
