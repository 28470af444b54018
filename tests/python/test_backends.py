"""The Python module over etcd and Redis: create_config_store() checks that such a store answers
(it starts nothing), and the seed's engine calls work unchanged with etcd:// and redis:// URLs.
etcd and redis-server are started on free loopback ports in temporary folders and killed after;
a missing binary fails the test with what to install."""

import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import time

import numpy as np
import pytest

import kvferry
from conftest import free_port, make_engine

PR_SET_PDEATHSIG = 1


def _die_with_parent():
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _binary(name, package):
    path = shutil.which(name, path="/usr/bin:/usr/local/bin:/usr/sbin")
    if not path:
        pytest.fail(f"{name} is not installed; run `make deps` (Debian package {package})")
    return path


@pytest.fixture(params=["etcd", "redis"])
def backend(request):
    kind = request.param
    d = tempfile.mkdtemp(prefix=f"kvf-py-{kind}-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    port, peer = free_port(), free_port()
    if kind == "etcd":
        c, p = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer}"
        argv = [_binary("etcd", "etcd-server"), "--name", "t", "--data-dir", f"{d}/data",
                "--listen-client-urls", c, "--advertise-client-urls", c, "--listen-peer-urls", p,
                "--initial-advertise-peer-urls", p, "--initial-cluster", f"t={p}",
                "--log-level", "error"]
    else:
        argv = [_binary("redis-server", "redis-server"), "--port", str(port), "--bind",
                "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", d]
    log = open(f"{d}/log", "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=log, preexec_fn=_die_with_parent)
    url = f"{kind}://127.0.0.1:{port}"
    try:
        # Bounded readiness poll: create_config_store() is exactly "does it answer".
        deadline = time.monotonic() + 20
        while kvferry.create_config_store(url) != 0:
            assert proc.poll() is None, open(f"{d}/log").read()
            assert time.monotonic() < deadline, f"{url} did not answer"
            time.sleep(0.05)
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=10)
        log.close()
        shutil.rmtree(d, ignore_errors=True)


def test_create_config_store_checks_reachability(backend):
    assert kvferry.create_config_store(backend) == 0
    scheme = backend.split(":")[0]
    dead = f"{scheme}://127.0.0.1:{free_port()}"
    rc = kvferry.create_config_store(dead)
    assert rc == -kvferry.KVF_ESTOREDOWN, (rc, kvferry.get_last_err_msg())
    assert dead in kvferry.get_last_err_msg()


def test_seed_flow_over_backend(backend):
    d = make_engine(backend, "Decode")
    p = make_engine(backend, "Prefill")
    try:
        dst = np.zeros(1 << 20, dtype=np.uint8)
        assert d.register_memory(dst.ctypes.data, dst.nbytes) == 0
        src = np.random.default_rng(3).integers(0, 256, 1 << 20, dtype=np.uint8)
        assert p.transfer_sync_write(d.session_id, src.ctypes.data, dst.ctypes.data,
                                     src.nbytes) == 0, kvferry.get_last_err_msg()
        assert np.array_equal(src, dst)
    finally:
        p.destroy()
        d.destroy()


def test_key_prefix_moves_records(store):
    e = make_engine(store.url, "Decode", key_prefix="mooncake/")
    try:
        with kvferry.Store(store.url) as st:
            assert st.get(f"mooncake/default/sessions/{e.session_id}") is not None
            assert st.get(f"kvferry/v1/default/sessions/{e.session_id}") is None
    finally:
        e.destroy()
    with pytest.raises(ValueError, match="key_prefix is longer"):
        kvferry.TransferEngine(key_prefix="x" * 200)
    bad = kvferry.TransferEngine(key_prefix="bad prefix")
    assert bad.initialize(store.url, "127.0.0.1:0", "Decode", 0) == -kvferry.KVF_EINVAL
    assert 'config.key_prefix "bad prefix"' in kvferry.get_last_err_msg()
