"""Forward+backward time of one MoE layer: megamoe's MoELayer against megatron-core's MoELayer (alltoall dispatcher,
SequentialMLP experts, the same config and the same weights), measured in the same run.

    python tools/bench_moe_layer.py                              # one device: GPU bf16 defaults, CPU a smaller fp32
    torchrun --nproc-per-node=8 tools/bench_moe_layer.py         # expert parallel over all ranks (EP = world)
    python tools/bench_moe_layer.py --hidden 1024 --ffn 352 --experts 8 --top-k 2 --tokens 2048 --dtype fp32

Defaults: hidden 4096, 8 experts of 1376, top-2, 4096 tokens per rank, bf16 on GPU; on CPU hidden 512, experts of
176, 1024 tokens, fp32. Routing is the Mixtral rule (softmax, top-k, renormalise), which is megatron's default
(top-k then softmax). Before timing, both layers get the same weights and their outputs are compared. The
benchmark prints tokens/s for both layers and their ratio (megamoe / megatron); on a GPU it also prints TFLOP/s and
MFU against --peak-tflops (default: H100/H200 dense bf16, 989.4).
FLOPs counted: 3 (fwd + 2 bwd) x top_k x 3 GEMMs x 2 H F per token, the router GEMM included (2 H E x 3).
Times are medians over --iters calls, the two layers alternating. Results also go to --json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")


def parse(argv=None):
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=4096 if gpu else 512)
    p.add_argument("--ffn", type=int, default=1376 if gpu else 176, help="intermediate size of each expert")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096 if gpu else 1024, help="tokens per rank")
    p.add_argument("--dtype", choices=("bf16", "fp32", "fp16"), default="bf16" if gpu else "fp32")
    p.add_argument("--iters", type=int, default=20 if gpu else 5)
    p.add_argument("--warmup", type=int, default=5 if gpu else 2)
    p.add_argument("--peak-tflops", type=float, default=989.4, help="per-device dense peak for MFU (GPU)")
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    p.add_argument("--no-check", action="store_true", help="skip the output comparison")
    return p.parse_args(argv)


DT = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def build_megatron(args, dtype, device):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.moe.moe_layer import MoELayer
    ep = torch.distributed.get_world_size()
    cfg = TransformerConfig(
        num_layers=1, hidden_size=args.hidden, num_attention_heads=8, ffn_hidden_size=args.ffn * args.experts,
        num_moe_experts=args.experts, moe_ffn_hidden_size=args.ffn, moe_router_topk=args.top_k,
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, bias_activation_fusion=False,
        expert_model_parallel_size=ep, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, use_cpu_initialization=True, gradient_accumulation_fusion=False,
        moe_grouped_gemm=False)
    spec = get_gpt_layer_local_spec(num_experts=args.experts, moe_grouped_gemm=False)
    layer = MoELayer(cfg, submodules=spec.submodules.mlp.submodules, layer_number=1)
    return layer.to(device=device, dtype=dtype)


def build_ours(args, dtype, device):
    from megamoe.config import ModelConfig, MoEConfig
    from megamoe.parallel import megatron_config
    from megamoe.moe.layer import MoELayer
    cfg = ModelConfig(vocab_size=128, hidden_size=args.hidden, intermediate_size=args.ffn * args.experts,
                      num_layers=1, num_heads=8, params_dtype={torch.bfloat16: "bfloat16", torch.float16: "float16",
                                                               torch.float32: "float32"}[dtype],
                      moe=MoEConfig(num_experts=args.experts, top_k=args.top_k, router="mixtral",
                                    gate_network="linear", balance_loss_weight=0.01))
    layer = MoELayer(cfg, megatron_config(cfg), 0)
    return layer.to(device=device, dtype=dtype)


@torch.no_grad()
def copy_weights(ours, theirs):
    """megatron -> ours: router weight; SequentialMLP local expert i = global expert ep_rank * E_local + i, with
    linear_fc1 = [gate; up] and linear_fc2 = down."""
    ours.router.gate.weight.copy_(theirs.router.weight)
    for i, e in enumerate(ours.experts.local_ids):
        mlp = theirs.experts.local_experts[i]
        gate, up = mlp.linear_fc1.weight.chunk(2, dim=0)
        ours.experts[e].gate_proj.weight.copy_(gate)
        ours.experts[e].up_proj.weight.copy_(up)
        ours.experts[e].down_proj.weight.copy_(mlp.linear_fc2.weight)


def step_ours(layer, x, g):
    y, stats = layer(x)
    ((y.float() * g).sum() + stats.balance_loss).backward()
    return y


def step_theirs(layer, x, g):
    y, _ = layer(x)
    (y.float() * g).sum().backward()
    return y


def timeit(fns, args, device):
    """Median seconds per call of each fn. The calls alternate (a, b, a, b, ...) so that a change in machine load
    hits both layers alike; the slowest rank's time counts (EP)."""
    import statistics
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        for fn in fns:
            fn()
    sync()
    torch.distributed.barrier()
    times = [[] for _ in fns]
    for _ in range(args.iters):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            sync()
            times[i].append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(ts) for ts in times], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def main(argv=None):
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING)
    from megamoe import parallel
    from megamoe.config import ParallelConfig
    parallel.init_distributed()
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if args.experts % world:
        raise SystemExit(f"--experts {args.experts} must be divisible by the number of ranks (EP = world = {world})")
    parallel.initialize(ParallelConfig(ep=world))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = DT[args.dtype]
    torch.manual_seed(1234)
    theirs = build_megatron(args, dtype, device)
    ours = build_ours(args, dtype, device)
    copy_weights(ours, theirs)
    torch.manual_seed(1 + rank)
    x = torch.randn(args.tokens, 1, args.hidden, device=device, dtype=dtype)
    g = torch.randn(args.tokens, 1, args.hidden, device=device, dtype=torch.float32)

    def run(layer, step):
        xi = x.detach().requires_grad_()
        return step(layer, xi, g)

    err = None
    if not args.no_check:
        ya, yb = run(ours, step_ours).float(), run(theirs, step_theirs).float()
        err = float((ya - yb).abs().max() / yb.abs().max().clamp(min=1e-12))
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        if err > tol:
            raise SystemExit(f"outputs differ: max relative error {err:.3g} > {tol} (megamoe vs megatron-core)")
    t_ours, t_theirs = timeit([lambda: run(ours, step_ours), lambda: run(theirs, step_theirs)], args, device)
    H, Fh, E, k, T = args.hidden, args.ffn, args.experts, args.top_k, args.tokens
    flops = 3 * (k * 3 * 2 * H * Fh + 2 * H * E) * T          # per rank per fwd+bwd
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "world": world, "ep": world,
           "dtype": args.dtype, "hidden": H, "ffn": Fh, "experts": E, "top_k": k, "tokens_per_rank": T,
           "megamoe_ms": t_ours * 1e3, "megatron_ms": t_theirs * 1e3,
           "megamoe_tokens_per_s": T * world / t_ours, "megatron_tokens_per_s": T * world / t_theirs,
           "speedup_vs_megatron": t_theirs / t_ours, "max_rel_output_diff": err}
    if device.type == "cuda":
        for name, t in (("megamoe", t_ours), ("megatron", t_theirs)):
            res[f"{name}_tflops_per_device"] = flops / t / 1e12
            res[f"{name}_mfu"] = flops / t / (args.peak_tflops * 1e12)
    if rank == 0:
        import megamoe.ops.permute as perm
        print(f"MoE layer fwd+bwd | {res['device']} x{world} (EP {world}) | {args.dtype} | H {H}, {E} experts of "
              f"{Fh}, top-{k}, {T} tokens/rank | permute backend: {perm.select_backend(device)}")
        for name in ("megamoe", "megatron"):
            line = (f"  {name:9s} {res[name + '_ms']:9.2f} ms   {res[name + '_tokens_per_s']:12,.0f} tokens/s")
            if device.type == "cuda":
                line += f"   {res[name + '_tflops_per_device']:7.1f} TFLOP/s/device   MFU {res[name + '_mfu']:.1%}"
            print(line)
        print(f"  megamoe / megatron-core throughput: {res['speedup_vs_megatron']:.2f}x"
              + (f"   (outputs agree to {err:.1e} relative)" if err is not None else ""))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
    parallel.destroy()
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
