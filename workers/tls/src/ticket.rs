//! Session tickets whose keys come from outside, so that a client resumes
//! on any worker.
//!
//! rustls's own ticketer makes random keys inside each process; baton's
//! workers must instead share them, or a client whose next connection goes
//! to another worker would always do a full handshake (and cost the key
//! process a signature). So:
//!
//! * baton (the acceptor) makes the keys: [`TicketKey::generate`], 32 random
//!   bytes of AES-256-GCM key and a 16-byte random name each;
//! * it keeps a [`TicketKeys`] set: the **current** key, which encrypts new
//!   tickets, and **previous** keys, which still decrypt (so a ticket issued
//!   just before a rotation keeps working for one more period);
//! * it rotates every period `P` ([`TicketKeys::rotate`]: a new current,
//!   the old current becomes previous, the oldest beyond the limit is
//!   dropped), and tells clients tickets live [`Ticketer::lifetime`]
//!   seconds, which should not exceed `P` times the number of keys kept;
//! * it sends the encoded set ([`TicketKeys::encode`], format below) to
//!   every worker when it starts and after every rotation; each worker
//!   calls [`Ticketer::set_keys`] on the one [`Ticketer`] its
//!   `ServerConfig` holds. No restart, no new config.
//!
//! The keys are secrets with the power to decrypt recorded sessions
//! resumed from their tickets (not full handshakes): they travel only over
//! the acceptor's worker channels, are never written to disk, and are
//! forgotten after their period; a compromised worker learns the keys it
//! holds, which is inherent to stateless tickets.
//!
//! # Ticket format
//!
//! `name (16) || nonce (12) || AES-256-GCM(plaintext) with tag (16)`, the
//! name as additional data. The name selects the key; an unknown name, a
//! short ticket or a failed tag yields `None` (a full handshake), never a
//! panic. Nonces are random (96 bits; a key encrypts far fewer than 2^32
//! tickets in its period).
//!
//! # Key set encoding
//!
//! `version (1) = 1 || count (1) = n, 1..=8 || n × (name (16) || key (32))`,
//! current key first.

use std::sync::{Arc, RwLock};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;

/// The encoding version of [`TicketKeys::encode`].
pub const KEYS_VERSION: u8 = 1;
/// The most keys a set holds (current included).
pub const MAX_KEYS: usize = 8;
const NAME_LEN: usize = 16;
const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;

/// Why a key set could not be decoded or made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketKeyError {
    #[error("ticket key set: unsupported version {0}")]
    Version(u8),
    #[error("ticket key set: {0} keys (1 to {MAX_KEYS} expected)")]
    Count(usize),
    #[error("ticket key set: {got} bytes, {want} expected")]
    Length { got: usize, want: usize },
    #[error("no randomness for a ticket key")]
    Random,
}

/// One ticket key: its public name and its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct TicketKey {
    pub name: [u8; NAME_LEN],
    pub secret: [u8; KEY_LEN],
}

impl std::fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("TicketKey")
            .field("name", &hex(&self.name))
            .finish_non_exhaustive()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl TicketKey {
    pub fn generate() -> Result<TicketKey, TicketKeyError> {
        let rng = SystemRandom::new();
        let mut k = TicketKey {
            name: [0; NAME_LEN],
            secret: [0; KEY_LEN],
        };
        rng.fill(&mut k.name).map_err(|_| TicketKeyError::Random)?;
        rng.fill(&mut k.secret)
            .map_err(|_| TicketKeyError::Random)?;
        Ok(k)
    }
}

/// A current key and the previous ones still accepted, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketKeys {
    keys: Vec<TicketKey>,
}

impl TicketKeys {
    pub fn new(current: TicketKey) -> TicketKeys {
        TicketKeys {
            keys: vec![current],
        }
    }

    /// A fresh set with one generated key.
    pub fn generate() -> Result<TicketKeys, TicketKeyError> {
        Ok(TicketKeys::new(TicketKey::generate()?))
    }

    pub fn current(&self) -> &TicketKey {
        &self.keys[0]
    }

    pub fn keys(&self) -> &[TicketKey] {
        &self.keys
    }

    /// Makes `new` the current key and keeps at most `keep` keys in all
    /// (at least 1, at most [`MAX_KEYS`]).
    pub fn push(&mut self, new: TicketKey, keep: usize) {
        self.keys.insert(0, new);
        self.keys.truncate(keep.clamp(1, MAX_KEYS));
    }

    /// [`push`](Self::push) a generated key.
    pub fn rotate(&mut self, keep: usize) -> Result<(), TicketKeyError> {
        self.push(TicketKey::generate()?, keep);
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(2 + self.keys.len() * (NAME_LEN + KEY_LEN));
        b.push(KEYS_VERSION);
        b.push(self.keys.len() as u8);
        for k in &self.keys {
            b.extend_from_slice(&k.name);
            b.extend_from_slice(&k.secret);
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<TicketKeys, TicketKeyError> {
        let (&version, rest) = b
            .split_first()
            .ok_or(TicketKeyError::Length { got: 0, want: 2 })?;
        if version != KEYS_VERSION {
            return Err(TicketKeyError::Version(version));
        }
        let (&count, rest) = rest
            .split_first()
            .ok_or(TicketKeyError::Length { got: 1, want: 2 })?;
        let count = usize::from(count);
        if count == 0 || count > MAX_KEYS {
            return Err(TicketKeyError::Count(count));
        }
        let want = count * (NAME_LEN + KEY_LEN);
        if rest.len() != want {
            return Err(TicketKeyError::Length {
                got: b.len(),
                want: want + 2,
            });
        }
        let keys = rest
            .chunks_exact(NAME_LEN + KEY_LEN)
            .map(|c| {
                let mut k = TicketKey {
                    name: [0; NAME_LEN],
                    secret: [0; KEY_LEN],
                };
                k.name.copy_from_slice(&c[..NAME_LEN]);
                k.secret.copy_from_slice(&c[NAME_LEN..]);
                k
            })
            .collect();
        Ok(TicketKeys { keys })
    }
}

/// A key ready for AEAD.
struct Sealer {
    name: [u8; NAME_LEN],
    key: LessSafeKey,
}

/// `ProducesTickets` over a replaceable [`TicketKeys`] set. Share one
/// `Arc<Ticketer>` between the `ServerConfig` and whatever updates keys.
pub struct Ticketer {
    keys: RwLock<Vec<Sealer>>,
    lifetime: u32,
    rng: SystemRandom,
}

impl std::fmt::Debug for Ticketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = match self.keys.read() {
            Ok(k) => k.iter().map(|s| hex(&s.name)).collect(),
            Err(_) => vec!["<poisoned>".into()],
        };
        f.debug_struct("Ticketer")
            .field("keys", &names)
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

fn sealers(keys: &TicketKeys) -> Vec<Sealer> {
    keys.keys
        .iter()
        .filter_map(|k| {
            // AES-256 takes any 32 bytes; this cannot fail for KEY_LEN.
            let unbound = UnboundKey::new(&AES_256_GCM, &k.secret).ok()?;
            Some(Sealer {
                name: k.name,
                key: LessSafeKey::new(unbound),
            })
        })
        .collect()
}

impl Ticketer {
    /// A ticketer with `keys`, telling clients tickets live `lifetime`
    /// seconds.
    pub fn new(keys: &TicketKeys, lifetime: u32) -> Arc<Ticketer> {
        Arc::new(Ticketer {
            keys: RwLock::new(sealers(keys)),
            lifetime,
            rng: SystemRandom::new(),
        })
    }

    /// Replaces the key set (after a rotation).
    pub fn set_keys(&self, keys: &TicketKeys) {
        let new = sealers(keys);
        match self.keys.write() {
            Ok(mut k) => *k = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }
}

impl ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let keys = self.keys.read().ok()?;
        let current = keys.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(NAME_LEN + NONCE_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(&current.name);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        current
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&current.name),
                &mut body,
            )
            .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < NAME_LEN + NONCE_LEN + TAG_LEN {
            return None;
        }
        let (name, rest) = cipher.split_at(NAME_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let keys = self.keys.read().ok()?;
        let key = keys.iter().find(|k| k.name == name)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = sealed.to_vec();
        let plain = key
            .key
            .open_in_place(nonce, Aad::from(name), &mut body)
            .ok()?;
        let n = plain.len();
        body.truncate(n);
        Some(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rotation_keeps_previous_keys() {
        let mut keys = TicketKeys::generate().expect("keys");
        let t = Ticketer::new(&keys, 3600);
        let ticket = t.encrypt(b"session state").expect("encrypt");
        assert_eq!(t.decrypt(&ticket).as_deref(), Some(&b"session state"[..]));
        keys.rotate(2).expect("rotate");
        t.set_keys(&keys);
        assert_eq!(t.decrypt(&ticket).as_deref(), Some(&b"session state"[..]));
        let newer = t.encrypt(b"x").expect("encrypt");
        assert_ne!(newer[..NAME_LEN], ticket[..NAME_LEN]);
        keys.rotate(2).expect("rotate");
        t.set_keys(&keys);
        assert_eq!(t.decrypt(&ticket), None, "dropped after two rotations");
        assert!(t.decrypt(&newer).is_some());
        let other = Ticketer::new(&TicketKeys::generate().expect("keys"), 60);
        assert_eq!(other.decrypt(&newer), None);
    }

    #[test]
    fn tampering_fails() {
        let t = Ticketer::new(&TicketKeys::generate().expect("keys"), 60);
        let mut ticket = t.encrypt(b"abc").expect("encrypt");
        let last = ticket.len() - 1;
        ticket[last] ^= 1;
        assert_eq!(t.decrypt(&ticket), None);
        assert_eq!(t.decrypt(&[]), None);
    }

    #[test]
    fn key_set_decode_errors() {
        assert_eq!(TicketKeys::decode(&[2, 1]), Err(TicketKeyError::Version(2)));
        assert_eq!(TicketKeys::decode(&[1, 0]), Err(TicketKeyError::Count(0)));
        assert_eq!(TicketKeys::decode(&[1, 9]), Err(TicketKeyError::Count(9)));
        assert!(matches!(
            TicketKeys::decode(&[1, 1, 0]),
            Err(TicketKeyError::Length { .. })
        ));
    }

    proptest! {
        #[test]
        fn key_sets_round_trip(n in 1usize..=MAX_KEYS, seed in any::<u8>()) {
            let mut keys = TicketKeys::new(TicketKey { name: [seed; 16], secret: [seed; 32] });
            for i in 1..n {
                keys.push(TicketKey { name: [i as u8; 16], secret: [seed ^ i as u8; 32] }, MAX_KEYS);
            }
            prop_assert_eq!(TicketKeys::decode(&keys.encode()), Ok(keys));
        }

        #[test]
        fn decrypt_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let t = Ticketer::new(&TicketKeys::new(TicketKey { name: [0; 16], secret: [1; 32] }), 60);
            prop_assert!(t.decrypt(&bytes).is_none());
        }
    }
}
