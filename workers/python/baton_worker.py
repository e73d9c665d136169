"""A baton worker in Python: the handoff protocol, standard library only.

baton's acceptor accepts TCP connections and hands each one, as a file
descriptor, to a worker process over an ``AF_UNIX``/``SOCK_SEQPACKET``
channel with ``SCM_RIGHTS``. This module is the worker side of that channel,
written from the protocol table in ``workers/sdk/src/proto.rs`` (the Rust
codec both the acceptor and the Rust workers use). It is also meant to be
read: the codec below is the whole protocol, and porting it to another
language needs nothing else.

Using it
========

::

    import baton_worker

    w = baton_worker.Worker.register("/run/baton-workers.sock")  # or .from_env()
    for ev in w:                      # stops after Drain or Closed
        if isinstance(ev, baton_worker.Conn):
            with ev.sock:             # already ACKed; blocking mode
                ev.sock.sendall(b"hello\\n")
            w.done(ev.id)             # after the socket is closed

``done``/``done_many`` may be called from any thread while another thread
sits in ``recv``: every message is one atomic ``sendmsg`` on a SEQPACKET
socket, so threads never interleave bytes.

Transport
=========

One ``AF_UNIX``/``SOCK_SEQPACKET`` socket per worker. SEQPACKET keeps message
boundaries and delivers a message and its fds atomically: there is no
framing layer and no partial read. A worker spawned by baton inherits its
end as the fd named by the environment variable ``BATON_CHANNEL_FD``
(:meth:`Worker.from_env`); a worker started by anyone else connects to the
acceptor's ``--worker-socket PATH`` (:meth:`Worker.register`).

The sandbox
===========

A spawned worker also finds its sandbox profile in ``BATON_SANDBOX`` and
must confine itself (user, chroot, capabilities, no_new_privs, seccomp)
before it says HELLO; the acceptor checks the result in ``/proc`` and
disconnects a worker that did not. This module cannot apply a profile (the
standard library has no seccomp), so :meth:`Worker.from_env` fails closed
with :class:`SandboxUnsupported` when the variable is set, and a worker
exits with ``EXIT_SANDBOX`` (78), which tells the acceptor not to restart
it. Spawn Python workers with ``--no-sandbox`` (as root, also
``--allow-root-workers``), or start them yourself, confined by your own
service manager, and :meth:`Worker.register` them.

Wire format (version 1)
=======================

All integers are little-endian. Every message starts with a 4-byte header::

    offset size field
    0      1    protocol version, 1
    1      1    kind (table below)
    2      2    reserved, must be 0

    kind name    direction          length  fds body (offsets from 0)
    1    HELLO   worker -> acceptor 16      0   pid u32 @4, capacity u32 @8
                                                (0: no limit of its own),
                                                flags u32 @12 (must be 0)
    2    WELCOME acceptor -> worker 8       0   worker id u32 @4
    3    CONN    acceptor -> worker 64      1   conn id u64 @4,
                                                listener index u16 @12,
                                                reserved u16 @14 (0),
                                                peer addr @16, local addr @40
    4    ACK     worker -> acceptor 8+8n    0   n u16 @4 (1..=64),
                                                reserved u16 @6 (0),
                                                n x conn id u64 @8
    5    DONE    worker -> acceptor 8+8n    0   same layout as ACK
    6    DRAIN   acceptor -> worker 4       0   none

A socket address is 24 bytes: family u8 (4 or 6) @0, reserved u8 @1 (0),
port u16 @2, IPv6 scope id u32 @4, address @8 (16 bytes; an IPv4 address
uses the first 4 and the rest, like its scope id, are 0). In Python an
address is the tuple ``socket.getpeername()`` returns: ``(host, port)`` for
IPv4, ``(host, port, flowinfo, scope_id)`` for IPv6 (flowinfo is not on the
wire and decodes as 0).

As ``struct`` formats (``<`` is little-endian, no padding)::

    header  "<BBH"                 version, kind, reserved
    HELLO   "<BBHIII"              ..., pid, capacity, flags
    WELCOME "<BBHI"                ..., worker id
    CONN    "<BBHQHH24s24s"        ..., id, listener, reserved, peer, local
    ACK     "<BBHHH" + "Q" * n     ..., n, reserved, ids
    address "<BBHI16s"             family, reserved, port, scope, address

Rules
=====

* The worker sends HELLO first; the acceptor answers WELCOME and sends no
  CONN before that.
* Every CONN carries exactly one fd: the accepted TCP socket. The acceptor
  keeps its own copy until the worker ACKs the connection id; if the
  worker's channel closes first, the connection goes to another worker.
  This library sends the ACK before it returns the connection to the
  application, so a connection is never served twice and never lost to a
  crash before the ACK.
* The worker sends DONE once it has closed a connection. CONNs not yet DONE
  are the worker's in-flight count, which drives dispatch and capacity.
* DRAIN: no CONN follows; the worker finishes its connections and exits.
* A message with an unknown version or kind, a bad length, a non-zero
  reserved field, a count out of range, the wrong number of fds, or a
  truncated payload or control message ends the channel: the receiver
  disconnects the peer. Nothing is ever skipped. Here that is a
  :class:`ProtocolError`, after which the channel is closed.

Receiving fds safely
====================

``socket.recv_fds`` is a thin wrapper around ``recvmsg`` that, in many
Python versions (3.11 among them), ignores its ``flags`` argument (CPython
gh-107898) and offers only ``CMSG_LEN`` room. :meth:`Worker.recv` calls
``recvmsg`` itself so that it can

* pass ``MSG_CMSG_CLOEXEC``, so a received fd never leaks into a program the
  worker runs (where the platform has it);
* offer ``CMSG_SPACE`` room for 253 fds (the kernel's ``SCM_MAX_FD``, the most
  one message can carry), so the kernel never has to truncate the fds a
  peer attaches: every one of them arrives here and is closed unless it is
  the one fd of a valid CONN;
* refuse ``MSG_CTRUNC`` and ``MSG_TRUNC`` (and anything longer than the
  largest valid message, 520 bytes) instead of decoding half a message.
"""

import array
import collections
import enum
import os
import resource
import socket
import struct
import threading
from dataclasses import dataclass, field

__all__ = [
    "VERSION",
    "CHANNEL_FD_ENV",
    "WORKER_ID_ENV",
    "SANDBOX_ENV",
    "EXIT_SANDBOX",
    "MAX_IDS",
    "MAX_MSG",
    "Kind",
    "Hello",
    "Welcome",
    "ConnInfo",
    "Ack",
    "Done",
    "Drain",
    "Conn",
    "Closed",
    "WorkerError",
    "ProtocolError",
    "SandboxUnsupported",
    "encode",
    "decode",
    "id_batches",
    "Worker",
]

#: The protocol version this module speaks.
VERSION = 1
#: The environment variable naming the inherited channel fd of a spawned worker.
CHANNEL_FD_ENV = "BATON_CHANNEL_FD"
#: The environment variable naming the worker's id in the pool (informational).
WORKER_ID_ENV = "BATON_WORKER_ID"
#: The environment variable holding the sandbox profile of a spawned worker.
SANDBOX_ENV = "BATON_SANDBOX"
#: Exit status of a worker that cannot apply its sandbox (EX_CONFIG): the
#: acceptor does not restart it, since it would fail the same way again.
EXIT_SANDBOX = 78
#: The most connection ids one ACK or DONE message may carry.
MAX_IDS = 64
#: The largest valid message, in bytes (a full ACK or DONE).
MAX_MSG = 8 + 8 * MAX_IDS

#: Room for this many fds in every receive: the kernel's SCM_MAX_FD.
RECV_FDS = 253

_HDR = struct.Struct("<BBH")
_HELLO = struct.Struct("<BBHIII")
_WELCOME = struct.Struct("<BBHI")
_CONN = struct.Struct("<BBHQHH24s24s")
_IDS_HDR = struct.Struct("<BBHHH")
_ADDR = struct.Struct("<BBHI16s")

_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF


class Kind(enum.IntEnum):
    """Message kinds, as on the wire (byte 1 of the header)."""

    HELLO = 1
    WELCOME = 2
    CONN = 3
    ACK = 4
    DONE = 5
    DRAIN = 6

    @property
    def fd_count(self):
        """How many file descriptors a message of this kind carries."""
        return 1 if self is Kind.CONN else 0


class WorkerError(Exception):
    """The worker cannot talk to the acceptor (no channel, refused
    registration, no WELCOME, channel closed)."""


class ProtocolError(WorkerError):
    """A message the protocol refuses. The channel is unusable after it."""


class SandboxUnsupported(WorkerError):
    """The acceptor asked this worker to confine itself, which this module
    cannot do. Exit with ``EXIT_SANDBOX`` without serving anything."""


# ---- messages ---------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """HELLO (worker -> acceptor): ``pid`` of the worker, its ``capacity``
    (most connections it holds at once; 0 leaves the limit to the acceptor's
    ``--worker-connections``)."""

    pid: int
    capacity: int = 0
    kind = Kind.HELLO


@dataclass(frozen=True)
class Welcome:
    """WELCOME (acceptor -> worker): the worker's id in the acceptor's pool."""

    worker_id: int
    kind = Kind.WELCOME


@dataclass(frozen=True)
class ConnInfo:
    """CONN (acceptor -> worker), without its fd: the connection ``id``, the
    index of the ``listener`` that accepted it (order of ``--listen``), the
    client's address ``peer`` and the address it connected to, ``local``."""

    id: int
    listener: int
    peer: tuple
    local: tuple
    kind = Kind.CONN


@dataclass(frozen=True)
class Ack:
    """ACK (worker -> acceptor): these connections (1 to 64 ids) are taken;
    the acceptor closes its copies."""

    ids: tuple
    kind = Kind.ACK


@dataclass(frozen=True)
class Done:
    """DONE (worker -> acceptor): these connections (1 to 64 ids) are closed."""

    ids: tuple
    kind = Kind.DONE


@dataclass(frozen=True)
class Drain:
    """DRAIN (acceptor -> worker): no CONN follows; finish the connections you
    hold, then exit. Also the event :meth:`Worker.recv` returns for it."""

    kind = Kind.DRAIN


# ---- events -----------------------------------------------------------------


@dataclass(eq=False)
class Conn:
    """A connection handed over by the acceptor, already acknowledged.

    ``sock`` is the client's TCP socket as a ``socket.socket`` in blocking
    mode (the acceptor accepted it non-blocking; this module switches it so
    that the socket object and its fd agree). Close it, then report
    ``worker.done(conn.id)``.
    """

    id: int
    listener: int
    peer: tuple
    local: tuple
    sock: socket.socket = field(repr=False)


@dataclass(frozen=True)
class Closed:
    """The acceptor closed the channel: finish up and exit."""


_DRAIN = Drain()
_CLOSED = Closed()


# ---- codec ------------------------------------------------------------------


def _check_int(what, value, top):
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
        raise ValueError(f"{what} {value!r} is not an integer in 0..={top}")
    return value


def _encode_addr(addr):
    """``(host, port)`` or ``(host, port, flowinfo, scope_id)`` -> 24 bytes."""
    host, port = addr[0], _check_int("port", addr[1], _U16)
    if ":" in host:
        scope = _check_int("scope id", addr[3] if len(addr) > 3 else 0, _U32)
        return _ADDR.pack(6, 0, port, scope, socket.inet_pton(socket.AF_INET6, host))
    if len(addr) != 2:
        raise ValueError(f"IPv4 address {addr!r} must be (host, port)")
    raw = socket.inet_pton(socket.AF_INET, host) + bytes(12)
    return _ADDR.pack(4, 0, port, 0, raw)


def _decode_addr(b):
    family, reserved, port, scope, raw = _ADDR.unpack(b)
    if reserved != 0:
        raise ProtocolError("socket address has a non-zero reserved byte")
    if family == 4:
        if scope != 0 or any(raw[4:]):
            raise ProtocolError("IPv4 socket address has non-zero padding")
        return (socket.inet_ntop(socket.AF_INET, raw[:4]), port)
    if family == 6:
        return (socket.inet_ntop(socket.AF_INET6, raw), port, 0, scope)
    raise ProtocolError(f"bad socket address family {family}")


def _encode_ids(kind, ids):
    ids = tuple(ids)
    if not 1 <= len(ids) <= MAX_IDS:
        raise ValueError(
            f"{kind.name} batch of {len(ids)} ids (allowed 1..={MAX_IDS}); split it"
        )
    for i in ids:
        _check_int("connection id", i, _U64)
    return _IDS_HDR.pack(VERSION, kind, 0, len(ids), 0) + struct.pack(
        f"<{len(ids)}Q", *ids
    )


def encode(msg):
    """Encodes one message into its wire bytes.

    Raises ``ValueError`` for a message that cannot be encoded (a field out
    of range, an ACK or DONE of no id or more than ``MAX_IDS``): that is a
    bug in the caller, which must split its batches.
    """
    if isinstance(msg, Hello):
        return _HELLO.pack(
            VERSION,
            Kind.HELLO,
            0,
            _check_int("pid", msg.pid, _U32),
            _check_int("capacity", msg.capacity, _U32),
            0,
        )
    if isinstance(msg, Welcome):
        return _WELCOME.pack(
            VERSION, Kind.WELCOME, 0, _check_int("worker id", msg.worker_id, _U32)
        )
    if isinstance(msg, ConnInfo):
        return _CONN.pack(
            VERSION,
            Kind.CONN,
            0,
            _check_int("connection id", msg.id, _U64),
            _check_int("listener index", msg.listener, _U16),
            0,
            _encode_addr(msg.peer),
            _encode_addr(msg.local),
        )
    if isinstance(msg, (Ack, Done)):
        return _encode_ids(msg.kind, msg.ids)
    if isinstance(msg, Drain):
        return _HDR.pack(VERSION, Kind.DRAIN, 0)
    raise TypeError(f"not a protocol message: {msg!r}")


def _expect_len(kind, n, expected):
    if n != expected:
        raise ProtocolError(f"{kind.name} message has length {n}, expected {expected}")


def decode(data, fds):
    """Decodes one message that arrived with ``fds`` file descriptors.

    Checks, in this order (the order of proto.rs): at least the 4-byte
    header, at most ``MAX_MSG`` bytes, the version, a known kind, a zero
    reserved header field, the fd count of the kind, the exact length, every
    reserved field of the body, the id count of ACK/DONE, address families.
    Raises :class:`ProtocolError` for any violation.
    """
    b = bytes(data)
    n = len(b)
    if n < _HDR.size:
        raise ProtocolError(f"message of {n} bytes is shorter than the 4-byte header")
    if n > MAX_MSG:
        raise ProtocolError(f"message size {n} exceeds the maximum of {MAX_MSG}")
    version, kind_byte, reserved = _HDR.unpack_from(b)
    if version != VERSION:
        raise ProtocolError(
            f"unsupported protocol version {version} (this side speaks {VERSION})"
        )
    try:
        kind = Kind(kind_byte)
    except ValueError:
        raise ProtocolError(f"unknown message kind {kind_byte}") from None
    if reserved != 0:
        raise ProtocolError(f"{kind.name} message has a non-zero reserved field")
    if fds != kind.fd_count:
        raise ProtocolError(
            f"{kind.name} message carries {fds} file descriptors, "
            f"expected {kind.fd_count}"
        )
    if kind is Kind.HELLO:
        _expect_len(kind, n, _HELLO.size)
        _, _, _, pid, capacity, flags = _HELLO.unpack(b)
        if flags != 0:
            raise ProtocolError("HELLO message has a non-zero reserved field")
        return Hello(pid, capacity)
    if kind is Kind.WELCOME:
        _expect_len(kind, n, _WELCOME.size)
        return Welcome(_WELCOME.unpack(b)[3])
    if kind is Kind.CONN:
        _expect_len(kind, n, _CONN.size)
        _, _, _, cid, listener, res, peer, local = _CONN.unpack(b)
        if res != 0:
            raise ProtocolError("CONN message has a non-zero reserved field")
        return ConnInfo(cid, listener, _decode_addr(peer), _decode_addr(local))
    if kind in (Kind.ACK, Kind.DONE):
        if n < _IDS_HDR.size:
            raise ProtocolError(f"{kind.name} message has length {n}, expected 16")
        _, _, _, count, res = _IDS_HDR.unpack_from(b)
        if not 1 <= count <= MAX_IDS:
            raise ProtocolError(
                f"{kind.name} message carries {count} ids (allowed 1..={MAX_IDS})"
            )
        _expect_len(kind, n, _IDS_HDR.size + 8 * count)
        if res != 0:
            raise ProtocolError(f"{kind.name} message has a non-zero reserved field")
        ids = struct.unpack_from(f"<{count}Q", b, _IDS_HDR.size)
        return Ack(ids) if kind is Kind.ACK else Done(ids)
    _expect_len(kind, n, _HDR.size)
    return _DRAIN


def id_batches(ids, kind=Kind.DONE):
    """Splits ``ids`` into ACK or DONE messages of at most ``MAX_IDS`` each."""
    ids = tuple(ids)
    cls = Done if kind == Kind.DONE else Ack
    return [cls(ids[i : i + MAX_IDS]) for i in range(0, len(ids), MAX_IDS)]


# ---- the channel ------------------------------------------------------------

_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
_ANCILLARY = socket.CMSG_SPACE(RECV_FDS * array.array("i").itemsize)
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)


def _close_fds(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _recv_message(sock, flags=0):
    """Receives one message: ``(msg, fd_or_None)``, or ``None`` at EOF.

    Every fd that arrives is closed unless it is returned as the one fd of a
    valid CONN. ``BlockingIOError`` when ``MSG_DONTWAIT`` finds nothing.
    ``ECONNRESET`` (the peer closed with messages of ours unread) is EOF too.
    """
    try:
        data, anc, msg_flags, _ = sock.recvmsg(
            MAX_MSG + 1, _ANCILLARY, _CMSG_CLOEXEC | flags
        )
    except ConnectionResetError:
        return None
    fds = array.array("i")
    for level, ctype, cdata in anc:
        if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
    try:
        if msg_flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or len(data) > MAX_MSG:
            raise ProtocolError("message or its control data was truncated")
        if not data and not fds:
            return None
        msg = decode(data, len(fds))
    except BaseException:
        _close_fds(fds)
        raise
    return msg, (fds[0] if fds else None)


def _send_message(sock, msg):
    data = encode(msg)
    sent = sock.sendmsg([data], [], _SEND_FLAGS)
    if sent != len(data):
        # SEQPACKET sends are atomic; refuse to paper over a short one.
        raise OSError(f"short sendmsg: {sent} of {len(data)} bytes")


#: Fds a worker keeps for itself beyond one per connection.
_FD_MARGIN = 16


def fd_capacity():
    """How many connections this process can hold within its soft
    ``RLIMIT_NOFILE``, given the fds already open (``None``: no limit).

    A worker must not announce more: past its fd limit the kernel drops the
    fd of the next CONN, and that client is lost.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        open_fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_fds = 8
    return max(1, soft - open_fds - _FD_MARGIN)


def _fit_capacity(asked):
    """The capacity to announce: ``asked`` (0: none of its own), never more
    than :func:`fd_capacity`."""
    room = fd_capacity()
    if room is None:
        return asked
    return room if asked == 0 else min(asked, room)


def _check_channel(sock):
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        raise WorkerError(
            f"channel is a {sock.family!r}/{sock.type!r} socket, "
            "expected AF_UNIX/SOCK_SEQPACKET"
        )


class Worker:
    """The worker's end of its channel to the acceptor.

    Make one with :meth:`register` or :meth:`from_env`; both say HELLO and
    wait for WELCOME. Then take events with :meth:`recv` or by iterating,
    and report closed connections with :meth:`done` / :meth:`done_many`.
    """

    def __init__(self, sock, capacity=0):
        """Says HELLO on the connected channel ``sock`` and waits for
        WELCOME. The worker owns ``sock`` from here on (it is closed if the
        handshake fails). Prefer :meth:`register` and :meth:`from_env`."""
        _check_int("capacity", capacity, _U32)
        capacity = _fit_capacity(capacity)
        self._sock = sock
        self._queued = collections.deque()
        self._closed = False
        self._close_lock = threading.Lock()
        try:
            sock.setblocking(True)
            try:
                _send_message(sock, Hello(os.getpid(), capacity))
                got = _recv_message(sock)
            except BrokenPipeError:
                got = None
            if got is None:
                raise WorkerError(
                    "the acceptor closed the channel before WELCOME "
                    "(refused, or shutting down)"
                )
            msg, fd = got
            if fd is not None:
                os.close(fd)
            if not isinstance(msg, Welcome):
                raise ProtocolError(
                    f"acceptor answered HELLO with {msg!r} instead of WELCOME"
                )
        except BaseException:
            sock.close()
            raise
        self._id = msg.worker_id

    @classmethod
    def register(cls, path, capacity=0):
        """Connects to the acceptor's worker socket (``--worker-socket PATH``)
        and joins its pool. The acceptor never restarts a worker that
        registered itself."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(os.fspath(path))
        except OSError as e:
            sock.close()
            raise WorkerError(f"cannot connect to the worker socket {path}: {e}") from e
        return cls(sock, capacity)

    @classmethod
    def from_env(cls, capacity=0):
        """Takes the channel a spawning acceptor passed as the fd named in
        ``BATON_CHANNEL_FD``, removes the variable (so nothing else claims the
        fd) and marks the fd close-on-exec.

        Raises :class:`SandboxUnsupported` first of all when the acceptor
        passed a sandbox profile (see the module docs)."""
        if os.environ.get(SANDBOX_ENV):
            raise SandboxUnsupported(
                f"the acceptor passed a sandbox profile ({SANDBOX_ENV}) and this "
                "Python worker cannot confine itself: spawn it with --no-sandbox "
                "(as root, also --allow-root-workers), or start it confined by "
                "other means and join with --register PATH"
            )
        var = os.environ.get(CHANNEL_FD_ENV)
        if var is None:
            raise WorkerError(
                f"{CHANNEL_FD_ENV} is not set: this worker must be started by "
                "baton, or use --register PATH"
            )
        try:
            fd = int(var.strip())
        except ValueError:
            fd = -1
        if fd <= 2:
            raise WorkerError(f"{CHANNEL_FD_ENV}={var!r} is not a file descriptor number")
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise WorkerError(f"inherited channel fd {fd} is unusable: {e}") from e
        del os.environ[CHANNEL_FD_ENV]
        try:
            _check_channel(sock)
            sock.set_inheritable(False)
        except BaseException:
            sock.close()
            raise
        return cls(sock, capacity)

    @property
    def id(self):
        """This worker's id in the acceptor's pool (from WELCOME)."""
        return self._id

    def fileno(self):
        """The channel's fd, for a selector (readable: call :meth:`recv`)."""
        return self._sock.fileno()

    def recv(self):
        """Blocks until the next event: :class:`Conn`, :class:`Drain` or
        :class:`Closed` (forever after EOF).

        Reads one message, then every message already queued (without
        blocking), sends one ACK per 64 connections among them, and only then
        returns the first; the rest are returned by the next calls. A
        protocol violation raises :class:`ProtocolError` and closes the
        channel; connections of the batch that were not ACKed are closed, so
        the acceptor gives them to another worker.
        """
        if self._queued:
            return self._queued.popleft()
        if self._closed:
            return _CLOSED
        batch = []
        try:
            self._take(_recv_message(self._sock), batch)
            while not self._closed:
                try:
                    got = _recv_message(self._sock, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                self._take(got, batch)
            ids = [ev.id for ev in batch if isinstance(ev, Conn)]
            for m in id_batches(ids, Kind.ACK):
                _send_message(self._sock, m)
        except BaseException as e:
            for ev in batch:
                if isinstance(ev, Conn):
                    ev.sock.close()
            if isinstance(e, ProtocolError):
                self.close()
            raise
        self._queued.extend(batch)
        return self._queued.popleft()

    def _take(self, got, out):
        if got is None:
            self._closed = True
            out.append(_CLOSED)
            return
        msg, fd = got
        if isinstance(msg, ConnInfo):
            try:
                sock = socket.socket(fileno=fd)
            except OSError as e:
                os.close(fd)
                raise ProtocolError(
                    f"CONN {msg.id} carries an fd that is not a socket: {e}"
                ) from e
            sock.setblocking(True)
            out.append(Conn(msg.id, msg.listener, msg.peer, msg.local, sock))
        elif isinstance(msg, Drain):
            out.append(_DRAIN)
        else:
            raise ProtocolError(f"{msg.kind.name} is not an acceptor-to-worker message")

    def __iter__(self):
        """Yields events until, and including, the first Drain or Closed."""
        while True:
            ev = self.recv()
            yield ev
            if not isinstance(ev, Conn):
                return

    def done(self, conn_id):
        """Reports one connection closed (one DONE message)."""
        self._send(Done((conn_id,)))

    def done_many(self, ids):
        """Reports many connections closed, in messages of up to 64 ids."""
        for m in id_batches(ids, Kind.DONE):
            self._send(m)

    def _send(self, msg):
        if self._sock.fileno() < 0:
            raise WorkerError("the channel is closed")
        _send_message(self._sock, msg)

    def close(self):
        """Closes the channel: the acceptor gives every connection not yet
        ACKed to another worker, and counts ACKed ones not DONE as lost.
        Call it only once no other thread uses the worker."""
        with self._close_lock:
            self._closed = True
            self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
