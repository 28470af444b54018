"""Asynchronous batches (Mooncake's names), notifications and peer events, in one process and
against a receiver in another process over tcp and shm. Every data test compares bytes."""

import gc
import os
import re
import signal
import sys
import threading
import time
import weakref

import numpy as np
import pytest

import kvferry
from conftest import INIT_TIMEOUT_MS, make_engine, max_stall_while

KiB = 1 << 10
MiB = 1 << 20
# A session nobody listens on: batches to it wait up to init_timeout_ms for it to appear.
MISSING = "127.0.0.1:9"


def rand_bytes(n, seed):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def err():
    return kvferry.get_last_err_msg()


def wait_done(engine, bid, timeout=10.0):
    """Poll transfer_check_status until it returns a final status (1 or negative)."""
    end = time.monotonic() + timeout
    while True:
        st = engine.transfer_check_status(bid)
        if st != 0 or time.monotonic() > end:
            return st
        time.sleep(0.001)


def assert_released(engine, bid):
    st = engine.transfer_check_status(bid)
    assert st == -kvferry.KVF_EINVAL, f"status of released id {bid}: {st}"
    assert f"batch id {bid}" in err(), err()


def take_notifications(engine, count, timeout=10.0):
    """Wait until count notifications have arrived; return them as a list of (sender, bytes)."""
    got = []
    end = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < end:
        got += engine.wait_notification(max(0.0, end - time.monotonic()))
    return got


# ---- batches ---------------------------------------------------------------------------------


def test_submit_write_check_status_and_wait(pair):
    d, p = pair
    dst = np.zeros(4 * MiB, dtype=np.uint8)
    assert d.register_memory(dst) == 0
    src = rand_bytes(4 * MiB, 1)

    bid = p.transfer_submit_write(d.session_id, src, dst.ctypes.data)
    assert bid >= 1, f"submit: {bid} {err()}"
    assert wait_done(p, bid) == 1, err()
    assert np.array_equal(dst, src)
    assert_released(p, bid)  # a final status releases the id

    src2 = rand_bytes(MiB, 2)
    bid2 = p.transfer_submit_write(d.session_id, src2.ctypes.data, dst.ctypes.data + MiB, MiB)
    assert bid2 > bid, (bid, bid2)  # ids are never reused
    assert p.transfer_wait(bid2, timeout=10) == 1, err()
    assert np.array_equal(dst[MiB:2 * MiB], src2)
    assert_released(p, bid2)
    # Ids that were never handed out, and a failed submit's code passed back by mistake.
    for bad in (0, -kvferry.KVF_EINVAL, 10**30, bid2 + 1000):
        assert p.transfer_check_status(bad) == -kvferry.KVF_EINVAL
        assert p.transfer_wait(bad, 0) == -kvferry.KVF_EINVAL
        assert p.transfer_cancel(bad) == -kvferry.KVF_EINVAL
        assert "is unknown" in err(), err()


def test_submit_read_torch_tensors(pair):
    torch = pytest.importorskip("torch", reason="torch is not installed for this interpreter")
    d, p = pair
    remote = torch.arange(MiB // 4, dtype=torch.int32)
    assert d.register_memory(remote) == 0
    local = torch.zeros(MiB // 4, dtype=torch.int32)
    bid = p.transfer_submit_read(d.session_id, local, remote.data_ptr())
    assert bid >= 1, err()
    assert p.transfer_wait(bid) == 1, err()
    assert torch.equal(local, remote)
    # Write a tensor slice back, into the middle of the remote tensor.
    piece = torch.full((1000,), -7, dtype=torch.int32)
    bid = p.transfer_submit_write(d.session_id, piece, remote.data_ptr() + 4000)
    assert p.transfer_wait(bid) == 1, err()
    assert torch.equal(remote[1000:2000], piece)
    assert remote[999] == 999 and remote[2000] == 2000


def test_batch_async_write_and_read(pair):
    d, p = pair
    n, size = 8, 256 * KiB
    dst = np.zeros(n * size, dtype=np.uint8)
    assert d.register_memory(dst) == 0
    srcs = [rand_bytes(size, 10 + i) for i in range(n)]
    # Scattered: element i goes to slot n-1-i.
    remotes = [dst.ctypes.data + (n - 1 - i) * size for i in range(n)]
    bid = p.batch_transfer_async_write(d.session_id, srcs, remotes)
    assert bid >= 1, err()
    assert p.transfer_element_status(bid) is not None  # valid before it is released
    assert p.transfer_wait(bid) == 1, err()
    for i in range(n):
        assert np.array_equal(dst[(n - 1 - i) * size:(n - i) * size], srcs[i]), f"element {i}"

    backs = [np.zeros(size, dtype=np.uint8) for _ in range(n)]
    bid = p.batch_transfer_async_read(d.session_id, backs, remotes, [size] * n)
    assert bid >= 1, err()
    assert wait_done(p, bid) == 1, err()
    for i in range(n):
        assert np.array_equal(backs[i], srcs[i]), f"element {i}"


def test_element_status_after_completion(pair):
    d, p = pair
    dst = np.zeros(64 * KiB, dtype=np.uint8)
    assert d.register_memory(dst) == 0
    src = rand_bytes(64 * KiB, 3)
    bid = p.batch_transfer_async_write(d.session_id, [src[:32 * KiB], src[32 * KiB:]],
                                       [dst.ctypes.data, dst.ctypes.data + 32 * KiB])
    assert p.transfer_wait(bid) == 1, err()
    assert_released(p, bid)
    bid = p.batch_transfer_async_write(d.session_id, [src[:32 * KiB], src[32 * KiB:]],
                                       [dst.ctypes.data, dst.ctypes.data + 32 * KiB])
    end = time.monotonic() + 10
    while p.transfer_element_status(bid) != [0, 0] and time.monotonic() < end:
        time.sleep(0.005)
    assert p.transfer_element_status(bid) == [0, 0]  # element status does not release the id
    assert p.transfer_check_status(bid) == 1
    assert np.array_equal(dst, src)
    with pytest.raises(kvferry.Error) as e:
        p.transfer_element_status(bid)
    assert e.value.code == -kvferry.KVF_EINVAL and f"batch id {bid}" in str(e.value)


def test_get_batch_transfer_status_waits_for_all_and_releases(pair):
    d, p = pair
    n, size = 16, 128 * KiB
    dst = np.zeros(n * size, dtype=np.uint8)
    assert d.register_memory(dst) == 0
    srcs = [rand_bytes(size, 100 + i) for i in range(n)]
    ids = [p.transfer_submit_write(d.session_id, srcs[i], dst.ctypes.data + i * size)
           for i in range(n)]
    assert all(i >= 1 for i in ids), (ids, err())
    assert p.get_batch_transfer_status(ids) == 0, err()
    for i in range(n):
        assert np.array_equal(dst[i * size:(i + 1) * size], srcs[i]), f"batch {i}"
    for bid in ids:
        assert_released(p, bid)

    # One failing batch among good ones: the first negative code, every id released.
    good = p.transfer_submit_write(d.session_id, srcs[0], dst.ctypes.data)
    bad = p.transfer_submit_write(d.session_id, srcs[1], 8)  # not inside any region
    good2 = p.transfer_submit_write(d.session_id, srcs[2], dst.ctypes.data + size)
    if bad < 0:  # the fast-fail may already refuse it at submit
        assert bad == -kvferry.KVF_ENOTREG, (bad, err())
        assert p.get_batch_transfer_status([good, good2]) == 0
    else:
        rc = p.get_batch_transfer_status([good, bad, good2])
        assert rc == -kvferry.KVF_ENOTREG, (rc, err())
        assert_released(p, bad)
    assert_released(p, good)
    assert_released(p, good2)
    # Unknown ids count as -KVF_EINVAL, named.
    assert p.get_batch_transfer_status([good]) == -kvferry.KVF_EINVAL
    assert f"batch id {good}" in err()
    assert p.get_batch_transfer_status([]) == 0


def test_many_batches_in_flight(store):
    d = make_engine(store.url, "Decode")
    p = make_engine(store.url, "Prefill", max_batches=1024, async_threads=4)
    try:
        n, size = 600, 16 * KiB
        dst = np.zeros(n * size, dtype=np.uint8)
        assert d.register_memory(dst) == 0
        src = rand_bytes(n * size, 7)
        ids = []
        for i in range(n):
            bid = p.transfer_submit_write(d.session_id, src[i * size:(i + 1) * size],
                                          dst.ctypes.data + i * size)
            assert bid >= 1, (i, bid, err())
            ids.append(bid)
        assert len(set(ids)) == n
        # Half by polling, half by one list wait.
        for bid in ids[: n // 2]:
            assert wait_done(p, bid) == 1, err()
        assert p.get_batch_transfer_status(ids[n // 2:]) == 0, err()
        assert np.array_equal(dst, src)
    finally:
        p.destroy()
        d.destroy()


def test_submit_busy_at_max_batches(store):
    p = make_engine(store.url, "Prefill", max_batches=2, async_threads=1)
    try:
        src = np.ones(4096, dtype=np.uint8)
        # Batches to a session that never appears stay pending for init_timeout_ms.
        a = p.transfer_submit_write(MISSING, src, 4096)
        b = p.transfer_submit_write(MISSING, src, 4096)
        assert a >= 1 and b >= 1, err()
        t0 = time.monotonic()
        c = p.transfer_submit_write(MISSING, src, 4096)
        assert c == -kvferry.KVF_EBUSY, (c, err())
        assert time.monotonic() - t0 < 1.0  # submit_blocks off: at once
        assert p.transfer_cancel(a) == 0 and p.transfer_cancel(b) == 0
        # Neither had moved a byte (the peer never appears): both fail as cancelled, not by
        # the lookup timing out.
        for bid in (a, b):
            st = p.transfer_wait(bid, INIT_TIMEOUT_MS / 1000 + 5)
            assert st == -kvferry.KVF_ECANCELED, (st, err())
    finally:
        p.destroy()


def test_submit_blocks_waits_for_room(store):
    d = make_engine(store.url, "Decode")
    p = make_engine(store.url, "Prefill", max_batches=2, async_threads=1, submit_blocks=True)
    try:
        dst = np.zeros(MiB, dtype=np.uint8)
        assert d.register_memory(dst) == 0
        src = rand_bytes(MiB, 9)
        ids = []
        for i in range(32):  # far more than max_batches: later submits wait for room
            bid = p.transfer_submit_write(d.session_id, src[i * 32 * KiB:(i + 1) * 32 * KiB],
                                          dst.ctypes.data + i * 32 * KiB)
            assert bid >= 1, (i, bid, err())
            ids.append(bid)
        assert p.get_batch_transfer_status(ids) == 0, err()
        assert np.array_equal(dst, src)
    finally:
        p.destroy()
        d.destroy()


def test_cancel(store):
    p = make_engine(store.url, "Prefill", async_threads=1)
    try:
        src = np.ones(4096, dtype=np.uint8)
        running = p.transfer_submit_write(MISSING, src, 4096)  # holds the only async thread
        queued = p.transfer_submit_write(MISSING, src, 4096, notify=b"never")
        assert running >= 1 and queued >= 1, err()
        assert p.transfer_check_status(queued) == 0
        t0 = time.monotonic()
        assert p.transfer_cancel(queued) == 0
        assert p.transfer_cancel(queued) == 0  # idempotent; the id is not released by cancel
        st = p.transfer_wait(queued, 2.0)
        assert st == -kvferry.KVF_ECANCELED, (st, err())
        assert time.monotonic() - t0 < 1.0, "a queued batch completes at once when cancelled"
        assert_released(p, queued)
        assert p.transfer_cancel(running) == 0
        t0 = time.monotonic()
        st = p.transfer_wait(running, INIT_TIMEOUT_MS / 1000 + 5)
        assert st == -kvferry.KVF_ECANCELED, (st, err())
        assert time.monotonic() - t0 < INIT_TIMEOUT_MS / 1000, "cancel waited for the lookup"
    finally:
        p.destroy()


def test_failed_element_gives_negative_status_naming_it(pair):
    d, p = pair
    dst = np.zeros(64 * KiB, dtype=np.uint8)
    assert d.register_memory(dst) == 0
    src = rand_bytes(16 * KiB, 4)
    outside = dst.ctypes.data + 64 * KiB  # just past the region
    bid = p.batch_transfer_async_write(d.session_id, [src, src, src],
                                       [dst.ctypes.data, outside, dst.ctypes.data + 16 * KiB])
    if bid < 0:  # refused at submit by the local fast-fail: the same code and message
        assert bid == -kvferry.KVF_ENOTREG, (bid, err())
        assert "element 1" in err(), err()
        return
    end = time.monotonic() + 10
    while p.transfer_element_status(bid)[1] == kvferry.KVF_XFER_PENDING and \
            time.monotonic() < end:
        time.sleep(0.005)
    elems = p.transfer_element_status(bid)
    assert elems[1] == -kvferry.KVF_ENOTREG, elems
    assert elems[2] == -kvferry.KVF_ECANCELED, elems  # never started after element 1 failed
    assert elems[0] in (0, -kvferry.KVF_ECANCELED), elems
    st = p.transfer_check_status(bid)
    assert st == -kvferry.KVF_ENOTREG, (st, err())
    assert "element 1" in err(), err()
    assert_released(p, bid)


def test_submit_argument_errors(pair):
    d, p = pair
    src = np.ones(16, dtype=np.uint8)
    with pytest.raises(TypeError):
        p.transfer_submit_write(d.session_id, 1.5, 4096, 16)
    with pytest.raises(TypeError):
        p.transfer_submit_write(d.session_id, src, 4096, notify=12)
    with pytest.raises(ValueError):
        p.batch_transfer_async_write(d.session_id, [src, src], [4096])
    with pytest.raises(TypeError):
        p.transfer_check_status("1")
    with pytest.raises(TypeError):
        p.get_batch_transfer_status([1, "2"])
    with pytest.raises(ValueError):
        p.transfer_wait(1, timeout=-1)
    with pytest.raises(ValueError):
        d.wait_notification(float("nan"))
    # Length 0 is the C library's to refuse, with the element named.
    rc = p.transfer_submit_write(d.session_id, src, 4096, 0)
    assert rc == -kvferry.KVF_EINVAL, (rc, err())
    assert "element 0" in err(), err()
    with pytest.raises(TypeError):
        kvferry.TransferEngine(max_batches="many")


def test_not_initialized_and_destroyed():
    e = kvferry.TransferEngine()
    assert e.transfer_submit_write("127.0.0.1:1", b"x", 4096) == -kvferry.KVF_EINVAL
    assert "not initialized" in err()
    assert e.transfer_check_status(1) == -kvferry.KVF_EINVAL
    assert e.send_notification("127.0.0.1:1", b"x") == -kvferry.KVF_EINVAL
    with pytest.raises(kvferry.Error):
        e.get_notifications()
    with pytest.raises(kvferry.Error):
        e.get_peer_events()


def test_destroy_frees_ids_still_held(store):
    d = make_engine(store.url, "Decode")
    p = make_engine(store.url, "Prefill")
    dst = np.zeros(MiB, dtype=np.uint8)
    assert d.register_memory(dst) == 0
    src = np.ones(MiB, dtype=np.uint8)
    done = [p.transfer_submit_write(d.session_id, src, dst.ctypes.data) for _ in range(5)]
    pending = [p.transfer_submit_write(MISSING, src, 4096) for _ in range(3)]
    assert all(b >= 1 for b in done + pending), err()
    t0 = time.monotonic()
    assert p.destroy() == 0  # frees all eight, finished or not
    assert time.monotonic() - t0 < INIT_TIMEOUT_MS / 1000 + 5
    for bid in done + pending:
        assert p.transfer_check_status(bid) == -kvferry.KVF_ECLOSED
    # Re-initialized, the object hands out new ids; the old ones stay unknown.
    assert p.initialize(store.url, "127.0.0.1:0", "Prefill") == 0
    bid = p.transfer_submit_write(d.session_id, src, dst.ctypes.data)
    assert bid > max(done + pending)
    assert p.transfer_check_status(done[0]) == -kvferry.KVF_EINVAL
    assert p.transfer_wait(bid) == 1, err()

    # An engine object dropped with pending ids frees them (and the buffers they pin).
    q = make_engine(store.url, "Prefill")
    tmp = np.ones(4096, dtype=np.uint8)
    for _ in range(3):
        assert q.transfer_submit_write(MISSING, tmp, 4096) >= 1
    del q
    gc.collect()
    p.destroy()
    d.destroy()
    ref = weakref.ref(tmp)
    del tmp
    gc.collect()
    assert ref() is None, "a buffer pinned by a batch outlived its engine"


def test_threads_share_ids_safely(pair):
    d, p = pair
    n_threads, per_thread, size = 4, 50, 8 * KiB
    dst = np.zeros(n_threads * per_thread * size, dtype=np.uint8)
    assert d.register_memory(dst) == 0
    src = rand_bytes(dst.nbytes, 5)
    ids = []
    lock = threading.Lock()
    errors = []
    finals = {}

    def submitter(t):
        for i in range(per_thread):
            off = (t * per_thread + i) * size
            bid = p.transfer_submit_write(d.session_id, src[off:off + size], dst.ctypes.data + off)
            if bid < 1:
                errors.append(("submit", bid, err()))
                continue
            with lock:
                ids.append(bid)

    def checker():
        # Polls and waits on ids other threads also poll: each id ends exactly once as 1
        # for someone, and is unknown afterwards.
        end = time.monotonic() + 20
        while time.monotonic() < end:
            with lock:
                snapshot = list(ids)
            for bid in snapshot:
                st = p.transfer_wait(bid, 0.01) if bid % 2 else p.transfer_check_status(bid)
                if st == 1:
                    with lock:
                        finals[bid] = finals.get(bid, 0) + 1
                elif st not in (0, -kvferry.KVF_EINVAL):
                    errors.append(("status", bid, st, err()))
            with lock:
                if len(finals) == n_threads * per_thread:
                    return

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(n_threads)]
    threads += [threading.Thread(target=checker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    assert len(finals) == n_threads * per_thread
    # Two threads may both see the final status of one id only if they were inside the call at
    # the same time; never more often than the number of checker threads.
    assert max(finals.values()) <= 3
    assert np.array_equal(dst, src)


# ---- notifications ---------------------------------------------------------------------------


def test_notify_on_sync_methods_in_process(pair):
    d, p = pair
    dst = np.zeros(MiB, dtype=np.uint8)
    assert d.register_memory(dst) == 0
    src = rand_bytes(MiB, 11)
    assert d.get_notifications() == []

    assert p.transfer_sync_write(d.session_id, src[:4096], dst.ctypes.data, notify=b"one") == 0
    got = d.get_notifications()
    assert got == [(p.session_id, b"one")], got
    assert np.array_equal(dst[:4096], src[:4096])  # in place when the notification is read

    assert p.batch_transfer_sync_write(d.session_id, [src[:8192], src[8192:16384]],
                                       [dst.ctypes.data + 8192, dst.ctypes.data],
                                       notify=bytearray(b"two")) == 0
    back = np.zeros(4096, dtype=np.uint8)
    assert p.transfer_sync_read(d.session_id, back, dst.ctypes.data, notify="three \u00e9") == 0
    backs = [np.zeros(100, dtype=np.uint8), np.zeros(100, dtype=np.uint8)]
    assert p.batch_transfer_sync_read(d.session_id, backs, [dst.ctypes.data, dst.ctypes.data + 100],
                                      notify=memoryview(b"four")) == 0
    assert p.transfer_sync_write(d.session_id, src[:10], dst.ctypes.data, notify=b"") == 0
    got = d.get_notifications()
    assert got == [(p.session_id, b"two"), (p.session_id, "three \u00e9".encode()),
                   (p.session_id, b"four"), (p.session_id, b"")], got
    assert np.array_equal(back, src[8192:12288])
    assert np.array_equal(backs[0], src[8192:8292]) and np.array_equal(backs[1], src[8292:8392])
    assert d.get_notifications() == []
    # A failed transfer delivers no notification.
    assert p.transfer_sync_write(d.session_id, src[:10], 8, notify=b"lost") == -kvferry.KVF_ENOTREG
    assert d.wait_notification(0.2) == []


def test_notify_on_async_methods_in_order(pair):
    d, p = pair
    n, size = 40, 64 * KiB
    dst = np.zeros(n * size, dtype=np.uint8)
    assert d.register_memory(dst) == 0
    src = rand_bytes(n * size, 12)
    ids = []
    for i in range(n):
        off = i * size
        if i % 3 == 0:
            bid = p.transfer_submit_write(d.session_id, src[off:off + size], dst.ctypes.data + off,
                                          notify=f"req {i}".encode())
        else:
            half = size // 2
            bid = p.batch_transfer_async_write(
                d.session_id, [src[off:off + half], src[off + half:off + size]],
                [dst.ctypes.data + off, dst.ctypes.data + off + half], notify=f"req {i}")
        assert bid >= 1, err()
        ids.append(bid)
    seen = []
    end = time.monotonic() + 20
    while len(seen) < n and time.monotonic() < end:
        for sender, msg in d.wait_notification(1.0):
            assert sender == p.session_id
            i = int(msg.split()[1])
            # The bytes of batch i are in place when its notification is read.
            assert np.array_equal(dst[i * size:(i + 1) * size], src[i * size:(i + 1) * size]), \
                f"batch {i} not in place at its notification"
            seen.append(i)
    assert seen == list(range(n)), f"notifications out of submit order: {seen}"
    assert p.get_batch_transfer_status(ids) == 0, err()


def test_send_notification_alone(pair):
    d, p = pair
    assert p.send_notification(d.session_id, b"hello") == 0, err()
    assert p.send_notification(d.session_id, "w\u00f6rld") == 0
    assert p.send_notification(d.session_id, b"") == 0
    assert p.send_notification(d.session_id, bytes(range(256)) * 16) == 0  # 4096: the limit
    got = take_notifications(d, 4)
    assert got == [(p.session_id, b"hello"), (p.session_id, "w\u00f6rld".encode()),
                   (p.session_id, b""), (p.session_id, bytes(range(256)) * 16)], got
    # Both directions.
    assert d.send_notification(p.session_id, b"back") == 0
    assert p.wait_notification(5) == [(d.session_id, b"back")]
    with pytest.raises(TypeError):
        p.send_notification(d.session_id, None)
    with pytest.raises(TypeError):
        p.send_notification(d.session_id, 5)
    rc = p.send_notification(MISSING, b"nobody")
    assert rc == -kvferry.KVF_ENOTFOUND, (rc, err())
    assert MISSING in err(), err()


def test_notification_too_long(pair):
    d, p = pair
    dst = np.zeros(4096, dtype=np.uint8)
    assert d.register_memory(dst) == 0
    big = b"x" * (kvferry.KVF_NOTIFY_MAX + 1)
    assert kvferry.KVF_NOTIFY_MAX == 4096
    calls = [
        lambda: p.send_notification(d.session_id, big),
        lambda: p.transfer_sync_write(d.session_id, dst, dst.ctypes.data, notify=big),
        lambda: p.batch_transfer_sync_read(d.session_id, [dst], [dst.ctypes.data], notify=big),
        lambda: p.transfer_submit_write(d.session_id, dst, dst.ctypes.data, notify=big),
        lambda: p.batch_transfer_async_read(d.session_id, [dst], [dst.ctypes.data], notify=big),
    ]
    for call in calls:
        kvferry.get_last_err_msg()
        rc = call()
        assert rc == -kvferry.KVF_ETOOBIG, (rc, err())
        assert "4096" in err() and "4097" in err(), err()
    assert d.wait_notification(0.2) == []


def test_wait_notification_releases_the_gil(pair):
    d, p = pair
    t0 = time.monotonic()
    got, stall = max_stall_while(lambda: d.wait_notification(0.5))
    assert got == []
    assert time.monotonic() - t0 >= 0.45
    assert stall < 0.2, f"another thread could not run for {stall:.3f} s"

    # And it returns as soon as something arrives.
    def later():
        time.sleep(0.2)
        p.send_notification(d.session_id, b"wake")
    t = threading.Thread(target=later)
    t.start()
    t0 = time.monotonic()
    got, stall = max_stall_while(lambda: d.wait_notification(None))
    t.join()
    assert got == [(p.session_id, b"wake")]
    assert time.monotonic() - t0 < 3
    assert stall < 0.2, f"another thread could not run for {stall:.3f} s"

    # transfer_wait and wait_for_peer, too.
    bid = p.transfer_submit_write(MISSING, np.ones(16, dtype=np.uint8), 4096)
    st, stall = max_stall_while(lambda: p.transfer_wait(bid, 0.3))
    assert st == 0 and stall < 0.2, (st, stall)
    rc, stall = max_stall_while(lambda: p.wait_for_peer(MISSING, 0.3))
    assert rc == -kvferry.KVF_ETIMEDOUT and stall < 0.2, (rc, stall)
    p.transfer_cancel(bid)


def destroy_during(engine, call):
    """Run call() on a thread, destroy engine once that thread is inside the call, and return
    what the call raised or returned. No sleep: with a long switch interval the thread keeps the
    GIL from its signal until the call releases it, which the call does only after entering the
    engine, so destroy() below can only find it inside (ECLOSED "being destroyed"), never
    before it (ECLOSED "has been destroyed")."""
    result = {}
    inside = threading.Event()

    def waiter():
        inside.set()
        try:
            result["got"] = call()
        except kvferry.Error as e:
            result["code"] = e.code
            result["msg"] = kvferry.get_last_err_msg()

    old = sys.getswitchinterval()
    sys.setswitchinterval(60)
    try:
        t = threading.Thread(target=waiter)
        t.start()
        inside.wait(10)
    finally:
        sys.setswitchinterval(old)
    t0 = time.monotonic()
    engine.destroy()
    t.join(10)
    assert not t.is_alive(), "the call was still blocked after destroy()"
    assert time.monotonic() - t0 < 2
    return result


def test_destroy_releases_a_blocked_wait_notification(store):
    d = make_engine(store.url, "Decode")
    result = destroy_during(d, lambda: d.wait_notification(None))
    assert result.get("code") == -kvferry.KVF_ECLOSED, result
    assert "being destroyed" in result["msg"], result


# Runs in a child process: a Decode that verifies each batch's bytes the moment its
# notification is read, and records the order. Prints READY <sid> <addr>, then one line per
# notification, then DONE.
RECEIVER = r"""
import ctypes, sys, time
import numpy as np
import kvferry
store_url, n, size, alloc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "alloc"
e = kvferry.TransferEngine(init_timeout_ms=5000)
assert e.initialize(store_url, "127.0.0.1:0", "Decode") == 0, kvferry.get_last_err_msg()
if alloc:
    addr = e.mem_alloc(n * size)
    dst = np.ctypeslib.as_array((ctypes.c_uint8 * (n * size)).from_address(addr))
else:
    dst = np.zeros(n * size, dtype=np.uint8)
    assert e.register_memory(dst) == 0
    addr = dst.ctypes.data
print("READY", e.session_id, addr, flush=True)
order, bad, end = [], 0, time.monotonic() + 60
while len(order) < n + 1 and time.monotonic() < end:
    for sender, msg in e.wait_notification(1.0):
        if msg == b"alone":
            order.append("alone")
            print("ALONE", sender, flush=True)
            continue
        i, seed = map(int, msg.split(b":"))
        want = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
        ok = np.array_equal(dst[i * size:(i + 1) * size], want)
        bad += not ok
        order.append(i)
        print("NOTE", i, "ok" if ok else "BAD", sender, flush=True)
print("DONE", "order", " ".join(map(str, order)), "bad", bad, flush=True)
e.destroy()
"""


def run_cross_process_notify(store, procs, monkeypatch, transport, alloc):
    monkeypatch.setenv("KVFERRY_TRANSPORT", transport)
    n, size = 24, 512 * KiB
    env = dict(os.environ)
    rx = procs.start("receiver", ["-c", RECEIVER, store.url, str(n), str(size),
                                  "alloc" if alloc else "numpy"], env=env)
    end = time.monotonic() + 30
    m = None
    while m is None and time.monotonic() < end and rx.poll() is None:
        m = re.search(r"READY (\S+) (\d+)", procs.output("receiver"))
        time.sleep(0.02)
    assert m, "receiver did not start:\n" + procs.output("receiver")
    sid, base = m.group(1), int(m.group(2))
    p = make_engine(store.url, "Prefill", async_threads=4)
    try:
        assert p.wait_for_peer(sid, 5) == 0, err()
        srcs = [rand_bytes(size, 1000 + i) for i in range(n)]
        ids = []
        for i in range(n):
            note = f"{i}:{1000 + i}".encode()
            if i % 4 == 0:  # the sync methods carry notifications too
                rc = p.transfer_sync_write(sid, srcs[i], base + i * size, notify=note)
                assert rc == 0, err()
            elif i % 4 == 1:
                half = size // 2
                rc = p.batch_transfer_sync_write(sid, [srcs[i][:half], srcs[i][half:]],
                                                 [base + i * size, base + i * size + half],
                                                 notify=note)
                assert rc == 0, err()
            else:
                bid = p.transfer_submit_write(sid, srcs[i], base + i * size, notify=note)
                assert bid >= 1, err()
                ids.append(bid)
        assert p.send_notification(sid, b"alone") == 0, err()
        assert p.get_batch_transfer_status(ids) == 0, err()
        assert p.peer_transport(sid) == transport
        rc = procs.wait(rx, 60)
    finally:
        p.destroy()
    out = procs.output("receiver")
    sys.stdout.write(out)
    assert rc == 0, f"receiver exit status {rc}"
    assert f"DONE order {' '.join(map(str, range(n)))} alone bad 0" in out, out
    assert out.count(" ok ") == n


def test_notify_cross_process_tcp(store, procs, monkeypatch):
    run_cross_process_notify(store, procs, monkeypatch, "tcp", alloc=False)


def test_notify_cross_process_shm(store, procs, monkeypatch):
    run_cross_process_notify(store, procs, monkeypatch, "shm", alloc=False)


def test_notify_cross_process_shm_mem_alloc(store, procs, monkeypatch):
    run_cross_process_notify(store, procs, monkeypatch, "shm", alloc=True)


# ---- peers -----------------------------------------------------------------------------------

# Runs in a child process: a Decode that registers a buffer, prints READY <sid> <addr> and
# waits to be killed (bounded: 60 s).
SILENT_DECODE = r"""
import sys, time
import numpy as np
import kvferry
e = kvferry.TransferEngine(init_timeout_ms=5000)
assert e.initialize(sys.argv[1], "127.0.0.1:0", "Decode") == 0, kvferry.get_last_err_msg()
buf = np.zeros(4096, dtype=np.uint8)
assert e.register_memory(buf) == 0
print("READY", e.session_id, buf.ctypes.data, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_wait_notification_peer_gone(store, procs, monkeypatch, transport):
    """wait_notification(peer=...) raises KVF_EPEERGONE naming the peer within about a second of
    its death (here SIGKILL), not at its timeout; check_peer says the same."""
    monkeypatch.setenv("KVFERRY_TRANSPORT", transport)
    rx = procs.start("decode", ["-c", SILENT_DECODE, store.url], env=dict(os.environ))
    end = time.monotonic() + 30
    m = None
    while m is None and time.monotonic() < end and rx.poll() is None:
        m = re.search(r"READY (\S+) (\d+)", procs.output("decode"))
        time.sleep(0.02)
    assert m, "decode did not start:\n" + procs.output("decode")
    sid, base = m.group(1), int(m.group(2))
    p = make_engine(store.url, "Prefill")
    try:
        assert p.transfer_sync_write(sid, b"x" * 64, base) == 0, err()
        assert p.peer_transport(sid) == transport
        assert p.check_peer(sid) == 0
        assert p.wait_notification(0.3, peer=sid) == []
        os.kill(rx.pid, signal.SIGKILL)
        rx.wait()
        t0 = time.monotonic()
        with pytest.raises(kvferry.Error) as e:
            p.wait_notification(20, peer=sid)
        took = time.monotonic() - t0
        assert e.value.code == -kvferry.KVF_EPEERGONE and sid in str(e.value), e.value
        assert took < 2.0, took
        assert p.check_peer(sid) == -kvferry.KVF_EPEERGONE
        assert sid in kvferry.get_last_err_msg()
        with pytest.raises(TypeError):
            p.wait_notification(1, peer=5)
    finally:
        p.destroy()


def test_peer_events_joined_and_left(store):
    d = make_engine(store.url, "Decode")
    p = make_engine(store.url, "Prefill")
    try:
        first = d.get_peer_events(0)  # subscribes; reports the peers already up
        end = time.monotonic() + 5
        while ("joined", p.session_id) not in first and time.monotonic() < end:
            first += d.get_peer_events(0.5)
        assert ("joined", p.session_id) in first, first
        assert all(sid != d.session_id for _, sid in first), "an engine reports itself"

        q = make_engine(store.url, "Both")
        q_sid = q.session_id
        events = []
        end = time.monotonic() + 5
        while ("joined", q_sid) not in events and time.monotonic() < end:
            events += d.get_peer_events(1.0)
        assert ("joined", q_sid) in events, events
        q.destroy()
        end = time.monotonic() + 10
        while ("left", q_sid) not in events and time.monotonic() < end:
            events += d.get_peer_events(1.0)
        # Each once, in order, and nothing else (no event for p, nor for d itself).
        assert events == [("joined", q_sid), ("left", q_sid)], events
        assert d.get_peer_events() == []
    finally:
        p.destroy()
        d.destroy()


def test_get_peer_events_wait_releases_gil_and_ends_on_destroy(store):
    d = make_engine(store.url, "Decode")
    d.get_peer_events(0)
    events, stall = max_stall_while(lambda: d.get_peer_events(0.4))
    assert events == [] and stall < 0.2, (events, stall)
    result = destroy_during(d, lambda: d.get_peer_events(None))
    assert result.get("code") == -kvferry.KVF_ECLOSED, result
    assert "being destroyed" in result["msg"], result


def test_wait_for_peer(store):
    d = make_engine(store.url, "Decode")
    try:
        t0 = time.monotonic()
        rc = d.wait_for_peer(MISSING, 0.3)
        elapsed = time.monotonic() - t0
        assert rc == -kvferry.KVF_ETIMEDOUT, (rc, err())
        assert MISSING in err(), err()
        assert 0.25 <= elapsed < 2, elapsed
        assert d.wait_for_peer("not a session id", 0.1) == -kvferry.KVF_EINVAL

        holder = {}
        # A peer that comes up later: wait for a fixed port that the thread then listens on.
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        sid = f"127.0.0.1:{port}"

        def late_fixed():
            time.sleep(0.3)
            e = kvferry.TransferEngine(init_timeout_ms=INIT_TIMEOUT_MS)
            holder["rc"] = e.initialize(store.url, sid, "Prefill")
            holder["p"] = e

        t = threading.Thread(target=late_fixed)
        t.start()
        t0 = time.monotonic()
        rc = d.wait_for_peer(sid, 10)
        t.join()
        assert holder["rc"] == 0
        assert rc == 0, (rc, err())
        assert time.monotonic() - t0 < 5
        assert d.wait_for_peer(sid) == 0  # default timeout: init_timeout_ms
        holder["p"].destroy()
    finally:
        d.destroy()


def test_config_keywords_reach_the_c_library(store):
    for kw, text in [({"max_batches": 0}, "max_batches"), ({"async_threads": 65}, "async_threads"),
                     ({"notify_queue_max": 0}, "notify_queue_max"),
                     ({"io_threads": 65}, "config.io_threads 65")]:
        e = kvferry.TransferEngine(init_timeout_ms=INIT_TIMEOUT_MS, **kw)
        rc = e.initialize(store.url, "127.0.0.1:0", "Both")
        assert rc == -kvferry.KVF_EINVAL, (kw, rc)
        assert text in err(), err()
    def io_threads():
        names = []
        for t in os.listdir("/proc/self/task"):
            try:
                with open("/proc/self/task/%s/comm" % t) as f:
                    names.append(f.read().strip())
            except FileNotFoundError:
                pass  # ended meanwhile
        return names.count("kvf-tcp-io")

    before = io_threads()
    e = make_engine(store.url, "Both", max_batches=1, async_threads=1, notify_queue_max=1,
                    submit_blocks=False, io_threads=3)
    assert io_threads() - before == 3
    try:
        assert e.transfer_submit_write(MISSING, b"x" * 16, 4096) >= 1
        assert e.transfer_submit_write(MISSING, b"x" * 16, 4096) == -kvferry.KVF_EBUSY
    finally:
        e.destroy()
