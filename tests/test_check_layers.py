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

    def test_clean_tree_passes(self):
        write(self.src, "src/common/a.h", "int kvf__a(void);\n")
        write(self.src, "src/common/a.c", '#include "common/a.h"\nint kvf__a(void) { return 1; }\n')
        write(self.src, "src/core/b.c",
              '#include "common/a.h"\n#include "kvferry.h"\nint kvf_api(void) { return kvf__a(); }\n')
        compile_tree(self.src, self.build, ["src/common/a.c", "src/core/b.c"])
        rc, out = run_checker(self.src, self.build)
        self.assertEqual(rc, 0, out)
        self.assertIn("clean", out)

    def test_upward_include_is_named(self):
        write(self.src, "src/core/engine.h", "int kvf__eng(void);\n")
        write(self.src, "src/transport/t.c", '#include "core/engine.h"\n')
        rc, out = run_checker(self.src)
        self.assertEqual(rc, 1, out)
        self.assertIn('src/transport/t.c: #include "core/engine.h": includes a higher layer', out)

    def test_tools_may_not_include_internal_headers(self):
        write(self.src, "src/common/common.h", "\n")
        write(self.src, "tools/main.c", '#include "common/common.h"\n')
        rc, out = run_checker(self.src)
        self.assertEqual(rc, 1, out)
        self.assertIn("tools/main.c", out)
        self.assertIn("public API", out)

    def test_long_file_is_named(self):
        write(self.src, "src/common/big.c", "int x;\n" * 801)
        rc, out = run_checker(self.src)
        self.assertEqual(rc, 1, out)
        self.assertIn("src/common/big.c: 801 lines", out)

    def test_two_files_calling_each_other_are_a_cycle(self):
        write(self.src, "src/core/x.c", "int kvf__y(void);\nint kvf__x(void) { return kvf__y(); }\n")
        write(self.src, "src/core/y.c", "int kvf__x(void);\nint kvf__y(void) { return kvf__x(); }\n")
        compile_tree(self.src, self.build, ["src/core/x.c", "src/core/y.c"])
        rc, out = run_checker(self.src, self.build)
        self.assertEqual(rc, 1, out)
        self.assertIn("files that call each other", out)
        self.assertIn("src/core/x.c -> src/core/y.c (kvf__y)", out)

    def test_core_calling_a_transport_function_is_named(self):
        write(self.src, "src/transport/tcp.c", "int kvf__tcp_send(void) { return 0; }\n")
        write(self.src, "src/core/xfer.c",
              "int kvf__tcp_send(void);\nint kvf__xfer(void) { return kvf__tcp_send(); }\n")
        compile_tree(self.src, self.build, ["src/transport/tcp.c", "src/core/xfer.c"])
        rc, out = run_checker(self.src, self.build)
        self.assertEqual(rc, 1, out)
        self.assertIn("the core calls a transport past its ops table", out)

    def test_tool_calling_an_internal_symbol_is_named(self):
        write(self.src, "src/common/t.c", "unsigned long kvf__now_ms(void) { return 0; }\n")
        write(self.src, "tools/main.c",
              "unsigned long kvf__now_ms(void);\nint main(void) { return (int)kvf__now_ms(); }\n")
        compile_tree(self.src, self.build, ["src/common/t.c", "tools/main.c"])
        rc, out = run_checker(self.src, self.build)
        self.assertEqual(rc, 1, out)
        self.assertIn("tools/main.c -> src/common/t.c (kvf__now_ms)", out)

    def test_objects_of_deleted_sources_are_ignored(self):
        write(self.src, "src/core/x.c", "int kvf__y(void);\nint kvf__x(void) { return kvf__y(); }\n")
        write(self.src, "src/core/y.c", "int kvf__x(void);\nint kvf__y(void) { return kvf__x(); }\n")
        compile_tree(self.src, self.build, ["src/core/x.c", "src/core/y.c"])
        os.remove(os.path.join(self.src, "src/core/y.c"))
        rc, out = run_checker(self.src, self.build)
        self.assertEqual(rc, 0, out)


if __name__ == "__main__":
    unittest.main()
