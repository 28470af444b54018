"""Threads: the GIL is released during every blocking call, and one engine serves several
Python threads transferring at once."""

import threading
import time

import numpy as np

import kvferry
from conftest import make_engine, max_stall_while

MiB = 1 << 20


def test_two_threads_transfer_at_once_through_one_engine(pair):
    d, p = pair
    n_threads, rounds, size = 2, 20, 4 * MiB
    dst = np.zeros(n_threads * size, dtype=np.uint8)
    assert d.register_memory(dst) == 0
    srcs = [np.full(size, 17 + i, dtype=np.uint8) for i in range(n_threads)]
    errors = []
    done_at = []
    barrier = threading.Barrier(n_threads)

    # A third call on the same engine stays inside C for init_timeout_ms (waiting for a session
    # that never appears). The workers' transfers must all complete meanwhile: proof that calls
    # run concurrently through one engine, which a held GIL or an engine-wide lock would prevent.
    blocked = {}

    def blocker():
        blocked["start"] = time.monotonic()
        blocked["rc"] = p.transfer_sync_write("127.0.0.1:9", srcs[0], 4096)
        blocked["end"] = time.monotonic()

    def worker(i):
        barrier.wait()
        remote = dst.ctypes.data + i * size
        for r in range(rounds):
            op = p.transfer_sync_write if r % 2 == 0 else p.transfer_sync_read
            buf = srcs[i] if r % 2 == 0 else np.empty(size, dtype=np.uint8)
            rc = op(d.session_id, buf, remote)
            if rc != 0:
                errors.append((i, r, rc, kvferry.get_last_err_msg()))
            elif r % 2 == 1 and not np.array_equal(buf, srcs[i]):
                errors.append((i, r, "read back wrong bytes"))
        done_at.append(time.monotonic())

    b = threading.Thread(target=blocker)
    b.start()
    while "start" not in blocked:
        time.sleep(0.001)
    time.sleep(0.05)  # let it enter the C call
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads + [b]:
        t.join(60)
    assert not any(t.is_alive() for t in threads + [b])
    assert errors == []
    for i in range(n_threads):
        assert np.array_equal(dst[i * size:(i + 1) * size], srcs[i])
    assert blocked["rc"] == -kvferry.KVF_ENOTFOUND
    assert len(done_at) == n_threads and max(done_at) < blocked["end"], \
        "the workers could not transfer while another call was inside the engine"


def test_gil_released_while_transfer_waits(store):
    with make_engine(store.url, "Prefill", init_timeout_ms=1500) as p:
        src = np.zeros(4096, dtype=np.uint8)
        t = time.monotonic()
        rc, stall = max_stall_while(lambda: p.transfer_sync_write("127.0.0.1:9", src, 4096))
        assert rc == -kvferry.KVF_ENOTFOUND
        assert time.monotonic() - t >= 1.0, "the call was expected to wait for the peer"
        assert stall < 0.5, f"the main thread stalled {stall:.2f} s: the GIL was held"


def test_gil_released_during_large_transfers(pair):
    """A watcher thread running Python code sees a 64 MiB write half done. That is only possible
    if the call released the GIL while it copied: with the GIL held, the watcher runs only
    between calls, when every byte is either the old round's or the new one's. No timing
    threshold: under any load, a held GIL can never produce the mixed snapshot."""
    d, p = pair
    size = 64 * MiB
    dst = np.zeros(size, dtype=np.uint8)
    src = np.empty(size, dtype=np.uint8)
    assert d.register_memory(dst) == 0
    # Sample points away from both ends (memmove implementations copy the first and last
    # vectors out of order); tobytes() of 8 bytes copies under the GIL, so one snapshot is atomic
    # with respect to any call that holds it.
    probe = dst[MiB::8 * MiB]
    seen = threading.Event()
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if len(set(probe.tobytes())) > 1:
                seen.set()
                return

    w = threading.Thread(target=watch)
    w.start()
    try:
        for r in range(1, 41):  # bounded: 40 writes of 64 MiB
            src.fill(r)
            assert p.transfer_sync_write(d.session_id, src, dst.ctypes.data) == 0
            assert set(probe.tobytes()) == {r} and dst[0] == r and dst[-1] == r
            if seen.is_set():
                break
    finally:
        stop.set()
        w.join(10)
    assert not w.is_alive()
    assert seen.is_set(), "in 40 writes of 64 MiB the watcher never ran while one was half done"


def test_gil_released_in_store_waits_and_peer_regions(store):
    st = kvferry.Store(store.url)
    val, stall = max_stall_while(lambda: st.get("absent", wait_ms=800))
    assert val is None and stall < 0.4, stall
    with make_engine(store.url, init_timeout_ms=800) as e:
        def regions():
            try:
                return e.peer_regions("127.0.0.1:9")
            except kvferry.Error as err:
                return err.code
        code, stall = max_stall_while(regions)
        assert code == -kvferry.KVF_ENOTFOUND and stall < 0.4, stall
    st.close()


def test_destroy_while_another_thread_transfers(store):
    """destroy() releases a transfer waiting on another thread for its peer: it ends with
    KVF_ECLOSED at once, not after the 8 s init timeout. Whether the transfer has reached the wait
    when destroy() starts or not, the code is the same."""
    p = make_engine(store.url, "Prefill", init_timeout_ms=8000)
    src = np.zeros(4096, dtype=np.uint8)
    results = []
    t = threading.Thread(target=lambda: results.append(
        p.transfer_sync_write("127.0.0.1:9", src, 4096)))
    t.start()
    time.sleep(0.2)  # usually lets the transfer reach its wait; the assertions hold either way
    start = time.monotonic()
    assert p.destroy() == 0
    t.join(10)
    assert not t.is_alive()
    assert time.monotonic() - start < 2.0
    assert results == [-kvferry.KVF_ECLOSED]
    assert p.transfer_sync_write("127.0.0.1:9", src, 4096) == -kvferry.KVF_ECLOSED
