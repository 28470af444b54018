"""Run one pytest node id as one CTest test.

Usage: run.py <path/to/test_file.py>::<test_name>

Exit codes follow CTest's conventions: 0 passed, 1 failed, 77 skipped. A test counts as skipped
only when pytest itself skipped it (for example torch is not installed) or when the module or
pytest cannot be imported at all; the reason is printed either way, so a skip is never silent.
"""

import os
import sys

SKIP = 77


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        import pytest
    except ImportError as e:
        print(f"SKIP: pytest is not installed for {sys.executable} ({e}); "
              "install python3-pytest (make deps)")
        return SKIP
    try:
        import kvferry  # noqa: F401
    except ImportError as e:
        print(f"SKIP: the kvferry module cannot be imported by {sys.executable} ({e}); "
              f"PYTHONPATH={os.environ.get('PYTHONPATH', '')!r}. Was it built (python3-dev "
              "installed, KVF_BUILD_PYTHON=ON)?")
        return SKIP

    class Outcomes:
        def __init__(self):
            self.passed = 0
            self.skipped = []

        def pytest_runtest_logreport(self, report):
            if report.passed and report.when == "call":
                self.passed += 1
            elif report.skipped:
                self.skipped.append(str(report.longrepr[-1]) if isinstance(report.longrepr, tuple)
                                    else str(report.longrepr))

    outcomes = Outcomes()
    # No cache directory and no bytecode in the source tree; -v shows what ran.
    rc = pytest.main(["-v", "-p", "no:cacheprovider", "-o", "console_output_style=classic",
                      sys.argv[1]], plugins=[outcomes])
    if rc != 0:
        return 1
    if outcomes.passed == 0 and outcomes.skipped:
        print("SKIP: " + "; ".join(sorted(set(outcomes.skipped))))
        return SKIP
    if outcomes.passed == 0:
        print("FAIL: no test ran")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
