"""``python3 -m kvferry compat-path``: the directory to put on PYTHONPATH for the drop-in
``mf_adapter``, ``memfabric_hybrid`` and ``mooncake.engine`` packages (docs/frameworks.md).

They are opt-in on purpose: a package named ``mooncake`` must never hide a real Mooncake
installation by accident. The path is printed on stdout; a note on stderr names each real
installation the directory would hide.
"""

import importlib.machinery
import os
import sys

COMPAT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compat")
NAMES = ("mf_adapter", "memfabric_hybrid", "mooncake")


def compat_path():
    for name in NAMES:
        spec = importlib.machinery.PathFinder.find_spec(name, [p for p in sys.path if p])
        if spec is not None and not (spec.origin or "").startswith(COMPAT):
            where = spec.origin or list(spec.submodule_search_locations or [])
            print(f"kvferry: note: {name} is installed at {where}; with this directory first on "
                  f"PYTHONPATH kvferry's {name} is used instead", file=sys.stderr)
    print(COMPAT)
    return 0


def main(argv):
    if argv[1:2] == ["compat-path"] and len(argv) == 2:
        return compat_path()
    print("usage: python3 -m kvferry compat-path\n\n"
          "Print the directory holding kvferry's mf_adapter, memfabric_hybrid and mooncake.engine\n"
          "packages; put it on PYTHONPATH to run SGLang or vLLM on kvferry:\n\n"
          "    export PYTHONPATH=$(python3 -m kvferry compat-path):$PYTHONPATH",
          file=sys.stderr)
    return 0 if argv[1:2] in (["-h"], ["--help"]) else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
