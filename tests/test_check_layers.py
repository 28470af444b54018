#!/usr/bin/env python3
"""scripts/check_layers.py finds what it is meant to find, on small made-up trees.

Each case writes a tree laid out like kvferry's (src/common, src/transport, src/core, tools, ...)
and, where the case is about calls, compiles its files into a CMake-like build directory, then
runs the checker and asserts its exit status and the violation it names. Run by CTest
(`check_layers_selftest`); needs cc and nm.
"""

import os
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKER = os.path.join(ROOT, "scripts", "check_layers.py")


def write(base, rel, text):
    path = os.path.join(base, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def compile_tree(src, build, files):
    """Compile each file to where CMake puts kvferry's objects (…/kvferry_obj.dir/<rel>.o)."""
    for rel in files:
        if rel.startswith("tools/"):
            obj_dir = os.path.join(build, "CMakeFiles", "kvferry_cli.dir")
        else:
            obj_dir = os.path.join(build, "CMakeFiles", "kvferry_obj.dir")
        obj = os.path.join(obj_dir, rel + ".o")
        os.makedirs(os.path.dirname(obj), exist_ok=True)
        subprocess.run(["cc", "-c", "-I", os.path.join(src, "src"), "-I",
                        os.path.join(src, "include"), os.path.join(src, rel), "-o", obj],
                       check=True)


def run_checker(*args):
    r = subprocess.run([sys.executable, CHECKER, *args], capture_output=True, text=True,
                       timeout=60)
    return r.returncode, r.stdout + r.stderr


class CheckLayers(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.src = os.path.join(self.tmp.name, "src-tree")
        self.build = os.path.join(self.tmp.name, "build")
        write(self.src, "include/kvferry.h", "int kvf_api(void);\n")

    def tearDown(self):
        self.tmp.cleanup()

    def check(self, files, compiled=True):
        """Write {path: text}, compile the .c files when the case is about calls, run the
        checker; returns (exit status, output)."""
        for rel, text in files.items():
            write(self.src, rel, text)
        if not compiled:
            return run_checker(self.src)
        compile_tree(self.src, self.build, [f for f in files if f.endswith(".c")])
        return run_checker(self.src, self.build)

    def assert_violation(self, files, *expected, compiled=True):
        rc, out = self.check(files, compiled)
        self.assertEqual(rc, 1, out)
        for text in expected:
            self.assertIn(text, out)

    def test_clean_tree_passes(self):
        rc, out = self.check({
            "src/common/a.h": "int kvf__a(void);\n",
            "src/common/a.c": '#include "common/a.h"\nint kvf__a(void) { return 1; }\n',
            "src/core/b.c": '#include "common/a.h"\n#include "kvferry.h"\n'
                            "int kvf_api(void) { return kvf__a(); }\n"})
        self.assertEqual(rc, 0, out)
        self.assertIn("clean", out)

    def test_upward_include_is_named(self):
        self.assert_violation({"src/core/engine.h": "int kvf__eng(void);\n",
                               "src/transport/t.c": '#include "core/engine.h"\n'},
                              'src/transport/t.c: #include "core/engine.h": includes a higher layer',
                              compiled=False)

    def test_tools_may_not_include_internal_headers(self):
        self.assert_violation({"src/common/common.h": "\n",
                               "tools/main.c": '#include "common/common.h"\n'},
                              "tools/main.c", "public API", compiled=False)

    def test_long_file_is_named(self):
        self.assert_violation({"src/common/big.c": "int x;\n" * 801},
                              "src/common/big.c: 801 lines", compiled=False)

    def test_two_files_calling_each_other_are_a_cycle(self):
        self.assert_violation(CYCLE, "files that call each other",
                              "src/core/x.c -> src/core/y.c (kvf__y)")

    def test_core_calling_a_transport_function_is_named(self):
        self.assert_violation({
            "src/transport/tcp.c": "int kvf__tcp_send(void) { return 0; }\n",
            "src/core/xfer.c": "int kvf__tcp_send(void);\n"
                               "int kvf__xfer(void) { return kvf__tcp_send(); }\n"},
            "the core calls a transport past its ops table")

    def test_tool_calling_an_internal_symbol_is_named(self):
        self.assert_violation({
            "src/common/t.c": "unsigned long kvf__now_ms(void) { return 0; }\n",
            "tools/main.c": "unsigned long kvf__now_ms(void);\n"
                            "int main(void) { return (int)kvf__now_ms(); }\n"},
            "tools/main.c -> src/common/t.c (kvf__now_ms)")

    def test_objects_of_deleted_sources_are_ignored(self):
        self.check(CYCLE)
        os.remove(os.path.join(self.src, "src/core/y.c"))
        rc, out = run_checker(self.src, self.build)
        self.assertEqual(rc, 0, out)


# Two files of one folder that call each other.
CYCLE = {"src/core/x.c": "int kvf__y(void);\nint kvf__x(void) { return kvf__y(); }\n",
         "src/core/y.c": "int kvf__x(void);\nint kvf__y(void) { return kvf__x(); }\n"}


if __name__ == "__main__":
    unittest.main()
