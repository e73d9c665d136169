//! Writing response heads: status lines with reason phrases (RFC 9110
//! §15), fields, numbers, and the `Date` value (RFC 9110 §6.6.1).
//!
//! Everything appends to a `Vec<u8>` the caller owns and reuses; nothing
//! here validates what it writes, so field values must come from the
//! program or from fields a parser of this crate accepted.

use std::io::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use httpdate::HttpDate;

/// The reason phrase of `status` (RFC 9110 §15), `"Unknown"` for a code
/// without one.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        103 => "Early Hints",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        203 => "Non-Authoritative Information",
        204 => "No Content",
        205 => "Reset Content",
        206 => "Partial Content",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Appends `n` in decimal.
pub fn num(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Appends `HTTP/1.1 STATUS REASON\r\n` (a server answers with its own
/// version, RFC 9110 §6.2).
pub fn status_line(out: &mut Vec<u8>, status: u16) {
    out.extend_from_slice(b"HTTP/1.1 ");
    num(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends `name: value\r\n`.
pub fn field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends `name: N\r\n`.
pub fn num_field(out: &mut Vec<u8>, name: &str, n: u64) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    num(out, n);
    out.extend_from_slice(b"\r\n");
}

/// The small HTML body of an error (or redirect) response:
/// `<h1>404 Not Found</h1>` and the like.
#[derive(Debug, Clone, Copy)]
pub struct ErrorPage {
    /// The status in three digits (a status is 100 to 599).
    code: [u8; 3],
    reason: &'static str,
}

impl ErrorPage {
    /// The `Content-Type` it has.
    pub const CONTENT_TYPE: &'static [u8] = b"text/html; charset=utf-8";

    pub fn new(status: u16) -> ErrorPage {
        let s = status.min(999);
        let digit = |n: u16| b'0' + (n % 10) as u8;
        ErrorPage {
            code: [digit(s / 100), digit(s / 10), digit(s)],
            reason: reason(status),
        }
    }

    fn parts(&self) -> [&[u8]; 9] {
        let (code, reason) = (&self.code[..], self.reason.as_bytes());
        [
            b"<html><head><title>",
            code,
            b" ",
            reason,
            b"</title></head><body><h1>",
            code,
            b" ",
            reason,
            b"</h1></body></html>\n",
        ]
    }

    /// Its length, for `Content-Length`.
    pub fn body_len(&self) -> usize {
        self.parts().iter().map(|p| p.len()).sum()
    }

    /// Appends it.
    pub fn write(&self, out: &mut Vec<u8>) {
        for part in self.parts() {
            out.extend_from_slice(part);
        }
    }
}

/// The latest time an HTTP-date can express (9999-12-31T23:59:59Z).
const MAX_HTTP_DATE: u64 = 253_402_300_799;

/// Whole seconds since the epoch (0 before it).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// An `HttpDate` for `secs` after the epoch, clamped to what it can
/// express (`httpdate` panics past the year 9999).
pub fn http_date(secs: u64) -> HttpDate {
    HttpDate::from(UNIX_EPOCH + Duration::from_secs(secs.min(MAX_HTTP_DATE)))
}

/// The formatted `Date` value (IMF-fixdate), refreshed at most once a
/// second.
#[derive(Debug)]
pub struct DateCache {
    secs: u64,
    value: [u8; 29],
}

impl Default for DateCache {
    fn default() -> Self {
        let mut d = DateCache {
            secs: u64::MAX,
            value: [b' '; 29],
        };
        d.refresh(SystemTime::now());
        d
    }
}

impl DateCache {
    /// Re-formats the value when the second changed.
    pub fn refresh(&mut self, now: SystemTime) {
        let secs = unix_secs(now);
        if secs != self.secs {
            self.secs = secs;
            let mut w = &mut self.value[..];
            // An IMF-fixdate is always exactly 29 bytes.
            let _ = write!(w, "{}", http_date(secs));
        }
    }

    pub fn value(&self) -> &[u8] {
        &self.value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let mut out = Vec::new();
        status_line(&mut out, 413);
        field(&mut out, "Connection", b"close");
        num_field(&mut out, "Content-Length", 42);
        assert_eq!(
            out,
            b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\nContent-Length: 42\r\n"
        );
        assert_eq!(reason(599), "Unknown");
        let page = ErrorPage::new(502);
        let mut body = Vec::new();
        page.write(&mut body);
        assert_eq!(body.len(), page.body_len());
        assert!(String::from_utf8(body)
            .unwrap()
            .contains("<h1>502 Bad Gateway</h1>"));
        for s in [400, 413, 414, 431, 501, 502, 505] {
            assert_ne!(reason(s), "Unknown", "{s}");
        }
    }

    #[test]
    fn dates() {
        let d = DateCache::default();
        assert_eq!(d.value().len(), 29);
        assert!(d.value().ends_with(b" GMT"));
        assert!(http_date(u64::MAX).to_string().contains("9999"));
    }
}
