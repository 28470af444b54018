#!/usr/bin/env python3
"""scripts/check_troubleshooting.py finds what it is meant to find, on small made-up trees.

Each case writes a tree with a docs/operations.md whose "## Troubleshooting" table it varies, a
C test, a Python test and a library source, and a list of registered tests; then runs the checker
and asserts its exit status and the row and rule it names. Run by CTest
(`check_troubleshooting_selftest`).
"""

import os
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKER = os.path.join(ROOT, "scripts", "check_troubleshooting.py")

HEADER = ("## Troubleshooting\n\nSome prose.\n\n| Error line | Cause and fix | Produced by |\n"
          "|---|---|---|\n")
# A message the library builds from a format string, and the C test that asserts it whole, the
# literal wrapped over two lines as clang-format leaves it.
LIB_C = ('int f(void) { return kvf__err(-1, "session id %s is already in use: another engine "\n'
         '                             "holds port %u", sid, port); }\n')
TEST_C = ('static void in_use(void **state) {\n'
          '    snprintf(want, sizeof(want), "session id %s is already in use: another engine "\n'
          '             "holds port %s", sid, port); /* "a comment is not a string" */\n'
          '}\n')
TEST_PY = ('def test_wrong_python():\n'
           '    assert ("kvferry cannot be imported by %s (Python "\n'
           '            "%s)" % (a, b)) in err\n')
GOOD_ROWS = [
    "| `session id IP:PORT is already in use: another engine holds port PORT` | fix | "
    "`test_x.in_use` |",
    "| `kvferry cannot be imported by /path/python3 (Python X.Y.Z): ...` (from kvf_x) | fix | "
    "`python.test_y.test_wrong_python`, `test_x.tcp.in_use` |",
]
REGISTERED = ["test_x.in_use", "test_x.tcp.in_use", "python.test_y.test_wrong_python"]


def write(base, rel, text):
    path = os.path.join(base, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


class CheckTroubleshooting(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.src = os.path.join(self.tmp.name, "tree")
        write(self.src, "src/core/engine.c", LIB_C)
        write(self.src, "tests/test_x.c", TEST_C)
        write(self.src, "tests/python/test_y.py", TEST_PY)
        self.tests = os.path.join(self.tmp.name, "tests.txt")
        write(self.tmp.name, "tests.txt", "\n".join(REGISTERED) + "\n")

    def tearDown(self):
        self.tmp.cleanup()

    def check(self, rows, before=HEADER, after="\n## Next\n\n| a | b |\n|---|---|\n| x | y |\n"):
        write(self.src, "docs/operations.md",
              "# Operations\n\n" + before + "\n".join(rows) + "\n" + after)
        r = subprocess.run([sys.executable, CHECKER, self.src, "--tests", self.tests],
                           capture_output=True, text=True, timeout=60)
        return r.returncode, r.stdout + r.stderr

    def assert_fails(self, rows, *needles, **kw):
        rc, out = self.check(rows, **kw)
        self.assertEqual(rc, 1, out)
        for n in needles:
            self.assertIn(n, out)

    def test_clean_table_passes(self):
        rc, out = self.check(GOOD_ROWS)
        self.assertEqual(rc, 0, out)

    def test_row_without_test(self):
        self.assert_fails(GOOD_ROWS + ["| `session id IP:PORT is already in use` | fix | |"],
                          "operations.md:11: row `session id IP:PORT is already in use`",
                          "names no test")

    def test_unregistered_test(self):
        self.assert_fails([GOOD_ROWS[0].replace("test_x.in_use", "test_x.in_uze")],
                          "names test_x.in_uze, which is not a registered CTest test")

    def test_text_nowhere(self):
        self.assert_fails([GOOD_ROWS[0].replace("another engine", "another program")],
                          "row `session id IP:PORT is already in use: another program",
                          "the text \"is already in use: another program holds port\"",
                          "is in no string of tests/test_x.c nor of kvferry's sources")

    def test_text_only_in_the_library_is_not_checked_by_the_test(self):
        write(self.src, "tests/test_x.c", "static void in_use(void **state) {}\n")
        self.assert_fails(GOOD_ROWS[:1], "is in a string of tests/test_x.c: the test does not "
                          "check that line")

    def test_symptom_row_quotes_no_line(self):
        self.assert_fails(["| a batch never completes (`kvf_batch_wait`) | fix | `test_x.in_use` |"],
                          "quotes no error line")

    def test_two_tables(self):
        self.assert_fails(GOOD_ROWS, "2 tables, want exactly one",
                          before=HEADER + GOOD_ROWS[0] + "\n\nMore prose.\n\n"
                          "| Symptom | Cause |\n|---|---|\n")

    def test_table_without_produced_by(self):
        self.assert_fails(["| `x y z` | fix |"], "lacks \"Error line\" or \"Produced by\"",
                          before="## Troubleshooting\n\n| Error line | Cause and fix |\n|---|---|\n")


if __name__ == "__main__":
    unittest.main()
