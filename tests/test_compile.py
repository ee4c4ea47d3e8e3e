"""torch.compile over the MoE compute: the fake (meta) kernels of our torch.ops.megamoe operators agree with the real
ones (torch.library.opcheck), the grouped expert path traces without a graph break, and the compiled MoE layer
gives the eager values and gradients.

Backend "aot_eager": dynamo + AOTAutograd on fake tensors (what needs the fake kernels and the traceable backward),
without inductor's C++ code generation, which takes minutes on the 2-core CI machine. bf16: torch's meta kernel
of grouped_mm accepts only bf16 (the CUDA kernel's dtype), although the CPU kernel runs fp32 too."""

import pytest
import torch
from test_grouped_experts import _moe_layer

from megamoe.moe.experts import Experts
from megamoe.ops import _ext
from megamoe.ops import permute as P

pytestmark = pytest.mark.skipif(not _ext.cpp_available(), reason="needs the C++ extension (megamoe._C)")


def _sample_ops():
    torch.manual_seed(0)
    idx = torch.tensor([[2, 0], [0, 1], [3, 3], [1, 2]])
    x = torch.randn(4, 8)
    rm = torch.ops.megamoe.row_map(idx, 4, 1, 2)[0]       # capacity 1 (drops), padded to multiples of 2
    w = torch.rand(4, 2)
    n = 8
    rows = torch.randn(n, 8)
    return [(torch.ops.megamoe.row_map.default, (idx, 4, -1, 1)),
            (torch.ops.megamoe.row_map.default, (idx, 4, 1, 2)),
            (torch.ops.megamoe.permute_rows.default, (x, rm, None, n, True)),
            (torch.ops.megamoe.permute_rows.default, (x, rm, w, n, True)),
            (torch.ops.megamoe.combine_rows.default, (rows, rm, None)),
            (torch.ops.megamoe.combine_rows.default, (rows, rm, w)),
            (torch.ops.megamoe.unpermute_backward.default, (torch.randn(4, 8), rows, rm, w))]


@pytest.mark.parametrize("case", range(7))
def test_fake_kernels_agree_with_the_real_ones(case):
    op, args = _sample_ops()[case]
    res = torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    assert set(res.values()) == {"SUCCESS"}, res


def _grads(*ts):
    return [t.grad.clone() for t in ts]


def test_grouped_experts_compile_without_graph_breaks():
    torch.manual_seed(1)
    ex = Experts(32, [16, 24, 8, 16], [0, 1, 2, 3], std=0.2, backend="grouped_mm").bfloat16()
    x = torch.randn(20, 32, dtype=torch.bfloat16, requires_grad=True)
    p = torch.rand(20, requires_grad=True)
    counts = torch.tensor([5, 0, 7, 8])

    def f(x, counts, p):
        return ex(x, counts, probs=p)
    torch._dynamo.reset()
    assert torch._dynamo.explain(f)(x, counts, p).graph_break_count == 0
    y = torch.compile(f, backend="aot_eager", fullgraph=True)(x, counts, p)
    y.float().square().sum().backward()
    got = [y.detach()] + _grads(x, p, ex.gate_up, ex.down)
    for t in (x, p, ex.gate_up, ex.down):
        t.grad = None
    y = f(x, counts, p)
    y.float().square().sum().backward()
    want = [y.detach()] + _grads(x, p, ex.gate_up, ex.down)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)    # the same kernels on the same inputs


def _layer_outputs(layer, fn, x0):
    layer.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_()
    y, aux = fn(x)
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().add(aux).backward()
    return [y.detach(), aux.detach(), x.grad] + [p.grad for p in layer.parameters() if p.grad is not None]


@pytest.mark.usefixtures("world")
@pytest.mark.parametrize("router,top_k,cf", [("mixtral", 2, 1.25), ("switch", 1, 1.0), ("mixtral", 2, None)])
def test_compiled_moe_layer_equals_eager(router, top_k, cf):
    """With a capacity and the experts padded to it (static shapes) the whole layer (router, permute, grouped
    experts, combine) is one graph; without a capacity it breaks only at the one host read (the permuted row count).
    Compiled and eager agree in the output, the balance loss and every gradient."""
    layer = _moe_layer(router, top_k, cf, dtype=torch.bfloat16)
    layer.experts.backend, layer.dispatcher.pad_to_capacity, layer.probs_in_experts = "grouped_mm", True, True
    torch.manual_seed(2)
    x0 = torch.randn(4, 6, 16, dtype=torch.bfloat16)

    def f(x):
        y, stats = layer(x)
        return y, stats.balance_loss
    eager = _layer_outputs(layer, f, x0)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(f)(x0)
    if cf is not None:
        assert explain.graph_break_count == 0, [r.reason[:200] for r in explain.break_reasons]
    else:
        assert explain.graph_break_count >= 1
        for r in explain.break_reasons:      # the host read in permute_tokens, seen from each calling frame
            assert "_local_scalar_dense" in r.reason and r.user_stack[-1].filename.endswith("permute.py"), r.reason
    torch._dynamo.reset()
    compiled = _layer_outputs(layer, torch.compile(f, backend="aot_eager", fullgraph=cf is not None), x0)
    assert len(compiled) == len(eager)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


def test_permute_ops_trace_into_one_graph():
    """permute to a capacity + unpermute (the C++ ops through their autograd functions) under fullgraph compile."""
    torch.manual_seed(3)
    idx = torch.randint(0, 4, (10, 2))
    w = torch.rand(10, 2, requires_grad=True)
    x = torch.randn(10, 8, requires_grad=True)

    def f(x, w):
        p = P.permute_to_capacity(x, idx, 4, 4)
        return P.unpermute(p.permuted * 2, p.row_map, w)
    torch._dynamo.reset()
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(x, w)
    out.square().sum().backward()
    got = [out.detach(), x.grad.clone(), w.grad.clone()]
    x.grad = w.grad = None
    ref = f(x, w)
    ref.square().sum().backward()
    for a, b in zip(got, [ref.detach(), x.grad, w.grad]):
        torch.testing.assert_close(a, b)


def test_fp32_experts_compile_on_the_loop():
    """fp32 on a CPU defaults to grouped_mm in eager mode, but torch's meta kernel of grouped_mm takes bf16 only:
    under torch.compile the default is the loop (a graph break at its host read of the counts), same values."""
    torch.manual_seed(4)
    ex = Experts(32, [16, 24], [0, 1], std=0.2)
    x = torch.randn(12, 32)
    counts = torch.tensor([5, 7])
    assert ex.select_backend(x) == "grouped_mm"
    torch._dynamo.reset()
    y = torch.compile(lambda x, c: ex(x, c), backend="aot_eager")(x, counts)
    torch.testing.assert_close(y, ex(x, counts))
    ex.backend = "grouped_mm"
    with pytest.raises(Exception, match="bf16 only"):
        torch._dynamo.reset()
        torch.compile(lambda x, c: ex(x, c), backend="aot_eager", fullgraph=True)(x, counts)
