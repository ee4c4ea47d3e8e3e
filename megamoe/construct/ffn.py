"""One dense SwiGLU FFN seen through a neuron partition: the plain-torch math every calibration step builds on.

    f = PartitionedFFN(gate_w [F, H], up_w [F, H], down_w [H, F], partition)
    h = f.hidden(x)                     # [T, F]  silu(x gate^T) * (x up^T), the down_proj input
    y = f.dense(x)                      # [T, H]  the dense FFN output  h down^T
    n = f.expert_norms(h)               # [T, E]  ||y_e||, y_e = h[:, idx_e] down[:, idx_e]^T
    y = f.moe(x, idx [T, k], w [T, k])  # [T, H]  sum_j w_tj y_{t, idx_tj}  (+ the residual block, always on)

`moe` is the converted MoE layer's output written as one masked dense product: neuron j of the dense FFN gets the
combine weight of the expert that holds it (m [T, F]), y = (h * m) down^T. For a disjoint partition this equals
running the k selected experts and summing their weighted outputs (what megamoe.moe.MoELayer computes; tested),
but it is one large GEMM instead of E small ones, and it is what the calibration steps below differentiate.

Expert output norms use each expert's Gram matrix K_e = down_e^T down_e [s_e, s_e]:
||y_te||^2 = h_te^T K_e h_te, so no [T, E, H] tensor is formed (cost T * F * s instead of T * F * H).

`pair_stats(x, target)` gives, per token, the quadratic form of the layer error in the combine weights:
A_t = [<y_te, y_te'>] [T, E, E], b_t = [<y_te, target_t - residual_t>] [T, E], c_t = ||target_t - residual_t||^2,
so that ||sum_e w_te y_te + residual_t - target_t||^2 = w_t^T A_t w_t - 2 w_t^T b_t + c_t for any weights w [T, E]:
the router, the score scale and the softmax temperature are then fitted without another pass over the FFN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megamoe.construct.partition import Partition, PartitionError

__all__ = ["PartitionedFFN", "combine_mask"]


def combine_mask(idx: torch.Tensor, w: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Dense [T, E] combine weights from top-k indices [T, k] and weights [T, k] (0 for unselected experts)."""
    out = torch.zeros(idx.shape[0], num_experts, dtype=w.dtype, device=w.device)
    return out.scatter_add_(1, idx, w)


class PartitionedFFN:
    """Dense FFN weights (any float dtype; used in fp32) + a Partition. Requires a disjoint partition (every neuron
    in at most one block), which every non-sharing method gives."""

    def __init__(self, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor, partition: Partition):
        f, h = gate_w.shape
        if tuple(up_w.shape) != (f, h) or tuple(down_w.shape) != (h, f):
            raise PartitionError(f"weights: gate {tuple(gate_w.shape)}, up {tuple(up_w.shape)}, down "
                                 f"{tuple(down_w.shape)} do not form one SwiGLU FFN")
        if partition.ffn_width != f:
            raise PartitionError(f"partition.ffn_width: {partition.ffn_width}, but the FFN has {f} neurons")
        if partition.duplicated:
            raise PartitionError(f"partition: {partition.duplicated} neurons sit in several blocks; calibration "
                                 "needs a disjoint partition (random, clustering, coactivation, gradient, sharing-inter "
                                 "with routed_rule='greedy')")
        self.part = partition
        self.gate, self.up, self.down = gate_w.float(), up_w.float(), down_w.float()
        self.E = partition.num_experts
        self.hidden_size, self.ffn_width = h, f
        self.sizes = partition.expert_sizes
        self.order = torch.as_tensor([j for e in partition.experts for j in e], dtype=torch.long)
        self.expert_of = torch.full((f,), -1, dtype=torch.long)
        for e, ix in enumerate(partition.experts):
            self.expert_of[torch.as_tensor(ix, dtype=torch.long)] = e
        self.residual = torch.as_tensor(partition.residual, dtype=torch.long)
        self.equal = len(set(self.sizes)) == 1
        self._gram = None

    # ---- the FFN ----
    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """h = silu(x gate^T) * (x up^T): [T, F] fp32."""
        x = x.float()
        return F.silu(x @ self.gate.T) * (x @ self.up.T)

    def dense(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        return (self.hidden(x) if h is None else h) @ self.down.T

    def residual_out(self, h: torch.Tensor) -> torch.Tensor | None:
        """The always-on block's output [T, H], or None without a residual block."""
        if not len(self.residual):
            return None
        return h[:, self.residual] @ self.down[:, self.residual].T

    def neuron_weights(self, comb: torch.Tensor) -> torch.Tensor:
        """Per-neuron weights [T, F] from dense combine weights [T, E] (1 for residual neurons, 0 for unassigned)."""
        m = torch.zeros(comb.shape[0], self.ffn_width, dtype=comb.dtype)
        has = self.expert_of >= 0
        m[:, has] = comb[:, self.expert_of[has]]
        if len(self.residual):
            m[:, self.residual] = 1.0
        return m

    def moe(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, h: torch.Tensor | None = None,
            down: torch.Tensor | None = None) -> torch.Tensor:
        """The MoE layer's output [T, H] for top-k indices [T, k] and combine weights [T, k] (score scale included).
        `down` replaces the dense down_proj (e.g. a reconstructed one)."""
        h = self.hidden(x) if h is None else h
        m = self.neuron_weights(combine_mask(idx, w.float(), self.E))
        return (h * m) @ (self.down if down is None else down).T

    # ---- per-expert quantities ----
    def gram(self) -> list:
        """K_e = down_e^T down_e [s_e, s_e] per expert (cached)."""
        if self._gram is None:
            self._gram = [self.down[:, ix].T @ self.down[:, ix] for ix in
                          (torch.as_tensor(e, dtype=torch.long) for e in self.part.experts)]
        return self._gram

    def expert_norms(self, h: torch.Tensor) -> torch.Tensor:
        """||y_te|| [T, E] with y_te = h[t, idx_e] down[:, idx_e]^T, via the Gram matrices."""
        hs = h[:, self.order]
        if self.equal:
            s = self.sizes[0]
            hb = hs.view(h.shape[0], self.E, s)
            k = torch.stack(self.gram())                                    # [E, s, s]
            q = (torch.bmm(hb.transpose(0, 1), k).transpose(0, 1) * hb).sum(-1)
        else:
            cols, a = [], 0
            for e, k in enumerate(self.gram()):
                b = a + self.sizes[e]
                he = hs[:, a:b]
                cols.append(((he @ k) * he).sum(-1))
                a = b
            q = torch.stack(cols, 1)
        return q.clamp_min(0).sqrt()

    def expert_outputs(self, h: torch.Tensor) -> torch.Tensor:
        """y_te [T, E, H] (memory T * E * H: use on chunks)."""
        out = torch.empty(h.shape[0], self.E, self.hidden_size)
        for e, ix in enumerate(self.part.experts):
            ix = torch.as_tensor(ix, dtype=torch.long)
            out[:, e] = h[:, ix] @ self.down[:, ix].T
        return out

    def pair_stats(self, x: torch.Tensor, target: torch.Tensor | None = None, chunk: int | None = None):
        """(A [T, E, E], b [T, E], c [T]) of the module docstring; target defaults to the dense output. Tokens go
        `chunk` at a time (default: a [chunk, E, H] block of about 64M values, 256 MB)."""
        chunk = chunk or max(1, (1 << 26) // (self.E * self.hidden_size))
        a_out, b_out, c_out = [], [], []
        for s in range(0, x.shape[0], chunk):
            xs = x[s:s + chunk]
            h = self.hidden(xs)
            t = self.dense(xs, h) if target is None else target[s:s + chunk].float()
            r = self.residual_out(h)
            if r is not None:
                t = t - r
            y = self.expert_outputs(h)                                      # [t, E, H]
            a_out.append(torch.bmm(y, y.transpose(1, 2)))
            b_out.append(torch.bmm(y, t.unsqueeze(-1)).squeeze(-1))
            c_out.append((t * t).sum(-1))
        return torch.cat(a_out), torch.cat(b_out), torch.cat(c_out)
