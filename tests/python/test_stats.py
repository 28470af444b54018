"""Statistics from Python: get_stats() counts a known sequence exactly, and the metrics endpoint
(metrics_listen=) scraped over loopback parses with Prometheus' own text parser and says the
same as get_stats()."""

import urllib.request

import numpy as np
import pytest

import kvferry
from conftest import make_engine

KiB = 1 << 10


def test_get_stats_exact(store):
    d = make_engine(store.url, "Decode")
    p = make_engine(store.url, "Prefill")
    try:
        dst = np.zeros(256 * KiB, dtype=np.uint8)
        assert d.register_memory(dst.ctypes.data, dst.nbytes) == 0
        src = np.arange(8 * KiB, dtype=np.uint8)
        base = dst.ctypes.data
        assert p.transfer_sync_write(d.session_id, src.ctypes.data, base, 4 * KiB) == 0
        assert p.transfer_sync_write(d.session_id, src.ctypes.data, base + 4 * KiB, 8 * KiB) == 0
        back = np.zeros(KiB, dtype=np.uint8)
        assert p.transfer_sync_read(d.session_id, back.ctypes.data, base, KiB) == 0
        assert p.transfer_sync_write(d.session_id, src.ctypes.data, base + dst.nbytes, 16) != 0

        s = p.get_stats()
        path = p.peer_transport(d.session_id)
        assert s["session_id"] == p.session_id and s["role"] == "Prefill"
        t = s["transports"][path]
        assert (t["write_bytes"], t["write_ops"], t["read_bytes"], t["read_ops"]) == \
            (12 * KiB, 2, KiB, 1)
        assert (t["calls"], t["failed"]) == (3, 1)
        assert sum(t["latency_counts"]) == 4
        assert s["errors"] == {"KVF_ENOTREG": 1}
        assert [(x["session_id"], x["transport"], x["write_bytes"]) for x in s["peers"]] == \
            [(d.session_id, path, 12 * KiB)]
        assert s["in_flight"] == 0
        assert p.metrics_address() is None

        ds = d.get_stats()
        assert (ds["regions"], ds["region_bytes"]) == (1, dst.nbytes)
    finally:
        p.destroy()
        d.destroy()
    with pytest.raises(kvferry.Error):
        p.get_stats()


def test_metrics_scrape_matches_stats(store):
    parser = pytest.importorskip("prometheus_client.parser",
                                 reason="apt-get install python3-prometheus-client")
    d = make_engine(store.url, "Decode")
    p = make_engine(store.url, "Prefill", metrics_listen="127.0.0.1:0")
    try:
        dst = np.zeros(64 * KiB, dtype=np.uint8)
        assert d.register_memory(dst.ctypes.data, dst.nbytes) == 0
        src = np.ones(32 * KiB, dtype=np.uint8)
        for i in range(3):
            assert p.transfer_sync_write(d.session_id, src.ctypes.data,
                                         dst.ctypes.data + i * 1000, 32 * KiB) == 0
        url = "http://%s/metrics" % p.metrics_address()
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = r.read().decode()
        stats = p.get_stats()
        fams = {f.name: f for f in parser.text_string_to_metric_families(text)}
        path = p.peer_transport(d.session_id)

        def sample(fam, name, **labels):
            got = [s.value for s in fams[fam].samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
            assert len(got) == 1, (name, labels, got)
            return got[0]

        assert fams["kvferry_tx_bytes"].type == "counter"
        for tr, t in stats["transports"].items():
            assert sample("kvferry_tx_bytes", "kvferry_tx_bytes_total", transport=tr) == \
                t["write_bytes"]
            assert sample("kvferry_xfer_calls", "kvferry_xfer_calls_total", transport=tr) == \
                t["calls"]
            assert sample("kvferry_xfer_time_seconds", "kvferry_xfer_time_seconds_count",
                          transport=tr) == sum(t["latency_counts"])
        assert stats["transports"][path]["write_bytes"] == 3 * 32 * KiB
        assert sample("kvferry_peer_tx_bytes", "kvferry_peer_tx_bytes_total",
                      peer=d.session_id, transport=path) == 3 * 32 * KiB
        assert fams["kvferry_xfer_time_seconds"].type == "histogram"
        inf = sample("kvferry_xfer_time_seconds", "kvferry_xfer_time_seconds_bucket",
                     transport=path, le="+Inf")
        assert inf == 3
        assert sample("kvferry_engine_info", "kvferry_engine_info", session=p.session_id,
                      role="Prefill") == 1
    finally:
        p.destroy()
        d.destroy()
