//! # baton-http: HTTP/1.1 heads, framing and limits for baton's workers
//!
//! One crate for both sides of an HTTP/1.1 connection, used by
//! `baton-static` (a server) and `baton-proxy` (a server towards clients,
//! a client towards upstreams). It is pure code over byte slices: no I/O,
//! no allocation on the parsing path (the caller lends the header-field
//! array), no panic on any input.
//!
//! * [`head`]: request and response heads, parsed strictly within
//!   [`Limits`] (head bytes, number of header fields): the start line by
//!   hand, the field lines with `httparse`.
//! * [`framing`]: how long a message body is (RFC 9112 §6): for a request
//!   ([`request_framing`]) and for a response, which depends on the request
//!   it answers ([`response_framing`], §6.3).
//! * [`body`]: one incremental decoder for every framing ([`BodyDecoder`]),
//!   to skip a body within a limit or stream it.
//! * [`chunked`]: an incremental, bounded-memory decoder of the chunked
//!   transfer coding (§7.1) that works on any split of its input, and the
//!   encoder.
//! * [`fields`]: field-value helpers: token lists (RFC 9110 §5.6.1),
//!   `Host` (§7.2), `Content-Length` (§8.6), hop-by-hop fields (§7.6.1).
//! * [`write`]: status lines with reason phrases, fields, `Date`.
//! * [`Error`]: every way a message can be refused, each with the status a
//!   server answers ([`Error::status`]).
//!
//! ## The rules, and why they are strict
//!
//! A proxy and the server behind it must agree on where each message ends,
//! or one client's bytes become another request (request smuggling). This
//! crate is the proxy's first line, so where RFC 9112 lets a recipient
//! choose, it chooses the reading that cannot be taken two ways, and
//! refuses the rest:
//!
//! * Start line (§3, §4): single spaces between exactly three parts; a
//!   method is a token, a request target visible ASCII (a raw space in it
//!   makes four parts: 400). `HTTP/1.x` with x > 1 is served as 1.1
//!   (§2.3: the minor version only says what the sender can do); any
//!   other major version, or a version-less (0.9-style) request line, is
//!   505; anything else where a version belongs is 400. Empty lines before
//!   a request line are skipped (§2.2).
//! * Field lines (§5): `httparse`'s strict request grammar: no space before
//!   the colon, no obsolete line folding, and no CR, LF or NUL inside a
//!   value (all 400; §5.5 lets a recipient reject them, so it does). A lone
//!   CR is 400 (§2.2), and so is a lone LF unless [`Limits::lone_lf`] says
//!   it ends a line (§2.2 allows either).
//! * `Host` (RFC 9110 §7.2, RFC 9112 §3.2): exactly one in an HTTP/1.1
//!   request, and a valid `uri-host [":" port]` wherever it appears.
//! * Framing (§6): `Transfer-Encoding` and `Content-Length` together are
//!   400 (§6.3 item 3: "ought to be handled as an error"), as is
//!   `Transfer-Encoding` in an HTTP/1.0 message (§6.1), `chunked` that is
//!   not the final coding or comes twice; a coding that is not registered
//!   is 501 (§6.1). `Content-Length` fields and list members that all say
//!   the same number count as one (RFC 9110 §8.6); different numbers are
//!   400.
//! * Chunked bodies (§7.1): chunk lines end in CRLF exactly; extensions and
//!   trailer fields are bounded ([`ChunkLimits`]) and skipped.
//!
//! Every error closes the connection: after any of them nobody knows where
//! the next message starts.

pub mod body;
pub mod chunked;
pub mod error;
pub mod fields;
pub mod framing;
pub mod head;
pub mod write;

pub use body::BodyDecoder;
pub use chunked::{ChunkLimits, ChunkedDecoder, Step};
pub use error::Error;
pub use framing::{request_framing, response_framing, Framing};
pub use head::{parse_request, parse_response, Limits, RequestHead, ResponseHead, Version};

/// A header field as `httparse` lends it: `name` as sent, `value` without
/// surrounding whitespace.
pub type Field<'b> = httparse::Header<'b>;

/// An unused field slot, to fill the array [`parse_request`] and
/// [`parse_response`] borrow.
pub const EMPTY_FIELD: Field<'static> = httparse::EMPTY_HEADER;
