//! Upstream servers: the `--upstream` syntax, name resolution (once, at
//! start, before the sandbox), and the hash that identifies a list in the
//! pool's shared memory.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::str::FromStr;

/// Largest weight accepted.
pub const MAX_WEIGHT: u32 = 1000;

/// One `--upstream HOST:PORT[,weight=N][,backup]`, not yet resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSpec {
    pub host: String,
    pub port: u16,
    pub weight: u32,
    pub backup: bool,
}

/// Why an `--upstream` value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("{0:?}: expected HOST:PORT, e.g. 127.0.0.1:9001 or [::1]:9001")]
    NoPort(String),
    #[error("{0:?}: the port must be a number from 1 to 65535")]
    BadPort(String),
    #[error("{0:?}: empty host")]
    NoHost(String),
    #[error("weight {0:?}: expected a number from 1 to {MAX_WEIGHT}")]
    BadWeight(String),
    #[error("{0:?}: unknown suffix (expected weight=N or backup)")]
    BadSuffix(String),
    #[error("a suffix is given twice in {0:?}")]
    Twice(String),
}

impl FromStr for UpstreamSpec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let mut parts = s.split(',');
        let hostport = parts.next().unwrap_or_default();
        let (host, port) = split_host_port(hostport)?;
        let mut spec = UpstreamSpec {
            host,
            port,
            weight: 1,
            backup: false,
        };
        let (mut saw_weight, mut saw_backup) = (false, false);
        for p in parts {
            if p == "backup" {
                if saw_backup {
                    return Err(SpecError::Twice(s.to_string()));
                }
                saw_backup = true;
                spec.backup = true;
            } else if let Some(w) = p.strip_prefix("weight=") {
                if saw_weight {
                    return Err(SpecError::Twice(s.to_string()));
                }
                saw_weight = true;
                spec.weight = w
                    .parse()
                    .ok()
                    .filter(|w| (1..=MAX_WEIGHT).contains(w))
                    .ok_or_else(|| SpecError::BadWeight(w.to_string()))?;
            } else {
                return Err(SpecError::BadSuffix(p.to_string()));
            }
        }
        Ok(spec)
    }
}

fn split_host_port(s: &str) -> Result<(String, u16), SpecError> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest
            .split_once("]:")
            .ok_or_else(|| SpecError::NoPort(s.to_string()))?;
        (h, p)
    } else {
        let (h, p) = s
            .rsplit_once(':')
            .ok_or_else(|| SpecError::NoPort(s.to_string()))?;
        if h.contains(':') {
            // An IPv6 address without brackets: its port is ambiguous.
            return Err(SpecError::NoPort(s.to_string()));
        }
        (h, p)
    };
    if host.is_empty() {
        return Err(SpecError::NoHost(s.to_string()));
    }
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| SpecError::BadPort(s.to_string()))?;
    Ok((host.to_string(), port))
}

impl fmt::Display for UpstreamSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)?;
        } else {
            write!(f, "{}:{}", self.host, self.port)?;
        }
        if self.weight != 1 {
            write!(f, ",weight={}", self.weight)?;
        }
        if self.backup {
            f.write_str(",backup")?;
        }
        Ok(())
    }
}

/// A resolved upstream server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// HOST:PORT as given (for logs).
    pub name: String,
    pub addr: SocketAddr,
    pub weight: u32,
    pub backup: bool,
}

/// A name that did not resolve.
#[derive(Debug, thiserror::Error)]
#[error("--upstream {name}: cannot resolve: {reason}")]
pub struct ResolveError {
    pub name: String,
    pub reason: String,
}

/// Resolves every spec to its first address. Call it before the sandbox
/// is applied: inside a chroot there is no resolver configuration.
pub fn resolve(specs: &[UpstreamSpec]) -> Result<Vec<Upstream>, ResolveError> {
    specs
        .iter()
        .map(|s| {
            let name = format!("{}:{}", s.host, s.port);
            let fail = |reason: String| ResolveError {
                name: s.to_string(),
                reason,
            };
            let addr = (s.host.as_str(), s.port)
                .to_socket_addrs()
                .map_err(|e| fail(e.to_string()))?
                .next()
                .ok_or_else(|| fail("no address".into()))?;
            Ok(Upstream {
                name: if s.host.contains(':') {
                    format!("[{}]:{}", s.host, s.port)
                } else {
                    name
                },
                addr,
                weight: s.weight,
                backup: s.backup,
            })
        })
        .collect()
}

/// FNV-1a of the list (names, addresses, weights, backup flags, order):
/// workers whose lists differ never share health state.
pub fn list_hash(list: &[Upstream]) -> u64 {
    let mut h = Fnv::default();
    for u in list {
        h.write(u.name.as_bytes());
        h.write(&[0]);
        h.write(u.addr.to_string().as_bytes());
        h.write(&u.weight.to_le_bytes());
        h.write(&[u8::from(u.backup), 0xff]);
    }
    h.0
}

/// 64-bit FNV-1a.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let s: UpstreamSpec = "127.0.0.1:9001".parse().unwrap();
        assert_eq!(
            (s.host.as_str(), s.port, s.weight, s.backup),
            ("127.0.0.1", 9001, 1, false)
        );
        let s: UpstreamSpec = "db.internal:5432,weight=3".parse().unwrap();
        assert_eq!((s.host.as_str(), s.weight), ("db.internal", 3));
        let s: UpstreamSpec = "[::1]:9003,backup,weight=2".parse().unwrap();
        assert_eq!(
            (s.host.as_str(), s.port, s.weight, s.backup),
            ("::1", 9003, 2, true)
        );
        assert_eq!(s.to_string(), "[::1]:9003,weight=2,backup");
        for bad in [
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            ":80",
            "::1:80",
            "h:80,weight=0",
            "h:80,weight=1001",
            "h:80,weight=x",
            "h:80,primary",
            "h:80,backup,backup",
            "h:80,weight=1,weight=2",
            "h:80,",
        ] {
            assert!(bad.parse::<UpstreamSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn resolution_and_hash() {
        let specs: Vec<UpstreamSpec> = ["127.0.0.1:9001", "localhost:9002,backup"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let list = resolve(&specs).unwrap();
        assert_eq!(list[0].addr, "127.0.0.1:9001".parse().unwrap());
        assert!(list[1].addr.ip().is_loopback());
        assert!(list[1].backup);
        let mut other = list.clone();
        other[1].weight = 2;
        assert_ne!(list_hash(&list), list_hash(&other));
        assert_eq!(list_hash(&list), list_hash(&list.clone()));
        let bad: UpstreamSpec = "no-such-host.invalid:1".parse().unwrap();
        assert!(resolve(&[bad]).is_err());
    }
}
