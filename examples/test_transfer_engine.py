#!/usr/bin/env python3
"""The seed's mf_adapter example (test_transfer_engine.py) on kvferry, with CPU torch tensors.

Two nodes: a Decode node registers a (10, 50, 40, 20, 60) float16 tensor; a Prefill node fills a
tensor of the same shape with random numbers and writes it, slice by slice, into the Decode's
tensor with transfer_sync_write. The Decode then prints every slice's sum and checks it.

    # terminal 1
    python3 examples/test_transfer_engine.py --role Decode --src-session-id 127.0.0.1:50051 \\
        --store-url tcp://127.0.0.1:8000 --npu-id 0 --log-level 1
    # terminal 2
    python3 examples/test_transfer_engine.py --role Prefill --src-session-id 127.0.0.1:50052 \\
        --store-url tcp://127.0.0.1:8000 --npu-id 1 --dst-session-id 127.0.0.1:50051 \\
        --log-level 1

Differences from the seed, all because this runs on CPU hosts and must end on its own:
- The Prefill starts the config store in its process (create_config_store) when the store URL
  names this host and nothing answers there yet; otherwise it uses the store that is running.
  The Decode waits up to a minute for the store to appear, so either may be started first.
- The seed assumes the Decode's tensor sits at the same virtual address as the Prefill's; here
  the Prefill asks for the Decode's registered regions (peer_regions) instead.
- Completion and checking go through the config store (kvferry.Store): the Prefill publishes a
  CRC-32 and the sum of every slice after writing them, the Decode compares, answers, and both
  exit after --iterations rounds (exit status 0 when every slice matched).
"""

import argparse
import ipaddress
import json
import socket
import sys
import time
import uuid
import zlib
from urllib.parse import urlsplit

import kvferry
from kvferry import TransferEngine, create_config_store, set_conf_store_tls, set_log_level

SHAPE = (10, 50, 40, 20, 60)
STORE_WAIT_MS = 60000  # how long one node waits for the other (store key or store)
KEY_PREFIX = "kvferry-example"


def keys(session, token=""):
    base = f"{KEY_PREFIX}/{session}"
    return {
        "ready": f"{base}/ready",
        "round": lambda r: f"{base}/{token}/round/{r}",
        "ack": lambda r: f"{base}/{token}/ack/{r}",
    }


def slice_checks(total_buffer):
    """Per-slice (crc32, sum) of a tensor's bytes: the CRC is exact, the sum is for people."""
    import torch

    out = []
    for i in range(total_buffer.shape[0]):
        t = total_buffer[i]
        out.append({"crc": zlib.crc32(t.numpy()), "sum": float(torch.sum(t))})
    return out


def store_is_local(store_url):
    """(host, port) when store_url names an address of this host, else None."""
    try:
        u = urlsplit(store_url)
        host, port = u.hostname, u.port
        if u.scheme != "tcp" or not host or not port:
            return None
        if host != "localhost":
            ipaddress.ip_address(host)
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))  # only an address of this host can be bound
        return host, port
    except (ValueError, OSError):
        return None


def maybe_create_config_store(store_url):
    local = store_is_local(store_url)
    if not local:
        return
    try:
        socket.create_connection(local, timeout=1).close()
        print(f"config store already running at {store_url}")
        return
    except OSError:
        pass
    ret = create_config_store(store_url)
    if ret != 0:
        # Another node may have won the race to start it; initialize() will tell.
        print(f"create_config_store({store_url}) returned {ret}: {kvferry.get_last_err_msg()}")
    else:
        print(f"config store created at {store_url}")


def initialize(engine, args, session_id):
    ret = engine.initialize(args.store_url, session_id, args.role, args.npu_id)
    if ret != 0:
        print(f"TransferEngine initialization failed: {ret} ({kvferry.strerror(ret)}): "
              f"{kvferry.get_last_err_msg()}")
        return False
    print(f"TransferEngine init success {args.store_url=} {args.src_session_id=} {args.role=} "
          f"{args.npu_id=} (session {engine.session_id}, rpc port {engine.get_rpc_port()})")
    return True


def run_decode_role(args, session_id):
    import torch

    # The Decode waits for the Prefill to bring the store up, so it may be started first.
    engine = TransferEngine(init_timeout_ms=STORE_WAIT_MS)
    if not initialize(engine, args, session_id):
        return 1
    session_id = engine.session_id
    store = kvferry.Store(args.store_url)
    token = uuid.uuid4().hex
    k = keys(session_id, token)
    store.delete(k["ready"])  # a previous run's, if any

    total_buffer = torch.zeros(SHAPE, dtype=torch.float16)
    total_bytes = total_buffer.element_size() * total_buffer.numel()
    ret = engine.register_memory(total_buffer.data_ptr(), total_bytes)
    if ret != 0:
        print(f"register failed: {ret}: {kvferry.get_last_err_msg()}")
        return 1
    print(f"register address={hex(total_buffer.data_ptr())}")
    print("register success.")
    store.set(k["ready"], json.dumps({"token": token, "addr": total_buffer.data_ptr(),
                                      "nbytes": total_bytes}))

    failures = 0
    for r in range(args.iterations):
        published = store.get(k["round"](r), wait_ms=STORE_WAIT_MS)
        if published is None:
            print(f"round {r}: the Prefill did not report within {STORE_WAIT_MS} ms")
            return 1
        expected = json.loads(published)
        print("-----------------begin read buffer info----------------")
        got = slice_checks(total_buffer)
        bad = 0
        for i, (g, e) in enumerate(zip(got, expected)):
            print(f"get buffer success {i}, sum={g['sum']}")
            if g["crc"] != e["crc"] or g["sum"] != e["sum"]:
                bad += 1
                print(f"  MISMATCH slice {i}: crc {g['crc']:#010x} sum {g['sum']}, the Prefill "
                      f"wrote crc {e['crc']:#010x} sum {e['sum']}")
        print(f"verify round {r}: {'OK' if bad == 0 else 'FAILED'} "
              f"({len(got) - bad}/{len(got)} slices match, {total_bytes} bytes)")
        failures += bad
        if r == args.iterations - 1:
            engine.destroy()  # withdraw the session before telling the Prefill it may exit
        store.set(k["ack"](r), "ok" if bad == 0 else "failed")
    store.close()
    return 0 if failures == 0 else 1


def run_prefill_role(args, session_id):
    import torch

    maybe_create_config_store(args.store_url)
    total_buffer = torch.randn(SHAPE, dtype=torch.float16)

    engine = TransferEngine()
    if not initialize(engine, args, session_id):
        return 1
    ret = engine.register_memory(total_buffer.data_ptr(),
                                 total_buffer.element_size() * total_buffer.numel())
    if ret != 0:
        print(f"register failed: {ret}: {kvferry.get_last_err_msg()}")
        return 1
    print("register success.")

    # Where to write: the Decode's registered tensor, as the Decode published it.
    store = kvferry.Store(args.store_url)
    ready = store.get(keys(args.dst_session_id)["ready"], wait_ms=STORE_WAIT_MS)
    if ready is None:
        print(f"Decode {args.dst_session_id} did not register within {STORE_WAIT_MS} ms")
        return 1
    ready = json.loads(ready)
    k = keys(args.dst_session_id, ready["token"])
    regions = engine.peer_regions(args.dst_session_id)
    need = total_buffer.element_size() * total_buffer.numel()
    region = next(((a, n) for a, n in regions if a <= ready["addr"] and
                   ready["addr"] + need <= a + n), None)
    if region is None:
        print(f"Decode {args.dst_session_id} has no registered region of {need} bytes at "
              f"{ready['addr']:#x}: {regions}")
        return 1
    peer_base = ready["addr"]
    print(f"peer regions={[(hex(a), n) for a, n in regions]}")

    for r in range(args.iterations):
        if r:
            total_buffer.copy_(torch.randn(SHAPE, dtype=torch.float16))
        for i in range(SHAPE[0]):
            print(f"buffer address={hex(total_buffer[i].data_ptr())}")
            print(f"buffer sum={torch.sum(total_buffer[i])}")
            total_bytes = total_buffer[i].element_size() * total_buffer[i].numel()
            print(f"total_bytes={total_bytes}")
            peer_address = peer_base + i * total_bytes
            ret = engine.transfer_sync_write(args.dst_session_id, total_buffer[i].data_ptr(),
                                             peer_address, total_bytes)
            if ret != 0:
                print(f"write failed peer_address={hex(peer_address)}: {ret}: "
                      f"{kvferry.get_last_err_msg()}")
                return 1
            print(f"write success peer_address={hex(peer_address)}")
        store.set(k["round"](r), json.dumps(slice_checks(total_buffer)))
        print("wait decode read finish")
        ack = store.get(k["ack"](r), wait_ms=STORE_WAIT_MS)
        if ack != b"ok":
            print(f"round {r}: the Decode reported {ack!r}")
            return 1
        print(f"decode read finish, round {r} verified")
    engine.destroy()
    store.close()
    return 0


def main():
    parser = argparse.ArgumentParser(description="Transfer Engine with role selection")
    parser.add_argument("--role", type=str, required=True, choices=["Decode", "Prefill"],
                        help="Role of this instance: Decode or Prefill")
    parser.add_argument("--src-session-id", type=str,
                        help="Session id of this node, ip:port (default 127.0.0.1 with a free "
                             "port)")
    parser.add_argument("--store-url", type=str, required=True,
                        help="URL for the config store (e.g., tcp://xx.xx.xx.xx:xxxx)")
    parser.add_argument("--npu-id", type=int, default=0, help="Device id (NUMA node on CPU hosts)")
    parser.add_argument("--dst-session-id", type=str,
                        help="Session id of the Decode node (Prefill only), ip:port")
    parser.add_argument("--log-level", type=int, default=0, choices=[0, 1, 2, 3],
                        help="Log level: 0 debug, 1 info, 2 warn, 3 error")
    parser.add_argument("--iterations", type=int, default=1,
                        help="Rounds of write-and-verify (default 1)")
    args = parser.parse_args()
    if args.iterations < 1:
        parser.error("--iterations must be at least 1")
    if args.role == "Prefill" and not args.dst_session_id:
        parser.error("--dst-session-id is required for the Prefill role")
    try:
        import torch  # noqa: F401
    except ImportError:
        print("this example needs torch (apt-get install python3-torch)", file=sys.stderr)
        return 2

    set_log_level(args.log_level)
    set_conf_store_tls(False, "")
    # Each print is a line on its own even when stdout is a pipe (as in the tests).
    sys.stdout.reconfigure(line_buffering=True)
    start = time.monotonic()
    if args.role == "Decode":
        rc = run_decode_role(args, args.src_session_id)
    else:
        rc = run_prefill_role(args, args.src_session_id)
    print(f"{args.role} done in {time.monotonic() - start:.2f} s, exit status {rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
