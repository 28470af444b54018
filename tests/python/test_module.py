"""Module functions (create_config_store, set_log_level, set_conf_store_tls, get_last_err_msg,
strerror), the store client and server, and the module under `python3 -X dev`."""

import errno
import os
import subprocess
import sys
import textwrap
import threading

import pytest

import kvferry
from conftest import free_port, make_engine


def test_seed_names_are_exported():
    for name in ["TransferEngine", "create_config_store", "set_log_level", "set_conf_store_tls",
                 "get_last_err_msg"]:
        assert hasattr(kvferry, name), name
    for name in ["initialize", "get_rpc_port", "register_memory", "batch_register_memory",
                 "unregister_memory", "transfer_sync_write", "transfer_sync_read",
                 "batch_transfer_sync_write", "batch_transfer_sync_read", "destroy",
                 "unInitialize"]:
        assert callable(getattr(kvferry.TransferEngine, name)), name
    assert kvferry.__version__.count(".") == 2
    assert kvferry.KVF_ENOTSUP == kvferry.KVF_ERRNO_OFFSET + 10


def test_create_config_store():
    url = f"tcp://127.0.0.1:{free_port()}"
    assert kvferry.create_config_store(url) == 0
    with make_engine(url) as e:
        assert e.session_id
    # The port is taken now: an honest error, not a second store.
    rc = kvferry.create_config_store(url)
    assert rc == -errno.EADDRINUSE, (rc, kvferry.get_last_err_msg())
    assert url in kvferry.get_last_err_msg()
    assert "Address already in use" in kvferry.get_last_err_msg()
    assert kvferry.create_config_store("tcp://192.168.1.1000:8000") == -kvferry.KVF_EINVAL
    assert "192.168.1.1000" in kvferry.get_last_err_msg()
    assert kvferry.create_config_store("http://127.0.0.1:1") < 0


def test_set_log_level():
    for level in range(4):
        assert kvferry.set_log_level(level) == 0
    assert kvferry.set_log_level(7) == -kvferry.KVF_EINVAL
    assert kvferry.set_log_level(-1) == -kvferry.KVF_EINVAL
    assert kvferry.set_log_level(2) == 0


def test_set_conf_store_tls_checks_its_string():
    # A bare path is not the upstream's "key: value;" string: refused, naming it.
    assert kvferry.set_conf_store_tls(True, "/etc/ssl/ca.pem") == -kvferry.KVF_EINVAL
    assert kvferry.get_last_err_msg() == 'tls_info: "/etc/ssl/ca.pem" is not "key: value"'
    assert kvferry.set_conf_store_tls(False, "") == 0


def test_strerror_and_err_name():
    assert kvferry.strerror(-kvferry.KVF_ENOTREG) == "memory not registered"
    assert kvferry.err_name(-kvferry.KVF_ENOTREG) == "KVF_ENOTREG"
    assert kvferry.strerror(0) == "success"


def test_last_error_is_per_thread(store):
    e = kvferry.TransferEngine()
    assert e.initialize(store.url, "127.0.0.1:0", "Nope", 0) < 0
    mine = kvferry.get_last_err_msg()
    seen = []
    t = threading.Thread(target=lambda: seen.append(kvferry.get_last_err_msg()))
    t.start()
    t.join()
    assert "Nope" in mine and seen == [""]


def test_store_client_and_server():
    with kvferry.StoreServer() as srv:
        assert srv.running and srv.url.startswith("tcp://127.0.0.1:")
        with kvferry.Store(srv.url) as st:
            assert st.get("k") is None
            st.set("k", b"\x00binary\xff")
            assert st.get("k") == b"\x00binary\xff"
            st.set("s", "text é")
            assert st.get("s") == "text é".encode()
            # get-with-wait: a value set later by another thread.
            t = threading.Timer(0.2, lambda: kvferry.Store(srv.url).set("later", b"1"))
            t.start()
            assert st.get("later", wait_ms=5000) == b"1"
            t.join()
            assert st.get("never", wait_ms=100) is None
            assert st.delete("k") is True and st.delete("k") is False
        with pytest.raises(kvferry.Error) as ei:
            st.get("k")
        assert ei.value.code == -kvferry.KVF_ECLOSED
    assert not srv.running
    with pytest.raises(kvferry.Error) as ei:
        kvferry.Store(srv.url, connect_timeout_ms=200)
    assert ei.value.code == -kvferry.KVF_ESTOREDOWN
    with pytest.raises(kvferry.Error) as ei:
        kvferry.StoreServer("tcp://192.168.1.1000:8000")
    assert "192.168.1.1000" in str(ei.value)


def test_dev_mode_import_and_use(tmp_path):
    """python3 -X dev (debug allocator hooks, ResourceWarnings, ...) with warnings as errors."""
    script = textwrap.dedent("""
        import gc, sys, warnings
        import numpy as np
        import kvferry
        srv = kvferry.StoreServer()
        with kvferry.TransferEngine(init_timeout_ms=3000) as d, \\
             kvferry.TransferEngine(init_timeout_ms=3000) as p:
            assert d.initialize(srv.url, "127.0.0.1:0", "Decode", 0) == 0
            assert p.initialize(srv.url, "127.0.0.1:0", "Prefill", 0) == 0
            dst = np.zeros(1 << 20, dtype=np.uint8)
            src = np.arange(1 << 20, dtype=np.uint32).astype(np.uint8)
            assert d.register_memory(dst) == 0
            assert p.transfer_sync_write(d.session_id, src, dst.ctypes.data) == 0
            assert (src == dst).all()
            back = bytearray(4096)
            assert p.transfer_sync_read(d.session_id, back, dst.ctypes.data) == 0
            assert p.batch_transfer_sync_write(d.session_id, [src[:10], src[10:20]],
                                               [dst.ctypes.data] * 2, [10, 10]) == 0
            try:
                p.transfer_sync_write(d.session_id, 1.0, 0, 1)
            except TypeError:
                pass
            assert d.unregister_memory(dst) == 0
            assert p.transfer_sync_write(d.session_id, src, dst.ctypes.data) < 0
            st = kvferry.Store(srv.url)
            st.set("a", b"b")
            assert st.get("a") == b"b"
            st.close()
        e = kvferry.TransferEngine()
        assert e.initialize(srv.url, "127.0.0.1:0", "Both", 0) == 0
        del e                       # dealloc destroys the engine
        gc.collect()
        srv.stop()
        print("dev mode ok", sys.flags.dev_mode)
    """)
    env = dict(os.environ, KVFERRY_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, "-X", "dev", "-W", "error", "-c", script],
                       capture_output=True, text=True, timeout=60, env=env)
    sys.stdout.write(r.stdout + r.stderr)
    assert r.returncode == 0
    assert "dev mode ok True" in r.stdout
    assert "Warning" not in r.stderr
