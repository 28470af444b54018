"""The seed's flow: examples/test_transfer_engine.py as a Decode and a Prefill process, with
torch tensors, started in either order. The Prefill starts the config store in its process; the
Prefill writes each slice with a notification and the Decode checks each slice as its
notification arrives."""

import os
import re
import signal
import sys
import time

import pytest

from conftest import EXAMPLE, free_port, wait_port


@pytest.fixture(autouse=True)
def torch_required():
    """The example runs on torch tensors; without torch each test is skipped, saying why."""
    pytest.importorskip("torch", reason="torch is not installed for this interpreter "
                                        "(apt-get install python3-torch)")

ITERATIONS = 2
TIMEOUT_S = 90


def run_seed_flow(procs, decode_first, p2p=False):
    store_port, decode_port, prefill_port = free_port(), free_port(), free_port()
    store_url = "p2p://" if p2p else f"tcp://127.0.0.1:{store_port}"
    decode_sid = f"127.0.0.1:{decode_port}"
    common = ["--store-url", store_url, "--log-level", "2", "--iterations", str(ITERATIONS)]
    decode_args = [EXAMPLE, "--role", "Decode", "--src-session-id", decode_sid,
                   "--npu-id", "0"] + common
    prefill_args = [EXAMPLE, "--role", "Prefill", "--src-session-id",
                    f"127.0.0.1:{prefill_port}", "--npu-id", "1",
                    "--dst-session-id", decode_sid] + common

    if decode_first:
        decode = procs.start("decode", decode_args)
        assert wait_port(decode_port, 30), "the Decode never listened:\n" + procs.output("decode")
        prefill = procs.start("prefill", prefill_args)
    else:
        prefill = procs.start("prefill", prefill_args)
        assert wait_port(store_port, 30), \
            "the Prefill never started the store:\n" + procs.output("prefill")
        decode = procs.start("decode", decode_args)

    rc_p = procs.wait(prefill, TIMEOUT_S)
    rc_d = procs.wait(decode, TIMEOUT_S)
    out_p, out_d = procs.output("prefill"), procs.output("decode")
    sys.stdout.write("---- decode ----\n" + out_d + "---- prefill ----\n" + out_p)
    assert rc_d == 0, f"decode exit status {rc_d}"
    assert rc_p == 0, f"prefill exit status {rc_p}"

    assert "register success." in out_d
    if p2p:
        assert "config store" not in out_p  # no store anywhere
    else:
        assert f"config store created at {store_url}" in out_p
    assert out_p.count("write success peer_address=") == 10 * ITERATIONS
    assert out_d.count("-----------------begin read buffer info----------------") == ITERATIONS
    for i in range(10):
        assert out_d.count(f"get buffer success {i}, sum=") == ITERATIONS
    # Each slice is read when its notification arrives, from the Prefill's session.
    prefill_sid = re.search(r"session (127\.0\.0\.1:\d+)", out_p).group(1)
    for r in range(ITERATIONS):
        for i in range(10):
            line = f"notification from {prefill_sid}: round {r} slice {i}\n"
            assert line in out_d, line
            after = out_d[out_d.index(line) + len(line):]
            assert after.startswith(f"get buffer success {i}, sum="), after[:80]
    for r in range(ITERATIONS):
        assert f"verify round {r}: OK (10/10 slices match, 48000000 bytes)" in out_d
        assert f"decode read finish, round {r} verified" in out_p
    assert "MISMATCH" not in out_d


def test_seed_flow_decode_first(procs):
    run_seed_flow(procs, decode_first=True)


def test_seed_flow_prefill_first(procs):
    run_seed_flow(procs, decode_first=False)


def test_seed_typo_store_url_fails_fast(procs):
    """The seed's README has tcp://192.168.1.1000:8000 in its Prefill command: a clear error,
    at once, never a hang."""
    p = procs.start("prefill", [EXAMPLE, "--role", "Prefill", "--src-session-id",
                                f"127.0.0.1:{free_port()}", "--store-url",
                                "tcp://192.168.1.1000:8000", "--dst-session-id",
                                "127.0.0.1:50051", "--log-level", "3"])
    rc = procs.wait(p, 20)
    out = procs.output("prefill")
    sys.stdout.write(out)
    assert rc == 1, f"exit status {rc}"
    assert "TransferEngine initialization failed" in out
    assert "192.168.1.1000" in out



def test_decode_serves_next_prefill_after_one_dies(store, procs):
    """A Prefill killed in the middle of a round costs the Decode nothing but that Prefill: the
    Decode notices within seconds (not its 60 s wait), says so, and serves the next Prefill's
    rounds from the start. The store runs apart from both (here in the test process)."""
    decode_port = free_port()
    decode_sid = f"127.0.0.1:{decode_port}"
    common = ["--store-url", store.url, "--log-level", "2", "--iterations", str(ITERATIONS)]
    decode = procs.start("decode", [EXAMPLE, "--role", "Decode", "--src-session-id",
                                    decode_sid, "--npu-id", "0"] + common)
    assert wait_port(decode_port, 30), "the Decode never listened:\n" + procs.output("decode")

    def prefill(name):
        return procs.start(name, [EXAMPLE, "--role", "Prefill", "--src-session-id",
                                  f"127.0.0.1:{free_port()}", "--npu-id", "1",
                                  "--dst-session-id", decode_sid] + common)

    first = prefill("prefill1")
    assert procs.wait_output("decode", "get buffer success 3,", 60), procs.output("decode")
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    t0 = time.monotonic()
    assert procs.wait_output("decode", "waiting for the next Prefill", 20), \
        procs.output("decode")
    assert time.monotonic() - t0 < 10
    second = prefill("prefill2")
    rc_p = procs.wait(second, TIMEOUT_S)
    rc_d = procs.wait(decode, TIMEOUT_S)
    out_d = procs.output("decode")
    sys.stdout.write("---- decode ----\n" + out_d + "---- prefill2 ----\n" +
                     procs.output("prefill2"))
    assert rc_p == 0 and rc_d == 0, (rc_p, rc_d)
    assert re.search(r"the Prefill 127\.0\.0\.1:\d+ went away \(.+\); waiting for the next "
                     r"Prefill", out_d), out_d
    for r in range(ITERATIONS):
        assert f"verify round {r}: OK (10/10 slices match, 48000000 bytes)" in out_d


def test_prefill_stops_when_its_decode_dies(store, procs):
    """A Decode killed in the middle of the rounds: the Prefill stops within seconds, saying
    the Decode went away, instead of waiting 60 s for an acknowledgement."""
    decode_port = free_port()
    decode_sid = f"127.0.0.1:{decode_port}"
    common = ["--store-url", store.url, "--log-level", "2", "--iterations", "3"]
    decode = procs.start("decode", [EXAMPLE, "--role", "Decode", "--src-session-id",
                                    decode_sid, "--npu-id", "0"] + common)
    assert wait_port(decode_port, 30), "the Decode never listened:\n" + procs.output("decode")
    p = procs.start("prefill", [EXAMPLE, "--role", "Prefill", "--src-session-id",
                                f"127.0.0.1:{free_port()}", "--npu-id", "1",
                                "--dst-session-id", decode_sid] + common)
    assert procs.wait_output("decode", "verify round 0: OK", 60), procs.output("decode")
    os.kill(decode.pid, signal.SIGKILL)
    decode.wait()
    t0 = time.monotonic()
    rc = procs.wait(p, 30)
    took = time.monotonic() - t0
    out = procs.output("prefill")
    sys.stdout.write(out)
    assert rc == 1, f"exit status {rc}"
    assert took < 10, took
    assert f"Decode {decode_sid} went away" in out or "write failed" in out, out


def test_seed_flow_p2p_no_store(procs):
    """The same flow with p2p:// (issue 14): no store process anywhere; the Prefill finds the
    Decode by its session id alone and the Decode answers the Prefill named by its
    notifications."""
    run_seed_flow(procs, decode_first=True, p2p=True)
