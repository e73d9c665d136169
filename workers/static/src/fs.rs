//! Opening files beneath the root directory, and nowhere else.
//!
//! The root is opened once, as a directory fd. Every request path (already
//! decoded and stripped of `..` by [`crate::path`]) is opened relative to
//! that fd, by one of two resolvers that give the same answers:
//!
//! * [`Resolver::Openat2`]: `openat2(2)` with `RESOLVE_BENEATH |
//!   RESOLVE_NO_MAGICLINKS`. The kernel refuses any resolution that leaves
//!   the directory, through `..`, an absolute or relative symlink, or a
//!   `/proc` magic link.
//! * [`Resolver::Walk`]: the same rule enforced in user space, for where
//!   `openat2` is refused. baton's default seccomp profile answers it with
//!   `ENOSYS` (its flags sit in a struct a filter cannot inspect), and so do
//!   kernels before 5.6. The path is walked one component at a time, each
//!   opened with `O_NOFOLLOW` relative to the directory fd before it
//!   (`O_PATH | O_DIRECTORY` in the middle, for reading at the end); a
//!   symlink, which such an open refuses, is read (`readlinkat`) and its
//!   target resolved the same way from where it sits: an absolute target,
//!   or a `..` that would climb above the root, is refused (`EXDEV`, like
//!   `RESOLVE_BENEATH`), and more than [`MAX_LINKS`] links is `ELOOP`. The
//!   directories passed are held as fds, so a rename cannot move the walk
//!   elsewhere, and nothing is ever opened by following a link.
//!
//! The resolver is picked at start-up and switches to the walk for good if
//! `openat2` later answers `ENOSYS`/`EPERM` (a filter installed after the
//! probe).
//!
//! Files are opened `O_NONBLOCK` so that a FIFO under the root cannot block
//! the worker in `open`; only regular files and directories are served.

use std::borrow::Cow;
use std::cell::Cell;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{self, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{self, FileStat, Mode, SFlag};

/// The most symlinks one lookup may follow (the kernel's limit too).
pub const MAX_LINKS: u32 = 40;

/// Why the root directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("cannot open the root directory {path}: {source}")]
    Open { path: PathBuf, source: Errno },
}

/// How files are opened beneath the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolver {
    /// `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`.
    Openat2,
    /// Component by component in user space, symlinks resolved beneath
    /// the root.
    Walk,
}

/// An open file and what `fstat` said about it.
#[derive(Debug)]
pub struct Opened {
    pub file: File,
    pub stat: FileStat,
}

fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
}

impl Opened {
    pub fn is_dir(&self) -> bool {
        kind(&self.stat) == SFlag::S_IFDIR
    }
    pub fn is_file(&self) -> bool {
        kind(&self.stat) == SFlag::S_IFREG
    }
}

/// The directory being served.
#[derive(Debug)]
pub struct Root {
    dir: OwnedFd,
    resolver: Cell<Resolver>,
}

const FILE_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_CLOEXEC)
    .union(OFlag::O_NONBLOCK)
    .union(OFlag::O_NOCTTY);

/// An intermediate component: a directory, never followed if a symlink.
const DIR_FLAGS: OFlag = OFlag::O_PATH
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful open call in this
    // module and is owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn retry<T>(mut f: impl FnMut() -> Result<T, Errno>) -> Result<T, Errno> {
    loop {
        match f() {
            Err(Errno::EINTR) => continue,
            r => return r,
        }
    }
}

impl Root {
    /// Opens `path` as the root and picks the resolver the kernel allows.
    pub fn open(path: &Path) -> Result<Root, RootError> {
        let fd = fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|source| RootError::Open {
            path: path.to_owned(),
            source,
        })?;
        let root = Root {
            dir: own(fd),
            resolver: Cell::new(Resolver::Openat2),
        };
        match root.openat2(b".") {
            Ok(_) => {}
            Err(Errno::ENOSYS) | Err(Errno::EPERM) => root.resolver.set(Resolver::Walk),
            Err(source) => {
                return Err(RootError::Open {
                    path: path.to_owned(),
                    source,
                })
            }
        }
        Ok(root)
    }

    /// Forces a resolver (for tests of the fallback).
    pub fn with_resolver(self, resolver: Resolver) -> Root {
        self.resolver.set(resolver);
        self
    }

    pub fn resolver(&self) -> Resolver {
        self.resolver.get()
    }

    /// Opens `rel` (relative, normalised, no `..`; empty for the root itself)
    /// beneath the root and `fstat`s it.
    pub fn open_file(&self, rel: &[u8]) -> Result<Opened, Errno> {
        let fd = match self.resolver.get() {
            Resolver::Openat2 => match self.openat2(if rel.is_empty() { b"." } else { rel }) {
                Err(Errno::ENOSYS) | Err(Errno::EPERM) => {
                    tracing::info!(
                        "openat2 is refused here (seccomp?): resolving paths beneath the root \
                         in user space from now on"
                    );
                    self.resolver.set(Resolver::Walk);
                    self.walk(rel)?
                }
                r => r?,
            },
            Resolver::Walk => self.walk(rel)?,
        };
        let stat = stat::fstat(fd.as_raw_fd())?;
        Ok(Opened {
            file: File::from(fd),
            stat,
        })
    }

    fn openat2(&self, rel: &[u8]) -> Result<OwnedFd, Errno> {
        let how = OpenHow::new()
            .flags(FILE_FLAGS)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        loop {
            match fcntl::openat2(self.dir.as_raw_fd(), rel, how) {
                Ok(fd) => return Ok(own(fd)),
                // openat2 answers EAGAIN when a concurrent rename raced the
                // lookup; retrying is what the man page prescribes.
                Err(Errno::EINTR) | Err(Errno::EAGAIN) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The user-space resolver (see the module docs). Without symlinks on
    /// the way it costs one `openat` per component, like the kernel's walk:
    /// a symlink shows up as the open's refusal (`ENOTDIR`/`ELOOP` under
    /// `O_NOFOLLOW`), and only then is it read.
    fn walk(&self, rel: &[u8]) -> Result<OwnedFd, Errno> {
        // The path left to resolve: the request's own bytes until a symlink
        // is met, then that link's target followed by the rest.
        let mut path: Cow<'_, [u8]> = Cow::Borrowed(rel);
        let mut pos = 0;
        // Directories entered below the root, innermost last.
        let mut dirs: Vec<OwnedFd> = Vec::new();
        let mut links = 0;
        while let Some((comp, next)) = next_component(&path, pos) {
            pos = next;
            let cur = dirs.last().unwrap_or(&self.dir).as_raw_fd();
            if comp == b".." {
                // Only a symlink's target can say `..` (request paths have
                // none): climbing above the root is refused.
                dirs.pop().ok_or(Errno::EXDEV)?;
                continue;
            }
            let last = next_component(&path, pos).is_none();
            let flags = if last {
                FILE_FLAGS | OFlag::O_NOFOLLOW
            } else {
                DIR_FLAGS
            };
            match retry(|| fcntl::openat(Some(cur), comp, flags, Mode::empty())) {
                Ok(fd) if last => return Ok(own(fd)),
                Ok(fd) => dirs.push(own(fd)),
                Err(e @ (Errno::ENOTDIR | Errno::ELOOP)) => {
                    // A symlink, or (ENOTDIR) a file in the middle of the path.
                    let target = match fcntl::readlinkat(Some(cur), comp) {
                        Ok(t) => t,
                        Err(Errno::EINVAL) => return Err(e),
                        Err(other) => return Err(other),
                    };
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(Errno::ELOOP);
                    }
                    let target = target.as_bytes();
                    if target.first() == Some(&b'/') {
                        return Err(Errno::EXDEV);
                    }
                    let mut joined = Vec::with_capacity(target.len() + 1 + path.len() - pos);
                    joined.extend_from_slice(target);
                    joined.push(b'/');
                    joined.extend_from_slice(&path[pos..]);
                    path = Cow::Owned(joined);
                    pos = 0;
                }
                Err(e) => return Err(e),
            }
        }
        // The path ended at a directory (the root itself, or a `..`).
        let cur = dirs.last().unwrap_or(&self.dir).as_raw_fd();
        retry(|| fcntl::openat(Some(cur), ".", FILE_FLAGS, Mode::empty())).map(own)
    }
}

/// The next component of `path` at or after `pos` that is neither empty
/// nor `.`, and the position after it.
fn next_component(path: &[u8], mut pos: usize) -> Option<(&[u8], usize)> {
    while pos < path.len() {
        let end = path[pos..]
            .iter()
            .position(|&b| b == b'/')
            .map_or(path.len(), |i| pos + i);
        let comp = &path[pos..end];
        pos = end + 1;
        if !comp.is_empty() && comp != b"." {
            return Some((comp, pos.min(path.len())));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("baton-static-fs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("www/sub/deep")).unwrap();
        std::fs::write(d.join("secret"), "secret").unwrap();
        std::fs::write(d.join("www/a.txt"), "a").unwrap();
        std::fs::write(d.join("www/sub/deep/b.txt"), "b").unwrap();
        symlink("../secret", d.join("www/out")).unwrap();
        symlink("/etc/passwd", d.join("www/abs")).unwrap();
        symlink("a.txt", d.join("www/in")).unwrap();
        symlink("sub/deep", d.join("www/deeplink")).unwrap();
        symlink("../../a.txt", d.join("www/sub/deep/up")).unwrap();
        symlink("../../../secret", d.join("www/sub/deep/upout")).unwrap();
        symlink("loop2", d.join("www/loop1")).unwrap();
        symlink("loop1", d.join("www/loop2")).unwrap();
        symlink("in", d.join("www/chain")).unwrap();
        symlink("..", d.join("www/sub/parent")).unwrap();
        d
    }

    /// Both resolvers must give the same answers.
    fn check(root: &Root) {
        let read = |rel: &[u8]| {
            let o = root.open_file(rel).unwrap();
            assert!(o.is_file(), "{:?}", String::from_utf8_lossy(rel));
            std::io::read_to_string(o.file).unwrap()
        };
        assert_eq!(read(b"a.txt"), "a");
        assert_eq!(read(b"in"), "a");
        assert_eq!(read(b"chain"), "a");
        assert_eq!(read(b"deeplink/b.txt"), "b");
        assert_eq!(read(b"sub/deep/up"), "a");
        assert_eq!(read(b"deeplink/up"), "a");
        assert_eq!(read(b"sub/parent/a.txt"), "a");
        assert!(root.open_file(b"").unwrap().is_dir());
        assert!(root.open_file(b"sub").unwrap().is_dir());
        assert!(root.open_file(b"deeplink").unwrap().is_dir());
        assert!(root.open_file(b"sub/parent").unwrap().is_dir());
        assert_eq!(root.open_file(b"out").unwrap_err(), Errno::EXDEV);
        assert_eq!(root.open_file(b"abs").unwrap_err(), Errno::EXDEV);
        assert_eq!(root.open_file(b"sub/deep/upout").unwrap_err(), Errno::EXDEV);
        assert_eq!(root.open_file(b"../secret").unwrap_err(), Errno::EXDEV);
        assert_eq!(root.open_file(b"loop1").unwrap_err(), Errno::ELOOP);
        assert_eq!(root.open_file(b"nope").unwrap_err(), Errno::ENOENT);
        assert_eq!(root.open_file(b"a.txt/x").unwrap_err(), Errno::ENOTDIR);
    }

    #[test]
    fn openat2_stays_beneath() {
        let d = tmp("o2");
        let root = Root::open(&d.join("www")).unwrap();
        assert_eq!(root.resolver(), Resolver::Openat2);
        check(&root);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn the_user_space_walk_stays_beneath_too() {
        let d = tmp("walk");
        let root = Root::open(&d.join("www"))
            .unwrap()
            .with_resolver(Resolver::Walk);
        check(&root);
        let _ = std::fs::remove_dir_all(d);
    }
}
