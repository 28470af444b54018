#!/usr/bin/env python3
"""Check that kvferry keeps its shape (docs/architecture.md, "Layers").

    scripts/check_layers.py SOURCE_DIR [BUILD_DIR]

Layers, lowest first; every arrow points down:

    L0  src/common/                 nothing of kvferry but itself and include/kvferry.h
    L1  src/transport/  src/store/  common/ only (the two never reach each other)
    L2  src/core/                   common/, transport/transport.h (the ops table) and the store's
                                    public API
    L3  tools/  python/src/         include/kvferry.h only (and their own folder)

Checked from the sources: every `#include "..."` against those rules, and the length of every
library file (LINES_MAX). Checked from the object files in BUILD_DIR, when given: which file
calls which (a global symbol one object uses and another defines), so that no two files call each
other, directly or round a longer cycle, no call goes up a layer or across L1, the core calls no
transport function (it has the ops table), the core, the tools and the Python module call nothing
of the store but its public API, and the tools and the Python module call nothing internal
(`kvf__*`). Exits 1 naming each violation, 0 when there is none.
"""

import os
import re
import subprocess
import sys

LINES_MAX = 800
SOURCE_DIRS = ["src/common", "src/transport", "src/store", "src/core", "tools", "python/src"]
LAYER = {"src/common": 0, "src/transport": 1, "src/store": 1, "src/core": 2, "tools": 3,
         "python/src": 3, "include": None}
# Object directories of the library, the CLI and the Python module inside a CMake build tree.
OBJECT_DIRS = ["CMakeFiles/kvferry_obj.dir", "CMakeFiles/kvferry_cli.dir",
               "python/CMakeFiles/kvferry_python.dir"]
INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def folder_of(rel):
    for d in SOURCE_DIRS + ["include"]:
        if rel.startswith(d + "/"):
            return d
    return None


def resolve(src_dir, including, name):
    """The repository path an #include "name" in file `including` refers to."""
    for cand in (os.path.join(os.path.dirname(including), name), os.path.join("src", name),
                 os.path.join("include", name)):
        if os.path.isfile(os.path.join(src_dir, cand)):
            return os.path.normpath(cand)
    return None


def include_allowed(src_folder, target):
    """None if a file in src_folder may include target (a repository path), else the reason."""
    dst = folder_of(target)
    if dst == "include":
        return None
    if dst == src_folder:
        return None
    if dst is None:
        return "includes a file outside the layered folders"
    ls, ld = LAYER[src_folder], LAYER[dst]
    if ls == 3:
        return "tools and the Python module use the public API (kvferry.h) only"
    if ld > ls:
        return "includes a higher layer (%s, L%d)" % (dst, ld)
    if ld == ls:
        return "includes a sibling of the same layer (%s)" % dst
    if src_folder == "src/core" and dst == "src/transport" and target != "src/transport/transport.h":
        return "the core reaches transports through transport/transport.h (the ops table) only"
    if src_folder == "src/core" and dst == "src/store":
        return "the core reaches the store through the public API (kvferry.h) only"
    return None


def check_sources(src_dir):
    errors = []
    for d in SOURCE_DIRS:
        for root, _, files in os.walk(os.path.join(src_dir, d)):
            for f in sorted(files):
                if not f.endswith((".c", ".h")):
                    continue
                rel = os.path.relpath(os.path.join(root, f), src_dir)
                text = open(os.path.join(src_dir, rel), encoding="utf-8").read()
                nlines = text.count("\n")
                if nlines > LINES_MAX:
                    errors.append("%s: %d lines, more than %d: split it along its sections"
                                  % (rel, nlines, LINES_MAX))
                for name in INCLUDE_RE.findall(text):
                    target = resolve(src_dir, rel, name)
                    if target is None:
                        errors.append('%s: #include "%s" names no file of the repository'
                                      % (rel, name))
                        continue
                    why = include_allowed(folder_of(rel), target)
                    if why:
                        errors.append('%s: #include "%s": %s' % (rel, name, why))
    return errors


def object_symbols(path):
    """(defined, undefined) global symbol names of one object file."""
    out = subprocess.run(["nm", "-P", path], check=True, capture_output=True, text=True).stdout
    defined, undefined = set(), set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        name, kind = parts[0], parts[1]
        if kind == "U":
            undefined.add(name)
        elif kind.isupper() and kind not in "N":
            defined.add(name)
    return defined, undefined


def source_of(obj_dir, obj_path):
    """tests/…/CMakeFiles/kvferry_obj.dir/src/core/engine.c.o -> src/core/engine.c"""
    rel = os.path.relpath(obj_path, obj_dir)
    return rel[:-2] if rel.endswith(".o") else rel


def strongly_connected(graph):
    """Tarjan's algorithm; returns the components with more than one node."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def check_objects(src_dir, build_dir):
    errors = []
    objs = {}
    for d in OBJECT_DIRS:
        base = os.path.join(build_dir, d)
        for root, _, files in os.walk(base):
            for f in files:
                if f.endswith(".c.o"):
                    path = os.path.join(root, f)
                    src = source_of(base, path)
                    if d.startswith("python/"):
                        src = "python/" + src
                    # An object left by a source file since deleted is not part of the build.
                    if os.path.isfile(os.path.join(src_dir, src)):
                        objs[src] = object_symbols(path)
    if not objs:
        return ["%s: no object files of the library; build first" % build_dir]
    definer = {}
    for src, (defined, _) in objs.items():
        for s in defined:
            definer.setdefault(s, src)
    graph, why = {}, {}
    for src, (_, undefined) in objs.items():
        for s in sorted(undefined):
            dst = definer.get(s)
            if dst is None or dst == src:
                continue
            graph.setdefault(src, set()).add(dst)
            why.setdefault((src, dst), s)
            fs, fd = folder_of(src), folder_of(dst)
            if fs is None or fd is None or fs == fd:
                continue
            ls, ld = LAYER[fs], LAYER[fd]
            bad = None
            if ld > ls:
                bad = "calls up a layer"
            elif ld == ls:
                bad = "calls across a layer"
            elif s.startswith("kvf__") and ls == 3:
                bad = "tools and the Python module call the public API only"
            elif fs == "src/core" and fd == "src/transport" and not dst.endswith("/transport.c"):
                bad = "the core calls a transport past its ops table"
            elif fd == "src/store" and s.startswith("kvf__"):
                bad = "only the store's public API may be called from outside it"
            if bad:
                errors.append("%s -> %s (%s): %s" % (src, dst, s, bad))
    for comp in strongly_connected(graph):
        members = set(comp)
        edges = ["%s -> %s (%s)" % (a, b, why[(a, b)])
                 for a in comp for b in sorted(graph.get(a, ())) if b in members]
        errors.append("files that call each other: " + "; ".join(edges))
    return errors


def main(argv):
    if len(argv) not in (2, 3):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    errors = check_sources(argv[1])
    if len(argv) == 3:
        errors += check_objects(argv[1], argv[2])
    for e in errors:
        print("check_layers: " + e)
    if errors:
        print("check_layers: %d violation(s); see docs/architecture.md, \"Layers\"" % len(errors))
        return 1
    print("check_layers: layers, file sizes and call graph are clean")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
