"""Forward+backward time of one MoE layer: megamoe's MoELayer against megatron-core's MoELayer (alltoall dispatcher,
the same config and the same weights), measured in the same run.

    python tools/bench_moe_layer.py                              # one device: GPU bf16 defaults, CPU a smaller fp32
    python tools/bench_moe_layer.py --shape mixtral-proxy        # megatron's Mixtral proxy layer shape
    torchrun --nproc-per-node=8 tools/bench_moe_layer.py         # expert parallel over all ranks (EP = world)
    python tools/bench_moe_layer.py --hidden 1024 --ffn 352 --experts 8 --top-k 2 --tokens 2048 --dtype fp32

Shapes (`--shape`; the flags below override single fields):
  llama-moe-3.5b   H 4096, 8 experts of 1376 (LLaMA-MoE-3.5B 2/8: 11008 / 8), top-2, 4096 tokens per rank
  mixtral-proxy    H 4096, 8 experts of 14336, top-2, 4096 tokens: megatron-core's moe_perf Mixtral proxy layer
                   (its published 4.33 ms fwd / 7.68 ms bwd on H100 are with a non-gated GELU and EP8; both layers
                   here are SwiGLU, so the FLOPs are 1.5x those of that proxy)
  cpu              H 512, 8 experts of 176, 1024 tokens (the CPU default)
  smollm2-fine     H 576, 128 experts of 12, top-32, 512 tokens: the megamoe recipe on SmolLM2-135M (the quickstart's
                   MoE layer); `--experts-backend dense|grouped_mm|loop` compares our backends, each against the same
                   megatron-core layer in its run
Defaults: llama-moe-3.5b in bf16 on a GPU, cpu in fp32 on a CPU. `--device cpu` forces the CPU (a dry run of the
script on a GPU machine, or tiny shapes anywhere).

megatron-core's experts (`--megatron-experts`): auto = TEGroupedMLP (transformer-engine's grouped GEMM,
moe_grouped_gemm=True, megatron's recommended path) when transformer_engine imports, else SequentialMLP (one GEMM
chain per expert); the line printed names the one that ran. Ours: `--experts-backend` (default: the fastest for the
device and dtype, megamoe/moe/experts.py), the router weights applied in the experts' activation on a GPU (as
megatron's fused path) and padding to the capacity when one is set.

Routing is the Mixtral rule (softmax, top-k, renormalise), which is megatron's default (top-k then softmax). Before
timing, both layers get the same weights and their outputs are compared. The benchmark prints tokens/s, TFLOP/s and,
where the device's peak is known (megamoe.training.metrics.peak_flops_for_device, or --peak-tflops), MFU for both
layers and their ratio (megamoe / megatron).
FLOPs counted: 3 (fwd + 2 bwd) x top_k x 3 GEMMs x 2 H F per token, the router GEMM included (2 H E x 3).
Times are medians over --iters calls, the two layers alternating. Results also go to --json.

Attention experts (LLaMA-MoE v2, `--attn-experts A`): instead, megamoe's attention-MoE layer (megamoe/moe/attention.py)
against dense GQA attention (megamoe/layers/attention.py) at the same shape, in the same run, one process:

    python tools/bench_moe_layer.py --attn-experts 8 --attn-top-k 7                  # preset attn-cpu on a CPU
    python tools/bench_moe_layer.py --shape attn-llama3-8b --attn-experts 16 --attn-top-k 8 --attn-mode both

  attn-llama3-8b   H 4096, 32 query / 8 KV heads (d 128), 1 x 4096 tokens (LLaMA-3-8B's attention)
  attn-cpu         H 512, 8 query / 2 KV heads (d 64), 2 x 512 tokens (the CPU default)
It prints the forward+backward time of each layer (both modes with `--attn-mode both`; the dense layer and the
experts built from the same weights, KV heads copied into sibling experts), and the KV-cache bytes each holds after
a prefill of the same tokens (dense: n_kv heads per token; token_sparse: the k chosen experts' heads of each token,
v2's per-expert cache; full_kv: A heads per token), measured on the cache objects. The router is random (std
--attn-router-std, default 0.5: uneven routing, as after training). The machine's load average is recorded: a
timing taken while other jobs run is not a figure.
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

from megamoe.training.metrics import peak_flops_for_device

warnings.filterwarnings("ignore")


SHAPES = {"llama-moe-3.5b": dict(hidden=4096, ffn=1376, experts=8, top_k=2, tokens=4096),
          "mixtral-proxy": dict(hidden=4096, ffn=14336, experts=8, top_k=2, tokens=4096),
          "cpu": dict(hidden=512, ffn=176, experts=8, top_k=2, tokens=1024),
          "smollm2-fine": dict(hidden=576, ffn=12, experts=128, top_k=32, tokens=512)}
ATTN_SHAPES = {"attn-llama3-8b": dict(hidden=4096, heads=32, kv_heads=8, seq_len=4096, batch=1),
               "attn-cpu": dict(hidden=512, heads=8, kv_heads=2, seq_len=512, batch=2)}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES) + sorted(ATTN_SHAPES), default=None,
                   help="layer shape preset (default: llama-moe-3.5b on a GPU, cpu on a CPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--ffn", type=int, default=None, help="intermediate size of each expert")
    p.add_argument("--experts", type=int, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank")
    p.add_argument("--dtype", choices=("bf16", "fp32", "fp16"), default=None, help="default: bf16 GPU, fp32 CPU")
    p.add_argument("--iters", type=int, default=None, help="default: 20 GPU, 5 CPU")
    p.add_argument("--warmup", type=int, default=None, help="default: 5 GPU, 2 CPU")
    p.add_argument("--experts-backend", choices=("auto", "grouped_mm", "loop", "te", "dense"), default="auto",
                   help="ours: auto = the default for the device, dtype and expert shape (megamoe/moe/experts.py)")
    p.add_argument("--megatron-experts", choices=("auto", "te-grouped", "sequential"), default="auto")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device dense peak for MFU (default: by device name, metrics.peak_flops_for_device)")
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    p.add_argument("--no-check", action="store_true", help="skip the output comparison")
    t = p.add_argument_group("attention experts (LLaMA-MoE v2): attention MoE against dense attention")
    t.add_argument("--attn-experts", type=int, default=None, help="attention experts A (num_kv_heads x split)")
    t.add_argument("--attn-top-k", type=int, default=None, help="attention experts per token (default A - 1)")
    t.add_argument("--attn-mode", choices=("token_sparse", "full_kv", "both"), default="both")
    t.add_argument("--attn-router-std", type=float, default=0.5, help="router init std (default %(default)s)")
    t.add_argument("--heads", type=int, default=None)
    t.add_argument("--kv-heads", type=int, default=None)
    t.add_argument("--seq-len", type=int, default=None)
    t.add_argument("--batch", type=int, default=None)
    a = p.parse_args(argv)
    if a.attn_experts is not None:
        return _parse_attn(p, a)
    if a.shape in ATTN_SHAPES:
        p.error(f"--shape {a.shape} is an attention shape: give --attn-experts")
    gpu = torch.cuda.is_available() and a.device != "cpu"
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    a.device = "cuda" if gpu else "cpu"
    shape = SHAPES[a.shape or ("llama-moe-3.5b" if gpu else "cpu")]
    for k, v in shape.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.dtype = a.dtype or ("bf16" if gpu else "fp32")
    a.iters = a.iters if a.iters is not None else (20 if gpu else 5)
    a.warmup = a.warmup if a.warmup is not None else (5 if gpu else 2)
    return a


def _parse_attn(p, a):
    gpu = torch.cuda.is_available() and a.device != "cpu"
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    a.device = "cuda" if gpu else "cpu"
    if a.shape is not None and a.shape not in ATTN_SHAPES:
        p.error(f"--shape {a.shape} is an MLP shape; attention shapes: {', '.join(sorted(ATTN_SHAPES))}")
    shape = ATTN_SHAPES[a.shape or ("attn-llama3-8b" if gpu else "attn-cpu")]
    for k, v in shape.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.attn_top_k = a.attn_top_k if a.attn_top_k is not None else max(1, a.attn_experts - 1)
    a.dtype = a.dtype or ("bf16" if gpu else "fp32")
    a.iters = a.iters if a.iters is not None else (20 if gpu else 5)
    a.warmup = a.warmup if a.warmup is not None else (5 if gpu else 2)
    return a


def _load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in __import__("os").getloadavg())
    except OSError:
        return "n/a"


def attention_main(args):
    """--attn-experts: attention MoE (each mode) against dense attention, same shape, same weights, same run."""
    import dataclasses
    import statistics

    from megamoe import parallel
    from megamoe.config import AttnMoEConfig, ModelConfig, ParallelConfig
    from megamoe.formats.layout import expand_kv_heads
    from megamoe.layers.attention import Attention, AttentionContext
    from megamoe.layers.kv_cache import KVCache
    from megamoe.layers.rope import rope_cos_sin, rope_inv_freq
    from megamoe.moe.attention import AttentionMoE
    from megamoe.parallel import megatron_config
    parallel.initialize(ParallelConfig())
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = DT[args.dtype]
    pd = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    dense_cfg = ModelConfig(vocab_size=128, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                            num_layers=1, num_heads=args.heads, num_kv_heads=args.kv_heads, params_dtype=pd)
    modes = ("token_sparse", "full_kv") if args.attn_mode == "both" else (args.attn_mode,)
    torch.manual_seed(1234)
    dense = Attention(dense_cfg, megatron_config(dense_cfg), 0).to(device=device, dtype=dtype)
    split = args.attn_experts // args.kv_heads
    layers = {"dense": dense}
    for mode in modes:
        cfg = dataclasses.replace(dense_cfg, attn_moe=AttnMoEConfig(
            num_experts=args.attn_experts, top_k=args.attn_top_k, mode=mode, gate_init_std=args.attn_router_std))
        cfg.validate()
        moe = AttentionMoE(cfg, megatron_config(cfg), 0).to(device=device, dtype=dtype)
        with torch.no_grad():
            for x in ("q_proj", "o_proj"):
                getattr(moe, x).weight.copy_(getattr(dense, x).weight)
            for x in ("k_proj", "v_proj"):
                getattr(moe, x).weight.copy_(expand_kv_heads(getattr(dense, x).weight, args.kv_heads, split))
            if mode != modes[0]:
                moe.router.gate.weight.copy_(layers[modes[0]].router.gate.weight)
        layers[mode] = moe
    S, B, H = args.seq_len, args.batch, args.hidden
    cos, sin = rope_cos_sin(rope_inv_freq(dense_cfg).to(device), torch.arange(S, device=device), dtype)
    x = torch.randn(S, B, H, device=device, dtype=dtype)
    g = torch.randn(S, B, H, device=device, dtype=torch.float32)

    def step(layer):
        xi = x.detach().requires_grad_()
        out = layer(xi, cos, sin)
        y, loss = (out[0], out[1].balance_loss) if isinstance(out, tuple) else (out, 0.0)
        ((y.float() * g).sum() + loss).backward()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = list(layers)
    for _ in range(args.warmup):
        for n in names:
            step(layers[n])
    sync()
    times = {n: [] for n in names}
    load_before = _load_average()
    for _ in range(args.iters):
        for n in names:   # alternating: a change in machine load hits every layer alike
            t0 = time.perf_counter()
            step(layers[n])
            sync()
            times[n].append(time.perf_counter() - t0)
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": args.dtype,
           "hidden": H, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": H // args.heads,
           "seq_len": S, "batch": B, "attn_experts": args.attn_experts, "attn_top_k": args.attn_top_k,
           "split": split, "load_average": f"{load_before} -> {_load_average()}", "layers": {}}
    pos = torch.arange(S, device=device).expand(B, S)
    seg = torch.ones(B, S, dtype=torch.int32, device=device)
    for n in names:
        layer = layers[n]
        cache = KVCache(1)
        if n == "token_sparse":
            cache.layers[0] = layer.prepare_cache(cache.layers[0])
        ctx = AttentionContext(pos, seg, *cache.extend(pos, seg))
        pcos, psin = rope_cos_sin(rope_inv_freq(dense_cfg).to(device), pos, dtype)
        with torch.no_grad():
            layer(x, pcos, psin, ctx, cache.layers[0])
        lc = cache.layers[0]
        kv = lc.nbytes() if hasattr(lc, "nbytes") else sum(t.numel() * t.element_size() for t in (lc.k, lc.v))
        ms = statistics.median(times[n]) * 1e3
        res["layers"][n] = {"fwd_bwd_ms": ms, "tokens_per_s": S * B / (ms / 1e3), "kv_cache_bytes": kv}
    d = res["layers"]["dense"]
    for n in names[1:]:
        d_n = res["layers"][n]
        d_n["speedup_vs_dense"] = d["fwd_bwd_ms"] / d_n["fwd_bwd_ms"]
        d_n["kv_cache_vs_dense"] = d_n["kv_cache_bytes"] / d["kv_cache_bytes"]
    print(f"attention fwd+bwd | {res['device']} | {args.dtype} | H {H}, {args.heads} q / {args.kv_heads} kv heads, "
          f"{B} x {S} tokens | {args.attn_experts} attention experts (split {split}), top-{args.attn_top_k} | load "
          f"average {res['load_average']}")
    for n in names:
        r = res["layers"][n]
        extra = (f"   {r['speedup_vs_dense']:.2f}x dense speed, KV cache {r['kv_cache_vs_dense']:.2f}x dense"
                 if n != "dense" else "")
        print(f"  {n:13s} {r['fwd_bwd_ms']:9.2f} ms   {r['tokens_per_s']:12,.0f} tokens/s   KV cache "
              f"{r['kv_cache_bytes'] / 2**20:8.2f} MiB{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    parallel.destroy()
    return res


def te_available() -> bool:
    try:  # optional dependency
        import transformer_engine.pytorch  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - ImportError or a broken install
        return False


DT = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def build_megatron(args, dtype, device):
    """megatron-core's MoELayer: TEGroupedMLP (grouped GEMM) or SequentialMLP experts. Returns (layer, kind)."""
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                          get_gpt_layer_with_transformer_engine_spec)
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.moe.moe_layer import MoELayer
    ep = torch.distributed.get_world_size()
    kind = args.megatron_experts
    if kind == "auto":
        kind = "te-grouped" if device.type == "cuda" and te_available() else "sequential"
    if kind == "te-grouped" and not (device.type == "cuda" and te_available()):
        raise SystemExit("--megatron-experts te-grouped needs transformer_engine and a GPU")
    grouped = kind == "te-grouped"
    cfg = TransformerConfig(
        num_layers=1, hidden_size=args.hidden, num_attention_heads=8, ffn_hidden_size=args.ffn * args.experts,
        num_moe_experts=args.experts, moe_ffn_hidden_size=args.ffn, moe_router_topk=args.top_k,
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, bias_activation_fusion=False,
        expert_model_parallel_size=ep, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, use_cpu_initialization=True, gradient_accumulation_fusion=False,
        moe_grouped_gemm=grouped)
    if grouped:
        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=args.experts, moe_grouped_gemm=True)
    else:
        spec = get_gpt_layer_local_spec(num_experts=args.experts, moe_grouped_gemm=False)
    layer = MoELayer(cfg, submodules=spec.submodules.mlp.submodules, layer_number=1)
    return layer.to(device=device, dtype=dtype), ("TEGroupedMLP" if grouped else "SequentialMLP")


def build_ours(args, dtype, device):
    from megamoe.config import ModelConfig, MoEConfig
    from megamoe.moe.layer import MoELayer
    from megamoe.parallel import megatron_config
    cfg = ModelConfig(vocab_size=128, hidden_size=args.hidden, intermediate_size=args.ffn * args.experts,
                      num_layers=1, num_heads=8, params_dtype={torch.bfloat16: "bfloat16", torch.float16: "float16",
                                                               torch.float32: "float32"}[dtype],
                      moe=MoEConfig(num_experts=args.experts, top_k=args.top_k, router="mixtral",
                                    gate_network="linear", balance_loss_weight=0.01))
    layer = MoELayer(cfg, megatron_config(cfg), 0)
    if args.experts_backend != "auto":
        layer.experts.backend = args.experts_backend
    return layer.to(device=device, dtype=dtype)


@torch.no_grad()
def copy_weights(ours, theirs):
    """megatron -> ours: router weight; local expert i = global expert ep_rank * E_local + i, with fc1 = [gate; up]
    and fc2 = down (SequentialMLP: local_experts[i].linear_fc{1,2}.weight; TEGroupedMLP: linear_fc{1,2}.weight{i})."""
    ours.router.gate.weight.copy_(theirs.router.weight)
    for i, e in enumerate(ours.experts.local_ids):
        if hasattr(theirs.experts, "local_experts"):
            mlp = theirs.experts.local_experts[i]
            fc1, fc2 = mlp.linear_fc1.weight, mlp.linear_fc2.weight
        else:
            fc1 = getattr(theirs.experts.linear_fc1, f"weight{i}")
            fc2 = getattr(theirs.experts.linear_fc2, f"weight{i}")
        gate, up = fc1.chunk(2, dim=0)
        ours.experts[e].gate_proj.weight.copy_(gate)
        ours.experts[e].up_proj.weight.copy_(up)
        ours.experts[e].down_proj.weight.copy_(fc2)


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
    if args.attn_experts is not None:
        return attention_main(args)
    from megamoe import parallel
    from megamoe.config import ParallelConfig
    parallel.init_distributed()
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if args.experts % world:
        raise SystemExit(f"--experts {args.experts} must be divisible by the number of ranks (EP = world = {world})")
    parallel.initialize(ParallelConfig(ep=world))
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = DT[args.dtype]
    torch.manual_seed(1234)
    theirs, their_kind = build_megatron(args, dtype, device)
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
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops_for_device(device, args.dtype)
    import megamoe.ops.permute as perm
    backend = ours.experts.select_backend(x.view(-1, H), ours._dense_top_k)
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "world": world, "ep": world,
           "dtype": args.dtype, "hidden": H, "ffn": Fh, "experts": E, "top_k": k, "tokens_per_rank": T,
           "megamoe_experts_backend": backend, "permute_backend": perm.select_backend(device),
           "megatron_experts": their_kind,
           "megamoe_ms": t_ours * 1e3, "megatron_ms": t_theirs * 1e3,
           "megamoe_tokens_per_s": T * world / t_ours, "megatron_tokens_per_s": T * world / t_theirs,
           "speedup_vs_megatron": t_theirs / t_ours, "max_rel_output_diff": err, "peak_flops": peak}
    for name, t in (("megamoe", t_ours), ("megatron", t_theirs)):
        res[f"{name}_tflops_per_device"] = flops / t / 1e12
        res[f"{name}_mfu"] = flops / t / peak if peak else None
    if rank == 0:
        print(f"MoE layer fwd+bwd | {res['device']} x{world} (EP {world}) | {args.dtype} | H {H}, {E} experts of "
              f"{Fh}, top-{k}, {T} tokens/rank | megamoe: experts {backend}, permute {res['permute_backend']} | "
              f"megatron-core: {their_kind}")
        for name in ("megamoe", "megatron"):
            mfu = res[name + "_mfu"]
            print(f"  {name:9s} {res[name + '_ms']:9.2f} ms   {res[name + '_tokens_per_s']:12,.0f} tokens/s   "
                  f"{res[name + '_tflops_per_device']:8.3g} TFLOP/s/device   "
                  + (f"MFU {mfu:.1%}" if mfu is not None else "MFU n/a (unknown peak)"))
        print(f"  megamoe / megatron-core ({their_kind}) throughput: {res['speedup_vs_megatron']:.2f}x"
              + (f"   (outputs agree to {err:.1e} relative)" if err is not None else ""))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
    parallel.destroy()
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
