#!/usr/bin/env bash
# make demo: start a config store on 127.0.0.1 with a free port, publish and read back a session
# record through it with `kvferry kv`, then stop the store with SIGTERM.
# (The engine's Prefill -> Decode transfer joins this demo when the transfer engine lands.)
set -euo pipefail
build=${1:-build}
kvf="$build/kvferry"
log=$(mktemp)
"$kvf" store --listen tcp://127.0.0.1:0 >"$log" 2>&1 &
store=$!
cleanup() { kill "$store" 2>/dev/null || true; wait "$store" 2>/dev/null || true; rm -f "$log"; }
trap cleanup EXIT

url=""
for _ in $(seq 1 100); do   # bounded: 100 x 50 ms
    url=$(sed -n 's/^kvferry store listening on //p' "$log")
    [ -n "$url" ] && break
    sleep 0.05
done
[ -n "$url" ] || { echo "demo: the store did not start:"; cat "$log"; exit 1; }
echo "store:   $url"

key="kvferry/v1/default/sessions/127.0.0.1:50051"
rec='{"session":"127.0.0.1:50051","role":"Decode"}'
"$kvf" kv --store-url "$url" set "$key" "$rec"
got=$("$kvf" kv --store-url "$url" get "$key")
[ "$got" = "$rec" ] || { echo "demo: read back \"$got\", want \"$rec\""; exit 1; }
echo "record:  $key -> $got"
echo "counter: $("$kvf" kv --store-url "$url" add kvferry/v1/default/epoch 1)"
echo "list:"
"$kvf" kv --store-url "$url" list kvferry/v1/ | sed 's/^/  /'
kill -TERM "$store"
wait "$store"
trap - EXIT
rm -f "$log"
echo "demo: store round trip verified"
