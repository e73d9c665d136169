//! Request and response heads: RFC 9112 §2-§5, within [`Limits`].
//!
//! [`parse_request`] and [`parse_response`] take the bytes received so far
//! (from the start of a message) and answer `Ok(None)` while the head is
//! incomplete and still within the limit, so a caller re-parses as bytes
//! arrive; `Ok(Some(head))` once it is complete; an [`Error`] when it is
//! malformed or over a limit. The start line is parsed here, strictly; the
//! field lines by `httparse` into an array the caller lends, whose length
//! is the field limit ([`Limits::fields`] makes one).

use crate::fields;
use crate::framing::{request_framing, Framing};
use crate::{Error, Field, EMPTY_FIELD};

/// How much of a head a parser accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest head (start line, fields, the empty line) in bytes; the
    /// caller's buffer need not be larger.
    pub max_head_bytes: usize,
    /// Most header fields. 100, as Apache httpd's `LimitRequestFields`
    /// (HAProxy's `tune.http.maxhdr` is 101; nginx counts only bytes).
    pub max_fields: usize,
    /// Whether a lone LF ends a line, as RFC 9112 §2.2 allows a recipient
    /// to accept. Off by default: a head with one is 400
    /// ([`Error::LoneLf`]), because a proxy whose upstream reads a lone LF
    /// differently would let a field hide inside another's value. A server
    /// with nothing behind it may turn it on (nginx accepts it).
    pub lone_lf: bool,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_head_bytes: 16 * 1024,
            max_fields: 100,
            lone_lf: false,
        }
    }
}

impl Limits {
    /// A field array of [`Limits::max_fields`] slots to lend the parsers.
    pub fn fields<'b>(&self) -> Vec<Field<'b>> {
        vec![EMPTY_FIELD; self.max_fields]
    }
}

/// The HTTP version of a message, as this crate serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.0.
    Http10,
    /// HTTP/1.1, and any later HTTP/1.x (RFC 9112 §2.3: a higher minor
    /// version only says what the sender could do).
    Http11,
}

impl Version {
    /// The version as it is written in a start line.
    pub fn as_str(self) -> &'static str {
        match self {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        }
    }
}

/// A complete, valid request head. Its fields borrow the caller's buffer
/// and field array.
#[derive(Debug)]
pub struct RequestHead<'b, 'h> {
    /// A token (RFC 9110 §9.1), case as sent.
    pub method: &'b str,
    /// The request target, visible ASCII only.
    pub target: &'b str,
    pub version: Version,
    /// The header fields in order, names as sent.
    pub fields: &'h [Field<'b>],
    /// Bytes of the head, leading empty lines included: the body (or the
    /// next request) starts there.
    pub len: usize,
    /// The `Host` value (validated), if there is one.
    pub host: Option<&'b [u8]>,
    /// How the request body is framed.
    pub framing: Framing,
    /// Whether the client wants the connection kept open: HTTP/1.1 unless
    /// `Connection: close`, HTTP/1.0 only with `Connection: keep-alive`
    /// (RFC 9112 §9.3).
    pub keep_alive: bool,
    /// `Expect: 100-continue` (RFC 9110 §10.1.1): the client may wait for
    /// a 100 before it sends the body.
    pub expect_continue: bool,
}

impl<'b> RequestHead<'b, '_> {
    /// The first value of the field `name` (case-insensitive).
    pub fn field(&self, name: &str) -> Option<&'b [u8]> {
        fields::first(self.fields, name)
    }
}

/// A complete, valid response head.
#[derive(Debug)]
pub struct ResponseHead<'b, 'h> {
    pub version: Version,
    /// 100 to 599.
    pub status: u16,
    /// The reason phrase, as sent (a client ignores it, RFC 9112 §4).
    pub reason: &'b [u8],
    pub fields: &'h [Field<'b>],
    /// Bytes of the head: the body starts there.
    pub len: usize,
    /// Whether the server lets the connection be reused (same rule as a
    /// request's, RFC 9112 §9.3).
    pub keep_alive: bool,
}

impl<'b> ResponseHead<'b, '_> {
    /// The first value of the field `name` (case-insensitive).
    pub fn field(&self, name: &str) -> Option<&'b [u8]> {
        fields::first(self.fields, name)
    }

    /// How this response's body is framed, given the method of the request
    /// it answers ([`crate::response_framing`]).
    pub fn framing(&self, request_method: &str) -> Result<Framing, Error> {
        crate::response_framing(request_method, self.status, self.version, self.fields)
    }
}

/// The start line and where the field lines begin, once a whole line is in.
struct StartLine<'b> {
    /// The line without its line ending.
    line: &'b [u8],
    /// Offset of the first field line.
    fields_at: usize,
}

/// Skips empty lines (RFC 9112 §2.2) and finds the end of the start line.
/// `Ok(None)`: not all there yet. A lone CR is refused (§2.2).
fn start_line(buf: &[u8]) -> Result<Option<StartLine<'_>>, Error> {
    let mut at = 0;
    loop {
        match &buf[at..] {
            [b'\r', b'\n', ..] => at += 2,
            [b'\n', ..] => at += 1,
            [] | [b'\r'] => return Ok(None),
            _ => break,
        }
    }
    let Some(lf) = buf[at..].iter().position(|&b| b == b'\n') else {
        return Ok(None);
    };
    let mut line = &buf[at..at + lf];
    if let [rest @ .., b'\r'] = line {
        line = rest;
    }
    if line.contains(&b'\r') {
        return Err(Error::BadRequestLine);
    }
    Ok(Some(StartLine {
        line,
        fields_at: at + lf + 1,
    }))
}

/// Whether some LF in `head` has no CR before it.
fn has_lone_lf(head: &[u8]) -> bool {
    head.iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
}

/// `HTTP/DIGIT.DIGIT` → its version; a major version other than 1 is
/// [`Error::UnsupportedVersion`].
fn version(v: &[u8]) -> Result<Version, Error> {
    match v {
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            match (major, minor) {
                (b'1', b'0') => Ok(Version::Http10),
                (b'1', _) => Ok(Version::Http11),
                _ => Err(Error::UnsupportedVersion),
            }
        }
        _ => Err(Error::BadVersion),
    }
}

/// Parses the field lines at `buf[at..]` into `store`; the head's total
/// length, or `None` if incomplete.
fn field_lines<'b, 'h>(
    buf: &'b [u8],
    at: usize,
    store: &'h mut [Field<'b>],
) -> Result<Option<(usize, &'h [Field<'b>])>, Error> {
    match httparse::parse_headers(&buf[at..], store) {
        Ok(httparse::Status::Complete((n, fields))) => Ok(Some((at + n, fields))),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(Error::TooManyFields),
        Err(_) => Err(Error::BadField),
    }
}

/// A parsed start line, the head's length, its fields.
type HeadParts<'b, 'h, S> = (S, usize, &'h [Field<'b>]);

/// What both kinds of head share: the start line (`parse_start` reads
/// it once it is all there) and the field lines, within `limits`. The
/// total length and the fields, or `None` if incomplete.
fn parse_head<'b, 'h, S>(
    buf: &'b [u8],
    limits: &Limits,
    fields: &'h mut [Field<'b>],
    is_request: bool,
    parse_start: impl FnOnce(&'b [u8]) -> Result<S, Error>,
) -> Result<Option<HeadParts<'b, 'h, S>>, Error> {
    let window = &buf[..buf.len().min(limits.max_head_bytes)];
    let full = buf.len() >= limits.max_head_bytes;
    let max = fields.len().min(limits.max_fields);
    let line = match start_line(window) {
        Ok(Some(line)) => line,
        Ok(None) if full && is_request => return Err(Error::RequestLineTooLong),
        Ok(None) if full => return Err(Error::HeadTooLarge),
        Ok(None) => return Ok(None),
        Err(e) if is_request => return Err(e),
        Err(_) => return Err(Error::BadStatusLine),
    };
    let start = parse_start(line.line)?;
    match field_lines(window, line.fields_at, &mut fields[..max])? {
        Some((len, _)) if !limits.lone_lf && has_lone_lf(&window[..len]) => Err(Error::LoneLf),
        Some((len, fields)) => Ok(Some((start, len, fields))),
        None if full => Err(Error::HeadTooLarge),
        None => Ok(None),
    }
}

/// Parses a request head from the start of `buf` (RFC 9112 §3, §5),
/// checks `Host` and decides the body's framing (see the crate docs for
/// every rule). `fields` is where the field lines go; its length is the
/// field limit (more: [`Error::TooManyFields`]). Only the first
/// [`Limits::max_head_bytes`] of `buf` are looked at.
pub fn parse_request<'b, 'h>(
    buf: &'b [u8],
    limits: &Limits,
    fields: &'h mut [Field<'b>],
) -> Result<Option<RequestHead<'b, 'h>>, Error> {
    let Some(((method, target, version), len, fields)) =
        parse_head(buf, limits, fields, true, request_line)?
    else {
        return Ok(None);
    };
    let mut host = None;
    for v in fields::values(fields, "host") {
        if host.replace(v).is_some() {
            return Err(Error::DuplicateHost);
        }
        if !fields::valid_host(v) {
            return Err(Error::BadHost);
        }
    }
    if host.is_none() && version == Version::Http11 {
        return Err(Error::MissingHost);
    }
    let framing = request_framing(version, fields)?;
    Ok(Some(RequestHead {
        method,
        target,
        version,
        fields,
        len,
        host,
        framing,
        keep_alive: keep_alive(version, fields),
        expect_continue: fields::any_token(fields, "expect", "100-continue"),
    }))
}

/// `method SP request-target SP HTTP-version`, single spaces, nothing
/// else. A line of two parts is an HTTP/0.9 request (505).
fn request_line(line: &[u8]) -> Result<(&str, &str, Version), Error> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(Error::BadRequestLine);
    };
    let (version, extra) = (parts.next(), parts.next());
    let target_ok = !target.is_empty() && target.iter().all(|b| (0x21..=0x7e).contains(b));
    if !fields::is_token(method) || !target_ok || extra.is_some() {
        return Err(Error::BadRequestLine);
    }
    let version = match version {
        Some(v) => self::version(v)?,
        None => return Err(Error::UnsupportedVersion),
    };
    // Both checked to be ASCII above.
    let as_str = |s| std::str::from_utf8(s).map_err(|_| Error::BadRequestLine);
    Ok((as_str(method)?, as_str(target)?, version))
}

/// Parses a response head from the start of `buf` (RFC 9112 §4, §5) with
/// the same strictness as a request's. Its framing depends on the request
/// ([`ResponseHead::framing`]).
pub fn parse_response<'b, 'h>(
    buf: &'b [u8],
    limits: &Limits,
    fields: &'h mut [Field<'b>],
) -> Result<Option<ResponseHead<'b, 'h>>, Error> {
    let Some(((version, status, reason), len, fields)) =
        parse_head(buf, limits, fields, false, status_line)?
    else {
        return Ok(None);
    };
    Ok(Some(ResponseHead {
        version,
        status,
        reason,
        fields,
        len,
        keep_alive: keep_alive(version, fields),
    }))
}

/// `HTTP-version SP 3DIGIT SP reason-phrase`; a missing reason (and its
/// space) is accepted, as every client does.
fn status_line(line: &[u8]) -> Result<(Version, u16, &[u8]), Error> {
    let (v, rest) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => return Err(Error::BadStatusLine),
    };
    let version = match version(v) {
        Ok(v) => v,
        Err(Error::UnsupportedVersion) => return Err(Error::UnsupportedVersion),
        Err(_) => return Err(Error::BadStatusLine),
    };
    let (code, reason) = match rest {
        [a, b, c] => ([*a, *b, *c], &[][..]),
        [a, b, c, b' ', reason @ ..] => ([*a, *b, *c], reason),
        _ => return Err(Error::BadStatusLine),
    };
    let reason_ok = reason
        .iter()
        .all(|&b| b == b'\t' || (0x20..=0x7e).contains(&b) || b >= 0x80);
    if !code.iter().all(u8::is_ascii_digit) || !reason_ok {
        return Err(Error::BadStatusLine);
    }
    let status = code.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    if !(100..=599).contains(&status) {
        return Err(Error::BadStatusLine);
    }
    Ok((version, status, reason))
}

fn keep_alive(version: Version, fields: &[Field<'_>]) -> bool {
    let close = fields::any_token(fields, "connection", "close");
    match version {
        Version::Http10 => !close && fields::any_token(fields, "connection", "keep-alive"),
        Version::Http11 => !close,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(buf: &[u8]) -> Result<Option<(String, String, Version, usize)>, Error> {
        let limits = Limits::default();
        let mut store = limits.fields();
        parse_request(buf, &limits, &mut store)
            .map(|h| h.map(|h| (h.method.to_owned(), h.target.to_owned(), h.version, h.len)))
    }

    fn status(buf: &[u8]) -> u16 {
        match req(buf) {
            Ok(Some(_)) => 200,
            Ok(None) => 0,
            Err(e) => e.status(),
        }
    }

    #[test]
    fn request_lines() {
        let r = req(b"GET /a?b HTTP/1.1\r\nHost: x\r\n\r\nrest")
            .unwrap()
            .unwrap();
        assert_eq!(r, ("GET".into(), "/a?b".into(), Version::Http11, 30));
        let r = req(b"\r\n\r\nGET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert_eq!((r.2, r.3), (Version::Http10, 22));
        // Versions.
        assert_eq!(
            req(b"GET / HTTP/1.2\r\nHost: x\r\n\r\n")
                .unwrap()
                .unwrap()
                .2,
            Version::Http11
        );
        assert_eq!(
            req(b"GET / HTTP/1.9\r\nHost: x\r\n\r\n")
                .unwrap()
                .unwrap()
                .2,
            Version::Http11
        );
        for v in ["HTTP/2.0", "HTTP/0.9", "HTTP/3.0"] {
            let line = format!("GET / {v}\r\nHost: x\r\n\r\n");
            assert_eq!(status(line.as_bytes()), 505, "{v}");
        }
        assert_eq!(status(b"GET /\r\n\r\n"), 505, "0.9 style");
        for v in [
            "HTTP/1.10",
            "http/1.1",
            "FOO/1.1",
            "HTTP/1",
            "HTTP/a.1",
            "HTTP/1.1 ",
        ] {
            let line = format!("GET / {v}\r\nHost: x\r\n\r\n");
            assert_eq!(status(line.as_bytes()), 400, "{v:?}");
        }
        // Spaces and bytes.
        for line in [
            "GET /a b HTTP/1.1",
            "GET  / HTTP/1.1",
            "GET / HTTP/1.1 x",
            " GET / HTTP/1.1",
            "GET\t/ HTTP/1.1",
            "G(T / HTTP/1.1",
            "GET /\x7f HTTP/1.1",
            "GET /\u{e9} HTTP/1.1",
            "GET",
            "GET / HTTP/1.1\rX",
        ] {
            let head = format!("{line}\r\nHost: x\r\n\r\n");
            assert_eq!(status(head.as_bytes()), 400, "{line:?}");
        }
    }

    #[test]
    fn field_lines_are_strict() {
        for field in [
            "X: a\rb",
            "X: a\0b",
            "X : a",
            "X\t: a",
            " X: a",
            "X: a\r\n folded",
            "X: a\x01",
            "X: \x7f",
            "Bad Name: a",
            ": empty",
        ] {
            let head = format!("GET / HTTP/1.1\r\nHost: x\r\n{field}\r\n\r\n");
            assert_eq!(req(head.as_bytes()), Err(Error::BadField), "{field:?}");
        }
        // A lone LF ends a line (RFC 9112 §2.2) only if allowed.
        let lf = b"\nGET / HTTP/1.1\nHost: x\r\nX: y\n\n";
        assert_eq!(req(lf), Err(Error::LoneLf));
        let limits = Limits {
            lone_lf: true,
            ..Limits::default()
        };
        let mut store = limits.fields();
        let h = parse_request(lf, &limits, &mut store).unwrap().unwrap();
        assert_eq!((h.len, h.fields.len()), (lf.len(), 2));
    }

    #[test]
    fn hosts() {
        assert_eq!(req(b"GET / HTTP/1.1\r\n\r\n"), Err(Error::MissingHost));
        assert!(req(b"GET / HTTP/1.0\r\n\r\n").unwrap().is_some());
        assert_eq!(
            req(b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n"),
            Err(Error::DuplicateHost)
        );
        for bad in ["a b", "a/b", "u@h", "h:x", "[::1"] {
            let head = format!("GET / HTTP/1.0\r\nHost: {bad}\r\n\r\n");
            assert_eq!(req(head.as_bytes()), Err(Error::BadHost), "{bad}");
        }
    }

    #[test]
    fn limits() {
        let limits = Limits {
            max_head_bytes: 64,
            max_fields: 2,
            lone_lf: false,
        };
        let p = |b: &[u8]| {
            let mut store = limits.fields();
            parse_request(b, &limits, &mut store).map(|h| h.is_some())
        };
        assert_eq!(p(b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n\r\n"), Ok(true));
        assert_eq!(
            p(b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\nY: 2\r\n\r\n"),
            Err(Error::TooManyFields)
        );
        let long_line = [b"GET /".as_slice(), &[b'a'; 80]].concat();
        assert_eq!(p(&long_line), Err(Error::RequestLineTooLong));
        let long_field = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 80]].concat();
        assert_eq!(p(&long_field), Err(Error::HeadTooLarge));
        let complete_but_long = [long_field.as_slice(), b"\r\n\r\n"].concat();
        assert_eq!(p(&complete_but_long), Err(Error::HeadTooLarge));
        assert_eq!(p(b"GET / HTTP/1.1\r\nHost: a\r\n"), Ok(false));
    }

    #[test]
    fn request_facts() {
        let limits = Limits::default();
        let mut store = limits.fields();
        let buf = b"POST /x HTTP/1.1\r\nHost: a:1\r\nConnection: Close\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n";
        let h = parse_request(buf, &limits, &mut store).unwrap().unwrap();
        assert_eq!(h.host, Some(&b"a:1"[..]));
        assert!(!h.keep_alive);
        assert!(h.expect_continue);
        assert_eq!(h.framing, Framing::Length(3));
        assert_eq!(h.field("content-length"), Some(&b"3"[..]));
        let mut store = limits.fields();
        let buf = b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
        assert!(
            parse_request(buf, &limits, &mut store)
                .unwrap()
                .unwrap()
                .keep_alive
        );
    }

    #[test]
    fn responses() {
        let limits = Limits::default();
        let parse = |b: &[u8]| {
            let mut store = limits.fields();
            parse_response(b, &limits, &mut store)
                .map(|h| h.map(|h| (h.version, h.status, h.reason.to_vec(), h.len, h.keep_alive)))
        };
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            Ok(Some((Version::Http11, 200, b"OK".to_vec(), 38, true)))
        );
        assert_eq!(
            parse(b"HTTP/1.0 404\r\n\r\n"),
            Ok(Some((Version::Http10, 404, vec![], 16, false)))
        );
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\n"), Ok(None));
        assert_eq!(
            parse(b"HTTP/2.0 200 OK\r\n\r\n"),
            Err(Error::UnsupportedVersion)
        );
        for bad in [
            "HTTP/1.1 20 OK",
            "HTTP/1.1 2000 OK",
            "HTTP/1.1 099 x",
            "HTTP/1.1 600 x",
            "HTTP/1.1  200 OK",
            "HTTP/1.1 200 O\x01",
            "ICY 200 OK",
            "HTTP/1.1",
        ] {
            let head = format!("{bad}\r\n\r\n");
            assert_eq!(parse(head.as_bytes()), Err(Error::BadStatusLine), "{bad:?}");
        }
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n"),
            Err(Error::BadField)
        );
    }
}
