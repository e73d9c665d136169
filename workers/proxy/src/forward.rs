//! HTTP mode's header rewriting: what a request looks like when it leaves
//! for the upstream, and a response when it leaves for the client. Pure
//! functions over heads `baton-http` parsed; no I/O.
//!
//! Both ways, every hop-by-hop field is dropped (RFC 9110 §7.6.1:
//! `Connection` and every field it names, `Keep-Alive`, `TE`,
//! `Transfer-Encoding`, `Upgrade`, `Proxy-Connection`), and the framing
//! fields are written anew from the framing the proxy decided
//! (`Content-Length: N` or `Transfer-Encoding: chunked`), so the next hop
//! can only read the message one way. `Via: 1.1 baton` is added (§7.6.3).
//!
//! Towards the upstream: `Host` is passed (or replaced by `--host`);
//! `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host` and
//! `Forwarded` (RFC 7239) say who the client is. Those the client sent are
//! dropped and replaced, unless the client's address is in a
//! `--trusted-proxy` range: then the chain is extended (its `For` list and
//! `Forwarded` elements kept, this hop appended; its proto and host kept).
//! `X-Real-IP` (with `--x-real-ip`) is the client's address, or a trusted
//! peer's own value. `Expect: 100-continue` is answered by the proxy and
//! not forwarded.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use baton_http::fields::{self, is_hop_by_hop, is_token};
use baton_http::write;
use baton_http::{Field, Framing, RequestHead, ResponseHead};

/// The `Via` value this proxy adds.
pub const VIA: &[u8] = b"1.1 baton";

/// An address range, `--trusted-proxy 10.0.0.0/8` (a bare address is a
/// range of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

/// Why a `--trusted-proxy` value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?}: expected ADDRESS or ADDRESS/BITS, e.g. 10.0.0.0/8 or ::1/128")]
pub struct CidrError(String);

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let bad = || CidrError(s.to_string());
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let net: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            Some(b) => b.parse::<u8>().ok().filter(|b| *b <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { net, bits })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.bits)
    }
}

impl Cidr {
    /// Whether `ip` is in the range (an IPv4-mapped IPv6 address counts as
    /// its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let mask = |len: u32| -> u128 {
            if self.bits == 0 {
                0
            } else {
                (!0u128 << (len - u32::from(self.bits))) & (!0u128 >> (128 - len))
            }
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let m = mask(32);
                u128::from(u32::from(n)) & m == u128::from(u32::from(a)) & m
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let m = mask(128);
                u128::from(n) & m == u128::from(a) & m
            }
            _ => false,
        }
    }
}

/// How requests are rewritten (from the command line).
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub trusted: Vec<Cidr>,
    pub x_real_ip: bool,
    /// `--host`: the `Host` sent upstream instead of the client's.
    pub host: Option<String>,
}

impl Rules {
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(ip))
    }
}

/// The fields the proxy sets itself, which a client may not pass unless
/// trusted.
const FORWARDING: [&str; 5] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
    "x-real-ip",
];

/// Appends `name: v1, v2, ...` joining every value of `name` in `fields`
/// and `extra` last.
fn joined(out: &mut Vec<u8>, name: &str, fields: &[Field<'_>], extra: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    for v in fields::values(fields, name) {
        if !v.is_empty() {
            out.extend_from_slice(v);
            out.extend_from_slice(b", ");
        }
    }
    out.extend_from_slice(extra);
    out.extend_from_slice(b"\r\n");
}

/// A `Forwarded` parameter value: a token as is, anything else quoted.
fn param(out: &mut Vec<u8>, v: &[u8]) {
    if is_token(v) {
        out.extend_from_slice(v);
    } else {
        out.push(b'"');
        for &b in v {
            if b == b'"' || b == b'\\' {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'"');
    }
}

/// What the proxy knows about the request being forwarded.
#[derive(Debug, Clone, Copy)]
pub struct Hop<'a> {
    /// The client's address (the PROXY header's with `--accept-proxy`).
    pub client: SocketAddr,
    /// The upstream's name, the `Host` of last resort (an HTTP/1.0
    /// request may have none).
    pub upstream: &'a str,
    /// The request asks for a protocol upgrade that is forwarded.
    pub upgrade: bool,
    /// The client's connection is TLS (the proxy terminated it).
    pub tls: bool,
}

/// Writes the head of `req` as it goes to the upstream: always HTTP/1.1,
/// with the body framed as `framing` says. See the module docs.
pub fn request_head(out: &mut Vec<u8>, req: &RequestHead<'_, '_>, hop: &Hop<'_>, rules: &Rules) {
    out.extend_from_slice(req.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let client_host = req.host.filter(|h| !h.is_empty());
    let host = match (&rules.host, client_host) {
        (Some(h), _) => h.as_bytes(),
        (None, Some(h)) => h,
        (None, None) => hop.upstream.as_bytes(),
    };
    write::field(out, "Host", host);
    let trusted = rules.trusts(hop.client.ip());
    for f in req.fields {
        let name = f.name;
        if is_hop_by_hop(name, req.fields)
            || name.eq_ignore_ascii_case("host")
            || name.eq_ignore_ascii_case("content-length")
            || (name.eq_ignore_ascii_case("expect") && fields::has_token(f.value, "100-continue"))
            || FORWARDING.iter().any(|h| h.eq_ignore_ascii_case(name))
        {
            continue;
        }
        write::field(out, name, f.value);
    }
    let none: &[Field<'_>] = &[];
    let chain = if trusted { req.fields } else { none };
    let ip = hop.client.ip().to_canonical();
    let ip_text = ip.to_string();
    joined(out, "X-Forwarded-For", chain, ip_text.as_bytes());
    let this_proto: &[u8] = if hop.tls { b"https" } else { b"http" };
    let proto = fields::first(chain, "x-forwarded-proto").unwrap_or(this_proto);
    write::field(out, "X-Forwarded-Proto", proto);
    if let Some(h) = fields::first(chain, "x-forwarded-host").or(client_host) {
        write::field(out, "X-Forwarded-Host", h);
    }
    let mut fwd = Vec::with_capacity(64);
    fwd.extend_from_slice(b"for=");
    match ip {
        IpAddr::V4(_) => fwd.extend_from_slice(ip_text.as_bytes()),
        IpAddr::V6(_) => param(&mut fwd, format!("[{ip_text}]").as_bytes()),
    }
    if let Some(h) = client_host {
        fwd.extend_from_slice(b";host=");
        param(&mut fwd, h);
    }
    fwd.extend_from_slice(b";proto=");
    fwd.extend_from_slice(this_proto);
    joined(out, "Forwarded", chain, &fwd);
    if rules.x_real_ip {
        let real = fields::first(chain, "x-real-ip").unwrap_or(ip_text.as_bytes());
        write::field(out, "X-Real-IP", real);
    }
    write::field(out, "Via", VIA);
    match req.framing {
        Framing::Length(n) => write::num_field(out, "Content-Length", n),
        Framing::Chunked => write::field(out, "Transfer-Encoding", b"chunked"),
        _ => {}
    }
    if hop.upgrade {
        if let Some(u) = req.field("upgrade") {
            write::field(out, "Connection", b"upgrade");
            write::field(out, "Upgrade", u);
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// Whether a request asks for a protocol upgrade (`Connection: upgrade`
/// and an `Upgrade` field, HTTP/1.1 only, RFC 9110 §7.8).
pub fn wants_upgrade(req: &RequestHead<'_, '_>) -> bool {
    req.version == baton_http::Version::Http11
        && fields::any_token(req.fields, "connection", "upgrade")
        && req.field("upgrade").is_some_and(|u| !u.is_empty())
}

/// How the body of a response is sent to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutBody {
    /// No body, or a `Content-Length` one: as received.
    Plain,
    /// Chunked (re-encoded chunk by chunk).
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, or an upstream
    /// body that runs until close).
    UntilClose,
}

/// Writes the head of `resp` as it goes to the client. `framing` is the
/// response's; `http10` says the client cannot take chunked; `close`
/// asks for `Connection: close`; `upgrade` keeps the upgrade fields of a
/// 101. Returns how the body goes out.
pub fn response_head(
    out: &mut Vec<u8>,
    resp: &ResponseHead<'_, '_>,
    framing: Framing,
    http10: bool,
    mut close: bool,
    upgrade: bool,
) -> OutBody {
    let body = match framing {
        Framing::Chunked if http10 => OutBody::UntilClose,
        Framing::Chunked => OutBody::Chunked,
        Framing::UntilClose => OutBody::UntilClose,
        _ => OutBody::Plain,
    };
    close |= body == OutBody::UntilClose;
    out.extend_from_slice(b"HTTP/1.1 ");
    write::num(out, u64::from(resp.status));
    out.push(b' ');
    if resp.reason.is_empty() {
        out.extend_from_slice(write::reason(resp.status).as_bytes());
    } else {
        out.extend_from_slice(resp.reason);
    }
    out.extend_from_slice(b"\r\n");
    let mut length_kept = false;
    for f in resp.fields {
        let name = f.name;
        if is_hop_by_hop(name, resp.fields) {
            continue;
        }
        if name.eq_ignore_ascii_case("content-length") {
            // A HEAD or 304 answer keeps the length it describes; a body
            // gets the length decided below.
            if length_kept || framing != Framing::None {
                continue;
            }
            length_kept = true;
        }
        write::field(out, name, f.value);
    }
    write::field(out, "Via", VIA);
    match (framing, body) {
        (Framing::Length(n), _) => write::num_field(out, "Content-Length", n),
        (_, OutBody::Chunked) => write::field(out, "Transfer-Encoding", b"chunked"),
        _ => {}
    }
    if upgrade {
        write::field(out, "Connection", b"upgrade");
        if let Some(u) = resp.field("upgrade") {
            write::field(out, "Upgrade", u);
        }
    } else if close {
        write::field(out, "Connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_http::{parse_request, parse_response, Limits};

    fn forward(raw: &[u8], client: &str, rules: &Rules) -> String {
        forward_over(raw, client, rules, false)
    }

    fn forward_over(raw: &[u8], client: &str, rules: &Rules, tls: bool) -> String {
        let limits = Limits::default();
        let mut store = limits.fields();
        let req = parse_request(raw, &limits, &mut store).unwrap().unwrap();
        let mut out = Vec::new();
        let hop = Hop {
            client: client.parse().unwrap(),
            upstream: "up:80",
            upgrade: wants_upgrade(&req),
            tls,
        };
        request_head(&mut out, &req, &hop, rules);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn cidrs() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.0.0.1".parse().unwrap()));
        let c: Cidr = "::1".parse().unwrap();
        assert!(c.contains("::1".parse().unwrap()));
        assert!(!c.contains("::2".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        for bad in ["10.0.0.0/33", "x", "10.0.0/8", "::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn untrusted_clients_cannot_forge_the_chain() {
        let raw = b"POST /p HTTP/1.1\r\nHost: example.com\r\nX-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nProxy-Connection: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\nVia: 1.0 other\r\n\r\nabc";
        let rules = Rules {
            x_real_ip: true,
            ..Rules::default()
        };
        let h = forward(raw, "192.0.2.7:5000", &rules);
        assert!(
            h.starts_with("POST /p HTTP/1.1\r\nHost: example.com\r\n"),
            "{h}"
        );
        for gone in [
            "6.6.6.6",
            "X-Secret",
            "Keep-Alive",
            "TE:",
            "Proxy-Connection",
            "Expect",
            "https",
            "Connection",
        ] {
            assert!(!h.contains(gone), "{gone} in {h}");
        }
        for kept in [
            "X-Forwarded-For: 192.0.2.7\r\n",
            "X-Forwarded-Proto: http\r\n",
            "X-Forwarded-Host: example.com\r\n",
            "Forwarded: for=192.0.2.7;host=example.com;proto=http\r\n",
            "X-Real-IP: 192.0.2.7\r\n",
            "Via: 1.0 other\r\n",
            "Via: 1.1 baton\r\n",
            "Content-Length: 3\r\n\r\n",
        ] {
            assert!(h.contains(kept), "{kept:?} not in {h}");
        }
    }

    #[test]
    fn a_tls_client_is_forwarded_as_https_and_cannot_claim_otherwise() {
        let raw = b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Proto: http\r\n\r\n";
        let h = forward_over(raw, "192.0.2.7:5000", &Rules::default(), true);
        assert!(h.contains("X-Forwarded-Proto: https\r\n"), "{h}");
        assert!(!h.contains("X-Forwarded-Proto: http\r\n"), "{h}");
        assert!(
            h.contains("Forwarded: for=192.0.2.7;host=a;proto=https\r\n"),
            "{h}"
        );
    }

    #[test]
    fn trusted_peers_extend_the_chain() {
        let raw = b"GET / HTTP/1.1\r\nHost: a:8080\r\nX-Forwarded-For: 1.1.1.1\r\nForwarded: for=1.1.1.1\r\nX-Forwarded-Proto: https\r\n\r\n";
        let rules = Rules {
            trusted: vec!["::1/128".parse().unwrap()],
            host: Some("inner".into()),
            ..Rules::default()
        };
        let h = forward(raw, "[::1]:5000", &rules);
        assert!(h.contains("Host: inner\r\n"), "{h}");
        assert!(h.contains("X-Forwarded-For: 1.1.1.1, ::1\r\n"), "{h}");
        assert!(h.contains("X-Forwarded-Proto: https\r\n"), "{h}");
        assert!(h.contains("X-Forwarded-Host: a:8080\r\n"), "{h}");
        assert!(
            h.contains("Forwarded: for=1.1.1.1, for=\"[::1]\";host=\"a:8080\";proto=http\r\n"),
            "{h}"
        );
    }

    #[test]
    fn upgrades_and_http10() {
        let raw =
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        let h = forward(raw, "127.0.0.1:1", &Rules::default());
        assert!(
            h.contains("Connection: upgrade\r\nUpgrade: websocket\r\n"),
            "{h}"
        );
        let h = forward(b"GET / HTTP/1.0\r\n\r\n", "127.0.0.1:1", &Rules::default());
        assert!(h.starts_with("GET / HTTP/1.1\r\nHost: up:80\r\n"), "{h}");
    }

    #[test]
    fn responses() {
        let limits = Limits::default();
        let mut store = limits.fields();
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: X-A\r\nX-A: 1\r\nKeep-Alive: t=1\r\nX-B: 2\r\n\r\n";
        let r = parse_response(raw, &limits, &mut store).unwrap().unwrap();
        let f = r.framing("GET").unwrap();
        let mut out = Vec::new();
        assert_eq!(
            response_head(&mut out, &r, f, false, false, false),
            OutBody::Chunked
        );
        let s = String::from_utf8(out).unwrap();
        assert_eq!(
            s,
            "HTTP/1.1 200 OK\r\nX-B: 2\r\nVia: 1.1 baton\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        let mut out = Vec::new();
        assert_eq!(
            response_head(&mut out, &r, f, true, false, false),
            OutBody::UntilClose
        );
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("Connection: close\r\n"));
        let mut store = limits.fields();
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n";
        let r = parse_response(raw, &limits, &mut store).unwrap().unwrap();
        let mut out = Vec::new();
        response_head(
            &mut out,
            &r,
            r.framing("HEAD").unwrap(),
            false,
            false,
            false,
        );
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("Content-Length: 10\r\n"));
    }
}
