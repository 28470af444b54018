"""examples/kv_cache_transfer.py --local: a store, a Decode and a Prefill as processes moving a
DeepSeek-R1-shaped paged KV cache (61 layers x (128 KiB + 16 KiB) per block, 122 elements per
request), coordinated by notifications both ways, every request's blocks verified by the Decode
when its notification arrives, and latency percentiles printed."""

import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import SOURCE_DIR

KV_EXAMPLE = os.path.join(SOURCE_DIR, "examples", "kv_cache_transfer.py")
REQUESTS = 5


@pytest.fixture(autouse=True)
def torch_required():
    pytest.importorskip("torch", reason="torch is not installed for this interpreter "
                                        "(apt-get install python3-torch)")


def run_local(transport):
    # --local reaps its own store, Decode and Prefill; they share its process group, which is
    # killed as a whole if it hangs.
    p = subprocess.Popen([sys.executable, KV_EXAMPLE, "--local", "--requests", str(REQUESTS),
                          "--transport", transport, "--timeout", "30"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=150)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    sys.stdout.write(out)
    assert p.returncode == 0, f"exit status {p.returncode}"
    assert "local: decode exit 0, prefill exit 0: OK" in out
    # The default request: 61 layers x (128 KiB + 16 KiB), one element per layer per part.
    for r in range(1, REQUESTS + 1):
        assert re.search(rf"decode: request {r}: blocks \[\d+\], 122 elements, 8994816 bytes, "
                         r"verified OK, [\d.]+ ms submit->notified", out), f"request {r}"
        assert re.search(rf"prefill: request {r}: 122 elements, 8994816 bytes to blocks \[\d+\] "
                         rf"over {transport}: [\d.]+ ms submit->complete", out), f"request {r}"
    assert "MISMATCH" not in out
    assert f"decode: {REQUESTS}/{REQUESTS} requests verified, 0 mismatched" in out
    m = re.search(r"SUMMARY role=decode requests=(\d+) verified=(\d+) failed=0 bytes=(\d+) "
                  r"p50_ms=([\d.]+) p99_ms=([\d.]+)", out)
    assert m, "no decode summary"
    assert int(m.group(1)) == int(m.group(2)) == REQUESTS
    assert int(m.group(3)) == REQUESTS * 61 * (128 + 16) * 1024
    assert 0 < float(m.group(4)) <= float(m.group(5))
    m = re.search(rf"SUMMARY role=prefill requests={REQUESTS} failed=0 bytes=\d+ "
                  rf"transport={transport} p50_ms=([\d.]+) p99_ms=([\d.]+)", out)
    assert m, "no prefill summary"


def test_kv_cache_transfer_local_tcp():
    run_local("tcp")


def test_kv_cache_transfer_local_shm():
    run_local("shm")
