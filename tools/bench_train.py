#!/usr/bin/env python3
"""Training-step throughput: megamoe's train step vs the same model as transformers' MixtralForCausalLM trained with
a plain torch loop (AdamW, clip_grad_norm_), same weights, same batch, same process, interleaved.

    python tools/bench_train.py                      # CPU: small LLaMA-MoE (8 experts, top-2); prints the ratio
    python tools/bench_train.py --json out.json
    python tools/bench_train.py --shape llama-moe-3.5b --layers 4 --seq-len 4096   # GPU: TGS and MFU
    python tools/bench_train.py --pp 2               # pipeline parallel: tokens/s, bubble vs (p-1)/(m+p-1)

megamoe's step is the trainer's own (megamoe.train.train_step): megatron-core DDP (fp32 grad buffers) + megatron AdamW + the NaN-guarded
step (prepare grads, global norm, clip, update) + the LR schedule, with the C++ permute/unpermute. The reference
is what a user would write with transformers: model(input_ids, labels) with the router aux loss, backward,
torch.nn.utils.clip_grad_norm_, torch.optim.AdamW (foreach). Both start from identical weights (copied), and the
first-step losses are compared to make sure the same function is trained. Timing: warm-up steps, then rounds that
alternate one step of each, median over rounds (robust to other load on the machine).

Precision (`--precision`, default: what the trainer's `train.precision: auto` picks: bf16 on a GPU, fp32 on a CPU):
fp32, or bf16 = bf16 weights with fp32 master weights and grads (megatron mixed precision; on a CPU with native bf16
the faster choice, `--precision bf16`). Against bf16 on a CPU the reference
runs twice, under torch.autocast(bf16) over fp32 weights (transformers' mixed precision) and in plain fp32; the
ratio counted is against the faster of the two.

Expert compute (`--experts-backend`, megamoe/moe/experts.py): auto (the fastest for the device and dtype), grouped_mm,
loop or te; a comma list (e.g. `loop,grouped_mm`) trains one model per backend from the same weights on the same
batches, their steps interleaved round by round, and prints each backend's tokens/s, its ratio to the first and
whether the losses agree (the A/B of docs/benchmarks.md). `--device cpu` runs on the CPU on a GPU machine too.

On a GPU (`--shape llama-moe-3.5b`): the LLaMA-MoE-3.5B (2/8) layer shape (H 4096, 8 experts of 1376 = 11008/8,
top-2, 32 heads, vocab 32000) truncated to `--layers` decoder layers to fit one device; bf16, reports TGS and
MFU = TGS * (6 * activated matmul params + causal attention FLOPs) / peak (metrics.py), peak by device name or
--peak-flops.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


SHAPES = {
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=8,
                  num_kv_heads=4),
    "llama-moe-3.5b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                           num_kv_heads=32),
    # the quickstart's model: SmolLM2-135M split into 8 experts of 192
    "smollm2-moe": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                        num_kv_heads=3),
}


def our_setup(mcfg, precision, device, lr=1e-4, experts_backend=None, init=True):
    from megamoe import parallel
    from megamoe.config import ParallelConfig
    from megamoe.model import LlamaMoEModel
    from megamoe.training.config import OptimConfig
    from megamoe.training.optim import build_optimizer, wrap_model
    from megamoe.training.schedule import LRSchedule
    pcfg = ParallelConfig()
    if init:
        parallel.initialize(pcfg, mcfg)
    torch.manual_seed(0)
    model = LlamaMoEModel(mcfg).to(device)
    if experts_backend and experts_backend != "auto":
        for layer in model.layers:
            if hasattr(layer.mlp, "experts"):
                layer.mlp.experts.backend = experts_backend
    ddp = wrap_model(model, mcfg, pcfg, precision)
    ocfg = OptimConfig(lr=lr, warmup_steps=0, weight_decay=0.1, clip_grad=1.0)
    opt = build_optimizer(ddp, ocfg, pcfg, precision)
    return model, ddp, opt, LRSchedule(lr, 0, 1000, 0.1, "constant", 0.1)


def our_step(ddp, opt, sched, batch, step):
    from megamoe.training.trainer import train_step
    sched.apply(opt, step)
    r = train_step(ddp, opt, lambda: batch)
    return r.lm_loss + r.aux_loss


def hf_setup(mcfg, ours, device, dtype, lr=1e-4):
    """MixtralForCausalLM with the same config and our weights (router 'mixtral', linear gate, scale 1)."""
    from transformers import MixtralConfig, MixtralForCausalLM
    E = mcfg.moe.num_experts
    s = mcfg.intermediate_size // E
    hcfg = MixtralConfig(vocab_size=mcfg.vocab_size, hidden_size=mcfg.hidden_size, intermediate_size=s,
                         num_hidden_layers=mcfg.num_layers, num_attention_heads=mcfg.num_heads,
                         num_key_value_heads=mcfg.kv_heads, num_local_experts=E, num_experts_per_tok=mcfg.moe.top_k,
                         rms_norm_eps=mcfg.rms_norm_eps, rope_theta=mcfg.rope_theta,
                         max_position_embeddings=mcfg.max_position_embeddings, tie_word_embeddings=False,
                         router_aux_loss_coef=mcfg.moe.balance_loss_weight, output_router_logits=True,
                         attention_dropout=0.0, sliding_window=None)
    hcfg._attn_implementation = "sdpa"
    model = MixtralForCausalLM(hcfg).to(dtype)
    sd = {k: v for k, v in ours.state_dict().items() if v is not None}

    def ex(i, e, w):
        k = f"layers.{i}.mlp.experts.{e}.{w}.weight"
        return sd[k]
    new = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(mcfg.num_layers):
        p = f"model.layers.{i}."
        new[p + "input_layernorm.weight"] = sd[f"layers.{i}.attn_norm.weight"]
        new[p + "post_attention_layernorm.weight"] = sd[f"layers.{i}.mlp_norm.weight"]
        for w in ("q_proj", "k_proj", "v_proj", "o_proj"):
            new[p + f"self_attn.{w}.weight"] = sd[f"layers.{i}.attn.{w}.weight"]
        new[p + "mlp.gate.weight"] = sd[f"layers.{i}.mlp.router.gate.weight"]
        new[p + "mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([ex(i, e, "gate_proj"), ex(i, e, "up_proj")]) for e in range(E)])
        new[p + "mlp.experts.down_proj"] = torch.stack([ex(i, e, "down_proj") for e in range(E)])
    missing, unexpected = model.load_state_dict({k: v.detach().clone() for k, v in new.items()}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weight copy into MixtralForCausalLM: missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    return model, opt


def hf_loss(model, batch, autocast=None):
    """Next-token loss over the same S positions as ours (HF's `labels=` would shift once more) + router aux loss.
    autocast: a dtype to run the forward under torch.autocast (transformers' mixed precision), or None."""
    with torch.autocast(batch.device.type, dtype=autocast, enabled=autocast is not None):
        out = model(input_ids=batch[:, :-1])
    logits = out.logits.float()
    lm = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    return lm, lm + model.config.router_aux_loss_coef * out.aux_loss


def hf_step(model, opt, batch, autocast=None):
    opt.zero_grad(set_to_none=True)
    _, loss = hf_loss(model, batch, autocast)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--pp", type=int, default=1)
    known, rest = pre.parse_known_args(argv)
    if known.pp > 1:   # pipeline parallelism: tokens/s and the bubble vs the 1F1B formula (tools/bench_pipeline.py)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_pipeline
        return bench_pipeline.main(["--pp", str(known.pp)] + rest)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", type=int, default=1, help="> 1: pipeline-parallel throughput and bubble under torchrun "
                                                     "(tools/bench_pipeline.py; its options apply)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (truncate the shape)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-reference", action="store_true", help="only megamoe's step (GPU MFU runs)")
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: what the trainer's train.precision=auto picks (bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--peak-flops", type=float, default=None)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--experts-backend", default="auto",
                   help="auto|grouped_mm|loop|te, or a comma list to compare (interleaved, same weights and batches)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    from megamoe.console import quiet_library_warnings as _quiet_library_warnings
    _quiet_library_warnings()

    from megamoe.config import ModelConfig, MoEConfig
    from megamoe.config import DTYPES
    from megamoe.training.config import PARAMS_DTYPES, resolve_precision
    from megamoe.training.metrics import flops_per_token, peak_flops_for_device
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    cuda = torch.cuda.is_available() and a.device != "cpu"
    device = torch.device("cuda") if cuda else torch.device("cpu")
    backends = [b.strip() for b in a.experts_backend.split(",") if b.strip()] or ["auto"]
    for b in backends:
        if b not in ("auto", "grouped_mm", "loop", "te"):
            p.error(f"--experts-backend: {b!r} is not one of auto, grouped_mm, loop, te")
    precision = resolve_precision(a.precision, cuda)
    shape = dict(SHAPES[a.shape])
    if a.layers:
        shape["num_layers"] = a.layers
    mcfg = ModelConfig(**shape, max_position_embeddings=max(4096, a.seq_len), recompute=a.recompute,
                       params_dtype=PARAMS_DTYPES[precision],
                       moe=MoEConfig(num_experts=8, top_k=2, router="mixtral", gate_network="linear",
                                     score_scale=1.0, balance_loss_weight=0.01)).validate()
    tokens = a.batch * a.seq_len
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, mcfg.vocab_size, (a.batch, a.seq_len + 1), generator=g).to(device)
               for _ in range(a.warmup + a.rounds)]
    print(f"device {device} ({torch.cuda.get_device_name(0) if cuda else f'{torch.get_num_threads()} threads'}), "
          f"{precision}; {a.shape} shape, {mcfg.num_layers} layers, H {mcfg.hidden_size}, 8 experts top-2, "
          f"batch {a.batch} x {a.seq_len} = {tokens} tokens/step")
    ours = {}      # backend -> (model, ddp, opt, sched): the same seed, so the same weights
    for i, b in enumerate(backends):
        ours[b] = our_setup(mcfg, precision, device, experts_backend=b, init=i == 0)
    model, ddp, opt, sched = ours[backends[0]]
    # the references: transformers at our precision (bf16: torch.autocast, its mixed precision, over fp32 weights;
    # on a GPU bf16 weights), and on a CPU in bf16 also plain fp32, which may be faster there: the ratio counted is
    # against the fastest
    refs = {}
    if not a.no_reference:
        if cuda:
            refs[f"transformers {precision}"] = (*hf_setup(mcfg, model, device, DTYPES[mcfg.params_dtype]), None)
        else:
            refs["transformers fp32"] = (*hf_setup(mcfg, model, device, torch.float32), None)
            if precision == "bf16":
                refs["transformers bf16 autocast"] = (*hf_setup(mcfg, model, device, torch.float32), torch.bfloat16)
        with torch.no_grad():
            model.eval()
            l_ours = float(model(batches[0][:, :-1], labels=batches[0][:, 1:], return_logits=False).lm_loss)
            model.train()
            for name, (m, _, cast) in refs.items():
                m.eval()
                l_ref = float(hf_loss(m, batches[0], cast)[0])
                m.train()
                print(f"same model check: initial LM loss megamoe {l_ours:.6f} vs {name} {l_ref:.6f}")
                tol = (1e-3 if precision == "fp32" and cast is None else 2e-2) * max(1.0, abs(l_ref))
                if abs(l_ours - l_ref) > tol:
                    print("WARNING: the two models differ; the comparison is not like for like")
    t_by, losses_by = {bk: [] for bk in ours}, {bk: [] for bk in ours}
    t_ref = {name: [] for name in refs}
    for i, b in enumerate(batches):
        order = list(ours.items())
        for bk, (_, d, o, sc) in (order if i % 2 == 0 else order[::-1]):    # ABBA: no backend always goes first
            box = []
            dt = timed(lambda: box.append(our_step(d, o, sc, b, i)), device)
            losses_by[bk].append(float(box[0]))
            if i >= a.warmup:
                t_by[bk].append(dt)
        for name, (m, o, cast) in refs.items():
            dt = timed(lambda: hf_step(m, o, b, cast), device)
            if i >= a.warmup:
                t_ref[name].append(dt)
    t_ours = t_by[backends[0]]
    ours_tps = tokens / statistics.median(t_ours)
    fpt = flops_per_token(mcfg, a.seq_len)
    peak = a.peak_flops or peak_flops_for_device(device, precision)
    res = {"device": str(device), "shape": a.shape, "layers": mcfg.num_layers, "seq_len": a.seq_len,
           "batch": a.batch, "precision": precision, "megamoe_tokens_per_s": ours_tps,
           "megamoe_step_s": statistics.median(t_ours), "flops_per_token": fpt,
           "achieved_flops": ours_tps * fpt, "peak_flops": peak, "mfu": ours_tps * fpt / peak if peak else None}
    res["experts_backend"] = model.layers[0].mlp.experts.select_backend(
        torch.empty(1, mcfg.hidden_size, device=device, dtype=DTYPES[mcfg.params_dtype]))
    res["losses"] = losses_by[backends[0]]
    print(f"megamoe {precision:<6} {res['experts_backend']:<13} {ours_tps:10,.0f} tokens/s  "
          f"(median step {res['megamoe_step_s'] * 1e3:.0f} ms, "
          f"{ours_tps * fpt / 1e9:.1f} GFLOP/s model FLOPs)")
    if len(backends) > 1:
        base = tokens / statistics.median(t_by[backends[0]])
        res["experts_ab"] = {}
        for bk in backends:
            tps = tokens / statistics.median(t_by[bk])
            diff = max(abs(x - y) for x, y in zip(losses_by[bk], losses_by[backends[0]]))
            res["experts_ab"][bk] = {"tokens_per_s": tps, "median_step_s": statistics.median(t_by[bk]),
                                     "ratio_to_first": tps / base, "losses": losses_by[bk], "max_loss_diff": diff}
            print(f"experts {bk:<12} {tps:10,.0f} tokens/s  (median step {statistics.median(t_by[bk]) * 1e3:.0f} ms;"
                  f" {tps / base:.3f}x {backends[0]}; losses differ by at most {diff:.2e})")
    if refs:
        ref_tps = {name: tokens / statistics.median(ts) for name, ts in t_ref.items()}
        for name, tps in ref_tps.items():
            print(f"{name:<28} {tps:10,.0f} tokens/s  (MixtralForCausalLM + torch AdamW; megamoe {ours_tps / tps:.2f}x)")
        best = max(ref_tps, key=ref_tps.get)
        res.update(transformers_tokens_per_s=ref_tps[best], reference=best, ratio=ours_tps / ref_tps[best],
                   references=dict(ref_tps))
        print(f"ratio megamoe / transformers (its fastest: {best}): {ours_tps / ref_tps[best]:.2f}x  "
              f"(goal >= 1.5x on CPU)")
    if cuda:
        print(f"TGS {ours_tps:,.0f} tokens/GPU/s, MFU {100 * res['mfu']:.1f}%" if peak else
              f"TGS {ours_tps:,.0f} (unknown peak: pass --peak-flops)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
