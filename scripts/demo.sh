#!/usr/bin/env bash
# make demo: `kvferry demo` starts a config store, a Decode and a Prefill on 127.0.0.1 with free
# ports, runs the seed's transfer flow, verifies every byte and prints a summary.
set -euo pipefail
build=${1:-build}
exec "$build/kvferry" demo
