"""Unit tests of baton_worker: the codec against byte strings written out
from the wire table in workers/sdk/src/proto.rs, malformed messages, and the
worker's channel handling against a fake acceptor on a socketpair.

Run: python3 -m unittest discover -s workers/python
"""

import os
import socket
import struct
import tempfile
import threading
import unittest

import baton_worker as bw
from baton_worker import (
    Ack,
    ConnInfo,
    Conns,
    Done,
    Drain,
    Hello,
    Park,
    Parked,
    ProtocolError,
    Welcome,
)


def h(text):
    return bytes.fromhex(text)


# Conn records (60 bytes) written out from the table: id u64 @0, listener
# u16 @8, reserved u16 @10, peer @12, local @36; an address is family u8,
# reserved u8, port u16, scope u32, 16 address bytes.
REC_A = ConnInfo(id=5, listener=1, peer=("127.0.0.1", 5555), local=("::1", 80, 0, 0))
REC_A_WIRE = (
    "0500000000000000"  # id
    "0100"  # listener
    "0000"  # reserved
    "04 00 b315 00000000 7f000001 000000000000000000000000"  # 127.0.0.1:5555
    "06 00 5000 00000000 00000000000000000000000000000001"  # [::1]:80
)
REC_B = ConnInfo(
    id=0x0102030405060708,
    listener=0x0A0B,
    peer=("2001:db8::42", 0xFFFF, 0, 7),
    local=("10.1.2.3", 8080),
)
REC_B_WIRE = (
    "0807060504030201"
    "0b0a"
    "0000"
    "06 00 ffff 07000000 20010db8000000000000000000000042"
    "04 00 901f 00000000 0a010203 000000000000000000000000"
)
REC_C = ConnInfo(id=2**64 - 1, listener=0, peer=("10.0.0.1", 1), local=("10.0.0.2", 2))
REC_C_WIRE = (
    "ffffffffffffffff"
    "0000"
    "0000"
    "04 00 0100 00000000 0a000001 000000000000000000000000"
    "04 00 0200 00000000 0a000002 000000000000000000000000"
)

# (message, wire bytes). Each line of hex is one field of the table:
# header [version][kind][reserved u16], then the body in table order. The
# version is the header's: encode(msg, version=wire[0]) gives the bytes.
VECTORS = [
    (
        Hello(pid=4242, capacity=7),
        h("01 01 0000" "92100000" "07000000" "00000000"),
    ),
    (Hello(pid=0xFFFFFFFF, capacity=0), h("01 01 0000" "ffffffff" "00000000" "00000000")),
    (Welcome(worker_id=9), h("01 02 0000" "09000000")),
    (
        ConnInfo(
            id=2**64 - 4,
            listener=2,
            peer=("127.0.0.1", 5555),
            local=("::1", 80, 0, 3),
        ),
        h(
            "01 03 0000"
            "fcffffffffffffff"  # id u64 @4
            "0200"  # listener u16 @12
            "0000"  # reserved u16 @14
            # peer @16: family 4, reserved, port 5555 = 0x15b3, scope 0, 127.0.0.1 + 12 zeros
            "04 00 b315 00000000 7f000001 000000000000000000000000"
            # local @40: family 6, reserved, port 80, scope 3, ::1
            "06 00 5000 03000000 00000000000000000000000000000001"
        ),
    ),
    (
        ConnInfo(
            id=0x0102030405060708,
            listener=0x0A0B,
            peer=("2001:db8::42", 0xFFFF, 0, 0),
            local=("10.1.2.3", 8080),
        ),
        h(
            "01 03 0000"
            "0807060504030201"
            "0b0a"
            "0000"
            "06 00 ffff 00000000 20010db8000000000000000000000042"
            "04 00 901f 00000000 0a010203 000000000000000000000000"
        ),
    ),
    (
        Ack(ids=(1, 2, 3)),
        h(
            "01 04 0000" "0300" "0000"
            "0100000000000000" "0200000000000000" "0300000000000000"
        ),
    ),
    (Done(ids=(2**64 - 1,)), h("01 05 0000" "0100" "0000" "ffffffffffffffff")),
    (
        Done(ids=tuple(range(64))),
        h("01 05 0000" "4000" "0000" + "".join(f"{i:02x}00000000000000" for i in range(64))),
    ),
    (Drain(), h("01 06 0000")),
    # Version 2: the version 1 kinds in a version 2 header...
    (Hello(pid=4242, capacity=7), h("02 01 0000" "92100000" "07000000" "00000000")),
    (Welcome(worker_id=0x01020304), h("02 02 0000" "04030201")),
    (REC_A, h("02 03 0000" + REC_A_WIRE)),
    (Ack(ids=(9,)), h("02 04 0000" "0100" "0000" "0900000000000000")),
    (Done(ids=(1, 2)), h("02 05 0000" "0200" "0000" "0100000000000000" "0200000000000000")),
    (Drain(), h("02 06 0000")),
    # ... and the batch kinds: n u16 @4, reserved u16 @6, records @8.
    (Conns(conns=(REC_C,)), h("02 07 0000" "0100" "0000" + REC_C_WIRE)),
    (
        Conns(conns=(REC_A, REC_B, REC_C)),
        h("02 07 0000" "0300" "0000" + REC_A_WIRE + REC_B_WIRE + REC_C_WIRE),
    ),
    (
        Conns(conns=tuple(REC_C if i % 2 else REC_A for i in range(64))),
        h("02 07 0000" "4000" "0000" + (REC_A_WIRE + REC_C_WIRE) * 32),
    ),
    # PARK: each record followed by its idle ms u32 (59000 = 0xe678).
    (
        Park(conns=(Parked(REC_B, idle_ms=59000), Parked(REC_A, idle_ms=0))),
        h("02 08 0000" "0200" "0000" + REC_B_WIRE + "78e60000" + REC_A_WIRE + "00000000"),
    ),
    (
        Park(conns=(Parked(REC_C, idle_ms=2**32 - 1),)),
        h("02 08 0000" "0100" "0000" + REC_C_WIRE + "ffffffff"),
    ),
]

FULL_PARK = Park(tuple(Parked(REC_A, i) for i in range(64)))


def fds_open():
    return len(os.listdir("/proc/self/fd"))


class Codec(unittest.TestCase):
    def test_vectors_encode_to_the_table_bytes(self):
        for msg, wire in VECTORS:
            with self.subTest(msg=msg):
                self.assertEqual(bw.encode(msg, version=wire[0]), wire)

    def test_vectors_decode_back(self):
        for msg, wire in VECTORS:
            with self.subTest(msg=msg):
                self.assertEqual(bw.decode(wire, bw.fd_count(msg)), msg)
                self.assertEqual(bw.decode(wire, bw.fd_count(msg), version=wire[0]), msg)
                self.assertEqual(bw.kind_fd_count(wire), bw.fd_count(msg))
                self.assertEqual(bw.version_of(wire), wire[0])

    def test_every_kind_has_a_vector_in_every_version_it_exists_in(self):
        have = {(wire[0], wire[1]) for _, wire in VECTORS}
        want = {(v, k) for k in bw.Kind for v in (1, 2) if k.since <= v}
        self.assertEqual(want - have, set())

    def test_the_default_version_is_2(self):
        self.assertEqual(bw.VERSION, 2)
        self.assertEqual(bw.VERSION_MIN, 1)
        self.assertEqual(bw.encode(Drain()), h("02 06 0000"))
        self.assertEqual(bw.encode(Drain(), version=1), h("01 06 0000"))

    def test_lengths_are_the_table_lengths(self):
        self.assertEqual(bw.MAX_MSG, 8 + 64 * 64)
        self.assertEqual(len(bw.encode(Hello(1))), 16)
        self.assertEqual(len(bw.encode(Welcome(1))), 8)
        self.assertEqual(len(bw.encode(VECTORS[3][0])), 64)
        self.assertEqual(len(bw.encode(Ack(tuple(range(64))))), 8 + 8 * 64)
        self.assertEqual(len(bw.encode(Drain())), 4)
        for n in (1, 2, 64):
            self.assertEqual(len(bw.encode(Conns((REC_A,) * n))), 8 + 60 * n)
            self.assertEqual(len(bw.encode(Park((Parked(REC_A),) * n))), 8 + 64 * n)
        self.assertEqual(len(bw.encode(FULL_PARK)), bw.MAX_MSG, "a full PARK is the largest")

    def test_fd_counts(self):
        self.assertEqual([k.fd_count for k in bw.Kind], [0, 0, 1, 0, 0, 0, 0, 0])
        self.assertEqual([k.since for k in bw.Kind], [1, 1, 1, 1, 1, 1, 2, 2])
        self.assertEqual(bw.fd_count(REC_A), 1)
        self.assertEqual(bw.fd_count(Conns((REC_A, REC_B, REC_C))), 3)
        self.assertEqual(bw.fd_count(FULL_PARK), 64)
        self.assertEqual(bw.fd_count(Ack((1,))), 0)
        self.assertEqual(bw.kind_fd_count(bw.encode(FULL_PARK)), 64)
        self.assertEqual(bw.kind_fd_count(h("02 07 00")), 0, "too short to say")
        self.assertEqual(bw.kind_fd_count(h("02 63 0000")), 0, "unknown kind")

    def test_id_batches_split_at_64(self):
        batches = bw.id_batches(range(150), bw.Kind.DONE)
        self.assertEqual([len(b.ids) for b in batches], [64, 64, 22])
        self.assertEqual(batches[2], Done(tuple(range(128, 150))))
        self.assertEqual(bw.id_batches([], bw.Kind.ACK), [])
        self.assertIsInstance(bw.id_batches([1], bw.Kind.ACK)[0], Ack)

    def test_unencodable_messages_are_refused(self):
        for bad in [
            Ack(()),
            Done(tuple(range(65))),
            Ack((2**64,)),
            Ack((-1,)),
            Hello(pid=-1),
            Hello(pid=1, capacity=2**32),
            Welcome(2**32),
            ConnInfo(1, 2**16, ("127.0.0.1", 1), ("127.0.0.1", 2)),
            ConnInfo(1, 0, ("127.0.0.1", 70000), ("127.0.0.1", 2)),
            ConnInfo(1, 0, ("127.0.0.1", 1, 0, 0), ("127.0.0.1", 2)),
            ConnInfo(1, 0, ("not an address", 1), ("127.0.0.1", 2)),
            Conns(()),
            Conns((REC_A,) * 65),
            Conns((ConnInfo(-1, 0, ("127.0.0.1", 1), ("127.0.0.1", 2)),)),
            Park(()),
            Park((Parked(REC_A),) * 65),
            Park((Parked(REC_A, idle_ms=2**32),)),
            Park((Parked(REC_A, idle_ms=-1),)),
        ]:
            with self.subTest(msg=bad):
                with self.assertRaises((ValueError, OSError)):
                    bw.encode(bad)
        with self.assertRaises(TypeError):
            bw.encode(b"\x01\x06\x00\x00")
        with self.assertRaises(TypeError):
            bw.encode(Park((REC_A,)))  # records of a PARK are Parked
        with self.assertRaises(TypeError):
            bw.encode(Conns((Parked(REC_A),)))

    def test_versions_are_checked_when_encoding(self):
        for bad in (0, 3, None):
            with self.subTest(version=bad):
                with self.assertRaisesRegex(ValueError, "protocol version"):
                    bw.encode(Drain(), version=bad)
        for msg in (Conns((REC_A,)), FULL_PARK):
            with self.subTest(msg=msg.kind):
                with self.assertRaisesRegex(ValueError, "needs protocol version 2"):
                    bw.encode(msg, version=1)


class Malformed(unittest.TestCase):
    def refused(self, data, fds=0, why="", version=None):
        with self.assertRaises(ProtocolError) as cm:
            bw.decode(data, fds, version)
        self.assertIn(why, str(cm.exception))

    def test_short_and_oversized(self):
        self.refused(b"", why="shorter than the 4-byte header")
        self.refused(h("010600"), why="shorter")
        big = bw.encode(FULL_PARK) + b"\0"
        self.refused(big, 64, why="exceeds the maximum of 4104")

    def test_header(self):
        self.refused(h("03 06 0000"), why="unsupported protocol version 3")
        self.refused(h("00 06 0000"), why="version 0")
        for kind in (0, 9, 99, 255):
            self.refused(bytes([2, kind, 0, 0]), why=f"unknown message kind {kind}")
        self.refused(h("01 06 0100"), why="non-zero reserved")
        self.refused(h("01 06 0001"), why="non-zero reserved")
        self.refused(h("02 06 0100"), why="non-zero reserved")

    def test_batch_kinds_need_a_version_2_header(self):
        for msg, wire in VECTORS:
            if msg.kind.since == 2:
                with self.subTest(msg=msg.kind):
                    v1 = b"\x01" + wire[1:]
                    self.refused(v1, bw.fd_count(msg), why="needs protocol version 2")

    def test_the_channel_version_is_enforced(self):
        self.refused(h("01 06 0000"), why="on a channel that agreed on version 2", version=2)
        self.refused(h("02 06 0000"), why="on a channel that agreed on version 1", version=1)
        self.assertEqual(bw.decode(h("01 06 0000"), 0, version=1), Drain())

    def test_fd_counts(self):
        ack = bw.encode(Ack((5, 6)))
        self.refused(ack, fds=1, why="carries 1 file descriptors, expected 0")
        conn = bw.encode(VECTORS[3][0])
        self.refused(conn, fds=0, why="CONN message carries 0 file descriptors, expected 1")
        self.refused(conn, fds=2, why="expected 1")
        # A DRAIN's bytes relabelled CONN: refused for its fd count first.
        self.refused(h("01 03 0000"), fds=0, why="file descriptors")

    def test_batches_carry_one_fd_per_record(self):
        three = bw.encode(Conns((REC_A, REC_B, REC_C)))
        park = bw.encode(Park((Parked(REC_A), Parked(REC_B))))
        for fds in (0, 1, 2, 4, 64):
            self.refused(three, fds, why=f"CONNS message carries {fds} file descriptors, expected 3")
        for fds in (0, 1, 3):
            self.refused(park, fds, why=f"PARK message carries {fds} file descriptors, expected 2")

    def test_every_fixed_length_is_exact(self):
        for msg, wire in VECTORS:
            if isinstance(msg, (Ack, Done, Conns, Park)):
                continue
            fds = msg.kind.fd_count
            with self.subTest(msg=msg):
                if len(wire) > 4:
                    self.refused(wire[:-1], fds, why="has length")
                self.refused(wire + b"\0", fds, why="has length")

    def test_reserved_body_fields(self):
        hello = bytearray(bw.encode(Hello(1, 2)))
        hello[12] = 1
        self.refused(bytes(hello), why="HELLO message has a non-zero reserved field")
        conn = bytearray(VECTORS[3][1])
        conn[15] = 1
        self.refused(bytes(conn), 1, why="CONN message has a non-zero reserved field")
        ack = bytearray(bw.encode(Ack((1,))))
        ack[7] = 1
        self.refused(bytes(ack), why="ACK message has a non-zero reserved field")

    def test_batch_reserved_fields(self):
        for kind, msg, size in (
            ("CONNS", Conns((REC_A, REC_B, REC_C)), 60),
            ("PARK", Park((Parked(REC_A), Parked(REC_B), Parked(REC_C))), 64),
        ):
            wire = bw.encode(msg)
            with self.subTest(kind=kind):
                for at in (6, 7):  # reserved u16 after the count
                    bad = bytearray(wire)
                    bad[at] = 1
                    self.refused(bytes(bad), 3, why=f"{kind} message has a non-zero reserved")
                for i in range(3):  # reserved u16 @10 of each record
                    bad = bytearray(wire)
                    bad[8 + size * i + 10] = 1
                    self.refused(bytes(bad), 3, why=f"{kind} message has a non-zero reserved")
                    bad = bytearray(wire)
                    bad[8 + size * i + 12 + 1] = 1  # reserved byte of the peer
                    self.refused(bytes(bad), 3, why="reserved byte")
                bad = bytearray(wire)
                bad[8 + size * 2 + 36] = 5  # family of the last record's local
                self.refused(bytes(bad), 3, why="bad socket address family 5")

    def test_batch_counts_and_lengths(self):
        for kind, size in ((7, 60), (8, 64)):
            name = bw.Kind(kind).name
            rec = bytes(bw.encode(Park((Parked(REC_A),)))[8:8 + size])
            with self.subTest(kind=name):
                self.refused(bytes([2, kind, 0, 0, 1, 0]), 1, why=f"has length 6, expected {8 + size}")
                self.refused(bytes([2, kind, 0, 0]), 0, why="has length 4")
                self.refused(bytes([2, kind, 0, 0, 0, 0, 0, 0]), 0, why="carries 0 records")
                self.refused(
                    bytes([2, kind, 0, 0, 65, 0, 0, 0]) + rec * 64, 65,
                    why="carries 65 records (allowed 1..=64)",
                )
                # The count must match the length: 3 said, 2 there, and back.
                two = bytes([2, kind, 0, 0, 3, 0, 0, 0]) + rec * 2
                self.refused(two, 3, why=f"has length {8 + 2 * size}, expected {8 + 3 * size}")
                self.refused(two, 2, why="has length")
                one_more = bytes([2, kind, 0, 0, 1, 0, 0, 0]) + rec * 2
                self.refused(one_more, 1, why=f"expected {8 + size}")
                self.refused(one_more[:-1], 1, why="has length")

    def test_addresses(self):
        conn = VECTORS[3][1]
        for offset in (16, 40):
            bad = bytearray(conn)
            bad[offset] = 5
            self.refused(bytes(bad), 1, why="bad socket address family 5")
            bad = bytearray(conn)
            bad[offset + 1] = 1
            self.refused(bytes(bad), 1, why="reserved byte")
        bad = bytearray(conn)
        bad[16 + 8 + 4] = 1  # IPv4 peer: padding after the 4 address bytes
        self.refused(bytes(bad), 1, why="IPv4 socket address has non-zero padding")
        bad = bytearray(conn)
        bad[16 + 4] = 1  # IPv4 peer: a scope id
        self.refused(bytes(bad), 1, why="padding")

    def test_id_counts(self):
        for kind in (4, 5):
            with self.subTest(kind=kind):
                self.refused(bytes([1, kind, 0, 0, 1, 0]), why="has length 6, expected 16")
                self.refused(bytes([1, kind, 0, 0, 0, 0, 0, 0]), why="carries 0 ids")
                too_many = bytes([1, kind, 0, 0, 65, 0, 0, 0]) + bytes(8 * 65)
                self.refused(too_many, why="carries 65 ids")
                self.refused(bytes([1, kind, 0, 0, 65, 0, 0, 0]) + bytes(8), why="carries 65 ids")
                two = bytes([1, kind, 0, 0, 2, 0, 0, 0]) + bytes(8)
                self.refused(two, why="has length 16, expected 24")
                self.refused(two + bytes(16), why="has length 32, expected 24")


def tcp_pair():
    """A connected loopback pair: (client, server side as accepted)."""
    with socket.create_server(("127.0.0.1", 0)) as lst:
        client = socket.create_connection(lst.getsockname())
        server, _ = lst.accept()
    return client, server


class FakeAcceptor:
    """The acceptor's end of a channel: sends raw messages with fds, reads
    what the worker sent. Its messages carry ``version`` (the one its
    WELCOME chooses)."""

    def __init__(self, version=bw.VERSION):
        self.version = version
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def send(self, msg, fds=()):
        data = msg if isinstance(msg, bytes) else bw.encode(msg, self.version)
        socket.send_fds(self.ours, [data], list(fds))

    def conn(self, cid, sock, listener=0):
        info = ConnInfo(cid, listener, sock.getpeername(), sock.getsockname())
        self.send(info, [sock.fileno()])
        return info

    def read_raw(self):
        """The next message the worker sent as ``(bytes, fds)``, with the
        fds it carried (the caller owns them); never blocks.

        Not socket.recv_fds: many Python versions ignore its flags
        argument (CPython gh-107898), so MSG_DONTWAIT would block."""
        data, anc, flags, _ = self.ours.recvmsg(
            bw.MAX_MSG + 1, socket.CMSG_SPACE(4 * bw.MAX_BATCH), socket.MSG_DONTWAIT
        )
        fds = [fd for _, _, d in anc for fd in struct.unpack(f"{len(d) // 4}i", d)]
        assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
        return data, fds

    def read_with_fds(self):
        """The next message the worker sent, decoded (in the channel's
        version), with its fds; None at EOF."""
        data, fds = self.read_raw()
        if not data:
            return None, fds
        return bw.decode(data, len(fds), self.version), fds

    def read(self):
        """The next message the worker sent, None at EOF; its fds closed."""
        msg, fds = self.read_with_fds()
        for fd in fds:
            os.close(fd)
        return msg

    def assert_nothing_more(self, test):
        with test.assertRaises(BlockingIOError):
            self.read()

    def worker(self, worker_id=3, capacity=0, version=bw.VERSION):
        """A worker offering ``version``, welcomed in this acceptor's."""
        self.send(Welcome(worker_id))
        w = bw.Worker(self.theirs, capacity, version)
        return w

    def close(self):
        self.ours.close()
        self.theirs.close()


class Channel(unittest.TestCase):
    def setUp(self):
        self.acc = FakeAcceptor()
        self.addCleanup(self.acc.close)

    def test_a_conns_whose_fds_do_not_all_arrive_costs_only_those(self):
        # At its fd limit the kernel installs the first fds of a CONNS and
        # drops the rest: those connections are acknowledged and reported
        # done at once, the others are served, the channel goes on.
        import resource

        w = self.acc.worker()
        self.acc.read()  # HELLO
        pairs = [socket.socketpair() for _ in range(5)]
        self.addCleanup(lambda: [s.close() for p in pairs for s in p])
        infos = [ConnInfo(10 + i, 0, ("127.0.0.1", 1), ("127.0.0.1", 2)) for i in range(5)]
        self.acc.send(bw.Conns(infos), [b.fileno() for _, b in pairs])
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        open_now = len(os.listdir("/proc/self/fd"))
        # Room for two more fds (listdir's own is closed again).
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 1, hard))
        try:
            first = w.recv()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        got = [first]
        while True:
            try:
                got.append(w._queued.popleft())
            except IndexError:
                break
        self.assertTrue(all(isinstance(e, bw.Conn) for e in got), got)
        served = [e.id for e in got]
        self.assertGreaterEqual(len(served), 1)
        self.assertLess(len(served), 5)
        self.assertEqual(served, [10 + i for i in range(len(served))])
        for e in got:
            e.sock.close()
        dropped = [10 + i for i in range(len(served), 5)]
        self.assertEqual(self.acc.read(), bw.Ack(tuple(served)))
        self.assertEqual(self.acc.read(), bw.Ack(tuple(dropped)))
        self.assertEqual(self.acc.read(), bw.Done(tuple(dropped)))
        w.close()

    def test_handshake_says_hello_with_pid_and_capacity(self):
        w = self.acc.worker(worker_id=42, capacity=5)
        self.assertEqual(w.id, 42)
        self.assertEqual(self.acc.read(), Hello(os.getpid(), 5))
        self.acc.assert_nothing_more(self)

    def test_capacity_never_exceeds_the_fd_limit(self):
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        w = self.acc.worker(worker_id=1, capacity=0)
        got = self.acc.read()
        self.assertTrue(0 < got.capacity < soft, got)
        w.close()
        acc = FakeAcceptor()
        self.addCleanup(acc.close)
        w = acc.worker(worker_id=2, capacity=soft * 2)
        self.assertLess(acc.read().capacity, soft)
        w.close()

    def test_handshake_refuses_anything_but_welcome(self):
        self.acc.send(Drain())
        with self.assertRaises(ProtocolError) as cm:
            bw.Worker(self.acc.theirs)
        self.assertIn("instead of WELCOME", str(cm.exception))
        self.assertEqual(self.acc.theirs.fileno(), -1, "channel closed")

    def test_handshake_sees_the_acceptor_leave(self):
        self.acc.ours.close()
        with self.assertRaises(bw.WorkerError) as cm:
            bw.Worker(self.acc.theirs)
        self.assertIn("closed the channel before WELCOME", str(cm.exception))

    def test_handshake_sees_the_acceptor_leave_after_hello(self):
        def acceptor():
            self.acc.ours.recv(bw.MAX_MSG)
            self.acc.ours.shutdown(socket.SHUT_RDWR)

        t = threading.Thread(target=acceptor)
        t.start()
        with self.assertRaisesRegex(bw.WorkerError, "closed the channel before WELCOME"):
            bw.Worker(self.acc.theirs)
        t.join(10)

    def test_a_batch_is_acked_in_one_message_before_the_first_conn_is_returned(self):
        w = self.acc.worker()
        self.acc.read()  # HELLO
        clients, infos = [], []
        for cid in (10, 11, 12):
            client, server = tcp_pair()
            clients.append(client)
            server.setblocking(False)  # the acceptor accepts non-blocking
            infos.append(self.acc.conn(cid, server, listener=cid - 10))
            server.close()  # the worker's copy is the only one now
        self.acc.send(Drain())

        first = w.recv()
        self.assertEqual(self.acc.read(), Ack((10, 11, 12)))
        self.acc.assert_nothing_more(self)
        events = [first, w.recv(), w.recv(), w.recv()]
        self.assertEqual(events[3], Drain())
        for ev, info, client in zip(events, infos, clients):
            self.assertIsInstance(ev, bw.Conn)
            got = (ev.id, ev.listener, ev.peer, ev.local)
            self.assertEqual(got, (info.id, info.listener, info.peer, info.local))
            self.assertEqual(ev.peer, ev.sock.getpeername())
            self.assertTrue(ev.sock.getblocking(), "blocking, and the fd agrees")
            self.assertTrue(os.get_blocking(ev.sock.fileno()))
            if bw._CMSG_CLOEXEC:
                self.assertFalse(ev.sock.get_inheritable(), "received close-on-exec")
            client.sendall(b"ping")
            self.assertEqual(ev.sock.recv(4), b"ping")
            ev.sock.close()
            client.close()
        self.acc.assert_nothing_more(self)

    def test_more_than_64_conns_are_acked_in_batches_of_64(self):
        w = self.acc.worker()
        self.acc.read()
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        for cid in range(70):
            self.acc.send(ConnInfo(cid, 0, ("127.0.0.1", 1), ("127.0.0.1", 2)), [b.fileno()])
        got = [w.recv() for _ in range(70)]
        self.assertEqual(self.acc.read(), Ack(tuple(range(64))))
        self.assertEqual(self.acc.read(), Ack(tuple(range(64, 70))))
        self.acc.assert_nothing_more(self)
        self.assertEqual([c.id for c in got], list(range(70)))
        for c in got:
            c.sock.close()

    def test_done_and_done_many(self):
        w = self.acc.worker()
        self.acc.read()
        w.done(7)
        w.done_many(range(100))
        w.done_many([])
        self.assertEqual(self.acc.read(), Done((7,)))
        self.assertEqual(self.acc.read(), Done(tuple(range(64))))
        self.assertEqual(self.acc.read(), Done(tuple(range(64, 100))))
        self.acc.assert_nothing_more(self)

    def test_eof_is_closed_and_the_iterator_stops(self):
        w = self.acc.worker()
        self.acc.send(Drain())
        self.assertEqual(list(w), [Drain()])
        self.acc.ours.close()
        self.assertEqual(list(w), [bw.Closed()])
        self.assertEqual(w.recv(), bw.Closed())

    def assert_violation(self, w, why):
        with self.assertRaises(ProtocolError) as cm:
            w.recv()
        self.assertIn(why, str(cm.exception))
        self.assertEqual(w.fileno(), -1, "the channel is closed after a violation")
        with self.assertRaises(bw.WorkerError):
            w.done(1)

    def test_an_fd_on_a_message_without_one_is_closed_and_refused(self):
        w = self.acc.worker()
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        before = fds_open()
        self.acc.send(Drain(), [b.fileno(), a.fileno()])
        self.assert_violation(w, "DRAIN message carries 2 file descriptors")
        self.assertEqual(fds_open(), before - 1, "both received fds and the channel closed")

    def test_a_conn_with_two_fds_is_refused_and_both_are_closed(self):
        w = self.acc.worker()
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        before = fds_open()
        self.acc.send(ConnInfo(1, 0, ("127.0.0.1", 1), ("127.0.0.1", 2)), [a.fileno(), b.fileno()])
        self.assert_violation(w, "CONN message carries 2 file descriptors, expected 1")
        self.assertEqual(fds_open(), before - 1)

    def test_a_violation_after_conns_in_the_same_batch_acks_none_and_closes_them(self):
        w = self.acc.worker()
        self.acc.read()
        client, server = tcp_pair()
        self.addCleanup(client.close)
        self.acc.conn(1, server)
        server.close()
        self.acc.send(h("01 09 0000"))
        before = fds_open()
        self.assert_violation(w, "unknown message kind 9")
        self.assertEqual(fds_open(), before - 1, "channel closed, conn fd received and closed")
        self.assertIsNone(self.acc.read(), "no ACK: only EOF")
        client.settimeout(5)
        self.assertEqual(client.recv(1), b"", "the connection's last copy was closed")

    def test_worker_kinds_from_the_acceptor_are_refused(self):
        for msg in (Hello(1), Welcome(1), Ack((1,)), Done((1,))):
            with self.subTest(msg=msg):
                acc = FakeAcceptor()
                self.addCleanup(acc.close)
                w = acc.worker()
                acc.send(msg)
                self.assert_violation(w, "is not an acceptor-to-worker message")

    def test_a_conn_whose_fd_is_not_a_socket_is_refused(self):
        w = self.acc.worker()
        r, wr = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, wr)
        before = fds_open()
        self.acc.send(ConnInfo(1, 0, ("127.0.0.1", 1), ("127.0.0.1", 2)), [r])
        self.assert_violation(w, "not a socket")
        self.assertEqual(fds_open(), before - 1)

    def test_an_oversized_message_is_truncation(self):
        w = self.acc.worker()
        self.acc.ours.send(bytes([1]) * (bw.MAX_MSG + 100))
        self.assert_violation(w, "truncated")

    def test_a_message_of_exactly_max_msg_plus_one_is_refused(self):
        w = self.acc.worker()
        self.acc.ours.send(bw.encode(FULL_PARK) + b"\0")
        self.assert_violation(w, "truncated")

    def test_malformed_bytes_end_the_channel(self):
        w = self.acc.worker()
        self.acc.send(h("01 06 0000 00"))
        self.assert_violation(w, "DRAIN message has length 5, expected 4")


class Versions(unittest.TestCase):
    """HELLO offers the highest version; WELCOME's is used from then on."""

    def test_hello_offers_version_2_and_a_welcome_of_2_is_used(self):
        acc = FakeAcceptor(version=2)
        self.addCleanup(acc.close)
        w = acc.worker()
        self.addCleanup(w.close)
        data, _ = acc.read_raw()
        self.assertEqual(data[0], 2, "HELLO's header offers version 2")
        self.assertEqual(bw.decode(data, 0).pid, os.getpid())
        self.assertEqual(w.version, 2)
        self.assertTrue(w.can_park)
        w.done(4)
        data, _ = acc.read_raw()
        self.assertEqual(data, h("02 05 0000 0100 0000 0400000000000000"))

    def test_a_welcome_of_1_makes_a_version_1_channel(self):
        acc = FakeAcceptor(version=1)  # a version 1 acceptor
        self.addCleanup(acc.close)
        w = acc.worker()
        self.assertEqual(acc.read_raw()[0][0], 2, "it still offered 2")
        self.assertEqual(w.version, 1)
        self.assertFalse(w.can_park)
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        acc.send(ConnInfo(6, 0, ("127.0.0.1", 1), ("127.0.0.1", 2)), [b.fileno()])
        ev = w.recv()
        self.assertEqual(ev.id, 6)
        ev.sock.close()
        data, _ = acc.read_raw()
        self.assertEqual(data, h("01 04 0000 0100 0000 0600000000000000"), "ACK in version 1")
        w.done(6)
        self.assertEqual(acc.read_raw()[0][0], 1)
        # A version 2 message on it ends the channel; so would a CONNS.
        acc.version = 2
        acc.send(Drain())
        with self.assertRaisesRegex(ProtocolError, "version 2 on a channel that agreed on version 1"):
            w.recv()
        self.assertEqual(w.fileno(), -1)

    def test_a_worker_forced_to_version_1_says_so_and_refuses_version_2(self):
        acc = FakeAcceptor(version=1)
        self.addCleanup(acc.close)
        w = acc.worker(version=1)
        self.assertEqual(acc.read_raw()[0][0], 1, "HELLO offers version 1")
        self.assertEqual(w.version, 1)
        with self.assertRaisesRegex(bw.WorkerError, "version 1: no parking"):
            w.park([])
        acc.assert_nothing_more(self)
        # A CONNS in a version 1 header: a kind newer than its version.
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        before = fds_open()
        acc.send(b"\x01" + bw.encode(Conns((REC_A,)))[1:], [b.fileno()])
        with self.assertRaisesRegex(ProtocolError, "CONNS needs protocol version 2"):
            w.recv()
        self.assertEqual(fds_open(), before - 1, "the fd received and closed, the channel closed")

    def test_a_welcome_newer_than_the_hello_is_refused(self):
        acc = FakeAcceptor(version=2)
        self.addCleanup(acc.close)
        with self.assertRaisesRegex(ProtocolError, "HELLO of protocol version 1 with a WELCOME of version 2"):
            acc.worker(version=1)
        self.assertEqual(acc.theirs.fileno(), -1, "channel closed")

    def test_a_v1_message_on_a_v2_channel_is_refused(self):
        acc = FakeAcceptor(version=2)
        self.addCleanup(acc.close)
        w = acc.worker()
        acc.send(h("01 06 0000"))
        with self.assertRaisesRegex(ProtocolError, "version 1 on a channel that agreed on version 2"):
            w.recv()

    def test_unsupported_versions_are_refused_before_anything_is_sent(self):
        acc = FakeAcceptor()
        self.addCleanup(acc.close)
        for v in (0, 3):
            with self.assertRaisesRegex(ValueError, "protocol version"):
                bw.Worker(acc.theirs, 0, v)
        acc.assert_nothing_more(self)


class V2Worker(unittest.TestCase):
    """A worker welcomed in version 2, its HELLO read."""

    def setUp(self):
        self.acc = FakeAcceptor(version=2)
        self.addCleanup(self.acc.close)
        self.w = self.acc.worker()
        self.addCleanup(self.w.close)
        self.acc.read()  # HELLO


class Batches(V2Worker):
    """CONNS: several connections and their fds in one message."""

    def conns(self, n):
        """Sends ``n`` real TCP connections in one CONNS; returns the
        clients and the records."""
        clients, infos, servers = [], [], []
        for i in range(n):
            client, server = tcp_pair()
            self.addCleanup(client.close)
            server.setblocking(False)  # the acceptor accepts non-blocking
            clients.append(client)
            servers.append(server)
            infos.append(ConnInfo(100 + i, i, server.getpeername(), server.getsockname()))
        self.acc.send(Conns(tuple(infos)), [s.fileno() for s in servers])
        for s in servers:
            s.close()  # the worker's copies are the only ones now
        return clients, infos

    def test_a_conns_of_3_delivers_3_conns_acked_in_one_message(self):
        before = fds_open()
        clients, infos = self.conns(3)
        self.assertEqual(fds_open(), before + 3, "3 clients, the servers in flight")
        first = self.w.recv()
        self.assertEqual(self.acc.read(), Ack((100, 101, 102)))
        self.acc.assert_nothing_more(self)
        events = [first, self.w.recv(), self.w.recv()]
        self.assertEqual(fds_open(), before + 6, "the 3 received fds are all kept")
        for ev, info, client in zip(events, infos, clients):
            self.assertIsInstance(ev, bw.Conn)
            self.assertEqual(ev.info, info)
            self.assertEqual(ev.peer, ev.sock.getpeername())
            self.assertTrue(os.get_blocking(ev.sock.fileno()))
            if bw._CMSG_CLOEXEC:
                self.assertFalse(ev.sock.get_inheritable(), "received close-on-exec")
        # Each fd is its own connection, in the order of the records.
        for ev, client in zip(events, clients):
            client.sendall(b"ping %d" % ev.id)
        for ev in events:
            self.assertEqual(ev.sock.recv(16), b"ping %d" % ev.id)
            ev.sock.sendall(b"pong")
        for client in clients:
            self.assertEqual(client.recv(4), b"pong")
        for ev in events:
            ev.sock.close()
        self.assertEqual(fds_open(), before + 3)

    def test_conns_and_conn_in_one_read_are_acked_together(self):
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        self.acc.send(Conns((REC_A, REC_B)), [a.fileno(), b.fileno()])
        self.acc.send(REC_C, [a.fileno()])
        self.acc.send(Conns(tuple(ConnInfo(i, 0, ("127.0.0.1", 1), ("127.0.0.1", 2)) for i in range(70, 134))), [b.fileno()] * 64)
        got = [self.w.recv() for _ in range(67)]
        self.assertEqual([c.id for c in got], [REC_A.id, REC_B.id, REC_C.id] + list(range(70, 134)))
        self.assertEqual(self.acc.read(), Ack((REC_A.id, REC_B.id, REC_C.id) + tuple(range(70, 131))))
        self.assertEqual(self.acc.read(), Ack(tuple(range(131, 134))))
        self.acc.assert_nothing_more(self)
        for c in got:
            c.sock.close()

    def violation(self, why):
        with self.assertRaises(ProtocolError) as cm:
            self.w.recv()
        self.assertIn(why, str(cm.exception))
        self.assertEqual(self.w.fileno(), -1, "the channel is closed after a violation")

    def test_a_conns_with_the_wrong_fd_count_is_refused_and_every_fd_closed(self):
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        for fds, n in (([a.fileno(), b.fileno(), a.fileno()], 2), ([a.fileno()], 2)):
            with self.subTest(fds=len(fds), records=n):
                self.setUp()  # a fresh worker per case
                before = fds_open()
                self.acc.send(Conns((REC_A, REC_B)[:n]), fds)
                self.violation(f"CONNS message carries {len(fds)} file descriptors, expected {n}")
                self.assertEqual(fds_open(), before - 1, "received fds closed, channel closed")

    def test_a_conns_with_an_fd_that_is_not_a_socket_acks_none_and_closes_all(self):
        client, server = tcp_pair()
        self.addCleanup(client.close)
        r, wr = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, wr)
        self.acc.send(Conns((REC_A, REC_B, REC_C)), [server.fileno(), r, server.fileno()])
        server.close()
        before = fds_open()
        self.violation(f"CONNS connection {REC_B.id} carries an fd that is not a socket")
        self.assertEqual(fds_open(), before - 1, "all 3 received fds closed, channel closed")
        self.assertIsNone(self.acc.read(), "no ACK: only EOF")
        client.settimeout(5)
        self.assertEqual(client.recv(1), b"", "the connection's copies were all closed")

    def test_a_violation_after_a_conns_in_the_same_batch_acks_none(self):
        clients, _ = self.conns(2)
        self.acc.send(h("02 08 0000"))  # a PARK from the acceptor, and malformed
        before = fds_open()
        self.violation("PARK message has length 4")
        self.assertEqual(fds_open(), before - 1)
        self.assertIsNone(self.acc.read(), "no ACK: only EOF")
        for c in clients:
            c.settimeout(5)
            self.assertEqual(c.recv(1), b"")

    def test_a_park_from_the_acceptor_is_refused_and_its_fds_closed(self):
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        before = fds_open()
        self.acc.send(Park((Parked(REC_A), Parked(REC_B))), [a.fileno(), b.fileno()])
        self.violation("PARK is not an acceptor-to-worker message")
        self.assertEqual(fds_open(), before - 1)


class Parking(V2Worker):
    """Worker.park hands connections back with their fds (PARK)."""

    def take(self, n):
        clients, servers = [], []
        for i in range(n):
            client, server = tcp_pair()
            self.addCleanup(client.close)
            clients.append(client)
            servers.append(server)
        infos = tuple(ConnInfo(10 + i, 0, s.getpeername(), s.getsockname()) for i, s in enumerate(servers))
        for i in range(0, n, 64):
            self.acc.send(Conns(infos[i:i + 64]), [s.fileno() for s in servers[i:i + 64]])
        for s in servers:
            s.close()
        events = [self.w.recv() for _ in range(n)]
        while True:
            try:
                self.acc.read()  # the ACKs
            except BlockingIOError:
                break
        return clients, events

    def test_park_sends_records_and_fds_and_closes_its_copies(self):
        clients, (c0, c1, c2) = self.take(3)
        before = fds_open()
        self.w.park([c0, (c2, 1500)])
        msg, fds = self.acc.read_with_fds()
        self.assertEqual(msg, Park((Parked(c0.info, 0), Parked(c2.info, 1500))))
        self.assertEqual(fds_open(), before + 2 - 2, "2 arrived here, the worker's 2 closed")
        self.assertEqual((c0.sock.fileno(), c2.sock.fileno()), (-1, -1))
        self.assertNotEqual(c1.sock.fileno(), -1, "the one not parked is untouched")
        # The fds are those connections, in order.
        for fd, client, tag in zip(fds, (clients[0], clients[2]), (b"zero", b"two!")):
            with socket.socket(fileno=fd) as s:
                client.sendall(tag)
                self.assertEqual(s.recv(4), tag)
        self.acc.assert_nothing_more(self)
        c1.sock.close()

    def test_park_splits_at_64(self):
        _, events = self.take(70)
        self.w.park(events)
        first, fds = self.acc.read_with_fds()
        self.assertEqual(len(first.conns), 64)
        self.assertEqual(len(fds), 64)
        for fd in fds:
            os.close(fd)
        second = self.acc.read()
        self.assertEqual([p.info.id for p in first.conns + second.conns], [e.id for e in events])
        self.assertTrue(all(e.sock.fileno() == -1 for e in events))
        self.acc.assert_nothing_more(self)

    def test_park_refuses_bad_arguments_before_sending(self):
        _, (c0,) = self.take(1)
        for bad in ([REC_A], [(c0, -1)], [(c0, 2**32)]):
            with self.subTest(bad=bad):
                with self.assertRaises((TypeError, ValueError)):
                    self.w.park(bad)
        self.acc.assert_nothing_more(self)
        self.assertNotEqual(c0.sock.fileno(), -1)
        c0.sock.close()
        with self.assertRaisesRegex(ValueError, "already closed"):
            self.w.park([c0])
        self.w.park([])
        self.acc.assert_nothing_more(self)

    def test_a_failed_park_leaves_the_connections_to_the_worker(self):
        _, (c0,) = self.take(1)
        self.acc.ours.close()
        with self.assertRaises(OSError):
            self.w.park([c0])
        self.assertNotEqual(c0.sock.fileno(), -1, "still the worker's")
        c0.sock.close()


class Setup(unittest.TestCase):
    def setUp(self):
        saved = os.environ.pop(bw.SANDBOX_ENV, None)
        if saved is not None:
            self.addCleanup(os.environ.__setitem__, bw.SANDBOX_ENV, saved)

    def test_from_env_takes_the_inherited_channel(self):
        acc = FakeAcceptor()
        self.addCleanup(acc.close)
        fd = acc.theirs.detach()
        os.set_blocking(fd, False)  # as the acceptor passes it
        os.set_inheritable(fd, True)
        acc.send(Welcome(8))
        os.environ[bw.CHANNEL_FD_ENV] = str(fd)
        self.addCleanup(os.environ.pop, bw.CHANNEL_FD_ENV, None)
        w = bw.Worker.from_env(capacity=2)
        self.addCleanup(w.close)
        self.assertEqual(w.id, 8)
        self.assertEqual(w.fileno(), fd)
        self.assertNotIn(bw.CHANNEL_FD_ENV, os.environ, "the variable is consumed")
        self.assertFalse(os.get_inheritable(fd), "close-on-exec")
        self.assertTrue(os.get_blocking(fd))
        self.assertEqual(acc.read(), Hello(os.getpid(), 2))

    def test_from_env_fails_closed_under_a_sandbox_profile(self):
        self.addCleanup(os.environ.pop, bw.SANDBOX_ENV, None)
        self.addCleanup(os.environ.pop, bw.CHANNEL_FD_ENV, None)
        os.environ[bw.SANDBOX_ENV] = "v=1;uid=65534"
        os.environ[bw.CHANNEL_FD_ENV] = "9"
        with self.assertRaisesRegex(bw.SandboxUnsupported, "--no-sandbox"):
            bw.Worker.from_env()
        self.assertEqual(os.environ[bw.CHANNEL_FD_ENV], "9", "the channel is not touched")
        self.assertEqual(bw.EXIT_SANDBOX, 78)

    def test_from_env_refuses_bad_channels(self):
        self.addCleanup(os.environ.pop, bw.CHANNEL_FD_ENV, None)
        os.environ.pop(bw.CHANNEL_FD_ENV, None)
        with self.assertRaisesRegex(bw.WorkerError, "is not set"):
            bw.Worker.from_env()
        for var in ("", "abc", "1", "-5"):
            os.environ[bw.CHANNEL_FD_ENV] = var
            with self.assertRaisesRegex(bw.WorkerError, "not a file descriptor number"):
                bw.Worker.from_env()
        r, wr = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, wr)
        os.environ[bw.CHANNEL_FD_ENV] = str(r)
        with self.assertRaisesRegex(bw.WorkerError, "unusable"):
            bw.Worker.from_env()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        os.environ[bw.CHANNEL_FD_ENV] = str(s.detach())
        with self.assertRaisesRegex(bw.WorkerError, "expected AF_UNIX/SOCK_SEQPACKET"):
            bw.Worker.from_env()

    def test_register_connects_and_says_hello(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "workers.sock")
            lst = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.addCleanup(lst.close)
            lst.bind(path)
            lst.listen()
            heard = []

            def acceptor():
                c, _ = lst.accept()
                with c:
                    data, fds, _, _ = socket.recv_fds(c, bw.MAX_MSG + 1, 4)
                    heard.append(bw.decode(data, len(fds)))
                    c.send(bw.encode(Welcome(77)))
                    c.recv(1)  # until the worker closes

            t = threading.Thread(target=acceptor)
            t.start()
            with bw.Worker.register(path, capacity=3) as w:
                self.assertEqual(w.id, 77)
            t.join(10)
            self.assertEqual(heard, [Hello(os.getpid(), 3)])
            nowhere = "cannot connect to the worker socket .*nowhere"
            with self.assertRaisesRegex(bw.WorkerError, nowhere):
                bw.Worker.register(os.path.join(d, "nowhere"))



class LogLines(unittest.TestCase):
    """The shared log style of every baton process (baton_sdk::log)."""

    def setUp(self):
        self.saved = os.environ.pop(bw.LOG_FORMAT_ENV, None)

    def tearDown(self):
        os.environ.pop(bw.LOG_FORMAT_ENV, None)
        if self.saved is not None:
            os.environ[bw.LOG_FORMAT_ENV] = self.saved

    def test_text_looks_like_the_rust_workers_lines(self):
        line = bw.log_line("info", "baton-echo-py", "hello 1")
        self.assertTrue(
            line.endswith(f"  INFO baton-echo-py{{pid={os.getpid()}}}: hello 1\n"), line
        )
        self.assertRegex(line, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z ")

    def test_json_when_asked(self):
        import json

        os.environ[bw.LOG_FORMAT_ENV] = "json"
        line = bw.log_line("warn", "baton-echo-py", "careful")
        self.assertTrue(line.endswith("\n") and line.count("\n") == 1)
        v = json.loads(line)
        self.assertEqual(v["level"], "WARN")
        self.assertEqual(v["fields"], {"message": "careful"})
        self.assertEqual(v["span"], {"pid": os.getpid(), "name": "baton-echo-py"})


if __name__ == "__main__":
    unittest.main()
