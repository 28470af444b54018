"""`python3 -m mf_adapter.launch_ascend_mf_store`: the config store at $ASCEND_MF_STORE_URL."""

import sys

from kvferry._mf import launch_store_main

if __name__ == "__main__":
    sys.exit(launch_store_main())
