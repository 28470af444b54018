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

With --store-url p2p:// there is no store at all: start the Decode first; the Prefill finds it
by --dst-session-id alone (docs/frameworks.md).

Differences from the seed, all because this runs on CPU hosts and must end on its own:
- The Prefill starts the config store in its process (create_config_store) when the store URL
  names this host and nothing answers there yet; otherwise it uses the store that is running.
  The Decode waits up to a minute for the store to appear, so either may be started first.
- The seed assumes the Decode's tensor sits at the same virtual address as the Prefill's; here
  the Decode tells the Prefill its tensor's address, and the Prefill checks it against the
  Decode's registered regions (peer_regions).
- Completion goes by notifications, both ways, not by polling the tensor: the Prefill writes
  each slice with transfer_sync_write(..., notify=...) carrying the slice's number, CRC-32 and
  sum; a notification is delivered only once the slice's bytes are in the Decode's tensor, so the
  Decode prints and checks each slice's sum the moment its notification arrives. After the 10
  slices of a round it answers with a notification of its own; both exit after --iterations
  rounds (exit status 0 when every slice matched).
"""

import argparse
import ipaddress
import json
import socket
import sys
import time
import zlib
from urllib.parse import urlsplit

try:
    import kvferry
except ImportError:
    sys.exit("kvferry cannot be imported by %s (Python %s): the build makes the module for "
             "/usr/bin/python3 (run PYTHONPATH=build/python /usr/bin/python3 %s ...), or install "
             "the wheel into this interpreter: make wheel && %s -m pip install dist/kvferry-*.whl"
             % (sys.executable, sys.version.split()[0], sys.argv[0], sys.executable))
from kvferry import TransferEngine, create_config_store, set_conf_store_tls, set_log_level

SHAPE = (10, 50, 40, 20, 60)
STORE_WAIT_MS = 60000  # how long one node waits for the other (the store, the peer, a notification)


def notify(engine, peer, **msg):
    """A JSON notification to peer; 0 or a negative code."""
    return engine.send_notification(peer, json.dumps(msg).encode())


class PeerGone(Exception):
    """The peer a node was waiting for went away (its message names it)."""


def next_notification(engine, timeout_s, peer=None):
    """The next notification as (sender, decoded JSON), or (None, None) after timeout_s. With
    peer, raises PeerGone within about a second once that peer is gone."""
    end = time.monotonic() + timeout_s
    while not engine.pending and time.monotonic() < end:
        try:
            engine.pending += engine.wait_notification(max(0.0, end - time.monotonic()),
                                                       peer=peer)
        except kvferry.Error as e:
            if e.code == -kvferry.KVF_EPEERGONE:
                raise PeerGone(str(e)) from None
            raise
    if not engine.pending:
        return None, None
    sender, raw = engine.pending.pop(0)
    return sender, json.loads(raw)


def slice_check(t):
    """(crc32, sum) of one slice's bytes: the CRC is exact, the sum is for people."""
    import torch

    return zlib.crc32(t.numpy()), float(torch.sum(t))


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


class Engine(TransferEngine):
    """A TransferEngine with a list of notifications taken but not yet handled."""

    pending = None


def run_decode_role(args, session_id):
    import torch

    # The Decode waits for the Prefill to bring the store up, so it may be started first.
    engine = Engine(init_timeout_ms=STORE_WAIT_MS)
    engine.pending = []
    if not initialize(engine, args, session_id):
        return 1

    total_buffer = torch.zeros(SHAPE, dtype=torch.float16)
    total_bytes = total_buffer.element_size() * total_buffer.numel()
    ret = engine.register_memory(total_buffer.data_ptr(), total_bytes)
    if ret != 0:
        print(f"register failed: {ret}: {kvferry.get_last_err_msg()}")
        return 1
    print(f"register address={hex(total_buffer.data_ptr())}")
    print("register success.")

    # A Prefill says hello (it knows our session id; we do not know its own) and is told where
    # the tensor is. One that goes away in the middle is not the Decode's end: the next Prefill
    # to say hello is served from the first round.
    while True:
        sender, msg = next_notification(engine, STORE_WAIT_MS / 1000)
        if msg is None or msg.get("type") != "hello":
            print(f"no hello from a Prefill within {STORE_WAIT_MS} ms: {msg}")
            return 1
        try:
            rc = serve_prefill(engine, args, sender, total_buffer, total_bytes)
        except PeerGone as e:
            print(f"the Prefill {sender} went away ({e}); waiting for the next Prefill")
            engine.pending.clear()
            continue
        engine.destroy()
        return rc


def serve_prefill(engine, args, prefill, total_buffer, total_bytes):
    """The rounds with one Prefill; 0 when every slice matched, else 1. Raises PeerGone when
    the Prefill goes away before the end."""
    ret = notify(engine, prefill, type="ready", addr=total_buffer.data_ptr(), nbytes=total_bytes)
    if ret == -kvferry.KVF_EPEERGONE:
        raise PeerGone(kvferry.get_last_err_msg())
    if ret != 0:
        print(f"notify {prefill} failed: {ret}: {kvferry.get_last_err_msg()}")
        return 1

    failures = 0
    for r in range(args.iterations):
        bad = 0
        for n in range(SHAPE[0]):
            sender, msg = next_notification(engine, STORE_WAIT_MS / 1000, peer=prefill)
            if msg is None:
                print(f"round {r}: the Prefill sent no slice within {STORE_WAIT_MS} ms")
                return 1
            i = msg["slice"]
            if n == 0:
                print("-----------------begin read buffer info----------------")
            # The notification arrives only after the slice's bytes are in place: read it now.
            crc, total = slice_check(total_buffer[i])
            print(f"notification from {sender}: round {msg['round']} slice {i}")
            print(f"get buffer success {i}, sum={total}")
            if crc != msg["crc"] or total != msg["sum"]:
                bad += 1
                print(f"  MISMATCH slice {i}: crc {crc:#010x} sum {total}, the Prefill "
                      f"wrote crc {msg['crc']:#010x} sum {msg['sum']}")
        print(f"verify round {r}: {'OK' if bad == 0 else 'FAILED'} "
              f"({SHAPE[0] - bad}/{SHAPE[0]} slices match, {total_bytes} bytes)")
        failures += bad
        ret = notify(engine, prefill, type="ack", round=r, ok=bad == 0)
        if ret == -kvferry.KVF_EPEERGONE:
            raise PeerGone(kvferry.get_last_err_msg())
        if ret != 0:
            print(f"notify {prefill} failed: {ret}: {kvferry.get_last_err_msg()}")
            return 1
    return 0 if failures == 0 else 1


def run_prefill_role(args, session_id):
    import torch

    maybe_create_config_store(args.store_url)
    total_buffer = torch.randn(SHAPE, dtype=torch.float16)

    engine = Engine()
    engine.pending = []
    if not initialize(engine, args, session_id):
        return 1
    ret = engine.register_memory(total_buffer.data_ptr(),
                                 total_buffer.element_size() * total_buffer.numel())
    if ret != 0:
        print(f"register failed: {ret}: {kvferry.get_last_err_msg()}")
        return 1
    print("register success.")

    # Where to write: the Decode's registered tensor, as the Decode tells us.
    ret = engine.wait_for_peer(args.dst_session_id, STORE_WAIT_MS / 1000)
    if ret != 0:
        print(f"Decode {args.dst_session_id} did not come up within {STORE_WAIT_MS} ms: {ret}: "
              f"{kvferry.get_last_err_msg()}")
        return 1
    # With a store, subscribe to its session events, to see the Decode leave at the end; with
    # p2p:// there is no store to watch (and none in this process to keep up).
    watch = not args.store_url.startswith("p2p://")
    if watch:
        engine.get_peer_events(0)
    ret = notify(engine, args.dst_session_id, type="hello")
    if ret != 0:
        print(f"notify {args.dst_session_id} failed: {ret}: {kvferry.get_last_err_msg()}")
        return 1
    try:
        _, ready = next_notification(engine, STORE_WAIT_MS / 1000, peer=args.dst_session_id)
    except PeerGone as e:
        print(f"Decode {args.dst_session_id} went away before it answered: {e}")
        return 1
    if ready is None or ready.get("type") != "ready":
        print(f"Decode {args.dst_session_id} did not answer within {STORE_WAIT_MS} ms: {ready}")
        return 1
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
            crc, total = slice_check(total_buffer[i])
            note = json.dumps({"round": r, "slice": i, "crc": crc, "sum": total}).encode()
            ret = engine.transfer_sync_write(args.dst_session_id, total_buffer[i].data_ptr(),
                                             peer_address, total_bytes, notify=note)
            if ret != 0:
                print(f"write failed peer_address={hex(peer_address)}: {ret}: "
                      f"{kvferry.get_last_err_msg()}")
                return 1
            print(f"write success peer_address={hex(peer_address)}")
        print("wait decode read finish")
        try:
            _, ack = next_notification(engine, STORE_WAIT_MS / 1000, peer=args.dst_session_id)
        except PeerGone as e:
            print(f"Decode {args.dst_session_id} went away before it confirmed round {r}: {e}")
            return 1
        if ack is None or ack.get("type") != "ack" or ack.get("round") != r or not ack["ok"]:
            print(f"round {r}: the Decode reported {ack!r}")
            return 1
        print(f"decode read finish, round {r} verified")
    # This process may hold the store: let the Decode withdraw its session before it goes.
    end = time.monotonic() + 10
    while watch and time.monotonic() < end:
        if ("left", args.dst_session_id) in engine.get_peer_events(0.5):
            break
    engine.destroy()
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
    parser.add_argument("--npu-id", type=int, default=0,
                        help="Device id (on CPU hosts only published)")
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
        print("this example needs torch, which %s (Python %s) cannot import: run it with the "
              "interpreter that has torch (Debian's /usr/bin/python3 after apt-get install "
              "python3-torch), or install torch into this one"
              % (sys.executable, sys.version.split()[0]), file=sys.stderr)
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
