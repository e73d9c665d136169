//! # baton-proxy: the front-end proxy behind baton's acceptor
//!
//! The acceptor accepts client connections and hands each socket to a
//! worker ([`baton_sdk`]); a baton-proxy worker connects it to one of its
//! upstream servers and relays. One process runs one [mio] event loop on
//! one thread; the acceptor runs a pool of them.
//!
//! * [`config`]: the command line (`--help` explains every option).
//! * [`mode`]: what is proxied: HTTP (the default) or TCP.
//! * [`http`]: HTTP mode: requests balanced one by one over keep-alive
//!   pools to the upstreams, strict framing both ways, forwarded headers
//!   ([`forward`]), streamed bodies, Upgrade tunnels, timeouts and error
//!   answers, an access log; TLS terminated here when the pool has
//!   `--tls-cert` (see [`http`]'s TLS section: keys stay in baton's key
//!   process).
//! * [`upstream`]: `--upstream HOST:PORT[,weight=N][,backup]`, resolved once
//!   before the sandbox (a chrooted worker has no resolver).
//! * [`balance`]: choosing a server (round-robin, least-conn, p2c, hash):
//!   pure decision code.
//! * [`health`]: passive and active health rules, applied to the pool's
//!   shared memory ([`baton_sdk::shared`]) so that every worker of a pool
//!   sees a server go down and come back at once, and only one of them
//!   probes it per interval.
//! * [`probe`]: the active probes (TCP connect, HTTP `GET`).
//! * [`tcp`], [`relay`]: TCP mode, one relayed connection; bytes moved
//!   with `splice(2)` through a pipe per direction, half-close honoured.
//! * [`tls_relay`]: TCP mode when the pool has `--tls-cert` (TLS offload
//!   in front of any TCP service): the handshake (after the PROXY header,
//!   before the upstream is connected), then plaintext to the upstream and
//!   ciphertext to the client, copied through rustls and bounded buffers
//!   instead of spliced; close_notify and FIN both ways. Keys stay in
//!   baton's key process in both modes.
//! * [`server`]: the event loop.
//!
//! Start-up order: options checked, names resolved, the shared region
//! mapped (its fd closed), then the sandbox applied (by the SDK, from
//! `BATON_SANDBOX`; `--seccomp proxy` allows outbound TCP), then the
//! pool's TLS bundle read (when it has one), then HELLO.
//! Nothing on the data path panics on client or upstream input.

pub mod balance;
pub mod config;
pub mod forward;
pub mod health;
pub mod http;
pub mod mode;
pub mod probe;
pub mod relay;
pub mod server;
pub mod tcp;
pub mod tls_relay;
pub mod upstream;

/// Logs one line in the shared style ([`baton_sdk::log`]) as `baton-proxy`.
#[macro_export]
macro_rules! log {
    ($level:expr, $($arg:tt)*) => {
        baton_sdk::log::line($level, "baton-proxy", format_args!($($arg)*))
    };
}

/// Exit status for a configuration that cannot work (EX_CONFIG, like a
/// sandbox failure: the acceptor does not restart such a worker, since it
/// would fail the same way).
pub const EXIT_CONFIG: u8 = baton_sdk::EXIT_SANDBOX;

/// Raises the soft fd limit to the hard one: each connection costs six.
fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// Checks, once confined, that this process may create the sockets it
/// connects upstream with: under baton's default seccomp profile it may
/// not, and every connection would fail; better to say so at start.
fn can_connect_out() -> Result<(), String> {
    use socket2::{Domain, Socket, Type};
    match Socket::new(Domain::IPV4, Type::STREAM, None) {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) => Err(format!(
            "the sandbox refuses to create sockets ({e}): a proxy connects to its upstreams; \
             start baton with --seccomp proxy (outbound TCP only) instead of the default profile"
        )),
        // Out of fds or memory right now says nothing about the sandbox.
        Err(_) => Ok(()),
    }
}

/// The whole `baton-proxy` program: parses `args` (the first is the
/// program name), prepares what needs the unconfined process, confines
/// itself, joins the acceptor and serves until drained.
pub fn main_from<I, T>(args: I) -> std::process::ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use baton_sdk::log::Level;
    use clap::Parser;
    use std::process::ExitCode;
    let cfg = config::Config::parse_from(args);
    if let Err(e) = cfg.validate() {
        log!(Level::Error, "{e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let mode = mode::select(cfg.mode);
    // Before the sandbox: names need the resolver, the shared region its fd.
    let upstreams = match upstream::resolve(&cfg.upstreams) {
        Ok(u) => u,
        Err(e) => {
            log!(Level::Error, "{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let shared =
        match baton_sdk::shared::Shared::from_env(upstream::list_hash(&upstreams), upstreams.len())
        {
            Ok(s) => s,
            Err(e) => {
                log!(Level::Error, "shared health state: {e}");
                return ExitCode::from(1);
            }
        };
    raise_nofile();
    match baton_sdk::sandbox::apply_from_env() {
        Ok(Some(applied)) => {
            for note in &applied.notes {
                log!(Level::Info, "sandbox: {note}");
            }
        }
        Ok(None) => {}
        Err(e) => {
            log!(Level::Error, "{e}");
            return ExitCode::from(baton_sdk::EXIT_SANDBOX);
        }
    }
    if let Err(e) = can_connect_out() {
        log!(Level::Error, "{e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    // TLS, when the acceptor set it up for this pool: certificate chains,
    // ticket keys and a channel to the key process; never a private key.
    let mut tls = match baton_tls::bundle::from_env() {
        Ok(t) => t,
        Err(e) => {
            log!(
                Level::Error,
                "TLS: cannot read the pool's certificates from the acceptor: {e}"
            );
            return ExitCode::from(1);
        }
    };
    if let Some(t) = tls.as_mut() {
        if mode == mode::Mode::Tcp {
            // The pool's config offers ALPN `http/1.1`, and refuses a
            // client that offers ALPN but not that (RFC 7301). A TCP relay
            // does not know its protocol: no ALPN at all, so that any
            // client's offer is ignored rather than refused. The ticketer
            // and the resolver are shared, so ticket-key rotation still
            // reaches this copy.
            let mut config = (*t.tls.config).clone();
            config.alpn_protocols.clear();
            t.tls.config = std::sync::Arc::new(config);
        }
        log!(
            Level::Info,
            "TLS: handshakes signed by baton's key process; traffic encrypted in this process (userspace rustls)"
        );
        for name in &t.tls.shadowed {
            log!(
                Level::Warn,
                "TLS: two certificates claim {name}; the first one added serves it"
            );
        }
    }
    // HELLO says whether this worker terminates TLS: a TLS pool refuses
    // one that does not.
    let join = baton_sdk::Worker::join(cfg.capacity)
        .fds_per_conn(mode.fds_per_conn())
        .terminates_tls(tls.is_some());
    let worker = match &cfg.register {
        Some(path) => join.register(path),
        None => join.from_env(),
    };
    let worker = match worker {
        Ok(w) => w,
        Err(e) => {
            log!(Level::Error, "cannot join the acceptor: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    let prep = server::Prepared {
        upstreams,
        shared,
        tls,
    };
    match server::run(cfg, mode, prep, worker) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log!(Level::Error, "{e}");
            ExitCode::from(1)
        }
    }
}
