"""Dense SwiGLU FFN on megatron-core's tensor-parallel linears: down(silu(gate(x)) * up(x)).

gate/up are column-parallel, down row-parallel. It is the FFN of a dense decoder layer and the always-on shared
(residual) expert of an MoE layer.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from megamoe.config import ModelConfig
from megamoe.layers.init import init_normal


class MLP(nn.Module):
    """Dense SwiGLU FFN: down(silu(gate(x)) * up(x)), gate/up column-parallel, down row-parallel."""

    def __init__(self, cfg: ModelConfig, mp_cfg, width: int):
        super().__init__()
        H = cfg.hidden_size
        init = init_normal(cfg.init_std)
        col = dict(config=mp_cfg, init_method=init, bias=False, gather_output=False)
        self.gate_proj = ColumnParallelLinear(H, width, **col)
        self.up_proj = ColumnParallelLinear(H, width, **col)
        self.down_proj = RowParallelLinear(width, H, config=mp_cfg, bias=False, input_is_parallel=True, skip_bias_add=False,
                                           init_method=init_normal(cfg.init_std / math.sqrt(2 * cfg.num_layers)))

    def forward(self, x):
        g, _ = self.gate_proj(x)
        u, _ = self.up_proj(x)
        out, _ = self.down_proj(F.silu(g) * u)
        return out
