//! Answering one HTTP/1.1 request.
//!
//! [`respond`] takes a request head parsed and checked by `baton-http`
//! (start line, fields, `Host`, body framing: see that crate's rules) and
//! appends the whole response head (and a small body) to the connection's
//! output buffer; a large body is returned as a [`FileBody`] for the
//! connection to send with `sendfile(2)`. It never panics on what a client
//! sent: every header is validated, and anything unexpected becomes a
//! status code.
//!
//! A request body (only GET and HEAD are served, but any request may carry
//! one) is read and discarded by the connection after the response, so
//! that the connection stays usable (RFC 9112 §6.3: its framing is known),
//! up to `--max-body-bytes`; a larger `Content-Length` is answered 413 and
//! closes. A client that sent `Expect: 100-continue` may be holding its
//! body back for a 100 it will never get, so its connection closes after
//! the response instead.
//!
//! Conditional requests follow RFC 9110 §13.2.2: `If-Match`, then
//! `If-Unmodified-Since` (412), then `If-None-Match`, then
//! `If-Modified-Since` (304), then `Range` guarded by `If-Range`. One
//! `bytes=` range is honoured (206, or 416 when unsatisfiable); a list of
//! ranges is answered with the whole file, which RFC 9110 allows.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;

use baton_http::write::{self as w, http_date, unix_secs};
pub use baton_http::write::{reason, DateCache};
use baton_http::{Framing, RequestHead};

use crate::config::Config;
use crate::fs::Opened;
use crate::path::{self, Target};
use crate::site::{Page, Site};

/// Methods this server knows but does not allow (405 rather than 501).
const KNOWN_METHODS: [&str; 7] = [
    "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
];

/// What the connection must do after a response was appended.
#[derive(Debug)]
pub struct Reply {
    /// The status sent.
    pub status: u16,
    /// Body bytes this response carries (0 for HEAD and 304).
    pub body_bytes: u64,
    /// Whether the connection stays open after this response.
    pub keep_alive: bool,
    /// Whether closing should linger (stop writing, drain the input for a
    /// while) because the client may still be sending: set for errors.
    pub linger: bool,
    /// A body to send with `sendfile(2)` after the buffered bytes.
    pub file: Option<FileBody>,
    /// The request body to read and discard after this response (only
    /// when the connection stays open).
    pub body: Framing,
}

/// A body range of an open file, sent with `sendfile(2)`.
#[derive(Debug)]
pub struct FileBody {
    pub file: File,
    /// Next byte to send.
    pub offset: u64,
    /// One past the last byte to send.
    pub end: u64,
}

/// Everything one response is built from besides the request.
pub struct Shared<'a> {
    pub cfg: &'a Config,
    pub site: &'a Site,
    pub date: &'a DateCache,
}

/// Header fields of a request that matter here (besides those
/// `baton-http` checked).
#[derive(Debug, Default)]
struct Fields<'a> {
    if_match: Option<&'a [u8]>,
    if_none_match: Option<&'a [u8]>,
    if_modified_since: Option<&'a [u8]>,
    if_unmodified_since: Option<&'a [u8]>,
    range: Option<&'a [u8]>,
    if_range: Option<&'a [u8]>,
}

use baton_http::fields::{parse_decimal as parse_u64, trim_ows as trim};

impl<'a> Fields<'a> {
    fn scan(headers: &[baton_http::Field<'a>]) -> Fields<'a> {
        let mut f = Fields::default();
        for h in headers {
            let name = h.name.as_bytes();
            let v = h.value;
            let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
            if is("if-match") {
                f.if_match.get_or_insert(v);
            } else if is("if-none-match") {
                f.if_none_match.get_or_insert(v);
            } else if is("if-modified-since") {
                f.if_modified_since.get_or_insert(v);
            } else if is("if-unmodified-since") {
                f.if_unmodified_since.get_or_insert(v);
            } else if is("range") {
                f.range.get_or_insert(v);
            } else if is("if-range") {
                f.if_range.get_or_insert(v);
            }
        }
        f
    }
}

/// What conditional requests are checked against.
#[derive(Debug, Clone, Copy)]
pub struct Validators {
    /// Modification time in whole seconds since the epoch.
    pub mtime: u64,
    /// The strong entity tag, quotes included.
    pub etag: ETag,
}

/// A strong entity tag, quotes included, kept inline.
#[derive(Clone, Copy)]
pub struct ETag {
    buf: [u8; 64],
    len: usize,
}

impl std::fmt::Debug for ETag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(self.as_bytes()))
    }
}

impl ETag {
    /// `"size-mtime.nanos"` in hex: changes whenever the file is rewritten.
    pub fn new(size: u64, mtime_secs: i64, mtime_nsec: i64) -> ETag {
        let mut e = ETag {
            buf: [0; 64],
            len: 0,
        };
        let mut w = &mut e.buf[..];
        // At most 2 + 16 + 1 + 16 + 1 + 16 bytes: always fits.
        let _ = write!(w, "\"{size:x}-{mtime_secs:x}.{mtime_nsec:x}\"");
        e.len = 64 - w.len();
        e
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The opaque part, without quotes.
    fn opaque(&self) -> &[u8] {
        &self.buf[1..self.len.saturating_sub(1).max(1)]
    }
}

/// Whether an `If-Match`/`If-None-Match` value matches `etag`; `weak`
/// selects the weak comparison (`W/` prefixes ignored). `*` matches.
pub fn etag_list_matches(list: &[u8], etag: &ETag, weak: bool) -> bool {
    let list = trim(list);
    if list == b"*" {
        return true;
    }
    let mut rest = list;
    loop {
        // Skip separators.
        let start = rest
            .iter()
            .position(|&b| b != b',' && !b.is_ascii_whitespace())
            .unwrap_or(rest.len());
        rest = &rest[start..];
        if rest.is_empty() {
            return false;
        }
        let is_weak = rest.starts_with(b"W/");
        if is_weak {
            rest = &rest[2..];
        }
        if rest.first() != Some(&b'"') {
            return false; // malformed: nothing further is trustworthy
        }
        let Some(close) = rest[1..].iter().position(|&b| b == b'"') else {
            return false;
        };
        let opaque = &rest[1..1 + close];
        if opaque == etag.opaque() && (weak || !is_weak) {
            return true;
        }
        rest = &rest[close + 2..];
    }
}

/// The result of reading a `Range` header against a representation's size.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeSpec {
    /// No usable single range: answer with the whole representation.
    Ignore,
    /// Bytes `start..=end`.
    Bytes(u64, u64),
    /// Syntactically fine but outside the representation: 416.
    Unsatisfiable,
}

/// Reads a `Range` value (`bytes=a-b`, `bytes=a-`, `bytes=-n`).
pub fn parse_range(v: &[u8], size: u64) -> RangeSpec {
    let v = trim(v);
    let Some(eq) = v.iter().position(|&b| b == b'=') else {
        return RangeSpec::Ignore;
    };
    if !trim(&v[..eq]).eq_ignore_ascii_case(b"bytes") {
        return RangeSpec::Ignore;
    }
    let spec = trim(&v[eq + 1..]);
    if spec.contains(&b',') {
        return RangeSpec::Ignore;
    }
    let Some(dash) = spec.iter().position(|&b| b == b'-') else {
        return RangeSpec::Ignore;
    };
    let (first, last) = (trim(&spec[..dash]), trim(&spec[dash + 1..]));
    let digits = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_digit);
    match (first.is_empty(), last.is_empty()) {
        (true, true) => RangeSpec::Ignore,
        (true, false) => {
            if !digits(last) {
                return RangeSpec::Ignore;
            }
            // A suffix longer than u64 is just "the whole thing".
            let n = parse_u64(last).unwrap_or(u64::MAX);
            if n == 0 || size == 0 {
                RangeSpec::Unsatisfiable
            } else {
                RangeSpec::Bytes(size - n.min(size), size - 1)
            }
        }
        (false, _) => {
            if !digits(first) || !(last.is_empty() || digits(last)) {
                return RangeSpec::Ignore;
            }
            let start = parse_u64(first).unwrap_or(u64::MAX);
            let end = if last.is_empty() {
                u64::MAX
            } else {
                parse_u64(last).unwrap_or(u64::MAX)
            };
            if end < start {
                RangeSpec::Ignore
            } else if start >= size {
                RangeSpec::Unsatisfiable
            } else {
                RangeSpec::Bytes(start, end.min(size - 1))
            }
        }
    }
}

fn put_num(out: &mut Vec<u8>, n: u64) {
    w::num(out, n);
}

/// Status line, `Server` and `Date`.
fn start(out: &mut Vec<u8>, date: &DateCache, status: u16) {
    w::status_line(out, status);
    out.extend_from_slice(b"Server: baton\r\nDate: ");
    out.extend_from_slice(date.value());
    out.extend_from_slice(b"\r\n");
}

/// `Connection` (when not the version's default) and the blank line.
fn finish(out: &mut Vec<u8>, keep_alive: bool, http10: bool) {
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if http10 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    w::field(out, name, value);
}

/// How a response ends the exchange.
#[derive(Debug, Clone, Copy)]
struct Conn {
    keep_alive: bool,
    http10: bool,
    head: bool,
    /// The request body, to discard if the connection stays open.
    body: Framing,
}

/// Appends a complete error (or redirect) response with a small HTML body.
/// `close` forces `Connection: close` and a lingering close.
fn error(
    out: &mut Vec<u8>,
    date: &DateCache,
    status: u16,
    c: Conn,
    close: bool,
    extra: &[(&str, &[u8])],
) -> Reply {
    let keep_alive = c.keep_alive && !close;
    let page = w::ErrorPage::new(status);
    start(out, date, status);
    header(out, "Content-Type", w::ErrorPage::CONTENT_TYPE);
    w::num_field(out, "Content-Length", page.body_len() as u64);
    for (name, value) in extra {
        header(out, name, value);
    }
    finish(out, keep_alive, c.http10);
    let before = out.len();
    if !c.head {
        page.write(out);
    }
    Reply {
        status,
        body_bytes: (out.len() - before) as u64,
        keep_alive,
        linger: !keep_alive,
        file: None,
        body: c.body,
    }
}

/// Answers a request that could not be parsed (or whose head is too
/// large) and closes the connection after it.
pub fn bad_request(out: &mut Vec<u8>, date: &DateCache, status: u16) -> Reply {
    let c = Conn {
        keep_alive: false,
        http10: false,
        head: false,
        body: Framing::None,
    };
    error(out, date, status, c, true, &[])
}

/// What [`respond`] needs from the connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnState {
    /// Whether this connection may stay open after this request (not
    /// draining, under the per-connection request limit).
    pub may_keep_alive: bool,
}

/// Answers one parsed request: appends the response head (and any small
/// body) to `out`. `scratch` is a reusable buffer for the decoded path.
pub fn respond(
    sh: &Shared<'_>,
    req: &RequestHead<'_, '_>,
    state: ConnState,
    scratch: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Reply {
    let method = req.method;
    let http10 = req.version == baton_http::Version::Http10;
    let target = req.target.as_bytes();
    let f = Fields::scan(req.fields);
    // A client waiting for 100 Continue would wait for good.
    let holds_body = req.expect_continue && req.framing.has_body();
    let c = Conn {
        keep_alive: state.may_keep_alive && req.keep_alive && !holds_body,
        http10,
        head: method == "HEAD",
        body: req.framing,
    };
    let date = sh.date;
    if matches!(req.framing, Framing::Length(n) if n > sh.cfg.max_body_bytes) {
        return error(out, date, 413, c, true, &[]);
    }
    if method != "GET" && method != "HEAD" {
        let status = if KNOWN_METHODS.contains(&method) {
            405
        } else {
            501
        };
        return error(out, date, status, c, false, &[("Allow", b"GET, HEAD")]);
    }
    if target.len() > sh.cfg.max_uri_bytes as usize {
        return error(out, date, 414, c, true, &[]);
    }
    let t = match path::decode(target, scratch) {
        Ok(t) => t,
        Err(_) => return error(out, date, 400, c, false, &[]),
    };
    // A name with a trailing slash is a directory's (RFC 3986 §3.3): a
    // file's name with one names nothing.
    let as_file_dir = t.trailing_slash && !scratch.is_empty();
    match sh.site {
        Site::Demo(demo) => match demo.page(scratch) {
            Some(page) if !as_file_dir => send_page(sh, out, c, &f, page),
            _ => error(out, date, 404, c, false, &[]),
        },
        Site::Dir(root) => {
            let opened = match root.open_file(scratch) {
                Ok(o) => o,
                Err(e) => return error(out, date, errno_status(e), c, false, &[]),
            };
            let opened = if opened.is_dir() {
                if !t.trailing_slash {
                    return redirect_to_dir(out, date, c, scratch, target, &t);
                }
                drop(opened);
                if !scratch.is_empty() {
                    scratch.push(b'/');
                }
                scratch.extend_from_slice(sh.cfg.index.as_bytes());
                match root.open_file(scratch) {
                    Ok(o) if o.is_dir() => return error(out, date, 404, c, false, &[]),
                    Ok(o) => o,
                    Err(e) => return error(out, date, errno_status(e), c, false, &[]),
                }
            } else if as_file_dir {
                return error(out, date, 404, c, false, &[]);
            } else {
                opened
            };
            if !opened.is_file() {
                return error(out, date, 403, c, false, &[]);
            }
            send_file(sh, out, c, &f, opened, content_type(scratch))
        }
    }
}

/// The status for a failed open beneath the root.
fn errno_status(e: nix::errno::Errno) -> u16 {
    use nix::errno::Errno;
    match e {
        Errno::ENOENT | Errno::ENOTDIR => 404,
        // EXDEV: RESOLVE_BENEATH refused to leave the root.
        // ELOOP: a symlink the resolver will not follow.
        Errno::EACCES | Errno::EPERM | Errno::EXDEV | Errno::ELOOP | Errno::ENXIO => 403,
        Errno::ENAMETOOLONG => 414,
        _ => 500,
    }
}

/// `Content-Type` from the file name's extension.
fn content_type(rel: &[u8]) -> &'static str {
    let name = rel.rsplit(|&b| b == b'/').next().unwrap_or(rel);
    name.iter()
        .rposition(|&b| b == b'.')
        .and_then(|dot| std::str::from_utf8(&name[dot + 1..]).ok())
        .and_then(|ext| mime_guess::from_ext(ext).first_raw())
        .unwrap_or("application/octet-stream")
}

fn redirect_to_dir(
    out: &mut Vec<u8>,
    date: &DateCache,
    c: Conn,
    rel: &[u8],
    raw: &[u8],
    t: &Target,
) -> Reply {
    // Built from the normalised path, never echoed raw: `//evil.example`
    // would otherwise become a redirect to another host.
    let mut loc = Vec::with_capacity(rel.len() + 16);
    loc.push(b'/');
    path::encode_into(rel, &mut loc);
    if !rel.is_empty() {
        loc.push(b'/');
    }
    if let Some(q) = t.query {
        loc.push(b'?');
        path::encode_into(&raw[q..], &mut loc);
    }
    error(out, date, 301, c, false, &[("Location", &loc)])
}

/// A representation being sent: its validators and how to get its bytes.
enum Body<'a> {
    Mem(&'a [u8]),
    File(File),
}

struct Representation<'a> {
    body: Body<'a>,
    size: u64,
    validators: Validators,
    content_type: &'a str,
    cache_control: Option<&'a str>,
}

fn send_page(sh: &Shared<'_>, out: &mut Vec<u8>, c: Conn, f: &Fields<'_>, page: &Page) -> Reply {
    send(
        sh,
        out,
        c,
        f,
        Representation {
            body: Body::Mem(&page.body),
            size: page.body.len() as u64,
            validators: page.validators,
            content_type: page.content_type,
            cache_control: Some("no-cache"),
        },
    )
}

fn send_file(
    sh: &Shared<'_>,
    out: &mut Vec<u8>,
    c: Conn,
    f: &Fields<'_>,
    o: Opened,
    content_type: &str,
) -> Reply {
    let size = u64::try_from(o.stat.st_size).unwrap_or(0);
    let validators = Validators {
        mtime: u64::try_from(o.stat.st_mtime).unwrap_or(0),
        etag: ETag::new(size, o.stat.st_mtime, o.stat.st_mtime_nsec),
    };
    send(
        sh,
        out,
        c,
        f,
        Representation {
            body: Body::File(o.file),
            size,
            validators,
            content_type,
            cache_control: None,
        },
    )
}

fn date_secs(v: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(trim(v)).ok()?;
    httpdate::parse_http_date(s).ok().map(unix_secs)
}

/// Preconditions, range, headers and body of a 200/206/304/412/416.
fn send(
    sh: &Shared<'_>,
    out: &mut Vec<u8>,
    c: Conn,
    f: &Fields<'_>,
    r: Representation<'_>,
) -> Reply {
    let date = sh.date;
    let v = &r.validators;
    // RFC 9110 §13.2.2, steps 1-4.
    if let Some(im) = f.if_match {
        if !etag_list_matches(im, &v.etag, false) {
            return error(out, date, 412, c, false, &[]);
        }
    } else if let Some(t) = f.if_unmodified_since.and_then(date_secs) {
        if v.mtime > t {
            return error(out, date, 412, c, false, &[]);
        }
    }
    let not_modified = match f.if_none_match {
        Some(inm) => etag_list_matches(inm, &v.etag, true),
        None => f
            .if_modified_since
            .and_then(date_secs)
            .is_some_and(|t| v.mtime <= t),
    };
    if not_modified {
        start(out, date, 304);
        validator_headers(out, v, r.cache_control);
        finish(out, c.keep_alive, c.http10);
        return Reply {
            status: 304,
            body_bytes: 0,
            keep_alive: c.keep_alive,
            linger: false,
            file: None,
            body: c.body,
        };
    }
    // Step 5: Range, for GET only, unless If-Range says the client's copy
    // is stale.
    let mut range = None;
    if let (Some(spec), false) = (f.range, c.head) {
        let current = match f.if_range {
            None => true,
            // Strong comparison against exactly one tag; a weak tag never
            // matches.
            Some(ir) if trim(ir).starts_with(b"\"") || trim(ir).starts_with(b"W/") => {
                trim(ir) == v.etag.as_bytes()
            }
            Some(ir) => date_secs(ir) == Some(v.mtime),
        };
        if current {
            match parse_range(spec, r.size) {
                RangeSpec::Ignore => {}
                RangeSpec::Bytes(a, b) => range = Some((a, b)),
                RangeSpec::Unsatisfiable => {
                    let mut cr = Vec::with_capacity(32);
                    cr.extend_from_slice(b"bytes */");
                    put_num(&mut cr, r.size);
                    return error(out, date, 416, c, false, &[("Content-Range", &cr)]);
                }
            }
        }
    }
    let (status, first, last_excl) = match range {
        Some((a, b)) => (206, a, b + 1),
        None => (200, 0, r.size),
    };
    let len = last_excl - first;
    let mark = out.len();
    start(out, date, status);
    out.extend_from_slice(b"Content-Type: ");
    out.extend_from_slice(r.content_type.as_bytes());
    out.extend_from_slice(b"\r\nContent-Length: ");
    put_num(out, len);
    out.extend_from_slice(b"\r\n");
    validator_headers(out, v, r.cache_control);
    out.extend_from_slice(b"Accept-Ranges: bytes\r\n");
    if status == 206 {
        out.extend_from_slice(b"Content-Range: bytes ");
        put_num(out, first);
        out.push(b'-');
        put_num(out, last_excl - 1);
        out.push(b'/');
        put_num(out, r.size);
        out.extend_from_slice(b"\r\n");
    }
    finish(out, c.keep_alive, c.http10);
    let mut reply = Reply {
        status,
        body_bytes: if c.head { 0 } else { len },
        keep_alive: c.keep_alive,
        linger: false,
        file: None,
        body: c.body,
    };
    if c.head || len == 0 {
        return reply;
    }
    match r.body {
        Body::Mem(bytes) => {
            // `first..last_excl` lies within the page: parse_range clamps.
            let (a, b) = (first as usize, last_excl as usize);
            out.extend_from_slice(bytes.get(a..b).unwrap_or_default());
        }
        Body::File(file) if len <= sh.cfg.sendfile_threshold => {
            let at = out.len();
            out.resize(at + len as usize, 0);
            if file.read_exact_at(&mut out[at..], first).is_err() {
                // Shrunk under us: the promised length cannot be met.
                out.truncate(mark);
                return error(out, date, 500, c, true, &[]);
            }
        }
        Body::File(file) => {
            reply.file = Some(FileBody {
                file,
                offset: first,
                end: last_excl,
            });
        }
    }
    reply
}

fn validator_headers(out: &mut Vec<u8>, v: &Validators, cache_control: Option<&str>) {
    out.extend_from_slice(b"Last-Modified: ");
    let _ = write!(out, "{}", http_date(v.mtime));
    out.extend_from_slice(b"\r\nETag: ");
    out.extend_from_slice(v.etag.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(cc) = cache_control {
        header(out, "Cache-Control", cc.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeSpec::*;
        assert_eq!(parse_range(b"bytes=0-0", 10), Bytes(0, 0));
        assert_eq!(parse_range(b"bytes=-1", 10), Bytes(9, 9));
        assert_eq!(parse_range(b"bytes=-100", 10), Bytes(0, 9));
        assert_eq!(parse_range(b"bytes=5-", 10), Bytes(5, 9));
        assert_eq!(parse_range(b"bytes=5-100", 10), Bytes(5, 9));
        assert_eq!(parse_range(b"Bytes = 2-3", 10), Bytes(2, 3));
        assert_eq!(parse_range(b"bytes=10-", 10), Unsatisfiable);
        assert_eq!(parse_range(b"bytes=10-20", 10), Unsatisfiable);
        assert_eq!(parse_range(b"bytes=-0", 10), Unsatisfiable);
        assert_eq!(parse_range(b"bytes=0-", 0), Unsatisfiable);
        assert_eq!(
            parse_range(b"bytes=99999999999999999999999-", 10),
            Unsatisfiable
        );
        assert_eq!(parse_range(b"bytes=3-2", 10), Ignore);
        assert_eq!(parse_range(b"bytes=0-1,3-4", 10), Ignore);
        assert_eq!(parse_range(b"items=0-1", 10), Ignore);
        assert_eq!(parse_range(b"bytes=a-b", 10), Ignore);
        assert_eq!(parse_range(b"bytes=-", 10), Ignore);
        assert_eq!(parse_range(b"bytes=+1-2", 10), Ignore);
    }

    #[test]
    fn etags() {
        let e = ETag::new(0x10, 0x20, 0x30);
        assert_eq!(e.as_bytes(), b"\"10-20.30\"");
        assert!(etag_list_matches(b"\"10-20.30\"", &e, false));
        assert!(etag_list_matches(b"W/\"10-20.30\"", &e, true));
        assert!(!etag_list_matches(b"W/\"10-20.30\"", &e, false));
        assert!(etag_list_matches(b" \"x\", W/\"10-20.30\" ", &e, true));
        assert!(etag_list_matches(b"*", &e, false));
        assert!(!etag_list_matches(b"\"10-20.3\"", &e, true));
        assert!(!etag_list_matches(b"\"unterminated", &e, true));
        assert!(!etag_list_matches(b"", &e, true));
        assert!(!etag_list_matches(b"10-20.30", &e, true));
    }

    #[test]
    fn error_body_length_is_exact() {
        let date = DateCache::default();
        for status in [301, 400, 404, 405, 412, 416, 431, 505] {
            let mut out = Vec::new();
            let c = Conn {
                keep_alive: true,
                http10: false,
                head: false,
                body: Framing::None,
            };
            let r = error(&mut out, &date, status, c, false, &[]);
            let text = String::from_utf8(out).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(
                head.contains(&format!("Content-Length: {}", body.len())),
                "{head}"
            );
            assert_eq!(r.body_bytes as usize, body.len());
        }
    }

    #[test]
    fn dates_are_clamped() {
        let mut out = Vec::new();
        let v = Validators {
            mtime: u64::MAX,
            etag: ETag::new(0, 0, 0),
        };
        validator_headers(&mut out, &v, None);
        assert!(String::from_utf8(out).unwrap().contains("9999"));
        let d = DateCache::default();
        assert_eq!(d.value().len(), 29);
        assert!(d.value().ends_with(b" GMT"));
    }
}
