//! The chunked transfer coding (RFC 9112 §7.1): an incremental decoder and
//! the encoder.
//!
//! [`ChunkedDecoder`] keeps a few integers of state and no buffer: it takes
//! whatever bytes arrived, however they are split, and hands back the
//! chunk data found in them as sub-slices of its input. Chunk extensions
//! and trailer fields are checked for forbidden bytes, bounded by
//! [`ChunkLimits`] and skipped (RFC 9112 §7.1.1, §7.1.2 allow a recipient to
//! ignore them). Strictness where implementations are known to disagree
//! (the ways to smuggle a request through a chunked body): every chunk line
//! and the line after chunk data end in CRLF exactly (no lone LF, no lone
//! CR, nothing after the data); a chunk size is hex digits only, at most 16
//! of them (no sign, no `0x`, no overflow); only SP and HTAB may stand
//! between the size and a `;`.

use crate::fields::hex_digit as hex;
use crate::Error;

/// Bounds on what a chunked body may carry besides its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLimits {
    /// Longest chunk-size line, extensions included, in bytes.
    pub max_line: usize,
    /// Largest trailer section, in bytes.
    pub max_trailers: usize,
}

impl Default for ChunkLimits {
    fn default() -> ChunkLimits {
        ChunkLimits {
            max_line: 4096,
            max_trailers: 16 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In the hex digits of a chunk size (`digits` so far).
    Size {
        digits: u8,
    },
    /// After the size, in whitespace before `;` or the line end.
    SizeWs,
    /// In chunk extensions (skipped).
    Ext {
        quoted: bool,
        escaped: bool,
    },
    /// After the size line's CR.
    SizeLf,
    /// In chunk data.
    Data,
    /// After chunk data: CR, then LF.
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    /// In a trailer line (skipped).
    Trailer,
    /// After a trailer line's CR.
    TrailerLf,
    /// After the final empty line's CR.
    EndLf,
    Done,
}

/// What one [`ChunkedDecoder::decode`] call found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step<'a> {
    /// Bytes of the input used; the caller drops them.
    pub consumed: usize,
    /// Chunk data: the last `data.len()` bytes of the consumed part.
    pub data: &'a [u8],
    /// The body ended: the bytes after `consumed` belong to what follows.
    pub done: bool,
}

/// An incremental chunked-body decoder; see the module docs.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    /// Data bytes left in the current chunk (or its size being read).
    size: u64,
    /// Bytes of the current chunk-size line.
    line: usize,
    /// Bytes of the trailer section so far.
    trailers: usize,
    limits: ChunkLimits,
    /// Data bytes decoded so far.
    total: u64,
}

/// Bytes that may appear in an extension or a trailer line: HTAB, visible
/// ASCII, SP, obs-text (RFC 9110 §5.5); never CR, LF, NUL or another
/// control.
fn line_byte(b: u8) -> bool {
    b == b'\t' || (0x20..=0x7e).contains(&b) || b >= 0x80
}

impl Default for ChunkedDecoder {
    fn default() -> ChunkedDecoder {
        ChunkedDecoder::new(ChunkLimits::default())
    }
}

impl ChunkedDecoder {
    pub fn new(limits: ChunkLimits) -> ChunkedDecoder {
        ChunkedDecoder {
            state: State::Size { digits: 0 },
            size: 0,
            line: 0,
            trailers: 0,
            limits,
            total: 0,
        }
    }

    /// Whether the body (trailers and final CRLF included) has ended.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Data bytes decoded so far (for a body-size limit).
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Decodes from `input` until it has chunk data to hand back, the body
    /// ends, or the input is used up. Call it again with the rest
    /// (`&input[step.consumed..]`) while `consumed < input.len()` and not
    /// `done`. An error is final: the body's end cannot be found.
    pub fn decode<'a>(&mut self, input: &'a [u8]) -> Result<Step<'a>, Error> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Data => {
                    let n = (input.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    self.size -= n as u64;
                    self.total = self.total.saturating_add(n as u64);
                    if self.size == 0 {
                        self.state = State::DataCr;
                    }
                    return Ok(Step {
                        consumed: i + n,
                        data: &input[i..i + n],
                        done: false,
                    });
                }
                State::Done => break,
                State::Size { digits } => match hex(b) {
                    Some(d) if digits < 16 => {
                        self.size = self.size << 4 | u64::from(d);
                        self.state = State::Size { digits: digits + 1 };
                    }
                    _ if digits == 0 || hex(b).is_some() => return Err(Error::BadChunk),
                    _ => self.after_size(b)?,
                },
                State::SizeWs => self.after_size(b)?,
                State::Ext { quoted, escaped } => {
                    self.state = match b {
                        b'\r' if !quoted => State::SizeLf,
                        _ if !line_byte(b) => return Err(Error::BadChunk),
                        _ if escaped => State::Ext {
                            quoted,
                            escaped: false,
                        },
                        b'\\' if quoted => State::Ext {
                            quoted,
                            escaped: true,
                        },
                        b'"' => State::Ext {
                            quoted: !quoted,
                            escaped: false,
                        },
                        _ => self.state,
                    };
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(Error::BadChunk);
                    }
                    self.line = 0;
                    self.state = if self.size == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                }
                State::DataCr => self.expect(b, b'\r', State::DataLf)?,
                State::DataLf => self.expect(b, b'\n', State::Size { digits: 0 })?,
                State::TrailerStart | State::Trailer => {
                    self.state = match (self.state, b) {
                        (State::TrailerStart, b'\r') => State::EndLf,
                        (_, b'\r') => State::TrailerLf,
                        (_, b) if line_byte(b) => State::Trailer,
                        _ => return Err(Error::BadChunk),
                    };
                }
                State::TrailerLf => self.expect(b, b'\n', State::TrailerStart)?,
                State::EndLf => self.expect(b, b'\n', State::Done)?,
            }
            self.count()?;
            i += 1;
            if self.state == State::Done {
                break;
            }
        }
        Ok(Step {
            consumed: i,
            data: &[],
            done: self.state == State::Done,
        })
    }

    /// A byte after the size's digits: whitespace, `;` or CR.
    fn after_size(&mut self, b: u8) -> Result<(), Error> {
        self.state = match b {
            b' ' | b'\t' => State::SizeWs,
            b';' => State::Ext {
                quoted: false,
                escaped: false,
            },
            b'\r' => State::SizeLf,
            _ => return Err(Error::BadChunk),
        };
        Ok(())
    }

    fn expect(&mut self, b: u8, want: u8, next: State) -> Result<(), Error> {
        if b != want {
            return Err(Error::BadChunk);
        }
        self.state = next;
        Ok(())
    }

    /// Counts a framing byte against the line and trailer limits.
    fn count(&mut self) -> Result<(), Error> {
        match self.state {
            State::Size { .. } | State::SizeWs | State::Ext { .. } | State::SizeLf => {
                self.line += 1;
                if self.line > self.limits.max_line {
                    return Err(Error::ChunkLineTooLong);
                }
            }
            State::Trailer | State::TrailerLf | State::TrailerStart | State::EndLf => {
                self.trailers += 1;
                if self.trailers > self.limits.max_trailers {
                    return Err(Error::TrailersTooLarge);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// The head of a chunk of `len` bytes: its size in hex and CRLF, kept
/// inline (for a vectored write of head, data and [`CRLF`]).
#[derive(Debug, Clone, Copy)]
pub struct ChunkHead {
    buf: [u8; 18],
    len: u8,
}

impl ChunkHead {
    pub fn new(len: u64) -> ChunkHead {
        let mut buf = [0u8; 18];
        let digits = (64 - len.leading_zeros()).div_ceil(4).max(1) as usize;
        for (i, slot) in buf[..digits].iter_mut().enumerate() {
            let shift = 4 * (digits - 1 - i);
            *slot = b"0123456789abcdef"[(len >> shift & 0xf) as usize];
        }
        buf[digits] = b'\r';
        buf[digits + 1] = b'\n';
        ChunkHead {
            buf,
            len: digits as u8 + 2,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

/// What follows a chunk's data.
pub const CRLF: &[u8] = b"\r\n";

/// The last chunk and the empty trailer section: the end of a chunked body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Appends `data` as one chunk. Empty data appends nothing (an empty chunk
/// would end the body; that is [`LAST_CHUNK`]).
pub fn encode_chunk(data: &[u8], out: &mut Vec<u8>) {
    if data.is_empty() {
        return;
    }
    out.extend_from_slice(ChunkHead::new(data.len() as u64).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(CRLF);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` in one go: (data, consumed, done).
    fn run(input: &[u8]) -> Result<(Vec<u8>, usize, bool), Error> {
        let mut d = ChunkedDecoder::default();
        let mut data = Vec::new();
        let mut at = 0;
        loop {
            let s = d.decode(&input[at..])?;
            data.extend_from_slice(s.data);
            at += s.consumed;
            if s.done || s.consumed == 0 {
                return Ok((data, at, s.done));
            }
        }
    }

    #[test]
    fn decodes() {
        let body = b"5\r\nhello\r\n7;ext=\"a;b\"\r\n, world\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let (data, at, done) = run(body).unwrap();
        assert_eq!(data, b"hello, world");
        assert!(done);
        assert_eq!(&body[at..], b"NEXT");
        let (data, _, done) = run(b"A \t;x\r\n0123456789\r\n00\r\n\r\n").unwrap();
        assert_eq!((data.len(), done), (10, true));
        let (data, at, done) = run(b"3\r\nab").unwrap();
        assert_eq!((data, at, done), (b"ab".to_vec(), 5, false));
    }

    #[test]
    fn refuses() {
        for bad in [
            &b"\r\n"[..],
            b"x\r\n",
            b"-1\r\n",
            b"0x5\r\n",
            b"+5\r\n",
            b"5\nhello\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhelloX\r\n",
            b"5 5\r\n",
            b"5;a\nb\r\n",
            b"5;a\0\r\n",
            b"5\r\r\n",
            b"0\r\nX: a\nb\r\n\r\n",
            b"0\r\n\n",
            b"10000000000000000\r\n",
        ] {
            assert!(run(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(run(b"ffffffffffffffff\r\n").is_ok());
    }

    #[test]
    fn limits() {
        let limits = ChunkLimits {
            max_line: 8,
            max_trailers: 8,
        };
        let mut d = ChunkedDecoder::new(limits);
        assert_eq!(d.decode(b"1;abcdefgh\r\n"), Err(Error::ChunkLineTooLong));
        let mut d = ChunkedDecoder::new(limits);
        assert!(d.decode(b"1;abcd\r\n").is_ok());
        let mut d = ChunkedDecoder::new(limits);
        assert_eq!(
            d.decode(b"0\r\nX: 123456\r\n\r\n"),
            Err(Error::TrailersTooLarge)
        );
        let mut d = ChunkedDecoder::new(limits);
        assert!(d.decode(b"0\r\nX: 1\r\n\r\n").unwrap().done);
    }

    #[test]
    fn encodes() {
        assert_eq!(ChunkHead::new(0).as_bytes(), b"0\r\n");
        assert_eq!(ChunkHead::new(255).as_bytes(), b"ff\r\n");
        assert_eq!(ChunkHead::new(256).as_bytes(), b"100\r\n");
        assert_eq!(ChunkHead::new(u64::MAX).as_bytes(), b"ffffffffffffffff\r\n");
        let mut out = Vec::new();
        encode_chunk(b"hello", &mut out);
        encode_chunk(b"", &mut out);
        out.extend_from_slice(LAST_CHUNK);
        assert_eq!(out, b"5\r\nhello\r\n0\r\n\r\n");
        assert_eq!(run(&out).unwrap().0, b"hello");
    }
}
