"""kvferry: a transfer engine for disaggregated LLM inference.

The seed's (MemFabric mf_adapter) Python API, so that porting is an import change::

    from kvferry import TransferEngine, create_config_store, set_log_level

See docs/python.md for every function, its arguments and its return values.
"""

from ._kvferry import *  # noqa: F401,F403  (the extension defines __all__-worthy names only)
from ._kvferry import (  # noqa: F401
    Error,
    Store,
    StoreServer,
    TransferEngine,
    __version__,
    create_config_store,
    err_name,
    get_last_err_msg,
    set_conf_store_tls,
    set_conf_store_tls_key,
    set_log_level,
    strerror,
)

__all__ = [
    "TransferEngine",
    "Store",
    "StoreServer",
    "Error",
    "create_config_store",
    "set_log_level",
    "set_conf_store_tls",
    "set_conf_store_tls_key",
    "get_last_err_msg",
    "strerror",
    "err_name",
]
__all__ += [name for name in dir() if name.startswith("KVF_")]
