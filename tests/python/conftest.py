"""Shared fixtures of kvferry's Python tests.

Every test runs against its own in-process config store on a free loopback port, and engines
listen on port 0, so tests may run in parallel (ctest -j). Timeouts are short so that a failure
shows up as a failed assertion, not as a CTest timeout.
"""

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import kvferry

SOURCE_DIR = os.environ.get(
    "KVF_SOURCE_DIR", os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
EXAMPLE = os.path.join(SOURCE_DIR, "examples", "test_transfer_engine.py")

# Bounds for engines made by the fixtures: how long a peer is waited for, and a transfer.
INIT_TIMEOUT_MS = 3000
OP_TIMEOUT_MS = 10000


@pytest.fixture
def store():
    srv = kvferry.StoreServer("tcp://127.0.0.1:0")
    yield srv
    srv.stop()


def make_engine(store_url, role="Both", **cfg):
    cfg.setdefault("init_timeout_ms", INIT_TIMEOUT_MS)
    cfg.setdefault("op_timeout_ms", OP_TIMEOUT_MS)
    e = kvferry.TransferEngine(**cfg)
    rc = e.initialize(store_url, "127.0.0.1:0", role, 0)
    assert rc == 0, f"initialize: {rc} {kvferry.get_last_err_msg()}"
    return e


@pytest.fixture
def pair(store):
    """(decode, prefill): two initialized engines sharing the store."""
    d = make_engine(store.url, "Decode")
    p = make_engine(store.url, "Prefill")
    yield d, p
    p.destroy()
    d.destroy()


def free_port():
    """A port nobody listens on now, below the ephemeral range: a port bind() picks (port 0) is
    one an outgoing connection of another test may take before the caller binds it (the seed
    flow's Prefill once found its session port taken so, with tests opening hundreds of
    connections beside it)."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(low, 10001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below %d in 200 tries" % low)


class Procs:
    """Child processes that are always reaped, even when the test fails or times out."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.procs = []

    def start(self, name, args, env=None):
        out = open(self.tmp_path / f"{name}.out", "w+")
        p = subprocess.Popen([sys.executable] + args, stdout=out, stderr=subprocess.STDOUT,
                             env=env, start_new_session=True)
        self.procs.append((name, p, out))
        return p

    def wait(self, p, timeout):
        try:
            return p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def output(self, name):
        for n, _, out in self.procs:
            if n == name:
                out.flush()
                out.seek(0)
                return out.read()
        raise KeyError(name)

    def wait_output(self, name, needle, timeout):
        """Poll name's output until it contains needle (bounded); return whether it did."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if needle in self.output(name):
                return True
            time.sleep(0.02)
        return False

    def close(self):
        for _, p, out in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            out.close()


@pytest.fixture
def procs(tmp_path):
    ps = Procs(tmp_path)
    yield ps
    ps.close()


def wait_port(port, timeout):
    """Wait until something accepts connections on 127.0.0.1:port."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def max_stall_while(fn):
    """Call fn() on this thread while a ticker thread runs Python code; return (fn's result, the
    longest the ticker could not run during the call). A call that holds the GIL stalls the
    ticker for as long as it runs."""
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.monotonic())
            sum(range(100))

    t = threading.Thread(target=ticker)
    t.start()
    while not ticks:
        time.sleep(0.001)
    start = time.monotonic()
    result = fn()
    end = time.monotonic()
    stop.set()
    t.join()
    inside = [start] + [x for x in ticks if start <= x <= end] + [end]
    return result, max(b - a for a, b in zip(inside, inside[1:]))
