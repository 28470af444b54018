"""`make install` (cmake --install) puts an importable, working package into the interpreter's
site directory under the prefix."""

import os
import subprocess
import sys

import pytest

BUILD_DIR = os.environ.get("KVF_BUILD_DIR")


def test_cmake_install_into_a_prefix(tmp_path):
    if not BUILD_DIR:
        pytest.skip("KVF_BUILD_DIR is not set (CTest sets it to the build tree)")
    prefix = tmp_path / "prefix"
    r = subprocess.run(["cmake", "--install", BUILD_DIR, "--prefix", str(prefix)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    inits = list(prefix.glob("lib/python3*/*-packages/kvferry/__init__.py"))
    assert len(inits) == 1, f"installed package not found under {prefix}: {r.stdout}"
    site = inits[0].parent.parent
    assert list(site.glob("kvferry/_kvferry*.so"))
    script = ("import kvferry, numpy as np\n"
              "s = kvferry.StoreServer()\n"
              "with kvferry.TransferEngine() as e:\n"
              "    assert e.initialize(s.url, None, 'Both', 0) == 0\n"
              "    b = np.zeros(4096, np.uint8)\n"
              "    assert e.register_memory(b) == 0\n"
              "    assert e.peer_regions(e.session_id) == [(b.ctypes.data, 4096)]\n"
              "print(kvferry.__file__)\n")
    env = dict(os.environ, PYTHONPATH=str(site))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=60, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == str(site / "kvferry" / "__init__.py")
