//! # baton-static: HTTP/1.1 static files behind baton's acceptor
//!
//! One worker process runs one [mio] event loop on one thread; baton spawns
//! one worker per CPU. The acceptor accepts TCP connections and hands each
//! socket over the worker channel ([`baton_sdk`]); from then on the worker
//! talks to the client directly, and reports the connection DONE once its
//! socket is closed.
//!
//! * [`config`]: the command line (`--help` explains every flag).
//! * [`server`]: the event loop: worker channel, signals, connections, timers.
//! * [`conn`]: one client connection: reading, pipelining, writing with
//!   `sendfile(2)`, lingering close.
//! * [`http`]: answering one parsed request (files, conditionals, ranges,
//!   errors); requests are parsed with `httparse`, never by hand.
//! * [`path`]: percent-decoding and normalising request paths.
//! * [`fs`]: opening files beneath the root directory (`openat2`
//!   `RESOLVE_BENEATH`).
//! * [`site`]: what is served: a directory, or the demo site embedded in the
//!   binary.
//!
//! Nothing on the request path panics on client input: every parse result is
//! matched, and errors become HTTP statuses.

pub mod config;
pub mod conn;
pub mod fs;
pub mod http;
pub mod path;
pub mod server;
pub mod site;
