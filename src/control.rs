//! The control protocol: JSON lines over a Unix stream socket.
//!
//! A client (`baton ctl`) writes one request per line and reads one reply
//! per line:
//!
//! ```text
//! {"cmd":"workers"}
//! {"ok":true,"result":[{"id":1,"pid":4242,"state":"ready",...}]}
//! {"cmd":"remove","id":3,"drain_timeout_ms":30000}
//! {"ok":true,"result":{"draining":[3]}}
//! {"cmd":"frobnicate"}
//! {"ok":false,"error":"unknown variant `frobnicate`, expected one of ..."}
//! ```
//!
//! The socket is created with mode 0600 and every peer is checked with
//! SO_PEERCRED (root, the acceptor's own uid and `--control-allow-uid` are
//! served). A line longer than [`MAX_LINE`] gets an error reply and the
//! connection is closed; a client that sends nothing for
//! `--control-idle-timeout` is closed. None of this can disturb the acceptor or other clients.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;

/// One request, as sent on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
///
/// Variants without arguments are written `Workers {}` rather than as unit
/// variants so that serde refuses unknown fields on them too.
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// One row per worker (of `pool`, or of every pool).
    Workers {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pool: Option<String>,
    },
    /// Totals.
    Status {},
    /// Prometheus text format.
    Metrics {},
    /// Spawn `count` more workers from the pool's command (`pool` may be
    /// left out when there is one).
    Add {
        count: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pool: Option<String>,
    },
    /// Drain and stop worker `id`, or `count` workers (the newest first).
    Remove {
        #[serde(default)]
        id: Option<u32>,
        #[serde(default)]
        count: Option<u32>,
        #[serde(default)]
        drain_timeout_ms: Option<u64>,
        /// Needed with `count` when there are several pools; with `id`,
        /// checks that the worker is in it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pool: Option<String>,
    },
    /// Replace every spawned worker of the pool, one at a time, a new one
    /// ready before an old one drains.
    Restart {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pool: Option<String>,
    },
    /// Re-read the config file and apply the difference.
    Reload {},
    /// Take this host out of the balancer in front, then stop: the health
    /// check turns 503 at once, the listeners keep accepting for
    /// `grace_ms` (default `--drain-grace`), then close, and baton finishes
    /// what it holds and exits as on SIGTERM.
    DrainHost {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        grace_ms: Option<u64>,
    },
    /// Re-execute baton in place from `binary` (default: the binary it was
    /// started from), keeping its pid, workers and connections.
    Upgrade {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        binary: Option<String>,
    },
}

/// One reply line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    pub fn ok(result: serde_json::Value) -> Reply {
        Reply {
            ok: true,
            result: Some(result),
            error: None,
        }
    }
    pub fn err(msg: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            result: None,
            error: Some(msg.into()),
        }
    }
    /// The reply as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_else(|e| {
            format!("{{\"ok\":false,\"error\":\"cannot encode reply: {e}\"}}").into_bytes()
        });
        v.push(b'\n');
        v
    }
}

/// Why a request line is refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Not JSON, or not a request: an unknown command, a missing, unknown
    /// or out-of-range field.
    #[error("bad request: {0}")]
    BadRequest(#[source] serde_json::Error),
}

/// Parses one request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<Request, ControlError> {
    serde_json::from_slice(line).map_err(ControlError::BadRequest)
}

/// One row of `ctl workers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerRow {
    pub id: u32,
    /// The pool it belongs to.
    #[serde(default)]
    pub pool: String,
    pub pid: Option<i32>,
    pub user: String,
    pub state: String,
    /// "spawned" or "registered".
    pub origin: String,
    pub in_flight: usize,
    pub handled: u64,
    /// Idle connections it handed back to the acceptor (PARK).
    #[serde(default)]
    pub parked: u64,
    pub restarts: u32,
    /// Resident memory in KiB (VmRSS), when readable.
    pub memory_kib: Option<u64>,
    pub age_s: f64,
}

/// The default control socket: under /run as root, under
/// `$XDG_RUNTIME_DIR` otherwise (or /tmp when that is not set).
pub fn default_path() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        PathBuf::from("/run/baton.sock")
    } else if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        Path::new(&dir).join("baton.sock")
    } else {
        PathBuf::from(format!("/tmp/baton-{}.sock", nix::unistd::geteuid()))
    }
}

/// Client side: sends one request and reads its reply (blocking, with a
/// timeout so that a wedged acceptor cannot hang `baton ctl`).
pub fn call(path: &Path, req: &Request, timeout: Duration) -> io::Result<Reply> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req).map_err(io::Error::other)?;
    line.push(b'\n');
    // A refused client may find the socket closed under its request; the
    // refusal is still there to read, so a failed write is not the end.
    let written = s.write_all(&line);
    let mut r = BufReader::new(s);
    let mut reply = String::new();
    if let Err(e) = r.read_line(&mut reply) {
        written?;
        return Err(e);
    }
    if reply.is_empty() {
        written?;
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the acceptor closed the connection without a reply (refused?)",
        ));
    }
    serde_json::from_str(&reply).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        assert_eq!(
            parse_request(br#"{"cmd":"workers"}"#).unwrap(),
            Request::Workers { pool: None }
        );
        assert_eq!(
            parse_request(br#"{"cmd":"add","count":2}"#).unwrap(),
            Request::Add {
                count: 2,
                pool: None
            }
        );
        assert_eq!(
            parse_request(br#"{"cmd":"restart","pool":"site"}"#).unwrap(),
            Request::Restart {
                pool: Some("site".into())
            }
        );
        assert_eq!(
            parse_request(br#"{"cmd":"remove","id":3,"drain_timeout_ms":500}"#).unwrap(),
            Request::Remove {
                id: Some(3),
                count: None,
                drain_timeout_ms: Some(500),
                pool: None,
            }
        );
        assert_eq!(
            parse_request(br#"{"cmd":"drain-host"}"#).unwrap(),
            Request::DrainHost { grace_ms: None }
        );
        assert_eq!(
            parse_request(br#"{"cmd":"drain-host","grace_ms":100}"#).unwrap(),
            Request::DrainHost {
                grace_ms: Some(100)
            }
        );
        assert!(parse_request(br#"{"cmd":"add"}"#).is_err());
        assert!(parse_request(br#"{"cmd":"add","count":-1}"#).is_err());
        assert!(parse_request(br#"{"cmd":"workers","extra":1}"#).is_err());
        assert!(parse_request(br#"{"cmd":"nope"}"#).is_err());
        let e = parse_request(b"\xff\xfe garbage").unwrap_err();
        assert!(e.to_string().starts_with("bad request: "), "{e}");
    }

    #[test]
    fn replies_are_one_line() {
        let l = Reply::err("no\nnewline inside").to_line();
        assert_eq!(l.iter().filter(|b| **b == b'\n').count(), 1);
    }
}
