"""Third-party chatter off, in one place: what a user sees in a normal run is unetkit's own output and progress.

Importing diffusers and torchao logs warnings that say nothing about the user's files: torchao's optional CUDA
extensions that cannot load on a CPU machine ("Failed to load ... _C_mxfp8"), diffusers' "Unable to import torchao
Tensor objects", torch's pytree deprecation notes about torchao's enums. Those libraries reset the levels of their
own top-level loggers while being imported, so the levels are set on the loggers that emit (a child logger keeps
its own level) and diffusers is told through its environment variable."""

from __future__ import annotations

import logging
import os
import warnings

#: loggers whose warnings at import time are noise for unetkit's users; -v shows them again
NOISY_LOGGERS = ("torchao", "torch", "torch.utils._pytree", "diffusers", "optimum", "numba")


def quiet_third_party() -> None:
    """Silence the import-time chatter of optional libraries (call before they are imported)."""
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
