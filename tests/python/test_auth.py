"""The cluster secret from Python: auth_key_file= on TransferEngine, create_config_store, Store
and StoreServer; a client without the key, or with another one, is refused with KVF_EAUTH."""

import os
import subprocess

import numpy as np
import pytest

import kvferry
from conftest import make_engine

KVF_EAUTH = -(1000 + 8)


@pytest.fixture
def keys(tmp_path):
    """Two different key files made by `kvferry keygen`."""
    cli = os.path.join(os.environ["KVF_BUILD_DIR"], "kvferry")
    out = []
    for name in ("a.key", "b.key"):
        path = str(tmp_path / name)
        r = subprocess.run([cli, "keygen", path], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert f"wrote a new cluster secret to {path}" in r.stdout
        assert os.stat(path).st_mode & 0o777 == 0o600
        out.append(path)
    return out


def test_engines_with_the_secret_transfer(keys):
    srv = kvferry.StoreServer("tcp://127.0.0.1:0", auth_key_file=keys[0])
    try:
        d = make_engine(srv.url, "Decode", auth_key_file=keys[0])
        p = make_engine(srv.url, "Prefill", auth_key_file=keys[0])
        dst = np.zeros(1 << 20, dtype=np.uint8)
        assert d.register_memory(dst.ctypes.data, dst.nbytes) == 0
        src = np.random.default_rng(5).integers(0, 256, 1 << 20, dtype=np.uint8)
        assert p.transfer_sync_write(d.session_id, src, dst.ctypes.data) == 0, \
            kvferry.get_last_err_msg()
        assert np.array_equal(src, dst)
        p.destroy()
        d.destroy()
    finally:
        srv.stop()


def test_wrong_or_missing_key_refused(keys):
    srv = kvferry.StoreServer("tcp://127.0.0.1:0", auth_key_file=keys[0])
    try:
        e = kvferry.TransferEngine(auth_key_file=keys[1], init_timeout_ms=5000)
        assert e.initialize(srv.url, "127.0.0.1:0", "Prefill", 0) == KVF_EAUTH
        assert "wrong key" in kvferry.get_last_err_msg()
        with pytest.raises(kvferry.Error) as ei:
            kvferry.Store(srv.url)
        assert ei.value.code == KVF_EAUTH
        assert "requires the cluster secret" in str(ei.value)
        st = kvferry.Store(srv.url, auth_key_file=keys[0])
        st.set("k", b"v")
        assert st.get("k") == b"v"
        st.close()
    finally:
        srv.stop()


def test_create_config_store_with_key(keys, tmp_path):
    from conftest import free_port
    url = f"tcp://127.0.0.1:{free_port()}"
    assert kvferry.create_config_store(url, auth_key_file=keys[0]) == 0
    with pytest.raises(kvferry.Error) as ei:
        kvferry.Store(url, auth_key_file=keys[1])
    assert ei.value.code == KVF_EAUTH
    st = kvferry.Store(url, auth_key_file=keys[0])
    st.close()
