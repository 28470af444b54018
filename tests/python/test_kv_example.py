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

from conftest import SOURCE_DIR, free_port


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


def test_kv_decode_serves_next_prefill_after_one_dies(procs):
    """A Prefill killed between requests: the Decode notices within about a second, takes its
    blocks back, says so, and serves the next Prefill to the end."""
    store_url = f"tcp://127.0.0.1:{free_port()}"
    decode_sid = f"127.0.0.1:{free_port()}"
    small = ["--layers", "4", "--store-url", store_url, "--timeout", "30", "--transport", "shm"]
    procs.start("store", [KV_EXAMPLE, "--role", "store"] + small)
    assert procs.wait_output("store", "listening", 30), procs.output("store")
    decode = procs.start("decode", [KV_EXAMPLE, "--role", "decode", "--session-id", decode_sid,
                                    "--num-blocks", "8"] + small)
    assert procs.wait_output("decode", "READY", 30), procs.output("decode")

    def prefill(name, requests):
        return procs.start(name, [KV_EXAMPLE, "--role", "prefill", "--session-id",
                                  f"127.0.0.1:{free_port()}", "--peer", decode_sid,
                                  "--requests", str(requests)] + small)

    first = prefill("prefill1", 100000)
    assert procs.wait_output("decode", "decode: request 3:", 60), procs.output("decode")
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert procs.wait_output("decode", "waiting for the next Prefill", 10), \
        procs.output("decode")
    second = prefill("prefill2", 3)
    rc_p = procs.wait(second, 60)
    rc_d = procs.wait(decode, 60)
    out_d = procs.output("decode")
    sys.stdout.write("---- decode ----\n" + out_d + "---- prefill2 ----\n" +
                     procs.output("prefill2"))
    assert rc_p == 0 and rc_d == 0, (rc_p, rc_d)
    assert re.search(r"decode: the Prefill 127\.0\.0\.1:\d+ went away before saying bye \(.+\); "
                     r"\d+ blocks freed, waiting for the next Prefill", out_d), out_d
    assert "MISMATCH" not in out_d
