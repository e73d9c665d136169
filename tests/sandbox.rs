//! Privilege separation, proven: workers inspected from outside through
//! /proc, `baton audit` from inside, forbidden syscalls, and sandbox
//! options that cannot work. Needs root (setuid, chroot): as another user
//! each test prints why it skips.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{bin, echo_many, is_root, Baton};

macro_rules! need_root {
    ($name:expr) => {
        if !is_root() {
            eprintln!(
                "SKIPPED {}: needs root to run workers as another user and chroot them",
                $name
            );
            return;
        }
    };
}

fn status_field(pid: i32, name: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
}

#[test]
fn workers_run_confined_as_proc_shows_and_serve_across_the_uid_boundary() {
    need_root!("workers_run_confined_as_proc_shows_and_serve_across_the_uid_boundary");
    let jail = common::tempdir("baton-jail");
    let jail_s = jail.display().to_string();
    let echo = bin("baton-echo").display().to_string();
    let mut b = Baton::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--user",
            "nobody",
            "--chroot",
            &jail_s,
            "--unshare",
            "ipc,uts",
            "--",
            &echo,
        ],
        2,
    );
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("lookup")
        .expect("nobody");
    let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());
    let pids = b.worker_pids();
    assert_eq!(pids.len(), 2);
    for pid in pids {
        assert_eq!(status_field(pid, "Uid"), format!("{uid} {uid} {uid} {uid}"));
        assert_eq!(status_field(pid, "Gid"), format!("{gid} {gid} {gid} {gid}"));
        assert_eq!(status_field(pid, "Groups"), gid.to_string());
        assert_eq!(status_field(pid, "NoNewPrivs"), "1");
        assert_eq!(status_field(pid, "Seccomp"), "2", "filter mode");
        for set in ["CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"] {
            assert_eq!(status_field(pid, set), "0000000000000000", "{set}");
        }
        let root = std::fs::read_link(format!("/proc/{pid}/root")).expect("root link");
        assert_eq!(root, jail, "chrooted");
        let own_ipc = std::fs::read_link("/proc/self/ns/ipc").expect("ns");
        let its_ipc = std::fs::read_link(format!("/proc/{pid}/ns/ipc")).expect("ns");
        assert_ne!(own_ipc, its_ipc, "own ipc namespace");
    }
    // The acceptor (root) hands sockets to workers running as nobody.
    let (ok, errors) = echo_many(b.addr(), 50);
    assert_eq!(ok, 50, "{errors:?}");
    // And keeps only the capabilities it needs.
    let cap_eff = u64::from_str_radix(&status_field(b.pid(), "CapEff"), 16).expect("hex");
    let sys_admin_module = 1u64 << 16; // CAP_SYS_MODULE
    let net_admin = 1u64 << 12; // CAP_NET_ADMIN
    assert_eq!(
        cap_eff & (sys_admin_module | net_admin),
        0,
        "acceptor dropped the rest"
    );
    assert_ne!(cap_eff, 0);
    b.stop();
    let _ = std::fs::remove_dir_all(&jail);
}

#[test]
fn baton_audit_proves_the_sandbox_from_inside() {
    need_root!("baton_audit_proves_the_sandbox_from_inside");
    let jail = common::tempdir("baton-audit");
    let out = Command::new(bin("baton"))
        .args(["audit", "--user", "nobody", "--chroot"])
        .arg(&jail)
        .arg("--json")
        .output()
        .expect("run audit");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(report["pass"], true);
    let rows = report["rows"].as_array().expect("rows");
    for property in [
        "outside view",
        "uid",
        "gid",
        "groups",
        "setuid(0) refused",
        "setgid(0) refused",
        "setgroups refused",
        "/etc/shadow unreadable",
        "outside the chroot unreachable",
        "/ not writable",
        "no_new_privs",
        "seccomp mode",
        "seccomp refuses an unlisted call",
        "capabilities: effective",
        "capabilities: permitted",
        "capabilities: ambient",
        "raw sockets refused",
        "bind below 1024 refused",
        "ptrace of another process refused",
        "only expected fds open",
    ] {
        let row = rows
            .iter()
            .find(|r| r["property"] == property)
            .unwrap_or_else(|| panic!("row {property:?} in {stdout}"));
        assert_eq!(row["status"], "pass", "{row}");
        assert!(!row["tried"].as_str().unwrap_or_default().is_empty());
    }
    // The table form says the same.
    let out = Command::new(bin("baton"))
        .args(["audit", "--user", "nobody"])
        .output()
        .expect("run audit");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(
        table.starts_with("PROPERTY") && table.contains(" 0 failed"),
        "{table}"
    );
    let _ = std::fs::remove_dir_all(&jail);
}

#[test]
fn a_forbidden_syscall_is_refused_and_the_worker_restarted_with_backoff() {
    need_root!("a_forbidden_syscall_is_refused_and_the_worker_restarted_with_backoff");
    let chaos = bin("baton-chaos").display().to_string();
    let mut b = Baton::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--",
            &chaos,
            "--mode",
            "forbidden",
            "--bad-workers",
            "1",
        ],
        1,
    );
    let exited = b
        .find(Duration::from_secs(20), |l| {
            l.message() == "worker exited" && l.field("worker").as_deref() == Some("1")
        })
        .expect("worker 1 exits");
    assert!(
        exited.raw.contains("exit code 4"),
        "execve refused with EPERM: {}",
        exited.raw
    );
    let restarting = b
        .find(Duration::from_secs(20), |l| {
            l.message() == "worker restarting" && l.field("worker").as_deref() == Some("1")
        })
        .expect("restarted");
    assert_eq!(restarting.field("delay_ms").as_deref(), Some("100"));
    b.wait_for("worker ready", Duration::from_secs(20));
    let (ok, errors) = echo_many(b.addr(), 20);
    assert_eq!(ok, 20, "{errors:?}");
    b.stop();
}

#[test]
fn sandbox_options_that_cannot_work_stop_with_a_clear_error() {
    need_root!("sandbox_options_that_cannot_work_stop_with_a_clear_error");
    let echo = bin("baton-echo").display().to_string();
    let run = |args: &[&str]| {
        let out = Command::new(bin("baton"))
            .args(["--no-control", "--listen", "127.0.0.1:0"])
            .args(args)
            .arg("--")
            .arg(&echo)
            .output()
            .expect("run baton");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--chroot", "/nonexistent/jail"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--chroot /nonexistent/jail") && err.contains("No such file"),
        "{err}"
    );
    let (code, err) = run(&["--user", "no-such-user-here"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--user no-such-user-here: no such user"),
        "{err}"
    );
    let (code, err) = run(&["--seccomp", "paranoid"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("paranoid"), "{err}");
    let (code, err) = run(&["--no-sandbox"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--allow-root-workers"), "{err}");

    // A worker whose sandbox cannot be applied does not start, is not
    // restarted, and the log says why.
    let chaos = bin("baton-chaos").display().to_string();
    let mut b = Baton::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--",
            &chaos,
            "--mode",
            "threads-then-sandbox",
        ],
        0,
    );
    let st = b.wait_exit(Duration::from_secs(30));
    assert_eq!(st.code(), Some(1), "no worker left");
    assert!(
        b.seen.iter().any(|l| l
            .message()
            .starts_with("worker could not apply its sandbox")),
        "the reason is logged"
    );
    assert_eq!(b.count("worker restarting"), 0, "no crash loop");
    assert!(
        b.seen.iter().any(|l| l.raw.contains("preflight")),
        "the worker's own error names the step"
    );
}

#[test]
fn unprivileged_baton_works_and_audit_says_what_is_available() {
    need_root!("unprivileged_baton_works_and_audit_says_what_is_available (it uses setpriv to become nobody)");
    let as_nobody = || {
        let mut c = Command::new("setpriv");
        c.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"]);
        c
    };
    let out = as_nobody()
        .arg(bin("baton"))
        .args(["audit", "--json"])
        .output()
        .expect("audit as nobody");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let rows = report["rows"].as_array().expect("rows");
    assert!(
        rows.iter().any(|r| r["status"] == "skip"),
        "some protections need root: {stdout}"
    );
    let seccomp = rows
        .iter()
        .find(|r| r["property"] == "seccomp mode")
        .expect("seccomp row");
    assert_eq!(seccomp["status"], "pass", "seccomp works unprivileged");

    let mut cmd = as_nobody();
    cmd.arg(bin("baton"));
    let echo = bin("baton-echo").display().to_string();
    let mut b = Baton::start_with(
        cmd,
        &[
            "--no-control",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--",
            &echo,
        ],
        1,
    );
    let pid = b.worker_pids()[0];
    assert!(status_field(pid, "Uid").starts_with("65534 "));
    assert_eq!(status_field(pid, "Seccomp"), "2");
    let (ok, errors) = echo_many(b.addr(), 10);
    assert_eq!(ok, 10, "{errors:?}");
    b.stop();
}

#[test]
fn baton_static_serves_files_from_its_chroot_with_the_full_sandbox_and_sendfile() {
    need_root!("baton_static_serves_files_from_its_chroot_with_the_full_sandbox_and_sendfile");
    use std::os::unix::fs::PermissionsExt;
    let jail = common::tempdir("baton-static-jail");
    std::fs::set_permissions(&jail, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // 24 MiB of varied bytes: well above the sendfile threshold.
    let big: Vec<u8> = (0..24u32 * 1024 * 1024)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(jail.join("big.bin"), &big).expect("write");
    std::fs::write(jail.join("index.html"), b"<h1>jailed</h1>\n").expect("write");
    for f in ["big.bin", "index.html"] {
        std::fs::set_permissions(jail.join(f), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
    }
    let jail_s = jail.display().to_string();
    let worker = bin("baton-static").display().to_string();
    let mut b = Baton::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--user",
            "nobody",
            "--chroot",
            &jail_s,
            "--",
            &worker,
            "--root",
            "/",
            "--access-log",
            "off",
        ],
        2,
    );
    for pid in b.worker_pids() {
        assert_eq!(status_field(pid, "Seccomp"), "2");
        assert_eq!(status_field(pid, "NoNewPrivs"), "1");
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/root")).expect("root"),
            jail
        );
    }
    let out = Command::new("curl")
        .args(["-s", "-f", &format!("http://{}/big.bin", b.addr())])
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), big.len());
    assert!(
        out.stdout == big,
        "the large file arrives intact through sendfile"
    );
    let out = Command::new("curl")
        .args(["-s", "-f", &format!("http://{}/", b.addr())])
        .output()
        .expect("curl");
    assert_eq!(out.stdout, b"<h1>jailed</h1>\n");
    // Nothing outside the jail: the host's /etc/passwd is not there.
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{}/etc/passwd", b.addr()),
        ])
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    b.stop();
    let _ = std::fs::remove_dir_all(&jail);
}
