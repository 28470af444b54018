"""Mooncake's ``mooncake.engine.TransferEngine`` on kvferry.

The calls SGLang's ``--disaggregation-transfer-backend mooncake`` and vLLM's MooncakeConnector
make, with Mooncake's names, keyword names and int return codes; imported as ``mooncake.engine``
from the directory ``python3 -m kvferry compat-path`` prints (opt-in: it must never hide a real
Mooncake by accident). ``initialize(hostname, "P2PHANDSHAKE", protocol, device_name)`` needs no
store: peers are found by their session ids ``host:rpc_port`` (kvferry's ``p2p://``). An
``etcd://`` or ``redis://`` metadata server is used as kvferry's store; Mooncake's HTTP metadata
server is not. RDMA is not built: any protocol runs over tcp between hosts and shared memory
within one (one log line says so). See docs/frameworks.md.
"""

import os

from . import _compat, _kvferry


def _store_url(metadata_server):
    """kvferry's store URL for Mooncake's metadata server argument, or None."""
    m = (metadata_server or "").strip()
    if m in ("P2PHANDSHAKE", "p2p://"):
        return "p2p://"
    if m.startswith(("etcd://", "redis://", "tcp://")):
        return m
    if "://" not in m and ":" in m:
        return "etcd://" + m  # Mooncake's default metadata backend for a bare host:port
    return None


def _protocol(protocol, device_name):
    if os.environ.get("MC_FORCE_TCP", "").lower() in ("1", "true", "yes", "on"):
        return "tcp"
    return (os.environ.get("MOONCAKE_PROTOCOL") or protocol or "tcp").lower()


class TransferEngine:
    """Mooncake's TransferEngine: one kvferry engine (role Both)."""

    def __init__(self):
        self._c = _compat.Engine()
        self._hostname = None

    def initialize(self, local_hostname, metadata_server, protocol, device_name):
        url = _store_url(metadata_server)
        if url is None:
            _compat.log.error("initialize: metadata server %r is not supported (P2PHANDSHAKE, "
                              "etcd://host:port or redis://host:port)", metadata_server)
            return -_kvferry.KVF_ENOTSUP
        proto = _protocol(protocol, device_name)
        if proto != "tcp":
            _compat.say_fallback("mooncake initialize", proto)
        host = str(local_hostname)
        if host.startswith("[") or host.count(":") == 1:
            sid = host  # host:port given
        else:
            port = self._c.rpc_port()  # a port reserved now, listened on by the engine
            if port < 0:
                return port
            sid = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._hostname = host
        return self._c.create(url, sid, "Both", 0)

    def initialize_ext(self, local_hostname, metadata_server, protocol, device_name,
                       metadata_type=None):
        return self.initialize(local_hostname, metadata_server, protocol, device_name)

    def get_rpc_port(self):
        return self._c.rpc_port()

    def get_local_ip(self):
        return self._hostname

    def register_memory(self, buffer_addr, capacity):
        return self._c.register([buffer_addr], [capacity])

    def unregister_memory(self, buffer_addr):
        return self._c.unregister([buffer_addr], missing_ok=False)

    def batch_register_memory(self, buffer_addresses, capacities):
        return self._c.register(buffer_addresses, capacities)

    def batch_unregister_memory(self, buffer_addresses):
        return self._c.unregister(buffer_addresses, missing_ok=False)

    def transfer_sync_write(self, target_hostname, buffer, peer_buffer_address, length):
        return self._c.transfer(True, target_hostname, [buffer], [peer_buffer_address], [length])

    def transfer_sync_read(self, target_hostname, buffer, peer_buffer_address, length):
        return self._c.transfer(False, target_hostname, [buffer], [peer_buffer_address], [length])

    def batch_transfer_sync_write(self, target_hostname, buffers, peer_buffer_addresses, lengths):
        return self._c.transfer(True, target_hostname, buffers, peer_buffer_addresses, lengths)

    def batch_transfer_sync_read(self, target_hostname, buffers, peer_buffer_addresses, lengths):
        return self._c.transfer(False, target_hostname, buffers, peer_buffer_addresses, lengths)

    # Asynchronous calls: Mooncake's batch ids are kvferry's.
    def transfer_submit_write(self, target_hostname, buffer, peer_buffer_address, length):
        return self._c.engine.transfer_submit_write(target_hostname, buffer,
                                                    peer_buffer_address, length)

    def batch_transfer_async_write(self, target_hostname, buffers, peer_buffer_addresses,
                                   lengths):
        return self._c.engine.batch_transfer_async_write(target_hostname, list(buffers),
                                                         list(peer_buffer_addresses),
                                                         list(lengths))

    def batch_transfer_async_read(self, target_hostname, buffers, peer_buffer_addresses,
                                  lengths):
        return self._c.engine.batch_transfer_async_read(target_hostname, list(buffers),
                                                        list(peer_buffer_addresses),
                                                        list(lengths))

    def transfer_check_status(self, batch_id):
        """Mooncake's codes, which are kvferry's: 1 done, 0 still running, negative failed."""
        return self._c.engine.transfer_check_status(batch_id)

    def get_batch_transfer_status(self, batch_ids):
        return self._c.engine.get_batch_transfer_status(list(batch_ids))

    def allocate_managed_buffer(self, length):
        return self._c.engine.mem_alloc(length)

    def free_managed_buffer(self, buffer_addr, length):
        return self._c.engine.mem_free(buffer_addr)

    def get_first_buffer_address(self, segment_name):
        regions = self._c.engine.peer_regions(segment_name)
        return regions[0][0] if regions else 0

    def get_notifies(self):
        return self._c.engine.get_notifications()

    def send_probe(self, target_hostname):
        return self._c.probe(target_hostname)

    @property
    def kvferry_engine(self):
        """The kvferry.TransferEngine underneath."""
        return self._c.engine


__all__ = ["TransferEngine"]
