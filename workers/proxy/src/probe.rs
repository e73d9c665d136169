//! Active health probes: a non-blocking TCP connect, and for `http` one
//! `GET PATH HTTP/1.1` whose status line is parsed with `httparse`.
//!
//! A probe is one more source in the event loop. Which worker probes which
//! server when is decided by the lease in the pool's shared slot
//! ([`baton_sdk::shared::Slot::try_lease`]); this module only runs one.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use crate::config::HealthCheck;

/// Most bytes of a probe's answer read (its status line must be in them).
pub const MAX_ANSWER: usize = 4096;

/// One probe in flight.
#[derive(Debug)]
pub struct Probe {
    pub server: usize,
    pub sock: mio::net::TcpStream,
    pub deadline: Instant,
    connected: bool,
    /// The request still to send (http).
    request: Vec<u8>,
    answer: Vec<u8>,
    http: bool,
}

/// What a probe came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Wait,
    Healthy,
    Unhealthy(String),
}

impl Probe {
    /// Starts a probe of `server` at `addr` (`kind` is `tcp` or `http`).
    pub fn start(
        server: usize,
        addr: SocketAddr,
        kind: HealthCheck,
        host: &str,
        path: &str,
        deadline: Instant,
    ) -> io::Result<Probe> {
        let sock = mio::net::TcpStream::connect(addr)?;
        let http = kind == HealthCheck::Http;
        let request = if http {
            format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: baton-proxy health check\r\nConnection: close\r\n\r\n"
            )
            .into_bytes()
        } else {
            Vec::new()
        };
        Ok(Probe {
            server,
            sock,
            deadline,
            connected: false,
            request,
            answer: Vec::new(),
            http,
        })
    }

    /// Makes what progress it can.
    pub fn drive(&mut self) -> Verdict {
        if !self.connected {
            match self.sock.take_error() {
                Ok(Some(e)) | Err(e) => return Verdict::Unhealthy(format!("connect: {e}")),
                Ok(None) => {}
            }
            match self.sock.peer_addr() {
                Ok(_) => self.connected = true,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Verdict::Wait,
                Err(e) => return Verdict::Unhealthy(format!("connect: {e}")),
            }
            if !self.http {
                return Verdict::Healthy;
            }
        }
        while !self.request.is_empty() {
            match self.sock.write(&self.request) {
                Ok(n) => {
                    self.request.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Verdict::Wait,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Verdict::Unhealthy(format!("sending the request: {e}")),
            }
        }
        let mut buf = [0u8; 1024];
        loop {
            match self.sock.read(&mut buf) {
                Ok(0) => {
                    return match status_verdict(&self.answer) {
                        Verdict::Wait => Verdict::Unhealthy("closed before a status line".into()),
                        v => v,
                    }
                }
                Ok(n) => {
                    let room = MAX_ANSWER - self.answer.len();
                    self.answer.extend_from_slice(&buf[..n.min(room)]);
                    match status_verdict(&self.answer) {
                        Verdict::Wait if self.answer.len() >= MAX_ANSWER => {
                            return Verdict::Unhealthy(format!(
                                "no status line in the first {MAX_ANSWER} bytes"
                            ))
                        }
                        Verdict::Wait => {}
                        v => return v,
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Verdict::Wait,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Verdict::Unhealthy(format!("reading the answer: {e}")),
            }
        }
    }
}

/// The verdict on the start of an HTTP answer: 2xx and 3xx are healthy.
pub fn status_verdict(answer: &[u8]) -> Verdict {
    // No header slots: the status line is all that matters, and httparse
    // fills the code before it looks at headers.
    let mut headers = [];
    let mut resp = httparse::Response::new(&mut headers);
    let r = resp.parse(answer);
    match (r, resp.code) {
        (Ok(_) | Err(httparse::Error::TooManyHeaders), Some(code)) => {
            if (200..400).contains(&code) {
                Verdict::Healthy
            } else {
                Verdict::Unhealthy(format!("status {code}"))
            }
        }
        (Ok(httparse::Status::Partial), None) => Verdict::Wait,
        (Ok(_), None) => Verdict::Unhealthy("no status".into()),
        (Err(e), _) => Verdict::Unhealthy(format!("malformed answer: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(status_verdict(b"HTTP/1.1 200 OK\r\n"), Verdict::Healthy);
        assert_eq!(
            status_verdict(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            Verdict::Healthy
        );
        assert_eq!(
            status_verdict(b"HTTP/1.0 302 Found\r\n\r\n"),
            Verdict::Healthy
        );
        assert_eq!(
            status_verdict(b"HTTP/1.1 503 Service Unavailable\r\n"),
            Verdict::Unhealthy("status 503".into())
        );
        assert_eq!(status_verdict(b"HTTP/1.1 20"), Verdict::Wait);
        assert_eq!(status_verdict(b""), Verdict::Wait);
        assert!(matches!(
            status_verdict(b"SSH-2.0-OpenSSH\r\n"),
            Verdict::Unhealthy(_)
        ));
    }
}
