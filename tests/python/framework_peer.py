"""The far side of tests/python/test_frameworks.py: one framework engine in its own process,
through the drop-in packages (the directory `python3 -m kvferry compat-path` prints must be on
PYTHONPATH).

    framework_peer.py mf5|mf4|mfh|mooncake STORE_URL|- SIZE

mf5: `memfabric_hybrid`, SGLang's ascend sequence: get_rpc_port() before a 5-argument
initialize as the Decode, buffers registered twice. mf4: the same with `mf_adapter` and the
older 4-argument initialize. mooncake: `mooncake.engine` with P2PHANDSHAKE (no store),
get_rpc_port() after initialize. Prints "INIT" just before initialize, then
"READY <session> <addr> <size> <initialize ms>"; then answers lines on stdin: "sum" prints
"SUM <sha256 of the buffer>", "quit" unregisters and exits 0.
"""

import ctypes
import hashlib
import sys
import time


def main():
    mode, store, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    buf = ctypes.create_string_buffer(size)
    addr = ctypes.addressof(buf)
    if mode in ("mf5", "mf4"):
        if mode == "mf5":
            from memfabric_hybrid import TransferEngine
        else:
            from mf_adapter import TransferEngine
        te = TransferEngine()
        sid = f"127.0.0.1:{te.get_rpc_port()}"
        print("INIT", flush=True)
        t0 = time.monotonic()
        if mode == "mf5":
            rc = te.initialize(None if store == "-" else store, sid, "Decode", 0,
                               TransferEngine.TransDataOpType.SDMA)
        else:
            rc = te.initialize(None if store == "-" else store, sid, "Decode", 0)
        ms = (time.monotonic() - t0) * 1000
        assert rc == 0, f"initialize: {rc}"
        half = size // 2
        assert te.batch_register_memory([addr, addr + half], [half, size - half]) == 0
        assert te.batch_register_memory([addr, addr + half], [half, size - half]) == 0  # again
        assert te.register_memory(addr, half) == 0  # inside what is registered
    else:
        from mooncake.engine import TransferEngine
        te = TransferEngine()
        print("INIT", flush=True)
        t0 = time.monotonic()
        rc = te.initialize("127.0.0.1", "P2PHANDSHAKE", "rdma", "")
        ms = (time.monotonic() - t0) * 1000
        assert rc == 0, f"initialize: {rc}"
        sid = f"127.0.0.1:{te.get_rpc_port()}"
        assert te.batch_register_memory(buffer_addresses=[addr], capacities=[size]) == 0
    print(f"READY {sid} {addr} {size} {ms:.1f}", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "sum":
            print("SUM " + hashlib.sha256(ctypes.string_at(addr, size)).hexdigest(), flush=True)
        elif cmd == "quit":
            if mode == "mooncake":
                assert te.batch_unregister_memory(buffer_addresses=[addr]) == 0
            else:
                assert te.batch_unregister_memory([addr, addr + size // 2]) == 0
                assert te.unregister_memory(addr) == 0  # gone already: a no-op, as MemFabric's
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
