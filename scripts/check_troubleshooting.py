#!/usr/bin/env python3
"""Check that every row of docs/operations.md's troubleshooting table is produced by a test.

    scripts/check_troubleshooting.py SOURCE_DIR (--ctest CTEST BUILD_DIR | --tests FILE)

The section "## Troubleshooting" of docs/operations.md holds one table with the columns "Error
line", "Cause and fix" and "Produced by". For every row:

  - the "Error line" cell quotes at least one error line in backticks;
  - the "Produced by" cell names at least one test in backticks, and each is a registered CTest
    test (as `ctest --show-only=json-v1` in BUILD_DIR lists them, or one name a line in FILE);
  - each quoted line, cut at its placeholders (H:P, IP:PORT, HOST:PORT, URL, PORT, PID, NS, N, A,
    X.Y.Z, /path/python3 and `...`), leaves pieces of fixed text; every piece of three or more
    letters or digits is found in a string literal of a named test's source file (tests/<suite>.c,
    tests/python/<file>.py) or of kvferry's own sources (src, tools, python, examples, include),
    adjacent literals joined as the compiler joins them; and at least one piece of each line is
    found in a named test's source, so that the test checks the line and does not just run past it.

Exits 1 naming each row that breaks a rule, 0 when every row keeps them all.
"""

import json
import os
import re
import subprocess
import sys

DOC = "docs/operations.md"
SECTION = "## Troubleshooting"
PRODUCT_DIRS = ["src", "tools", "python", "examples", "include"]
# Longest first, so that IP:PORT is one placeholder and not IP: and PORT.
PLACEHOLDER_RE = re.compile(r"\.\.\.|\u2026|/path/python3|X\.Y\.Z|"
                            r"\b(?:HOST:PORT|IP:PORT|H:P|URL|PORT|PID|NS|N|A)\b")
MIN_PIECE = 3  # letters or digits a piece needs to be worth looking for


# ---- string literals of C and Python sources -------------------------------------------------

ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "0": "\0"}


def unescape(s):
    return re.sub(r"\\(.)", lambda m: ESCAPES.get(m.group(1), "\\" + m.group(1)), s)


def string_literals(text, python):
    """The string literals of a C or Python file, those separated by nothing but white space
    (and, in C, comments) joined into one, as the compiler joins them."""
    out, cur, last_end = [], None, 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if python and c == "#":
            i = text.find("\n", i)
            i = n if i < 0 else i
            continue
        if not python and text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
            continue
        if not python and text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
            continue
        if c in "\"'":
            start = i
            # A Python prefix (f, r, b, u, rb, ...) is part of the literal.
            raw = False
            if python:
                k = i
                while k > 0 and text[k - 1] in "rRbBfFuU":
                    k -= 1
                raw = "r" in text[k:i].lower()
                start = k
            q = text[i:i + 3] if python and text[i:i + 3] in ('"""', "'''") else c
            j = i + len(q)
            while j < n and not text.startswith(q, j):
                if text[j] == "\\":
                    j += 1
                elif text[j] == "\n" and len(q) == 1 and not python:
                    break
                j += 1
            body = text[i + len(q):j]
            i = j + len(q)
            if not python and c == "'":
                continue  # a character constant
            s = body if raw else unescape(body)
            between = text[last_end:start]
            if not python:
                between = re.sub(r"/\*.*?\*/|//[^\n]*", "", between, flags=re.S)
            if cur is not None and between.strip() == "":
                cur += s
            else:
                if cur is not None:
                    out.append(cur)
                cur = s
            last_end = i
            continue
        i += 1
    if cur is not None:
        out.append(cur)
    return out


def file_literals(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return string_literals(f.read(), path.endswith(".py"))


def product_literals(src_dir):
    lits = []
    for d in PRODUCT_DIRS:
        for root, _, files in os.walk(os.path.join(src_dir, d)):
            for name in sorted(files):
                if name.endswith((".c", ".h", ".py", ".pyi")):
                    lits += file_literals(os.path.join(root, name))
    return lits


# ---- the table ---------------------------------------------------------------------------------

def split_cells(line):
    """The cells of a Markdown table row; a | inside backticks does not split."""
    cells, cur, code = [], "", False
    for ch in line.strip().strip("|"):
        if ch == "`":
            code = not code
        if ch == "|" and not code:
            cells.append(cur.strip())
            cur = ""
        else:
            cur += ch
    cells.append(cur.strip())
    return cells


def tables(doc_text):
    """The tables of the troubleshooting section: a list of (header cells, [(line number,
    cells), ...]); None when there is no such section."""
    lines = doc_text.split("\n")
    try:
        start = next(i for i, l in enumerate(lines) if l.strip() == SECTION)
    except StopIteration:
        return None
    found, cur = [], None
    for no in range(start + 1, len(lines)):
        l = lines[no]
        if l.startswith("## "):
            break
        if l.startswith("|"):
            cells = split_cells(l)
            if cur is None:
                cur = (cells, [])
                found.append(cur)
            elif all(re.fullmatch(r":?-+:?", c) for c in cells):
                continue
            else:
                cur[1].append((no + 1, cells))
        else:
            cur = None
    return found


def backticked(cell):
    return re.findall(r"`([^`]+)`", cell)


def quoted_lines(cell):
    """The error lines an "Error line" cell quotes: its backticked text, less the names of
    functions, flags and codes (`kvf_batch_wait`, `--timeout`), which are not lines."""
    return [q for q in backticked(cell) if not re.fullmatch(r"-{0,2}[A-Za-z_][A-Za-z0-9_.-]*", q)]


def pieces(error_line):
    """The fixed text of an error line, cut at its placeholders; pieces too short to search for
    (": ", ") (") are left out."""
    out = []
    for p in PLACEHOLDER_RE.split(error_line):
        # The separator next to a placeholder belongs to it ("%s: "), not to the fixed text.
        p = p.strip(" :,")
        if len(re.findall(r"[A-Za-z0-9]", p)) >= MIN_PIECE:
            out.append(p)
    return out


def test_source(src_dir, name):
    """The source file of a registered test, by kvferry's naming: python.<file>.<function> is
    tests/python/<file>.py, <suite>.[<variant>.]<case> is tests/<suite>.c."""
    parts = name.split(".")
    if parts[0] == "python" and len(parts) >= 3:
        path = os.path.join(src_dir, "tests", "python", parts[1] + ".py")
    else:
        path = os.path.join(src_dir, "tests", parts[0] + ".c")
    return path if os.path.isfile(path) else None


def registered_tests(args):
    if args["tests"]:
        with open(args["tests"]) as f:
            return {l.strip() for l in f if l.strip()}
    r = subprocess.run([args["ctest"], "--show-only=json-v1"], cwd=args["build"],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError("ctest --show-only=json-v1 in %s failed: %s" %
                           (args["build"], r.stderr.strip()))
    return {t["name"] for t in json.loads(r.stdout)["tests"]}


def check(src_dir, registered):
    """The list of violations; empty when the table keeps every rule."""
    with open(os.path.join(src_dir, DOC), encoding="utf-8") as f:
        found = tables(f.read())
    if found is None:
        return ["%s has no section \"%s\"" % (DOC, SECTION)]
    if len(found) != 1:
        return ["%s, \"%s\": %d tables, want exactly one (with a \"Produced by\" column)" %
                (DOC, SECTION[3:], len(found))]
    header, rows = found[0]
    try:
        col_line = header.index("Error line")
        col_test = header.index("Produced by")
    except ValueError:
        return ["%s, \"%s\": the table's header %s lacks \"Error line\" or \"Produced by\"" %
                (DOC, SECTION[3:], header)]
    if not rows:
        return ["%s, \"%s\": the table has no rows" % (DOC, SECTION[3:])]
    product = None
    errors = []
    for no, cells in rows:
        label = cells[col_line] if col_line < len(cells) else "|".join(cells)
        where = "%s:%d: row %s" % (DOC, no, label[:90] + ("..." if len(label) > 90 else ""))
        lines = quoted_lines(cells[col_line]) if col_line < len(cells) else []
        tests = backticked(cells[col_test]) if col_test < len(cells) else []
        if not lines:
            errors.append("%s: quotes no error line in backticks" % where)
            continue
        if not tests:
            errors.append("%s: names no test in its \"Produced by\" column" % where)
            continue
        test_lits, sources = [], []
        for t in tests:
            if t not in registered:
                errors.append("%s: \"Produced by\" names %s, which is not a registered CTest test"
                              % (where, t))
            path = test_source(src_dir, t)
            if path and path not in sources:
                sources.append(path)
                test_lits += file_literals(path)
        if not sources:
            errors.append("%s: no source file (tests/<suite>.c, tests/python/<file>.py) for %s"
                          % (where, ", ".join(tests)))
            continue
        names = ", ".join(os.path.relpath(p, src_dir) for p in sources)
        for line in lines:
            ps = pieces(line)
            if not ps:
                errors.append("%s: `%s` has no fixed text to look for" % (where, line))
                continue
            in_test = False
            for p in ps:
                if any(p in s for s in test_lits):
                    in_test = True
                    continue
                if product is None:
                    product = product_literals(src_dir)
                if not any(p in s for s in product):
                    errors.append("%s: the text \"%s\" of `%s` is in no string of %s nor of "
                                  "kvferry's sources" % (where, p, line, names))
            if not in_test:
                errors.append("%s: no fixed text of `%s` is in a string of %s: the test does not "
                              "check that line" % (where, line, names))
    return errors


def parse_args(argv):
    args = {"src": None, "ctest": None, "build": None, "tests": None}
    rest = list(argv[1:])
    while rest:
        a = rest.pop(0)
        if a == "--ctest" and len(rest) >= 2:
            args["ctest"], args["build"] = rest.pop(0), rest.pop(0)
        elif a == "--tests" and rest:
            args["tests"] = rest.pop(0)
        elif args["src"] is None and not a.startswith("--"):
            args["src"] = a
        else:
            return None
    if args["src"] is None or (args["ctest"] is None) == (args["tests"] is None):
        return None
    return args


def main(argv):
    args = parse_args(argv)
    if args is None:
        print("usage: " + __doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    errors = check(args["src"], registered_tests(args))
    for e in errors:
        print("check_troubleshooting: " + e)
    if errors:
        print("check_troubleshooting: %d violation(s); every row of the table names the test "
              "that produces its error line" % len(errors))
        return 1
    print("check_troubleshooting: every row of %s's troubleshooting table is produced by a "
          "registered test" % DOC)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
