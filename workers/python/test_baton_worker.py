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
from baton_worker import Ack, ConnInfo, Done, Drain, Hello, ProtocolError, Welcome


def h(text):
    return bytes.fromhex(text)


# (message, wire bytes). Each line of hex is one field of the table:
# header [version=1][kind][reserved u16], then the body in table order.
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
]


def fds_open():
    return len(os.listdir("/proc/self/fd"))


class Codec(unittest.TestCase):
    def test_vectors_encode_to_the_table_bytes(self):
        for msg, wire in VECTORS:
            with self.subTest(msg=msg):
                self.assertEqual(bw.encode(msg), wire)

    def test_vectors_decode_back(self):
        for msg, wire in VECTORS:
            with self.subTest(msg=msg):
                self.assertEqual(bw.decode(wire, msg.kind.fd_count), msg)

    def test_lengths_are_the_table_lengths(self):
        self.assertEqual(bw.MAX_MSG, 520)
        self.assertEqual(len(bw.encode(Hello(1))), 16)
        self.assertEqual(len(bw.encode(Welcome(1))), 8)
        self.assertEqual(len(bw.encode(VECTORS[3][0])), 64)
        self.assertEqual(len(bw.encode(Ack(tuple(range(64))))), bw.MAX_MSG)
        self.assertEqual(len(bw.encode(Drain())), 4)

    def test_only_conn_carries_an_fd(self):
        self.assertEqual([k.fd_count for k in bw.Kind], [0, 0, 1, 0, 0, 0])

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
        ]:
            with self.subTest(msg=bad):
                with self.assertRaises((ValueError, OSError)):
                    bw.encode(bad)
        with self.assertRaises(TypeError):
            bw.encode(b"\x01\x06\x00\x00")


class Malformed(unittest.TestCase):
    def refused(self, data, fds=0, why=""):
        with self.assertRaises(ProtocolError) as cm:
            bw.decode(data, fds)
        self.assertIn(why, str(cm.exception))

    def test_short_and_oversized(self):
        self.refused(b"", why="shorter than the 4-byte header")
        self.refused(h("010600"), why="shorter")
        big = bw.encode(Ack(tuple(range(64)))) + b"\0"
        self.refused(big, why="exceeds the maximum of 520")

    def test_header(self):
        self.refused(h("02 06 0000"), why="unsupported protocol version 2")
        self.refused(h("00 06 0000"), why="version 0")
        for kind in (0, 7, 99, 255):
            self.refused(bytes([1, kind, 0, 0]), why=f"unknown message kind {kind}")
        self.refused(h("01 06 0100"), why="non-zero reserved")
        self.refused(h("01 06 0001"), why="non-zero reserved")

    def test_fd_counts(self):
        ack = bw.encode(Ack((5, 6)))
        self.refused(ack, fds=1, why="carries 1 file descriptors, expected 0")
        conn = bw.encode(VECTORS[3][0])
        self.refused(conn, fds=0, why="CONN message carries 0 file descriptors, expected 1")
        self.refused(conn, fds=2, why="expected 1")
        # A DRAIN's bytes relabelled CONN: refused for its fd count first.
        self.refused(h("01 03 0000"), fds=0, why="file descriptors")

    def test_every_fixed_length_is_exact(self):
        for msg, wire in VECTORS:
            if isinstance(msg, (Ack, Done)):
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
                self.refused(too_many, why="exceeds")  # 528 bytes: oversized
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
    what the worker sent."""

    def __init__(self):
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def send(self, msg, fds=()):
        data = msg if isinstance(msg, bytes) else bw.encode(msg)
        socket.send_fds(self.ours, [data], list(fds))

    def conn(self, cid, sock, listener=0):
        info = ConnInfo(cid, listener, sock.getpeername(), sock.getsockname())
        self.send(info, [sock.fileno()])
        return info

    def read(self):
        """The next message the worker sent, None at EOF; never blocks.

        Not socket.recv_fds: many Python versions ignore its flags
        argument (CPython gh-107898), so MSG_DONTWAIT would block."""
        data, anc, flags, _ = self.ours.recvmsg(
            bw.MAX_MSG + 1, socket.CMSG_SPACE(4 * 4), socket.MSG_DONTWAIT
        )
        fds = [fd for _, _, d in anc for fd in struct.unpack(f"{len(d) // 4}i", d)]
        for fd in fds:
            os.close(fd)
        assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
        if not data:
            return None
        return bw.decode(data, len(fds))

    def assert_nothing_more(self, test):
        with test.assertRaises(BlockingIOError):
            self.read()

    def worker(self, worker_id=3, capacity=0):
        self.send(Welcome(worker_id))
        w = bw.Worker(self.theirs, capacity)
        return w

    def close(self):
        self.ours.close()
        self.theirs.close()


class Channel(unittest.TestCase):
    def setUp(self):
        self.acc = FakeAcceptor()
        self.addCleanup(self.acc.close)

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
        self.acc.ours.send(bw.encode(Ack(tuple(range(64)))) + b"\0")
        self.assert_violation(w, "truncated")

    def test_malformed_bytes_end_the_channel(self):
        w = self.acc.worker()
        self.acc.send(h("01 06 0000 00"))
        self.assert_violation(w, "DRAIN message has length 5, expected 4")


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


if __name__ == "__main__":
    unittest.main()
