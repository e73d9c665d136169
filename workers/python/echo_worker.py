#!/usr/bin/env python3
"""baton-echo in Python: echoes every byte a client sends back to it.

Usage: echo_worker.py [--register PATH] [--capacity N] [--protocol 1|2]

Started by ``baton --no-sandbox ... -- python3 echo_worker.py`` it takes its
channel from the acceptor (BATON_CHANNEL_FD); under a sandbox profile it
refuses to start, since it cannot confine itself (exit 78). With
``--register PATH`` it connects to the acceptor's worker socket instead and
joins the pool. It offers protocol version 2 (batched handoff) unless
``--protocol 1`` makes it a version 1 worker. One thread per connection;
each connection is reported DONE after its socket is closed (it parks
nothing). On DRAIN, or when the acceptor goes away, it takes no more
connections, lets the open ones finish, and exits 0.
"""

import argparse
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baton_worker  # noqa: E402


def log(text, level="info"):
    """One stderr line in baton's shared style (text or JSON, as the
    acceptor's --log-format says)."""
    baton_worker.log(level, "baton-echo-py", text)


class InFlight:
    """Counts open connections so that the worker can wait for them on exit."""

    def __init__(self):
        self.count = 0
        self.cond = threading.Condition()

    def add(self, n):
        with self.cond:
            self.count += n
            if self.count == 0:
                self.cond.notify_all()

    def wait_zero(self):
        with self.cond:
            self.cond.wait_for(lambda: self.count == 0)


def serve(worker, conn, inflight):
    try:
        with conn.sock as s:
            while True:
                data = s.recv(16 * 1024)
                if not data:
                    break
                s.sendall(data)
    except OSError as e:
        log(f"connection {conn.id}: {e}", "warn")
    # The socket is closed by now: only then is the connection done.
    try:
        worker.done(conn.id)
    except (OSError, baton_worker.WorkerError) as e:
        log(f"cannot report connection {conn.id} done: {e}", "warn")
    inflight.add(-1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--register", metavar="PATH", help="join through this worker socket")
    p.add_argument("--capacity", type=int, default=0, metavar="N",
                   help="most concurrent connections (0: the acceptor decides)")
    p.add_argument("--protocol", type=int, choices=(1, 2), default=baton_worker.VERSION,
                   help="the highest protocol version to offer (default %(default)s)")
    args = p.parse_args()
    if not 0 <= args.capacity <= 0xFFFF_FFFF:
        p.error(f"--capacity {args.capacity}: out of range")
    try:
        if args.register:
            worker = baton_worker.Worker.register(args.register, args.capacity, args.protocol)
        else:
            worker = baton_worker.Worker.from_env(args.capacity, args.protocol)
    except baton_worker.SandboxUnsupported as e:
        log(str(e), "error")
        return baton_worker.EXIT_SANDBOX  # fail closed; not restarted
    except (OSError, baton_worker.WorkerError) as e:
        log(str(e), "error")
        return 1
    log(f"worker {worker.id} ready (protocol {worker.version})")
    inflight = InFlight()
    served = 0
    status = 0
    try:
        for ev in worker:  # connections until DRAIN or the acceptor goes away
            if isinstance(ev, baton_worker.Conn):
                served += 1
                inflight.add(1)
                t = threading.Thread(target=serve, args=(worker, ev, inflight), daemon=True)
                t.start()
    except (OSError, baton_worker.WorkerError) as e:
        log(str(e), "error")
        status = 1
    # Finish what we have, then exit.
    inflight.wait_zero()
    log(f"worker {worker.id} exiting after {served} connections")
    return status


if __name__ == "__main__":
    sys.exit(main())
