"""The frameworks' call sequences on kvferry's drop-in packages (issue 14), each in two
processes with the bytes checked: SGLang's ascend backend (memfabric_hybrid / mf_adapter, store
at ASCEND_MF_STORE_URL, get_rpc_port before initialize, 5- and 4-argument initialize, a store
created late, duplicate registration, thousands of small triples from 4 threads, send_probe on a
live and a killed peer, batch_unregister_memory) and the Mooncake sequence SGLang's mooncake
backend and vLLM's MooncakeConnector use (P2PHANDSHAKE, no store process anywhere, over tcp and
shm), with the upstream keyword names. The far side is framework_peer.py.

The drop-in packages are opt-in: this test puts the directory `python3 -m kvferry compat-path`
prints on its own sys.path, and on its children's PYTHONPATH.
"""

import ctypes
import hashlib
import logging
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time

import pytest

import kvferry
import kvferry._compat
from conftest import free_port

from kvferry.__main__ import COMPAT

sys.path.insert(0, COMPAT)
HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(HERE, "framework_peer.py")
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(kvferry.__file__)))


def child_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([COMPAT, PKG_PARENT])
    env.update(extra)
    return env


class Peer:
    """framework_peer.py in its own process, spoken to line by line, always reaped."""

    def __init__(self, mode, store, size, **env):
        self.p = subprocess.Popen([sys.executable, PEER, mode, store, str(size)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, env=child_env(**env), text=True,
                                  start_new_session=True)
        self.fd = self.p.stdout.fileno()
        self.buf = b""
        self.seen = []

    def line(self, prefix, timeout=30.0):
        """The next line starting with @prefix, read straight from the pipe (no buffer that a
        wait for the pipe would not see), within @timeout seconds."""
        end = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                text, self.buf = self.buf.split(b"\n", 1)
                text = text.decode(errors="replace")
                self.seen.append(text + "\n")
                if text.startswith(prefix):
                    return text.split()
            left = end - time.monotonic()
            r, _, _ = select.select([self.fd], [], [], max(0.0, left))
            chunk = os.read(self.fd, 65536) if r else b""
            if not chunk:
                raise AssertionError(f"no {prefix!r} line from the peer; it said:\n" +
                                     "".join(self.seen) + self.buf.decode(errors="replace"))
            self.buf += chunk

    def ready(self):
        _, sid, addr, size, ms = self.line("READY")
        return sid, int(addr), int(size), float(ms)

    def sha(self):
        self.p.stdin.write("sum\n")
        self.p.stdin.flush()
        return self.line("SUM")[1]

    def quit(self):
        self.p.stdin.write("quit\n")
        self.p.stdin.flush()
        assert self.p.wait(timeout=30) == 0, "".join(self.seen) + self.buf.decode()

    def kill(self):
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
        self.p.wait()

    def close(self):
        self.kill()
        self.p.stdout.close()
        self.p.stdin.close()


@pytest.fixture
def peers():
    made = []

    def make(*args, **env):
        p = Peer(*args, **env)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def pattern(n, seed):
    return random.Random(seed).randbytes(n)


def sha_of(b):
    return hashlib.sha256(b).hexdigest()


# ---- SGLang, --disaggregation-transfer-backend ascend ------------------------------------------

def ascend_prefill(store_url):
    from memfabric_hybrid import TransferEngine

    te = TransferEngine()
    port = te.get_rpc_port()
    assert port > 0
    rc = te.initialize(store_url, f"127.0.0.1:{port}", "Prefill", 0,
                       TransferEngine.TransDataOpType.SDMA)
    assert rc == 0, kvferry.get_last_err_msg()
    assert te.get_rpc_port() == port  # the reserved port is the one the engine listens on
    return te


def four_threads_of_small_triples(te, sid, dst, size, src_addr):
    """4 threads at once, each ONE batch of 2048 non-adjacent 2 KiB triples; returns the bytes
    the Decode's buffer must then hold."""
    per = size // 4
    stride, piece = 4096, 2048
    assert per // stride == 2048
    rcs = [None] * 4

    def run(t):
        offs = [t * per + i * stride for i in range(per // stride)]
        rcs[t] = te.batch_transfer_sync_write(sid, [src_addr + o for o in offs],
                                              [dst + o for o in offs], [piece] * len(offs))

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert rcs == [0, 0, 0, 0], kvferry.get_last_err_msg()


@pytest.mark.parametrize("mode", ["mf5", "mf4"])
def test_ascend_sequence(peers, mode):
    from memfabric_hybrid import create_config_store

    url = f"tcp://127.0.0.1:{free_port()}"
    assert create_config_store(url) == 0
    size = 32 << 20
    dec = peers(mode, "-", size, ASCEND_MF_STORE_URL=url)
    sid, dst, _, init_ms = dec.ready()
    te = ascend_prefill(url)

    src = ctypes.create_string_buffer(pattern(size, 7), size)
    src_addr = ctypes.addressof(src)
    assert te.register_memory(src_addr, size) == 0
    assert te.register_memory(buffer_addr=src_addr, capacity=size) == 0  # duplicate: accepted
    four_threads_of_small_triples(te, sid, dst, size, src_addr)
    raw = src.raw
    want = bytearray(size)
    for off in range(0, size, 4096):
        want[off:off + 2048] = raw[off:off + 2048]
    assert dec.sha() == sha_of(want)

    # The upstream keyword names, one element and a batch, and a read back.
    assert te.transfer_sync_write(dest_session=sid, buffer=src_addr + 2048,
                                  peer_buffer=dst + 2048, length=2048, flags=0) == 0
    want[2048:4096] = raw[2048:4096]
    assert te.batch_transfer_sync_write(dest_session=sid, buffers=[src_addr + 6144],
                                        peer_buffers=[dst + 6144], lengths=[2048]) == 0
    want[6144:8192] = raw[6144:8192]
    assert dec.sha() == sha_of(want)
    back = ctypes.create_string_buffer(8192)
    assert te.batch_transfer_sync_read(sid, [ctypes.addressof(back)], [dst], [8192]) == 0
    assert back.raw == bytes(want[:8192])

    assert te.send_probe(sid) == 0
    dec.quit()  # its teardown: batch_unregister_memory, unregister_memory
    t0 = time.monotonic()
    while te.send_probe(sid) == 0 and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    took = time.monotonic() - t0
    assert te.send_probe(dest_session=sid) != 0 and took < 5, took
    assert te.batch_unregister_memory([src_addr]) == 0
    assert te.batch_unregister_memory(buffer_addrs=[src_addr]) == 0  # gone already: no-op
    print(f"{mode}: Decode initialize took {init_ms:.1f} ms with the store up")
    assert te.destroy() == 0


def test_ascend_killed_decode_probe(peers):
    from memfabric_hybrid import create_config_store

    url = f"tcp://127.0.0.1:{free_port()}"
    assert create_config_store(url) == 0
    dec = peers("mf5", url, 1 << 20)
    sid, dst, size, _ = dec.ready()
    te = ascend_prefill(url)
    src = ctypes.create_string_buffer(pattern(size, 3), size)
    h = size // 2  # the Decode registered two halves; an element lies inside one
    assert te.transfer_sync_write(sid, ctypes.addressof(src), dst, h) == 0
    assert te.transfer_sync_write(sid, ctypes.addressof(src) + h, dst + h, size - h) == 0
    assert dec.sha() == sha_of(src.raw)
    assert te.send_probe(sid) == 0
    dec.kill()
    t0 = time.monotonic()
    while te.send_probe(sid) == 0 and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    took = time.monotonic() - t0
    assert te.send_probe(sid) != 0 and took < 5, took
    te.destroy()


def test_ascend_store_created_late(peers):
    """The Decode waits inside initialize() for a store the Prefill creates afterwards."""
    from memfabric_hybrid import create_config_store

    url = f"tcp://127.0.0.1:{free_port()}"
    dec = peers("mf5", url, 1 << 20)
    dec.line("INIT")
    t_store = time.monotonic()
    assert create_config_store(url) == 0
    sid, dst, size, init_ms = dec.ready()
    waited_after_store = (time.monotonic() - t_store) * 1000
    # It returned promptly once the store was there: no fixed sleep (MemFabric sleeps 10 s).
    assert waited_after_store < 3000, waited_after_store
    te = ascend_prefill(url)
    src = ctypes.create_string_buffer(pattern(size, 5), size)
    h = size // 2  # the Decode registered two halves; an element lies inside one
    a = ctypes.addressof(src)
    assert te.batch_transfer_sync_write(sid, [a, a + h], [dst, dst + h], [h, size - h]) == 0
    assert dec.sha() == sha_of(src.raw)
    dec.quit()
    te.destroy()


def test_ascend_no_store_url_is_a_code(monkeypatch):
    from mf_adapter import TransferEngine

    monkeypatch.delenv("ASCEND_MF_STORE_URL", raising=False)
    te = TransferEngine()
    assert te.initialize(None, "127.0.0.1:0", "Prefill", 0) == -kvferry.KVF_EINVAL


def test_ascend_enums_and_names():
    import mf_adapter
    import memfabric_hybrid

    for m in (mf_adapter, memfabric_hybrid):
        te = m.TransferEngine
        assert te.TransDataOpType.SDMA == 1 and te.TransDataOpType.DEVICE_RDMA == 8
        assert te.TransferOpcode.Read == 0 and te.TransferOpcode.Write == 1
        assert m.TransDataOpType is te.TransDataOpType
        for name in ["initialize", "get_rpc_port", "register_memory", "batch_register_memory",
                     "unregister_memory", "batch_unregister_memory", "transfer_sync_write",
                     "transfer_sync_read", "batch_transfer_sync_write",
                     "batch_transfer_sync_read", "send_probe", "destroy", "unInitialize"]:
            assert callable(getattr(te, name)), name
        for name in ["create_config_store", "set_log_level", "set_conf_store_tls",
                     "get_last_err_msg"]:
            assert callable(getattr(m, name)), name


def test_ascend_device_rdma_falls_back_with_one_line(caplog):
    from memfabric_hybrid import TransferEngine, create_config_store

    url = f"tcp://127.0.0.1:{free_port()}"
    assert create_config_store(url) == 0
    caplog.set_level(logging.WARNING, logger="kvferry.compat")
    engines = []
    for _ in range(2):
        te = TransferEngine()
        assert te.initialize(url, f"127.0.0.1:{te.get_rpc_port()}", "Prefill", 0,
                             TransferEngine.TransDataOpType.DEVICE_RDMA) == 0
        engines.append(te)
    lines = [r.getMessage() for r in caplog.records if "DEVICE_RDMA" in r.getMessage()]
    assert len(lines) == 1 and "tcp" in lines[0], lines
    for te in engines:
        te.destroy()


def test_launch_ascend_mf_store(tmp_path):
    url = f"tcp://127.0.0.1:{free_port()}"
    p = subprocess.Popen([sys.executable, "-m", "mf_adapter.launch_ascend_mf_store"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=child_env(ASCEND_MF_STORE_URL=url, ASCEND_MF_LOG_LEVEL="1"),
                         start_new_session=True)
    try:
        lines = [p.stdout.readline().strip() for _ in range(1)]
        while lines[-1] != f"config store serving at {url}" and lines[-1] and len(lines) < 20:
            lines.append(p.stdout.readline().strip())  # the store's own info lines (level 1)
        assert lines[-1] == f"config store serving at {url}", lines
        with kvferry.Store(url) as s:
            s.set("k", b"v")
            assert s.get("k") == b"v"
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == 0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        p.stdout.close()
    r = subprocess.run([sys.executable, "-m", "memfabric_hybrid.launch_ascend_mf_store"],
                       env=child_env(ASCEND_MF_STORE_URL=""), capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and "set ASCEND_MF_STORE_URL" in r.stderr


# ---- SGLang --disaggregation-transfer-backend mooncake, vLLM MooncakeConnector ---------------

@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_mooncake_p2p_sequence(peers, monkeypatch, caplog, transport):
    """No store process anywhere: P2PHANDSHAKE, session ids host:rpc_port."""
    from mooncake.engine import TransferEngine

    monkeypatch.setenv("KVFERRY_TRANSPORT", transport)
    size = 4 << 20
    dec = peers("mooncake", "-", size, KVFERRY_TRANSPORT=transport)
    sid, dst, _, dec_init_ms = dec.ready()

    caplog.set_level(logging.WARNING, logger="kvferry.compat")
    te = TransferEngine()
    t0 = time.monotonic()
    assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "rdma", "") == 0
    init_ms = (time.monotonic() - t0) * 1000
    # Said once per process (an earlier case of this process may have said it).
    assert any("'rdma' is not available" in r.getMessage() for r in caplog.records) or \
        "rdma" in kvferry._compat._fallback_said
    me = f"127.0.0.1:{te.get_rpc_port()}"
    assert te.get_rpc_port() > 0

    src = ctypes.create_string_buffer(pattern(size, 11), size)
    sa = ctypes.addressof(src)
    assert te.register_memory(sa, size) == 0
    # vLLM's shape: groups of blocks per layer, one batch.
    block = 16 << 10
    offs = list(range(0, size, 2 * block))
    assert te.batch_transfer_sync_write(target_hostname=sid, buffers=[sa + o for o in offs],
                                        peer_buffer_addresses=[dst + o for o in offs],
                                        lengths=[block] * len(offs)) == 0
    raw = src.raw
    want = bytearray(size)
    for o in offs:
        want[o:o + block] = raw[o:o + block]
    assert dec.sha() == sha_of(want)
    assert te.kvferry_engine.peer_transport(sid) == transport

    assert te.transfer_sync_write(target_hostname=sid, buffer=sa + block,
                                  peer_buffer_address=dst + block, length=block) == 0
    want[block:2 * block] = raw[block:2 * block]
    back = ctypes.create_string_buffer(4 * block)
    assert te.transfer_sync_read(sid, ctypes.addressof(back), dst, 4 * block) == 0
    assert back.raw == bytes(want[:4 * block])

    bid = te.transfer_submit_write(sid, sa, dst, size)
    assert bid > 0
    end = time.monotonic() + 30
    while (st := te.transfer_check_status(bid)) == 0 and time.monotonic() < end:
        time.sleep(0.01)
    assert st == 1
    bid = te.batch_transfer_async_write(sid, [sa], [dst], [size])
    assert te.get_batch_transfer_status([bid]) == 0
    assert dec.sha() == sha_of(raw)
    assert te.get_first_buffer_address(sid) == dst

    assert te.send_probe(sid) == 0
    assert te.batch_unregister_memory(buffer_addresses=[sa]) == 0
    dec.quit()
    print(f"mooncake over {transport}: initialize {init_ms:.1f} ms here, "
          f"{dec_init_ms:.1f} ms in the peer; session {me}")


def test_mooncake_force_tcp_and_metadata_servers(monkeypatch, caplog):
    from mooncake.engine import TransferEngine

    monkeypatch.setenv("MC_FORCE_TCP", "1")
    caplog.set_level(logging.WARNING, logger="kvferry.compat")
    te = TransferEngine()
    assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "rdma", "mlx5_0") == 0
    assert not [r for r in caplog.records if "is not available" in r.getMessage()]
    te.kvferry_engine.destroy()
    te = TransferEngine()
    assert te.initialize("127.0.0.1", "http://127.0.0.1:8080/metadata", "tcp", "") == \
        -kvferry.KVF_ENOTSUP


# ---- opt-in ----------------------------------------------------------------------------------

def test_compat_path_is_opt_in(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kvferry", "compat-path"], capture_output=True,
                       text=True, timeout=30, env=dict(os.environ, PYTHONPATH=PKG_PARENT))
    assert r.returncode == 0 and r.stdout.strip() == COMPAT
    # Without that directory on the path, kvferry brings no `mooncake` or `mf_adapter`.
    code = ("import importlib.util, sys; "
            "print([n for n in ('mooncake', 'mf_adapter', 'memfabric_hybrid') "
            "if importlib.util.find_spec(n) and 'kvferry' in (importlib.util.find_spec(n).origin or '')])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, PYTHONPATH=PKG_PARENT))
    assert r.stdout.strip() == "[]", r.stdout + r.stderr

    # A real Mooncake installed as well: kvferry's is used only because the path says so, and
    # both compat-path and the import say which one is hidden.
    fake = tmp_path / "site" / "mooncake"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("REAL = True\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PKG_PARENT, str(tmp_path / "site")]))
    r = subprocess.run([sys.executable, "-m", "kvferry", "compat-path"], capture_output=True,
                       text=True, timeout=30, env=env)
    assert r.stdout.strip() == COMPAT and "mooncake is installed at" in r.stderr, r.stderr
    env["PYTHONPATH"] = os.pathsep.join([COMPAT, PKG_PARENT, str(tmp_path / "site")])
    r = subprocess.run([sys.executable, "-c", "import mooncake.engine"], capture_output=True,
                       text=True, timeout=30, env=env)
    assert r.returncode == 0 and "is hiding the Mooncake installed at" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "kvferry"], capture_output=True, text=True,
                       timeout=30, env=env)
    assert r.returncode == 2 and "compat-path" in r.stderr
