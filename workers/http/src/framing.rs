//! How long a message body is: RFC 9112 §6.
//!
//! The decision reads only `Transfer-Encoding` and `Content-Length` (and,
//! for a response, its status and the request's method), so it is a pure
//! function of a few fields; both [`request_framing`] and
//! [`response_framing`] refuse every combination that two recipients could
//! read differently (see the crate docs).

use crate::fields::{self, list, member_name};
use crate::{Error, Field, Version};

/// Where a message body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: the next message starts right after the head.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// The chunked transfer coding ([`crate::ChunkedDecoder`]) ends it.
    Chunked,
    /// The body runs until the sender closes the connection (a response
    /// only, RFC 9112 §6.3 items 4 and 8): the connection cannot be reused.
    UntilClose,
    /// No body: the connection now carries another protocol (a 101
    /// response, or a 2xx answer to CONNECT; RFC 9112 §6.3 item 2).
    Tunnel,
}

impl Framing {
    /// Whether body bytes follow the head.
    pub fn has_body(self) -> bool {
        !matches!(self, Framing::None | Framing::Tunnel | Framing::Length(0))
    }
}

/// Transfer codings registered with IANA besides `chunked` (RFC 9112 §7):
/// allowed before the final `chunked`, never decoded here.
const CODINGS: [&str; 5] = ["gzip", "deflate", "compress", "x-gzip", "x-compress"];

/// What a `Transfer-Encoding` list says, if there is one.
enum Coding {
    Absent,
    /// `chunked` is the final coding, and the only `chunked`.
    ChunkedLast,
    /// Known codings, but `chunked` not (only) last.
    NotChunked,
}

fn transfer_coding(fields: &[Field<'_>]) -> Result<Coding, Error> {
    let mut present = false;
    let mut chunked = 0u32;
    let mut last_chunked = false;
    for v in fields::values(fields, "transfer-encoding") {
        present = true;
        for m in list(v) {
            let name = member_name(m);
            let is_chunked = name.eq_ignore_ascii_case(b"chunked");
            if !is_chunked
                && !CODINGS
                    .iter()
                    .any(|c| c.as_bytes().eq_ignore_ascii_case(name))
            {
                return Err(Error::UnknownTransferCoding);
            }
            chunked += u32::from(is_chunked);
            last_chunked = is_chunked;
        }
    }
    Ok(match (present, chunked, last_chunked) {
        (false, _, _) => Coding::Absent,
        (true, 1, true) => Coding::ChunkedLast,
        _ => Coding::NotChunked,
    })
}

/// The framing of a request's body (RFC 9112 §6.1, §6.3 items 3-6):
/// `chunked` last in `Transfer-Encoding`, else `Content-Length`, else no
/// body. Both fields, an HTTP/1.0 request with `Transfer-Encoding`,
/// `chunked` not last or twice, an empty `Transfer-Encoding`: 400; an
/// unregistered coding: 501; `Content-Length` rules: see
/// [`fields::content_length`].
pub fn request_framing(version: Version, fields: &[Field<'_>]) -> Result<Framing, Error> {
    let has_te = fields::first(fields, "transfer-encoding").is_some();
    let length = fields::content_length(fields)?;
    if has_te && length.is_some() {
        return Err(Error::LengthAndTransferEncoding);
    }
    match transfer_coding(fields)? {
        Coding::Absent => Ok(length.map_or(Framing::None, Framing::Length)),
        _ if version == Version::Http10 => Err(Error::TransferEncodingInHttp10),
        Coding::ChunkedLast => Ok(Framing::Chunked),
        Coding::NotChunked => Err(Error::ChunkedNotFinal),
    }
}

/// The framing of a response's body (RFC 9112 §6.3): none for a response
/// to HEAD and for 1xx, 204 and 304 (a tunnel for 101 and for a 2xx to
/// CONNECT), whatever the fields say; else `chunked` last, else
/// `Content-Length`, else until the connection closes. `Transfer-Encoding`
/// without a final `chunked` also reads until close (item 4). The errors
/// are the request's (both fields, HTTP/1.0 with `Transfer-Encoding`, a bad
/// `Content-Length`), which a proxy answers with 502.
pub fn response_framing(
    request_method: &str,
    status: u16,
    version: Version,
    fields: &[Field<'_>],
) -> Result<Framing, Error> {
    if status == 101 || (request_method == "CONNECT" && (200..300).contains(&status)) {
        return Ok(Framing::Tunnel);
    }
    if request_method == "HEAD" || status < 200 || status == 204 || status == 304 {
        return Ok(Framing::None);
    }
    let has_te = fields::first(fields, "transfer-encoding").is_some();
    let length = fields::content_length(fields)?;
    if has_te && length.is_some() {
        return Err(Error::LengthAndTransferEncoding);
    }
    if has_te && version == Version::Http10 {
        return Err(Error::TransferEncodingInHttp10);
    }
    match transfer_coding(fields) {
        Ok(Coding::Absent) => Ok(length.map_or(Framing::UntilClose, Framing::Length)),
        Ok(Coding::ChunkedLast) => Ok(Framing::Chunked),
        // Item 4: the body ends when the server closes.
        Ok(Coding::NotChunked) | Err(Error::UnknownTransferCoding) => Ok(Framing::UntilClose),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Version::{Http10, Http11};

    fn fl<'a>(pairs: &[(&'a str, &'a str)]) -> Vec<Field<'a>> {
        pairs
            .iter()
            .map(|(n, v)| Field {
                name: n,
                value: v.as_bytes(),
            })
            .collect()
    }

    #[test]
    fn requests() {
        let req = |p: &[(&str, &str)]| request_framing(Http11, &fl(p));
        assert_eq!(req(&[]), Ok(Framing::None));
        assert_eq!(req(&[("Content-Length", "0")]), Ok(Framing::Length(0)));
        assert_eq!(req(&[("Content-Length", "5, 5")]), Ok(Framing::Length(5)));
        assert_eq!(
            req(&[("Transfer-Encoding", "chunked")]),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            req(&[("Transfer-Encoding", "Chunked")]),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            req(&[
                ("Transfer-Encoding", "gzip"),
                ("transfer-encoding", "chunked")
            ]),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            req(&[("Transfer-Encoding", "chunked"), ("Content-Length", "5")]),
            Err(Error::LengthAndTransferEncoding)
        );
        assert_eq!(
            req(&[("Transfer-Encoding", "chunked, gzip")]),
            Err(Error::ChunkedNotFinal)
        );
        assert_eq!(
            req(&[("Transfer-Encoding", "chunked, chunked")]),
            Err(Error::ChunkedNotFinal)
        );
        assert_eq!(
            req(&[("Transfer-Encoding", "")]),
            Err(Error::ChunkedNotFinal)
        );
        assert_eq!(
            req(&[("Transfer-Encoding", "gzip")]),
            Err(Error::ChunkedNotFinal)
        );
        assert_eq!(
            req(&[("Transfer-Encoding", "identity")]),
            Err(Error::UnknownTransferCoding)
        );
        assert_eq!(
            req(&[("Transfer-Encoding", "foo, chunked")]),
            Err(Error::UnknownTransferCoding)
        );
        assert_eq!(
            request_framing(Http10, &fl(&[("Transfer-Encoding", "chunked")])),
            Err(Error::TransferEncodingInHttp10)
        );
    }

    #[test]
    fn responses() {
        let resp = |m: &str, s: u16, p: &[(&str, &str)]| response_framing(m, s, Http11, &fl(p));
        let cl = [("Content-Length", "10")];
        assert_eq!(resp("GET", 200, &cl), Ok(Framing::Length(10)));
        assert_eq!(resp("HEAD", 200, &cl), Ok(Framing::None));
        for s in [100, 103, 204, 304] {
            assert_eq!(resp("GET", s, &cl), Ok(Framing::None), "{s}");
        }
        assert_eq!(resp("GET", 101, &[]), Ok(Framing::Tunnel));
        assert_eq!(resp("CONNECT", 200, &[]), Ok(Framing::Tunnel));
        assert_eq!(resp("CONNECT", 407, &cl), Ok(Framing::Length(10)));
        assert_eq!(resp("GET", 200, &[]), Ok(Framing::UntilClose));
        assert_eq!(
            resp("GET", 200, &[("Transfer-Encoding", "chunked")]),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            resp("GET", 200, &[("Transfer-Encoding", "gzip")]),
            Ok(Framing::UntilClose)
        );
        assert_eq!(
            resp(
                "GET",
                200,
                &[("Transfer-Encoding", "chunked"), ("Content-Length", "1")]
            ),
            Err(Error::LengthAndTransferEncoding)
        );
        assert_eq!(
            resp("GET", 200, &[("Content-Length", "1, 2")]),
            Err(Error::BadContentLength)
        );
        assert_eq!(
            response_framing("GET", 200, Http10, &fl(&[("Transfer-Encoding", "chunked")])),
            Err(Error::TransferEncodingInHttp10)
        );
        assert!(!Framing::Length(0).has_body());
        assert!(Framing::UntilClose.has_body());
    }
}
