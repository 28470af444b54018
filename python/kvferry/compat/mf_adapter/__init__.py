"""kvferry's stand-in for MemFabric's `mf_adapter` (opt-in: on PYTHONPATH only from
`python3 -m kvferry compat-path`). See kvferry/_mf.py and docs/frameworks.md."""

from kvferry._mf import *  # noqa: F401,F403
from kvferry._mf import __all__  # noqa: F401
