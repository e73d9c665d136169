//! Field values: token lists, `Host`, `Content-Length`, hop-by-hop fields.

use crate::{Error, Field};

/// Whether `b` is a `tchar` (RFC 9110 §5.6.2).
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether `s` is a non-empty `token` (RFC 9110 §5.6.2).
pub fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

/// The value of a hex digit.
pub fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `v` without leading and trailing optional whitespace (SP, HTAB).
pub fn trim_ows(v: &[u8]) -> &[u8] {
    let ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = v.iter().position(|b| !ows(b)).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !ows(b)).map_or(start, |e| e + 1);
    &v[start..end]
}

/// The members of a comma-separated list (RFC 9110 §5.6.1), whitespace
/// trimmed and empty members skipped. A comma inside a quoted string does
/// not split (`a;q="x,y", b` has two members).
pub fn list(value: &[u8]) -> List<'_> {
    List { rest: value }
}

/// Iterator returned by [`list`].
#[derive(Debug, Clone)]
pub struct List<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for List<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        while !self.rest.is_empty() {
            let mut quoted = false;
            let mut escaped = false;
            let mut end = self.rest.len();
            for (i, &b) in self.rest.iter().enumerate() {
                if escaped {
                    escaped = false;
                } else if quoted && b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    quoted = !quoted;
                } else if b == b',' && !quoted {
                    end = i;
                    break;
                }
            }
            let member = trim_ows(&self.rest[..end]);
            self.rest = self.rest.get(end + 1..).unwrap_or_default();
            if !member.is_empty() {
                return Some(member);
            }
        }
        None
    }
}

/// The name part of a list member with parameters (`gzip;q=1` → `gzip`).
pub fn member_name(member: &[u8]) -> &[u8] {
    let end = member
        .iter()
        .position(|&b| b == b';')
        .unwrap_or(member.len());
    trim_ows(&member[..end])
}

/// Whether the list `value` has a member named `token` (case-insensitive).
pub fn has_token(value: &[u8], token: &str) -> bool {
    list(value).any(|m| member_name(m).eq_ignore_ascii_case(token.as_bytes()))
}

/// The values of every field named `name` (case-insensitive), in order.
pub fn values<'f, 'b>(
    fields: &'f [Field<'b>],
    name: &'f str,
) -> impl Iterator<Item = &'b [u8]> + 'f {
    fields
        .iter()
        .filter(move |f| f.name.eq_ignore_ascii_case(name))
        .map(|f| f.value)
}

/// The first value of the field `name`.
pub fn first<'b>(fields: &[Field<'b>], name: &str) -> Option<&'b [u8]> {
    values(fields, name).next()
}

/// Whether any `name` field's list has the member `token`.
pub fn any_token(fields: &[Field<'_>], name: &str, token: &str) -> bool {
    values(fields, name).any(|v| has_token(v, token))
}

/// A non-negative decimal number as `Content-Length` writes it
/// (`1*DIGIT`), without overflow.
pub fn parse_decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// The body length the `Content-Length` fields give: `None` without any,
/// the number when every field and every list member says the same one
/// (RFC 9110 §8.6: `5` twice and `5, 5` are 5), else
/// [`Error::BadContentLength`] (also for an empty or non-numeric value).
pub fn content_length(fields: &[Field<'_>]) -> Result<Option<u64>, Error> {
    let mut length = None;
    for v in values(fields, "content-length") {
        let mut members = 0;
        for m in list(v) {
            let n = parse_decimal(m).ok_or(Error::BadContentLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::BadContentLength);
            }
            length = Some(n);
            members += 1;
        }
        if members == 0 {
            return Err(Error::BadContentLength);
        }
    }
    Ok(length)
}

/// Whether `v` is a valid `Host` value: `uri-host [ ":" port ]` (RFC 9110
/// §7.2, RFC 3986 §3.2.2), or empty (a target without authority).
pub fn valid_host(v: &[u8]) -> bool {
    if v.is_empty() {
        return true;
    }
    let (host, port) = if v[0] == b'[' {
        let Some(close) = v.iter().position(|&b| b == b']') else {
            return false;
        };
        if !valid_ip_literal(&v[1..close]) {
            return false;
        }
        match &v[close + 1..] {
            [] => return true,
            [b':', port @ ..] => (&v[..=close], port),
            _ => return false,
        }
    } else {
        match v.iter().rposition(|&b| b == b':') {
            Some(i) => (&v[..i], &v[i + 1..]),
            None => (v, &[][..]),
        }
    };
    port.len() <= 5
        && port.iter().all(u8::is_ascii_digit)
        && (host.first() == Some(&b'[') || reg_name(host))
}

/// `reg-name` or an IPv4 address (which is a valid `reg-name` too),
/// non-empty.
fn reg_name(h: &[u8]) -> bool {
    let mut i = 0;
    while i < h.len() {
        match h[i] {
            b'%' => {
                let hex = |j: usize| h.get(j).is_some_and(u8::is_ascii_hexdigit);
                if !(hex(i + 1) && hex(i + 2)) {
                    return false;
                }
                i += 3;
                continue;
            }
            b if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b) => {}
            _ => return false,
        }
        i += 1;
    }
    !h.is_empty()
}

/// The inside of `[...]`: an IPv6 address (hex digits, colons, dots for an
/// embedded IPv4) or an `IPvFuture`.
fn valid_ip_literal(l: &[u8]) -> bool {
    match l {
        [] => false,
        [b'v' | b'V', rest @ ..] => {
            let Some(dot) = rest.iter().position(|&b| b == b'.') else {
                return false;
            };
            dot > 0
                && rest[..dot].iter().all(u8::is_ascii_hexdigit)
                && rest.len() > dot + 1
                && rest[dot + 1..]
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:".contains(&b))
        }
        _ => {
            l.contains(&b':')
                && l.iter()
                    .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        }
    }
}

/// The fields that describe one connection rather than the message (RFC
/// 9110 §7.6.1), which a proxy must not forward; besides these, every
/// field the `Connection` field names.
pub const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// Whether the field `name` of a message with `fields` is hop-by-hop: one
/// of [`HOP_BY_HOP`] or named by a `Connection` field.
pub fn is_hop_by_hop(name: &str, fields: &[Field<'_>]) -> bool {
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name)) || any_token(fields, "connection", name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f<'a>(name: &'a str, value: &'a str) -> Field<'a> {
        Field {
            name,
            value: value.as_bytes(),
        }
    }

    #[test]
    fn lists() {
        let m: Vec<&[u8]> = list(b" a , ,b;q=\"x,y\" ,, c\t").collect();
        assert_eq!(m, [&b"a"[..], b"b;q=\"x,y\"", b"c"]);
        assert_eq!(member_name(b"gzip ; q=1"), b"gzip");
        assert!(has_token(b"Keep-Alive, Upgrade", "upgrade"));
        assert!(!has_token(b"keep-alive-ish", "keep-alive"));
        assert_eq!(list(b"").count(), 0);
        assert_eq!(list(b" , ").count(), 0);
        assert_eq!(list(b"\"a\\\",b\"").count(), 1);
    }

    #[test]
    fn content_lengths() {
        assert_eq!(content_length(&[]), Ok(None));
        assert_eq!(content_length(&[f("Content-Length", "5")]), Ok(Some(5)));
        let twice = [f("content-length", "5"), f("Content-Length", "5")];
        assert_eq!(content_length(&twice), Ok(Some(5)));
        assert_eq!(content_length(&[f("Content-Length", "5, 5")]), Ok(Some(5)));
        for bad in [
            "5, 6",
            "",
            " , ",
            "-1",
            "+5",
            "0x5",
            "5 5",
            "18446744073709551616",
        ] {
            assert_eq!(
                content_length(&[f("Content-Length", bad)]),
                Err(Error::BadContentLength),
                "{bad:?}"
            );
        }
        let differ = [f("content-length", "5"), f("Content-Length", "6")];
        assert_eq!(content_length(&differ), Err(Error::BadContentLength));
        assert_eq!(
            content_length(&[f("Content-Length", "18446744073709551615")]),
            Ok(Some(u64::MAX))
        );
    }

    #[test]
    fn hosts() {
        for good in [
            "",
            "example.com",
            "example.com:8080",
            "example.com:",
            "127.0.0.1",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:443",
            "[2001:db8::192.0.2.1]",
            "[v1.fe80::a+en1]",
            "xn--bcher-kva.example",
            "a%20b",
            "under_score",
        ] {
            assert!(valid_host(good.as_bytes()), "{good:?}");
        }
        for bad in [
            "a b",
            "a/b",
            "user@host",
            "host:port",
            ":80",
            "[::1",
            "[]",
            "[::1]x",
            "[::g]",
            "a:80:80",
            "host:123456",
            "a%2",
            "a%zz",
            "ex\"ample",
            "a\tb",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?}");
        }
    }

    #[test]
    fn hop_by_hop() {
        let fields = [f("Connection", "close, X-Secret"), f("Host", "a")];
        for h in [
            "Connection",
            "KEEP-ALIVE",
            "TE",
            "Transfer-Encoding",
            "Upgrade",
        ] {
            assert!(is_hop_by_hop(h, &fields), "{h}");
        }
        assert!(is_hop_by_hop("Proxy-Connection", &fields));
        assert!(is_hop_by_hop("x-secret", &fields));
        assert!(!is_hop_by_hop("Host", &fields));
        assert!(!is_hop_by_hop("Content-Length", &fields));
    }

    #[test]
    fn tokens() {
        assert!(is_token(b"GET"));
        assert!(is_token(b"x-custom.1~"));
        assert!(!is_token(b""));
        assert!(!is_token(b"a b"));
        assert!(!is_token(b"a:b"));
        assert_eq!(trim_ows(b" \t x y \t"), b"x y");
        assert_eq!(parse_decimal(b"007"), Some(7));
        assert_eq!(parse_decimal(b""), None);
    }
}
