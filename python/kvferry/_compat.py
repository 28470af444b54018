"""What the drop-in engines share: kvferry underneath the upstream names.

``kvferry._mf`` (MemFabric's ``mf_adapter`` / ``memfabric_hybrid``) and ``kvferry._mooncake``
(``mooncake.engine``) are thin classes over one ``kvferry.TransferEngine``; this module holds the
semantics both frameworks rely on:

- registering a range already covered by a registered range returns 0 (SGLang registers some
  buffers twice); ``batch_unregister_memory``;
- a batch whose trouble is transient (the peer restarted, a connection broke) is run again
  inside the engine, up to a bound, because SGLang blacklists a Decode for good on any non-zero
  return: the writes are idempotent (the same bytes to the same addresses);
- ``send_probe`` asks whether the peer is there (``kvf_peer_check``);
- an RDMA or device protocol asked for on a host without one falls back to tcp/shm, saying so
  in one log line.

See docs/frameworks.md.
"""

import logging
import os
import threading
import time

from . import _kvferry

log = logging.getLogger("kvferry.compat")

# kvferry's codes that mean "try again": the peer went away and may be back (a restart), the
# connection broke, a wait ran out. Anything else (an address outside every registered region,
# a bad argument) is returned at once.
_TRANSIENT = {
    -_kvferry.KVF_EPEERGONE,
    -_kvferry.KVF_ETIMEDOUT,
    -_kvferry.KVF_ESTOREDOWN,
    -_kvferry.KVF_ESTALE,
    -104,  # ECONNRESET
    -111,  # ECONNREFUSED
    -32,  # EPIPE
}
# How many times a transient failure is run again, and for how long at most in all.
RETRIES = 2
RETRY_WINDOW_S = 5.0

_fallback_lock = threading.Lock()
_fallback_said = set()


def say_fallback(what, asked):
    """One log line per process and protocol: RDMA/device transfers are not built here."""
    with _fallback_lock:
        if asked in _fallback_said:
            return
        _fallback_said.add(asked)
    log.warning("%s: protocol %r is not available on this host (kvferry has no RDMA or device "
                "transport); using tcp between hosts and shared memory within one", what, asked)


def _ints(seq, name):
    try:
        return [int(x) for x in seq]
    except TypeError as e:
        raise TypeError(f"{name} must be a sequence of ints: {e}") from None


class Engine:
    """One kvferry engine with the shared semantics; the upstream classes wrap it."""

    def __init__(self, **cfg):
        self._cfg = cfg
        self._e = _kvferry.TransferEngine(**cfg)
        self._lock = threading.Lock()
        self._regs = {}  # start address -> length, as this object registered them

    # ---- lifecycle ----------------------------------------------------------------------------

    def create(self, store_url, session_id, role, device_id):
        return self._e.initialize(store_url, session_id, role, int(device_id))

    def rpc_port(self):
        return self._e.get_rpc_port()

    def session_id(self):
        return self._e.session_id

    def destroy(self):
        with self._lock:
            self._regs.clear()
        return self._e.destroy()

    # ---- memory -------------------------------------------------------------------------------

    def _covered(self, addr, length):
        """Whether [addr, addr + length) lies inside one range registered here (under _lock)."""
        for a, n in self._regs.items():
            if a <= addr and addr + length <= a + n:
                return True
        return False

    def register(self, addrs, lengths):
        addrs = _ints(addrs, "buffer addresses")
        lengths = _ints(lengths, "capacities")
        if len(addrs) != len(lengths):
            return -_kvferry.KVF_EINVAL
        with self._lock:
            new, seen = [], set()
            for a, n in zip(addrs, lengths):
                if n > 0 and (self._covered(a, n) or (a, n) in seen):
                    continue  # registered already: the frameworks may ask twice
                seen.add((a, n))
                new.append((a, n))
            if not new:
                return 0
            rc = self._e.batch_register_memory([a for a, _ in new], [n for _, n in new])
            if rc == 0:
                for a, n in new:
                    self._regs[a] = n
            return rc

    def unregister(self, addrs, missing_ok):
        rc = 0
        for a in _ints(addrs, "buffer addresses"):
            with self._lock:
                held = a in self._regs
            if not held:
                if not missing_ok and rc == 0:
                    rc = -_kvferry.KVF_ENOTREG
                continue
            r = self._e.unregister_memory(a)
            if r == 0:
                with self._lock:
                    self._regs.pop(a, None)
            elif rc == 0:
                rc = r
        return rc

    # ---- transfers ----------------------------------------------------------------------------

    def transfer(self, write, session, srcs, dsts, lengths):
        srcs = _ints(srcs, "buffers")
        dsts = _ints(dsts, "peer buffers")
        lengths = _ints(lengths, "lengths")
        if not (len(srcs) == len(dsts) == len(lengths)):
            return -_kvferry.KVF_EINVAL
        if not srcs:
            return 0
        run = self._e.batch_transfer_sync_write if write else self._e.batch_transfer_sync_read
        end = time.monotonic() + RETRY_WINDOW_S
        rc = run(session, srcs, dsts, lengths)
        tries = 0
        while rc in _TRANSIENT and tries < RETRIES and time.monotonic() < end:
            tries += 1
            log.info("transfer to %s: %s (%s); running it again (%d of %d)", session,
                     _kvferry.err_name(rc), _kvferry.get_last_err_msg(), tries, RETRIES)
            rc = run(session, srcs, dsts, lengths)
        return rc

    def probe(self, session):
        return self._e.check_peer(session)

    # ---- what each wrapper may reach directly ----------------------------------------------------

    @property
    def engine(self):
        """The kvferry.TransferEngine underneath (async batches, notifications, statistics)."""
        return self._e
