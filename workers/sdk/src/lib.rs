//! # baton-sdk: the worker side of baton
//!
//! baton's acceptor accepts TCP connections and hands each one, as a file
//! descriptor, to a worker process over an `AF_UNIX` `SOCK_SEQPACKET`
//! channel. This crate is what a worker links to speak that protocol; the
//! acceptor links it too, so both sides encode and decode with one code.
//!
//! * [`proto`]: the wire format, documented in one table, and its codec.
//! * [`channel`]: a SEQPACKET socket that sends and receives those messages
//!   with their fds (`MSG_CMSG_CLOEXEC`, truncation refused).
//! * [`worker`]: the receive loop a worker uses: hello, receive, ACK before
//!   the application sees a connection, DONE when it is closed.
//! * [`event`]: what an event-driven worker needs around its poller: drain
//!   signals as events, bounded channel sends, batched DONE reports.
//! * [`log`]: the log line style (text or JSON, as the acceptor says in
//!   `BATON_LOG_FORMAT`) of workers that do not use `tracing`.
//! * [`shared`]: the memory region every worker of a pool maps, for state
//!   they must agree on (baton-proxy's upstream health).
//! * [`proxy_protocol`]: the PROXY protocol v1/v2 parser and v2 encoder.
//! * [`sandbox`]: the confinement a worker applies to itself first thing
//!   (uid/gid, chroot, capabilities, no_new_privs, seccomp), its check from
//!   outside, and the audit probe.
//!
//! The smallest complete worker:
//!
//! ```no_run
//! use baton_sdk::{Event, Worker};
//! use std::io::Write;
//! let mut w = Worker::from_env(0)?;
//! loop {
//!     match w.recv()? {
//!         Event::Conn(mut c) => {
//!             c.stream.set_nonblocking(false)?;
//!             let _ = c.stream.write_all(b"hello\n");
//!             drop(c.stream);
//!             w.done(c.id)?;
//!         }
//!         Event::Drain | Event::Closed => break,
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod channel;
pub mod event;
pub mod log;
pub mod proto;
pub mod proxy_protocol;
pub mod sandbox;
pub mod shared;
pub mod worker;

pub use channel::{Channel, Received, RecvError};
pub use proto::{ConnInfo, HelloFlags, Msg, ProtoError};
pub use worker::{Connection, DoneSender, Error, Event, Join, Worker, EXIT_SANDBOX};
