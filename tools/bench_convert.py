#!/usr/bin/env python3
"""Benchmark hf-to-moe on a LLaMA-2-7B-shaped checkpoint against `cp` of the same bytes, in the same run.

    python tools/bench_convert.py                      # 8 layers (~3.7 GB fp16), 8 experts, TP2/EP2, random split
    python tools/bench_convert.py --layers 32          # the full 7B shape (~13.5 GB)
    python tools/bench_convert.py --no-guard           # also time the conversion without the logits guard
    python tools/bench_convert.py --writer-checksum    # the shard writer alone, with and without tensor checksums

The source (hidden 4096, FFN 11008, vocabulary 32000, 32 heads, fp16 random weights, sharded HF safetensors) is
written once under --work and reused. Then, with the source in the page cache for both:

    cp      `cp -r SRC DST`                                           (the floor: same bytes read and written)
    convert `tools/checkpoint_convert.py hf-to-moe --src SRC --experts 8 --tp 2 --ep 2` in a subprocess

Reported: wall time of each (best of --repeat), the ratio convert / cp (goal <= 1.5), and the conversion's peak RSS
(goal < 4 GB; ru_maxrss of the child process). The conversion includes the source checksum (xxh3_128, on a
second thread, started before torch is imported) and the guard (dense vs MoE logits on 2 x 16 tokens, the written
shards read back). With --no-guard the same runs are repeated with --guard-tokens 0 and both ratios are printed.
Timings on a shared machine are noisy: the load average is printed before and after, with the CPU times.

--writer-checksum times what the per-tensor checksums of the shard manifest cost: the dense source written through
a `ShardWriter` (TP2, one background writer thread, the way hf-to-moe writes: uncast source tensors copied file to
file, down_proj column halves row by row) with and without checksums, alternating, best of --repeat each. The
digests are computed by the writer thread as the bytes go out (copied tensors: read back from the source through
a small buffer), so on a machine with a free core the cost is that thread's extra CPU time, not wall time.

Virtual machines that return free memory to the hypervisor (virtio-balloon free page reporting: freed pages are
handed back within a second or two, and touching them again costs a host fault) make fresh page-cache pages up to
5-10x dearer for a run that starts writing even half a second after the last cleanup than for one that starts at
once (1 GB of pwrite on our VM: 0.28 s at once, 1.3-1.45 s after 0.5-5 s). `cp` (about 1 s)
reuses the pages its cleanup just freed; a longer run soon writes into returned pages. `--settle S` waits S
seconds after each cleanup (the source is read again just before the timed run) so that every run starts from
the same returned-memory state; the default 0 times each run straight after its cleanup. The bench says when
the machine's balloon driver reports free pages.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.config import ParallelConfig  # noqa: E402
from megamoe.formats.hf_dir import HFDir  # noqa: E402
from megamoe.formats.hf_llama import config_from_hf  # noqa: E402
from megamoe.formats.hf_writer import HFWriter, write_json  # noqa: E402
from megamoe.formats.layout import hf_llama_to_ours_name  # noqa: E402
from megamoe.formats.shards import FILE_SOURCE, ShardWriter  # noqa: E402


def make_source(path: str, layers: int, hidden=4096, ffn=11008, vocab=32000, heads=32, shard_gb=2.0):
    marker = os.path.join(path, ".complete")
    if os.path.isfile(marker):
        return
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    H, F, V = hidden, ffn, vocab
    plan = [("model.embed_tokens.weight", "F16", [V, H])]
    for i in range(layers):
        p = f"model.layers.{i}."
        plan += [(p + "input_layernorm.weight", "F16", [H])]
        plan += [(p + f"self_attn.{x}_proj.weight", "F16", [H, H]) for x in "qkvo"]
        plan += [(p + "post_attention_layernorm.weight", "F16", [H])]
        plan += [(p + "mlp.gate_proj.weight", "F16", [F, H]), (p + "mlp.up_proj.weight", "F16", [F, H]),
                 (p + "mlp.down_proj.weight", "F16", [H, F])]
    plan += [("model.norm.weight", "F16", [H]), ("lm_head.weight", "F16", [V, H])]
    w = HFWriter(path, plan, max_shard_bytes=int(shard_gb * (1 << 30)))
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for n, _, shape in plan:
        if n.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.float16)
        else:
            t = (torch.randn(shape, generator=g) * (1.0 / shape[-1] ** 0.5)).to(torch.float16)
        w.write(n, t)
    w.close()
    write_json(os.path.join(path, "config.json"), {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": H,
        "intermediate_size": F, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "float16"})
    open(marker, "w").close()
    print(f"wrote the source ({layers} layers) in {time.time() - t0:.1f} s", flush=True)


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def warm(path: str):
    """Read every file under `path` (into the page cache)."""
    for r, _, fs in os.walk(path):
        for f in fs:
            with open(os.path.join(r, f), "rb", buffering=0) as fh:
                while fh.read(64 << 20):
                    pass


def free_page_reporting() -> bool:
    """True when a virtio-balloon device with free page reporting (feature bit 5) is bound: a VM that gives
    free memory back to its host."""
    root = "/sys/bus/virtio/drivers/virtio_balloon"
    try:
        for d in os.listdir(root):
            feats = os.path.join(root, d, "features")
            if os.path.isfile(feats):
                bits = open(feats).read().strip()
                if len(bits) > 5 and bits[5] == "1":
                    return True
    except OSError:
        pass
    return False


def timed(cmd) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit status) of a child process; its CPU seconds go to timed.last_cpu."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    out, err = p.stdout.read(), p.stderr.read()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.stderr.write(err.decode()[-3000:])
    timed.last_stdout = out.decode()
    timed.last_cpu = ru.ru_utime + ru.ru_stime
    return wall, ru.ru_maxrss * 1024, p.returncode


def bench_writer(src: str, out: str, repeat: int, tp: int = 2) -> dict:
    """Seconds (best of `repeat`) to write the dense source `src` as TP-`tp` shards through a ShardWriter with one
    writer thread, {"off": without checksums, "on": with them (the default algorithm)}."""
    hf = HFDir(src)
    cfg = config_from_hf(hf.config, os.path.join(src, "config.json"))
    key_of = {hf_llama_to_ours_name(k): k for k in hf.keys()}
    times = {"off": [], "on": []}
    try:
        for _ in range(repeat):
            for mode in ("off", "on"):
                shutil.rmtree(out, ignore_errors=True)
                os.makedirs(out)
                t0 = time.perf_counter()
                w = ShardWriter(out, cfg, ParallelConfig(tp=tp), {n: hf.dtype(k) for n, k in key_of.items()},
                                threads=1, checksum=mode == "on")
                mark = w.mark()
                for i, n in enumerate(w.names):
                    t = hf.map(key_of[n])
                    where = hf.file_source(key_of[n])
                    if where is not None:
                        setattr(t, FILE_SOURCE, where)
                    w.write(n, t)
                    if i % 8 == 7:  # bound what is in flight, as hf-to-moe does per layer
                        w.wait(mark)
                        mark = w.mark()
                w.close()
                times[mode].append(time.perf_counter() - t0)
    finally:
        hf.close()
        shutil.rmtree(out, ignore_errors=True)
    return {k: min(v) for k, v in times.items()} | {"runs": times}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the 7B-shaped source (default 8)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each, best taken (default 2)")
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "megamoe-bench-convert"),
                    help="scratch directory (the source is kept there for reuse)")
    ap.add_argument("--no-guard", action="store_true", help="also time hf-to-moe with --guard-tokens 0 (no guard)")
    ap.add_argument("--writer-checksum", action="store_true",
                    help="time only the shard writer, with and without per-tensor checksums (see above)")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="seconds to wait after each cleanup before the timed run (VM free page reporting, above)")
    args = ap.parse_args(argv)

    src = os.path.join(args.work, f"llama7b-shape-{args.layers}l")
    make_source(src, args.layers)
    nbytes = du(src)
    if args.writer_checksum:
        warm(src)
        r = bench_writer(src, os.path.join(args.work, "out"), args.repeat, tp=args.tp)
        print(f"shard writer, {nbytes / 1e9:.2f} GB, TP{args.tp}, one writer thread: without checksums "
              f"{r['off']:.2f} s, with {r['on']:.2f} s ({(r['on'] / r['off'] - 1) * 100:+.0f}%); runs {r['runs']}; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        return 0
    tool = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoint_convert.py")
    dst = os.path.join(args.work, "out")
    conv = [sys.executable, tool, "hf-to-moe", "--src", src, "--out", dst, "--experts", str(args.experts),
            "--top-k", "2", "--tp", str(args.tp), "--ep", str(args.ep), "--quiet", "--json"]

    def clean():
        shutil.rmtree(dst, ignore_errors=True)
        subprocess.run(["sync"])
        if args.settle > 0:
            time.sleep(args.settle)
            warm(src)

    load_before = os.getloadavg()
    clean()
    subprocess.run(["cp", "-r", src, dst], check=True)  # warm the page cache with the source
    cps, convs, rss, cp_cpu, conv_cpu = [], [], 0, [], []
    summary = None
    for _ in range(args.repeat):
        clean()
        cps.append(timed(["cp", "-r", src, dst])[0])
        cp_cpu.append(timed.last_cpu)
        clean()
        wall, peak, rc = timed(conv)
        if rc != 0:
            print(f"conversion failed (exit {rc})")
            return 1
        convs.append(wall)
        conv_cpu.append(timed.last_cpu)
        rss = max(rss, peak)
        summary = json.loads(timed.last_stdout)
    clean()
    cp_t, conv_t = min(cps), min(convs)
    ratio = conv_t / cp_t
    print(f"source: LLaMA-2-7B shape, {args.layers} layers, fp16, {nbytes / 1e9:.2f} GB; -> {args.experts} experts, "
          f"TP{args.tp}/EP{args.ep}")
    print(f"cp -r           {cp_t:7.2f} s  ({nbytes / cp_t / 1e9:.2f} GB/s)   runs {[round(x, 2) for x in cps]}")
    print(f"hf-to-moe       {conv_t:7.2f} s  ({nbytes / conv_t / 1e9:.2f} GB/s)   runs {[round(x, 2) for x in convs]}")
    print(f"ratio           {ratio:7.2f}x cp   (goal <= 1.5)  {'PASS' if ratio <= 1.5 else 'MISS'}")
    print(f"peak RSS        {rss / 2**30:7.2f} GiB (goal < 4)   {'PASS' if rss < 4 * 2**30 else 'MISS'}")
    print(f"CPU (user+sys)  cp {min(cp_cpu):.2f} s, hf-to-moe {min(conv_cpu):.2f} s  (on a loaded machine wall time "
          f"tracks the CPU share the scheduler gives; load average {load_before[0]:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores)")
    if free_page_reporting():
        print(f"note: this VM reports free pages to its host (virtio-balloon); runs started {args.settle:g} s after "
              f"their cleanup{' (--settle)' if args.settle else ''}: see --help")
    print("guard:", *summary["guard"], sep="\n  ")
    if args.no_guard:
        ng, ng_cpu = [], []
        for _ in range(args.repeat):
            clean()
            wall, _, rc = timed(conv + ["--guard-tokens", "0"])
            ng.append(wall)
            ng_cpu.append(timed.last_cpu)
        clean()
        print(f"without guard   {min(ng):7.2f} s  ratio {min(ng) / cp_t:.2f}x cp  (CPU {min(ng_cpu):.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
