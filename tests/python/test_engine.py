"""TransferEngine: the seed's methods with numpy, bytearray, int-address and torch buffers,
batches, unregister, errors as return codes, and misuse as Python exceptions."""

import ctypes
import gc
import os
import time
import weakref

import numpy as np
import pytest

import kvferry
from conftest import make_engine

MiB = 1 << 20


def rand_bytes(n, seed):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def addr(a):
    return a.ctypes.data


def test_numpy_write_and_read(pair):
    d, p = pair
    dst = np.zeros(4 * MiB, dtype=np.uint8)
    assert d.register_memory(addr(dst), dst.nbytes) == 0
    src = rand_bytes(4 * MiB, 1)
    assert p.transfer_sync_write(d.session_id, addr(src), addr(dst), src.nbytes) == 0, \
        kvferry.get_last_err_msg()
    assert np.array_equal(src, dst)

    # The same with the objects themselves instead of addresses, and a partial length.
    src2 = rand_bytes(4 * MiB, 2)
    assert p.transfer_sync_write(d.session_id, src2, addr(dst)) == 0
    assert np.array_equal(src2, dst)
    back = np.zeros(MiB, dtype=np.uint8)
    assert p.transfer_sync_read(d.session_id, back, addr(dst) + MiB, MiB) == 0
    assert np.array_equal(back, src2[MiB:2 * MiB])


def test_bytearray_buffers(pair):
    d, p = pair
    dst = bytearray(MiB)
    assert d.register_memory(dst) == 0  # capacity defaults to the object's size
    regions = p.peer_regions(d.session_id)
    assert len(regions) == 1 and regions[0][1] == MiB
    remote = regions[0][0]
    src = bytearray(rand_bytes(MiB, 3).tobytes())
    assert p.transfer_sync_write(d.session_id, src, remote) == 0, kvferry.get_last_err_msg()
    assert dst == src
    back = bytearray(1000)
    assert p.transfer_sync_read(d.session_id, back, remote + 5000) == 0
    assert back == src[5000:6000]
    # A registered bytearray is pinned: it cannot be resized while peers may write into it.
    with pytest.raises(BufferError):
        dst.extend(b"x")
    assert d.unregister_memory(dst) == 0
    dst.extend(b"x")


def test_int_address_of_ctypes_memory(pair):
    d, p = pair
    dst = (ctypes.c_char * 65536)()
    src = (ctypes.c_char * 65536).from_buffer_copy(rand_bytes(65536, 4).tobytes())
    assert d.register_memory(ctypes.addressof(dst), 65536) == 0
    assert p.transfer_sync_write(d.session_id, ctypes.addressof(src), ctypes.addressof(dst),
                                 65536) == 0
    assert bytes(dst) == bytes(src)


def test_batch_write_and_batch_read(pair):
    d, p = pair
    n, size = 8, 256 * 1024
    dst = np.zeros(n * size, dtype=np.uint8)
    assert d.register_memory(dst) == 0
    srcs = [rand_bytes(size, 10 + i) for i in range(n)]
    # Scattered on purpose: element i goes to slot n-1-i.
    remotes = [addr(dst) + (n - 1 - i) * size for i in range(n)]
    assert p.batch_transfer_sync_write(d.session_id, [addr(s) for s in srcs], remotes,
                                       [size] * n) == 0, kvferry.get_last_err_msg()
    for i in range(n):
        assert np.array_equal(dst[(n - 1 - i) * size:(n - i) * size], srcs[i]), f"slot {i}"

    # Read back with buffer objects and lengths taken from them.
    backs = [bytearray(size) for _ in range(n)]
    assert p.batch_transfer_sync_read(d.session_id, backs, remotes) == 0
    for i in range(n):
        assert backs[i] == srcs[i].tobytes(), f"element {i}"

    # Tuples work as well as lists, and mixed kinds of buffers in one batch.
    small = np.zeros(100, dtype=np.uint8)
    ba = bytearray(100)
    assert p.batch_transfer_sync_read(d.session_id, (small, ba), (remotes[0], remotes[1])) == 0
    assert small.tobytes() == srcs[0][:100].tobytes() and ba == srcs[1][:100].tobytes()


def test_batch_register_and_unregister(pair):
    d, p = pair
    bufs = [np.zeros(65536, dtype=np.uint8) for _ in range(4)]
    assert d.batch_register_memory([addr(b) for b in bufs], [b.nbytes for b in bufs]) == 0
    regions = p.peer_regions(d.session_id)
    assert sorted(regions) == sorted((addr(b), b.nbytes) for b in bufs)
    for b in bufs:
        assert d.unregister_memory(addr(b)) == 0
    assert p.peer_regions(d.session_id) == []
    # Objects, capacities from the objects.
    assert d.batch_register_memory(bufs) == 0
    assert len(p.peer_regions(d.session_id)) == 4


def test_register_errors_are_codes(pair):
    d, _ = pair
    buf = np.zeros(4096, dtype=np.uint8)
    assert d.register_memory(addr(buf), 4096) == 0
    rc = d.register_memory(addr(buf) + 1024, 1024)  # overlaps
    assert rc == -kvferry.KVF_EINVAL
    assert "overlap" in kvferry.get_last_err_msg()
    assert d.register_memory(addr(buf), 0) < 0  # zero length: C says why
    assert d.unregister_memory(addr(buf) + 8) == -kvferry.KVF_ENOTREG


def test_unregister_then_write_fails(pair):
    d, p = pair
    dst = np.zeros(MiB, dtype=np.uint8)
    src = rand_bytes(MiB, 5)
    assert d.register_memory(dst) == 0
    assert p.transfer_sync_write(d.session_id, src, addr(dst)) == 0
    assert d.unregister_memory(addr(dst)) == 0
    dst[:] = 0
    rc = p.transfer_sync_write(d.session_id, src, addr(dst))
    assert rc == -kvferry.KVF_ENOTREG, (rc, kvferry.get_last_err_msg())
    msg = kvferry.get_last_err_msg()
    assert d.session_id in msg and "regist" in msg, msg
    assert not dst.any(), "bytes landed in unregistered memory"


def test_invalid_role_is_a_code(store):
    e = kvferry.TransferEngine()
    rc = e.initialize(store.url, "127.0.0.1:0", "Encoder", 0)
    assert rc == -kvferry.KVF_EINVAL
    msg = kvferry.get_last_err_msg()
    assert "Encoder" in msg and "Prefill" in msg and "Decode" in msg, msg
    assert e.session_id is None


def test_malformed_store_url_is_a_code():
    e = kvferry.TransferEngine()
    t = time.monotonic()
    rc = e.initialize("tcp://192.168.1.1000:8000", "127.0.0.1:0", "Prefill", 0)
    assert rc == -kvferry.KVF_EINVAL
    assert time.monotonic() - t < 2, "a malformed URL must fail at once"
    assert "192.168.1.1000" in kvferry.get_last_err_msg()


def test_unknown_session_is_a_code(store):
    with make_engine(store.url, "Prefill", init_timeout_ms=500) as p:
        src = np.zeros(4096, dtype=np.uint8)
        t = time.monotonic()
        rc = p.transfer_sync_write("127.0.0.1:9", src, 0x10000)
        assert rc == -kvferry.KVF_ENOTFOUND, (rc, kvferry.get_last_err_msg())
        assert time.monotonic() - t < 5
        assert "127.0.0.1:9" in kvferry.get_last_err_msg()
        with pytest.raises(kvferry.Error) as ei:
            p.peer_regions("127.0.0.1:9")
        assert ei.value.code == -kvferry.KVF_ENOTFOUND
        assert "127.0.0.1:9" in str(ei.value)


def test_session_id_port_and_reinitialize(store):
    e = kvferry.TransferEngine()
    assert e.session_id is None
    assert e.initialize(store.url, "127.0.0.1:0", "Decode", 0) == 0
    host, port = e.session_id.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) == e.get_rpc_port() > 0
    assert e.initialize(store.url, "127.0.0.1:0", "Decode", 0) == -kvferry.KVF_EEXIST
    assert "already initialized" in kvferry.get_last_err_msg()
    assert e.unInitialize() == 0
    assert e.initialize(store.url, None, "both", 3) == 0  # None: loopback, free port
    assert e.session_id.startswith("127.0.0.1:")
    assert e.destroy() == 0


def test_methods_before_initialize_and_after_destroy(store):
    buf = np.zeros(4096, dtype=np.uint8)
    e = kvferry.TransferEngine()
    for when, code, text in [("before", -kvferry.KVF_EINVAL, "not initialized"),
                             ("after", -kvferry.KVF_ECLOSED, "destroyed")]:
        if when == "after":
            assert e.initialize(store.url, "127.0.0.1:0", "Both", 0) == 0
            assert e.register_memory(buf) == 0
            assert e.destroy() == 0
        calls = [
            lambda: e.register_memory(buf),
            lambda: e.batch_register_memory([buf]),
            lambda: e.unregister_memory(buf),
            lambda: e.transfer_sync_write("127.0.0.1:1", buf, 4096),
            lambda: e.transfer_sync_read("127.0.0.1:1", buf, 4096),
            lambda: e.batch_transfer_sync_write("127.0.0.1:1", [buf], [4096]),
            lambda: e.batch_transfer_sync_read("127.0.0.1:1", [buf], [4096]),
        ]
        if when == "after":
            calls.append(lambda: e.get_rpc_port())
        for call in calls:
            assert call() == code, when
            assert text in kvferry.get_last_err_msg()
        with pytest.raises(kvferry.Error):
            e.peer_regions("127.0.0.1:1")
        assert e.session_id is None
        assert e.destroy() == 0 and e.unInitialize() == 0  # idempotent
        assert ("not initialized" if when == "before" else "destroyed") in repr(e)


def test_context_manager_destroys(store):
    with kvferry.TransferEngine() as e:
        assert e.initialize(store.url, "127.0.0.1:0", "Both", 0) == 0
        port = e.get_rpc_port()
    assert e.session_id is None
    assert e.get_rpc_port() == -kvferry.KVF_ECLOSED
    # The port is free again: a new engine can take the same session id.
    with kvferry.TransferEngine() as e2:
        assert e2.initialize(store.url, f"127.0.0.1:{port}", "Both", 0) == 0


def test_registered_objects_are_kept_alive(pair):
    d, p = pair
    dst = np.zeros(MiB, dtype=np.uint8)
    ref = weakref.ref(dst)
    assert d.register_memory(dst) == 0
    remote = addr(dst)
    del dst
    gc.collect()
    assert ref() is not None, "a registered array was freed while peers may write into it"
    src = rand_bytes(MiB, 6)
    assert p.transfer_sync_write(d.session_id, src, remote) == 0
    assert np.array_equal(ref(), src)
    assert d.unregister_memory(remote) == 0
    gc.collect()
    assert ref() is None, "unregister must release the array"

    dst = np.zeros(MiB, dtype=np.uint8)
    ref = weakref.ref(dst)
    assert d.register_memory(dst) == 0
    del dst
    d.destroy()
    gc.collect()
    assert ref() is None, "destroy must release registered arrays"


def test_argument_errors_never_reach_c(pair):
    d, p = pair
    buf = np.zeros(4096, dtype=np.uint8)
    assert d.register_memory(buf) == 0
    ro = np.zeros(4096, dtype=np.uint8)
    ro.setflags(write=False)
    sid = d.session_id
    # A marker in the last-error slot: none of the calls below may touch it.
    assert d.unregister_memory(12345) == -kvferry.KVF_ENOTREG
    marker = kvferry.get_last_err_msg()

    type_errors = [
        lambda: p.transfer_sync_write(sid, 1.5, addr(buf), 10),
        lambda: p.transfer_sync_write(sid, "0x1000", addr(buf), 10),
        lambda: p.transfer_sync_write(sid, None, addr(buf), 10),
        lambda: p.transfer_sync_write(sid, True, addr(buf), 10),
        lambda: p.transfer_sync_write(sid, buf, "0x1000", 10),
        lambda: p.transfer_sync_write(sid, buf, float(addr(buf)), 10),
        lambda: p.transfer_sync_write(sid, buf, addr(buf), 10.0),
        lambda: p.transfer_sync_write(12345, buf, addr(buf), 10),
        lambda: p.transfer_sync_write(sid, addr(buf), addr(buf)),  # no length for an int
        lambda: p.transfer_sync_read(sid, bytes(4096), addr(buf)),  # read into read-only
        lambda: p.transfer_sync_read(sid, ro, addr(buf)),
        lambda: d.register_memory(bytes(4096)),  # peers would write into immutable bytes
        lambda: d.register_memory(object(), 10),
        lambda: p.batch_transfer_sync_write(sid, "abc", [1, 2, 3], [1, 1, 1]),
        lambda: p.batch_transfer_sync_write(sid, 5, [1], [1]),
        lambda: p.batch_transfer_sync_write(sid, [buf], [None], [10]),
        lambda: p.batch_transfer_sync_write(sid, [buf, "x"], [addr(buf)] * 2, [10, 10]),
        lambda: d.batch_register_memory([buf, 1.0], [10, 10]),
        lambda: kvferry.TransferEngine(op_timeout_ms="10"),
        lambda: d.initialize(1, "127.0.0.1:0", "Both", 0),
        lambda: d.initialize("tcp://127.0.0.1:1", "127.0.0.1:0", "Both", "0"),
        lambda: d.initialize("tcp://127.0.0.1:1", "127.0.0.1:0", 1, 0),
        lambda: kvferry.set_log_level("debug"),
    ]
    for i, call in enumerate(type_errors):
        with pytest.raises(TypeError):
            call()
            pytest.fail(f"type error case {i} did not raise")
    value_errors = [
        lambda: p.transfer_sync_write(sid, buf, addr(buf), -1),
        lambda: p.transfer_sync_write(sid, buf, -4096, 10),
        lambda: p.transfer_sync_write(sid, -1, addr(buf), 10),
        lambda: p.transfer_sync_write(sid, buf, addr(buf), 4097),  # longer than the buffer
        lambda: p.transfer_sync_write(sid, buf, 1 << 64, 10),
        lambda: p.transfer_sync_write(sid, buf[::2], addr(buf), 10),  # not contiguous
        lambda: p.transfer_sync_write("127.0.0.1:1\0x", buf, addr(buf), 10),
        lambda: d.register_memory(addr(buf), -5),
        lambda: p.batch_transfer_sync_write(sid, [buf, buf], [addr(buf)], [10, 10]),
        lambda: p.batch_transfer_sync_write(sid, [buf], [addr(buf)], [10, 10]),
        lambda: p.batch_transfer_sync_read(sid, [buf], [addr(buf), 1]),
        lambda: p.batch_transfer_sync_write(sid, [buf], [addr(buf)], [-10]),
        lambda: d.batch_register_memory([buf, buf], [10]),
        lambda: d.initialize("tcp://127.0.0.1:1", "127.0.0.1:0", "Both", 1 << 40),
    ]
    for i, call in enumerate(value_errors):
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"value error case {i} did not raise")
    assert kvferry.get_last_err_msg() == marker, "an invalid argument reached the C library"

    # Messages name the argument.
    with pytest.raises(ValueError, match="lengths"):
        p.batch_transfer_sync_write(sid, [buf], [addr(buf)], [10, 10])
    with pytest.raises(ValueError, match="length must not be negative"):
        p.transfer_sync_write(sid, buf, addr(buf), -1)
    with pytest.raises(TypeError, match=r"buffers\[1\]"):
        p.batch_transfer_sync_write(sid, [buf, "x"], [addr(buf)] * 2, [10, 10])
    with pytest.raises(TypeError, match="peer_buffer_address must be an int, not str"):
        p.transfer_sync_write(sid, buf, "0x1000", 10)


def test_numpy_integer_addresses(pair):
    d, p = pair
    dst = np.zeros(4096, dtype=np.uint8)
    src = rand_bytes(4096, 7)
    assert d.register_memory(np.uint64(addr(dst)), np.int64(4096)) == 0
    assert p.transfer_sync_write(d.session_id, np.uint64(addr(src)), np.uint64(addr(dst)),
                                 np.int32(4096)) == 0
    assert np.array_equal(src, dst)


def test_torch_tensors(pair):
    torch = pytest.importorskip("torch", reason="torch is not installed for this interpreter")
    d, p = pair
    dst = torch.zeros((4, 256, 128), dtype=torch.float16)
    src = torch.randn((4, 256, 128), dtype=torch.float16)
    assert d.register_memory(dst) == 0  # the tensor itself: data_ptr() and nbytes
    assert p.register_memory(src.data_ptr(), src.element_size() * src.numel()) == 0
    assert p.transfer_sync_write(d.session_id, src, dst.data_ptr()) == 0
    assert torch.equal(src, dst)
    # Slice by slice with addresses, as the seed does.
    src2 = torch.randn((4, 256, 128), dtype=torch.float16)
    for i in range(4):
        n = src2[i].element_size() * src2[i].numel()
        assert p.transfer_sync_write(d.session_id, src2[i].data_ptr(), dst[i].data_ptr(), n) == 0
    assert torch.equal(src2, dst)
    back = torch.empty((256, 128), dtype=torch.float16)
    assert p.transfer_sync_read(d.session_id, back, dst[2].data_ptr()) == 0
    assert torch.equal(back, src2[2])
    with pytest.raises(ValueError, match="not contiguous"):
        p.transfer_sync_write(d.session_id, src.transpose(1, 2), dst.data_ptr())


def test_mem_alloc_written_by_peer_and_freed(pair):
    """mem_alloc memory is registered: a peer writes into it, the bytes are there, and after
    mem_free a write into it is refused. peer_transport says how the bytes travelled."""
    d, p = pair
    n = MiB + 3
    addr = d.mem_alloc(n)
    assert isinstance(addr, int) and addr != 0
    view = (ctypes.c_ubyte * n).from_address(addr)
    assert bytes(view[:16]) == bytes(16)  # zeroed
    src = rand_bytes(n, 7)
    assert p.transfer_sync_write(d.session_id, src, addr, n) == 0, kvferry.get_last_err_msg()
    assert np.array_equal(np.frombuffer(view, dtype=np.uint8), src)
    # Both engines are in this process: memcpy, unless the environment forces a transport.
    forced = os.environ.get("KVFERRY_TRANSPORT", "auto")
    want = "loop" if forced in ("", "auto") else forced
    assert p.peer_transport(d.session_id) == want
    del view
    assert d.mem_free(addr) == 0
    assert p.transfer_sync_write(d.session_id, src, addr, n) < 0
    assert d.mem_free(addr) < 0  # not mem_alloc memory any more
    with pytest.raises(kvferry.Error):
        d.mem_alloc(0)
    with pytest.raises(kvferry.Error):
        p.peer_transport("127.0.0.1:9")
