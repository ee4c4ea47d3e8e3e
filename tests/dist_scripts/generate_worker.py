"""Worker for tests/test_generate.py: the KV cache and generation under tensor parallelism.

    torchrun --nproc_per_node=2 generate_worker.py

Every rank first builds the model at TP1 (DP2: the same full weights on both ranks) and computes the reference: the
full forward's logits of a left-padded batch and a continuation, and greedy generation. Then at TP2 (query and kv
heads split, GQA 6:2 -> 3:1 per rank, vocabulary split) the same weights decode step by step with the cache.
Prints "OK ..." per passed check, "FAIL ..." otherwise (exit 1).
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
    from megamoe.layers.kv_cache import KVCache
    from megamoe.model import LlamaMoEModel
    from megamoe.model.generate import generate, pad_prompts
    from megamoe.training.resharding import load_full_state_dict
    from megatron.core import tensor_parallel as tpar

    cfg = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=6, num_kv_heads=2,
                      max_position_embeddings=128, init_std=0.08,
                      moe=MoEConfig(num_experts=4, top_k=2, router="mixtral", gate_network="linear",
                                    score_scale=2.0, gate_init_std=0.3))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [3]]
    ids, mask = pad_prompts(prompts, 0)
    cont = torch.tensor([[20, 21, 22, 23], [30, 31, 32, 33], [40, 41, 42, 43]])
    full_ids, full_mask = torch.cat([ids, cont], 1), torch.cat([mask, torch.ones_like(cont)], 1)
    pos = (full_mask.cumsum(1) - 1).clamp(min=0) * full_mask

    parallel.initialize(ParallelConfig())
    torch.manual_seed(0)
    ref_model = LlamaMoEModel(cfg).eval()
    full = {k: v.detach().clone() for k, v in ref_model.state_dict().items() if torch.is_tensor(v)}
    with torch.no_grad():
        ref = ref_model(full_ids, position_ids=pos, segment_ids=full_mask).logits
    ref_gen = generate(ref_model, prompts, 8, pad_token_id=0)
    del ref_model

    parallel.destroy(keep_process_group=True)
    parallel.initialize(ParallelConfig(tp=2))
    m = LlamaMoEModel(cfg).eval()
    load_full_state_dict(m, full)
    rank = dist.get_rank()
    ok = True
    with torch.no_grad():
        cache = KVCache(len(m.layers))
        P = ids.shape[1]
        steps = [m(ids, position_ids=pos[:, :P], segment_ids=mask, cache=cache).logits]
        for t in range(cont.shape[1]):
            steps.append(m(cont[:, t:t + 1], cache=cache).logits)
        got = tpar.gather_from_tensor_model_parallel_region(torch.cat(steps, 1).contiguous())
    real = full_mask.bool()
    err = float((got[real] - ref[real]).abs().max())
    heads = cache.layers[0].k.shape[1]
    if err < 1e-4 and heads == 1:
        print(f"OK rank {rank} cached TP2 logits = single-process full forward (max err {err:.2e}, "
              f"{heads} kv head per rank)", flush=True)
    else:
        ok = False
        print(f"FAIL rank {rank} cached TP2 logits differ: max err {err:.3e}, kv heads per rank {heads}", flush=True)
    gen = generate(m, prompts, 8, pad_token_id=0)
    if torch.equal(gen.sequences, ref_gen.sequences):
        print(f"OK rank {rank} greedy generation at TP2 = single process", flush=True)
    else:
        ok = False
        print(f"FAIL rank {rank} generation differs:\n{gen.sequences}\n{ref_gen.sequences}", flush=True)
    dist.barrier()
    parallel.destroy()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
