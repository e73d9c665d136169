//! `baton audit`'s probe: run inside a sandboxed worker, it tries to break
//! out and reports, property by property, what it tried and what happened.
//!
//! [`run_probe`] must run in the process that called
//! [`apply`](super::apply), after it succeeded: the same code path as a real
//! worker, not a simulation. It opens nothing before listing descriptors,
//! needs no `/proc` (which a jail usually lacks), and every attempt that
//! unexpectedly succeeds is undone where it can be (a created file is
//! removed, a forked child exits at once, a socket is closed).
//!
//! Each [`Row`] is `pass` (the property holds), `fail` (it does not: the
//! audit fails) or `skip` (the profile does not ask for it, or this process
//! could not have had it; the row says which).

use std::fmt;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::resource::Resource;
use serde::{Deserialize, Serialize};

use super::profile::{Profile, SeccompMode};
use super::sys;

/// The outcome of one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Fail => "fail",
            Status::Skip => "skip",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One checked property.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// What is checked, e.g. `uid`, `setuid(0)`, `seccomp`.
    pub property: String,
    /// What the probe did to check it.
    pub tried: String,
    /// What the profile says should happen.
    pub expected: String,
    /// What happened.
    pub observed: String,
    pub status: Status,
}

impl Row {
    fn new(property: &str, tried: &str, expected: impl Into<String>) -> Row {
        Row {
            property: property.to_string(),
            tried: tried.to_string(),
            expected: expected.into(),
            observed: String::new(),
            status: Status::Fail,
        }
    }

    fn verdict(mut self, pass: bool, observed: impl Into<String>) -> Row {
        self.observed = observed.into();
        self.status = if pass { Status::Pass } else { Status::Fail };
        self
    }

    fn skip(mut self, observed: impl Into<String>) -> Row {
        self.observed = observed.into();
        self.status = Status::Skip;
        self
    }

    /// The row does not fail (pass or skip).
    pub fn ok(&self) -> bool {
        self.status != Status::Fail
    }
}

/// The probe's rows, as `baton audit --json` prints them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Format version of this JSON (1).
    pub version: u32,
    /// No row failed.
    pub pass: bool,
    pub rows: Vec<Row>,
}

impl Report {
    pub fn new(rows: Vec<Row>) -> Report {
        Report {
            version: 1,
            pass: rows.iter().all(Row::ok),
            rows,
        }
    }

    /// One line of JSON (for a pipe between the probe and the acceptor).
    pub fn to_json(&self) -> String {
        // Serializing plain strings and enums cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Indented JSON, for people.
    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn from_json(s: &str) -> Result<Report, serde_json::Error> {
        serde_json::from_str(s)
    }

    /// The aligned text table.
    pub fn to_table(&self) -> String {
        render_table(&self.rows)
    }

    /// `(passed, failed, skipped)`.
    pub fn counts(&self) -> (usize, usize, usize) {
        let n = |s| self.rows.iter().filter(|r| r.status == s).count();
        (n(Status::Pass), n(Status::Fail), n(Status::Skip))
    }
}

/// Renders rows as an aligned text table with a summary line:
///
/// ```text
/// PROPERTY    TRIED           EXPECTED          OBSERVED                     RESULT
/// setuid(0)   setuid(0)       refused           refused: EPERM (...)         pass
/// ...
/// 21 passed, 0 failed, 3 skipped
/// ```
pub fn render_table(rows: &[Row]) -> String {
    const HEAD: [&str; 5] = ["PROPERTY", "TRIED", "EXPECTED", "OBSERVED", "RESULT"];
    let cells: Vec<[&str; 5]> = rows
        .iter()
        .map(|r| {
            [
                r.property.as_str(),
                r.tried.as_str(),
                r.expected.as_str(),
                r.observed.as_str(),
                r.status.as_str(),
            ]
        })
        .collect();
    let mut width = HEAD.map(|h| h.chars().count());
    for c in &cells {
        for (w, s) in width.iter_mut().zip(c) {
            *w = (*w).max(s.chars().count());
        }
    }
    let line = |c: &[&str; 5]| {
        let mut s = String::new();
        for (i, (cell, w)) in c.iter().zip(width).enumerate() {
            if i + 1 == c.len() {
                s.push_str(cell);
            } else {
                s.push_str(cell);
                s.push_str(&" ".repeat(w - cell.chars().count() + 2));
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(&HEAD);
    for c in &cells {
        out.push_str(&line(c));
    }
    let n = |st| rows.iter().filter(|r| r.status == st).count();
    out.push_str(&format!(
        "{} passed, {} failed, {} skipped\n",
        n(Status::Pass),
        n(Status::Fail),
        n(Status::Skip)
    ));
    out
}

fn refused(r: Result<(), Errno>) -> (bool, String) {
    match r {
        Ok(()) => (false, "succeeded".to_string()),
        Err(e) => (true, format!("refused: {}", errno_str(e))),
    }
}

fn errno_str(e: Errno) -> String {
    format!("{e:?} ({})", e.desc())
}

fn ids(t: (u32, u32, u32)) -> String {
    format!("{}/{}/{}", t.0, t.1, t.2)
}

/// Runs every check inside the sandbox applied by
/// [`apply`](super::apply) in this process, and returns the rows in order.
///
/// Attempts that change the process (setuid, a user namespace) come last,
/// so that an unexpected success cannot spoil the rows before it.
pub fn run_probe(profile: &Profile) -> Vec<Row> {
    let rec = super::record();
    let mut rows = Vec::new();

    // Descriptors first, before this probe opens anything.
    rows.push(fds_row(profile));

    rows.push(match rec {
        Some(r) => Row::new("sandbox applied", "apply() in this process", "applied").verdict(
            true,
            format!(
                "applied{}",
                if r.applied.notes.is_empty() {
                    String::new()
                } else {
                    format!("; notes: {}", r.applied.notes.join("; "))
                }
            ),
        ),
        None => Row::new("sandbox applied", "apply() in this process", "applied")
            .verdict(false, "apply() did not run (or failed) in this process"),
    });
    let started_root = rec.is_some_and(|r| r.applied.started_as_root);

    // Ids.
    let uid = sys::getresuid();
    let gid = sys::getresgid();
    for (prop, got, want) in [("uid", uid, profile.uid), ("gid", gid, profile.gid)] {
        let tried = if prop == "uid" {
            "getresuid()"
        } else {
            "getresgid()"
        };
        let all_eq = got.0 == got.1 && got.1 == got.2;
        rows.push(match want {
            Some(v) => Row::new(prop, tried, format!("real/effective/saved {v}/{v}/{v}"))
                .verdict(got == (v, v, v), ids(got)),
            None => {
                let expected = if profile.allow_root {
                    "unchanged, all three equal"
                } else {
                    "unchanged, all three equal, not 0"
                };
                Row::new(prop, tried, expected)
                    .verdict(all_eq && (profile.allow_root || got.0 != 0), ids(got))
            }
        });
    }
    let groups = sys::getgroups();
    let groups_s = match &groups {
        Ok(g) => format!("{g:?}"),
        Err(e) => format!("getgroups failed: {}", errno_str(*e)),
    };
    rows.push(match (profile.gid, &groups) {
        (_, Err(_)) => Row::new("groups", "getgroups()", "readable").verdict(false, groups_s),
        (Some(g), Ok(v)) if started_root => {
            Row::new("groups", "getgroups()", format!("[{g}]")).verdict(*v == [g], groups_s)
        }
        (_, Ok(v)) => {
            let row = Row::new("groups", "getgroups()", "no group 0");
            if v.contains(&0) && !profile.allow_root {
                row.verdict(false, groups_s)
            } else if started_root {
                row.verdict(true, groups_s)
            } else {
                row.skip(format!(
                    "{groups_s} (started unprivileged: setgroups needs CAP_SETGID)"
                ))
            }
        }
    });

    // Capabilities.
    match sys::capget() {
        Ok(c) => {
            for (set, v) in [
                ("effective", c.effective),
                ("permitted", c.permitted),
                ("inheritable", c.inheritable),
            ] {
                rows.push(
                    Row::new(&format!("capabilities: {set}"), "capget()", "empty")
                        .verdict(v == 0, format!("{v:#018x}")),
                );
            }
        }
        Err(e) => rows.push(
            Row::new("capabilities", "capget()", "empty")
                .verdict(false, format!("capget failed: {}", errno_str(e))),
        ),
    }
    rows.push(match sys::ambient_set() {
        Ok(v) => Row::new(
            "capabilities: ambient",
            "prctl(PR_CAP_AMBIENT_IS_SET) for each",
            "empty",
        )
        .verdict(v == 0, format!("{v:#018x}")),
        Err(e) => Row::new(
            "capabilities: ambient",
            "prctl(PR_CAP_AMBIENT_IS_SET) for each",
            "empty",
        )
        .verdict(false, errno_str(e)),
    });
    let bnd_row = Row::new(
        "capabilities: bounding",
        "prctl(PR_CAPBSET_READ) for each",
        "empty",
    );
    rows.push(match sys::bounding_set() {
        Ok(0) => bnd_row.verdict(true, format!("{:#018x}", 0)),
        Ok(v) if started_root => bnd_row.verdict(false, format!("{v:#018x}")),
        Ok(v) => bnd_row.skip(format!(
            "{v:#018x} (started unprivileged: emptying it needs CAP_SETPCAP; no_new_privs makes it unusable)"
        )),
        Err(e) => bnd_row.verdict(false, errno_str(e)),
    });

    // no_new_privs, seccomp.
    rows.push(match sys::no_new_privs() {
        Ok(v) => Row::new("no_new_privs", "prctl(PR_GET_NO_NEW_PRIVS)", "1")
            .verdict(v, if v { "1" } else { "0" }),
        Err(e) => {
            Row::new("no_new_privs", "prctl(PR_GET_NO_NEW_PRIVS)", "1").verdict(false, errno_str(e))
        }
    });
    let mode = sys::seccomp_mode();
    let mode_s = match mode {
        Ok(2) => "2 (filter)".to_string(),
        Ok(m) => m.to_string(),
        Err(e) => errno_str(e),
    };
    let filtered = profile.seccomp.filtered();
    rows.push(if filtered {
        Row::new("seccomp mode", "prctl(PR_GET_SECCOMP)", "2 (filter)")
            .verdict(mode == Ok(2), mode_s)
    } else {
        Row::new("seccomp mode", "prctl(PR_GET_SECCOMP)", "any (seccomp=off)").skip(mode_s)
    });
    let forbidden = Row::new(
        "seccomp refuses an unlisted call",
        "getppid(), which the kernel itself never refuses",
        "refused",
    );
    rows.push(match sys::raw_getppid() {
        Err(e) if filtered => forbidden.verdict(true, format!("refused: {}", errno_str(e))),
        Ok(v) if filtered => forbidden.verdict(false, format!("succeeded: {v}")),
        r => forbidden.skip(format!(
            "seccomp=off; {}",
            match r {
                Ok(v) => format!("succeeded: {v}"),
                Err(e) => format!("refused: {}", errno_str(e)),
            }
        )),
    });

    // Files.
    let shadow = sys::open(Path::new("/etc/shadow"), libc::O_RDONLY, 0);
    rows.push(
        Row::new(
            "/etc/shadow unreadable",
            "open(\"/etc/shadow\", O_RDONLY)",
            "refused",
        )
        .verdict(
            shadow.is_err(),
            match shadow {
                Ok(fd) => {
                    sys::close(fd);
                    "opened".to_string()
                }
                Err(e) => format!("refused: {}", errno_str(e)),
            },
        ),
    );
    rows.push(outside_row(profile, rec));
    let probe_file = Path::new("/.baton-audit-probe");
    let w = sys::open(
        probe_file,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
        0o600,
    );
    rows.push(
        Row::new(
            "/ not writable",
            "open(\"/.baton-audit-probe\", O_WRONLY|O_CREAT|O_EXCL)",
            "refused",
        )
        .verdict(
            w.is_err(),
            match w {
                Ok(fd) => {
                    sys::close(fd);
                    sys::unlink(probe_file);
                    "created (and removed)".to_string()
                }
                Err(e) => format!("refused: {}", errno_str(e)),
            },
        ),
    );

    // Network.
    let (raw_ok, raw_obs) = sockets_refused(&[
        (
            "socket(AF_INET, SOCK_RAW, IPPROTO_ICMP)",
            libc::AF_INET,
            libc::SOCK_RAW,
            libc::IPPROTO_ICMP,
        ),
        (
            "socket(AF_PACKET, SOCK_RAW)",
            libc::AF_PACKET,
            libc::SOCK_RAW,
            0,
        ),
    ]);
    rows.push(
        Row::new(
            "raw sockets refused",
            "socket(AF_INET, SOCK_RAW), socket(AF_PACKET, SOCK_RAW)",
            "refused",
        )
        .verdict(raw_ok, raw_obs),
    );
    rows.push(bind_row());
    if profile.seccomp == SeccompMode::Proxy {
        rows.extend(proxy_rows());
    }

    // Other processes.
    let pt = sys::ptrace_seize(1);
    if pt.is_ok() {
        sys::ptrace_detach(1);
    }
    let (ok, obs) = refused(pt);
    rows.push(
        Row::new(
            "ptrace of another process refused",
            "ptrace(PTRACE_SEIZE, pid 1): the PTRACE_ATTACH permission check, without stopping it",
            "refused",
        )
        .verdict(ok, obs),
    );
    let fork_row = Row::new("fork refused", "fork()", "refused");
    rows.push(if profile.no_fork || filtered {
        let (ok, obs) = refused(sys::try_fork());
        fork_row.verdict(ok, obs)
    } else {
        fork_row.skip("not attempted: the profile allows fork (no_fork=0, seccomp=off)")
    });

    // Limits.
    rows.push(rlimit_row(
        "core dumps off",
        Resource::RLIMIT_CORE,
        profile.core0.then_some(0),
        "core0=0",
    ));
    rows.push(rlimit_row(
        "process limit 0",
        Resource::RLIMIT_NPROC,
        profile.no_fork.then_some(0),
        "no_fork=0",
    ));
    let nofile_row = Row::new(
        "open-file limit",
        "getrlimit(RLIMIT_NOFILE)",
        profile
            .nofile
            .map_or_else(|| "unchanged".to_string(), |n| format!("soft >= {n}")),
    );
    rows.push(
        match (sys::getrlimit(Resource::RLIMIT_NOFILE), profile.nofile) {
            (Ok((soft, hard)), Some(n)) => {
                nofile_row.verdict(soft >= n, format!("soft {soft}, hard {hard}"))
            }
            (Ok((soft, hard)), None) => nofile_row.skip(format!("soft {soft}, hard {hard}")),
            (Err(e), _) => nofile_row.verdict(false, errno_str(e)),
        },
    );

    // Attempts that would change this process if they succeeded: last.
    let (ok, obs) = refused(sys::raw_setgroups(&[0]));
    rows.push(Row::new("setgroups refused", "setgroups([0])", "refused").verdict(ok, obs));
    let (ok, obs) = refused(sys::raw_setgid(0));
    rows.push(gain_row(
        "setgid(0) refused",
        "setgid(0)",
        ok,
        obs,
        profile,
        gid,
    ));
    let (ok, obs) = refused(sys::raw_setuid(0));
    rows.push(gain_row(
        "setuid(0) refused",
        "setuid(0)",
        ok,
        obs,
        profile,
        uid,
    ));
    let (ok, obs) = refused(sys::try_new_userns());
    rows.push(
        Row::new(
            "user namespace refused",
            "unshare(CLONE_NEWUSER), which would grant every capability inside it",
            "refused",
        )
        .verdict(ok, obs),
    );
    rows
}

/// setuid(0)/setgid(0): must be refused, unless the process runs as root
/// by the operator's choice (then succeeding changes nothing).
fn gain_row(
    prop: &str,
    tried: &str,
    refused: bool,
    obs: String,
    profile: &Profile,
    before: (u32, u32, u32),
) -> Row {
    let row = Row::new(prop, tried, "refused");
    if !refused && profile.allow_root && before == (0, 0, 0) {
        row.skip(format!("{obs} (already 0, allow_root)"))
    } else {
        row.verdict(refused, obs)
    }
}

fn fds_row(profile: &Profile) -> Row {
    let mut expected: Vec<i32> = vec![0, 1, 2];
    expected.extend(profile.keep_fds.iter().copied().filter(|fd| *fd > 2));
    expected.sort_unstable();
    expected.dedup();
    let row = Row::new(
        "only expected fds open",
        "poll() on every fd below RLIMIT_NOFILE",
        format!("a subset of {expected:?} with every kept fd"),
    );
    let limit = sys::getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
    match sys::open_fds(limit) {
        Ok(open) => {
            let extra = open.iter().any(|fd| !expected.contains(fd));
            let missing = profile.keep_fds.iter().any(|fd| !open.contains(fd));
            row.verdict(!extra && !missing, format!("{open:?}"))
        }
        Err(e) => row.verdict(false, format!("poll failed: {}", errno_str(e))),
    }
}

fn outside_row(profile: &Profile, rec: Option<&super::Record>) -> Row {
    let Some(dir) = &profile.chroot else {
        return Row::new(
            "outside the chroot unreachable",
            "stat of /.., the jail's host path",
            "unreachable",
        )
        .skip("no chroot in the profile");
    };
    let tried = format!(
        "stat(\"/\"), stat(\"/..\"), stat(\"/../..\"), stat({:?}), stat(\"/proc/1/root\")",
        dir.display().to_string()
    );
    let row = Row::new("outside the chroot unreachable", &tried, "only the jail");
    let Some((host, jail)) = rec.and_then(|r| Some((r.outside_root?, r.jail?))) else {
        return row.verdict(false, "no record of a chroot applied in this process");
    };
    let mut seen = Vec::new();
    let mut escaped = false;
    for p in ["/", "/..", "/../.."] {
        match sys::dev_ino(Path::new(p)) {
            Ok(id) if id == jail => seen.push(format!("{p}: the jail")),
            Ok(id) if id == host => {
                escaped = true;
                seen.push(format!("{p}: the HOST root"));
            }
            Ok(_) => {
                escaped = true;
                seen.push(format!("{p}: not the jail"));
            }
            Err(e) => {
                escaped = true;
                seen.push(format!("{p}: {}", errno_str(e)));
            }
        }
    }
    for p in [dir.as_path(), Path::new("/proc/1/root")] {
        match sys::dev_ino(p) {
            Ok(id) if id == host => {
                escaped = true;
                seen.push(format!("{}: the HOST root", p.display()));
            }
            Ok(_) => seen.push(format!("{}: inside the jail", p.display())),
            Err(e) => seen.push(format!("{}: {}", p.display(), errno_str(e))),
        }
    }
    row.verdict(!escaped, seen.join("; "))
}

/// What the `proxy` seccomp profile promises beyond the default one:
/// outbound TCP works, and nothing else about sockets does.
fn proxy_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    let connect_row = Row::new(
        "proxy: outbound connect allowed",
        "socket(AF_INET, SOCK_STREAM|SOCK_NONBLOCK), connect(127.0.0.1:1)",
        "not refused by seccomp (any answer but EPERM)",
    );
    rows.push(
        match sys::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) {
            Err(e) => connect_row.verdict(false, format!("socket refused: {}", errno_str(e))),
            Ok(fd) => {
                let r = sys::connect_loopback_v4(fd, 1);
                sys::close(fd);
                match r {
                    Ok(()) => connect_row.verdict(true, "connected"),
                    Err(Errno::EPERM) => connect_row.verdict(false, "refused: EPERM"),
                    // ECONNREFUSED, EINPROGRESS, ENETUNREACH (unshare=net):
                    // the call reached the kernel.
                    Err(e) => {
                        connect_row.verdict(true, format!("reached the kernel: {}", errno_str(e)))
                    }
                }
            }
        },
    );
    let bind_any = Row::new(
        "proxy: bind refused",
        "socket(AF_INET, SOCK_STREAM), bind(0.0.0.0:0), listen()",
        "refused",
    );
    rows.push(match sys::socket(libc::AF_INET, libc::SOCK_STREAM, 0) {
        Err(e) => bind_any.verdict(
            false,
            format!("inconclusive: socket refused: {}", errno_str(e)),
        ),
        Ok(fd) => {
            let b = sys::bind_any_v4(fd, 0);
            let l = sys::listen(fd);
            sys::close(fd);
            let (ok_b, obs_b) = refused(b);
            let (ok_l, obs_l) = refused(l);
            bind_any.verdict(ok_b && ok_l, format!("bind: {obs_b}; listen: {obs_l}"))
        }
    });
    let (ok, obs) = sockets_refused(&[
        (
            "socket(AF_UNIX, SOCK_STREAM)",
            libc::AF_UNIX,
            libc::SOCK_STREAM,
            0,
        ),
        (
            "socket(AF_INET, SOCK_DGRAM)",
            libc::AF_INET,
            libc::SOCK_DGRAM,
            0,
        ),
        (
            "socket(AF_NETLINK, SOCK_RAW)",
            libc::AF_NETLINK,
            libc::SOCK_RAW,
            0,
        ),
    ]);
    rows.push(
        Row::new(
            "proxy: other sockets refused",
            "socket(AF_UNIX), socket(AF_INET, SOCK_DGRAM), socket(AF_NETLINK)",
            "refused",
        )
        .verdict(ok, obs),
    );
    rows
}

/// Tries to create each `(name, domain, type, protocol)` socket: whether
/// every one was refused, and what happened to each.
fn sockets_refused(list: &[(&str, libc::c_int, libc::c_int, libc::c_int)]) -> (bool, String) {
    let mut ok = true;
    let mut obs = Vec::new();
    for &(name, dom, ty, proto) in list {
        match sys::socket(dom, ty, proto) {
            Ok(fd) => {
                sys::close(fd);
                ok = false;
                obs.push(format!("{name}: succeeded"));
            }
            Err(e) => obs.push(format!("{name}: refused: {}", errno_str(e))),
        }
    }
    (ok, obs.join("; "))
}

fn bind_row() -> Row {
    let row = Row::new(
        "bind below 1024 refused",
        "socket(AF_INET, SOCK_STREAM), bind(0.0.0.0:1023)",
        "refused",
    );
    match sys::socket(libc::AF_INET, libc::SOCK_STREAM, 0) {
        Err(e) => row.verdict(true, format!("socket refused: {}", errno_str(e))),
        Ok(fd) => {
            let r = sys::bind_any_v4(fd, 1023);
            sys::close(fd);
            match r {
                Ok(()) => row.verdict(false, "bound"),
                Err(e @ (Errno::EACCES | Errno::EPERM)) => {
                    row.verdict(true, format!("bind refused: {}", errno_str(e)))
                }
                Err(Errno::EADDRINUSE) => row.verdict(
                    false,
                    "EADDRINUSE: the privileged-port check passed (the port is merely taken)",
                ),
                Err(e) => row.verdict(false, format!("inconclusive: {}", errno_str(e))),
            }
        }
    }
}

fn rlimit_row(prop: &str, res: Resource, want: Option<u64>, off: &str) -> Row {
    let name = format!("{res:?}");
    let row = Row::new(
        prop,
        &format!("getrlimit({name})"),
        want.map_or_else(|| format!("unchanged ({off})"), |w| format!("{w}/{w}")),
    );
    match (sys::getrlimit(res), want) {
        (Ok((s, h)), Some(w)) => row.verdict(s == w && h == w, format!("{s}/{h}")),
        (Ok((s, h)), None) => row.skip(format!("{s}/{h}")),
        (Err(e), _) => row.verdict(false, errno_str(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<Row> {
        vec![
            Row::new(
                "uid",
                "getresuid()",
                "real/effective/saved 65534/65534/65534",
            )
            .verdict(true, "65534/65534/65534"),
            Row::new("setuid(0) refused", "setuid(0)", "refused")
                .verdict(true, "refused: EPERM (Operation not permitted)"),
            Row::new("fork refused", "fork()", "refused").verdict(false, "succeeded"),
            Row::new("open-file limit", "getrlimit(RLIMIT_NOFILE)", "unchanged")
                .skip("soft 1024, hard 4096"),
        ]
    }

    #[test]
    fn table_is_aligned() {
        let t = render_table(&rows());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 6, "{t}");
        assert!(lines[0].starts_with("PROPERTY"));
        // Each column starts at the same offset on every line.
        let col = lines[0].find("EXPECTED").unwrap();
        for l in &lines[1..5] {
            let before: String = l.chars().take(col).collect();
            assert!(before.ends_with("  "), "{l:?}");
        }
        let res = lines[0].find("RESULT").unwrap();
        assert!(lines[1][res..].starts_with("pass"));
        assert!(lines[3][res..].starts_with("fail"));
        assert!(lines[4][res..].starts_with("skip"));
        assert_eq!(lines[5], "2 passed, 1 failed, 1 skipped");
    }

    #[test]
    fn json_roundtrip() {
        let r = Report::new(rows());
        assert!(!r.pass);
        assert_eq!(r.counts(), (2, 1, 1));
        let j = r.to_json();
        assert!(!j.contains('\n'));
        assert!(j.contains("\"status\":\"fail\""), "{j}");
        assert_eq!(Report::from_json(&j).unwrap(), r);
        assert_eq!(Report::from_json(&r.to_json_pretty()).unwrap(), r);
        assert!(Report::from_json("{\"version\":1}").is_err());
        let ok = Report::new(vec![rows()[0].clone(), rows()[3].clone()]);
        assert!(ok.pass);
    }
}
