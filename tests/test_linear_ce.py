"""The chunked projection + cross entropy (megamoe/ops/linear_ce.py) against plain torch (F.linear + F.cross_entropy),
and the model's fused loss path against its megatron lm_head + vocab-parallel cross-entropy path."""

import pytest
import torch
import torch.nn.functional as F

from megamoe.ops.linear_ce import linear_cross_entropy

pytestmark = pytest.mark.usefixtures("world")


def _reference(x, w, y, tok_w=None):
    logits = F.linear(x, w)
    per_tok = F.cross_entropy(logits if logits.dtype == torch.float64 else logits.float(), y, reduction="none")
    if tok_w is None:
        return per_tok.mean()
    return (per_tok * tok_w).sum()


@pytest.mark.parametrize("chunk", [None, 7, 16, 64, 1000])
@pytest.mark.parametrize("masked", [False, True])
def test_values_and_gradients_match_plain_torch(chunk, masked):
    g = torch.Generator().manual_seed(0)
    T, H, V = 53, 24, 97                                        # T not a multiple of the chunk
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    y = torch.randint(0, V, (T,), generator=g)
    tok_w = None
    if masked:
        m = (torch.rand(T, generator=g) > 0.4).double()
        tok_w = m / m.sum()
    xs, ws = [x.clone().requires_grad_() for _ in range(2)], [w.clone().requires_grad_() for _ in range(2)]
    ref = _reference(xs[0], ws[0], y, tok_w)
    out = linear_cross_entropy(xs[1], ws[1], y, tok_w, chunk=chunk)
    (2.5 * ref).backward()
    (2.5 * out).backward()                                      # a non-unit incoming gradient scales both
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, atol=1e-10, rtol=1e-7)
    torch.testing.assert_close(ws[1].grad, ws[0].grad, atol=1e-10, rtol=1e-7)


def test_fp32_buffer_path_and_no_grad():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 32, generator=g)
    w = torch.randn(513, 32, generator=g) * 0.1
    y = torch.randint(0, 513, (300,), generator=g)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = _reference(xr, wr, y)
    ref.backward()
    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = linear_cross_entropy(xf, wf, y, chunk=128)
    out.backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xf.grad, xr.grad, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(wf.grad, wr.grad, atol=1e-7, rtol=1e-4)
    with torch.no_grad():                                       # evaluation: loss only, nothing kept
        torch.testing.assert_close(linear_cross_entropy(xf, wf, y, chunk=128), ref.detach(), atol=1e-5, rtol=1e-5)
    out = linear_cross_entropy(x, w, y)                         # no input needs a gradient
    assert not out.requires_grad


def test_bf16_inputs_fp32_statistics():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 32, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(200, 32, generator=g) * 0.1).bfloat16().requires_grad_()
    y = torch.randint(0, 200, (64,), generator=g)
    out = linear_cross_entropy(x, w, y, chunk=16)
    assert out.dtype == torch.float32
    out.backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = _reference(xr, wr, y)
    ref.backward()
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-3)
    torch.testing.assert_close(w.grad.double(), wr.grad, atol=2e-4, rtol=2e-2)
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=2e-4, rtol=2e-2)


def test_chunk_rows_policy():
    from megamoe.ops.linear_ce import chunk_rows
    assert chunk_rows(8192) == 1024 and chunk_rows(8192, half=True) == 512   # a logits budget at small vocabularies
    assert chunk_rows(49152) == chunk_rows(49152, half=True) == 512           # never below 512 rows (weight-grad adds)
    assert chunk_rows(256) == 1 << 15


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 9), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("tied", [False, True])
def test_model_fused_loss_equals_megatron_path(tied):
    from megamoe.config import ModelConfig, MoEConfig
    from megamoe.model import LlamaMoEModel
    cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=tied,
                      moe=MoEConfig(num_experts=4, top_k=2, router="mixtral", gate_network="linear",
                                    score_scale=1.0, balance_loss_weight=0.01)).validate()
    torch.manual_seed(0)
    m = LlamaMoEModel(cfg)
    ids = torch.randint(0, 96, (3, 17))
    mask = (torch.rand(3, 16) > 0.3).long()
    for loss_mask in (None, mask):
        res = []
        for fused in (False, True):
            m.fused_lm_loss = fused
            m.zero_grad()
            out = m(ids[:, :-1], labels=ids[:, 1:], loss_mask=loss_mask, return_logits=False)
            out.loss.backward()
            assert out.logits is None
            res.append((out.lm_loss.detach(), out.aux_loss.detach(),
                        {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
        torch.testing.assert_close(res[1][0], res[0][0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(res[1][1], res[0][1])
        assert res[1][2].keys() == res[0][2].keys()
        for n in res[0][2]:
            torch.testing.assert_close(res[1][2][n], res[0][2][n], atol=1e-7, rtol=1e-4, msg=n)


def test_no_rows():
    x, w = torch.zeros(0, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    out = linear_cross_entropy(x, w, torch.zeros(0, dtype=torch.long))
    out.backward()
    assert float(out) == 0.0 and w.grad.abs().sum() == 0 and x.grad.shape == (0, 8)
