#!/usr/bin/env python3
"""Pipeline-parallel training throughput and the pipeline bubble, against the 1F1B formula.

    python tools/bench_pipeline.py --pp 2                       # starts torchrun with pp ranks itself (CPU: gloo)
    python tools/bench_train.py --pp 2                          # the same (bench_train hands --pp runs to this tool)
    torchrun --nproc-per-node=4 tools/bench_pipeline.py --pp 4 --micro-batches 4,8,16 --device cuda
    python tools/bench_pipeline.py --pp 2 --vpp 2               # interleaved virtual stages

For each m (micro-batches per step) the trainer's own step (megamoe.training.trainer.train_step: megatron-core's 1F1B
schedule, or the interleaved one with --vpp) is timed (median over rounds after warm-up): step time T and tokens/s.
Then each stage's compute alone: one micro-batch's forward + backward through the stage's chunks outside the pipeline
(a random input hidden state and output gradient of the right shapes, so no stage waits for another): t_s. The
busy fraction of the slowest stage is m * max_s(t_s) / T and

    measured bubble = 1 - m * max_s(t_s) / T        1F1B formula: (p - 1) / (m + p - 1)
                                                    interleaved (v virtual stages per rank): (p - 1) / (v*m + p - 1)

The measured bubble also holds the point-to-point transfers and any stage imbalance (each stage's t_s is printed), so
it is at least the formula's. Timings on a machine loaded by other jobs are not figures (docs/benchmarks.md).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

SHAPES = {   # bench_train.py's "small" (4 layers: 2 per stage at pp 2) and a deeper variant for pp 4
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=8,
                  num_kv_heads=4),
    "small8": dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_layers=8, num_heads=8,
                   num_kv_heads=4),
    "llama-moe-3.5b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                           num_kv_heads=32),
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--vpp", type=int, default=1)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (truncate the shape)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--micro-batches", default="2,4,8", help="comma list of m (micro-batches per step)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--json", help="write the results here (rank 0)")
    return p, p.parse_args(argv)


def _launch(argv) -> int:
    """Not under torchrun: run this tool under torchrun with pp ranks on this machine."""
    p, a = parse(argv)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.pp}",
           os.path.abspath(__file__)] + list(argv if argv is not None else sys.argv[1:])
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // a.pp)))
    return subprocess.call(cmd, env=env)


def formula(p: int, m: int, v: int = 1) -> float:
    return (p - 1) / (v * m + p - 1)


def main(argv=None) -> int:
    if "RANK" not in os.environ:
        return _launch(argv)
    p, a = parse(argv)
    from megamoe.console import quiet_library_warnings
    quiet_library_warnings()
    import torch.distributed as dist

    from megamoe import parallel
    from megamoe.config import ModelConfig, MoEConfig, ParallelConfig
    from megamoe.training.config import PARAMS_DTYPES, OptimConfig, resolve_precision
    from megamoe.training.optim import build_optimizer, unwrap, wrap_model
    from megamoe.training.pipeline import build_model
    from megamoe.training.trainer import train_step
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    cuda = torch.cuda.is_available() and a.device != "cpu"
    precision = resolve_precision(a.precision, cuda)
    shape = dict(SHAPES[a.shape])
    if a.layers:
        shape["num_layers"] = a.layers
    mcfg = ModelConfig(**shape, max_position_embeddings=max(4096, a.seq_len), params_dtype=PARAMS_DTYPES[precision],
                       moe=MoEConfig(num_experts=8, top_k=2, router="mixtral", gate_network="linear",
                                     balance_loss_weight=0.01)).validate()
    ms = [int(x) for x in a.micro_batches.split(",") if x.strip()]
    pcfg = ParallelConfig(pp=a.pp, vpp=a.vpp)
    parallel.initialize(pcfg, mcfg)
    if dist.get_world_size() != a.pp:
        p.error(f"--pp {a.pp}: run with exactly pp ranks (world {dist.get_world_size()})")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(mcfg, pcfg)
    for m in model:
        m.to(device)
    ddp = wrap_model(model, mcfg, pcfg, precision)
    opt = build_optimizer(ddp, OptimConfig(lr=1e-4, warmup_steps=0, decay_style="constant"), pcfg, precision)
    rank, B, S = dist.get_rank(), a.micro_batch, a.seq_len
    g = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed_step(m):
        batches = iter([torch.randint(0, mcfg.vocab_size, (B, S + 1), generator=g) for _ in range(m)])
        dist.barrier()
        sync()
        t = time.perf_counter()
        r = train_step(ddp, opt, lambda: next(batches), m, device=device)
        sync()
        dt = time.perf_counter() - t
        return dt, r.lm_loss

    def stage_compute():
        """One micro-batch's forward + backward through this rank's chunks alone (no pipeline waits)."""
        tot = 0.0
        for chunk in unwrap(ddp):
            ids = torch.randint(0, mcfg.vocab_size, (B, S + 1), generator=g).to(device)
            x = None
            if not chunk.pre_process:
                x = torch.randn(S, B, mcfg.hidden_size, device=device, dtype=next(chunk.parameters()).dtype,
                                requires_grad=True)
                chunk.set_input_tensor(x)
            sync()
            t = time.perf_counter()
            out = chunk(ids[:, :-1], labels=ids[:, 1:], return_logits=False)
            if out.hidden is not None:
                out.hidden.backward(torch.randn_like(out.hidden))
            else:
                out.loss.backward()
            sync()
            tot += time.perf_counter() - t
            chunk.set_input_tensor(None)
            chunk.zero_grad(set_to_none=True)
        for c in ddp:
            c.zero_grad_buffer()
        return tot

    rows = []
    for m in ms:
        for _ in range(a.warmup):
            timed_step(m)
        steps = [timed_step(m)[0] for _ in range(a.rounds)]
        comp = []
        for _ in range(a.rounds):
            comp.append(stage_compute())
        t_stage = torch.tensor([statistics.median(comp)], dtype=torch.float64)
        all_t = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
        dist.all_gather(all_t, t_stage)
        T = torch.tensor([statistics.median(steps)], dtype=torch.float64)
        dist.all_reduce(T, op=dist.ReduceOp.MAX)
        per_stage = [float(x) for x in all_t]
        bubble = 1.0 - m * max(per_stage) / float(T)
        rows.append({"m": m, "step_s": float(T), "tokens_per_s": m * B * S / float(T), "stage_compute_s": per_stage,
                     "bubble": bubble, "formula": formula(a.pp, m, a.vpp)})
        if rank == 0:
            print(f"m {m:3d}: step {float(T) * 1e3:8.1f} ms, {m * B * S / float(T):9.0f} tok/s; stage f+b per "
                  f"micro-batch {', '.join(f'{t * 1e3:.1f}' for t in per_stage)} ms; bubble {bubble:6.1%} "
                  f"(1F1B formula {formula(a.pp, m, a.vpp):6.1%})", flush=True)
    if rank == 0:
        res = {"pp": a.pp, "vpp": a.vpp, "shape": a.shape, "layers": mcfg.num_layers, "micro_batch": B, "seq_len": S,
               "precision": precision, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
               "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None, "rows": rows}
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
    dist.barrier()
    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
