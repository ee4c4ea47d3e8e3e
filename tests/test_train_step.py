"""The trainer's step (megatron DDP + megatron AdamW on torch's fused kernel + NaN-guarded clip/step + schedule, with
the fused loss and the single-rank grad sync) against a plain torch loop on a copy of the model: unfused loss,
loss.backward(), clip_grad_norm_, torch.optim.AdamW (single-tensor), weight decay only on >= 2-D parameters."""

import pytest
import torch

from megamoe.config import ModelConfig, MoEConfig, ParallelConfig

pytestmark = pytest.mark.usefixtures("world")


@pytest.mark.parametrize("clip", [1.0, 0.05])   # clipping inactive / active
def test_trainer_step_equals_plain_torch_adamw(clip):
    from megamoe import parallel
    from megamoe.model import LlamaMoEModel
    from megamoe.training.trainer import train_step
    from megamoe.training.config import OptimConfig
    from megamoe.training.optim import build_optimizer, wrap_model
    from megamoe.training.schedule import LRSchedule
    cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=64,
                      moe=MoEConfig(num_experts=4, top_k=2, router="mixtral", gate_network="linear",
                                    score_scale=1.0, balance_loss_weight=0.01)).validate()
    pcfg = ParallelConfig()
    parallel.initialize(pcfg, cfg)
    torch.manual_seed(0)
    model = LlamaMoEModel(cfg)
    ref = LlamaMoEModel(cfg)
    ref.load_state_dict(model.state_dict())
    ref.fused_lm_loss = False
    lr, wd, eps = 1e-2, 0.1, 1e-6
    ddp = wrap_model(model, cfg, pcfg, "fp32")
    opt = build_optimizer(ddp, OptimConfig(lr=lr, warmup_steps=0, weight_decay=wd, eps=eps,
                                                                     clip_grad=clip), pcfg, "fp32")
    inner = [o.optimizer for o in getattr(opt, "chained_optimizers", [opt])]
    assert all(g["fused"] for o in inner for g in o.param_groups)     # torch's fused AdamW kernel runs
    sched = LRSchedule(lr, 0, 100, 0.1, "constant", wd)
    decay = [p for p in ref.parameters() if p.dim() > 1]
    no_decay = [p for p in ref.parameters() if p.dim() <= 1]
    ref_opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=lr, betas=(0.9, 0.95), eps=eps, foreach=False)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        batch = torch.randint(0, cfg.vocab_size, (2, 17), generator=g)
        sched.apply(opt, step)
        out = train_step(ddp, opt, lambda: batch)
        assert out.ok
        ref_opt.zero_grad(set_to_none=True)
        r = ref(batch[:, :-1], labels=batch[:, 1:], return_logits=False)
        r.loss.backward()
        ref_gn = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        ref_opt.step()
        assert out.lm_loss + out.aux_loss == pytest.approx(float(r.loss), rel=1e-5, abs=1e-5)
        assert out.grad_norm == pytest.approx(float(ref_gn), rel=1e-4)
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            # Adam normalises each gradient: rounding differences in gradients near eps (an expert that got few
            # tokens) would move a weight by a good part of lr; eps = 1e-6 keeps such elements below 1e-3 lr
            torch.testing.assert_close(p.detach(), q.detach(), atol=1e-3 * lr, rtol=1e-4, msg=n)
