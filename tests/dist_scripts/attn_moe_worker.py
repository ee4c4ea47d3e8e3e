"""Worker for tests/test_attention_moe.py: attention experts (both modes, beside MLP MoE and dense layers) trained
single-process and under TP2, TP2 + sequence parallelism and TP2 x EP2 + SP (the MLP experts over EP), with
parallel_worker.py's machinery (megatron DDP + optimizer, finalize_model_grads; losses, grad norms and every
parameter's gradient against the single-process run).

    python attn_moe_worker.py reference OUT
    torchrun --nproc_per_node=2 attn_moe_worker.py layouts OUT tp2,tp2sp,tp2ep2sp
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import parallel_worker as pw  # noqa: E402


def model_configs():
    from megamoe.config import AttnMoEConfig, ModelConfig, MoEConfig
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                max_position_embeddings=64, init_std=0.05)
    return {
        # token_sparse, split 2 (4 experts of one query head), top-2, in both layers; Mixtral MLP MoE in layer 1
        "attn_sparse": ModelConfig(**base, attn_moe=AttnMoEConfig(
            num_experts=4, top_k=2, score_scale=2.0, mode="token_sparse", balance_loss_weight=0.1,
            z_loss_weight=1e-3, gate_init_std=0.3), moe=MoEConfig(
            num_experts=4, top_k=2, router="mixtral", gate_network="linear", balance_loss_weight=0.1,
            moe_layers=[1], gate_init_std=0.3)),
        # full_kv, split 1, top-1 pre-softmax in layer 1 only (layer 0 dense attention); llama-moe v1 MLP MoE
        # with a residual expert everywhere; tied embeddings
        "attn_fullkv": ModelConfig(**base, tie_word_embeddings=True, attn_moe=AttnMoEConfig(
            num_experts=2, top_k=1, score_order="softmax_topk", mode="full_kv", layers=[1],
            balance_loss_weight=0.1, gate_init_std=0.3), moe=MoEConfig(
            num_experts=4, top_k=2, router="topk_noisy", gate_network="mlp", noise=False, balance_loss_weight=0.1,
            residual_size=16, gate_init_std=0.3)),
    }


if __name__ == "__main__":
    pw.model_configs = model_configs
    pw._patch_transformer_config()
    mode, out = sys.argv[1], sys.argv[2]
    rc = 0
    if mode == "reference":
        pw.reference(out)
    elif mode == "layouts":
        rc = pw.layouts(out, sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {mode}")
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.exit(1 if rc else 0)
