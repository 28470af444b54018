"""kvferry's stand-in for Mooncake's Python package: only ``mooncake.engine`` (opt-in: on
PYTHONPATH only from ``python3 -m kvferry compat-path``). See docs/frameworks.md.

If a real Mooncake is installed as well, this package is in front of it only because the caller
put it there; a warning says so once, with the way back (drop the directory from PYTHONPATH).
"""

import importlib.machinery
import os
import sys
import warnings

_here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_others = [p for p in sys.path if os.path.abspath(p or ".") != _here]
_real = importlib.machinery.PathFinder.find_spec("mooncake", _others)
if _real is not None and os.environ.get("KVFERRY_MOONCAKE_SHADOW_OK") != "1":
    warnings.warn(
        "kvferry's mooncake.engine (from %s, on PYTHONPATH by `python3 -m kvferry compat-path`) "
        "is hiding the Mooncake installed at %s; remove that directory from PYTHONPATH to use "
        "Mooncake itself (KVFERRY_MOONCAKE_SHADOW_OK=1 silences this)"
        % (_here, _real.origin or _real.submodule_search_locations),
        RuntimeWarning, stacklevel=2)
