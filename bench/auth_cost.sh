#!/bin/sh
# What the cluster secret costs on the data path (docs/performance.md, "Authentication"): `kvferry
# bench` over tcp at 4 KiB (p50 latency) and 1 MiB (GB/s), without a key and with one, in one run:
# ROUNDS alternating repetitions of each mode (so drift on a shared machine hits both alike),
# the median of each printed. The key is made for the run in a temp folder and removed after.
#   bench/auth_cost.sh [BUILD_DIR] [ROUNDS] [SECONDS]
set -eu
build=${1:-build}
rounds=${2:-5}
secs=${3:-2}
kvferry="$build/kvferry"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$kvferry" keygen "$tmp/cluster.key" >/dev/null
i=1
while [ "$i" -le "$rounds" ]; do
    for mode in none secret; do
        if [ "$mode" = secret ]; then
            KVFERRY_AUTH_KEY_FILE="$tmp/cluster.key" "$kvferry" bench --transport tcp \
                --block-size 4K,1M --duration "$secs" --quiet --json "$tmp/$mode-$i.json" >/dev/null
        else
            env -u KVFERRY_AUTH_KEY_FILE "$kvferry" bench --transport tcp \
                --block-size 4K,1M --duration "$secs" --quiet --json "$tmp/$mode-$i.json" >/dev/null
        fi
    done
    i=$((i + 1))
done
/usr/bin/python3 - "$tmp" "$rounds" <<'PY'
import glob, json, statistics, sys
tmp, rounds = sys.argv[1], int(sys.argv[2])
res = {}
for mode in ("none", "secret"):
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
