"""No reference or memory leaks over 10,000 calls, on the success and the error paths."""

import gc
import sys
import tracemalloc

import numpy as np

import kvferry

CALLS = 10_000


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_no_reference_leaks_over_10000_calls(pair):
    d, p = pair
    dst = np.zeros(1 << 16, dtype=np.uint8)
    assert d.register_memory(dst) == 0
    remote = dst.ctypes.data
    src_np = np.ones(4096, dtype=np.uint8)
    src_ba = bytearray(4096)
    sid = d.session_id
    objs = [src_np, src_ba, sid, dst, d, p]

    def one_round():
        assert p.transfer_sync_write(sid, src_np, remote) == 0
        assert p.transfer_sync_read(sid, src_ba, remote) == 0
        assert p.transfer_sync_write(sid, src_np.ctypes.data, remote, 4096) == 0
        assert p.batch_transfer_sync_write(sid, [src_np, src_ba], [remote, remote + 4096]) == 0
        assert p.transfer_sync_write(sid, src_np, 8) == -kvferry.KVF_ENOTREG
        # try/except rather than pytest.raises, whose kept tracebacks would hold references.
        try:
            p.transfer_sync_write(sid, 1.5, remote, 10)
            raise AssertionError("no TypeError")
        except TypeError:
            pass
        try:
            p.batch_transfer_sync_write(sid, [src_np], [remote, remote], [1, 1])
            raise AssertionError("no ValueError")
        except ValueError:
            pass
        assert p.get_rpc_port() > 0
        kvferry.get_last_err_msg()

    for _ in range(200):  # warm-up: caches, interned objects, peer connections
        one_round()
    gc.collect()
    before = [sys.getrefcount(o) for o in objs]
    print("reference counts before:", before)
    tracemalloc.start()
    snap0 = tracemalloc.take_snapshot()
    rss0 = rss_kib()
    for _ in range(CALLS):
        one_round()
    gc.collect()
    snap1 = tracemalloc.take_snapshot()
    rss1 = rss_kib()
    tracemalloc.stop()
    after = [sys.getrefcount(o) for o in objs]
    assert after == before, f"reference counts changed: {before} -> {after}"
    grown = sum(s.size_diff for s in snap1.compare_to(snap0, "filename"))
    assert grown < 64 * 1024, f"Python heap grew by {grown} bytes over {CALLS} rounds"
    assert rss1 - rss0 < 8 * 1024, f"RSS grew by {rss1 - rss0} KiB over {CALLS} rounds"


def test_no_leaks_in_register_unregister(pair):
    d, _ = pair
    buf = np.zeros(4096, dtype=np.uint8)
    ba = bytearray(4096)
    base = (sys.getrefcount(buf), sys.getrefcount(ba))
    for _ in range(2000):
        assert d.register_memory(buf) == 0
        assert d.register_memory(ba) == 0
        assert d.unregister_memory(buf) == 0
        assert d.unregister_memory(ba) == 0
        assert d.batch_register_memory([buf, ba]) == 0
        assert d.unregister_memory(buf.ctypes.data) == 0
        assert d.unregister_memory(ba) == 0
    gc.collect()
    assert (sys.getrefcount(buf), sys.getrefcount(ba)) == base
    ba.extend(b"x")  # no buffer export left behind


def test_no_leaks_in_engine_lifecycle_and_store(store):
    before = rss_kib()
    st = kvferry.Store(store.url)
    for i in range(300):
        e = kvferry.TransferEngine(init_timeout_ms=2000)
        assert e.initialize(store.url, "127.0.0.1:0", "Both", 0) == 0
        st.set(f"k{i % 10}", b"v" * 100)
        assert st.get(f"k{i % 10}") == b"v" * 100
        del e
    st.close()
    gc.collect()
    assert rss_kib() - before < 16 * 1024
