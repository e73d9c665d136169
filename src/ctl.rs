//! `baton ctl`: the client of the control socket. Sends one request,
//! prints the reply as a table (or JSON with `--json`).

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::cli::{CtlArgs, CtlVerb};
use crate::control::{self, Reply, Request, WorkerRow};

/// How long `baton ctl` waits for the acceptor's reply.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Why a `baton ctl` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// No reply from the control socket at `path`.
    #[error("cannot reach baton at {}: {source} (is it running? is --control right? do you have access?)", path.display())]
    Unreachable { path: PathBuf, source: io::Error },
    /// The acceptor refused the request; its message.
    #[error("{0}")]
    Refused(String),
    /// The reply is not what the request calls for.
    #[error("unexpected reply: {0}")]
    UnexpectedReply(#[source] serde_json::Error),
}

/// Runs one `baton ctl` command; returns the text to print, or an error
/// whose message a person can act on.
pub fn run(args: &CtlArgs) -> Result<String, CtlError> {
    let req = match &args.verb {
        CtlVerb::Workers { pool } => Request::Workers { pool: pool.clone() },
        CtlVerb::Status => Request::Status {},
        CtlVerb::Metrics => Request::Metrics {},
        CtlVerb::Add { count, pool } => Request::Add {
            count: *count,
            pool: pool.name.clone(),
        },
        CtlVerb::Remove {
            id,
            count,
            drain_timeout,
            pool,
        } => Request::Remove {
            id: *id,
            count: *count,
            drain_timeout_ms: drain_timeout.map(|d| d.as_millis() as u64),
            pool: pool.name.clone(),
        },
        CtlVerb::Restart { pool } => Request::Restart {
            pool: pool.name.clone(),
        },
        CtlVerb::Reload => Request::Reload {},
        CtlVerb::DrainHost { grace } => Request::DrainHost {
            grace_ms: grace.map(|d| d.as_millis() as u64),
        },
        CtlVerb::Upgrade { binary } => Request::Upgrade {
            binary: binary.as_ref().map(|b| b.display().to_string()),
        },
    };
    let reply =
        control::call(&args.control, &req, TIMEOUT).map_err(|source| CtlError::Unreachable {
            path: args.control.clone(),
            source,
        })?;
    render(&req, reply, args.json)
}

fn render(req: &Request, reply: Reply, json: bool) -> Result<String, CtlError> {
    if !reply.ok {
        return Err(CtlError::Refused(
            reply.error.unwrap_or_else(|| "request failed".to_string()),
        ));
    }
    let result = reply.result.unwrap_or(serde_json::Value::Null);
    if json {
        return Ok(serde_json::to_string_pretty(&result).unwrap_or_default());
    }
    Ok(match req {
        Request::Workers { .. } => {
            let rows: Vec<WorkerRow> =
                serde_json::from_value(result).map_err(CtlError::UnexpectedReply)?;
            workers_table(&rows)
        }
        Request::Metrics {} => result.as_str().unwrap_or_default().trim_end().to_string(),
        Request::Status {} => match result.as_object() {
            Some(obj) => obj
                .iter()
                .map(|(k, v)| format!("{k:<16} {}", compact(v)))
                .collect::<Vec<_>>()
                .join("\n"),
            None => compact(&result),
        },
        Request::Add { .. } => format!("added workers {}", compact(&result["added"])),
        Request::Remove { .. } => {
            let mut out = format!(
                "draining workers {} (they stop once their connections finish, or at the drain timeout)",
                compact(&result["draining"])
            );
            if let Some(w) = result["warning"].as_str() {
                out.push_str("\nwarning: ");
                out.push_str(w);
            }
            out
        }
        Request::Reload {} => {
            let changes = result["changes"].as_array().cloned().unwrap_or_default();
            if changes.is_empty() {
                "reloaded: nothing changed".to_string()
            } else {
                let lines: Vec<String> = changes
                    .iter()
                    .map(|c| format!("  {}", c.as_str().unwrap_or_default()))
                    .collect();
                format!("reloaded:\n{}", lines.join("\n"))
            }
        }
        Request::Upgrade { .. } => format!(
            "upgraded in place: pid {} now runs {}, {} workers kept",
            result["pid"], result["upgraded"], result["workers"]
        ),
        Request::DrainHost { .. } => format!(
            "draining the host: health check failing now; listeners close in {} ms, then baton finishes its connections and exits",
            result["listeners_close_in_ms"]
        ),
        Request::Restart { .. } => format!(
            "rolling restart of {} workers started: each is replaced once its successor is ready",
            result["replacing"]
        ),
    })
}

fn compact(v: &serde_json::Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn workers_table(rows: &[WorkerRow]) -> String {
    let width = rows.iter().map(|r| r.pool.len()).max().unwrap_or(0).max(4);
    let mut out = format!(
        "{:>4} {:<width$} {:>8} {:<10} {:<10} {:<10} {:>9} {:>8} {:>8} {:>8} {:>10} {:>8}\n",
        "ID",
        "POOL",
        "PID",
        "USER",
        "STATE",
        "ORIGIN",
        "IN-FLIGHT",
        "HANDLED",
        "PARKED",
        "RESTARTS",
        "MEMORY",
        "AGE"
    );
    for r in rows {
        out.push_str(&format!(
            "{:>4} {:<width$} {:>8} {:<10} {:<10} {:<10} {:>9} {:>8} {:>8} {:>8} {:>10} {:>8}\n",
            r.id,
            r.pool,
            r.pid.map_or("-".to_string(), |p| p.to_string()),
            r.user,
            r.state,
            r.origin,
            r.in_flight,
            r.handled,
            r.parked,
            r.restarts,
            r.memory_kib
                .map_or("-".to_string(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
            format!("{:.0}s", r.age_s),
        ));
    }
    out.trim_end().to_string()
}
