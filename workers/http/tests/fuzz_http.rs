//! Fuzz targets of baton-http (bounded proptest runs, see
//! `tests/fuzzing/mod.rs`):
//!
//! * the chunked decoder against a model (the chunks it was encoded from)
//!   over random splits of its input, and split-invariance on mutated
//!   bodies: however the bytes arrive, the decoder says the same;
//! * request and response heads: no panic on any bytes, results within
//!   the limits, a strict prefix of a valid head is "incomplete" (never an
//!   error), what follows a complete head does not change it;
//! * the framing decision against the rules of RFC 9112 §6 written out
//!   once more, in the order the RFC states them.

#[path = "../../../tests/fuzzing/mod.rs"]
mod fuzzing;

use baton_http::chunked::{encode_chunk, ChunkHead, LAST_CHUNK};
use baton_http::{
    parse_request, parse_response, request_framing, response_framing, ChunkLimits, ChunkedDecoder,
    Error, Field, Framing, Limits, Version,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

// --- Chunked ------------------------------------------------------------

/// A chunked body as the model knows it.
#[derive(Debug, Clone)]
struct Body {
    chunks: Vec<(Vec<u8>, String)>,
    trailers: Vec<String>,
    upper: bool,
    zeros: usize,
}

impl Body {
    fn data(&self) -> Vec<u8> {
        self.chunks.iter().flat_map(|(d, _)| d.clone()).collect()
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (data, ext) in &self.chunks {
            let mut size = "0".repeat(self.zeros);
            size.push_str(&format!("{:x}", data.len()));
            if self.upper {
                size = size.to_uppercase();
            }
            out.extend_from_slice(size.as_bytes());
            out.extend_from_slice(ext.as_bytes());
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n");
        for t in &self.trailers {
            out.extend_from_slice(t.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

fn body() -> impl Strategy<Value = Body> {
    let ext = prop_oneof![
        3 => Just(String::new()),
        1 => "( ?;[a-z]{1,6}(=[a-z0-9]{0,6})?){1,3}",
        1 => ";q=\"[a-z ,;\\\\\"]{0,8}\"".prop_filter("balanced", |s| {
            // A valid quoted-string: no unescaped quote inside.
            let inner = &s[4..s.len() - 1];
            let mut esc = false;
            inner.bytes().all(|b| {
                let ok = esc || b != b'"';
                esc = !esc && b == b'\\';
                ok
            }) && !esc
        }),
    ];
    let chunk = (
        prop_oneof![
            2 => prop::collection::vec(any::<u8>(), 1..64),
            1 => prop::collection::vec(any::<u8>(), 64..3000),
        ],
        ext,
    );
    (
        prop::collection::vec(chunk, 0..6),
        prop::collection::vec("[A-Za-z-]{1,8}: [ -~]{0,12}", 0..3),
        any::<bool>(),
        0usize..3,
    )
        .prop_map(|(chunks, trailers, upper, zeros)| Body {
            chunks,
            trailers,
            upper,
            zeros,
        })
}

/// Split points, as fractions of the input's length.
fn splits() -> impl Strategy<Value = Vec<u16>> {
    prop::collection::vec(any::<u16>(), 0..12)
}

/// What a decoder made of `input` delivered in pieces cut at `cuts`, the
/// way a connection reads: unconsumed bytes stay and the next read is
/// appended. (data, Ok(bytes left after the body) or the error, done).
fn decode_split(input: &[u8], cuts: &[u16]) -> (Vec<u8>, Result<usize, Error>, bool) {
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|c| usize::from(*c) * input.len() / usize::from(u16::MAX))
        .collect();
    points.push(input.len());
    points.sort_unstable();
    let mut d = ChunkedDecoder::new(ChunkLimits::default());
    let mut data = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut fed = 0;
    for p in points {
        pending.extend_from_slice(&input[fed..p]);
        fed = p;
        loop {
            match d.decode(&pending) {
                Err(e) => return (data, Err(e), false),
                Ok(step) => {
                    data.extend_from_slice(step.data);
                    let (consumed, done) = (step.consumed, step.done);
                    pending.drain(..consumed);
                    if done {
                        let left = pending.len() + (input.len() - fed);
                        return (data, Ok(left), true);
                    }
                    if consumed == 0 || pending.is_empty() {
                        break;
                    }
                }
            }
        }
    }
    (data, Ok(pending.len()), false)
}

#[test]
fn chunked_decoder_matches_the_model_over_any_split() {
    fuzzing::run(
        "http-chunked-model",
        400,
        (body(), splits(), "[A-Z]{0,8}"),
        |(body, cuts, next)| {
            let mut input = body.encode();
            input.extend_from_slice(next.as_bytes());
            let (data, left, done) = decode_split(&input, &cuts);
            prop_assert!(done, "not done: {:?}", left);
            prop_assert_eq!(left, Ok(next.len()));
            prop_assert!(data == body.data(), "data differs");
            // The encoder's output decodes to the same data.
            let mut enc = Vec::new();
            for (chunk, _) in &body.chunks {
                if chunk.len() % 2 == 0 {
                    encode_chunk(chunk, &mut enc);
                } else {
                    enc.extend_from_slice(ChunkHead::new(chunk.len() as u64).as_bytes());
                    enc.extend_from_slice(chunk);
                    enc.extend_from_slice(b"\r\n");
                }
            }
            enc.extend_from_slice(LAST_CHUNK);
            let (data, left, done) = decode_split(&enc, &cuts);
            prop_assert!(done && left == Ok(0) && data == body.data());
            Ok(())
        },
    );
}

#[test]
fn chunked_decoding_of_any_bytes_does_not_depend_on_the_split() {
    let seeds: Vec<Vec<u8>> = [
        "5\r\nhello\r\n0\r\n\r\n",
        "3;a=b\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nT: v\r\n\r\n",
        "1 ;x=\"q\\\"\"\r\nz\r\n0\r\n\r\nGET / HTTP/1.1\r\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let input = prop_oneof![
        3 => fuzzing::mutated(seeds, 4),
        1 => fuzzing::bytes(0..64),
    ];
    fuzzing::run(
        "http-chunked-splits",
        1500,
        (input, splits()),
        |(input, cuts)| {
            let whole = decode_split(&input, &[]);
            let split = decode_split(&input, &cuts);
            prop_assert_eq!(&whole, &split);
            // Data never exceeds what was sent.
            prop_assert!(whole.0.len() <= input.len());
            Ok(())
        },
    );
}

// --- Heads --------------------------------------------------------------

const LIMITS: Limits = Limits {
    max_head_bytes: 512,
    max_fields: 8,
    lone_lf: false,
};

fn head_seeds() -> Vec<Vec<u8>> {
    [
        "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "POST /a?b=c HTTP/1.1\r\nHost: example.com:80\r\nContent-Length: 5, 5\r\nConnection: keep-alive, Upgrade\r\n\r\nhello",
        "PUT /x HTTP/1.0\r\nTransfer-Encoding: gzip, chunked\r\nExpect: 100-continue\r\n\r\n",
        "\r\nOPTIONS * HTTP/1.2\r\nHost: [::1]:8080\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
        "HTTP/1.0 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// What a head parse came to, comparable across calls.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Incomplete,
    Complete(usize, usize),
    Failed(Error),
}

fn parse_req(buf: &[u8], limits: &Limits) -> Parsed {
    let mut store = limits.fields();
    match parse_request(buf, limits, &mut store) {
        Ok(None) => Parsed::Incomplete,
        Ok(Some(h)) => Parsed::Complete(h.len, h.fields.len()),
        Err(e) => Parsed::Failed(e),
    }
}

fn parse_resp(buf: &[u8], limits: &Limits) -> Parsed {
    let mut store = limits.fields();
    match parse_response(buf, limits, &mut store) {
        Ok(None) => Parsed::Incomplete,
        Ok(Some(h)) => Parsed::Complete(h.len, h.fields.len()),
        Err(e) => Parsed::Failed(e),
    }
}

fn check_head(
    buf: &[u8],
    limits: &Limits,
    parse: fn(&[u8], &Limits) -> Parsed,
) -> Result<(), TestCaseError> {
    let parse = |b: &[u8]| parse(b, limits);
    let got = parse(buf);
    match got {
        Parsed::Incomplete => prop_assert!(buf.len() < limits.max_head_bytes),
        Parsed::Complete(len, fields) => {
            prop_assert!(len <= buf.len() && len <= limits.max_head_bytes);
            prop_assert!(fields <= limits.max_fields);
            // Nothing after the head changes it.
            let mut more = buf[..len].to_vec();
            more.extend_from_slice(b"\r\n\r\nGET / HTTP/1.1\r\n\0\0");
            prop_assert_eq!(parse(&more), Parsed::Complete(len, fields));
            // Every strict prefix is incomplete: a server re-parsing as
            // bytes arrive never refuses a head it would have accepted.
            for cut in 0..len {
                prop_assert_eq!(parse(&buf[..cut]), Parsed::Incomplete, "prefix {}", cut);
            }
        }
        Parsed::Failed(e) => {
            prop_assert!(
                [400, 413, 414, 431, 501, 502, 505].contains(&e.status()),
                "{:?}",
                e
            );
        }
    }
    Ok(())
}

#[test]
fn heads_never_panic_and_stay_within_limits() {
    let input = prop_oneof![
        3 => fuzzing::mutated(head_seeds(), 4),
        1 => fuzzing::bytes(0..600),
    ];
    let lone_lf = Limits {
        lone_lf: true,
        ..LIMITS
    };
    fuzzing::run("http-heads", 1500, input, |input| {
        for limits in [&LIMITS, &lone_lf] {
            check_head(&input, limits, parse_req)?;
            check_head(&input, limits, parse_resp)?;
        }
        // Refusing lone LFs only ever turns a result into that error.
        let (strict, lax) = (parse_req(&input, &LIMITS), parse_req(&input, &lone_lf));
        prop_assert!(strict == lax || strict == Parsed::Failed(Error::LoneLf));
        Ok(())
    });
}

// --- Framing ------------------------------------------------------------

/// Field values the framing rules care about, valid and not.
fn framing_fields() -> impl Strategy<Value = Vec<(String, String)>> {
    let cl = prop_oneof![
        Just("5"),
        Just("5, 5"),
        Just("0"),
        Just("6"),
        Just("5, 6"),
        Just(""),
        Just("x"),
        Just("-1"),
        Just(" 5 "),
    ];
    let te = prop_oneof![
        Just("chunked"),
        Just("Chunked"),
        Just("gzip, chunked"),
        Just("chunked, gzip"),
        Just("chunked, chunked"),
        Just("gzip"),
        Just("identity"),
        Just("foo, chunked"),
        Just(""),
        Just("chunked;q=1"),
    ];
    let field = prop_oneof![
        cl.prop_map(|v| ("Content-Length".to_owned(), v.to_owned())),
        te.prop_map(|v| ("Transfer-Encoding".to_owned(), v.to_owned())),
        Just(("X-Other".to_owned(), "chunked".to_owned())),
    ];
    prop::collection::vec(field, 0..4)
}

/// The rules once more, member by member.
fn model_request(version: Version, fields: &[(String, String)]) -> Result<Framing, Error> {
    let mut lengths = Vec::new();
    let mut codings = Vec::new();
    let mut te = false;
    for (name, value) in fields {
        let members = value.split(',').map(str::trim).filter(|m| !m.is_empty());
        if name == "Content-Length" {
            let before = lengths.len();
            for m in members {
                match m.parse::<u64>() {
                    Ok(n) if m.bytes().all(|b| b.is_ascii_digit()) => lengths.push(n),
                    _ => return Err(Error::BadContentLength),
                }
            }
            if lengths.len() == before {
                return Err(Error::BadContentLength);
            }
        } else if name == "Transfer-Encoding" {
            te = true;
            codings
                .extend(members.map(|m| m.split(';').next().unwrap_or("").trim().to_lowercase()));
        }
    }
    if lengths.windows(2).any(|w| w[0] != w[1]) {
        return Err(Error::BadContentLength);
    }
    if te && !lengths.is_empty() {
        return Err(Error::LengthAndTransferEncoding);
    }
    if !te {
        return Ok(lengths
            .first()
            .map_or(Framing::None, |n| Framing::Length(*n)));
    }
    if codings.iter().any(|c| {
        ![
            "chunked",
            "gzip",
            "deflate",
            "compress",
            "x-gzip",
            "x-compress",
        ]
        .contains(&c.as_str())
    }) {
        return Err(Error::UnknownTransferCoding);
    }
    if version == Version::Http10 {
        return Err(Error::TransferEncodingInHttp10);
    }
    let chunked = codings.iter().filter(|c| *c == "chunked").count();
    if chunked == 1 && codings.last().is_some_and(|c| c == "chunked") {
        Ok(Framing::Chunked)
    } else {
        Err(Error::ChunkedNotFinal)
    }
}

fn model_response(
    method: &str,
    status: u16,
    version: Version,
    fields: &[(String, String)],
) -> Result<Framing, Error> {
    if status == 101 || (method == "CONNECT" && (200..300).contains(&status)) {
        return Ok(Framing::Tunnel);
    }
    if method == "HEAD" || status < 200 || status == 204 || status == 304 {
        return Ok(Framing::None);
    }
    let te = fields.iter().any(|(n, _)| n == "Transfer-Encoding");
    match model_request(Version::Http11, fields) {
        Err(e @ (Error::BadContentLength | Error::LengthAndTransferEncoding)) => Err(e),
        _ if te && version == Version::Http10 => Err(Error::TransferEncodingInHttp10),
        Ok(Framing::None) => Ok(Framing::UntilClose),
        Err(Error::ChunkedNotFinal | Error::UnknownTransferCoding) => Ok(Framing::UntilClose),
        other => other,
    }
}

#[test]
fn framing_follows_rfc_9112_section_6() {
    let version = prop_oneof![Just(Version::Http10), Just(Version::Http11)];
    let method = prop_oneof![Just("GET"), Just("HEAD"), Just("CONNECT"), Just("POST")];
    let status = prop_oneof![
        Just(100u16),
        Just(101),
        Just(200),
        Just(204),
        Just(206),
        Just(304),
        Just(404),
        Just(500),
    ];
    fuzzing::run(
        "http-framing",
        3000,
        (framing_fields(), version, method, status),
        |(pairs, version, method, status)| {
            let fields: Vec<Field<'_>> = pairs
                .iter()
                .map(|(n, v)| Field {
                    name: n,
                    value: v.as_bytes(),
                })
                .collect();
            let got = request_framing(version, &fields);
            prop_assert_eq!(got, model_request(version, &pairs), "request {:?}", pairs);
            if let Ok(f) = got {
                prop_assert!(f != Framing::UntilClose && f != Framing::Tunnel);
            }
            let got = response_framing(method, status, version, &fields);
            prop_assert_eq!(
                got,
                model_response(method, status, version, &pairs),
                "response {} {} {:?}",
                method,
                status,
                pairs
            );
            Ok(())
        },
    );
}
