#!/bin/sh
# What each protection mode costs on the data path (docs/performance.md, "Authentication and
# TLS"): `kvferry bench` over tcp at 4 KiB (p50 latency) and 1 MiB (GB/s), in one run, for
#   none    no key, no TLS
#   secret  the cluster secret (a handshake per connection, nothing per frame)
#   tls     data TLS 1.3: the target presents a certificate, the initiator pins its fingerprint
#   mtls    data TLS 1.3 with a CA on both sides: each engine requires the other's certificate
# ROUNDS alternating repetitions of each mode (so drift on a shared machine hits all alike), the
# median of each printed with its ratio to none. The key and certificates (tests/tls_certs.sh,
# the openssl command) are made for the run in a temp folder and removed after.
#   bench/auth_cost.sh [BUILD_DIR] [ROUNDS] [SECONDS]
set -eu
build=${1:-build}
rounds=${2:-5}
secs=${3:-2}
kvferry="$build/kvferry"
here=$(dirname "$0")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$kvferry" keygen "$tmp/cluster.key" >/dev/null
/bin/sh "$here/../tests/tls_certs.sh" "$tmp/certs" >/dev/null
c="$tmp/certs"
modes="none secret tls mtls"
i=1
while [ "$i" -le "$rounds" ]; do
    for mode in $modes; do
        set -- env -u KVFERRY_AUTH_KEY_FILE -u KVFERRY_TLS_DATA -u KVFERRY_TLS_CA_FILE \
            -u KVFERRY_TLS_CERT -u KVFERRY_TLS_KEY -u KVFERRY_TLS_FINGERPRINT
        case $mode in
        secret) set -- "$@" KVFERRY_AUTH_KEY_FILE="$tmp/cluster.key" ;;
        tls) set -- "$@" KVFERRY_TLS_DATA=1 KVFERRY_TLS_CERT="$c/server.pem" \
            KVFERRY_TLS_KEY="$c/server.key" KVFERRY_TLS_FINGERPRINT="$(cat "$c/server.fp")" ;;
        mtls) set -- "$@" KVFERRY_TLS_DATA=1 KVFERRY_TLS_CERT="$c/server.pem" \
            KVFERRY_TLS_KEY="$c/server.key" KVFERRY_TLS_CA_FILE="$c/ca.pem" ;;
        esac
        "$@" "$kvferry" bench --transport tcp --block-size 4K,1M --duration "$secs" --quiet \
            --json "$tmp/$mode-$i.json" >/dev/null
    done
    i=$((i + 1))
done
/usr/bin/python3 - "$tmp" "$rounds" $modes <<'PY'
import glob, json, statistics, sys
tmp, rounds, modes = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
res = {}
for mode in modes:
    p50, gbps, first = [], [], []
    for f in sorted(glob.glob(f"{tmp}/{mode}-*.json")):
        for r in json.load(open(f))["runs"]:
            if r["block_size"] == 4096:
                p50.append(r["p50_us"])
                first.append(r["first_transfer_us"])
            elif r["block_size"] == 1 << 20:
                gbps.append(r["gbps"])
    res[mode] = (statistics.median(p50), statistics.median(gbps), statistics.median(first))
n = res["none"]
print(f"{rounds} alternating rounds per mode, medians")
print(f"{'mode':8} {'4 KiB p50 us':>13} {'1 MiB GB/s':>11} {'first transfer us':>18}"
      f" {'p50 ratio':>10} {'GB/s ratio':>11}")
for mode, (p, g, f) in res.items():
    print(f"{mode:8} {p:13.1f} {g:11.2f} {f:18.0f} {p / n[0]:10.3f} {g / n[1]:11.3f}")
PY
