//! The `proxy` seccomp profile, proven from inside a worker by `baton
//! audit --seccomp proxy`: outbound TCP connects reach the kernel; bind,
//! listen, raw, packet, Unix, UDP and netlink sockets are refused, and
//! everything the default profile refuses still is.

mod common;

use common::bin;

#[test]
fn baton_audit_proves_the_proxy_profile() {
    let out = std::process::Command::new(bin("baton"))
        .args(["audit", "--seccomp", "proxy", "--json"])
        .output()
        .expect("run baton audit");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "audit printed no JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let rows = report["rows"].as_array().expect("rows");
    let status = |prop: &str| -> String {
        rows.iter()
            .find(|r| r["property"] == prop)
            .map(|r| format!("{} ({})", r["status"], r["observed"]))
            .unwrap_or_else(|| panic!("no {prop:?} row in {stdout}"))
    };
    for prop in [
        "seccomp mode",
        "seccomp refuses an unlisted call",
        "raw sockets refused",
        "proxy: outbound connect allowed",
        "proxy: bind refused",
        "proxy: other sockets refused",
        "/ not writable",
    ] {
        let s = status(prop);
        assert!(s.starts_with("\"pass\""), "{prop}: {s}");
    }
    // Unprivileged, some rows skip; none fails.
    assert!(out.status.success(), "audit failed:\n{stdout}");
}
