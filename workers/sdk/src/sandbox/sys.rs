//! Every system call the sandbox makes, each wrapped once with its errno
//! mapped to [`Errno`]. Nothing here decides policy; `apply` and the audit
//! probe do.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;

/// Turns a `-1`-and-errno return into a `Result`.
fn check(ret: libc::c_long) -> Result<libc::c_long, Errno> {
    if ret == -1 {
        Err(Errno::last())
    } else {
        Ok(ret)
    }
}

fn cpath(p: &Path) -> Result<CString, Errno> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)
}

/// `(real, effective, saved)` user ids.
pub fn getresuid() -> (u32, u32, u32) {
    let r = nix::unistd::getresuid().unwrap_or_else(|_| {
        // getresuid cannot fail with valid pointers; fall back to what
        // getuid/geteuid say, with the saved id taken as the effective one.
        let e = nix::unistd::geteuid();
        nix::unistd::ResUid {
            real: nix::unistd::getuid(),
            effective: e,
            saved: e,
        }
    });
    (r.real.as_raw(), r.effective.as_raw(), r.saved.as_raw())
}

/// `(real, effective, saved)` group ids.
pub fn getresgid() -> (u32, u32, u32) {
    let r = nix::unistd::getresgid().unwrap_or_else(|_| {
        let e = nix::unistd::getegid();
        nix::unistd::ResGid {
            real: nix::unistd::getgid(),
            effective: e,
            saved: e,
        }
    });
    (r.real.as_raw(), r.effective.as_raw(), r.saved.as_raw())
}

/// The supplementary groups.
pub fn getgroups() -> Result<Vec<u32>, Errno> {
    Ok(nix::unistd::getgroups()?
        .into_iter()
        .map(|g| g.as_raw())
        .collect())
}

/// `setgroups(2)` with exactly `groups`.
pub fn setgroups(groups: &[u32]) -> Result<(), Errno> {
    let g: Vec<nix::unistd::Gid> = groups
        .iter()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&g)
}

/// `setresgid(g, g, g)` (glibc applies it to every thread).
pub fn setresgid(g: u32) -> Result<(), Errno> {
    let g = nix::unistd::Gid::from_raw(g);
    nix::unistd::setresgid(g, g, g)
}

/// `setresuid(u, u, u)` (glibc applies it to every thread).
pub fn setresuid(u: u32) -> Result<(), Errno> {
    let u = nix::unistd::Uid::from_raw(u);
    nix::unistd::setresuid(u, u, u)
}

/// The raw `setuid(2)` system call, for this thread only: what an attacker
/// would try. Used to prove it fails.
pub fn raw_setuid(u: u32) -> Result<(), Errno> {
    // SAFETY: setuid takes one integer argument and touches no memory.
    check(unsafe { libc::syscall(libc::SYS_setuid, libc::c_long::from(u)) }).map(drop)
}

/// The raw `setgid(2)` system call, for this thread only.
pub fn raw_setgid(g: u32) -> Result<(), Errno> {
    // SAFETY: setgid takes one integer argument and touches no memory.
    check(unsafe { libc::syscall(libc::SYS_setgid, libc::c_long::from(g)) }).map(drop)
}

/// The raw `setgroups(2)` system call, for this thread only.
pub fn raw_setgroups(groups: &[u32]) -> Result<(), Errno> {
    // SAFETY: the kernel reads `groups.len()` gid_t values from a pointer to
    // a live slice of u32 (gid_t is u32 on Linux).
    check(unsafe {
        libc::syscall(
            libc::SYS_setgroups,
            groups.len() as libc::c_long,
            groups.as_ptr(),
        )
    })
    .map(drop)
}

/// `fcntl(fd, F_GETFD)`: whether `fd` is open.
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD on any integer only reads the fd table.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// `close_range(first, last, 0)`.
fn close_range(first: u32, last: u32) -> Result<(), Errno> {
    // SAFETY: close_range only closes descriptors; the caller makes sure no
    // live Rust object owns one of them (see `close_fds_except`).
    check(unsafe {
        libc::syscall(
            libc::SYS_close_range,
            libc::c_long::from(first),
            libc::c_long::from(last),
            0 as libc::c_long,
        )
    })
    .map(drop)
}

/// Closes every descriptor above 2 that is not in `keep`.
///
/// Uses `close_range(2)` between the kept fds; where the kernel lacks it
/// (before 5.9) falls back to closing what `/proc/self/fd` lists.
///
/// Must run before the program opens anything it wants to keep: a Rust
/// object owning a descriptor closed here would be left dangling. `apply`
/// runs first thing in `main`, when nothing is open but inherited fds.
pub fn close_fds_except(keep: &[RawFd]) -> Result<(), Errno> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter(|fd| **fd > 2)
        .map(|fd| *fd as u32)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut first = 3u32;
    let mut ranges = Vec::new();
    for k in &keep {
        if *k > first {
            ranges.push((first, *k - 1));
        }
        first = k + 1;
    }
    ranges.push((first, u32::MAX));
    let mut result = Ok(());
    for (a, b) in &ranges {
        result = close_range(*a, *b);
        if result.is_err() {
            break;
        }
    }
    match result {
        Ok(()) => Ok(()),
        Err(Errno::ENOSYS) => close_listed_fds(&keep),
        Err(e) => Err(e),
    }
}

fn close_listed_fds(keep: &[u32]) -> Result<(), Errno> {
    let dir = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let fds: Vec<RawFd> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // `dir` is dropped here: its own fd is closed before we close the rest
    // (if it appears in `fds`, closing it again below just fails with EBADF).
    for fd in fds {
        if fd > 2 && !keep.contains(&(fd as u32)) {
            // SAFETY: as in `close_range`: nothing live owns these fds.
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

/// Lists open descriptors below `limit` without opening anything, by
/// asking `poll(2)` about each (closed fds come back `POLLNVAL`). Works
/// inside a chroot without `/proc`.
pub fn open_fds(limit: u64) -> Result<Vec<RawFd>, Errno> {
    const BATCH: usize = 1024;
    let limit = limit.min(1 << 22) as usize;
    let mut open = Vec::new();
    let mut start = 0usize;
    while start < limit {
        let n = BATCH.min(limit - start);
        let mut pfds: Vec<libc::pollfd> = (start..start + n)
            .map(|fd| libc::pollfd {
                fd: fd as RawFd,
                events: 0,
                revents: 0,
            })
            .collect();
        // SAFETY: `pfds` is a live, writable array of `n` pollfd structs;
        // a zero timeout never blocks.
        check(unsafe { libc::poll(pfds.as_mut_ptr(), n as libc::nfds_t, 0) }.into())?;
        open.extend(
            pfds.iter()
                .filter(|p| p.revents & libc::POLLNVAL == 0)
                .map(|p| p.fd),
        );
        start += n;
    }
    Ok(open)
}

/// `unshare(2)` with `CLONE_NEW*` flags.
pub fn unshare(flags: libc::c_int) -> Result<(), Errno> {
    // SAFETY: unshare takes flags only.
    check(unsafe { libc::unshare(flags) }.into()).map(drop)
}

/// `mount(NULL, "/", NULL, MS_REC|MS_PRIVATE, NULL)`: stop mount events
/// propagating between a new mount namespace and the one it came from.
pub fn make_mounts_private() -> Result<(), Errno> {
    // SAFETY: the target is a NUL-terminated static string; the other
    // pointers are NULL, which mount(2) accepts for a propagation change.
    check(
        unsafe {
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        }
        .into(),
    )
    .map(drop)
}

/// `chroot(2)`.
pub fn chroot(dir: &Path) -> Result<(), Errno> {
    let c = cpath(dir)?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    check(unsafe { libc::chroot(c.as_ptr()) }.into()).map(drop)
}

/// `chdir(2)`.
pub fn chdir(dir: &Path) -> Result<(), Errno> {
    nix::unistd::chdir(dir)
}

/// `(st_dev, st_ino)` of a path (following symlinks).
pub fn dev_ino(p: &Path) -> Result<(u64, u64), Errno> {
    let st = nix::sys::stat::stat(p)?;
    Ok((st.st_dev, st.st_ino))
}

/// `prctl(2)` with integer arguments.
pub fn prctl(op: libc::c_int, a2: libc::c_ulong) -> Result<libc::c_int, Errno> {
    // SAFETY: every prctl this module makes takes integer arguments only;
    // the unused ones must be zero.
    let r = unsafe {
        libc::prctl(
            op,
            a2,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    check(r.into()).map(|r| r as libc::c_int)
}

/// `prctl(PR_CAP_AMBIENT, sub, cap)`.
fn prctl_ambient(sub: libc::c_int, cap: libc::c_ulong) -> Result<libc::c_int, Errno> {
    // SAFETY: integer arguments only.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            sub as libc::c_ulong,
            cap,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    check(r.into()).map(|r| r as libc::c_int)
}

/// Capability numbers (`linux/capability.h`) this module tests for.
pub const CAP_SETGID: u32 = 6;
pub const CAP_SETPCAP: u32 = 8;
pub const CAP_SYS_CHROOT: u32 = 18;
pub const CAP_SYS_ADMIN: u32 = 21;

/// The highest capability number the kernel can report: every bounding
/// and ambient loop runs until the kernel says EINVAL, so capabilities
/// newer than this library are still covered.
const CAP_SCAN: u32 = 64;

/// Drops every capability from the bounding set (needs `CAP_SETPCAP`).
pub fn drop_bounding_set() -> Result<(), (u32, Errno)> {
    for cap in 0..CAP_SCAN {
        match prctl(libc::PR_CAPBSET_DROP, cap.into()) {
            Ok(_) => {}
            Err(Errno::EINVAL) => return Ok(()),
            Err(e) => return Err((cap, e)),
        }
    }
    Ok(())
}

/// The bounding set as a bit mask (bit n = capability n).
pub fn bounding_set() -> Result<u64, Errno> {
    let mut mask = 0u64;
    for cap in 0..CAP_SCAN {
        match prctl(libc::PR_CAPBSET_READ, cap.into()) {
            Ok(1) => mask |= 1 << cap,
            Ok(_) => {}
            Err(Errno::EINVAL) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(mask)
}

/// Clears the ambient set (`EINVAL` on kernels before 4.3, which have none).
pub fn clear_ambient() -> Result<(), Errno> {
    match prctl_ambient(libc::PR_CAP_AMBIENT_CLEAR_ALL, 0) {
        Ok(_) | Err(Errno::EINVAL) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The ambient set as a bit mask (0 on kernels without ambient caps).
pub fn ambient_set() -> Result<u64, Errno> {
    let mut mask = 0u64;
    for cap in 0..CAP_SCAN {
        match prctl_ambient(libc::PR_CAP_AMBIENT_IS_SET, cap.into()) {
            Ok(1) => mask |= 1 << cap,
            Ok(_) => {}
            Err(Errno::EINVAL) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(mask)
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets in two 32-bit halves.
const CAP_V3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// This thread's capability sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapSets {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
}

/// `capget(2)` for the calling thread.
pub fn capget() -> Result<CapSets, Errno> {
    let mut hdr = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: version 3 makes the kernel write exactly two CapData structs,
    // which `data` has room for; both pointers are to live locals.
    check(unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut hdr as *mut CapHeader,
            data.as_mut_ptr(),
        )
    })?;
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok(CapSets {
        effective: join(data[0].effective, data[1].effective),
        permitted: join(data[0].permitted, data[1].permitted),
        inheritable: join(data[0].inheritable, data[1].inheritable),
    })
}

/// `capset(2)` with every set empty, for the calling thread (lowering is
/// always allowed).
pub fn clear_caps() -> Result<(), Errno> {
    let mut hdr = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: version 3 makes the kernel read exactly two CapData structs
    // from `data`; both pointers are to live locals.
    check(unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) })
        .map(drop)
}

/// The securebits we lock once privileged (needs `CAP_SETPCAP`): root gets
/// no capabilities back through execve (`NOROOT`), `KEEP_CAPS` stays off so
/// that setuid away from root clears every set (`KEEP_CAPS_LOCKED`), the
/// setuid fix-up cannot be disabled (`NO_SETUID_FIXUP_LOCKED`), and ambient
/// capabilities can never be raised again.
pub fn lock_securebits() -> Result<(), Errno> {
    let bits = libc::SECBIT_NOROOT
        | libc::SECBIT_NOROOT_LOCKED
        | libc::SECBIT_NO_SETUID_FIXUP_LOCKED
        | libc::SECBIT_KEEP_CAPS_LOCKED
        | libc::SECBIT_NO_CAP_AMBIENT_RAISE
        | libc::SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;
    prctl(libc::PR_SET_SECUREBITS, bits as libc::c_ulong).map(drop)
}

/// `prctl(PR_SET_NO_NEW_PRIVS, 1)`.
pub fn set_no_new_privs() -> Result<(), Errno> {
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1).map(drop)
}

/// `prctl(PR_GET_NO_NEW_PRIVS)`.
pub fn no_new_privs() -> Result<bool, Errno> {
    prctl(libc::PR_GET_NO_NEW_PRIVS, 0).map(|v| v == 1)
}

/// `prctl(PR_GET_SECCOMP)`: 0 off, 2 filter (strict mode would kill us).
pub fn seccomp_mode() -> Result<libc::c_int, Errno> {
    prctl(libc::PR_GET_SECCOMP, 0)
}

/// `getrlimit(2)` as `(soft, hard)`.
pub fn getrlimit(r: nix::sys::resource::Resource) -> Result<(u64, u64), Errno> {
    nix::sys::resource::getrlimit(r)
}

/// `setrlimit(2)`.
pub fn setrlimit(r: nix::sys::resource::Resource, soft: u64, hard: u64) -> Result<(), Errno> {
    nix::sys::resource::setrlimit(r, soft, hard)
}

/// The raw `getppid(2)` system call, which the kernel never refuses: if it
/// fails, only seccomp can have refused it.
pub fn raw_getppid() -> Result<libc::c_long, Errno> {
    // SAFETY: no arguments.
    check(unsafe { libc::syscall(libc::SYS_getppid) })
}

/// `socket(2)`, returning the raw fd (the caller closes it).
pub fn socket(domain: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> Result<RawFd, Errno> {
    // SAFETY: integer arguments only.
    check(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) }.into())
        .map(|fd| fd as RawFd)
}

/// `close(2)` of an fd this module returned.
pub fn close(fd: RawFd) {
    // SAFETY: only called on fds this process just created and owns alone.
    unsafe { libc::close(fd) };
}

/// `bind(2)` or `connect(2)`: both take a socket, an address and its length.
type AddrCall =
    unsafe extern "C" fn(libc::c_int, *const libc::sockaddr, libc::socklen_t) -> libc::c_int;

/// Calls `call` (bind or connect) on `fd` with the IPv4 address `ip:port`.
fn with_v4(call: AddrCall, fd: RawFd, ip: std::net::Ipv4Addr, port: u16) -> Result<(), Errno> {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `call` is bind or connect; `sin` is a valid sockaddr_in that
    // outlives the call, and the length passed is its size.
    check(
        unsafe {
            call(
                fd,
                &sin as *const libc::sockaddr_in as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        .into(),
    )
    .map(drop)
}

/// `connect(2)` of an IPv4 socket to `127.0.0.1:port`.
pub fn connect_loopback_v4(fd: RawFd, port: u16) -> Result<(), Errno> {
    with_v4(libc::connect, fd, std::net::Ipv4Addr::LOCALHOST, port)
}

/// `listen(2)` with a backlog of 1.
pub fn listen(fd: RawFd) -> Result<(), Errno> {
    // SAFETY: integer arguments only.
    check(unsafe { libc::listen(fd, 1) }.into()).map(drop)
}

/// `bind(2)` of an IPv4 socket to `0.0.0.0:port`.
pub fn bind_any_v4(fd: RawFd, port: u16) -> Result<(), Errno> {
    with_v4(libc::bind, fd, std::net::Ipv4Addr::UNSPECIFIED, port)
}

/// `ptrace(PTRACE_SEIZE, pid)`: the same permission check as
/// `PTRACE_ATTACH` (both go through the kernel's `ptrace_attach()`), but
/// the target is not stopped should it succeed.
pub fn ptrace_seize(pid: libc::pid_t) -> Result<(), Errno> {
    // SAFETY: PTRACE_SEIZE with null addr and data touches no memory of ours.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_SEIZE,
            pid,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    })
    .map(drop)
}

/// `ptrace(PTRACE_DETACH, pid)`, best effort.
pub fn ptrace_detach(pid: libc::pid_t) {
    // SAFETY: as above.
    unsafe {
        libc::ptrace(
            libc::PTRACE_DETACH,
            pid,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
}

/// Tries to create a child process; a child that is created exits at once
/// and is reaped. Returns `Ok(())` if a child could be created.
pub fn try_fork() -> Result<(), Errno> {
    // SAFETY: the child calls only `_exit`, which is async-signal-safe, so
    // forking from a (possibly) multi-threaded process is sound.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(Errno::last()),
        0 => {
            // SAFETY: leave the child at once, running no destructor or handler.
            unsafe { libc::_exit(0) }
        }
        pid => {
            let mut status = 0;
            // SAFETY: `status` is a live local; `pid` is our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            Ok(())
        }
    }
}

/// `unshare(CLONE_NEWUSER)`: the door to a user namespace in which this
/// process would hold every capability.
pub fn try_new_userns() -> Result<(), Errno> {
    unshare(libc::CLONE_NEWUSER)
}

/// `open(2)`, returning the raw fd (the caller closes it).
pub fn open(p: &Path, flags: libc::c_int, mode: libc::mode_t) -> Result<RawFd, Errno> {
    let c = cpath(p)?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    check(unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) }.into())
        .map(|fd| fd as RawFd)
}

/// `unlink(2)`, best effort.
pub fn unlink(p: &Path) {
    if let Ok(c) = cpath(p) {
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        unsafe { libc::unlink(c.as_ptr()) };
    }
}
