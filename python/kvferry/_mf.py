"""MemFabric's ``mf_adapter`` / ``memfabric_hybrid`` TransferEngine on kvferry.

The names, argument order, keyword names, enums, defaults and int return codes of MemFabric's
Python API, as SGLang's ``--disaggregation-transfer-backend ascend`` calls it; imported as
``mf_adapter`` or ``memfabric_hybrid`` from the directory ``python3 -m kvferry compat-path``
prints. Differences from MemFabric, all in the caller's favour: ``initialize`` waits for a store
that is not up yet (up to ``STORE_WAIT_S``) instead of sleeping a fixed 10 s; duplicate
registration is accepted; ``unregister_memory`` really unregisters; transient failures are run
again inside the engine. Device memory and device RDMA are not built: ``DEVICE_RDMA`` runs over
tcp/shm, saying so once. See docs/frameworks.md.
"""

import enum
import os
import signal
import sys
import threading

from . import _compat, _kvferry

# How long initialize() waits for the config store to answer (the Prefill's rank 0 may create it
# after the other ranks started): KVFERRY_STORE_WAIT_S overrides.
STORE_WAIT_S = 120.0


class TransDataOpType(enum.IntEnum):
    SDMA = 1
    DEVICE_RDMA = 8


class TransferOpcode(enum.IntEnum):
    Read = 0
    Write = 1


def _apply_log_level_env():
    lvl = os.environ.get("ASCEND_MF_LOG_LEVEL")
    if lvl is not None and lvl.strip().isdigit() and 0 <= int(lvl) <= 3:
        _kvferry.set_log_level(int(lvl))


_apply_log_level_env()


def _store_wait_s():
    try:
        return float(os.environ.get("KVFERRY_STORE_WAIT_S", STORE_WAIT_S))
    except ValueError:
        return STORE_WAIT_S


def _wait_for_store(url):
    """0 once the store at @url answers, or a negative code after the bound."""
    if url.startswith("p2p://"):
        return 0
    try:
        s = _kvferry.Store(url, connect_timeout_ms=max(1, int(_store_wait_s() * 1000)))
    except _kvferry.Error as e:
        _compat.log.error("initialize: config store %s: %s", url, e)
        return getattr(e, "code", -_kvferry.KVF_ESTOREDOWN) or -_kvferry.KVF_ESTOREDOWN
    s.close()
    return 0


class TransferEngine:
    """MemFabric's TransferEngine: one kvferry engine."""

    TransDataOpType = TransDataOpType
    TransferOpcode = TransferOpcode

    def __init__(self):
        self._c = _compat.Engine()

    def initialize(self, store_url, session_id, role, device_id,
                   data_op_type=TransDataOpType.SDMA):
        url = store_url or os.environ.get("ASCEND_MF_STORE_URL", "")
        if not url:
            _compat.log.error("initialize: no store URL (argument or ASCEND_MF_STORE_URL)")
            return -_kvferry.KVF_EINVAL
        if int(data_op_type) != TransDataOpType.SDMA:
            _compat.say_fallback("mf_adapter initialize", TransDataOpType(int(data_op_type)).name)
        rc = _wait_for_store(url)
        if rc != 0:
            return rc
        return self._c.create(url, session_id, role, device_id)

    def get_rpc_port(self):
        return self._c.rpc_port()

    def register_memory(self, buffer_addr, capacity):
        return self._c.register([buffer_addr], [capacity])

    def batch_register_memory(self, buffer_addrs, capacities):
        return self._c.register(buffer_addrs, capacities)

    def unregister_memory(self, buffer_addr):
        return self._c.unregister([buffer_addr], missing_ok=True)

    def batch_unregister_memory(self, buffer_addrs):
        return self._c.unregister(buffer_addrs, missing_ok=True)

    def transfer_sync_write(self, dest_session, buffer, peer_buffer, length, flags=0):
        return self._c.transfer(True, dest_session, [buffer], [peer_buffer], [length])

    def transfer_sync_read(self, dest_session, buffer, peer_buffer, length, flags=0):
        return self._c.transfer(False, dest_session, [buffer], [peer_buffer], [length])

    def batch_transfer_sync_write(self, dest_session, buffers, peer_buffers, lengths, flags=0):
        return self._c.transfer(True, dest_session, buffers, peer_buffers, lengths)

    def batch_transfer_sync_read(self, dest_session, buffers, peer_buffers, lengths, flags=0):
        return self._c.transfer(False, dest_session, buffers, peer_buffers, lengths)

    def send_probe(self, dest_session):
        return self._c.probe(dest_session)

    def destroy(self):
        return self._c.destroy()

    def unInitialize(self):
        return self._c.destroy()

    @property
    def kvferry_engine(self):
        """The kvferry.TransferEngine underneath (notifications, async batches, statistics)."""
        return self._c.engine


def create_config_store(store_url=None):
    return _kvferry.create_config_store(store_url or os.environ.get("ASCEND_MF_STORE_URL", ""))


set_log_level = _kvferry.set_log_level
set_conf_store_tls = _kvferry.set_conf_store_tls
set_conf_store_tls_key = _kvferry.set_conf_store_tls_key
get_last_err_msg = _kvferry.get_last_err_msg


def launch_store_main(argv=None):
    """``python3 -m mf_adapter.launch_ascend_mf_store``: serve the config store named by
    ASCEND_MF_STORE_URL (log level ASCEND_MF_LOG_LEVEL) until SIGINT or SIGTERM."""
    url = os.environ.get("ASCEND_MF_STORE_URL", "")
    if not url:
        print("launch_ascend_mf_store: set ASCEND_MF_STORE_URL (e.g. tcp://10.0.0.1:6650)",
              file=sys.stderr)
        return 2
    _apply_log_level_env()
    try:
        srv = _kvferry.StoreServer(url)
    except _kvferry.Error as e:
        print(f"launch_ascend_mf_store: cannot serve {url}: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"config store serving at {srv.url}", flush=True)
    while not stop.wait(3600):
        pass
    srv.stop()
    return 0


__all__ = ["TransferEngine", "TransDataOpType", "TransferOpcode", "create_config_store",
           "set_log_level", "set_conf_store_tls", "set_conf_store_tls_key", "get_last_err_msg"]
