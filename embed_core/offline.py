"""The offline switch for `datasets`, called explicitly by every module that is about to load mteb (whose task
data is local here), never as a side effect of importing something else."""
from __future__ import annotations

import os
import sys


def prefer_datasets_offline() -> None:
    """Keep `datasets` off the network (the task data is local) unless the environment already decides.

    Only the *datasets* switch is set: the hub itself stays reachable for users who load backbones by
    hub id in the same process (HF_HUB_OFFLINE is the user's choice; the test suite sets it). Sets the
    variable before `datasets` is imported (it reads it at import time), and its module-level switch
    if it was imported earlier. An explicit ``HF_DATASETS_OFFLINE=0`` is respected.
    """
    explicit = "HF_DATASETS_OFFLINE" in os.environ
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None and not explicit:
        datasets_config.HF_DATASETS_OFFLINE = True
