"""Output projection + cross entropy in row chunks, without materialising the [T, V] logits.

    loss = linear_cross_entropy(x [T, H], weight [V, H], labels [T], weights [T] | None)
         = sum_t w_t * (logsumexp(x_t W^T) - (x_t W^T)[labels_t])          w_t = 1/T when weights is None

It computes what `vocab_parallel_cross_entropy(x @ W^T)` followed by a (masked) mean computes at TP = 1, but one
chunk of rows at a time: the chunk's logits (a few MiB, cache-resident on a CPU) are turned into the loss and, when a
gradient is needed, straight into the gradient of the logits, which is multiplied out at once:
grad_x = dL/dlogits @ W and grad_W += dL/dlogits^T @ x. Backward then only scales the stored gradients by the
incoming scalar. Same GEMMs as the unfused path (forward, dgrad, wgrad), but no 4-byte-per-logit buffer is
allocated, written, re-read by the softmax and kept for backward (at T = 2048, V = 8192: 64 MiB, several passes).

Because the per-token weights enter the weight gradient, the reduction (mean or masked mean) is part of the op: the
caller passes the weights, not a per-token loss. Softmax statistics and the loss are fp32 for half-precision
inputs (as the unfused path, which upcasts the logits), else in the input dtype; the GEMMs run in the input dtype,
the weight gradient is accumulated in that statistics dtype and returned in the weight's dtype. Labels must lie in
[0, V).
"""

from __future__ import annotations

import torch

__all__ = ["linear_cross_entropy", "chunk_rows"]

_CHUNK_ELEMENTS = 1 << 23       # logits per chunk for fp32 inputs (32 MiB); half-precision inputs take half as many
_MIN_CHUNK_ROWS = 512           # the weight gradient is accumulated once per chunk: a read and write of all of [V, H]


def chunk_rows(vocab: int, half: bool = False) -> int:
    """Rows per chunk: a budget of logits (cache-sized at small vocabularies), but at least 512 rows, or the
    per-chunk accumulation of the [V, H] weight gradient dominates at large vocabularies (V = 49152: 170-row chunks
    run 1.5x slower than 512-row ones on a CPU)."""
    budget = _CHUNK_ELEMENTS // 2 if half else _CHUNK_ELEMENTS
    return max(_MIN_CHUNK_ROWS, budget // max(1, vocab))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, tok_w, chunk: int, need_grad: bool):
        T = x.shape[0]
        V = weight.shape[0]
        acc = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32  # softmax / loss dtype
        direct = x.dtype == acc and weight.dtype == acc   # logits computed straight into a reused buffer
        loss = torch.zeros((), dtype=acc, device=x.device)
        tok_w = tok_w.to(acc)
        gx = torch.empty_like(x) if need_grad else None
        gw = torch.empty(weight.shape, dtype=acc, device=x.device) if need_grad else None
        if need_grad and T == 0:
            gw.zero_()
        buf = x.new_empty((min(chunk, T), V), dtype=acc) if T else None   # the chunk's fp32 (or fp64) logits
        wt = weight.t()
        for s in range(0, T, chunk):
            xc, yc, wc = x[s:s + chunk], labels[s:s + chunk, None], tok_w[s:s + chunk, None]
            n = xc.shape[0]
            if direct:
                lg = torch.mm(xc, wt, out=buf[:n])
            else:  # half-precision logits, upcast into the reused buffer (same-dtype ops: mixed ones are slow on a CPU)
                half = torch.mm(xc, wt)
                lg = buf[:n].copy_(half)
            tgt = lg.gather(1, yc)
            m = lg.amax(1, keepdim=True)
            lg.sub_(m).exp_()
            se = lg.sum(1, keepdim=True)
            loss += ((se.log() + m - tgt) * wc).sum()
            if need_grad:  # d loss / d logits = w_t * (softmax - onehot)
                lg.mul_(wc / se)
                lg.scatter_add_(1, yc, -wc)
                g = lg if direct else half.copy_(lg)         # half: the GEMMs run in the input dtype
                torch.mm(g, weight, out=gx[s:s + n])
                if direct:                                   # the first chunk initialises the weight gradient
                    torch.mm(g.t(), xc, out=gw) if s == 0 else gw.addmm_(g.t(), xc)
                else:  # half GEMM, accumulated in fp32 (upcast first: a mixed-dtype add_ is ~3x slower on a CPU)
                    if s == 0:
                        gw_half, gw_up = torch.empty_like(weight), torch.empty_like(gw)
                    torch.mm(g.t(), xc, out=gw_half)
                    gw.copy_(gw_half) if s == 0 else gw.add_(gw_up.copy_(gw_half))
        if need_grad:
            ctx.save_for_backward(gx, gw)
        ctx.w_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        gx, gw = ctx.saved_tensors
        return gx.mul_(grad_loss.to(gx.dtype)), gw.mul_(grad_loss.to(gw.dtype)).to(ctx.w_dtype), None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         weights: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """Scalar loss (fp32 for half inputs) sum_t w_t * CE(x_t W^T, labels_t); w_t = 1/T by default.
    x [T, H], weight [V, H], labels [T] int, weights [T] (e.g. loss_mask / loss_mask.sum())."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match")
    T = x.shape[0]
    labels = labels.reshape(-1)
    if labels.numel() != T:
        raise ValueError(f"linear_cross_entropy: {labels.numel()} labels for {T} rows")
    if weights is None:
        weights = torch.full((T,), 1.0 / max(T, 1), dtype=torch.float32, device=x.device)
    else:
        weights = weights.reshape(-1)
    need = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    chunk = chunk or chunk_rows(weight.shape[0], half=x.dtype in (torch.float16, torch.bfloat16))
    return _LinearCrossEntropy.apply(x.contiguous(), weight, labels.long().contiguous(), weights.contiguous(),
                                     int(chunk), need)
