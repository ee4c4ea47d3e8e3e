"""Training checkpoints (megatron dist-checkpointing, model + optimizer) written by the former per-expert expert
modules load into the stacked experts: bit-exact weights, and the optimizer state is the same (the next updates
agree with the run that wrote the checkpoint, continued in the old layout). With the plain and the distributed
optimizer, fp32 and bf16 (mixed precision: fp32 main weights)."""

import pytest
import torch
from test_grouped_experts import LegacyExperts

from megamoe import parallel
from megamoe.config import ModelConfig, MoEConfig, ParallelConfig
from megamoe.model import LlamaMoEModel
from megamoe.training.checkpoint import CheckpointManager
from megamoe.training.config import OptimConfig
from megamoe.training.optim import build_optimizer, wrap_model
from megamoe.training.schedule import LRSchedule
from megamoe.training.trainer import train_step

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = [24, 8, 16, 16]


class _Legacy(LegacyExperts):
    def forward(self, x, counts, probs=None):
        assert probs is None
        return super().forward(x, counts)


def _cfg(dtype):
    return ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=64, num_layers=2, num_heads=2,
                       params_dtype=dtype, moe=MoEConfig(num_experts=4, top_k=2, router="mixtral",
                                                         gate_network="linear", expert_sizes=SIZES))


def _setup(cfg, precision, distopt, legacy):
    pcfg = ParallelConfig(distributed_optimizer=distopt)
    parallel.initialize(pcfg, cfg)
    torch.manual_seed(0)
    model = LlamaMoEModel(cfg)
    model.train()
    for layer in model.layers:
        layer.mlp.probs_in_experts = False
    if legacy:                       # the former layout, same weights (the same seed draws the same numbers)
        for layer in model.layers:
            new = layer.mlp.experts
            torch.manual_seed(0)
            old = _Legacy(16, SIZES, new.local_ids, dtype=new.gate_up.dtype)
            old.load_state_dict(new.state_dict(), strict=True)
            for p in old.parameters():
                p.allreduce, p.tensor_model_parallel = False, True
            layer.mlp.experts = old
    ddp = wrap_model(model, cfg, pcfg, precision)
    opt = build_optimizer(ddp, OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1, clip_grad=1.0), pcfg,
                          precision)
    return model, ddp, opt, LRSchedule(1e-2, 0, 100, 0.1, "constant", 0.1)


def _step(ddp, opt, sched, batch, i):
    sched.apply(opt, i)
    r = train_step(ddp, opt, lambda: batch)
    return r.lm_loss


@pytest.mark.parametrize("precision,distopt", [("fp32", False), ("fp32", True), ("bf16", False)])
def test_per_expert_checkpoint_loads_into_stacked_experts(tmp_path, precision, distopt):
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[precision]
    cfg = _cfg(dtype)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (2, 9), generator=g) for _ in range(4)]
    model, ddp, opt, sched = _setup(cfg, precision, distopt, legacy=True)
    assert "layers.0.mlp.experts.0.gate_proj.weight" in dict(model.named_parameters())
    for i in range(2):
        _step(ddp, opt, sched, batches[i], i)
    CheckpointManager(str(tmp_path)).save(2, ddp, opt, {"tokens": 0})
    saved = {k: v.clone() for k, v in model.state_dict().items() if v is not None}
    old_losses = [_step(ddp, opt, sched, batches[i], i) for i in (2, 3)]
    old_after = {k: v for k, v in model.state_dict().items() if v is not None}

    model2, ddp2, opt2, sched2 = _setup(cfg, precision, distopt, legacy=False)
    assert "layers.0.mlp.experts.gate_up" in dict(model2.named_parameters())
    path = CheckpointManager(str(tmp_path)).find_latest()
    CheckpointManager(str(tmp_path)).load(path, ddp2, opt2)
    got = {k: v for k, v in model2.state_dict().items() if v is not None}
    assert list(got) == list(saved)
    for k, v in saved.items():
        assert torch.equal(got[k], v), k                          # bit-exact
    new_losses = [_step(ddp2, opt2, sched2, batches[i], i) for i in (2, 3)]
    tol = 1e-5 if precision == "fp32" else 1e-2
    assert new_losses == pytest.approx(old_losses, rel=tol)      # step 4's loss depends on the loaded Adam moments
    after = model2.state_dict()
    for k, v in old_after.items():
        torch.testing.assert_close(after[k].float(), v.float(), rtol=tol, atol=1e-7 if precision == "fp32" else 1e-3)
    # and a checkpoint written by the stacked layout loads back into it bit-exactly
    CheckpointManager(str(tmp_path / "new")).save(4, ddp2, opt2, {"tokens": 0})
    model3, ddp3, opt3, _ = _setup(cfg, precision, distopt, legacy=False)
    CheckpointManager(str(tmp_path / "new")).load(CheckpointManager(str(tmp_path / "new")).find_latest(), ddp3, opt3)
    for k, v in old_after.items():
        v = model3.state_dict()[k]
        assert torch.equal(v, after[k]), k
