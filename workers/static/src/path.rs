//! Request targets to file paths: percent-decoding and normalisation.
//!
//! The whole path is decoded first and split into segments afterwards, so
//! that an encoded separator or dot (`%2f`, `%2e%2e`) is judged exactly like
//! its plain form. Empty and `.` segments are dropped; a `..` segment or a
//! NUL byte refuses the request outright (nothing is "resolved upwards").
//! The result is a relative path with no leading slash, to be opened
//! beneath the root directory's fd ([`crate::fs`]), which is the second,
//! independent line of defence.

/// Why a request target was refused (all answer 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("request target is neither origin-form nor absolute-form")]
    NotOrigin,
    #[error("malformed percent-encoding")]
    BadEncoding,
    #[error("NUL byte in path")]
    Nul,
    #[error("`..` segment in path")]
    DotDot,
}

/// A decoded request target.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    /// Whether the decoded path ended with `/` (a directory was asked for).
    pub trailing_slash: bool,
    /// Byte offset of the query string (after `?`) in the raw target, if any.
    pub query: Option<usize>,
}

use baton_http::fields::hex_digit as hex;

/// Strips the scheme and authority of an absolute-form target
/// (`http://host/path`), which HTTP/1.1 servers must accept.
fn origin_part(raw: &[u8]) -> Result<&[u8], PathError> {
    if raw.first() == Some(&b'/') {
        return Ok(raw);
    }
    let rest = if raw.len() > 7 && raw[..7].eq_ignore_ascii_case(b"http://") {
        &raw[7..]
    } else if raw.len() > 8 && raw[..8].eq_ignore_ascii_case(b"https://") {
        &raw[8..]
    } else {
        return Err(PathError::NotOrigin);
    };
    match rest.iter().position(|&b| b == b'/') {
        Some(i) => Ok(&rest[i..]),
        // `http://host` alone names the root.
        None if !rest.contains(&b'?') => Ok(b"/"),
        None => Err(PathError::NotOrigin),
    }
}

/// Decodes `raw` (the request target as sent) into `out`: the normalised
/// path relative to the root, segments joined with `/`, no leading slash
/// (empty for the root itself).
pub fn decode(raw: &[u8], out: &mut Vec<u8>) -> Result<Target, PathError> {
    out.clear();
    let path = origin_part(raw)?;
    let (path, query) = match path.iter().position(|&b| b == b'?' || b == b'#') {
        Some(i) if path[i] == b'?' => (&path[..i], Some(raw.len() - (path.len() - i) + 1)),
        Some(i) => (&path[..i], None),
        None => (path, None),
    };
    // Decode into `out` first.
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        if b == b'%' {
            let (Some(&h), Some(&l)) = (path.get(i + 1), path.get(i + 2)) else {
                return Err(PathError::BadEncoding);
            };
            let (Some(h), Some(l)) = (hex(h), hex(l)) else {
                return Err(PathError::BadEncoding);
            };
            out.push(h << 4 | l);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    if out.contains(&0) {
        return Err(PathError::Nul);
    }
    let trailing_slash = out.last() == Some(&b'/');
    // Normalise in place: drop empty and `.` segments, refuse `..`.
    let decoded = std::mem::take(out);
    for seg in decoded.split(|&b| b == b'/') {
        match seg {
            b"" | b"." => {}
            b".." => return Err(PathError::DotDot),
            s => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(s);
            }
        }
    }
    Ok(Target {
        trailing_slash,
        query,
    })
}

/// Appends `path` to `out` percent-encoded for a `Location` header:
/// unreserved characters, sub-delims, `:`, `@` and `/` stay as they are.
pub fn encode_into(path: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in path {
        let keep = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'@'
                    | b'/'
            );
        if keep {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(s: &str) -> Result<(String, bool), PathError> {
        let mut out = Vec::new();
        let t = decode(s.as_bytes(), &mut out)?;
        Ok((String::from_utf8(out).unwrap(), t.trailing_slash))
    }

    #[test]
    fn normalises() {
        assert_eq!(dec("/"), Ok((String::new(), true)));
        assert_eq!(dec("/a/b.txt"), Ok(("a/b.txt".into(), false)));
        assert_eq!(dec("//a/./b//"), Ok(("a/b".into(), true)));
        assert_eq!(dec("/a%20b?x=1"), Ok(("a b".into(), false)));
        assert_eq!(dec("/a#frag"), Ok(("a".into(), false)));
        assert_eq!(dec("http://example.com/x/y"), Ok(("x/y".into(), false)));
        assert_eq!(dec("HTTP://example.com"), Ok((String::new(), true)));
        assert_eq!(dec("/%C3%A9"), Ok(("\u{e9}".into(), false)));
    }

    #[test]
    fn refuses_traversal_in_every_spelling() {
        for bad in [
            "/../etc/passwd",
            "/a/../../etc/passwd",
            "/%2e%2e/etc/passwd",
            "/%2E%2e%2Fetc%2Fpasswd",
            "/a%2f..%2f..%2fetc",
            "/..",
            "/a/..",
            "/.%2e/x",
        ] {
            assert_eq!(dec(bad), Err(PathError::DotDot), "{bad}");
        }
        assert_eq!(dec("/a%00.txt"), Err(PathError::Nul));
        assert_eq!(dec("/a%zz"), Err(PathError::BadEncoding));
        assert_eq!(dec("/a%2"), Err(PathError::BadEncoding));
        assert_eq!(dec("*"), Err(PathError::NotOrigin));
        assert_eq!(dec("etc/passwd"), Err(PathError::NotOrigin));
        // `...` is a legitimate file name, not a traversal.
        assert_eq!(dec("/.../x"), Ok((".../x".into(), false)));
    }

    #[test]
    fn query_offset_points_into_raw() {
        let raw = b"/dir?a=b";
        let mut out = Vec::new();
        let t = decode(raw, &mut out).unwrap();
        assert_eq!(&raw[t.query.unwrap()..], b"a=b");
        let raw = b"http://h/dir?q";
        let t = decode(raw, &mut out).unwrap();
        assert_eq!(&raw[t.query.unwrap()..], b"q");
    }

    #[test]
    fn encodes_for_location() {
        let mut out = Vec::new();
        encode_into(b"a b/\xc3\xa9?#%", &mut out);
        assert_eq!(out, b"a%20b/%C3%A9%3F%23%25");
    }
}
