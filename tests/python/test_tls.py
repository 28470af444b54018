"""TLS for the config store from Python: set_conf_store_tls() with the upstream's "key: value;"
string and set_conf_store_tls_key() with the key's PEM text and its (encrypted) password, used
by create_config_store(), TransferEngine.initialize() and Store(). Each test function runs in its
own process (the settings are process-wide)."""

import os
import subprocess

import numpy as np
import pytest

import kvferry
from conftest import free_port

KVF_ETLS = -(1000 + 20)
KVF_EINVAL = -(1000 + 1)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    script = os.path.join(os.environ["KVF_SOURCE_DIR"], "tests", "tls_certs.sh")
    r = subprocess.run(["/bin/sh", script, str(d)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return str(d)


def info(d, **extra):
    parts = [f"tlsCaPath: {d}", "tlsCaFile: ca.pem", f"tlsCert: {d}/server.pem"]
    parts += [f"{k}: {v}" for k, v in extra.items()]
    return "; ".join(parts)


def test_seed_flow_over_mutual_tls(certs):
    """The upstream's order: set_conf_store_tls, then the key, then the store and the engines;
    the store requires client certificates (a CA is set), which the engines present."""
    assert kvferry.set_conf_store_tls(True, info(certs, tlsCrlPath=certs, tlsCrlFile="crl.pem")) == 0, \
        kvferry.get_last_err_msg()
    with open(os.path.join(certs, "server-enc.key")) as f:
        pem = f.read()
    # The password arrives "encrypted"; the application's function decrypts it.
    assert kvferry.set_conf_store_tls_key(pem, "CORRECT HORSE", lambda s: s.lower()) == 0, \
        kvferry.get_last_err_msg()
    url = f"tcp://127.0.0.1:{free_port()}"
    assert kvferry.create_config_store(url) == 0, kvferry.get_last_err_msg()
    d = kvferry.TransferEngine()
    p = kvferry.TransferEngine()
    assert d.initialize(url, "127.0.0.1:0", "Decode", 0) == 0, kvferry.get_last_err_msg()
    assert p.initialize(url, "127.0.0.1:0", "Prefill", 0) == 0, kvferry.get_last_err_msg()
    dst = np.zeros(1 << 20, dtype=np.uint8)
    src = np.random.default_rng(3).integers(0, 256, dst.nbytes, dtype=np.uint8)
    assert d.register_memory(dst.ctypes.data, dst.nbytes) == 0
    sid = f"127.0.0.1:{d.get_rpc_port()}"
    assert p.transfer_sync_write(sid, src.ctypes.data, dst.ctypes.data, dst.nbytes) == 0, \
        kvferry.get_last_err_msg()
    assert np.array_equal(src, dst)
    st = kvferry.Store(url)
    st.set("tls/probe", b"over TLS")
    assert st.get("tls/probe") == b"over TLS"
    st.close()
    # A plain client of the same store is refused at once, and told why.
    assert kvferry.set_conf_store_tls(False, "") == 0
    with pytest.raises(kvferry.Error) as ei:
        kvferry.Store(url)
    assert ei.value.code == KVF_ETLS
    assert "this store requires TLS" in str(ei.value)
    p.destroy()
    d.destroy()


def test_wrong_password_and_bad_values(certs):
    assert kvferry.set_conf_store_tls(True, info(certs)) == 0, kvferry.get_last_err_msg()
    with open(os.path.join(certs, "server-enc.key")) as f:
        pem = f.read()
    assert kvferry.set_conf_store_tls_key(pem, "wrong horse") == KVF_ETLS
    assert "wrong password for the TLS private key" in kvferry.get_last_err_msg()
    assert kvferry.set_conf_store_tls_key(pem, None) == KVF_ETLS
    assert "is encrypted and no password is set" in kvferry.get_last_err_msg()
    # The key by file name works too.
    assert kvferry.set_conf_store_tls_key(os.path.join(certs, "server.key")) == 0, \
        kvferry.get_last_err_msg()
    # Values are checked, naming the value.
    for bad, why in [("tlsCaFile: a:b.pem", 'tlsCaFile "a:b.pem"'),
                     ("tlsCert: x,y.pem", 'tlsCert "x,y.pem"'),
                     ("tlsNope: x", 'unknown key "tlsNope"'),
                     ("tlsCaFile", '"tlsCaFile" is not "key: value"')]:
        assert kvferry.set_conf_store_tls(True, bad) == KVF_EINVAL, bad
        assert why in kvferry.get_last_err_msg()
    assert kvferry.set_conf_store_tls(True, f"tlsCaPath: {certs}; tlsCaFile: nosuch.pem") == -2
    assert f"{certs}/nosuch.pem: No such file or directory" in kvferry.get_last_err_msg()
    with pytest.raises(TypeError):
        kvferry.set_conf_store_tls_key("x", "pw", 42)


def test_wrong_ca_fails_at_once(certs):
    # The store: server certificate only.
    assert kvferry.set_conf_store_tls(True, f"tlsCert: {certs}/server.pem") == 0
    assert kvferry.set_conf_store_tls_key(os.path.join(certs, "server.key")) == 0
    url = f"tcp://127.0.0.1:{free_port()}"
    assert kvferry.create_config_store(url) == 0, kvferry.get_last_err_msg()
    # A client trusting another CA.
    assert kvferry.set_conf_store_tls(True, f"tlsCaPath: {certs}; tlsCaFile: wrongca.pem") == 0
    e = kvferry.TransferEngine(init_timeout_ms=10000)
    assert e.initialize(url, "127.0.0.1:0", "Decode", 0) == KVF_ETLS
    assert "unable to get local issuer certificate" in kvferry.get_last_err_msg()


def test_data_tls(certs, monkeypatch):
    """data_tls=True: the engines' tcp data connections are TLS too, with the same options (each
    engine presents its certificate, and requires its peer's: a CA is set). A peer without it is
    refused with KVF_ETLS, saying what is missing, and nothing lands."""
    monkeypatch.setenv("KVFERRY_TRANSPORT", "tcp")
    assert kvferry.set_conf_store_tls(True, info(certs)) == 0, kvferry.get_last_err_msg()
    assert kvferry.set_conf_store_tls_key(os.path.join(certs, "server.key")) == 0
    url = f"tcp://127.0.0.1:{free_port()}"
    assert kvferry.create_config_store(url) == 0, kvferry.get_last_err_msg()
    d = kvferry.TransferEngine(data_tls=True)
    p = kvferry.TransferEngine(data_tls=True)
    assert d.initialize(url, "127.0.0.1:0", "Decode", 0) == 0, kvferry.get_last_err_msg()
    assert p.initialize(url, "127.0.0.1:0", "Prefill", 0) == 0, kvferry.get_last_err_msg()
    dst = np.zeros(4 << 20, dtype=np.uint8)
    src = np.random.default_rng(5).integers(0, 256, dst.nbytes, dtype=np.uint8)
    assert d.register_memory(dst.ctypes.data, dst.nbytes) == 0
    sid = f"127.0.0.1:{d.get_rpc_port()}"
    assert p.transfer_sync_write(sid, src.ctypes.data, dst.ctypes.data, dst.nbytes) == 0, \
        kvferry.get_last_err_msg()
    assert np.array_equal(src, dst)
    plain = kvferry.TransferEngine()
    assert plain.initialize(url, "127.0.0.1:0", "Prefill", 0) == 0, kvferry.get_last_err_msg()
    dst[:] = 0
    assert plain.transfer_sync_write(sid, src.ctypes.data, dst.ctypes.data, 4096) == KVF_ETLS
    assert "requires TLS on data connections: this side has none" in kvferry.get_last_err_msg()
    assert not dst.any()
    plain.destroy()
    p.destroy()
    d.destroy()


def test_data_tls_needs_options():
    e = kvferry.TransferEngine(data_tls=True)
    assert e.initialize("p2p://", "127.0.0.1:0", "Decode", 0) == KVF_EINVAL
    assert "data_tls=True takes the options of set_conf_store_tls(True, ...)" in \
        kvferry.get_last_err_msg()
