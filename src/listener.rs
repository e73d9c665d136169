//! Listening sockets, bound with socket2 and handed to mio.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Binds a non-blocking, close-on-exec TCP listener on `addr` with
/// SO_REUSEADDR and the given backlog. An IPv6 listener is IPv6-only, so
/// that `[::]:80` and `0.0.0.0:80` can be listed side by side.
pub fn bind(addr: SocketAddr, backlog: i32) -> io::Result<mio::net::TcpListener> {
    // socket2 creates sockets with SOCK_CLOEXEC on Linux.
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(mio::net::TcpListener::from_std(socket.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_port_zero_and_refuses_a_taken_port() {
        let l = bind("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let a = l.local_addr().unwrap();
        assert_ne!(a.port(), 0);
        let e = bind(a, 16).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
    }
}
