"""The MoE layer gives the same output, balance loss and gradients whichever kernel path runs.

Reference: MEGAMOE_PERMUTE_BACKEND=torch, MEGAMOE_GATING_BACKEND=torch and MEGAMOE_EXPERTS_BACKEND=loop. Against it:
the C++ permute/unpermute, the Triton gating kernel (interpreted on CPU, native with CUDA), both together, and the
grouped_mm experts (stacked weights, torch's grouped GEMM; CPU: this layer is fp32), for the three
routers (llama-moe noisy top-k in training, so noise, thresholds and Shazeer's load estimate take part; Mixtral;
switch with capacity and token dropping), with a residual expert and uneven expert sizes; and the dense experts
(every expert on every token, weighted by the routing, no dispatch).
"""

import pytest
import torch

from triton_import import import_topk_gating

HAS_CUDA = torch.cuda.is_available()
K = import_topk_gating()   # interpreted on a CPU machine (TRITON_INTERPRET=1 around the import only), or None

from megamoe.config import ModelConfig, MoEConfig  # noqa: E402
from megamoe.parallel import megatron_config  # noqa: E402
from megamoe.moe.layer import MoELayer  # noqa: E402
from megamoe.ops import _ext  # noqa: E402
from megamoe.ops import gating as G  # noqa: E402
from megamoe.ops import permute as P  # noqa: E402

pytestmark = pytest.mark.usefixtures("world")

H, E, T = 32, 8, 77
TRITON_OK = K is not None and (K.INTERPRETED or HAS_CUDA)
PATHS = [   # (permute, gating, experts); the reference: torch, torch, loop
    ("cpp", "torch", "loop"),
    ("torch", "triton", "loop"),
    ("cpp", "triton", "loop"),
    ("cpp", "torch", "grouped_mm"),
    ("torch", "torch", "dense"),      # every expert on every token, weighted (no dispatch)
]


def _layer(router, top_k, cf, device):
    cfg = ModelConfig(vocab_size=32, hidden_size=H, intermediate_size=E * 8, num_layers=1, num_heads=2,
                      moe=MoEConfig(num_experts=E, top_k=top_k, router=router, gate_network="mlp", noise=True,
                                    capacity_factor=cf, score_scale=1.5, gate_init_std=0.5, residual_size=16,
                                    expert_sizes=[8, 8, 4, 12, 8, 8, 8, 8], z_loss_weight=1e-3))
    torch.manual_seed(0)
    layer = MoELayer(cfg, megatron_config(cfg), 0).to(device).train()
    return layer


def _run(monkeypatch, layer, x, permute_backend, gating_backend, experts_backend="loop"):
    monkeypatch.setenv("MEGAMOE_PERMUTE_BACKEND", permute_backend)
    monkeypatch.setenv("MEGAMOE_GATING_BACKEND", gating_backend)
    monkeypatch.setenv("MEGAMOE_EXPERTS_BACKEND", experts_backend)
    assert P.select_backend(x.device) == permute_backend and G.select_backend(x.device) == gating_backend
    layer.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    torch.manual_seed(123)  # same router noise on every path
    y, stats = layer(xi)
    loss = (y.float() * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum()
    loss = loss + 10 * stats.balance_loss + stats.z_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), stats, xi.grad, grads


@pytest.mark.parametrize("permute_backend,gating_backend,experts_backend", PATHS)
@pytest.mark.parametrize("router,top_k,cf", [("topk_noisy", 2, None), ("mixtral", 2, None), ("switch", 1, 1.0),
                                             ("topk_noisy", 4, 0.75)])
def test_moe_layer_same_on_every_path(monkeypatch, router, top_k, cf, permute_backend, gating_backend,
                                      experts_backend):
    if permute_backend == "cpp" and not _ext.cpp_available():
        pytest.skip("megamoe._C not built")
    if gating_backend == "triton" and not TRITON_OK:
        pytest.skip("Triton interpreter unavailable")
    device = "cuda" if HAS_CUDA else "cpu"
    if HAS_CUDA and permute_backend == "cpp":
        permute_backend = "cuda"
    layer = _layer(router, top_k, cf, device)
    x = torch.randn(T, 1, H, device=device)
    y0, s0, gx0, g0 = _run(monkeypatch, layer, x, "torch", "torch")
    if HAS_CUDA and experts_backend == "grouped_mm":   # CUDA grouped_mm takes bf16 only: the loop for this fp32 layer
        experts_backend = "loop"
    y1, s1, gx1, g1 = _run(monkeypatch, layer, x, permute_backend, gating_backend, experts_backend)
    tol = dict(atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(y1, y0, **tol)
    assert torch.equal(s1.tokens_per_expert, s0.tokens_per_expert)
    assert int(s1.num_dropped) == int(s0.num_dropped)
    if cf is not None:
        assert int(s0.num_dropped) > 0  # the capacity path is exercised
    torch.testing.assert_close(s1.balance_loss, s0.balance_loss, **tol)
    torch.testing.assert_close(gx1, gx0, **tol)
    assert g1.keys() == g0.keys() and any("router" in n for n in g0) and any("experts" in n for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], **tol, msg=lambda m, n=n: f"grad of {n}: {m}")
