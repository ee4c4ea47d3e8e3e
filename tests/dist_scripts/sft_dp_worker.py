"""Worker for tests/test_train_sft.py: the SFT loss under data parallelism is the global token-weighted mean.

    torchrun --nproc_per_node=2 sft_dp_worker.py

Two data-parallel ranks (megatron DDP + distributed optimizer), each with its own rows of one global batch and very
different numbers of trained tokens (rank 0: 2 micro-batches). The trainer's train_step must report the loss
sum(CE * mask) / sum(mask) over the whole global batch and the gradient norm of that loss, both computed here in
plain torch on an undistributed copy of the model. Prints "OK ..." / "FAIL ..." (exit 1).
"""

from __future__ import annotations

import logging
import sys
import warnings

warnings.filterwarnings("ignore")
logging.basicConfig(level=logging.WARNING)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main() -> int:
    from megamoe import parallel
    from megamoe.config import ModelConfig, MoEConfig, ParallelConfig
    from megamoe.data import SFTBatch
    from megamoe.model import LlamaMoEModel
    from megamoe.training.config import OptimConfig
    from megamoe.training.optim import build_optimizer, wrap_model
    from megamoe.training.trainer import train_step

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_position_embeddings=64,
                      moe=MoEConfig(num_experts=4, top_k=2, router="mixtral", gate_network="linear",
                                    balance_loss_weight=0.0, score_scale=1.0)).validate()
    pcfg = ParallelConfig(distributed_optimizer=True)
    parallel.initialize(pcfg, cfg)
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (4, 17), generator=g)          # global batch: rows 0, 1 -> rank 0; 2, 3 -> rank 1
    mask = torch.zeros(4, 16)
    mask[0, 1:15], mask[1, 3:5], mask[2, 10:11], mask[3, 0:4] = 1, 1, 1, 1   # 16 and 5 tokens
    pos, seg = torch.arange(16).repeat(4, 1), torch.ones(4, 16, dtype=torch.int32)

    def row(i):
        return SFTBatch(tokens[i:i + 1], mask[i:i + 1], pos[i:i + 1], seg[i:i + 1], torch.zeros(1, dtype=torch.long))
    mine = [row(0), row(1)] if rank == 0 else [row(2), row(3)]

    torch.manual_seed(0)
    model = LlamaMoEModel(cfg)
    ref = LlamaMoEModel(cfg)
    ref.load_state_dict(model.state_dict())
    ref.fused_lm_loss = False
    ddp = wrap_model(model, cfg, pcfg, "fp32")
    opt = build_optimizer(ddp, OptimConfig(lr=1e-3, warmup_steps=0, weight_decay=0.0, clip_grad=0.0), pcfg, "fp32")
    it = iter(mine)
    r = train_step(ddp, opt, lambda: next(it), 2)

    out = ref(tokens[:, :-1], labels=tokens[:, 1:], loss_mask=mask, return_logits=False)   # sum / sum(mask)
    out.lm_loss.backward()
    gn = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ref.parameters() if p.grad is not None)))
    ok = True
    for what, got, want in (("loss", r.lm_loss, float(out.lm_loss)), ("grad norm", r.grad_norm, gn)):
        if abs(got - want) <= 1e-5 * max(1.0, abs(want)):
            print(f"OK rank {rank} DP2 {what} {got:.6f} = global token mean {want:.6f}", flush=True)
        else:
            ok = False
            print(f"FAIL rank {rank} DP2 {what} {got:.6f} != global token mean {want:.6f}", flush=True)
    dist.barrier()
    parallel.destroy()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
