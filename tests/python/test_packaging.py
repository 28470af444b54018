"""Packaging as a user of another interpreter meets it: the wheel `make wheel` builds installs
offline into a fresh venv of a different interpreter than /usr/bin/python3 (pyenv's, when the
machine has one; else a venv of /usr/bin/python3) and the seed's flow runs from it; the type stubs
ship and match the module; every method has a signature inspect reads; the examples say which
interpreter lacks what."""

import glob
import inspect
import os
import subprocess
import sys

import pytest

import kvferry

SOURCE_DIR = os.environ.get("KVF_SOURCE_DIR", "")
BUILD_DIR = os.environ.get("KVF_BUILD_DIR")

SEED_FLOW = r"""
import ctypes, inspect, os, kvferry
s = kvferry.StoreServer()
d, p = kvferry.TransferEngine(), kvferry.TransferEngine()
assert d.initialize(s.url, "127.0.0.1:0", "Decode", 0) == 0, kvferry.get_last_err_msg()
assert p.initialize(s.url, "127.0.0.1:0", "Prefill", 0) == 0, kvferry.get_last_err_msg()
dst = bytearray(1 << 20)
addr = ctypes.addressof((ctypes.c_char * len(dst)).from_buffer(dst))
assert d.register_memory(dst) == 0
src = os.urandom(1 << 20)
assert p.transfer_sync_write(d.session_id, src, addr) == 0, kvferry.get_last_err_msg()
back = bytearray(4096)
assert p.transfer_sync_read(d.session_id, back, addr + 4096, 4096) == 0
assert bytes(dst) == src and bytes(back) == src[4096:8192]
assert list(inspect.signature(p.transfer_sync_write).parameters)[-1] == "notify"
pkg = os.path.dirname(kvferry.__file__)
assert os.path.exists(os.path.join(pkg, "py.typed")) and os.path.exists(os.path.join(pkg, "_kvferry.pyi"))
p.destroy(); d.destroy(); s.stop()
print("seed flow ok from", kvferry.__file__)
"""


def other_interpreter():
    """A CPython of this version whose path differs from this one's, if the PATH has one."""
    mine = os.path.realpath(sys.executable)
    for d in os.environ.get("PATH", "").split(os.pathsep):
        exe = os.path.join(d, "python3")
        if not os.access(exe, os.X_OK):
            continue
        r = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2], sys.executable)"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            continue
        ver, path = r.stdout.strip().split(") ", 1)
        if ver + ")" == str(sys.version_info[:2]) and os.path.realpath(path) != mine:
            return path
    return sys.executable


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    if not BUILD_DIR:
        pytest.skip("KVF_BUILD_DIR is not set (CTest sets it to the build tree)")
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, os.path.join(SOURCE_DIR, "scripts", "wheel.py"),
                        os.path.join(BUILD_DIR, "python"), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    whl = glob.glob(str(out / "kvferry-*.whl"))
    assert len(whl) == 1 and r.stdout.strip() == whl[0]
    return whl[0]


def test_wheel_installs_offline_into_another_interpreter(wheel, tmp_path):
    py = other_interpreter()
    venv = tmp_path / "venv"
    r = subprocess.run([py, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.skip("%s cannot make a venv with pip (%s)" % (py, r.stderr.strip()[-200:]))
    vpy = str(venv / "bin" / "python")
    r = subprocess.run([vpy, "-m", "pip", "install", "--no-index", "--no-cache-dir", wheel],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([vpy, "-c", SEED_FLOW], capture_output=True, text=True, timeout=120,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "seed flow ok from %s" % venv in r.stdout

    # The seed's example from that venv (no torch in it): it names the interpreter and the fix.
    r = subprocess.run([vpy, os.path.join(SOURCE_DIR, "examples", "test_transfer_engine.py"),
                        "--role", "Decode", "--store-url", "tcp://127.0.0.1:1"],
                       capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    if "torch" in subprocess.run([vpy, "-c", "import torch"], capture_output=True,
                                 text=True).stderr:
        assert r.returncode == 2, r.stdout + r.stderr
        assert "this example needs torch, which %s (Python " % vpy in r.stderr, r.stderr
        assert "/usr/bin/python3 after apt-get install python3-torch" in r.stderr


def test_example_without_kvferry_names_the_interpreter(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-I", os.path.join(SOURCE_DIR, "examples",
                                                           "kv_cache_transfer.py"), "--local"],
                       capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    if r.returncode == 0 or "kvferry cannot be imported" not in r.stderr:
        pytest.skip("kvferry is installed for %s; nothing to check" % sys.executable)
    assert r.returncode == 1
    assert ("kvferry cannot be imported by %s (Python %s)" %
            (sys.executable, sys.version.split()[0])) in r.stderr
    assert "%s -m pip install dist/kvferry-*.whl" % sys.executable in r.stderr


def test_every_method_has_a_signature():
    for cls in (kvferry.TransferEngine, kvferry.Store, kvferry.StoreServer):
        inspect.signature(cls)
        for name, f in vars(cls).items():
            if callable(f) and not name.startswith("__"):
                sig = inspect.signature(getattr(cls, name))
                assert list(sig.parameters)[0] == "self", (cls, name, sig)
    for name in ("create_config_store", "set_log_level", "set_conf_store_tls",
                 "get_last_err_msg", "strerror", "err_name"):
        inspect.signature(getattr(kvferry, name))
    sig = inspect.signature(kvferry.TransferEngine.transfer_sync_write)
    assert str(sig) == ("(self, /, dest_session, buffer, peer_buffer_address, length=None, "
                        "notify=None)")


def test_stubs_match_the_module(tmp_path):
    if not SOURCE_DIR:
        pytest.skip("KVF_SOURCE_DIR is not set")
    out = tmp_path / "_kvferry.pyi"
    r = subprocess.run([sys.executable, os.path.join(SOURCE_DIR, "scripts", "gen_stubs.py"),
                        str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    committed = os.path.join(SOURCE_DIR, "python", "kvferry", "_kvferry.pyi")
    with open(committed) as a, open(out) as b:
        assert a.read() == b.read(), ("python/kvferry/_kvferry.pyi is out of date: run "
                                      "PYTHONPATH=build/python /usr/bin/python3 "
                                      "scripts/gen_stubs.py python/kvferry/_kvferry.pyi")
    compile(open(committed).read(), committed, "exec")
