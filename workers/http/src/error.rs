//! Why a message was refused, and what a server answers.

/// Everything that can be wrong with a message this crate reads. Each
/// variant names the status a server answers a client with
/// ([`Error::status`]); a proxy that gets one of them from an upstream
/// *response* answers its client 502 instead (RFC 9112 §6.3 item 5).
/// After any of them the connection is closed: where the next message
/// starts is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request line did not end within the head limit.
    #[error("request line longer than the head limit")]
    RequestLineTooLong,
    /// The head did not end within the head limit.
    #[error("message head larger than the limit")]
    HeadTooLarge,
    /// More header fields than the limit.
    #[error("more header fields than the limit")]
    TooManyFields,
    /// Not `method SP request-target SP HTTP-version` (RFC 9112 §3).
    #[error("malformed request line")]
    BadRequestLine,
    /// Not `HTTP-version SP status-code SP reason-phrase` (RFC 9112 §4).
    #[error("malformed status line")]
    BadStatusLine,
    /// Something other than `HTTP/DIGIT.DIGIT` where the version goes.
    #[error("malformed HTTP version")]
    BadVersion,
    /// A well-formed version other than HTTP/1.x (or none: HTTP/0.9).
    #[error("unsupported HTTP version")]
    UnsupportedVersion,
    /// A line that ends in LF alone, where [`crate::Limits::lone_lf`] is
    /// off.
    #[error("line ending without CR")]
    LoneLf,
    /// A field line `httparse` refuses: a bad name, a space before the
    /// colon, a CR, LF or NUL in a value, obsolete line folding.
    #[error("malformed header field")]
    BadField,
    /// An HTTP/1.1 request without `Host` (RFC 9112 §3.2).
    #[error("missing Host")]
    MissingHost,
    /// More than one `Host` field.
    #[error("more than one Host field")]
    DuplicateHost,
    /// A `Host` value that is not `uri-host [":" port]` (RFC 9110 §7.2).
    #[error("invalid Host value")]
    BadHost,
    /// A `Content-Length` that is not a number, or several that differ.
    #[error("invalid Content-Length")]
    BadContentLength,
    /// Both `Content-Length` and `Transfer-Encoding` (RFC 9112 §6.3).
    #[error("both Content-Length and Transfer-Encoding")]
    LengthAndTransferEncoding,
    /// `Transfer-Encoding` whose final coding is not `chunked`, or that
    /// names `chunked` twice, in a request (RFC 9112 §6.1).
    #[error("chunked is not the final transfer coding")]
    ChunkedNotFinal,
    /// `Transfer-Encoding` in an HTTP/1.0 message (RFC 9112 §6.1).
    #[error("Transfer-Encoding in an HTTP/1.0 message")]
    TransferEncodingInHttp10,
    /// A transfer coding that is not registered (RFC 9112 §6.1: 501).
    #[error("unknown transfer coding")]
    UnknownTransferCoding,
    /// A chunked body that breaks the grammar of RFC 9112 §7.1.
    #[error("malformed chunked body")]
    BadChunk,
    /// A chunk-size line (with its extensions) longer than the limit.
    #[error("chunk line longer than the limit")]
    ChunkLineTooLong,
    /// A trailer section larger than the limit.
    #[error("trailer section larger than the limit")]
    TrailersTooLarge,
    /// A body larger than the caller's limit.
    #[error("body larger than the limit")]
    BodyTooLarge,
}

impl Error {
    /// The status a server answers a request that failed this way.
    pub fn status(self) -> u16 {
        match self {
            Error::RequestLineTooLong => 414,
            Error::HeadTooLarge | Error::TooManyFields | Error::TrailersTooLarge => 431,
            Error::UnsupportedVersion => 505,
            Error::UnknownTransferCoding => 501,
            Error::BodyTooLarge => 413,
            Error::BadStatusLine => 502,
            Error::BadRequestLine
            | Error::BadVersion
            | Error::BadField
            | Error::LoneLf
            | Error::MissingHost
            | Error::DuplicateHost
            | Error::BadHost
            | Error::BadContentLength
            | Error::LengthAndTransferEncoding
            | Error::ChunkedNotFinal
            | Error::TransferEncodingInHttp10
            | Error::BadChunk
            | Error::ChunkLineTooLong => 400,
        }
    }
}
