//! One decoder for every body framing ([`Framing`]): what a server skips
//! or reads, and what a proxy streams, whatever the framing.

use crate::chunked::{ChunkLimits, ChunkedDecoder, Step};
use crate::{Error, Framing};

/// Decodes a body framed as [`Framing`] says, incrementally, with the
/// same [`Step`]s as [`ChunkedDecoder`]: any split of the input, no
/// buffer.
#[derive(Debug, Clone)]
pub enum BodyDecoder {
    /// `Content-Length`: this many bytes are left.
    Length {
        left: u64,
        total: u64,
    },
    Chunked(ChunkedDecoder),
    /// Everything until the peer closes: never done by itself.
    UntilClose {
        total: u64,
    },
    /// No body (left), or it has ended.
    Done {
        total: u64,
    },
}

impl BodyDecoder {
    pub fn new(framing: Framing, limits: ChunkLimits) -> BodyDecoder {
        match framing {
            Framing::Length(n) if n > 0 => BodyDecoder::Length { left: n, total: 0 },
            Framing::Chunked => BodyDecoder::Chunked(ChunkedDecoder::new(limits)),
            Framing::UntilClose => BodyDecoder::UntilClose { total: 0 },
            Framing::None | Framing::Tunnel | Framing::Length(_) => BodyDecoder::Done { total: 0 },
        }
    }

    /// Whether the body has ended (the bytes after it are the next
    /// message's).
    pub fn is_done(&self) -> bool {
        match self {
            BodyDecoder::Done { .. } => true,
            BodyDecoder::Chunked(c) => c.is_done(),
            _ => false,
        }
    }

    /// Data bytes decoded so far.
    pub fn total(&self) -> u64 {
        match self {
            BodyDecoder::Length { total, .. }
            | BodyDecoder::UntilClose { total }
            | BodyDecoder::Done { total } => *total,
            BodyDecoder::Chunked(c) => c.total(),
        }
    }

    /// Decodes from `input`; see [`ChunkedDecoder::decode`].
    pub fn decode<'a>(&mut self, input: &'a [u8]) -> Result<Step<'a>, Error> {
        match self {
            BodyDecoder::Chunked(c) => c.decode(input),
            BodyDecoder::Length { left, total } => {
                let n = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(input.len());
                *left -= n as u64;
                *total += n as u64;
                let done = *left == 0;
                if done {
                    *self = BodyDecoder::Done { total: *total };
                }
                Ok(Step {
                    consumed: n,
                    data: &input[..n],
                    done,
                })
            }
            BodyDecoder::UntilClose { total } => {
                *total = total.saturating_add(input.len() as u64);
                Ok(Step {
                    consumed: input.len(),
                    data: input,
                    done: false,
                })
            }
            BodyDecoder::Done { .. } => Ok(Step {
                consumed: 0,
                data: &[],
                done: true,
            }),
        }
    }

    /// Decodes and drops what `input` holds of the body, failing once
    /// more than `max` data bytes were seen: (bytes consumed, whether the
    /// body has ended).
    pub fn skip(&mut self, input: &[u8], max: u64) -> Result<(usize, bool), Error> {
        let mut at = 0;
        loop {
            let step = self.decode(&input[at..])?;
            at += step.consumed;
            if self.total() > max {
                return Err(Error::BodyTooLarge);
            }
            if step.done || step.consumed == 0 || at == input.len() {
                return Ok((at, step.done));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_framing() {
        let l = ChunkLimits::default();
        let mut b = BodyDecoder::new(Framing::Length(3), l);
        assert_eq!(b.skip(b"ab", 10), Ok((2, false)));
        assert_eq!(b.skip(b"cdef", 10), Ok((1, true)));
        assert!(b.is_done());
        assert_eq!(b.total(), 3);
        let mut b = BodyDecoder::new(Framing::Chunked, l);
        assert_eq!(b.skip(b"3\r\nabc\r\n0\r\n\r\nX", 10), Ok((13, true)));
        let mut b = BodyDecoder::new(Framing::Chunked, l);
        assert_eq!(
            b.skip(b"b\r\n0123456789a\r\n", 10),
            Err(Error::BodyTooLarge)
        );
        let mut b = BodyDecoder::new(Framing::Length(11), l);
        assert_eq!(b.skip(&[0; 11], 10), Err(Error::BodyTooLarge));
        let mut b = BodyDecoder::new(Framing::None, l);
        assert!(b.is_done());
        assert_eq!(b.skip(b"next", 10), Ok((0, true)));
        let mut b = BodyDecoder::new(Framing::UntilClose, l);
        assert_eq!(b.decode(b"all").unwrap().data, b"all");
        assert!(!b.is_done());
    }
}
