#!/bin/sh
# Install the Debian packages kvferry needs to build, test and demo, only those missing.
# Idempotent and silent when everything is present. Runs apt-get update first when a package is
# missing (a fresh machine has no package lists).
set -eu

PKGS="build-essential cmake pkg-config iproute2 libcmocka-dev libjansson-dev libssl-dev openssl libcurl4-openssl-dev libhiredis-dev etcd-server redis-server python3-dev python3-numpy python3-pytest python3-torch python3-setuptools python3-prometheus-client"
# Extra packages for one target (make fuzz: clang and its libFuzzer runtime), named on the
# command line.
PKGS="$PKGS $*"

missing=""
for p in $PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done
[ -z "$missing" ] && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "deps: need root or sudo to install:$missing" >&2; exit 1; }
    SUDO="sudo"
fi
echo "deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
# shellcheck disable=SC2086
if ! { $SUDO apt-get update -qq && \
       $SUDO apt-get install -y -qq --no-install-recommends $missing; } >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "deps: apt-get failed (see above)" >&2
    exit 1
fi
rm -f "$log"
