"""The grouped expert computation (Experts.forward, one autograd node for all local experts) against a plain-torch
per-expert loop written here (values and gradients), with uneven widths, empty experts, bf16 and recompute."""

import pytest
import torch
import torch.nn.functional as F

from megamoe.moe.experts import Experts


def plain_loop(x, counts, experts):
    """Independent reference: y_e = (silu(x_e Wg^T) * (x_e Wu^T)) Wd^T per expert, concatenated."""
    outs, s = [], 0
    for e, n in zip(experts.local_ids, counts):
        ex = experts[e]
        r = x[s:s + n]
        outs.append((F.silu(r @ ex.gate_proj.weight.t()) * (r @ ex.up_proj.weight.t())) @ ex.down_proj.weight.t())
        s += n
    return torch.cat(outs)


def _grads(experts, x):
    return [x.grad] + [p.grad for p in experts.parameters()]


@pytest.mark.parametrize("sizes,local,counts", [
    ([32, 32, 32, 32], [0, 1, 2, 3], [7, 9, 5, 11]),           # equal widths
    ([48, 16, 40, 24], [0, 1, 2, 3], [7, 0, 13, 4]),           # LLaMA-MoE-style uneven widths, an empty expert
    ([20, 36, 28, 44], [2, 3], [0, 0]),                        # EP rank holding experts 2, 3; no tokens at all
    ([20, 36, 28, 44], [2, 3], [6, 1]),
])
def test_grouped_equals_plain_loop(sizes, local, counts):
    torch.manual_seed(0)
    H = 24
    ex = Experts(H, sizes, local, std=0.2)
    x0 = torch.randn(sum(counts), H)
    dy = torch.randn(sum(counts), H)
    outs, grads = [], []
    for fn in (lambda x: ex(x, counts), lambda x: plain_loop(x, counts, ex) if sum(counts) else x * 0):
        ex.zero_grad(set_to_none=False)
        x = x0.clone().requires_grad_()
        y = fn(x)
        y.backward(dy)
        outs.append(y.detach())
        grads.append([g.clone() if g is not None else None for g in _grads(ex, x)])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_reference_method_agrees():
    torch.manual_seed(1)
    ex = Experts(16, [8, 12, 4], [0, 1, 2], std=0.3)
    x = torch.randn(10, 16)
    torch.testing.assert_close(ex(x, [3, 3, 4]), ex.forward_reference(x, [3, 3, 4]))


def test_gradcheck_double():
    torch.manual_seed(2)
    ex = Experts(6, [4, 2, 3], [0, 1, 2], std=0.5).double()
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    ws = list(ex.parameters())

    def f(x, *w):
        return ex(x, [4, 0, 5])
    assert torch.autograd.gradcheck(f, (x, *ws))


def test_bf16_close_to_fp32_and_recompute():
    torch.manual_seed(3)
    ex = Experts(32, [16, 24], [0, 1], std=0.2)
    x = torch.randn(12, 32)
    ref = ex(x, [5, 7])
    exb = Experts(32, [16, 24], [0, 1], std=0.2).to(torch.bfloat16)
    exb.load_state_dict({k: v.to(torch.bfloat16) for k, v in ex.state_dict().items()})
    yb = exb(x.bfloat16(), [5, 7])
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), ref, atol=2e-2, rtol=2e-2)
    # activation recompute (torch.utils.checkpoint, as ModelConfig.recompute) gives the same gradients
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ex(xa, [5, 7]).square().sum().backward()
    ga = [p.grad.clone() for p in ex.parameters()]
    ex.zero_grad()
    torch.utils.checkpoint.checkpoint(lambda t: ex(t, [5, 7]), xb, use_reentrant=False).square().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)
    for a, p in zip(ga, ex.parameters()):
        torch.testing.assert_close(p.grad, a)


def test_counts_must_cover_the_rows():
    ex = Experts(8, [4, 4], [0, 1])
    with pytest.raises(ValueError):
        ex(torch.randn(5, 8), [2, 2])


def test_padded_counts_buckets():
    from megamoe.moe.experts import padded_counts
    counts = list(range(0, 3000))
    rows = padded_counts(counts)
    assert all(n <= r <= n + max(15, n // 8) for n, r in zip(counts, rows))   # at most 1/8 (or 15 rows) of padding
    assert rows[0] == 0
    assert len(set(padded_counts(range(400, 700)))) <= 8                      # few shapes around 512 tokens


def test_row_padding_is_exact(monkeypatch):
    """The CPU half-precision path pads each expert's rows with zeros (a few GEMM shapes for oneDNN). Forced on in
    fp64, it must give the unpadded values and gradients to rounding."""
    import megamoe.moe.experts as E
    torch.manual_seed(0)
    ex = Experts(24, [48, 16, 40, 24], [0, 1, 2, 3], std=0.2).double()
    counts = [37, 0, 101, 5]
    x0 = torch.randn(sum(counts), 24, dtype=torch.float64)
    dy = torch.randn(sum(counts), 24, dtype=torch.float64)
    outs = []
    for pad in (False, True):
        monkeypatch.setattr(E, "_pads_rows", lambda x, pad=pad: pad)
        ex.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        y = ex(x, counts)
        y.backward(dy)
        outs.append([y.detach(), x.grad] + [p.grad for p in ex.parameters()])
    assert E.padded_counts(counts) != tuple(counts)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
