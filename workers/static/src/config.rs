//! The command line of `baton-static`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Parser, ValueEnum};

/// Whether something is switched on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// baton's static file worker: HTTP/1.1 GET and HEAD for the files under
/// one directory (or for the demo site built into the binary), with
/// keep-alive, pipelining, conditional and range requests, and sendfile(2)
/// for large bodies.
///
/// It is started by the acceptor (`baton ... -- baton-static --root DIR`),
/// which passes it a channel in BATON_CHANNEL_FD and hands it accepted
/// connections; or it joins a running acceptor's pool with --register.
/// Logs go to stderr in the acceptor's format (BATON_LOG_FORMAT: text or
/// json); RUST_LOG filters them (default `info`).
#[derive(Debug, Clone, Parser)]
#[command(name = "baton-static", version, about, long_about)]
#[command(group(ArgGroup::new("site").required(true).args(["root", "demo"])))]
pub struct Config {
    /// Serve the files beneath this directory. Nothing outside it is ever
    /// served: paths are percent-decoded, `..` segments and NUL bytes are
    /// refused, and files are opened beneath the directory with openat2
    /// RESOLVE_BENEATH (or the same rule in user space where a seccomp
    /// filter refuses openat2), so a symlink cannot lead out of it either.
    /// The directory is opened after the acceptor's sandbox is applied: under
    /// `baton --chroot JAIL`, DIR is a path inside the jail (often `/`).
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,

    /// Serve the small demo site embedded in the binary: a page that says
    /// what baton is and which worker process answered.
    #[arg(long)]
    pub demo: bool,

    /// Instead of inheriting a channel from a spawning acceptor, connect to
    /// a running acceptor's worker socket at PATH and join its pool.
    #[arg(long, value_name = "PATH")]
    pub register: Option<PathBuf>,

    /// Most connections this worker takes at once, announced to the
    /// acceptor in HELLO. 0 leaves the limit to the acceptor's
    /// --worker-connections.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub capacity: u32,

    /// One log line per request (method, path, status, body bytes,
    /// duration), through tracing at level INFO, target `access`.
    #[arg(long, value_name = "on|off", default_value = "on")]
    pub access_log: OnOff,

    /// Time a client has to send a complete request head, counted from its
    /// first byte (or from the hand-over, for the first request). Slow
    /// clients ("slowloris") are answered 408 and closed.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,

    /// How long an idle keep-alive connection is kept open between requests.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// A keep-alive connection idle this long is handed back to the
    /// acceptor (protocol v2 PARK), which holds it for the rest of its idle
    /// timeout without counting it against any worker, and gives it to the
    /// least loaded worker when the client's next request comes. A draining
    /// worker parks its idle connections at once. 0 never parks.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub park_after: Duration,

    /// How long a response may make no progress because the client does not
    /// read it before the connection is closed.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub send_timeout: Duration,

    /// After an error response the worker stops writing but keeps reading
    /// (and discarding) for up to this long before closing, so that the
    /// client receives the response instead of a reset.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    pub linger_timeout: Duration,

    /// Most requests served on one connection; the last response says
    /// `Connection: close`. 0 means no limit.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub max_requests: u32,

    /// Largest request head (request line and headers) in bytes; a larger
    /// one is answered 431 (or 414 when the request line alone is too long).
    #[arg(long, value_name = "BYTES", default_value_t = 16 * 1024,
          value_parser = clap::value_parser!(u32).range(512..=1024 * 1024))]
    pub max_header_bytes: u32,

    /// Most header fields a request may carry; more are answered 431. The
    /// default is Apache httpd's LimitRequestFields (HAProxy allows 101;
    /// nginx bounds only the bytes, --max-header-bytes here).
    #[arg(long, value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_header_fields: u32,

    /// Largest request body in bytes. Only GET and HEAD are served, but a
    /// body (Content-Length or chunked) is read and discarded so that the
    /// connection stays usable; a larger Content-Length is answered 413
    /// and the connection closed, and a chunked body that grows past this
    /// closes the connection after its response. nginx's
    /// client_max_body_size default.
    #[arg(long, value_name = "BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: u64,

    /// Longest request target in bytes; a longer one is answered 414.
    #[arg(long, value_name = "BYTES", default_value_t = 8 * 1024)]
    pub max_uri_bytes: u32,

    /// Bodies larger than this many bytes go out with sendfile(2) straight
    /// from the page cache; smaller ones are copied into the response and
    /// sent with its headers in a single write (at most 1 MiB).
    #[arg(long, value_name = "BYTES", default_value_t = 32 * 1024,
          value_parser = clap::value_parser!(u64).range(0..=1024 * 1024))]
    pub sendfile_threshold: u64,

    /// Every connection starts with a PROXY protocol header (v1 or v2), as
    /// an L4 balancer in front sends it (HAProxy `send-proxy-v2`): the
    /// client address it carries is the one in the access log. A connection
    /// without one, or with a malformed one, is logged and closed; nothing
    /// is guessed. Only for listeners that nothing but the balancer can
    /// reach: whoever connects may claim any address.
    #[arg(long)]
    pub accept_proxy: bool,

    /// Time a connection has to send its PROXY header (with
    /// --accept-proxy), counted from the hand-over.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub accept_proxy_timeout: Duration,

    /// File served for a request naming a directory (a plain file name).
    #[arg(long, value_name = "NAME", default_value = "index.html", value_parser = file_name)]
    pub index: String,
}

fn file_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s == "." || s == ".." || s.contains('/') || s.contains('\0') {
        Err(format!("{s:?} is not a plain file name"))
    } else {
        Ok(s.to_owned())
    }
}

impl Config {
    pub fn access_log(&self) -> bool {
        self.access_log == OnOff::On
    }

    /// The request-head limits these flags set.
    pub fn limits(&self) -> baton_http::Limits {
        baton_http::Limits {
            max_head_bytes: self.max_header_bytes as usize,
            max_fields: self.max_header_fields as usize,
            // Nothing stands behind this server to read a lone LF
            // differently; nginx accepts it too.
            lone_lf: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Config::command().debug_assert();
    }

    #[test]
    fn root_or_demo_is_required() {
        assert!(Config::try_parse_from(["baton-static"]).is_err());
        assert!(Config::try_parse_from(["baton-static", "--demo", "--root", "/"]).is_err());
        let c = Config::try_parse_from([
            "baton-static",
            "--root",
            "/srv",
            "--header-timeout",
            "1500ms",
        ])
        .unwrap();
        assert_eq!(c.header_timeout, Duration::from_millis(1500));
        assert!(c.access_log());
        for bad in ["../x", "a/b", ".."] {
            assert!(Config::try_parse_from(["baton-static", "--demo", "--index", bad]).is_err());
        }
        assert!(Config::try_parse_from([
            "baton-static",
            "--demo",
            "--sendfile-threshold",
            "2000000"
        ])
        .is_err());
    }
}
