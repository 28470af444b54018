#!/bin/sh
# `make install PREFIX=` into a scratch prefix (and DESTDIR staging), then a program built
# against it through pkg-config, with the shared and with the static library: what a user of
# `make install` relies on.
set -eu
build=$1
src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# As the docs say to: `make install PREFIX=...` (the build is already up to date, so make only
# installs). The header must land under the prefix, not in /usr/local.
make -C "$src" install BUILD="$(cd "$build" && pwd)" PREFIX="$tmp/prefix" >/dev/null
test -f "$tmp/prefix/include/kvferry.h"
# DESTDIR stages under a root, the prefix kept inside it.
make -C "$src" install BUILD="$(cd "$build" && pwd)" PREFIX=/opt/kvf DESTDIR="$tmp/stage" >/dev/null
test -f "$tmp/stage/opt/kvf/include/kvferry.h"
pc=$(find "$tmp/prefix" -name kvferry.pc)
export PKG_CONFIG_PATH=$(dirname "$pc")
cat >"$tmp/use.c" <<'C'
#include <kvferry.h>
#include <stdio.h>
#include <string.h>
int main(void)
{
    kvf_store_server_t *srv;
    if (kvf_store_server_start("tcp://127.0.0.1:0", &srv) < 0)
        return 1;
    kvf_store_t *st;
    if (kvf_store_open(kvf_store_server_url(srv), NULL, &st) < 0)
        return 2;
    void *v;
    size_t n;
    int ok = kvf_store_set(st, "k", "v", 1, 0) == 0 && kvf_store_get(st, "k", 0, &v, &n) == 0 &&
             n == 1 && memcmp(v, "v", 1) == 0;
    kvf_store_close(st);
    kvf_store_server_stop(srv);
    puts(ok ? "installed kvferry works" : "wrong value");
    return ok ? 0 : 3;
}
C
cc -std=c11 -Wall -Werror "$tmp/use.c" -o "$tmp/use_shared" $(pkg-config --cflags --libs kvferry)
LD_LIBRARY_PATH=$(dirname "$(find "$tmp/prefix" -name 'libkvferry.so' | head -n1)") "$tmp/use_shared"
cc -std=c11 -Wall -Werror "$tmp/use.c" -o "$tmp/use_static" $(pkg-config --cflags kvferry) \
    "$(dirname "$pc")/../libkvferry.a" $(pkg-config --libs-only-l --static jansson) \
    $(pkg-config --libs-only-l libcurl hiredis libssl libcrypto) -pthread
"$tmp/use_static"
"$tmp/prefix/bin/kvferry" --version
