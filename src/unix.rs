//! Local Unix sockets of the acceptor (the worker socket and the control
//! socket): binding with a stale-file check, access mode, peer credentials.
//! Each OS call is wrapped once here.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};

/// Who is on the other end of a local socket, from SO_PEERCRED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// A listening Unix socket whose file is removed when it is dropped.
#[derive(Debug)]
pub struct UnixListener {
    pub fd: OwnedFd,
    pub path: PathBuf,
}

impl UnixListener {
    /// Binds `path` (non-blocking, close-on-exec) with file mode `mode`.
    ///
    /// A socket file left by a process that is gone is replaced; one that a
    /// live process still listens on is an error (`AddrInUse`), and so is
    /// any path that is not a socket.
    pub fn bind(path: &Path, ty: SockType, mode: u32) -> io::Result<UnixListener> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            let probe = socket::socket(AddressFamily::Unix, ty, SockFlag::SOCK_CLOEXEC, None)?;
            let addr = UnixAddr::new(path)?;
            match socket::connect(probe.as_raw_fd(), &addr) {
                Ok(()) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("{} is in use by a running process", path.display()),
                    ))
                }
                Err(_) => std::fs::remove_file(path)?,
            }
        }
        let fd = socket::socket(
            AddressFamily::Unix,
            ty,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        let addr = UnixAddr::new(path)?;
        socket::bind(fd.as_raw_fd(), &addr)?;
        // From here on the file is ours: remove it if anything below fails.
        let l = UnixListener {
            fd,
            path: path.to_path_buf(),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        socket::listen(&l.fd, Backlog::new(128).unwrap_or(Backlog::MAXCONN))?;
        Ok(l)
    }

    /// Accepts one pending connection (non-blocking, close-on-exec), with
    /// its peer's credentials. `WouldBlock` when none is pending.
    pub fn accept(&self) -> io::Result<(OwnedFd, Peer)> {
        let raw = socket::accept4(
            self.fd.as_raw_fd(),
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )?;
        // SAFETY: accept4 just returned this fd and nothing else owns it.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        let peer = peer_cred(&fd)?;
        Ok((fd, peer))
    }
}

impl Drop for UnixListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The credentials of a connected Unix socket's peer.
pub fn peer_cred(fd: &OwnedFd) -> io::Result<Peer> {
    let c = socket::getsockopt(fd, sockopt::PeerCredentials)?;
    Ok(Peer {
        pid: c.pid(),
        uid: c.uid(),
        gid: c.gid(),
    })
}

/// Whether `uid` may use a socket of a process running as `own_uid`: root,
/// the same user, or one of the `allowed` uids.
pub fn uid_allowed(uid: u32, own_uid: u32, allowed: &[u32]) -> bool {
    uid == 0 || uid == own_uid || allowed.contains(&uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_socket_is_replaced_and_live_one_refused() {
        let dir = std::env::temp_dir().join(format!("baton-unix-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let l = UnixListener::bind(&path, SockType::Stream, 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = UnixListener::bind(&path, SockType::Stream, 0o600).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        drop(l);
        // A stale file: std's listener leaves its file behind when dropped.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let l2 = UnixListener::bind(&path, SockType::Stream, 0o600).unwrap();
        let c = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let (_, peer) = l2.accept().unwrap();
        assert_eq!(peer.pid, std::process::id() as i32);
        drop(c);
        drop(l2);
        assert!(!path.exists(), "file removed on drop");
        std::fs::write(&path, b"not a socket").unwrap();
        let e = UnixListener::bind(&path, SockType::Stream, 0o600).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn uid_policy() {
        assert!(uid_allowed(0, 1000, &[]));
        assert!(uid_allowed(1000, 1000, &[]));
        assert!(!uid_allowed(1001, 1000, &[]));
        assert!(uid_allowed(1001, 1000, &[1001]));
    }
}
