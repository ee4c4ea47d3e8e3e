#!/usr/bin/env python3
"""The construction report and LLaMA-MoE's claims in miniature, on the embedded SmolLM2-135M and the local corpus.

    python tools/science.py report --out science_out   # ppl before training: method x granularity x router, + oracle
    python tools/science.py fig3   --out science_out   # construction methods compared after the same training
    python tools/science.py fig7   --out science_out   # upcycled vs the same MoE trained from scratch
    python tools/science.py fig89  --out science_out   # routing by domain, shallow vs deep layers (heat-maps, JS)
    python tools/science.py memory --layers 2          # peak RSS of the megamoe recipe at the LLaMA-2-7B shape

Every command writes <out>/<command>/results.json, results.md (the table) and PNG plots (matplotlib), and reuses
what an earlier run left in <out> (the corpus, tokenized data, calibration tokens, conversions, finished arms), so an
interrupted command continues where it stopped. docs/science.md records the results and the commands.

Shared setup (the same for every arm of every command):
- data: megamoe.data.build_local_corpus (Python's own files: code, docstrings, reference, licences, man pages) tokenized
  per domain with the model's tokenizer (<out>/data);
- validation: the first --valid-seqs sequences of --seq-len tokens of each domain's held-out split (2048 tokens per
  domain by default; the `legal` domain holds fewer), scored with megamoe.eval.perplexity.domain_perplexity;
- calibration (routers fitted, k-means centroids, refitted down_proj, co-activation): --calib-tokens tokens of the
  domains' *training* splits, never the validation text.

Oracle router (`report`): every MoE layer takes, per token, the k experts whose outputs have the largest norm
(running every expert on every token), weights 1: what any router on that partition can at most pick. It is
computed here by running the experts of our model (`OracleRouter`), independently of the Gram-matrix formula in
megamoe.construct.ffn that the calibration fits to.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe import parallel  # noqa: E402
from megamoe.construct.calib_data import CalibrationData, tokens_from_indexed  # noqa: E402
from megamoe.construct.recipes import recipe_kwargs  # noqa: E402
from megamoe.data import DomainMixture, build_local_corpus  # noqa: E402
from megamoe.data.preprocess import PreprocessConfig, preprocess_domains  # noqa: E402
from megamoe.eval.load import load_model  # noqa: E402
from megamoe.eval.perplexity import domain_perplexity  # noqa: E402
from megamoe.fileio import atomic_write_text, temp_path  # noqa: E402
from megamoe.formats.embedded import materialize_smollm2  # noqa: E402
from megamoe.formats.hf_llama import load_hf_llama  # noqa: E402
from megamoe.formats.shards import ShardedCheckpoint  # noqa: E402
from megamoe.interchange import hf_to_moe  # noqa: E402
from megamoe.model import LlamaMoEModel  # noqa: E402
from megamoe.moe.layer import MoELayer  # noqa: E402
from megamoe.moe.router import Routing, RouterStats  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------------
# shared setup

class Setup:
    """Model, data, validation batches and calibration tokens shared by every arm (module docstring)."""

    def __init__(self, a):
        self.a = a
        self.out = os.path.abspath(a.out)
        os.makedirs(self.out, exist_ok=True)
        self.hf = os.path.abspath(a.hf_dir) if a.hf_dir else materialize_smollm2()
        data = os.path.join(self.out, "data")
        corpus, tok = os.path.join(data, "corpus"), os.path.join(data, "tokenized")
        if not os.path.isfile(os.path.join(corpus, "corpus.json")):
            shutil.rmtree(corpus, ignore_errors=True)
            build_local_corpus(corpus, max_mb=a.corpus_mb, seed=a.seed)
        self.manifest = os.path.join(tok, "manifest.json")
        if not os.path.isfile(self.manifest):
            shutil.rmtree(tok, ignore_errors=True)
            preprocess_domains(corpus, tok, self.hf, PreprocessConfig(workers=1, progress=False))
        mix = DomainMixture.from_manifest(self.manifest, weights="uniform", seq_len=a.seq_len, seed=a.seed)
        self.domains = list(mix.domains)
        # materialised once: every arm scores exactly these tokens
        self.valid = {d: list(mix.validation_batches(d, a.valid_seqs, 1)) for d in self.domains}
        self._calib = None
        parallel.initialize()

    def calibration(self) -> CalibrationData:
        if self._calib is None:
            p = os.path.join(self.out, "data", f"calib_{self.a.calib_tokens}_{self.a.calib_seq_len}.pt")
            if os.path.isfile(p):
                d = torch.load(p, weights_only=True)
                self._calib = CalibrationData(d["ids"], d["domains"])
            else:
                with open(self.manifest) as f:
                    man = json.load(f)
                root = os.path.dirname(self.manifest)
                pre = {d: os.path.join(root, v["train"]) for d, v in sorted(man["domains"].items())}
                self._calib = tokens_from_indexed(pre, seq_len=self.a.calib_seq_len, token_budget=self.a.calib_tokens)
                _save_tensors({"ids": self._calib.ids, "domains": self._calib.domains}, p)
        return self._calib

    def evaluate(self, model) -> tuple[dict, dict]:
        return domain_perplexity(model, {d: iter(b) for d, b in self.valid.items()})

    def evaluate_path(self, path: str, oracle: bool = False) -> tuple[dict, dict]:
        m = load_model(path).model
        if oracle:
            use_oracle_routers(m)
        return self.evaluate(m)

    def evaluate_dense(self) -> dict:
        p = os.path.join(self.out, "dense.json")
        if os.path.isfile(p):
            with open(p) as f:
                return json.load(f)
        cfg, sd = load_hf_llama(self.hf, dtype=torch.float32)
        m = LlamaMoEModel(cfg)
        m.load_state_dict(sd, strict=True)
        res, _ = self.evaluate(m)
        atomic_write_text(p, json.dumps(res, indent=1))
        return res


def _save_tensors(obj, path: str) -> None:
    """torch.save to a temporary name beside `path` (its directory made), then rename: a cache file is whole or
    absent."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temp_path(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def gmean(res: dict) -> float:
    return math.exp(sum(math.log(r["ppl"]) for r in res.values()) / len(res))


# ---------------------------------------------------------------------------------------------------------------
# the oracle router

class OracleRouter(nn.Module):
    """Routing of one MoE layer by the experts' own outputs: top-k experts by ||expert_e(x)||, weights 1 (times
    nothing: the sum of the k experts' outputs, as the dense FFN sums all of them)."""

    def __init__(self, layer: MoELayer):
        super().__init__()
        self._layer = [layer]                     # not a submodule: no parameters of its own
        self.num_experts, self.top_k = layer.router.num_experts, layer.router.top_k

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> Routing:
        experts = self._layer[0].experts
        norms = torch.stack([experts[e](x).float().norm(dim=-1) for e in range(self.num_experts)], 1)
        idx = norms.topk(self.top_k, dim=-1).indices
        counts = torch.bincount(idx.flatten(), minlength=self.num_experts)
        zero = torch.zeros(())
        stats = RouterStats(counts, counts.float(), counts.float(), zero, zero, torch.zeros((), dtype=torch.long),
                            int(x.shape[0]))
        return Routing(idx, torch.ones(idx.shape), None, None, stats)


def use_oracle_routers(model: nn.Module) -> int:
    """Replace every MoE layer's router by its OracleRouter; returns how many were replaced."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, MoELayer):
            mod.router = OracleRouter(mod)
            n += 1
    return n


# ---------------------------------------------------------------------------------------------------------------
# conversions

ROUTERS = {
    # router init -> hf_to_moe arguments on top of the construction (method, E, k)
    "random": {"router": "topk_noisy", "gate_network": "mlp", "gate_init": "random"},          # llama-moe v1
    "centroids": {"router": "mixtral", "gate_network": "linear", "gate_init": "centroids"},    # llama-moe v2 k-means
    "fitted": {"router": "mixtral", "gate_network": "linear", "gate_init": "random",
               "calibrate": {"router": "rank", "weights": "calibrated"}},
    "fitted+down": {"router": "mixtral", "gate_network": "linear", "gate_init": "random",
                    "calibrate": {"router": "rank", "weights": "calibrated", "reconstruct": ("experts",)}},
}


def convert(s: Setup, path: str, method: str, E: int, k: int, router: str, seed: int = 0,
            partitions_dir: str | None = None) -> str:
    """One conversion (reused when complete). Calibration tokens come from Setup.calibration()."""
    if os.path.isfile(os.path.join(path, "manifest.json")):
        return path
    shutil.rmtree(path, ignore_errors=True)
    spec = dict(ROUTERS[router])
    cal = spec.pop("calibrate", None)
    kw = recipe_kwargs("llama-moe-v1", calibrate=cal, num_experts=E, top_k=k, method=method, **spec)
    kw["calibration"] = None
    data = None
    if kw["calibrate"] is not None or method not in ("random", "clustering") or (
            spec["gate_init"] == "centroids" and method != "clustering"):
        data = s.calibration()
    if method not in ("random", "clustering") and partitions_dir is None:
        raise ValueError(f"method {method}: precompute partitions (see fig3) and pass partitions_dir")
    if spec["gate_init"] == "centroids" and method == "random" and partitions_dir is None:
        partitions_dir = centroid_partitions(s, method, E, seed)
    t = time.time()
    hf_to_moe(s.hf, path, seed=seed, progress=False, partitions_dir=partitions_dir, calibration_data=data, **kw)
    print(f"   converted {os.path.basename(path)} in {time.time() - t:.0f}s", flush=True)
    return path


def centroid_partitions(s: Setup, method: str, E: int, seed: int) -> str:
    """Partitions + v2 k-means router centroids (megamoe.construct.construct with gate_init='centroids')."""
    from megamoe.construct.pipeline import ConstructionSpec, construct, write_construction
    d = os.path.join(s.out, "partitions", f"{method}-E{E}-centroids")
    if not os.path.isfile(os.path.join(d, "partition", "construction.json")):
        spec = ConstructionSpec(method=method, num_experts=E, seed=seed, gate_init="centroids",
                                centroid_tokens=min(16384, s.a.calib_tokens))
        write_construction(d, construct(s.hf, spec, s.calibration()), spec)
    return d


# ---------------------------------------------------------------------------------------------------------------
# report: perplexity before training

def cmd_report(a) -> int:
    s = Setup(a)
    out = os.path.join(s.out, "report")
    os.makedirs(out, exist_ok=True)
    res_path = os.path.join(out, "results.json")
    results = json.load(open(res_path)) if os.path.isfile(res_path) else {}
    dense = s.evaluate_dense()
    results["dense"] = {"ppl": dense}
    grans = [tuple(int(v) for v in g.split("/")) for g in a.granularities]
    for method, (E, k), router in itertools.product(a.methods, grans, a.routers + ["oracle"]):
        name = f"{method}-E{E}k{k}-{router}"
        if name in results:
            continue
        t = time.time()
        if router == "oracle":
            path = convert(s, os.path.join(s.out, "arms", f"{method}-E{E}k{k}-random"), method, E, k, "random",
                           partitions_dir=_parts_for(s, method, E))
            ppl, _ = s.evaluate_path(path, oracle=True)
        else:
            path = convert(s, os.path.join(s.out, "arms", name), method, E, k, router,
                           partitions_dir=_parts_for(s, method, E) if router != "centroids" else
                           (centroid_partitions(s, method, E, 0) if method != "clustering" else None))
            ppl, _ = s.evaluate_path(path)
        results[name] = {"method": method, "experts": E, "top_k": k, "router": router, "ppl": ppl,
                         "seconds": round(time.time() - t, 1)}
        atomic_write_text(res_path, json.dumps(results, indent=1))
        print(f"   {name:<36} gmean ppl {gmean(ppl):>12,.1f}  ({time.time() - t:.0f}s)", flush=True)
    _report_table(s, results, out)
    return 0


def _parts_for(s: Setup, method: str, E: int) -> str | None:
    """Partitions of the data-dependent methods, computed once per (method, E) and shared by the arms."""
    if method in ("random", "clustering"):
        return None
    from megamoe.construct.pipeline import ConstructionSpec, construct, write_construction
    d = os.path.join(s.out, "partitions", f"{method}-E{E}")
    if not os.path.isfile(os.path.join(d, "partition", "construction.json")):
        spec = ConstructionSpec(method=method, num_experts=E)
        write_construction(d, construct(s.hf, spec, s.calibration()), spec)
    return d


def _report_table(s: Setup, results: dict, out: str):
    dense = results["dense"]["ppl"]
    rows = [("dense", dense)] + [(n, r["ppl"]) for n, r in results.items() if n != "dense"]
    lines = ["| arm | " + " | ".join(s.domains) + " | geo. mean | x dense |",
             "|---|" + "---|" * (len(s.domains) + 2)]
    gd = gmean(dense)
    for n, ppl in rows:
        lines.append(f"| {n} | " + " | ".join(f"{ppl[d]['ppl']:,.1f}" for d in s.domains)
                     + f" | {gmean(ppl):,.1f} | {gmean(ppl) / gd:,.1f} |")
    atomic_write_text(os.path.join(out, "results.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    plt = _plt()
    if plt is None:
        return
    names = [n for n, _ in rows]
    vals = [gmean(p) for _, p in rows]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(names) + 1.2))
    ax.barh(range(len(names)), vals, color=["#444" if n == "dense" else "#c44" if n.endswith("oracle") else "#48a"
                                            for n in names])
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.axvline(gd * 50, color="k", ls=":", lw=0.8)
    ax.set_xlabel("validation perplexity before training (geometric mean over domains; dotted: 50x dense)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "report.png"), dpi=120)
    plt.close(fig)


def _plt():
    try:
        import matplotlib  # optional dependency: plots are skipped without it
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("   (matplotlib is not installed: no plots)")
        return None


# ---------------------------------------------------------------------------------------------------------------
# training arms (fig3, fig7)

def train_arm(s: Setup, name: str, init_path: str | None, steps: int, model_cfg=None) -> dict:
    """Continual pre-training of one arm with megamoe.train's run() on configs/quickstart.yaml: `steps` steps of
    --batch x --seq-len tokens (the same for every arm), no intermediate evaluation. init_path None: from scratch
    (random init of `model_cfg`). Calibrated routers (the megamoe recipe) stay frozen, as in the quickstart.
    Returns {"losses", "ppl", "tokens", "seconds", "final_model"} (cached)."""
    from megamoe.config import read_yaml
    from megamoe.training.config import TrainConfig, apply_overrides
    from megamoe.training.init import calibrated_routers
    from megamoe.training.trainer import run
    d = os.path.join(s.out, "runs", name)
    done = os.path.join(d, "arm.json")
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    shutil.rmtree(d, ignore_errors=True)
    a = s.a
    over = [f"out_dir={d}", f"data.manifest={s.manifest}", f"data.seq_len={a.seq_len}", f"data.seed={a.seed}",
            f"train.steps={steps}", f"train.global_batch_tokens={a.batch * a.seq_len}",
            f"train.micro_batch_size={a.batch}", f"train.seed={a.seed}", "train.precision=fp32",
            f"optim.lr={a.lr}", f"optim.warmup_steps={max(2, steps // 10)}", "eval.interval=0", "eval.at_end=false",
            "eval.plots=false", "checkpoint.interval=0", "log.interval=1", "log.tensorboard=false"]
    if init_path is None:
        over += ["init.source=random", "init.path=null"]
    else:
        over += ["init.source=megamoe", f"init.path={init_path}"]
        with open(os.path.join(init_path, "manifest.json")) as f:
            if calibrated_routers(json.load(f)):    # fitted routers (weights ~1e-4): kept as fitted, as the
                over.append("train.freeze_routers=true")   # quickstart and megamoe-train's warning do
    raw = apply_overrides(read_yaml(os.path.join(ROOT, "configs", "quickstart.yaml")), over)
    if model_cfg is not None:
        raw["model"] = model_cfg.to_dict()
    t = time.time()
    summary = run(TrainConfig.from_dict(raw))
    ppl, routing = s.evaluate_path(summary["final_model"])
    out = {"name": name, "losses": {int(k): v for k, v in summary["losses"].items()}, "ppl": ppl,
           "routing": routing, "tokens": summary["tokens"], "steps": summary["steps"],
           "seconds": round(time.time() - t, 1), "final_model": summary["final_model"]}
    atomic_write_text(done, json.dumps(out, indent=1))
    return out


def _lm_losses(r: dict) -> dict:
    """{step: the training cross entropy} of an arm, from its run's metrics.jsonl (the summary's losses add the
    routers' balance loss, which differs between routers by orders of magnitude: the mixtral balance loss of a
    128/32 model is ~9.7 summed over 30 layers, a top-2 noisy router's ~0.01)."""
    path = os.path.join(os.path.dirname(r["final_model"]), "metrics.jsonl") if r.get("final_model") else ""
    if not os.path.isfile(path):
        return {int(k): v for k, v in r["losses"].items()}
    out = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("kind") == "train" and "lm_loss" in rec:
                out[int(rec["step"])] = rec["lm_loss"]
    return out


def _plot_losses(arms: dict, path: str, title: str, before: dict | None = None):
    plt = _plt()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in arms.items():
        lm = _lm_losses(r)
        steps = sorted(lm)
        ax.plot(steps, [lm[k] for k in steps],
                label=f"{name}: ppl {gmean(r['ppl']):,.1f}" + (f" (before {gmean(before[name]):,.0f})"
                                                              if before and name in before else ""))
    ax.set_xlabel("step")
    ax.set_ylabel("training cross entropy (balance loss not included)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _arms_table(s: Setup, arms: dict, dense: dict, before: dict | None = None) -> list:
    gd = gmean(dense)
    lines = ["| arm | " + " | ".join(s.domains) + " | geo. mean | x dense |" + (" before training |" if before else ""),
             "|---|" + "---|" * (len(s.domains) + 2 + (1 if before else 0))]
    lines.append("| dense | " + " | ".join(f"{dense[d]['ppl']:,.1f}" for d in s.domains) + f" | {gd:,.1f} | 1.0 |"
                 + (" |" if before else ""))
    for n, r in arms.items():
        p = r["ppl"]
        lines.append(f"| {n} | " + " | ".join(f"{p[d]['ppl']:,.1f}" for d in s.domains)
                     + f" | {gmean(p):,.1f} | {gmean(p) / gd:,.1f} |"
                     + (f" {gmean(before[n]):,.1f} |" if before and n in before else (" |" if before else "")))
    return lines


FIG3_METHODS = {
    # name -> (method, E, k, router, extra ConstructionSpec fields for the gradient family)
    "independent-random": ("random", 8, 2, "random", {}),
    "independent-clustering": ("clustering", 8, 2, "random", {}),
    "sharing-inner": ("sharing-inner", 8, 2, "random", {}),
    "sharing-inter": ("sharing-inter", 7, 1, "random", {}),       # 1 residual block + 7 routed, top-1 (v2's 1+7)
    "megamoe": (None, 128, 32, None, {}),                        # the default recipe (recipe_kwargs("megamoe"))
}


def _gradient_partitions(s: Setup, name: str) -> str:
    """Sharing-inner / sharing-inter partitions from one gradient-importance pass (cached)."""
    from megamoe.construct.calibration import gradient_importance
    from megamoe.construct.layer_stream import LayerStream
    from megamoe.construct.partition import split_sharing_inner, split_sharing_inter, write_partitions
    d = os.path.join(s.out, "partitions", name)
    if os.path.isdir(os.path.join(d, "partition")):
        return d
    imp_path = os.path.join(s.out, "partitions", "gradient_importance_8.pt")
    if os.path.isfile(imp_path):
        imp = {int(k): v.numpy() for k, v in torch.load(imp_path, weights_only=True).items()}
    else:
        data = s.calibration()
        n = min(data.ids.shape[0], max(8, s.a.gradient_tokens // data.ids.shape[1]))
        sub = CalibrationData(data.ids[:: max(1, data.ids.shape[0] // n)][:n],
                              None if data.domains is None else data.domains[:: max(1, data.ids.shape[0] // n)][:n])
        t = time.time()
        g = gradient_importance(LayerStream(s.hf), sub, clusters="kmeans", num_clusters=8)
        print(f"   gradient importance ({sub.num_tokens} tokens) in {time.time() - t:.0f}s", flush=True)
        imp = g.importance
        _save_tensors({str(k): torch.from_numpy(np.ascontiguousarray(v)) for k, v in imp.items()}, imp_path)
    f = next(iter(imp.values())).shape[1]
    if name == "sharing-inner":                   # each of 8 experts: its cluster's top F/8 neurons (overlaps)
        parts = {i: split_sharing_inner(v, f // 8) for i, v in imp.items()}
    else:                                         # the 7 clusters' importance, residual F/8, 7 routed of F/8
        parts = {i: split_sharing_inter(v[:7], f // 8) for i, v in imp.items()}
    write_partitions(d, parts)
    return d


def cmd_fig3(a) -> int:
    s = Setup(a)
    out = os.path.join(s.out, "fig3")
    os.makedirs(out, exist_ok=True)
    dense = s.evaluate_dense()
    arms, before = {}, {}
    for name in a.fig3_methods:
        method, E, k, router, _ = FIG3_METHODS[name]
        path = os.path.join(s.out, "arms", f"fig3-{name}")
        if name == "megamoe":
            if not os.path.isfile(os.path.join(path, "manifest.json")):
                kw = recipe_kwargs("megamoe")
                kw["calibration"] = None
                hf_to_moe(s.hf, path, seed=0, progress=False, calibration_data=s.calibration(), **kw)
        else:
            pdir = _gradient_partitions(s, name) if method.startswith("sharing") else None
            convert(s, path, method, E, k, router, partitions_dir=pdir)
        bpath = os.path.join(path, "ppl_before.json")
        if not os.path.isfile(bpath):
            atomic_write_text(bpath, json.dumps(s.evaluate_path(path)[0]))
        with open(bpath) as f:
            before[name] = json.load(f)
        arms[name] = train_arm(s, f"fig3-{name}", path, a.steps)
        print(f"   {name:<24} before {gmean(before[name]):>12,.1f}  after {a.steps} steps "
              f"{gmean(arms[name]['ppl']):>9,.1f}", flush=True)
    lines = _arms_table(s, arms, dense, before)
    _write(out, {"arms": arms, "before": before, "dense": dense, "steps": a.steps,
                 "tokens_per_arm": a.steps * a.batch * a.seq_len}, lines)
    _plot_losses(arms, os.path.join(out, "fig3_loss.png"),
                 f"construction methods, {a.steps} steps x {a.batch * a.seq_len} tokens each", before)
    return 0


def cmd_fig7(a) -> int:
    s = Setup(a)
    out = os.path.join(s.out, "fig7")
    os.makedirs(out, exist_ok=True)
    dense = s.evaluate_dense()
    arms, before = {}, {}
    recipes = {"llama-moe-v1": ("random", 8, 2, "random")}
    for recipe in a.fig7_recipes:
        path = os.path.join(s.out, "arms", f"fig7-{recipe}")
        if recipe == "megamoe":
            if not os.path.isfile(os.path.join(path, "manifest.json")):
                kw = recipe_kwargs("megamoe")
                kw["calibration"] = None
                hf_to_moe(s.hf, path, seed=0, progress=False, calibration_data=s.calibration(), **kw)
        else:
            convert(s, path, *recipes[recipe])
        ck = ShardedCheckpoint(path)
        cfg = ck.config
        ck.close()
        before[f"{recipe} upcycled"] = s.evaluate_path(path)[0]
        arms[f"{recipe} upcycled"] = train_arm(s, f"fig7-{recipe}-upcycled", path, a.steps)
        arms[f"{recipe} from scratch"] = train_arm(s, f"fig7-{recipe}-scratch", None, a.steps, model_cfg=cfg)
    lines = _arms_table(s, arms, dense, before)
    _write(out, {"arms": arms, "before": before, "dense": dense, "steps": a.steps,
                 "tokens_per_arm": a.steps * a.batch * a.seq_len}, lines)
    _plot_losses(arms, os.path.join(out, "fig7_loss.png"),
                 f"upcycled vs from scratch, {a.steps} steps x {a.batch * a.seq_len} tokens each", before)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# fig 8 / 9: routing by domain

def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2: in [0, 1]) between two distributions over experts."""
    p, q = np.asarray(p, float), np.asarray(q, float)
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(x, y):
        nz = x > 0
        return float((x[nz] * np.log2(x[nz] / y[nz])).sum())
    return math.sqrt(max(0.0, 0.5 * kl(p, m) + 0.5 * kl(q, m)))


def routing_specialisation(routing: dict) -> dict:
    """routing: {domain: [per MoE layer: expert load fractions]} -> per layer the mean pairwise JS distance between
    domains, and the last layer's domain x domain matrix."""
    doms = [d for d in routing if routing[d] is not None]
    n_layers = len(routing[doms[0]])
    per_layer = []
    for li in range(n_layers):
        ds = [js_distance(routing[x][li], routing[y][li]) for x, y in itertools.combinations(doms, 2)]
        per_layer.append(float(np.mean(ds)) if ds else 0.0)
    last = [[js_distance(routing[x][-1], routing[y][-1]) for y in doms] for x in doms]
    return {"domains": doms, "js_mean_per_layer": per_layer, "js_last_layer": last}


def cmd_fig89(a) -> int:
    s = Setup(a)
    out = os.path.join(s.out, "fig89")
    os.makedirs(out, exist_ok=True)
    models = {}
    for spec in a.models or []:
        name, _, path = spec.rpartition("=")
        models[name or os.path.basename(os.path.normpath(path))] = path
    if not models:   # the Fig. 7 arms when they exist, else the v1 conversion before training
        for n in ("fig7-llama-moe-v1-upcycled", "fig7-megamoe-upcycled"):
            p = os.path.join(s.out, "runs", n, "arm.json")
            if os.path.isfile(p):
                with open(p) as f:
                    models[n + " (trained)"] = json.load(f)["final_model"]
        v1 = os.path.join(s.out, "arms", "fig7-llama-moe-v1")
        models["llama-moe-v1 converted (before training)"] = convert(s, v1, "random", 8, 2, "random")
    result = {}
    for name, path in models.items():
        _, routing = s.evaluate_path(path)
        spec = routing_specialisation(routing)
        result[name] = {"path": path, "routing": routing, **spec}
        js = spec["js_mean_per_layer"]
        print(f"   {name}: JS distance between domains, layer 0 {js[0]:.3f}, middle {js[len(js) // 2]:.3f}, "
              f"last {js[-1]:.3f}", flush=True)
    lines = ["| model | " + " | ".join(f"layer {i}" for i in _show_layers(result)) + " | mean |",
             "|---|" + "---|" * (len(_show_layers(result)) + 1)]
    for name, r in result.items():
        js = r["js_mean_per_layer"]
        lines.append(f"| {name} | " + " | ".join(f"{js[i]:.3f}" for i in _show_layers(result))
                     + f" | {np.mean(js):.3f} |")
    _write(out, result, lines)
    _plot_fig89(result, out)
    return 0


def _show_layers(result: dict) -> list:
    n = len(next(iter(result.values()))["js_mean_per_layer"])
    return sorted({0, n // 4, n // 2, (3 * n) // 4, n - 1})


def _plot_fig89(result: dict, out: str):
    plt = _plt()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, r in result.items():
        ax.plot(r["js_mean_per_layer"], marker=".", label=name)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("mean JS distance between domains")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "fig89_js_by_layer.png"), dpi=120)
    plt.close(fig)
    for k, (name, r) in enumerate(result.items()):
        doms = r["domains"]
        layers = _show_layers(result)
        fig, axes = plt.subplots(1, len(layers) + 1, figsize=(3.2 * (len(layers) + 1), 2.8))
        for ax, li in zip(axes, layers):
            m = np.array([r["routing"][d][li] for d in doms])
            ax.imshow(m, aspect="auto", cmap="Reds")
            ax.set_title(f"layer {li}", fontsize=8)
            ax.set_yticks(range(len(doms)), doms, fontsize=6)
            ax.set_xlabel("expert", fontsize=7)
        im = axes[-1].imshow(np.array(r["js_last_layer"]), cmap="viridis", vmin=0)
        axes[-1].set_xticks(range(len(doms)), doms, fontsize=6, rotation=60)
        axes[-1].set_yticks(range(len(doms)), doms, fontsize=6)
        axes[-1].set_title("JS distance, last layer", fontsize=8)
        fig.colorbar(im, ax=axes[-1])
        fig.suptitle(name, fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"fig89_heatmaps_{k}.png"), dpi=120)
        plt.close(fig)


def _write(out: str, result: dict, lines: list):
    atomic_write_text(os.path.join(out, "results.json"), json.dumps(result, indent=1, default=str))
    atomic_write_text(os.path.join(out, "results.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------------------
# memory: peak RSS of a calibrated conversion at the LLaMA-2-7B shape

_MEMORY_CHILD = """
import sys, json, resource, time, torch
from megamoe.construct.calib_data import CalibrationData
from megamoe.construct.recipes import recipe_kwargs
from megamoe.interchange import hf_to_moe
src, out, tokens, seq = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ids = torch.randint(0, 32000, (max(1, tokens // seq), seq), generator=torch.Generator().manual_seed(0))
kw = recipe_kwargs("megamoe")
kw["calibration"] = None
t = time.time()
s = hf_to_moe(src, out, progress=False, calibration_data=CalibrationData(ids), **kw)
print(json.dumps({"seconds": time.time() - t, "guard": s["guard"], "calibration": s.get("calibration"),
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def cmd_memory(a) -> int:
    """The megamoe recipe (coactivation split, fitted routers, refitted down_proj) on a LLaMA-2-7B-shaped
    checkpoint (hidden 4096, FFN 11008, vocabulary 32000, fp16 random weights; tools/bench_convert.py's source) of
    --layers layers, in a child process: its peak RSS (ru_maxrss). Memory is bounded per layer, so a few full-width
    layers show the peak of the 32-layer model; the time grows with the layers."""
    import subprocess
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from bench_convert import make_source
    work = os.path.abspath(a.work)
    src = os.path.join(work, f"llama2-7b-shape-{a.layers}l")
    make_source(src, a.layers)
    out = os.path.join(work, "moe")
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, src, out, str(a.tokens), str(a.calib_seq_len)],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        return 1
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res.update(layers=a.layers, tokens=a.tokens, peak_rss_gib=round(res["maxrss_kb"] / (1 << 20), 2),
               load_average=os.getloadavg())
    print(json.dumps(res, indent=1))
    os.makedirs(os.path.join(os.path.abspath(a.out), "memory"), exist_ok=True)
    atomic_write_text(os.path.join(os.path.abspath(a.out), "memory", f"rss_{a.layers}l_{a.tokens}.json"),
                      json.dumps(res, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="tools/science.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--out", default="science_out")
        sp.add_argument("--hf-dir", default=None, help="dense HF LLaMA (default: the embedded SmolLM2-135M)")
        sp.add_argument("--seq-len", type=int, default=256)
        sp.add_argument("--valid-seqs", type=int, default=8, help="validation sequences per domain")
        sp.add_argument("--calib-tokens", type=int, default=16384)
        sp.add_argument("--calib-seq-len", type=int, default=256)
        sp.add_argument("--corpus-mb", type=float, default=1.0)
        sp.add_argument("--seed", type=int, default=1227)

    def training(sp):
        sp.add_argument("--steps", type=int, default=40, help="training steps per arm (the same for every arm)")
        sp.add_argument("--batch", type=int, default=4, help="sequences of --seq-len per step")
        sp.add_argument("--lr", type=float, default=5e-4)

    r = sub.add_parser("report", help="perplexity before training: method x granularity x router, + oracle")
    common(r)
    r.add_argument("--methods", nargs="+", default=["random", "clustering"],
                   help="random clustering coactivation gradient (default: random clustering)")
    r.add_argument("--granularities", nargs="+", default=["8/2", "64/16", "128/32"], help="E/k pairs (default 8/2 64/16 128/32)")
    r.add_argument("--routers", nargs="+", default=list(ROUTERS), choices=list(ROUTERS))
    f3 = sub.add_parser("fig3", help="construction methods compared after the same training")
    common(f3)
    training(f3)
    f3.add_argument("--fig3-methods", nargs="+", default=list(FIG3_METHODS), choices=list(FIG3_METHODS))
    f3.add_argument("--gradient-tokens", type=int, default=4096, help="tokens for the gradient-importance pass")
    f7 = sub.add_parser("fig7", help="upcycled vs the same MoE from scratch")
    common(f7)
    training(f7)
    f7.add_argument("--fig7-recipes", nargs="+", default=["llama-moe-v1"], choices=["llama-moe-v1", "megamoe"])
    f8 = sub.add_parser("fig89", help="routing specialisation by domain (heat-maps, JS distance per layer)")
    common(f8)
    f8.add_argument("--models", nargs="*", metavar="[NAME=]DIR", help="MoE shard directories (default: fig7's)")
    mem = sub.add_parser("memory", help="peak RSS of the megamoe recipe on a LLaMA-2-7B-shaped checkpoint")
    mem.add_argument("--out", default="science_out")
    mem.add_argument("--work", default="bench_work", help="where the synthetic source is written (reused)")
    mem.add_argument("--layers", type=int, default=2, help="decoder layers of the synthetic source (32: the full 7B)")
    mem.add_argument("--tokens", type=int, default=1024, help="calibration tokens (random ids)")
    mem.add_argument("--calib-seq-len", type=int, default=256)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t = time.time()
    rc = {"report": cmd_report, "fig3": cmd_fig3, "fig7": cmd_fig7, "fig89": cmd_fig89, "memory": cmd_memory}[a.cmd](a)
    print(f"\n{a.cmd} done in {time.time() - t:.0f}s -> {os.path.join(os.path.abspath(a.out), a.cmd)}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
