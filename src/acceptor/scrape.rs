//! `--metrics-listen ADDR`: the Prometheus endpoint; and the same small
//! HTTP server for `--health-listen ADDR` (the health check, whose answer
//! `health.rs` decides).
//!
//! The one place where the acceptor reads bytes from a TCP peer, so it is
//! kept small and strict: the peer is an operator's scraper on an address
//! the operator chose (bind it to loopback or a management network). A
//! request head is read into a fixed 8 KiB buffer, parsed with httparse,
//! answered (`GET` gets the metrics, anything else 405; the health check
//! also answers `HEAD`) and the connection closed. A peer that does not finish its head in [`SCRAPE_TIMEOUT`] is
//! dropped.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use mio::{Interest, Token};
use tracing::{debug, warn};

use super::{Acceptor, SCRAPE_BASE};

/// Which endpoint a client came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Metrics,
    Health,
}

/// Longest request head accepted from a scraper.
const MAX_HEAD: usize = 8 * 1024;
/// A scraper must send its request within this time.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Scraper {
    stream: mio::net::TcpStream,
    buf: Vec<u8>,
    out: Vec<u8>,
    written: usize,
    pub deadline: Instant,
    kind: Endpoint,
}

impl Acceptor {
    pub(super) fn on_scrape_accept(&mut self, kind: Endpoint) {
        loop {
            let l = match kind {
                Endpoint::Metrics => self.metrics_listener.as_ref(),
                Endpoint::Health => self.health.listener.as_ref(),
            };
            let Some(l) = l else {
                return;
            };
            let (mut stream, peer) = match l.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!(error = %e, "metrics: accept failed");
                    return;
                }
            };
            let key = self.scrapers.vacant_key();
            if let Err(e) = self.poll.registry().register(
                &mut stream,
                Token(SCRAPE_BASE + key),
                Interest::READABLE,
            ) {
                warn!(error = %e, "metrics: cannot watch a client");
                continue;
            }
            debug!(peer = %peer, endpoint = ?kind, "metrics or health client");
            self.scrapers.insert(Scraper {
                stream,
                buf: Vec::with_capacity(512),
                out: Vec::new(),
                written: 0,
                deadline: Instant::now() + SCRAPE_TIMEOUT,
                kind,
            });
        }
    }

    pub(super) fn close_scraper(&mut self, key: usize) {
        if self.scrapers.contains(key) {
            let mut s = self.scrapers.remove(key);
            let _ = self.poll.registry().deregister(&mut s.stream);
        }
    }

    pub(super) fn on_scrape_event(&mut self, key: usize) {
        let Some(s) = self.scrapers.get_mut(key) else {
            return;
        };
        if s.out.is_empty() {
            let mut chunk = [0u8; 1024];
            let mut eof = false;
            loop {
                match s.stream.read(&mut chunk) {
                    // The client half-closed (a one-shot `nc -N`): answer
                    // what it sent, if that is a whole request head.
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => {
                        s.buf.extend_from_slice(&chunk[..n]);
                        if s.buf.len() > MAX_HEAD {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        self.close_scraper(key);
                        return;
                    }
                }
            }
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            let kind = s.kind;
            let parsed = req.parse(&s.buf);
            let head = kind == Endpoint::Health && req.method == Some("HEAD");
            let (status, body) = match parsed {
                Ok(httparse::Status::Partial) if eof => {
                    self.close_scraper(key);
                    return;
                }
                Ok(httparse::Status::Partial) if s.buf.len() <= MAX_HEAD => return,
                Ok(httparse::Status::Complete(_))
                    if req.method == Some("GET") || (head && req.method == Some("HEAD")) =>
                {
                    ("200 OK", String::new())
                }
                Ok(httparse::Status::Complete(_)) => {
                    ("405 Method Not Allowed", "only GET\n".to_string())
                }
                Ok(httparse::Status::Partial) => {
                    ("431 Request Header Fields Too Large", String::new())
                }
                Err(_) => ("400 Bad Request", "bad request\n".to_string()),
            };
            let (status, ctype, body) = match (status.starts_with("200"), kind) {
                (true, Endpoint::Metrics) => (status, "text/plain; version=0.0.4", self.metrics()),
                (true, Endpoint::Health) => {
                    let (status, line) = self.health_answer();
                    (status, "text/plain", line)
                }
                (false, _) => (status, "text/plain", body),
            };
            let Some(s) = self.scrapers.get_mut(key) else {
                return;
            };
            s.out = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{}",
                body.len(),
                if head { "" } else { body.as_str() }
            )
            .into_bytes();
            let _ = self.poll.registry().reregister(
                &mut s.stream,
                Token(SCRAPE_BASE + key),
                Interest::WRITABLE,
            );
        }
        let Some(s) = self.scrapers.get_mut(key) else {
            return;
        };
        while s.written < s.out.len() {
            match s.stream.write(&s.out[s.written..]) {
                Ok(n) => s.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let _ = s.stream.shutdown(std::net::Shutdown::Write);
        self.close_scraper(key);
    }
}
