"""kvferry's ``mooncake.engine``: Mooncake's TransferEngine API on kvferry (kvferry/_mooncake.py)."""

from kvferry._mooncake import *  # noqa: F401,F403
from kvferry._mooncake import __all__  # noqa: F401
