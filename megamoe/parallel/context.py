"""Context parallelism (CP): each sequence split over the cp ranks of a CP group, attention as ring attention.

Load-balanced split (as megatron's get_batch_on_this_cp_rank): the sequence of length S is cut into 2*cp chunks of
S/(2cp) tokens; CP rank r holds chunks r and 2cp-1-r, so every rank gets the same share of the causal work (an early
chunk sees few keys, a late one many).

    idx = local_positions(S)             # [S/cp] global token positions this rank holds, in order
    x_local = x[:, idx]                  # tokens, labels, masks, position and segment ids are sliced alike

Ring attention (`ring_attention`, our own: megatron-core's CP runs only inside transformer-engine's attention, which
has no CPU path): the local queries attend to every rank's keys and values; the K/V blocks travel around the CP
ring (cp - 1 send/recv steps to the next rank; `_RingStep`), and each block's scores are folded into the output
with the online softmax (running max m, normaliser l, unnormalised output o):

    s_j = q k_j^T / sqrt(d), masked by the rule of megamoe.layers.attention.attention_mask (same segment, key
          position <= query position) on GLOBAL positions
    m' = max(m, rowmax s_j);  l' = l e^{m - m'} + rowsum e^{s_j - m'};  o' = o e^{m - m'} + e^{s_j - m'} v_j
    out = o / l

The backward is autograd through those ops: each ring step's backward sends the gradient of the block it received
back to the rank it came from (the ring in reverse), where it adds to that rank's own gradient, so every rank ends
with the full gradient of its local K/V. Memory: the scores of the local queries against each block are kept for
the backward (like attention without a fused kernel): S/cp x S per head in total. Loss: each rank sums the loss of
its tokens over the global token count and the sum is all-reduced over CP (megamoe/model/llama.py).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

__all__ = ["cp_size", "cp_rank", "cp_group", "local_positions", "RingContext", "ring_attention",
           "ring_attention_reference"]


def cp_size() -> int:
    return ps.get_context_parallel_world_size() if ps.model_parallel_is_initialized() else 1


def cp_rank() -> int:
    return ps.get_context_parallel_rank() if cp_size() > 1 else 0


def cp_group():
    return ps.get_context_parallel_group()


def local_positions(seq_len: int, cp: int | None = None, rank: int | None = None, device=None) -> torch.Tensor:
    """Global positions [seq_len / cp] held by CP rank `rank`: chunks rank and 2cp-1-rank of 2cp equal chunks."""
    cp = cp_size() if cp is None else cp
    rank = cp_rank() if rank is None else rank
    if seq_len % (2 * cp):
        raise ValueError(f"context parallelism: sequence length {seq_len} does not split into 2 * cp = {2 * cp} "
                         "chunks")
    c = seq_len // (2 * cp)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange((2 * cp - 1 - rank) * c,
                                                                           (2 * cp - rank) * c)]).to(device)


class _RingStep(torch.autograd.Function):
    """Forward: send x to the next CP rank, receive the previous rank's. Backward: the reverse (the gradient goes
    back to the rank the block came from)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _exchange(x, group, +1)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.group, -1), None


def _exchange(x: torch.Tensor, group, direction: int) -> torch.Tensor:
    n, r = dist.get_world_size(group), dist.get_rank(group)
    dst = dist.get_global_rank(group, (r + direction) % n)
    src = dist.get_global_rank(group, (r - direction) % n)
    x = x.contiguous()
    out = torch.empty_like(x)
    reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, x, dst, group), dist.P2POp(dist.irecv, out, src, group)])
    for q in reqs:
        q.wait()
    return out


class RingContext:
    """The CP layout of one forward (built once by the model, shared by every attention layer): the group and the
    positions / segments of the key blocks in ring order (block i came from CP rank r - i)."""

    def __init__(self, group, positions: torch.Tensor, segments: torch.Tensor):
        self.group = group
        self.key_blocks = [(positions, segments)]
        pos, seg = positions, segments
        for _ in range(dist.get_world_size(group) - 1):   # no gradient: positions and segments are data
            pos, seg = _exchange(pos, group, +1), _exchange(seg, group, +1)
            self.key_blocks.append((pos, seg))


def _block_mask(q_pos, q_seg, k_pos, k_seg) -> torch.Tensor:
    """bool [B, Sq, Sk]: same segment and key position <= query position (megamoe.layers.attention's rule)."""
    return (q_seg[:, :, None] == k_seg[:, None, :]) & (k_pos[:, None, :] <= q_pos[:, :, None])


def ring_attention(q, k, v, q_pos, q_seg, ring: RingContext) -> torch.Tensor:
    """q [B, h, Sq, d], k / v [B, n_kv, Sk, d] (this rank's tokens, after RoPE), q_pos / q_seg [B, Sq] -> [B, h, Sq, d]
    (at least fp32 inside). GQA: query head i uses KV head i // (h / n_kv)."""
    B, h, Sq, d = q.shape
    n_kv = k.shape[1]
    g = h // n_kv
    dt = q.dtype
    ct = torch.promote_types(dt, torch.float32)                            # fp32 (fp64 stays fp64)
    qf = q.to(ct).view(B, n_kv, g, Sq, d) * (1.0 / math.sqrt(d))
    kv = torch.cat([k.to(ct), v.to(ct)], dim=-1)                           # [B, n_kv, Sk, 2d]: one exchange per step
    m = l_ = o = None
    for i, (k_pos, k_seg) in enumerate(ring.key_blocks):
        if i > 0:
            kv = _RingStep.apply(kv, ring.group)
        kb, vb = kv[..., :d], kv[..., d:]
        s = torch.einsum("bkgqd,bknd->bkgqn", qf, kb)                     # [B, n_kv, g, Sq, Sk]
        mask = _block_mask(q_pos, q_seg, k_pos, k_seg)[:, None, None]
        s = s.masked_fill(~mask, float("-inf"))
        blk_max = s.amax(-1, keepdim=True).detach()
        m_new = blk_max if m is None else torch.maximum(m, blk_max)
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - m_safe)
        pv = torch.einsum("bkgqn,bknd->bkgqd", p, vb)
        if m is None:
            l_, o = p.sum(-1, keepdim=True), pv
        else:
            alpha = torch.exp(m - m_safe)
            l_, o = l_ * alpha + p.sum(-1, keepdim=True), o * alpha + pv
        m = m_new
    out = o / l_.clamp_min(1e-30)
    return out.reshape(B, h, Sq, d).to(dt)


@torch.no_grad()
def ring_attention_reference(q, k, v, q_pos, q_seg, k_pos, k_seg) -> torch.Tensor:
    """Plain softmax attention of q against ALL keys (k/v [B, n_kv, S, d] with their positions / segments), under the
    same mask rule: what ring_attention must equal (tests)."""
    B, h, Sq, d = q.shape
    g = h // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1).double(), v.repeat_interleave(g, 1).double()
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(d)
    s = s.masked_fill(~_block_mask(q_pos, q_seg, k_pos, k_seg)[:, None], float("-inf"))
    return (s.softmax(-1) @ vv).to(q.dtype)
