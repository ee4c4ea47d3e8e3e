"""What the commands print: logging set up once per process (rank 0 at INFO, other ranks at WARNING), and the
library warnings that say nothing to a user (megatron without TE/apex, torch.distributed deprecations) silenced."""

from __future__ import annotations

import logging
import os
import warnings

__all__ = ["setup_logging", "quiet_library_warnings"]


def setup_logging():
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quiet_library_warnings()


def quiet_library_warnings():
    for mod in ("megatron", "torch.distributed", "megamoe.compat", "torch.utils.checkpoint"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=mod)
        warnings.filterwarnings("ignore", category=UserWarning, module=mod)
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*.grad attribute of a Tensor that is not a leaf.*")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    logging.getLogger("megatron.core").setLevel(logging.WARNING)


# filters first, at import: entry points import this module before megatron, whose imports warn
quiet_library_warnings()
