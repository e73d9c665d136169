//! Several pools in one baton: `[[pool]]` sections, each with its own
//! listeners, worker command and workers, side by side; `ctl --pool`;
//! metrics labelled by pool; reload adding and removing a pool; the
//! configuration errors an operator meets first.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{bin, connect, echo_once, is_root, Baton};

/// `GET /` over HTTP/1.0: the whole response.
fn get(addr: SocketAddr) -> String {
    let mut s = connect(addr).expect("connect");
    s.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        .expect("send request");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read response");
    String::from_utf8_lossy(&out).into_owned()
}

/// A site to serve: `DIR/public/index.html`.
fn site(dir: &Path) -> std::path::PathBuf {
    let public = dir.join("public");
    std::fs::create_dir_all(&public).expect("mkdir public");
    std::fs::write(public.join("index.html"), "hello from the site pool\n").expect("write index");
    for d in [dir, public.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    public
}

fn echo() -> String {
    bin("baton-echo").display().to_string()
}

fn check(dir: &Path, file: &Path) -> (bool, String) {
    check_with(dir, file, &[])
}

/// `baton check FLAGS --config FILE` in `dir`: success, stdout and stderr.
fn check_with(dir: &Path, file: &Path, flags: &[&str]) -> (bool, String) {
    let out = Command::new(bin("baton"))
        .current_dir(dir)
        .arg("check")
        .args(flags)
        .arg("--config")
        .arg(file)
        .output()
        .expect("run baton check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn rows(b: &Baton, args: &[&str]) -> Vec<serde_json::Value> {
    let mut a = vec!["workers"];
    a.extend_from_slice(args);
    b.ctl_json(&a).as_array().cloned().expect("a list")
}

/// The two pools of the issue, on ports the kernel picks.
fn two_pools(dir: &Path) -> String {
    let public = site(dir);
    format!(
        "[[pool]]\nname = \"site\"\nlisten = [\"127.0.0.1:0\"]\nroot = \"{}\"\nworkers = 2\n\n\
         [[pool]]\nname = \"echo\"\nlisten = [\"127.0.0.1:0\"]\ncommand = [\"{}\"]\nworkers = 1\n",
        public.display(),
        echo()
    )
}

#[test]
fn two_pools_serve_side_by_side_each_with_its_own_workers() {
    let dir = common::tempdir("baton-pools");
    let file = dir.join("baton.toml");
    std::fs::write(&file, two_pools(&dir)).expect("write config");
    let (ok, text) = check(&dir, &file);
    assert!(ok, "{text}");
    assert!(
        text.contains("2 pools") && text.contains("pool site:") && text.contains("pool echo:"),
        "{text}"
    );

    let file_s = file.display().to_string();
    let mut b = Baton::start_counting(Command::new(bin("baton")), &["--config", &file_s], 2, 3);
    let (site_addr, echo_addr) = (b.addr_of("site"), b.addr_of("echo"));
    assert_ne!(site_addr, echo_addr);

    // Each listener reaches its own pool's workers.
    let page = get(site_addr);
    assert!(
        page.starts_with("HTTP/1.1 200") && page.contains("hello from the site pool"),
        "{page}"
    );
    for i in 0..5 {
        let msg = format!("ping {i}\n");
        let back = echo_once(echo_addr, msg.as_bytes()).expect("echo");
        assert_eq!(back, msg.as_bytes());
    }

    let all = rows(&b, &[]);
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(all.iter().filter(|r| r["pool"] == "site").count(), 2);
    let echo_rows = rows(&b, &["--pool", "echo"]);
    assert_eq!(echo_rows.len(), 1, "{echo_rows:?}");
    assert!(echo_rows[0]["handled"].as_u64() >= Some(5), "{echo_rows:?}");
    // Neither pool served the other's clients.
    let site_handled: u64 = all
        .iter()
        .filter(|r| r["pool"] == "site")
        .filter_map(|r| r["handled"].as_u64())
        .sum();
    assert_eq!(site_handled, 1, "{all:?}");

    // The table shows the pool.
    let (ok, table, _) = b.ctl(&["workers"]);
    assert!(ok && table.contains("POOL") && table.contains("site") && table.contains("echo"));

    // Status and metrics per pool.
    let status = b.ctl_json(&["status"]);
    let pools = status["pools"].as_array().cloned().expect("pools");
    let echo_status = pools
        .iter()
        .find(|p| p["name"] == "echo")
        .expect("echo pool");
    assert_eq!(echo_status["accepted"], 5, "{echo_status}");
    assert_eq!(echo_status["listeners"][0], echo_addr.to_string());
    let metrics = b.ctl_json(&["metrics"]);
    let metrics = metrics.as_str().expect("text");
    assert!(
        metrics.contains("baton_connections_accepted_total{pool=\"echo\"} 5")
            && metrics.contains("baton_connections_accepted_total{pool=\"site\"} 1")
            && metrics.contains("baton_workers{pool=\"site\",state=\"ready\"} 2"),
        "{metrics}"
    );
    b.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ctl_verbs_take_a_pool_and_need_one_when_there_are_several() {
    let dir = common::tempdir("baton-pools-ctl");
    let file = dir.join("baton.toml");
    std::fs::write(&file, two_pools(&dir)).expect("write config");
    let file_s = file.display().to_string();
    let mut b = Baton::start_counting(Command::new(bin("baton")), &["--config", &file_s], 2, 3);

    for verb in [&["add", "1"][..], &["remove", "--count", "1"], &["restart"]] {
        let (ok, _, err) = b.ctl(verb);
        assert!(
            !ok && err.contains("several pools") && err.contains("--pool"),
            "{verb:?}: {err}"
        );
    }
    let (ok, _, err) = b.ctl(&["add", "1", "--pool", "nope"]);
    assert!(!ok && err.contains("no pool named `nope`"), "{err}");

    let added = b.ctl_json(&["add", "1", "--pool", "echo"]);
    let new_id = added["added"][0].as_u64().expect("an id");
    b.wait_for("worker ready", Duration::from_secs(20));
    let echo_rows = rows(&b, &["--pool", "echo"]);
    assert_eq!(echo_rows.len(), 2, "{echo_rows:?}");
    assert!(echo_rows.iter().any(|r| r["id"] == new_id));
    assert_eq!(rows(&b, &["--pool", "site"]).len(), 2);

    // A rolling restart of one pool leaves the other alone.
    let site_before: Vec<u64> = rows(&b, &["--pool", "site"])
        .iter()
        .filter_map(|r| r["id"].as_u64())
        .collect();
    let r = b.ctl_json(&["restart", "--pool", "echo"]);
    assert_eq!(r["replacing"], 2, "{r}");
    b.wait_for(
        "rolling restart finished: every worker replaced",
        Duration::from_secs(60),
    );
    let site_after: Vec<u64> = rows(&b, &["--pool", "site"])
        .iter()
        .filter_map(|r| r["id"].as_u64())
        .collect();
    assert_eq!(site_before, site_after);

    // Removing the last worker of a pool warns about that pool.
    let (ok, out, _) = b.ctl(&["remove", "--count", "1", "--pool", "echo"]);
    assert!(
        ok && !out.contains("warning"),
        "one echo worker is left: {out}"
    );
    let (ok, out, err) = b.ctl(&["remove", "--count", "2", "--pool", "site"]);
    assert!(
        ok && out.contains("warning: that was the last worker of pool `site`"),
        "{out}{err}"
    );
    let echo_addr = b.addr_of("echo");
    assert_eq!(
        echo_once(echo_addr, b"still here\n").expect("echo"),
        b"still here\n"
    );
    b.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reload_adds_a_pool_then_removes_one() {
    let dir = common::tempdir("baton-pools-reload");
    let public = site(&dir);
    let file = dir.join("baton.toml");
    let site_section = format!(
        "[[pool]]\nname = \"site\"\nlisten = [\"127.0.0.1:0\"]\nroot = \"{}\"\nworkers = 1\ndrain-timeout = \"5s\"\n",
        public.display()
    );
    let echo_section = format!(
        "[[pool]]\nname = \"echo\"\nlisten = [\"127.0.0.1:0\"]\ncommand = [\"{}\"]\nworkers = 1\n",
        echo()
    );
    std::fs::write(&file, &site_section).expect("write config");
    let file_s = file.display().to_string();
    let mut b = Baton::start(&["--config", &file_s], 1);
    let site_addr = b.addr_of("site");
    assert!(get(site_addr).starts_with("HTTP/1.1 200"));

    // Add the echo pool.
    std::fs::write(&file, format!("{site_section}\n{echo_section}")).expect("write config");
    let r = b.ctl_json(&["reload"]);
    let changes = r["changes"].to_string();
    assert!(changes.contains("pool `echo` added"), "{changes}");
    let l = b
        .find(Duration::from_secs(20), |l| {
            l.message() == "listening" && l.field("pool").as_deref() == Some("echo")
        })
        .expect("the echo pool listens");
    let echo_addr: SocketAddr = l.field("addr").expect("addr").parse().expect("parses");
    b.wait_for("worker ready", Duration::from_secs(20));
    assert_eq!(
        echo_once(echo_addr, b"new pool\n").expect("echo"),
        b"new pool\n"
    );
    assert!(
        get(site_addr).starts_with("HTTP/1.1 200"),
        "the site pool kept serving"
    );

    // Remove the site pool: it stops listening, its worker drains and goes.
    std::fs::write(&file, &echo_section).expect("write config");
    let r = b.ctl_json(&["reload"]);
    let changes = r["changes"].to_string();
    assert!(changes.contains("pool `site` removed"), "{changes}");
    assert!(
        connect(site_addr).is_err(),
        "the removed pool's listener is closed"
    );
    b.wait_for(
        "pool removed: its last worker has gone",
        Duration::from_secs(20),
    );
    let left = rows(&b, &[]);
    assert!(
        !left.is_empty() && left.iter().all(|r| r["pool"] == "echo"),
        "{left:?}"
    );
    assert_eq!(echo_once(echo_addr, b"still\n").expect("echo"), b"still\n");
    // With one pool left, --pool is optional again.
    let added = b.ctl_json(&["add", "1"]);
    assert_eq!(added["added"].as_array().map(Vec::len), Some(1));
    b.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pool_configuration_mistakes_are_named() {
    let dir = common::tempdir("baton-pools-check");
    let file = dir.join("baton.toml");
    let echo = echo();
    let cases: Vec<(String, &str)> = vec![
        (
            format!("[[pool]]\nname = \"a\"\nlisten = [\"127.0.0.1:7001\"]\ncommand = [\"{echo}\"]\n[[pool]]\nname = \"b\"\nlisten = [\"127.0.0.1:7001\"]\ncommand = [\"{echo}\"]\n"),
            "listener 127.0.0.1:7001 is claimed by pool `a` and by pool `b`",
        ),
        (
            format!("[[pool]]\nlisten = [\"127.0.0.1:7001\"]\ncommand = [\"{echo}\"]\n[[pool]]\nname = \"b\"\nlisten = [\"127.0.0.1:7002\"]\ncommand = [\"{echo}\"]\n"),
            "[[pool]] section 1 has no `name`",
        ),
        (
            format!("[[pool]]\nname = \"a\"\nlisten = [\"127.0.0.1:7001\"]\ncommand = [\"{echo}\"]\n[[pool]]\nname = \"a\"\nlisten = [\"127.0.0.1:7002\"]\ncommand = [\"{echo}\"]\n"),
            "two pools are named `a`",
        ),
        (
            format!("listen = [\"127.0.0.1:7000\"]\n[[pool]]\nname = \"a\"\ncommand = [\"{echo}\"]\n[[pool]]\nname = \"b\"\ncommand = [\"{echo}\"]\n"),
            "each pool has its own `listen`",
        ),
        (
            format!("[[pool]]\nname = \"a\"\nlisten = [\"127.0.0.1:7001\"]\ncommand = [\"{echo}\"]\n[[pool]]\nname = \"b\"\nlisten = [\"127.0.0.1:7002\"]\ncommand = [\"{echo}\"]\nworkers = 0\n"),
            "pool `b`: --workers must be at least 1",
        ),
        (
            "[[pool]]\nname = \"a\"\nwrokers = 2\n".to_string(),
            "line 3, column 1: unknown field `wrokers`",
        ),
        (
            "[[pool]]\nname = \"has space\"\n".to_string(),
            "pool name \"has space\"",
        ),
    ];
    for (text, expected) in cases {
        std::fs::write(&file, &text).expect("write");
        let (ok, out) = check(&dir, &file);
        assert!(!ok && out.contains(expected), "{text}\n=> {out}");
    }

    // Pool flags over several sections would be ambiguous.
    std::fs::write(
        &file,
        format!("[[pool]]\nname = \"a\"\nlisten = [\"127.0.0.1:7001\"]\ncommand = [\"{echo}\"]\n[[pool]]\nname = \"b\"\nlisten = [\"127.0.0.1:7002\"]\ncommand = [\"{echo}\"]\n"),
    )
    .expect("write");
    let (ok, err) = check_with(&dir, &file, &["--workers", "3"]);
    assert!(
        !ok && err.contains("would be ambiguous") && err.contains("--workers"),
        "{err}"
    );

    // One [[pool]] section is one pool, as [pool] is: flags apply to it.
    std::fs::write(
        &file,
        format!("[[pool]]\nlisten = [\"127.0.0.1:7001\"]\ncommand = [\"{echo}\"]\n"),
    )
    .expect("write");
    let (ok, text) = check_with(&dir, &file, &["--workers", "3"]);
    assert!(ok && text.contains("1 listener, 3 workers"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The file of the issue, byte for byte, in a directory laid out as it
/// expects (`./public`, `target/release/baton-echo`), checked and run.
#[test]
fn the_documented_two_pool_file_works_as_written() {
    let dir = common::tempdir("baton-pools-doc");
    site(&dir);
    let release = dir.join("target/release");
    std::fs::create_dir_all(&release).expect("mkdir");
    for d in [dir.join("target"), release.clone()] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    std::fs::copy(bin("baton-echo"), release.join("baton-echo")).expect("copy baton-echo");
    let file = dir.join("baton.toml");
    std::fs::write(
        &file,
        r#"[[pool]]
name = "site"
listen = ["127.0.0.1:8080"]
root = "./public"
workers = 2

[[pool]]
name = "echo"
listen = ["127.0.0.1:9000"]
command = ["target/release/baton-echo"]
workers = 1
user = "nobody"
"#,
    )
    .expect("write config");
    let (ok, text) = check(&dir, &file);
    if !is_root() {
        // Running workers as nobody needs root: said plainly.
        assert!(
            !ok && text.contains("pool `echo`") && text.contains("needs root"),
            "{text}"
        );
        eprintln!("skipped running the documented two-pool file: needs root (user = \"nobody\")");
        return;
    }
    assert!(ok, "{text}");
    let mut cmd = Command::new(bin("baton"));
    cmd.current_dir(&dir);
    let mut b = Baton::start_counting(cmd, &["--config", "baton.toml"], 2, 3);
    let page = get("127.0.0.1:8080".parse().expect("addr"));
    assert!(
        page.starts_with("HTTP/1.1 200") && page.contains("hello from the site pool"),
        "{page}"
    );
    let echo_addr: SocketAddr = "127.0.0.1:9000".parse().expect("addr");
    assert_eq!(
        echo_once(echo_addr, b"as written\n").expect("echo"),
        b"as written\n"
    );
    let all = rows(&b, &[]);
    assert!(
        all.iter().all(|r| r["user"] == "nobody"),
        "every worker runs as nobody: {all:?}"
    );
    b.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
