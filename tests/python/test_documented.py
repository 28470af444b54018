"""Documented behaviours of the module that no other test showed (issue 18): the namespace=
keyword keeps engines apart, set_log_level changes what the C library logs, and the
tcp_conns_per_peer, tcp_chunk_bytes and lease_ttl_ms keywords are validated and take effect."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import kvferry
from conftest import make_engine

INIT_TIMEOUT_MS = 300


def test_namespace_keeps_engines_apart(store):
    d = make_engine(store.url, "Decode", namespace="alpha", init_timeout_ms=INIT_TIMEOUT_MS)
    pa = make_engine(store.url, "Prefill", namespace="alpha", init_timeout_ms=INIT_TIMEOUT_MS)
    pb = make_engine(store.url, "Prefill", namespace="beta", init_timeout_ms=INIT_TIMEOUT_MS)
    try:
        dst = np.zeros(256 * 1024, dtype=np.uint8)
        src = np.random.default_rng(1).integers(0, 256, dst.nbytes, dtype=np.uint8)
        assert d.register_memory(dst) == 0

        # Another namespace: exactly what a session nobody runs gives, after init_timeout_ms.
        for sid in [d.session_id, "127.0.0.1:9"]:
            t = time.monotonic()
            rc = pb.transfer_sync_write(sid, src, dst.ctypes.data)
            took = time.monotonic() - t
            msg = kvferry.get_last_err_msg()
            assert rc == -kvferry.KVF_ENOTFOUND, (rc, msg)
            assert f"peer session {sid} did not appear in the store" in msg, msg
            # The engine counts whole milliseconds: it may give up up to 1 ms before 300.0.
            assert INIT_TIMEOUT_MS / 1000 - 0.002 <= took < INIT_TIMEOUT_MS / 1000 + 3, (sid, took)
        assert not dst.any(), "bytes from another namespace landed"
        assert pb.wait_for_peer(d.session_id, timeout=0.2) == -kvferry.KVF_ETIMEDOUT
        assert (f"peer {d.session_id} did not appear in namespace beta"
                in kvferry.get_last_err_msg())
        assert pb.get_peer_events(timeout=0) == []

        # The same namespace: it works, every byte.
        assert pa.wait_for_peer(d.session_id, timeout=2) == 0
        assert pa.get_peer_events(timeout=2) == [("joined", d.session_id)]
        assert pa.transfer_sync_write(d.session_id, src, dst.ctypes.data) == 0, \
            kvferry.get_last_err_msg()
        assert np.array_equal(src, dst)

        # The records are under kvferry/v1/<namespace>/.
        with kvferry.Store(store.url) as st:
            assert st.get(f"kvferry/v1/alpha/sessions/{d.session_id}") is not None
            assert st.get(f"kvferry/v1/alpha/regions/{d.session_id}") is not None
            assert st.get(f"kvferry/v1/beta/sessions/{pb.session_id}") is not None
            for e in (d, pa, pb):
                assert st.get(f"kvferry/v1/default/sessions/{e.session_id}") is None
    finally:
        pb.destroy()
        pa.destroy()
        d.destroy()


def test_bad_namespace_is_a_code(store):
    e = kvferry.TransferEngine(namespace="a/b")
    assert e.initialize(store.url, "127.0.0.1:0", "Both", 0) == -kvferry.KVF_EINVAL
    assert kvferry.get_last_err_msg() == \
        "namespace \"a/b\": only letters, digits, '_', '.', '-'"
    assert e.session_id is None


# A child process: KVFERRY_LOG_LEVEL says error; the script turns debug on, creates an engine
# (whose create logs a debug line), turns it back to warn and creates another. Markers on stderr
# tell the phases apart.
LOG_CHILD = textwrap.dedent("""
    import sys, kvferry
    url = sys.argv[1]
    def phase(name, level):
        if level is not None:
            assert kvferry.set_log_level(level) == 0
        print("PHASE " + name, file=sys.stderr, flush=True)
        e = kvferry.TransferEngine(init_timeout_ms=3000)
        assert e.initialize(url, "127.0.0.1:0", "Both", 0) == 0, kvferry.get_last_err_msg()
        e.destroy()
    phase("env-error", None)
    phase("debug", 0)
    assert kvferry.set_log_level(9) == -kvferry.KVF_EINVAL  # refused: the level stays debug
    phase("after-refused", None)
    phase("warn", 2)
    print("PHASE end", file=sys.stderr, flush=True)
""")


def test_set_log_level_changes_what_is_logged(store):
    env = dict(os.environ, KVFERRY_LOG_LEVEL="error")
    p = subprocess.run([sys.executable, "-c", LOG_CHILD, store.url], env=env,
                       capture_output=True, text=True, timeout=60, start_new_session=True)
    assert p.returncode == 0, p.stderr
    phases = {}
    name = None
    for line in p.stderr.splitlines():
        if line.startswith("PHASE "):
            name = line[6:]
            phases[name] = []
        elif name:
            phases[name].append(line)
    assert list(phases) == ["env-error", "debug", "after-refused", "warn", "end"], p.stderr
    want = "device id 0: host memory (no device memory kinds are built)"
    for name, on in [("env-error", False), ("debug", True), ("after-refused", True),
                     ("warn", False)]:
        debug = [line for line in phases[name] if " DEBUG " in line]
        if on:
            assert any(want in line for line in debug), (name, phases[name])
        else:
            assert debug == [], (name, debug)


@pytest.mark.parametrize("field,value,msg", [
    ("tcp_conns_per_peer", 0, "config.tcp_conns_per_peer 0: want 1..16"),
    ("tcp_conns_per_peer", 17, "config.tcp_conns_per_peer 17: want 1..16"),
    ("tcp_chunk_bytes", 65535, "config.tcp_chunk_bytes 65535: want 65536..67108864"),
    ("tcp_chunk_bytes", (64 << 20) + 1,
     "config.tcp_chunk_bytes 67108865: want 65536..67108864"),
    ("lease_ttl_ms", 0, "lease_ttl_ms (0) must be > 0"),
    ("lease_ttl_ms", 24 * 3600 * 1000 + 1, "config.lease_ttl_ms 86400001 exceeds 86400000"),
])
def test_config_limits_are_codes(store, field, value, msg):
    e = kvferry.TransferEngine(**{field: value})
    assert e.initialize(store.url, "127.0.0.1:0", "Both", 0) == -kvferry.KVF_EINVAL
    assert msg in kvferry.get_last_err_msg()
    assert e.session_id is None


def test_config_limits_accepted_and_used(store):
    """The edges of each range are accepted, and transfers work with them (one connection,
    smallest and largest chunk), every byte compared."""
    d = make_engine(store.url, "Decode", lease_ttl_ms=24 * 3600 * 1000)
    try:
        dst = np.zeros(3 << 20, dtype=np.uint8)
        assert d.register_memory(dst) == 0
        for i, cfg in enumerate([dict(tcp_conns_per_peer=1, tcp_chunk_bytes=64 << 10),
                                 dict(tcp_conns_per_peer=16, tcp_chunk_bytes=64 << 20),
                                 dict(lease_ttl_ms=200)]):
            with make_engine(store.url, "Prefill", **cfg) as p:
                src = np.random.default_rng(i).integers(0, 256, dst.nbytes, dtype=np.uint8)
                assert p.transfer_sync_write(d.session_id, src, dst.ctypes.data) == 0, \
                    (cfg, kvferry.get_last_err_msg())
                assert np.array_equal(src[::-1], dst[::-1]), cfg
    finally:
        d.destroy()


# A child holding an engine with a short lease; killed without a chance to withdraw its record.
LEASE_CHILD = textwrap.dedent("""
    import sys, kvferry
    e = kvferry.TransferEngine(lease_ttl_ms=int(sys.argv[2]), init_timeout_ms=3000)
    assert e.initialize(sys.argv[1], "127.0.0.1:0", "Decode", 0) == 0, kvferry.get_last_err_msg()
    print(e.session_id, flush=True)
    sys.stdin.read()
""")


def test_lease_ttl_ms_bounds_how_long_a_dead_engine_is_seen(store):
    """A SIGKILLed engine's session vanishes once its lease_ttl_ms ran out: well before the
    default 5 s with a 600 ms lease, and not before its last keep-alive's TTL (>= 2/3 of it)."""
    ttl_ms = 600
    child = subprocess.Popen([sys.executable, "-c", LEASE_CHILD, store.url, str(ttl_ms)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        sid = child.stdout.readline().strip()
        assert sid.startswith("127.0.0.1:"), sid
        with make_engine(store.url, "Prefill") as watcher:
            assert watcher.get_peer_events(timeout=5) == [("joined", sid)]
            t = time.monotonic()
            os.killpg(child.pid, signal.SIGKILL)
            assert watcher.get_peer_events(timeout=5) == [("left", sid)]
            took = time.monotonic() - t
            assert ttl_ms * 2 / 3 / 1000 - 0.05 <= took < ttl_ms / 1000 + 1.0, took
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        child.stdin.close()
        child.stdout.close()
