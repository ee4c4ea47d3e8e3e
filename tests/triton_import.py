"""Import the Triton gating kernels for the tests: natively with CUDA, in the Triton interpreter on a CPU machine.

TRITON_INTERPRET is read when @triton.jit decorates the kernels, i.e. at import: without CUDA the variable is set
just around the import and restored afterwards, so that other test modules keep the plain-torch path."""

import os

import torch


def import_topk_gating():
    """megamoe.kernels.topk_gating, or None when triton is missing."""
    cuda = torch.cuda.is_available()
    prev = os.environ.get("TRITON_INTERPRET")
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        from megamoe.kernels import topk_gating
        return topk_gating
    except ImportError:
        return None
    finally:
        if not cuda:
            if prev is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = prev
