"""Weight initialisation shared by every block: normal(0, std) (megatron's init_method_normal)."""

from torch import nn


def init_normal(std: float):
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)
