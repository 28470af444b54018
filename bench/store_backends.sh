#!/usr/bin/env bash
# `kvferry bench store` against each store backend, in one run: the built-in store (started by
# the bench in its process), etcd and Redis (each started here on a free loopback port, in a
# temporary folder, and stopped after). Writes OUT/store.json, OUT/store-etcd.json and
# OUT/store-redis.json; a backend whose server is not installed (make deps installs both) is
# reported and skipped.
#
#   bench/store_backends.sh KVFERRY_BINARY OUT_DIR [extra `kvferry bench store` flags...]
set -euo pipefail

KVF=$1
OUT=$2
shift 2
TMP=$(mktemp -d /dev/shm/kvf-storebench.XXXXXX 2>/dev/null || mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT

free_port() {
    /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Wait up to 20 s for a store URL to answer (kvferry kv get of a key that is not there: exit 1
# with "not found" means it answered).
wait_up() {
    local url=$1 i
    for i in $(seq 1 100); do
        local said
        said=$("$KVF" kv --store-url "$url" --timeout 500 get kvferry-bench-probe 2>&1 || true)
        case "$said" in *"not found"*) return 0 ;; esac
        sleep 0.2
    done
    echo "store_backends: $url did not answer within 20 s" >&2
    return 1
}

run() { # name, url or "" for the built-in store
    local name=$1 url=$2 json="$OUT/store.json"
    shift 2
    [ "$name" = builtin ] || json="$OUT/store-$name.json"
    echo "-- kvferry bench store: $name ${url:+($url)}"
    if [ -n "$url" ]; then
        timeout 120 "$KVF" bench store --store-url "$url" --json "$json" "$@"
    else
        timeout 120 "$KVF" bench store --json "$json" "$@"
    fi
}

run builtin "" "$@"

if command -v etcd >/dev/null; then
    cp=$(free_port) pp=$(free_port)
    etcd --name b --data-dir "$TMP/etcd" --listen-client-urls "http://127.0.0.1:$cp" \
        --advertise-client-urls "http://127.0.0.1:$cp" --listen-peer-urls "http://127.0.0.1:$pp" \
        --initial-advertise-peer-urls "http://127.0.0.1:$pp" --initial-cluster "b=http://127.0.0.1:$pp" \
        --log-level error >"$TMP/etcd.log" 2>&1 &
    PIDS+=($!)
    wait_up "etcd://127.0.0.1:$cp" && run etcd "etcd://127.0.0.1:$cp" "$@"
else
    echo "store_backends: etcd is not installed (make deps): skipped" >&2
fi

if command -v redis-server >/dev/null; then
    rp=$(free_port)
    redis-server --port "$rp" --bind 127.0.0.1 --save "" --appendonly no --dir "$TMP" \
        --daemonize no >"$TMP/redis.log" 2>&1 &
    PIDS+=($!)
    wait_up "redis://127.0.0.1:$rp" && run redis "redis://127.0.0.1:$rp" "$@"
else
    echo "store_backends: redis-server is not installed (make deps): skipped" >&2
fi
