//! A small HTTP/1.1 client over `std::net::TcpStream`, for tests: it sends
//! exactly the bytes it is given and parses responses strictly, so tests
//! can pipeline, send malformed requests and check framing byte for byte.
//!
//! Shared by `workers/static/tests/` and the workspace's `tests/static.rs`
//! (which includes this file with `#[path]`).
#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// How long any single read may block before the test fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub version: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether the server said it will close the connection.
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// One connection, reused for as many requests as the server allows.
pub struct Client {
    pub reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        s.set_nodelay(true).expect("nodelay");
        Client {
            reader: BufReader::with_capacity(64 * 1024, s),
        }
    }

    pub fn stream(&self) -> &TcpStream {
        self.reader.get_ref()
    }

    /// Sends raw bytes.
    pub fn send(&mut self, raw: &[u8]) {
        self.reader.get_mut().write_all(raw).expect("send");
    }

    /// `GET`/`HEAD`/... `path` with `Host` and the given extra header lines.
    pub fn request(&mut self, method: &str, path: &str, headers: &[&str]) -> Response {
        self.send(&request_bytes(method, path, headers));
        self.read(method == "HEAD").expect("response")
    }

    pub fn get(&mut self, path: &str) -> Response {
        self.request("GET", path, &[])
    }

    /// Reads one response (`head`: to a HEAD request, so no body).
    pub fn read(&mut self, head: bool) -> io::Result<Response> {
        let mut body = Vec::new();
        let r = self.read_with(head, |chunk| body.extend_from_slice(chunk))?;
        Ok(Response { body, ..r })
    }

    /// Reads one response, handing the body to `sink` chunk by chunk (for
    /// bodies too large to keep).
    pub fn read_with(&mut self, head: bool, mut sink: impl FnMut(&[u8])) -> io::Result<Response> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        let status_line = line.trim_end().to_owned();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("").to_owned();
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, status_line.clone()))?;
        if !version.starts_with("HTTP/1.") {
            return Err(io::Error::new(io::ErrorKind::InvalidData, status_line));
        }
        let mut headers = Vec::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "eof in head"));
            }
            let l = line.trim_end_matches(['\r', '\n']);
            if l.is_empty() {
                break;
            }
            let (n, v) = l
                .split_once(':')
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, l.to_owned()))?;
            headers.push((n.trim().to_owned(), v.trim().to_owned()));
        }
        let r = Response {
            status,
            version,
            headers,
            body: Vec::new(),
        };
        let no_body = head || status == 304 || status == 204 || status < 200;
        if !no_body {
            match r.header("content-length") {
                Some(v) => {
                    let mut left: u64 = v
                        .parse()
                        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad length"))?;
                    let mut buf = vec![0u8; 256 * 1024];
                    while left > 0 {
                        let want = buf.len().min(left as usize);
                        let n = self.reader.read(&mut buf[..want])?;
                        if n == 0 {
                            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short body"));
                        }
                        sink(&buf[..n]);
                        left -= n as u64;
                    }
                }
                None => {
                    let mut rest = Vec::new();
                    self.reader.read_to_end(&mut rest)?;
                    sink(&rest);
                }
            }
        }
        Ok(r)
    }

    /// Reads until the server closes; returns what came (must be bounded by
    /// the read timeout). Err if the read timed out instead.
    pub fn read_to_eof(&mut self) -> io::Result<Vec<u8>> {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => Ok(rest),
            // A reset after the server closed is an EOF too.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(rest),
            Err(e) => Err(e),
        }
    }
}

pub fn request_bytes(method: &str, path: &str, headers: &[&str]) -> Vec<u8> {
    let mut s = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
    for h in headers {
        s.push_str(h);
        s.push_str("\r\n");
    }
    s.push_str("\r\n");
    s.into_bytes()
}

/// One request on a fresh connection that the client then closes.
pub fn get(addr: SocketAddr, path: &str, headers: &[&str]) -> Response {
    let mut c = Client::connect(addr);
    c.request("GET", path, headers)
}

/// Sends raw bytes on a fresh connection and reads one response.
pub fn raw(addr: SocketAddr, bytes: &[u8]) -> Response {
    let mut c = Client::connect(addr);
    c.send(bytes);
    c.read(false).expect("response")
}

/// Deterministic pseudo-random bytes (xorshift), so that any misplaced or
/// repeated block shows up in a comparison.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}
