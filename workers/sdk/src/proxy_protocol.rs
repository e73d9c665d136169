//! The PROXY protocol (HAProxy's, versions 1 and 2): how a load balancer
//! in front tells the next hop the client's real address.
//!
//! * [`parse`] reads a v1 or v2 header at the start of a buffer,
//!   incrementally: [`Parsed::Incomplete`] means "a prefix of a valid
//!   header, read more", an [`Error`] means it can never become one. It
//!   reads at most [`V1_MAX`] bytes of a v1 header and [`V2_MAX`] of a v2
//!   one, so a peer cannot make it buffer more.
//! * [`encode_v2`] / [`encode_v2_local`] write a v2 header; [`encode_v1`] a
//!   v1 line.
//!
//! What is accepted: v1 `TCP4`, `TCP6` and `UNKNOWN`; v2 commands `LOCAL`
//! and `PROXY` with families `UNSPEC`, `INET` and `INET6` over `STREAM`
//! (TLVs after the addresses are skipped). A v2 header for UDP or Unix
//! sockets is well-formed but carries no TCP address: it parses, with
//! [`Header::addrs`] `None`, as `LOCAL` and `UNKNOWN` do; the receiver then
//! uses the connection's own addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12 bytes every v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 line, CRLF included (the specification's bound).
pub const V1_MAX: usize = 107;
/// The longest v2 header this parser accepts: the 16-byte fixed part and
/// up to 2032 bytes of addresses and TLVs (the specification allows 65535;
/// a header that long is refused, never buffered).
pub const V2_MAX: usize = 2048;

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// 1 or 2.
    pub version: u8,
    /// Source (the client) and destination (the address it connected to);
    /// None for `LOCAL`, `UNKNOWN` and non-TCP families.
    pub addrs: Option<(SocketAddr, SocketAddr)>,
}

/// What [`parse`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header of `len` bytes; the stream's own data follows it.
    Complete { header: Header, len: usize },
    /// A prefix of a valid header: read more (the caller bounds how long).
    Incomplete,
}

/// Why a buffer is not a PROXY header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(
        "no PROXY protocol header (the stream starts with neither `PROXY ` nor the v2 signature)"
    )]
    NotProxy,
    #[error("malformed PROXY v1 line: {0}")]
    BadV1(&'static str),
    #[error("PROXY v1 line longer than {V1_MAX} bytes")]
    V1TooLong,
    #[error("malformed PROXY v2 header: {0}")]
    BadV2(&'static str),
    #[error("PROXY v2 header of {0} bytes, more than the {V2_MAX} accepted")]
    V2TooLong(usize),
}

/// Parses a PROXY header at the start of `buf` (see the [module docs](self)).
pub fn parse(buf: &[u8]) -> Result<Parsed, Error> {
    const V1_START: &[u8] = b"PROXY ";
    if buf.is_empty() {
        return Ok(Parsed::Incomplete);
    }
    let n = buf.len().min(V1_START.len());
    if buf[..n] == V1_START[..n] {
        return if buf.len() < V1_START.len() {
            Ok(Parsed::Incomplete)
        } else {
            parse_v1(buf)
        };
    }
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return parse_v2(buf);
    }
    Err(Error::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, Error> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        if window.contains(&b'\n') {
            return Err(Error::BadV1("LF without CR"));
        }
        return if buf.len() >= V1_MAX {
            Err(Error::V1TooLong)
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    match window.get(cr + 1) {
        None if buf.len() < V1_MAX => return Ok(Parsed::Incomplete),
        None => return Err(Error::V1TooLong),
        Some(b'\n') => {}
        Some(_) => return Err(Error::BadV1("CR not followed by LF")),
    }
    let line = std::str::from_utf8(&window[..cr]).map_err(|_| Error::BadV1("not ASCII"))?;
    let mut it = line.split(' ');
    let _proxy = it.next();
    let proto = it.next().ok_or(Error::BadV1("no protocol"))?;
    let len = cr + 2;
    if proto == "UNKNOWN" {
        // Whatever follows is to be ignored (the specification's words).
        return Ok(Parsed::Complete {
            header: Header {
                version: 1,
                addrs: None,
            },
            len,
        });
    }
    let v6 = match proto {
        "TCP4" => false,
        "TCP6" => true,
        _ => return Err(Error::BadV1("protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    let mut field = || it.next().ok_or(Error::BadV1("missing field"));
    let (src, dst, sport, dport) = (field()?, field()?, field()?, field()?);
    if it.next().is_some() {
        return Err(Error::BadV1("extra fields"));
    }
    let ip = |s: &str| -> Result<IpAddr, Error> {
        let a: IpAddr = if v6 {
            IpAddr::V6(s.parse().map_err(|_| Error::BadV1("bad IPv6 address"))?)
        } else {
            IpAddr::V4(s.parse().map_err(|_| Error::BadV1("bad IPv4 address"))?)
        };
        Ok(a)
    };
    let port = |s: &str| -> Result<u16, Error> {
        // Decimal, no sign, no leading zero (as the specification says).
        if s.is_empty()
            || s.len() > 5
            || !s.bytes().all(|b| b.is_ascii_digit())
            || (s.len() > 1 && s.starts_with('0'))
        {
            return Err(Error::BadV1("bad port"));
        }
        s.parse().map_err(|_| Error::BadV1("bad port"))
    };
    let src = SocketAddr::new(ip(src)?, port(sport)?);
    let dst = SocketAddr::new(ip(dst)?, port(dport)?);
    Ok(Parsed::Complete {
        header: Header {
            version: 1,
            addrs: Some((src, dst)),
        },
        len,
    })
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, Error> {
    if buf.len() < 16 {
        // The signature prefix matched; version and family are checked as
        // soon as they arrive.
        if buf.len() > 12 && buf[12] >> 4 != 2 {
            return Err(Error::BadV2("version is not 2"));
        }
        return Ok(Parsed::Incomplete);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(Error::BadV2("version is not 2"));
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(Error::BadV2("command is neither LOCAL nor PROXY")),
    };
    let fam = buf[13];
    let body = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let len = 16 + body;
    if len > V2_MAX {
        return Err(Error::V2TooLong(len));
    }
    let (family, transport) = (fam >> 4, fam & 0x0f);
    if family > 3 || transport > 2 {
        return Err(Error::BadV2("unknown address family or transport"));
    }
    let need = match family {
        1 => 12,
        2 => 36,
        3 => 216,
        _ => 0,
    };
    if body < need {
        return Err(Error::BadV2("address block shorter than its family needs"));
    }
    if buf.len() < len {
        return Ok(Parsed::Incomplete);
    }
    let a = &buf[16..len];
    let addrs = if local || transport != 1 {
        None
    } else {
        match family {
            1 => {
                let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]));
                let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
                Some((
                    SocketAddr::new(ip(0), port(8)),
                    SocketAddr::new(ip(4), port(10)),
                ))
            }
            2 => {
                let ip = |o: usize| {
                    let mut b = [0u8; 16];
                    b.copy_from_slice(&a[o..o + 16]);
                    IpAddr::V6(Ipv6Addr::from(b))
                };
                let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
                Some((
                    SocketAddr::new(ip(0), port(32)),
                    SocketAddr::new(ip(16), port(34)),
                ))
            }
            _ => None,
        }
    };
    if !local && family == 0 && transport != 0 {
        return Err(Error::BadV2("UNSPEC family with a transport"));
    }
    Ok(Parsed::Complete {
        header: Header { version: 2, addrs },
        len,
    })
}

/// A v2 `PROXY` header for a TCP connection from `src` to `dst`. Mixed
/// families are written as IPv6 (IPv4 addresses mapped).
pub fn encode_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21); // version 2, PROXY
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11); // INET, STREAM
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(a) => a.to_ipv6_mapped(),
                IpAddr::V6(a) => a,
            };
            out.push(0x21); // INET6, STREAM
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

/// A v2 `LOCAL` header (a health check of the proxy's own: no addresses).
pub fn encode_v2_local() -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    out
}

/// A v1 line for a TCP connection from `src` to `dst` (both of one family;
/// otherwise `UNKNOWN`).
pub fn encode_v1(src: SocketAddr, dst: SocketAddr) -> String {
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => format!(
            "PROXY TCP4 {} {} {} {}\r\n",
            s.ip(),
            d.ip(),
            s.port(),
            d.port()
        ),
        (SocketAddr::V6(s), SocketAddr::V6(d)) => format!(
            "PROXY TCP6 {} {} {} {}\r\n",
            s.ip(),
            d.ip(),
            s.port(),
            d.port()
        ),
        _ => "PROXY UNKNOWN\r\n".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_examples() {
        let line = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET /";
        assert_eq!(
            parse(line),
            Ok(Parsed::Complete {
                header: Header {
                    version: 1,
                    addrs: Some((sa("192.0.2.1:56324"), sa("198.51.100.2:443")))
                },
                len: line.len() - 5
            })
        );
        let six = b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n";
        assert!(matches!(parse(six), Ok(Parsed::Complete { len: 36, .. })));
        assert!(matches!(
            parse(b"PROXY UNKNOWN whatever\r\n"),
            Ok(Parsed::Complete {
                header: Header { addrs: None, .. },
                ..
            })
        ));
        assert_eq!(parse(b"PRO"), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4"), Ok(Parsed::Incomplete));
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r"),
            Ok(Parsed::Incomplete)
        );
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
            b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(parse(&[b'P'; 0]), Ok(Parsed::Incomplete));
        let long = [b"PROXY ".as_slice(), &[b'x'; 200]].concat();
        assert_eq!(parse(&long), Err(Error::V1TooLong));
    }

    #[test]
    fn v2_examples() {
        let h = encode_v2(sa("10.0.0.1:1234"), sa("10.0.0.2:80"));
        assert_eq!(h.len(), 28);
        assert_eq!(
            parse(&h),
            Ok(Parsed::Complete {
                header: Header {
                    version: 2,
                    addrs: Some((sa("10.0.0.1:1234"), sa("10.0.0.2:80")))
                },
                len: 28
            })
        );
        let h = encode_v2_local();
        assert_eq!(
            parse(&h),
            Ok(Parsed::Complete {
                header: Header {
                    version: 2,
                    addrs: None
                },
                len: 16
            })
        );
        let mut bad = encode_v2(sa("10.0.0.1:1"), sa("10.0.0.2:2"));
        bad[12] = 0x31;
        assert!(parse(&bad).is_err());
        bad[12] = 0x22;
        assert!(parse(&bad).is_err());
        let mut short = encode_v2(sa("10.0.0.1:1"), sa("10.0.0.2:2"));
        short[15] = 4; // INET with 4 bytes of addresses
        assert!(parse(&short).is_err());
        let mut huge = encode_v2(sa("10.0.0.1:1"), sa("10.0.0.2:2"));
        huge[14] = 0xff;
        assert!(matches!(parse(&huge), Err(Error::V2TooLong(_))));
        // TLVs after the addresses are skipped.
        let mut tlv = encode_v2(sa("[::1]:1"), sa("[::2]:2"));
        tlv[15] += 4;
        tlv.extend_from_slice(&[0x04, 0x00, 0x01, 0xaa]);
        tlv.extend_from_slice(b"data");
        assert!(matches!(parse(&tlv), Ok(Parsed::Complete { len: 56, .. })));
    }

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), p)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), p)),
        ]
    }

    /// `b` turned into `a`'s family.
    fn same_family(a: SocketAddr, b: SocketAddr) -> SocketAddr {
        match (a, b) {
            (SocketAddr::V4(_), SocketAddr::V6(v)) => {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), v.port())
            }
            (SocketAddr::V6(_), SocketAddr::V4(v)) => {
                SocketAddr::new(IpAddr::V6(v.ip().to_ipv6_mapped()), v.port())
            }
            _ => b,
        }
    }

    proptest! {
        #[test]
        fn v2_round_trips(src in addr(), dst in addr(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut h = encode_v2(src, dst);
            let len = h.len();
            h.extend_from_slice(&tail);
            let Ok(Parsed::Complete { header, len: got }) = parse(&h) else {
                panic!("no parse");
            };
            prop_assert_eq!(got, len);
            let (s, d) = header.addrs.unwrap();
            prop_assert_eq!(s.port(), src.port());
            prop_assert_eq!(d.port(), dst.port());
            if src.is_ipv4() && dst.is_ipv4() {
                prop_assert_eq!((s, d), (src, dst));
            }
        }

        #[test]
        fn v1_round_trips(src in addr(), dst in addr()) {
            let dst = same_family(src, dst);
            let line = encode_v1(src, dst);
            let parsed = parse(line.as_bytes());
            prop_assert_eq!(parsed, Ok(Parsed::Complete {
                header: Header { version: 1, addrs: Some((src, dst)) },
                len: line.len(),
            }));
        }

        /// Every prefix of a valid header is Incomplete: a slow client is
        /// never refused for sending its header in pieces.
        #[test]
        fn prefixes_are_incomplete(src in addr(), dst in addr(), v2 in any::<bool>(), cut in 0usize..200) {
            let h = if v2 { encode_v2(src, dst) } else { encode_v1(src, same_family(src, dst)).into_bytes() };
            let cut = cut % h.len();
            prop_assert_eq!(parse(&h[..cut]), Ok(Parsed::Incomplete));
        }

        /// Arbitrary bytes never panic, and whatever parses says a length
        /// within the buffer and the bounds.
        #[test]
        fn garbage_is_bounded(buf in proptest::collection::vec(any::<u8>(), 0..300), v2 in any::<bool>()) {
            let mut b = if v2 { V2_SIGNATURE.to_vec() } else { b"PROXY ".to_vec() };
            b.extend_from_slice(&buf);
            match parse(&b) {
                Ok(Parsed::Complete { len, .. }) => {
                    prop_assert!(len <= b.len());
                    prop_assert!(len <= V2_MAX);
                }
                Ok(Parsed::Incomplete) => prop_assert!(b.len() < V2_MAX),
                Err(_) => {}
            }
            let _ = parse(&buf);
        }
    }
}
