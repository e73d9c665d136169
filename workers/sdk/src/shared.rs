//! State shared by every worker of a pool: one small memory region,
//! mapped `MAP_SHARED` by each, holding atomics only.
//!
//! # Where it comes from
//!
//! The acceptor creates one memfd per pool (64 KiB, [`REGION_SIZE`],
//! zero-filled) and passes it to every worker it spawns as an inherited fd
//! whose number is in [`SHARED_FD_ENV`]. A worker calls
//! [`Shared::from_env`] **before** it applies its sandbox: the sandbox
//! closes every fd it was not told to keep, but a mapping survives the
//! close of its fd, so [`Shared::from_env`] maps the region and closes the
//! fd at once (nothing else in the process owns it; the variable is
//! removed). A worker started without the variable (by hand, in tests,
//! registered through `--worker-socket`) gets a private anonymous mapping
//! of the same layout: the same code, state of its own.
//!
//! # Layout (version 1), all little-endian atomics
//!
//! | offset | size | field                                                      |
//! |--------|------|------------------------------------------------------------|
//! | 0      | 8    | magic `BATONSH1` (as a little-endian u64)                  |
//! | 8      | 4    | layout version ([`VERSION`])                               |
//! | 12     | 4    | state: 0 empty, 1 being initialised, 2 ready               |
//! | 16     | 8    | hash of the owner's configuration (e.g. its upstream list) |
//! | 24     | 4    | number of slots in use                                     |
//! | 28     | 36   | reserved (zero)                                            |
//! | 64     | 64 × n | slots, one cache line each ([`Slot`])                    |
//!
//! A region holds at most [`MAX_SLOTS`] slots (1023). Each [`Slot`] is:
//!
//! | offset | size | field                                                       |
//! |--------|------|-------------------------------------------------------------|
//! | 0      | 4    | `down`: 0 up, 1 down                                        |
//! | 4      | 4    | consecutive failures (connect or I/O, or failed probes)     |
//! | 8      | 8    | `retry_at`: monotonic ms after which a down server may be tried |
//! | 16     | 8    | probe lease: monotonic ms until which one worker owns the probe |
//! | 24     | 4    | consecutive successful probes                               |
//! | 28     | 4    | times taken down in a row (drives the backoff)              |
//! | 32     | 32   | reserved (zero)                                             |
//!
//! Times are `CLOCK_MONOTONIC` milliseconds ([`now_ms`]), the same clock in
//! every process of the host.
//!
//! # Joining, and configurations that differ
//!
//! The first worker to open a zeroed region initialises it (a CAS on the
//! state word from 0 to 1, header written, then 2). A worker that finds a
//! ready region with its own hash and slot count joins it. One that finds
//! another hash (a reload changed the upstream list, and the new workers
//! start while the old ones drain) takes the region over: it zeroes the
//! slots and writes its hash. The old workers see on their next
//! [`Shared::refresh`] that the hash is no longer theirs and carry on with
//! a private mapping, so two configurations never mix their state (slot 3
//! of one list is not slot 3 of another).
//!
//! # Leases
//!
//! [`Slot::try_lease`] lets exactly one worker of the pool own a server's
//! next health probe: a CAS of the lease word from an expired time to
//! `now + interval`. The others skip that server until the lease expires.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::worker::EnvFdError;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// The environment variable naming the inherited memfd.
pub const SHARED_FD_ENV: &str = "BATON_SHARED_FD";
/// Size of the region the acceptor creates.
pub const REGION_SIZE: usize = 64 * 1024;
/// `BATONSH1` read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"BATONSH1");
/// The layout version this code writes and joins.
pub const VERSION: u32 = 1;
/// Bytes of the header, and of each slot.
pub const HEADER_SIZE: usize = 64;
/// Size of one slot.
pub const SLOT_SIZE: usize = 64;
/// Slots that fit in a region.
pub const MAX_SLOTS: usize = (REGION_SIZE - HEADER_SIZE) / SLOT_SIZE;

const EMPTY: u32 = 0;
const INIT: u32 = 1;
const READY: u32 = 2;

/// Errors of [`Shared`].
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("{SHARED_FD_ENV}={0:?} is not a file descriptor number")]
    BadVar(String),
    #[error("{SHARED_FD_ENV}: fd {fd} is unusable: {source}")]
    BadFd { fd: RawFd, source: io::Error },
    #[error("the shared region is {have} bytes, smaller than the {need} this layout needs")]
    TooSmall { have: u64, need: usize },
    #[error("{0} slots asked for; a region holds at most {MAX_SLOTS}")]
    TooManySlots(usize),
    #[error("the shared region has magic {magic:#x} version {version}: not a baton region of version {VERSION}")]
    Foreign { magic: u64, version: u32 },
    #[error("cannot map the shared region: {0}")]
    Map(io::Error),
}

#[repr(C)]
struct Header {
    magic: AtomicU64,
    version: AtomicU32,
    state: AtomicU32,
    hash: AtomicU64,
    slots: AtomicU32,
    _reserved: [u32; 9],
}

/// The shared state of one server (see the [module docs](self) for the
/// layout). Every field is an atomic: any worker may read or write it at
/// any time.
#[repr(C)]
pub struct Slot {
    /// 0 up, 1 down.
    pub down: AtomicU32,
    /// Consecutive failures.
    pub fails: AtomicU32,
    /// When a down server may be tried again (monotonic ms).
    pub retry_at: AtomicU64,
    /// Until when one worker owns the next probe (monotonic ms).
    pub lease: AtomicU64,
    /// Consecutive successful probes.
    pub probe_ok: AtomicU32,
    /// Times taken down without a success in between.
    pub downs: AtomicU32,
    _reserved: [u64; 4],
}

const _: () = assert!(std::mem::size_of::<Header>() == HEADER_SIZE);
const _: () = assert!(std::mem::size_of::<Slot>() == SLOT_SIZE);

impl Slot {
    /// Takes the probe lease until `now_ms + for_ms` if nobody holds it at
    /// `now_ms`; true when this caller got it.
    pub fn try_lease(&self, now_ms: u64, for_ms: u64) -> bool {
        let cur = self.lease.load(Ordering::Acquire);
        cur <= now_ms
            && self
                .lease
                .compare_exchange(
                    cur,
                    now_ms.saturating_add(for_ms),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    /// Whether the server is marked down.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire) != 0
    }

    /// Marks it down (`true`) or up; returns whether this call changed it,
    /// so that exactly one worker logs each transition.
    pub fn set_down(&self, down: bool) -> bool {
        let (from, to) = if down { (0, 1) } else { (1, 0) };
        self.down
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// A mapped region: [`Shared::from_env`], [`Shared::anonymous`] or
/// [`Shared::from_fd`].
pub struct Shared {
    base: NonNull<u8>,
    map_len: usize,
    hash: u64,
    slots: usize,
    /// Whether the region is the pool's (false: a private mapping).
    pooled: bool,
}

// SAFETY: the region holds atomics only, accessed through shared
// references to them; the mapping lives as long as the Shared.
unsafe impl Send for Shared {}
// SAFETY: as above: every access is an atomic operation.
unsafe impl Sync for Shared {}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("slots", &self.slots)
            .field("hash", &format_args!("{:#018x}", self.hash))
            .field("pooled", &self.pooled)
            .finish()
    }
}

impl Shared {
    /// Maps the pool's region named by [`SHARED_FD_ENV`] for `slots` slots
    /// of a configuration whose hash is `hash`, or a private one when the
    /// variable is not set. Closes the fd (the mapping outlives it) and
    /// removes the variable. Call it before the sandbox is applied.
    pub fn from_env(hash: u64, slots: usize) -> Result<Shared, SharedError> {
        let owned = match crate::worker::take_env_fd(SHARED_FD_ENV) {
            None => return Shared::anonymous(hash, slots),
            Some(Err(EnvFdError::BadVar(v))) => return Err(SharedError::BadVar(v)),
            Some(Err(EnvFdError::BadFd(fd, source))) => {
                return Err(SharedError::BadFd { fd, source })
            }
            Some(Ok((_, owned))) => owned,
        };
        Shared::from_fd(&owned, hash, slots)
        // `owned` is closed here; the mapping stays.
    }

    /// A private region of the same layout, for a worker outside a pool.
    pub fn anonymous(hash: u64, slots: usize) -> Result<Shared, SharedError> {
        check_slots(slots)?;
        let base = map(None, REGION_SIZE)?;
        let mut s = Shared {
            base,
            map_len: REGION_SIZE,
            hash,
            slots,
            pooled: false,
        };
        s.join();
        Ok(s)
    }

    /// Maps the region in `fd` (a memfd of at least [`REGION_SIZE`]
    /// bytes) and joins it. The fd may be closed after.
    pub fn from_fd(fd: &impl AsRawFd, hash: u64, slots: usize) -> Result<Shared, SharedError> {
        check_slots(slots)?;
        let fd = fd.as_raw_fd();
        let st = nix::sys::stat::fstat(fd).map_err(|e| SharedError::BadFd {
            fd,
            source: e.into(),
        })?;
        let have = u64::try_from(st.st_size).unwrap_or(0);
        if have < REGION_SIZE as u64 {
            return Err(SharedError::TooSmall {
                have,
                need: REGION_SIZE,
            });
        }
        let base = map(Some(fd), REGION_SIZE)?;
        let mut s = Shared {
            base,
            map_len: REGION_SIZE,
            hash,
            slots,
            pooled: true,
        };
        let h = s.header();
        let (magic, version) = (
            h.magic.load(Ordering::Acquire),
            h.version.load(Ordering::Acquire),
        );
        if h.state.load(Ordering::Acquire) == READY && (magic != MAGIC || version != VERSION) {
            return Err(SharedError::Foreign { magic, version });
        }
        s.join();
        Ok(s)
    }

    /// Whether this is the pool's region (false: private state).
    pub fn pooled(&self) -> bool {
        self.pooled
    }

    /// How many slots the caller asked for.
    pub fn len(&self) -> usize {
        self.slots
    }

    /// Whether it has no slot.
    pub fn is_empty(&self) -> bool {
        self.slots == 0
    }

    /// Slot `i`; None past the slots asked for.
    pub fn slot(&self, i: usize) -> Option<&Slot> {
        if i >= self.slots {
            return None;
        }
        // SAFETY: HEADER_SIZE + i * SLOT_SIZE + SLOT_SIZE <= REGION_SIZE
        // (i < slots <= MAX_SLOTS), the mapping is page-aligned so the
        // offset is 8-aligned, and a zeroed or initialised Slot of atomics
        // is valid for any bit pattern.
        Some(unsafe { &*(self.base.as_ptr().add(HEADER_SIZE + i * SLOT_SIZE) as *const Slot) })
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping is at least HEADER_SIZE bytes, page-aligned,
        // and a Header of atomics is valid for any bit pattern.
        unsafe { &*(self.base.as_ptr() as *const Header) }
    }

    /// Initialises the region, joins it, or takes it over (see the
    /// [module docs](self)).
    fn join(&mut self) {
        let h = self.header();
        for _ in 0..10_000 {
            match h
                .state
                .compare_exchange(EMPTY, INIT, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    self.init();
                    return;
                }
                Err(INIT) => std::thread::yield_now(),
                Err(_) => {
                    if self.is_ours() {
                        return;
                    }
                    // Another configuration's: take it over.
                    if h.state
                        .compare_exchange(READY, INIT, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        self.init();
                        return;
                    }
                }
            }
        }
        // Someone died half-way through initialising: take it.
        h.state.store(INIT, Ordering::Release);
        self.init();
    }

    /// Writes the header and zeroes every slot; the state word is INIT.
    fn init(&self) {
        let h = self.header();
        h.magic.store(MAGIC, Ordering::Relaxed);
        h.version.store(VERSION, Ordering::Relaxed);
        h.hash.store(self.hash, Ordering::Relaxed);
        h.slots.store(self.slots as u32, Ordering::Relaxed);
        for i in 0..MAX_SLOTS.min((self.map_len - HEADER_SIZE) / SLOT_SIZE) {
            // SAFETY: as in `slot`, for every slot that fits in the mapping.
            let s =
                unsafe { &*(self.base.as_ptr().add(HEADER_SIZE + i * SLOT_SIZE) as *const Slot) };
            for w in [&s.down, &s.fails, &s.probe_ok, &s.downs] {
                w.store(0, Ordering::Relaxed);
            }
            s.retry_at.store(0, Ordering::Relaxed);
            s.lease.store(0, Ordering::Relaxed);
        }
        h.state.store(READY, Ordering::Release);
    }

    fn is_ours(&self) -> bool {
        let h = self.header();
        h.state.load(Ordering::Acquire) == READY
            && h.magic.load(Ordering::Acquire) == MAGIC
            && h.version.load(Ordering::Acquire) == VERSION
            && h.hash.load(Ordering::Acquire) == self.hash
            && h.slots.load(Ordering::Acquire) as usize == self.slots
    }

    /// Checks that the pool's region is still this configuration's; if
    /// another took it over, switches to a private region (state starts
    /// afresh: every server up). Returns true when it switched. Cheap
    /// (a few atomic loads): call it once per event-loop turn or timer.
    pub fn refresh(&mut self) -> Result<bool, SharedError> {
        if !self.pooled || self.is_ours() || self.header().state.load(Ordering::Acquire) == INIT {
            return Ok(false);
        }
        *self = Shared::anonymous(self.hash, self.slots)?;
        Ok(true)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: base and map_len are the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.map_len) };
    }
}

fn check_slots(slots: usize) -> Result<(), SharedError> {
    if slots > MAX_SLOTS {
        return Err(SharedError::TooManySlots(slots));
    }
    Ok(())
}

/// `mmap` of `len` bytes, read-write, shared from `fd` or private
/// anonymous (zero-filled).
fn map(fd: Option<RawFd>, len: usize) -> Result<NonNull<u8>, SharedError> {
    let (flags, fd) = match fd {
        Some(fd) => (libc::MAP_SHARED, fd),
        None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
    };
    // SAFETY: a fresh mapping chosen by the kernel (null hint), of a file
    // we checked is large enough or anonymous; nothing aliases it yet.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(SharedError::Map(io::Error::last_os_error()));
    }
    NonNull::new(p.cast()).ok_or_else(|| SharedError::Map(io::Error::other("mmap returned null")))
}

/// `CLOCK_MONOTONIC` in milliseconds: one clock for every process of the
/// host, as the slots' times need.
pub fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec the call writes into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1000) + (ts.tv_nsec as u64) / 1_000_000
}

/// Creates a zero-filled memfd of [`REGION_SIZE`] bytes, as the acceptor
/// does for each pool (for the acceptor, and for tests). Close-on-exec:
/// the spawner clears that flag on the child's copy.
pub fn create_region(name: &str) -> io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(name).map_err(|_| io::Error::other("NUL in name"))?;
    let fd = nix::sys::memfd::memfd_create(&cname, nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)?;
    nix::unistd::ftruncate(&fd, REGION_SIZE as libc::off_t)?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_mappings_of_one_memfd_see_one_state() {
        let fd = create_region("baton-test").unwrap();
        let a = Shared::from_fd(&fd, 42, 3).unwrap();
        let b = Shared::from_fd(&fd, 42, 3).unwrap();
        drop(fd); // the mappings survive the fd
        assert!(a.pooled() && b.pooled());
        assert!(a.slot(1).unwrap().set_down(true));
        assert!(b.slot(1).unwrap().is_down());
        assert!(
            !b.slot(1).unwrap().set_down(true),
            "one transition, one winner"
        );
        b.slot(2).unwrap().fails.fetch_add(5, Ordering::AcqRel);
        assert_eq!(a.slot(2).unwrap().fails.load(Ordering::Acquire), 5);
        assert!(a.slot(3).is_none());
    }

    #[test]
    fn one_probe_lease_per_interval() {
        let fd = create_region("baton-test").unwrap();
        let a = Shared::from_fd(&fd, 7, 1).unwrap();
        let b = Shared::from_fd(&fd, 7, 1).unwrap();
        let now = now_ms();
        assert!(a.slot(0).unwrap().try_lease(now, 1000));
        assert!(!b.slot(0).unwrap().try_lease(now, 1000));
        assert!(!b.slot(0).unwrap().try_lease(now + 999, 1000));
        assert!(b.slot(0).unwrap().try_lease(now + 1000, 1000));
        assert!(!a.slot(0).unwrap().try_lease(now + 1500, 1000));
    }

    #[test]
    fn another_configuration_takes_the_region_over() {
        let fd = create_region("baton-test").unwrap();
        let mut old = Shared::from_fd(&fd, 1, 2).unwrap();
        old.slot(0).unwrap().set_down(true);
        let new = Shared::from_fd(&fd, 2, 2).unwrap();
        assert!(
            !new.slot(0).unwrap().is_down(),
            "state of another list is not inherited"
        );
        assert!(old.refresh().unwrap(), "the old worker notices");
        assert!(!old.pooled());
        // From now on they do not share.
        old.slot(1).unwrap().set_down(true);
        assert!(!new.slot(1).unwrap().is_down());
        // Same hash, another slot count: not the same configuration either.
        let other = Shared::from_fd(&fd, 2, 1).unwrap();
        let mut new = new;
        assert!(new.refresh().unwrap());
        assert!(other.pooled());
    }

    #[test]
    fn a_forked_child_writes_what_the_parent_reads() {
        let fd = create_region("baton-test").unwrap();
        let a = Shared::from_fd(&fd, 9, 1).unwrap();
        // SAFETY: the child only does atomic stores and _exit (no
        // allocation, no lock), which is safe after fork in a threaded
        // process.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                if let Some(s) = a.slot(0) {
                    s.fails.store(11, Ordering::Release);
                    s.set_down(true);
                }
                // SAFETY: ends the child without running the parent's
                // destructors or test harness.
                unsafe { libc::_exit(0) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).unwrap();
            }
        }
        let s = a.slot(0).unwrap();
        assert_eq!(s.fails.load(Ordering::Acquire), 11);
        assert!(s.is_down());
    }

    #[test]
    fn private_regions_and_limits() {
        let a = Shared::anonymous(1, 4).unwrap();
        let b = Shared::anonymous(1, 4).unwrap();
        assert!(!a.pooled());
        a.slot(0).unwrap().set_down(true);
        assert!(!b.slot(0).unwrap().is_down());
        assert!(matches!(
            Shared::anonymous(1, MAX_SLOTS + 1),
            Err(SharedError::TooManySlots(_))
        ));
        assert!(Shared::anonymous(1, MAX_SLOTS)
            .unwrap()
            .slot(MAX_SLOTS - 1)
            .is_some());
        let small =
            nix::sys::memfd::memfd_create(c"small", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
                .unwrap();
        nix::unistd::ftruncate(&small, 4096).unwrap();
        assert!(matches!(
            Shared::from_fd(&small, 1, 1),
            Err(SharedError::TooSmall { .. })
        ));
    }
}
