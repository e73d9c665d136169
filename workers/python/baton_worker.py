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

The worker says HELLO in protocol version 2 and uses the version the
acceptor's WELCOME chose (:attr:`Worker.version`); in version 2 one message
(CONNS) may bring several connections, which :meth:`Worker.recv` returns one
by one, all ACKed in one message. ``Worker.register(path, version=1)`` (or
``from_env(version=1)``) makes a version 1 worker, one CONN per connection.
A version 2 worker may hand an idle keep-alive connection back to the
acceptor with :meth:`Worker.park` instead of holding it.

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

Wire format (versions 1 and 2)
==============================

All integers are little-endian. Every message starts with a 4-byte header::

    offset size field
    0      1    protocol version: 1, or 2 (VERSION)
    1      1    kind (table below)
    2      2    reserved, must be 0

    kind name    since direction          length  fds body (offsets from 0)
    1    HELLO   1     worker -> acceptor 16      0   pid u32 @4, capacity u32 @8
                                                      (0: no limit of its own),
                                                      flags u32 @12 (must be 0)
    2    WELCOME 1     acceptor -> worker 8       0   worker id u32 @4
    3    CONN    1     acceptor -> worker 64      1   conn record @4
    4    ACK     1     worker -> acceptor 8+8n    0   n u16 @4 (1..=64),
                                                      reserved u16 @6 (0),
                                                      n x conn id u64 @8
    5    DONE    1     worker -> acceptor 8+8n    0   same layout as ACK
    6    DRAIN   1     acceptor -> worker 4       0   none
    7    CONNS   2     acceptor -> worker 8+60n   n   n u16 @4 (1..=64),
                                                      reserved u16 @6 (0),
                                                      n x conn record @8;
                                                      the i-th fd is the
                                                      i-th connection's
    8    PARK    2     worker -> acceptor 8+64n   n   n u16 @4 (1..=64),
                                                      reserved u16 @6 (0),
                                                      n x (conn record,
                                                      idle ms u32) @8

A conn record is 60 bytes: conn id u64 @0, listener index u16 @8, reserved
u16 @10 (0), peer addr @12, local addr @36. (In a CONN, at @4, that puts
the id at @4, the listener at @12, the reserved field at @14 and the
addresses at @16 and @40.)

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
    CONN    "<BBH" + record        ...
    ACK     "<BBHHH" + "Q" * n     ..., n, reserved, ids
    CONNS   "<BBHHH" + record * n  ..., n, reserved, records
    PARK    "<BBHHH" + (record + "I") * n
    record  "<QHH24s24s"           id, listener, reserved, peer, local
    address "<BBHI16s"             family, reserved, port, scope, address

Versions
========

The worker's HELLO carries, in its header, the highest version it speaks
(here 2, or 1 for a worker made with ``version=1``); the acceptor's WELCOME
carries the version both will use (the lower of the two), and every later
message on the channel, either way, carries that version. A message whose
version is not the channel's, or whose kind is newer than its version (a
CONNS or PARK in a version 1 header), ends the channel; so does a WELCOME in
a version higher than the HELLO offered. A version 1 worker keeps working
with a version 2 acceptor, unchanged: it gets one CONN per connection.

Version 2 adds:

* CONNS: several connections in one message, one record and one fd each,
  in the same order; one ``sendmsg`` carries all the connections one wake-up
  of the acceptor accepted for this worker. Ownership is as for CONN: the
  acceptor keeps each fd until that id is ACKed.
* PARK: the worker hands idle keep-alive connections back (each record as
  the acceptor sent it, with the fd, and how many ms are left of its idle
  timeout; 0: the acceptor's default). Only for a connection whose response
  is fully written and of which the worker has buffered nothing; the worker
  closes its copy after. For the acceptor a parked connection is finished
  by that worker (as with DONE); it holds the fd without reading, closes it
  when the client does or the idle time runs out, and hands it to a worker,
  like a new connection, when the client sends its next request.

Rules
=====

* The worker sends HELLO first; the acceptor answers WELCOME and sends no
  CONN or CONNS before that.
* Every CONN carries exactly one fd, every CONNS one per record: the
  accepted TCP sockets. The acceptor keeps its own copy until the worker
  ACKs the connection id; if the worker's channel closes first, the
  connection goes to another worker. This library sends the ACK before it
  returns the connection to the application, so a connection is never
  served twice and never lost to a crash before the ACK.
* The worker sends DONE once it has closed a connection (not for one it
  parked). Connections not yet DONE (or parked) are the worker's in-flight
  count, which drives dispatch and capacity.
* DRAIN: no CONN or CONNS follows; the worker finishes its connections and
  exits.
* A message with an unknown version or kind, a version other than the
  channel's, a kind newer than its version, a bad length, a non-zero
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
  one of the fds of a valid CONN or CONNS (a CONNS of 64 needs room for
  64);
* refuse ``MSG_CTRUNC`` and ``MSG_TRUNC`` (and anything longer than the
  largest valid message, a full PARK of 4104 bytes) instead of decoding half
  a message.
"""

import array
import collections
import enum
import os
import resource
import socket
import struct
import sys
import threading
from dataclasses import dataclass, field

__all__ = [
    "log",
    "LOG_FORMAT_ENV",
    "VERSION",
    "VERSION_MIN",
    "CHANNEL_FD_ENV",
    "WORKER_ID_ENV",
    "SANDBOX_ENV",
    "EXIT_SANDBOX",
    "MAX_IDS",
    "MAX_BATCH",
    "MAX_MSG",
    "Kind",
    "Hello",
    "Welcome",
    "ConnInfo",
    "Ack",
    "Done",
    "Drain",
    "Conns",
    "Parked",
    "Park",
    "Conn",
    "Closed",
    "WorkerError",
    "ProtocolError",
    "SandboxUnsupported",
    "encode",
    "decode",
    "fd_count",
    "kind_fd_count",
    "version_of",
    "id_batches",
    "Worker",
]

#: The highest protocol version this module speaks (what its HELLO offers).
VERSION = 2
#: The lowest version it still speaks (a version 1 acceptor, or a worker
#: made with ``version=1``).
VERSION_MIN = 1
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
#: The most records (and fds) one CONNS or PARK message may carry.
MAX_BATCH = 64
#: The largest valid message, in bytes (a full PARK).
MAX_MSG = 8 + 64 * MAX_BATCH

#: Room for this many fds in every receive: the kernel's SCM_MAX_FD (at
#: least the MAX_BATCH of a full CONNS).
RECV_FDS = 253

_HDR = struct.Struct("<BBH")
_HELLO = struct.Struct("<BBHIII")
_WELCOME = struct.Struct("<BBHI")
_RECORD = struct.Struct("<QHH24s24s")
_PARK_RECORD = struct.Struct("<QHH24s24sI")
_BATCH_HDR = struct.Struct("<BBHHH")  # header, n, reserved (ACK, DONE, CONNS, PARK)
_IDS_HDR = _BATCH_HDR
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
    CONNS = 7
    PARK = 8

    @property
    def since(self):
        """The first protocol version that has this kind."""
        return 2 if self in (Kind.CONNS, Kind.PARK) else 1

    @property
    def fd_count(self):
        """How many file descriptors a message of this kind carries, for
        the kinds that carry a fixed number: 1 for CONN, else 0. CONNS and
        PARK carry one per record: see :func:`fd_count` and
        :func:`kind_fd_count`."""
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
    ``--worker-connections``). The version it offers is the header's."""

    pid: int
    capacity: int = 0
    kind = Kind.HELLO


@dataclass(frozen=True)
class Welcome:
    """WELCOME (acceptor -> worker): the worker's id in the acceptor's pool.
    The version chosen is the header's."""

    worker_id: int
    kind = Kind.WELCOME


@dataclass(frozen=True)
class ConnInfo:
    """CONN (acceptor -> worker), without its fd: the connection ``id``, the
    index of the ``listener`` that accepted it (order of ``--listen``), the
    client's address ``peer`` and the address it connected to, ``local``.
    Also one conn record of a CONNS or PARK."""

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
    """DRAIN (acceptor -> worker): no CONN or CONNS follows; finish the
    connections you hold, then exit. Also the event :meth:`Worker.recv`
    returns for it."""

    kind = Kind.DRAIN


@dataclass(frozen=True)
class Conns:
    """CONNS (acceptor -> worker, version 2), without its fds: 1 to 64
    :class:`ConnInfo`, in the order of the fds."""

    conns: tuple
    kind = Kind.CONNS


@dataclass(frozen=True)
class Parked:
    """One record of a PARK: the connection as the acceptor described it
    (``info``) and the milliseconds left of its idle timeout (0: the
    acceptor's default)."""

    info: ConnInfo
    idle_ms: int = 0


@dataclass(frozen=True)
class Park:
    """PARK (worker -> acceptor, version 2), without its fds: 1 to 64
    :class:`Parked`, in the order of the fds."""

    conns: tuple
    kind = Kind.PARK


# ---- events -----------------------------------------------------------------


@dataclass(eq=False)
class Conn:
    """A connection handed over by the acceptor, already acknowledged.

    ``sock`` is the client's TCP socket as a ``socket.socket`` in blocking
    mode (the acceptor accepted it non-blocking; this module switches it so
    that the socket object and its fd agree). Close it, then report
    ``worker.done(conn.id)`` (or hand it back with ``worker.park``).
    """

    id: int
    listener: int
    peer: tuple
    local: tuple
    sock: socket.socket = field(repr=False)

    @property
    def info(self):
        """What the acceptor said of this connection (its PARK record)."""
        return ConnInfo(self.id, self.listener, self.peer, self.local)


@dataclass(frozen=True)
class Closed:
    """The acceptor closed the channel: finish up and exit."""


_DRAIN = Drain()
_CLOSED = Closed()


# ---- codec ------------------------------------------------------------------


LOG_FORMAT_ENV = "BATON_LOG_FORMAT"


def log_line(level, program, message):
    """One log line (with its newline) in the style every baton process
    uses (`baton_sdk::log`): text shaped like tracing-subscriber's, or one
    JSON object when BATON_LOG_FORMAT (set by the acceptor from its
    --log-format) is `json`."""
    import datetime
    import json

    now = datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ"
    )
    pid = os.getpid()
    level = level.upper()
    if os.environ.get(LOG_FORMAT_ENV, "").lower() == "json":
        return (
            json.dumps(
                {
                    "timestamp": now,
                    "level": level,
                    "fields": {"message": message},
                    "target": program,
                    "span": {"pid": pid, "name": program},
                },
                separators=(",", ":"),
            )
            + "\n"
        )
    return f"{now} {level:>5} {program}{{pid={pid}}}: {message}\n"


def log(level, program, message):
    """Writes one log_line() to stderr in a single write(2), so that it
    never interleaves with another process's lines on a shared stderr."""
    try:
        os.write(2, log_line(level, program, message).encode())
    except OSError:
        pass


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


def _encode_record(c):
    """A :class:`ConnInfo` -> its 60-byte conn record."""
    if not isinstance(c, ConnInfo):
        raise TypeError(f"not a ConnInfo: {c!r}")
    return _RECORD.pack(
        _check_int("connection id", c.id, _U64),
        _check_int("listener index", c.listener, _U16),
        0,
        _encode_addr(c.peer),
        _encode_addr(c.local),
    )


def _decode_record(kind, b, at):
    cid, listener, res, peer, local = _RECORD.unpack_from(b, at)
    if res != 0:
        raise ProtocolError(f"{kind.name} message has a non-zero reserved field")
    return ConnInfo(cid, listener, _decode_addr(peer), _decode_addr(local))


def _batch_hdr(version, kind, items, top, what):
    items = tuple(items)
    if not 1 <= len(items) <= top:
        raise ValueError(
            f"{kind.name} batch of {len(items)} {what} (allowed 1..={top}); split it"
        )
    return items, _BATCH_HDR.pack(version, kind, 0, len(items), 0)


def _check_version(version, kind):
    if version not in (1, 2):
        raise ValueError(
            f"protocol version {version!r} (this module speaks {VERSION_MIN} to {VERSION})"
        )
    if kind.since > version:
        raise ValueError(f"{kind.name} needs protocol version {kind.since}, not {version}")


def encode(msg, version=VERSION):
    """Encodes one message into its wire bytes, with ``version`` in its
    header (the channel's agreed version; HELLO: the highest offered).

    Raises ``ValueError`` for a message that cannot be encoded (a field out
    of range, an ACK or DONE of no id or more than ``MAX_IDS``, a CONNS or
    PARK of no record or more than ``MAX_BATCH``, a kind newer than
    ``version``): that is a bug in the caller, which must split its batches
    and know the channel's version.
    """
    kind = getattr(msg, "kind", None)
    if not isinstance(kind, Kind) or isinstance(msg, type):
        raise TypeError(f"not a protocol message: {msg!r}")
    _check_version(version, kind)
    if isinstance(msg, Hello):
        return _HELLO.pack(
            version,
            Kind.HELLO,
            0,
            _check_int("pid", msg.pid, _U32),
            _check_int("capacity", msg.capacity, _U32),
            0,
        )
    if isinstance(msg, Welcome):
        return _WELCOME.pack(
            version, Kind.WELCOME, 0, _check_int("worker id", msg.worker_id, _U32)
        )
    if isinstance(msg, ConnInfo):
        return _HDR.pack(version, Kind.CONN, 0) + _encode_record(msg)
    if isinstance(msg, (Ack, Done)):
        ids, hdr = _batch_hdr(version, kind, msg.ids, MAX_IDS, "ids")
        for i in ids:
            _check_int("connection id", i, _U64)
        return hdr + struct.pack(f"<{len(ids)}Q", *ids)
    if isinstance(msg, Conns):
        conns, hdr = _batch_hdr(version, kind, msg.conns, MAX_BATCH, "records")
        return hdr + b"".join(_encode_record(c) for c in conns)
    if isinstance(msg, Park):
        conns, hdr = _batch_hdr(version, kind, msg.conns, MAX_BATCH, "records")
        out = [hdr]
        for p in conns:
            if not isinstance(p, Parked):
                raise TypeError(f"not a Parked: {p!r}")
            out.append(_encode_record(p.info))
            out.append(struct.pack("<I", _check_int("idle ms", p.idle_ms, _U32)))
        return b"".join(out)
    if isinstance(msg, Drain):
        return _HDR.pack(version, Kind.DRAIN, 0)
    raise TypeError(f"not a protocol message: {msg!r}")


def fd_count(msg):
    """How many file descriptors ``msg`` carries: 1 for a CONN, one per
    record for CONNS and PARK, else 0."""
    if isinstance(msg, ConnInfo):
        return 1
    if isinstance(msg, (Conns, Park)):
        return len(msg.conns)
    return 0


def kind_fd_count(data):
    """How many fds a message with these bytes should carry, read from its
    kind (and, for CONNS and PARK, its count field); 0 for an unknown kind,
    which :func:`decode` refuses anyway."""
    b = bytes(data)
    try:
        kind = Kind(b[1])
    except (IndexError, ValueError):
        return 0
    if kind in (Kind.CONNS, Kind.PARK):
        return struct.unpack_from("<H", b, 4)[0] if len(b) >= 6 else 0
    return kind.fd_count


def version_of(data):
    """The version in a message's header (0 for one too short to have it)."""
    return data[0] if len(data) else 0


def _expect_len(kind, n, expected):
    if n != expected:
        raise ProtocolError(f"{kind.name} message has length {n}, expected {expected}")


def _batch_count(kind, b, record, top, what):
    """The count of an ACK, DONE, CONNS or PARK, checked against the length."""
    n = len(b)
    if n < _BATCH_HDR.size:
        raise ProtocolError(
            f"{kind.name} message has length {n}, expected {_BATCH_HDR.size + record}"
        )
    _, _, _, count, res = _BATCH_HDR.unpack_from(b)
    if not 1 <= count <= top:
        raise ProtocolError(
            f"{kind.name} message carries {count} {what} (allowed 1..={top})"
        )
    _expect_len(kind, n, _BATCH_HDR.size + record * count)
    if res != 0:
        raise ProtocolError(f"{kind.name} message has a non-zero reserved field")
    return count


def decode(data, fds, version=None):
    """Decodes one message that arrived with ``fds`` file descriptors.

    ``version``: the version the channel agreed on, which the message must
    carry (``None``: any version this module speaks, as before the
    handshake).

    Checks, in this order (the order of proto.rs, then the channel's
    version check): at least the 4-byte header, at most ``MAX_MSG`` bytes,
    a version this module speaks, a known kind, a kind not newer than the
    version, a zero reserved header field, the fd count of a fixed-fd kind,
    the count (1..=64) and exact length of a batch, the exact length,
    every reserved field of the body, the fd count of CONNS and PARK (one
    per record), address families, the channel's version.
    Raises :class:`ProtocolError` for any violation.
    """
    msg = _decode(bytes(data), fds)
    if version is not None and data[0] != version:
        raise ProtocolError(
            f"message of protocol version {data[0]} on a channel that agreed "
            f"on version {version}"
        )
    return msg


def _decode(b, fds):
    n = len(b)
    if n < _HDR.size:
        raise ProtocolError(f"message of {n} bytes is shorter than the 4-byte header")
    if n > MAX_MSG:
        raise ProtocolError(f"message size {n} exceeds the maximum of {MAX_MSG}")
    version, kind_byte, reserved = _HDR.unpack_from(b)
    if not VERSION_MIN <= version <= VERSION:
        raise ProtocolError(
            f"unsupported protocol version {version} "
            f"(this side speaks {VERSION_MIN} to {VERSION})"
        )
    try:
        kind = Kind(kind_byte)
    except ValueError:
        raise ProtocolError(f"unknown message kind {kind_byte}") from None
    if kind.since > version:
        raise ProtocolError(
            f"{kind.name} needs protocol version {kind.since}, "
            f"the message says {version}"
        )
    if reserved != 0:
        raise ProtocolError(f"{kind.name} message has a non-zero reserved field")
    batch = kind in (Kind.CONNS, Kind.PARK)
    if not batch and fds != kind.fd_count:
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
        _expect_len(kind, n, _HDR.size + _RECORD.size)
        return _decode_record(kind, b, _HDR.size)
    if batch:
        size = _RECORD.size if kind is Kind.CONNS else _PARK_RECORD.size
        count = _batch_count(kind, b, size, MAX_BATCH, "records")
        if fds != count:
            raise ProtocolError(
                f"{kind.name} message carries {fds} file descriptors, "
                f"expected {count}"
            )
        at = [_BATCH_HDR.size + size * i for i in range(count)]
        if kind is Kind.CONNS:
            return Conns(tuple(_decode_record(kind, b, a) for a in at))
        return Park(
            tuple(
                Parked(
                    _decode_record(kind, b, a),
                    struct.unpack_from("<I", b, a + _RECORD.size)[0],
                )
                for a in at
            )
        )
    if kind in (Kind.ACK, Kind.DONE):
        count = _batch_count(kind, b, 8, MAX_IDS, "ids")
        ids = struct.unpack_from(f"<{count}Q", b, _BATCH_HDR.size)
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


class _FdsDropped(Exception):
    """A CONN or CONNS arrived, but the kernel could not install all of its
    fds (this process is at its fd limit): ``fds`` are the first ones."""

    def __init__(self, msg, fds, version):
        super().__init__("fds dropped")
        self.msg, self.fds, self.version = msg, fds, version


def _recv_message(sock, flags=0, version=None):
    """Receives one message: ``(msg, fds, version)``, or ``None`` at EOF.
    ``fds`` is the list of the fds it carried (one for a CONN, one per
    record for a CONNS), ``version`` the one in its header; with
    ``version`` given, a message of another version is refused.

    Every fd that arrives is closed unless it is returned as an fd of a
    valid message. ``BlockingIOError`` when ``MSG_DONTWAIT`` finds nothing.
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
    if (
        msg_flags & socket.MSG_CTRUNC
        and not msg_flags & socket.MSG_TRUNC
        and 6 <= len(data) <= MAX_MSG
    ):
        # Out of fds: only the connections whose fds arrived are lost
        # for nothing; the caller reports the others done.
        try:
            msg = decode(data, kind_fd_count(data), version)
        except ProtocolError:
            msg = None
        if isinstance(msg, (ConnInfo, Conns)) and len(fds) < fd_count(msg):
            raise _FdsDropped(msg, list(fds), data[0])
    try:
        if msg_flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or len(data) > MAX_MSG:
            raise ProtocolError("message or its control data was truncated")
        if not data and not fds:
            return None
        msg = decode(data, len(fds), version)
    except BaseException:
        _close_fds(fds)
        raise
    return msg, list(fds), data[0]


def _send_message(sock, msg, version, fds=()):
    data = encode(msg, version)
    anc = []
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sent = sock.sendmsg([data], anc, _SEND_FLAGS)
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
    and report closed connections with :meth:`done` / :meth:`done_many`
    (or hand idle ones back with :meth:`park`).
    """

    def __init__(self, sock, capacity=0, version=VERSION):
        """Says HELLO, offering protocol ``version`` (2, or 1 for a version 1
        worker), on the connected channel ``sock`` and waits for WELCOME,
        whose version (at most the one offered) the channel uses from then
        on. The worker owns ``sock`` from here on (it is closed if the
        handshake fails). Prefer :meth:`register` and :meth:`from_env`."""
        _check_int("capacity", capacity, _U32)
        if version not in (1, 2):
            raise ValueError(
                f"protocol version {version!r} (this module speaks "
                f"{VERSION_MIN} to {VERSION})"
            )
        capacity = _fit_capacity(capacity)
        self._sock = sock
        self._queued = collections.deque()
        self._closed = False
        self._close_lock = threading.Lock()
        try:
            sock.setblocking(True)
            try:
                _send_message(sock, Hello(os.getpid(), capacity), version)
                got = _recv_message(sock)
            except BrokenPipeError:
                got = None
            if got is None:
                raise WorkerError(
                    "the acceptor closed the channel before WELCOME "
                    "(refused, or shutting down)"
                )
            msg, fds, chosen = got
            _close_fds(fds)
            if not isinstance(msg, Welcome):
                raise ProtocolError(
                    f"acceptor answered HELLO with {msg!r} instead of WELCOME"
                )
            if chosen > version:
                raise ProtocolError(
                    f"acceptor answered a HELLO of protocol version {version} "
                    f"with a WELCOME of version {chosen}"
                )
        except BaseException:
            sock.close()
            raise
        self._id = msg.worker_id
        self._version = chosen

    @classmethod
    def register(cls, path, capacity=0, version=VERSION):
        """Connects to the acceptor's worker socket (``--worker-socket PATH``)
        and joins its pool. The acceptor never restarts a worker that
        registered itself."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(os.fspath(path))
        except OSError as e:
            sock.close()
            raise WorkerError(f"cannot connect to the worker socket {path}: {e}") from e
        return cls(sock, capacity, version)

    @classmethod
    def from_env(cls, capacity=0, version=VERSION):
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
        return cls(sock, capacity, version)

    @property
    def id(self):
        """This worker's id in the acceptor's pool (from WELCOME)."""
        return self._id

    @property
    def version(self):
        """The protocol version agreed with the acceptor (from WELCOME)."""
        return self._version

    @property
    def can_park(self):
        """Whether the acceptor takes parked connections (version 2)."""
        return self._version >= 2 and self._sock.fileno() >= 0

    def fileno(self):
        """The channel's fd, for a selector (readable: call :meth:`recv`)."""
        return self._sock.fileno()

    def recv(self):
        """Blocks until the next event: :class:`Conn`, :class:`Drain` or
        :class:`Closed` (forever after EOF).

        Reads one message, then every message already queued (without
        blocking), sends one ACK per 64 connections among them (a CONNS
        brings up to 64 in one message), and only then returns the first;
        the rest are returned by the next calls. A protocol violation raises
        :class:`ProtocolError` and closes the channel; connections of the
        batch that were not ACKed are closed, so the acceptor gives them to
        another worker.
        """
        if self._queued:
            return self._queued.popleft()
        if self._closed:
            return _CLOSED
        batch = []
        dropped = []
        try:
            self._take(self._read(0, dropped), batch)
            while not self._closed:
                try:
                    got = self._read(socket.MSG_DONTWAIT, dropped)
                except BlockingIOError:
                    break
                self._take(got, batch)
            ids = [ev.id for ev in batch if isinstance(ev, Conn)]
            for m in id_batches(ids, Kind.ACK):
                _send_message(self._sock, m, self._version)
            if dropped:
                self._report_dropped(dropped)
        except BaseException as e:
            for ev in batch:
                if isinstance(ev, Conn):
                    ev.sock.close()
            if isinstance(e, ProtocolError):
                self.close()
            raise
        self._queued.extend(batch)
        return self._queued.popleft()

    def _read(self, flags, dropped):
        """One message; the ids of connections whose fds the kernel could
        not install are appended to ``dropped``."""
        try:
            return _recv_message(self._sock, flags, self._version)
        except _FdsDropped as d:
            infos = (d.msg,) if isinstance(d.msg, ConnInfo) else d.msg.conns
            dropped.extend(i.id for i in infos[len(d.fds):])
            return d.msg, d.fds, d.version

    def _report_dropped(self, ids):
        """Connections that arrived without their fd cost only themselves:
        acknowledged and reported done at once, so that the acceptor closes
        its copies (best effort: if the channel is gone, so are they)."""
        log(
            "warn",
            "baton_worker",
            f"{len(ids)} connection(s) arrived without their fd "
            "(this process is at its fd limit); closed",
        )
        try:
            for kind in (Kind.ACK, Kind.DONE):
                for m in id_batches(ids, kind):
                    _send_message(self._sock, m, self._version)
        except OSError:
            pass

    def _take(self, got, out):
        if got is None:
            self._closed = True
            out.append(_CLOSED)
            return
        msg, fds, _ = got
        if isinstance(msg, (ConnInfo, Conns)):
            # decode() checked one fd per record.
            infos = (msg,) if isinstance(msg, ConnInfo) else msg.conns
            wrapped = 0
            try:
                for info, fd in zip(infos, fds):
                    try:
                        sock = socket.socket(fileno=fd)
                    except OSError as e:
                        raise ProtocolError(
                            f"{msg.kind.name} connection {info.id} carries an fd "
                            f"that is not a socket: {e}"
                        ) from e
                    # In `out` from here on: closed by recv() if anything fails.
                    out.append(Conn(info.id, info.listener, info.peer, info.local, sock))
                    wrapped += 1
                    sock.setblocking(True)
            except BaseException:
                _close_fds(fds[wrapped:])
                raise
        elif isinstance(msg, Drain):
            out.append(_DRAIN)
        else:
            _close_fds(fds)
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

    def park(self, conns):
        """Hands idle keep-alive connections back to the acceptor (PARK,
        version 2), in messages of up to 64. ``conns``: :class:`Conn`
        events, or ``(conn, idle_ms)`` pairs (``idle_ms``: milliseconds
        left of its idle timeout; 0, the default, leaves it to the
        acceptor).

        Only for a connection whose response is fully written and of which
        nothing is buffered (the acceptor hands it to a worker again when
        its next request arrives). Each message sent closes the sockets it
        carried: a parked connection is finished here, and is not reported
        DONE. Unregister them from any selector first.

        Raises :class:`WorkerError` on a version 1 channel (nothing is sent)
        and ``OSError`` if a send fails: the connections whose socket is
        still open were not parked and are still this worker's (serve or
        close them, and report them DONE).
        """
        if self._version < 2:
            raise WorkerError("this channel speaks protocol version 1: no parking")
        items = []
        for c in conns:
            conn, idle_ms = (c, 0) if isinstance(c, Conn) else c
            if not isinstance(conn, Conn):
                raise TypeError(f"not a Conn: {conn!r}")
            if conn.sock.fileno() < 0:
                raise ValueError(f"connection {conn.id} is already closed")
            items.append((conn, Parked(conn.info, idle_ms)))
        for i in range(0, len(items), MAX_BATCH):
            chunk = items[i : i + MAX_BATCH]
            msg = Park(tuple(p for _, p in chunk))
            self._send(msg, [c.sock.fileno() for c, _ in chunk])
            for c, _ in chunk:
                c.sock.close()

    def _send(self, msg, fds=()):
        if self._sock.fileno() < 0:
            raise WorkerError("the channel is closed")
        _send_message(self._sock, msg, self._version, fds)

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
