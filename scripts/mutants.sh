#!/usr/bin/env bash
# make mutants: break, one at a time, an invariant kvferry promises, and require the tests named
# for it to catch the break.
#
#   scripts/mutants.sh [NAME...]        (default: every tests/mutants/*.patch)
#
# Each tests/mutants/NAME.patch is a unified diff against this tree, preceded by lines
#   # invariant: what the break violates
#   # tests: CTest names (exact) of which at least one must fail
# The sources are copied to $MUTANTS_DIR/src (default build-mutants/src; the build in
# $MUTANTS_DIR/build is incremental), the patch is applied, the tree rebuilt and the named
# tests run; the patch is then taken out again. A mutant that builds and passes its tests has
# SURVIVED: the suite would not notice that bug, and the run fails. A patch that no longer applies
# fails the run too: update it with the code it breaks.
set -euo pipefail

cd "$(dirname "$0")/.."
WORK=${MUTANTS_DIR:-build-mutants}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
START=$(date +%s)

if [ $# -gt 0 ]; then
    patches=()
    for n in "$@"; do patches+=("tests/mutants/$n.patch"); done
else
    patches=(tests/mutants/*.patch)
fi

# A pristine copy of the tracked sources. Only files whose content differs are copied (and so get
# a new mtime): the build stays incremental, and a file an interrupted run left mutated is
# restored and rebuilt.
if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    echo "mutants: not a git checkout" >&2
    exit 1
fi
git ls-files -z | while IFS= read -r -d '' f; do
    if ! cmp -s "$f" "$WORK/src/$f"; then
        mkdir -p "$WORK/src/$(dirname "$f")"
        cp "$f" "$WORK/src/$f"
    fi
done
cmake -S "$WORK/src" -B "$WORK/build" -DKVF_BUILD_PYTHON=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    >"$WORK/cmake.log" 2>&1 || { cat "$WORK/cmake.log"; exit 1; }
cmake --build "$WORK/build" -j "$JOBS" >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }

survived=0
failed=0
for p in "${patches[@]}"; do
    name=$(basename "$p" .patch)
    tests=$(sed -n 's/^# tests: //p' "$p")
    what=$(sed -n 's/^# invariant: //p' "$p")
    if [ -z "$tests" ]; then
        echo "mutants: $name: no '# tests:' line" >&2
        failed=1
        continue
    fi
    if ! patch -d "$WORK/src" -p1 -s -F0 --dry-run <"$p" >/dev/null 2>&1; then
        echo "mutants: $name: the patch no longer applies; update it (it breaks: $what)" >&2
        failed=1
        continue
    fi
    patch -d "$WORK/src" -p1 -s -F0 <"$p"
    regex="^($(echo $tests | tr ' ' '|' | sed 's/\./\\./g'))\$"
    t0=$(date +%s)
    if ! cmake --build "$WORK/build" -j "$JOBS" >"$WORK/$name.build.log" 2>&1; then
        verdict="killed (does not build: see $WORK/$name.build.log)"
    elif (cd "$WORK/build" && ctest -R "$regex" --timeout 120 >"../$name.test.log" 2>&1); then
        verdict="SURVIVED: $tests all passed"
        survived=1
    else
        killers=$(sed -n 's/.*Test *#[0-9]*: \([^ ]*\) .*\(Failed\|Exception\|Timeout\|SEGFAULT\|Child aborted\).*/\1/p' \
            "$WORK/$name.test.log" | tr '\n' ' ')
        if [ -z "$killers" ]; then
            verdict="SURVIVED: no named test ran (check the names: $tests)"
            survived=1
        else
            verdict="killed by $killers"
        fi
    fi
    patch -d "$WORK/src" -p1 -s -F0 -R <"$p"
    printf 'mutants: %-24s %s (%ss)\n' "$name" "$verdict" "$(($(date +%s) - t0))"
done
# Leave the copy as pristine as it came, so the next run rebuilds only what changed.
cmake --build "$WORK/build" -j "$JOBS" >"$WORK/build.log" 2>&1 || true
echo "mutants: ${#patches[@]} mutants in $(($(date +%s) - START)) s"
if [ $failed -ne 0 ] || [ $survived -ne 0 ]; then
    echo "mutants: FAILED (a mutant survived, or a patch must be updated)" >&2
    exit 1
fi
