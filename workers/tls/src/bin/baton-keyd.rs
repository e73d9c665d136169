//! `baton-keyd`: the key process as a program (see `baton_tls::keyd`).
//!
//! ```text
//! baton-keyd --key ID:CERT:KEY [--key ...] [--control-fd N] [--peer-fd N ...]
//! ```
//!
//! The fds are inherited `SOCK_SEQPACKET` sockets (checked). The sandbox
//! profile, if any, comes from `BATON_SANDBOX` as for workers (its
//! `keep_fds` are extended with the channels). Exit status: 0 when the
//! control channel (or, without one, the last peer) closed, 2 when a key
//! could not be loaded, 78 when the sandbox failed, 64 for a bad command
//! line, 1 otherwise.

fn main() {
    baton_tls::keyd::main(std::env::args_os().skip(1));
}
