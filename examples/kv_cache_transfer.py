#!/usr/bin/env python3
"""A paged KV cache moved from a Prefill node to a Decode node, as a vLLM-style connector would.

Each node holds a paged KV cache shaped like DeepSeek-R1's (MLA): for every one of --layers
layers and every one of --num-blocks blocks, a main part of --block-bytes (the compressed KV,
128 KiB by default) and an aux part of --aux-bytes (the rope keys, 16 KiB), as two torch
tensors [layers, blocks, bytes]. The Decode's cache comes from TransferEngine.mem_alloc (memfd
memory, so a same-host shm Prefill copies straight into it); the Prefill's is plain torch memory.

Coordination is by notifications, in both directions, and nothing else:

  Prefill                                          Decode
  send_notification {"type":"alloc", req, n}  -->  picks n free block ids
                                              <--  send_notification {"type":"blocks", req,
                                                   blocks, the cache's addresses and shape}
  "computes" req: fills its own blocks, every
  layer, with bytes derived from req
  batch_transfer_async_write: only those blocks,
  one element per layer per block per part
  (61 x 2 = 122 elements, 8,994,816 bytes for
  one block), notify={"type":"done", req,
  blocks, t_submit}                           -->  the notification arrives only when every
                                                   byte of the batch is in place: verifies the
                                                   blocks, frees them, records the latency
  transfer_wait(batch) -> 1
  ... next request ...
  send_notification {"type":"bye"}            -->  prints p50/p99 and exits

Latency. The Decode reports, per request, submit -> notification received: t_submit is the
Prefill's time.monotonic() and the arrival is the Decode's. CLOCK_MONOTONIC is one clock for the
whole machine on Linux, so this holds when both run on one host (the Decode checks: the Prefill
sends its boot id). On two hosts the clocks are unrelated: the Decode then reports only the
arrival times and their spacing, and the Prefill's own figure, submit -> batch complete
(transfer_wait returning 1: the bytes are in the Decode's memory and the notification is queued
there), is the per-request latency. The Prefill prints that figure in both cases.

Run on one host (starts a store, a Decode and a Prefill as subprocesses on 127.0.0.1):

    python3 examples/kv_cache_transfer.py --local --requests 20 --transport shm

On two hosts (store and Decode on host A 10.0.0.1, Prefill on host B 10.0.0.2):

    A$ kvferry store --listen tcp://10.0.0.1:8000        # or: --role store below
    A$ python3 examples/kv_cache_transfer.py --role decode --store-url tcp://10.0.0.1:8000 \\
           --session-id 10.0.0.1:50051
    B$ python3 examples/kv_cache_transfer.py --role prefill --store-url tcp://10.0.0.1:8000 \\
           --session-id 10.0.0.2:50052 --peer 10.0.0.1:50051 --requests 100

Both must be given the same --layers, --block-bytes and --aux-bytes (the Decode sends its shape
and the Prefill checks it). --transport tcp|shm|auto sets KVFERRY_TRANSPORT.
"""

import argparse
import ctypes
import json
import os
import signal
import random
import socket
import subprocess
import sys
import tempfile
import time

try:
    import kvferry
except ImportError:
    sys.exit("kvferry cannot be imported by %s (Python %s): the build makes the module for "
             "/usr/bin/python3 (run PYTHONPATH=build/python /usr/bin/python3 %s ...), or install "
             "the wheel into this interpreter: make wheel && %s -m pip install dist/kvferry-*.whl"
             % (sys.executable, sys.version.split()[0], sys.argv[0], sys.executable))
from kvferry import TransferEngine

MiB = 1 << 20


def boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def percentile(values, p):
    """The p-th percentile (nearest rank) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def request_data(torch, req, layers, nblocks, block_bytes, aux_bytes):
    """What the Prefill "computes" for request req: bytes derived from req alone, so that the
    Decode can regenerate and compare them."""
    g = torch.Generator().manual_seed(1_000_003 * (req + 1))
    main = torch.randint(0, 256, (layers, nblocks, block_bytes), dtype=torch.uint8, generator=g)
    aux = (torch.randint(0, 256, (layers, nblocks, aux_bytes), dtype=torch.uint8, generator=g)
           if aux_bytes else None)
    return main, aux


def alloc_cache(torch, engine, layers, nblocks, nbytes):
    """A [layers, nblocks, nbytes] uint8 tensor in mem_alloc memory (registered, memfd-backed),
    and its address."""
    total = layers * nblocks * nbytes
    addr = engine.mem_alloc(total)
    buf = (ctypes.c_uint8 * total).from_address(addr)
    return torch.frombuffer(buf, dtype=torch.uint8).view(layers, nblocks, nbytes), addr


def send(engine, peer, obj):
    rc = engine.send_notification(peer, json.dumps(obj).encode())
    if rc != 0:
        raise RuntimeError(f"send_notification to {peer}: {rc} {kvferry.get_last_err_msg()}")


# ---- Decode --------------------------------------------------------------------------------


def run_decode(args, torch):
    engine = TransferEngine(init_timeout_ms=args.timeout * 1000)
    rc = engine.initialize(args.store_url, args.session_id, "Decode", args.device_id)
    if rc != 0:
        print(f"decode: initialize failed: {rc} {kvferry.get_last_err_msg()}")
        return 1
    main, main_addr = alloc_cache(torch, engine, args.layers, args.num_blocks, args.block_bytes)
    aux, aux_addr = (alloc_cache(torch, engine, args.layers, args.num_blocks, args.aux_bytes)
                     if args.aux_bytes else (None, 0))
    shape = {"layers": args.layers, "num_blocks": args.num_blocks,
             "block_bytes": args.block_bytes, "aux_bytes": args.aux_bytes,
             "main_addr": main_addr, "aux_addr": aux_addr}
    cache_mib = args.layers * args.num_blocks * (args.block_bytes + args.aux_bytes) / MiB
    print(f"decode: session {engine.session_id}, KV cache {args.layers} layers x "
          f"{args.num_blocks} blocks x ({args.block_bytes} + {args.aux_bytes}) bytes = "
          f"{cache_mib:.1f} MiB (mem_alloc)", flush=True)
    print(f"READY {engine.session_id}", flush=True)

    free = list(range(args.num_blocks))
    my_boot = boot_id()
    latencies, arrivals, failed, verified, total_bytes = [], [], 0, 0, 0
    held = {}  # Prefill session id -> the blocks it was given and has not sent yet

    def prefill_gone(sid):
        """A Prefill went away (killed, crashed): its blocks come back, and the Decode goes on
        serving the others, and the next one."""
        blocks = sorted(held.pop(sid, ()))
        print(f"decode: the Prefill {sid} went away before saying bye "
              f"({kvferry.get_last_err_msg()}); {len(blocks)} blocks freed, "
              f"waiting for the next Prefill", flush=True)
        if blocks:
            idx = torch.tensor(blocks)
            main[:, idx] = 0
            if aux is not None:
                aux[:, idx] = 0
            free.extend(blocks)

    def answer(sid, obj):
        rc = engine.send_notification(sid, json.dumps(obj).encode())
        if rc == -kvferry.KVF_EPEERGONE:
            prefill_gone(sid)
        elif rc != 0:
            raise RuntimeError(f"send_notification to {sid}: {rc} {kvferry.get_last_err_msg()}")

    idle_since = time.monotonic()
    done = False
    while not done:
        notes = engine.wait_notification(0.5)
        now = time.monotonic()
        if not notes:
            # Noticed within a second (check_peer costs no I/O while a connection is up).
            for sid in [s for s in held if engine.check_peer(s) == -kvferry.KVF_EPEERGONE]:
                prefill_gone(sid)
            if now - idle_since > args.timeout:
                print(f"decode: nothing received for {args.timeout} s, giving up")
                return 1
            continue
        idle_since = now
        for sender, raw in notes:
            msg = json.loads(raw)
            if msg["type"] == "alloc":
                n = msg["n"]
                if n > len(free):
                    answer(sender, {"type": "blocks", "req": msg["req"], "error":
                                    f"only {len(free)} of {args.num_blocks} blocks free"})
                    continue
                blocks = free[:n]
                del free[:n]
                held.setdefault(sender, set()).update(blocks)
                answer(sender, dict(shape, type="blocks", req=msg["req"], blocks=blocks))
            elif msg["type"] == "done":
                req, blocks = msg["req"], msg["blocks"]
                same_clock = msg.get("boot_id") == my_boot
                latency = now - msg["t_submit"] if same_clock else None
                # The notification is only delivered once every byte of the batch is in place:
                # check the blocks now, before anything else can touch them.
                idx = torch.tensor(blocks)
                want_main, want_aux = request_data(torch, req, args.layers, len(blocks),
                                                   args.block_bytes, args.aux_bytes)
                ok = torch.equal(main.index_select(1, idx), want_main) and (
                    aux is None or torch.equal(aux.index_select(1, idx), want_aux))
                nbytes = args.layers * len(blocks) * (args.block_bytes + args.aux_bytes)
                nelem = args.layers * len(blocks) * (2 if args.aux_bytes else 1)
                if msg.get("warmup"):
                    tag = "warm-up"
                else:
                    tag = "request"
                    if ok:
                        verified += 1
                        total_bytes += nbytes
                    else:
                        failed += 1
                    arrivals.append(now)
                    if latency is not None:
                        latencies.append(latency)
                lat = f"{latency * 1e3:.2f} ms submit->notified" if latency is not None \
                    else "other host: see the Prefill's latency"
                print(f"decode: {tag} {req}: blocks {blocks}, {nelem} elements, {nbytes} bytes, "
                      f"{'verified OK' if ok else 'MISMATCH'}, {lat}", flush=True)
                main[:, idx] = 0  # freed blocks are zeroed so that a stale read shows
                if aux is not None:
                    aux[:, idx] = 0
                free += blocks
                held.get(sender, set()).difference_update(blocks)
            elif msg["type"] == "bye":
                held.pop(sender, None)
                done = True
    n = verified + failed
    print(f"decode: {verified}/{n} requests verified, {failed} mismatched")
    if latencies:
        print(f"decode: per-request latency submit->notified over {len(latencies)} requests: "
              f"p50 {percentile(latencies, 50) * 1e3:.2f} ms, "
              f"p99 {percentile(latencies, 99) * 1e3:.2f} ms, "
              f"mean {sum(latencies) / len(latencies) * 1e3:.2f} ms")
    elif len(arrivals) > 1:
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
        print(f"decode: the Prefill runs on another host (clocks not comparable); notification "
              f"spacing p50 {percentile(gaps, 50) * 1e3:.2f} ms")
    p50 = f"{percentile(latencies, 50) * 1e3:.2f}" if latencies else "n/a"
    p99 = f"{percentile(latencies, 99) * 1e3:.2f}" if latencies else "n/a"
    print(f"SUMMARY role=decode requests={n} verified={verified} failed={failed} "
          f"bytes={total_bytes} p50_ms={p50} p99_ms={p99}", flush=True)
    engine.destroy()
    return 0 if failed == 0 and n > 0 else 1


# ---- Prefill -------------------------------------------------------------------------------


def wait_for(engine, kind, req, timeout, decode):
    """The Decode's answer of type kind for request req. Raises kvferry.Error (KVF_EPEERGONE)
    within about a second if the Decode goes away."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for sender, raw in engine.wait_notification(max(0.0, end - time.monotonic()),
                                                    peer=decode):
            msg = json.loads(raw)
            if msg.get("type") == kind and msg.get("req") == req:
                return msg
            print(f"prefill: unexpected notification from {sender}: {msg}")
    return None


def run_prefill(args, torch):
    engine = TransferEngine(init_timeout_ms=args.timeout * 1000)
    rc = engine.initialize(args.store_url, args.session_id, "Prefill", args.device_id)
    if rc != 0:
        print(f"prefill: initialize failed: {rc} {kvferry.get_last_err_msg()}")
        return 1
    rc = engine.wait_for_peer(args.peer, args.timeout)
    if rc != 0:
        print(f"prefill: the Decode {args.peer} is not up: {rc} {kvferry.get_last_err_msg()}")
        return 1
    bpr = args.blocks_per_request
    # The Prefill's own paged cache: it computes a request into bpr of its blocks.
    local_main = torch.zeros(args.layers, bpr, args.block_bytes, dtype=torch.uint8)
    local_aux = (torch.zeros(args.layers, bpr, args.aux_bytes, dtype=torch.uint8)
                 if args.aux_bytes else None)
    my_boot = boot_id()
    print(f"prefill: session {engine.session_id}, Decode {args.peer}, {args.requests} requests "
          f"(+{args.warmup} warm-up) of {bpr} block(s)", flush=True)

    latencies, allocs, failed, total_bytes, transport = [], [], 0, 0, "?"
    t_start = None
    for r in range(args.warmup + args.requests):
        warm = r < args.warmup
        t0 = time.monotonic()
        send(engine, args.peer, {"type": "alloc", "req": r, "n": bpr})
        try:
            reply = wait_for(engine, "blocks", r, args.timeout, args.peer)
        except kvferry.Error as e:
            print(f"prefill: request {r}: the Decode {args.peer} went away: {e}")
            return 1
        if reply is None or "error" in reply:
            print(f"prefill: request {r}: no blocks from the Decode: {reply}")
            return 1
        allocs.append(time.monotonic() - t0)
        if (reply["layers"], reply["block_bytes"], reply["aux_bytes"]) != \
                (args.layers, args.block_bytes, args.aux_bytes):
            print(f"prefill: the Decode's cache shape {reply} differs from ours")
            return 1
        blocks = reply["blocks"]
        # "Compute" the request into our blocks 0..bpr-1.
        want_main, want_aux = request_data(torch, r, args.layers, bpr, args.block_bytes,
                                           args.aux_bytes)
        local_main.copy_(want_main)
        if local_aux is not None:
            local_aux.copy_(want_aux)
        # Only this request's blocks: one element per layer per block per part.
        bufs, remotes, lens = [], [], []
        nb = reply["num_blocks"]
        for layer in range(args.layers):
            for j, blk in enumerate(blocks):
                bufs.append(local_main[layer, j].data_ptr())
                remotes.append(reply["main_addr"] + (layer * nb + blk) * args.block_bytes)
                lens.append(args.block_bytes)
                if local_aux is not None:
                    bufs.append(local_aux[layer, j].data_ptr())
                    remotes.append(reply["aux_addr"] + (layer * nb + blk) * args.aux_bytes)
                    lens.append(args.aux_bytes)
        nbytes = sum(lens)
        if t_start is None and not warm:
            t_start = time.monotonic()
        t_submit = time.monotonic()
        note = json.dumps({"type": "done", "req": r, "blocks": blocks, "t_submit": t_submit,
                           "boot_id": my_boot, "warmup": warm}).encode()
        bid = engine.batch_transfer_async_write(args.peer, bufs, remotes, lens, notify=note)
        if bid < 0:
            print(f"prefill: request {r}: submit failed: {bid} {kvferry.get_last_err_msg()}")
            return 1
        st = engine.transfer_wait(bid)
        t_done = time.monotonic()
        if st != 1:
            print(f"prefill: request {r}: batch failed: {st} {kvferry.get_last_err_msg()}")
            failed += 1
            continue
        transport = engine.peer_transport(args.peer)
        if not warm:
            latencies.append(t_done - t_submit)
            total_bytes += nbytes
        print(f"prefill: {'warm-up' if warm else 'request'} {r}: {len(bufs)} elements, "
              f"{nbytes} bytes to blocks {blocks} over {transport}: "
              f"{(t_done - t_submit) * 1e3:.2f} ms submit->complete "
              f"({nbytes / (t_done - t_submit) / 1e9:.2f} GB/s), "
              f"block allocation round trip {allocs[-1] * 1e3:.2f} ms", flush=True)
    elapsed = time.monotonic() - t_start if t_start else 0.0
    send(engine, args.peer, {"type": "bye"})
    if latencies:
        print(f"prefill: per-request latency submit->complete over {len(latencies)} requests: "
              f"p50 {percentile(latencies, 50) * 1e3:.2f} ms, "
              f"p99 {percentile(latencies, 99) * 1e3:.2f} ms; "
              f"{total_bytes / elapsed / 1e9:.2f} GB/s end to end (one request at a time, "
              f"with block allocation round trips and compute)")
        print(f"SUMMARY role=prefill requests={len(latencies)} failed={failed} "
              f"bytes={total_bytes} transport={transport} "
              f"p50_ms={percentile(latencies, 50) * 1e3:.2f} "
              f"p99_ms={percentile(latencies, 99) * 1e3:.2f}", flush=True)
    engine.destroy()
    return 0 if failed == 0 and latencies else 1


# ---- store and --local ---------------------------------------------------------------------


def run_store(args):
    srv = kvferry.StoreServer(args.store_url)
    print(f"store: listening on {srv.url}", flush=True)
    signal.sigwait({signal.SIGINT, signal.SIGTERM})
    srv.stop()
    return 0


def free_port():
    """A port nobody listens on now, below the ephemeral range: a port bind() picks (port 0) is
    one any outgoing connection on this host may take before the Decode binds it (seen: "session
    id ... is already in use" when other work opened many connections at the same time)."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(low, 10001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below %d in 200 tries" % low)


def run_local(args):
    """A store, a Decode and a Prefill on 127.0.0.1, as three processes; their output is
    printed; exit status 0 when both nodes succeeded and every request was verified."""
    me = os.path.abspath(__file__)
    store_url = f"tcp://127.0.0.1:{free_port()}"
    decode_sid = f"127.0.0.1:{free_port()}"
    prefill_sid = f"127.0.0.1:{free_port()}"
    shape = ["--layers", str(args.layers), "--block-bytes", str(args.block_bytes),
             "--aux-bytes", str(args.aux_bytes), "--transport", args.transport,
             "--timeout", str(args.timeout), "--store-url", store_url]
    procs = []

    def start(name, extra):
        # Output goes to files, not pipes: a node blocked on a full pipe would stall the other.
        out = tempfile.TemporaryFile("w+")
        p = subprocess.Popen([sys.executable, me] + extra + shape, stdout=out,
                             stderr=subprocess.STDOUT, text=True)
        procs.append((name, p, out))
        return p

    def output(p):
        for _, q, out in procs:
            if q is p:
                out.flush()
                out.seek(0)
                return out.read()
        return ""

    try:
        store = start("store", ["--role", "store"])
        end = time.monotonic() + 30
        while "listening" not in output(store) and store.poll() is None and \
                time.monotonic() < end:
            time.sleep(0.02)
        if "listening" not in output(store):
            print(f"local: the store did not start: {output(store)}")
            return 1
        decode = start("decode", ["--role", "decode", "--session-id", decode_sid,
                                  "--num-blocks", str(args.num_blocks)])
        prefill = start("prefill", ["--role", "prefill", "--session-id", prefill_sid,
                                    "--peer", decode_sid, "--requests", str(args.requests),
                                    "--warmup", str(args.warmup),
                                    "--blocks-per-request", str(args.blocks_per_request)])
        limit = args.timeout + 60
        prefill.wait(timeout=limit)
        decode.wait(timeout=limit)
        out_p, out_d = output(prefill), output(decode)
    except subprocess.TimeoutExpired:
        print("local: a node did not finish in time")
        for name, p, _ in procs:
            print(f"---- {name} ----\n{output(p)}", end="")
        return 1
    finally:
        for name, p, out in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    print("---- decode ----")
    print(out_d, end="")
    print("---- prefill ----")
    print(out_p, end="")
    ok = decode.returncode == 0 and prefill.returncode == 0
    summaries = [ln for ln in (out_d + out_p).splitlines() if ln.startswith("SUMMARY")]
    print("---- summary ----")
    for ln in summaries:
        print(ln)
    print(f"local: decode exit {decode.returncode}, prefill exit {prefill.returncode}: "
          f"{'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", choices=["prefill", "decode", "store"])
    ap.add_argument("--local", action="store_true",
                    help="run a store, a Decode and a Prefill on 127.0.0.1 and check them")
    ap.add_argument("--store-url", help="config store, tcp://ip:port")
    ap.add_argument("--session-id", default="127.0.0.1:0", help="this node's ip:port")
    ap.add_argument("--peer", help="the Decode's session id (prefill)")
    ap.add_argument("--requests", type=int, default=20, help="requests measured (prefill)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="requests sent first and not measured (connection setup)")
    ap.add_argument("--layers", type=int, default=61)
    ap.add_argument("--block-bytes", type=int, default=128 * 1024,
                    help="bytes of one block's main part in one layer")
    ap.add_argument("--aux-bytes", type=int, default=16 * 1024,
                    help="bytes of one block's aux part in one layer (0: none)")
    ap.add_argument("--blocks-per-request", type=int, default=1)
    ap.add_argument("--num-blocks", type=int, default=8, help="blocks in the Decode's cache")
    ap.add_argument("--device-id", type=int, default=0)
    ap.add_argument("--transport", choices=["auto", "tcp", "shm"], default="auto",
                    help="sets KVFERRY_TRANSPORT")
    ap.add_argument("--timeout", type=int, default=60, help="seconds to wait for a peer")
    ap.add_argument("--log-level", type=int, default=2, choices=[0, 1, 2, 3])
    args = ap.parse_args()
    if not args.local and not args.role:
        ap.error("give --role or --local")
    if args.role == "prefill" and not args.peer:
        ap.error("--peer (the Decode's session id) is required for the prefill role")
    if args.role and not args.store_url:
        ap.error("--store-url is required")
    if min(args.layers, args.block_bytes, args.blocks_per_request, args.num_blocks) < 1 or \
            args.aux_bytes < 0 or args.requests < 1 or args.warmup < 0:
        ap.error("sizes and counts must be positive")
    if args.blocks_per_request > args.num_blocks:
        ap.error("--blocks-per-request exceeds --num-blocks")
    os.environ["KVFERRY_TRANSPORT"] = args.transport
    kvferry.set_log_level(args.log_level)
    if args.local:
        return run_local(args)
    if args.role == "store":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        return run_store(args)
    try:
        import torch
    except ImportError:
        print("this example needs torch, which %s (Python %s) cannot import: run it with the "
              "interpreter that has torch (Debian's /usr/bin/python3 after apt-get install "
              "python3-torch), or install torch into this one"
              % (sys.executable, sys.version.split()[0]), file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # the data path is kvferry's; keep torch off the other cores
    return run_decode(args, torch) if args.role == "decode" else run_prefill(args, torch)


if __name__ == "__main__":
    sys.exit(main())
