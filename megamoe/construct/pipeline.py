"""One call from a dense HF LLaMA directory to per-layer partitions (+ router centroids): what the converter runs.

    spec = ConstructionSpec(method="gradient", num_experts=8, clusters="centroids", gate_init="centroids")
    data = tokens_from_jsonl("calib.jsonl", tokenizer=model_dir, seq_len=2048, token_budget=131072)
    result = construct(model_dir, spec, data)            # streams the model layer by layer
    write_construction(out_dir, result)                  # partition/layers.{i}.mlp.json + construction.json
    cfg, state = build_moe(dense_cfg, dense_state, result.partitions, moe, gate_init=spec.gate_init,
                           centroids=result.centroids)

Which inputs each method needs:

| method        | needs data | statistics                                   | partition function      |
|---------------|-----------|-----------------------------------------------|-------------------------|
| random        | no        | -                                             | split_random            |
| clustering    | no        | rows of W_up / W_gate                         | split_clustering        |
| coactivation  | yes       | co-activation matrix per layer (forward)      | split_coactivation      |
| gradient      | yes       | importance per cluster (forward + backward)   | split_gradient          |
| sharing-inner | yes       | idem                                          | split_sharing_inner     |
| sharing-inter | yes       | idem                                          | split_sharing_inter     |

Router centroids (`gate_init="centroids"`), expert e's gate row:
- clustering: the k-means centroid of expert e's (normalised) weight rows, a direction in the hidden space, so the
  logit x . c_e is large where expert e's up-projections fire (no data needed);
- gradient family: the mean MLP input of cluster e's tokens (cluster e built expert e); with clusters="centroids"
  (v2), the size-constrained k-means centroids the tokens were assigned with;
- random and coactivation (no cluster behind an expert): v2's k-means on MLP-input features, then each centroid is
  matched one-to-one to the expert whose neurons it activates most (mean sum |h_j| over the cluster's tokens,
  Hungarian assignment), so the initial router sends tokens to experts that respond to them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from megamoe.construct.calib_data import CalibrationData
from megamoe.construct.calibration import activation_stats, gradient_importance, router_centroids
from megamoe.construct.layer_stream import LayerStream
from megamoe.construct.partition import (METHODS, Partition, PartitionError, split_clustering, split_coactivation,
                                         split_gradient, split_random, split_sharing_inner, split_sharing_inter,
                                         write_partitions)
from megamoe.fileio import atomic_write_text, temp_path

__all__ = ["ConstructionSpec", "ConstructionResult", "construct", "write_construction", "match_centroids"]

DATA_METHODS = ("coactivation", "gradient", "sharing-inner", "sharing-inter")
GRADIENT_METHODS = ("gradient", "sharing-inner", "sharing-inter")


@dataclass
class ConstructionSpec:
    method: str
    num_experts: int
    seed: int = 0
    layers: list | None = None             # MoE layers to construct (None: all)
    gate_init: str = "random"              # random | centroids (zeros is a build_moe-only choice)
    # clustering
    proj: str = "up_proj"                  # up_proj | gate_proj
    kmeans_iters: int = 100
    metric: str = "l2"                     # l2 | cos
    # coactivation
    activation: str = "swiglu"             # swiglu: act(gate x) * up x | gate: act(gate x)
    kernel: str = "abs"                    # abs | square | binary
    # gradient family
    clusters: str = "kmeans"               # kmeans | domain | centroids
    expert_size: int | None = None         # sharing-inner: required; sharing-inter: default (F - residual)/E
    residual_size: int = 0                 # sharing-inter: always-on neurons
    routed_rule: str = "greedy"            # sharing-inter: greedy | share
    # router centroids
    centroid_tokens: int = 65536
    centroid_jitter: float = 0.4
    # execution
    micro_batch: int = 4
    dtype: str = "float32"                 # float32 | bfloat16 (compute)
    offload_dir: str | None = None         # gradient pass: keep stored hidden states on disk
    store_dtype: str | None = None         # gradient pass: dtype of the stored hidden states (default: dtype)

    def validate(self, ffn_width: int | None = None, num_layers: int | None = None) -> "ConstructionSpec":
        def bad(field_, msg):
            raise PartitionError(f"{field_}: {msg}")
        if self.method not in METHODS:
            bad("method", f"{self.method!r} is not one of {', '.join(METHODS)}")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            bad("num_experts", f"{self.num_experts!r} must be a positive integer")
        if self.gate_init not in ("random", "centroids"):
            bad("gate_init", f"{self.gate_init!r} is not one of random, centroids")
        if self.proj not in ("up_proj", "gate_proj"):
            bad("proj", f"{self.proj!r} is not one of up_proj, gate_proj")
        if self.clusters not in ("kmeans", "domain", "centroids"):
            bad("clusters", f"{self.clusters!r} is not one of kmeans, domain, centroids")
        if self.dtype not in ("float32", "bfloat16"):
            bad("dtype", f"{self.dtype!r} is not one of float32, bfloat16")
        if self.store_dtype not in (None, "float32", "bfloat16"):
            bad("store_dtype", f"{self.store_dtype!r} is not one of float32, bfloat16")
        if self.method == "sharing-inner" and not self.expert_size:
            bad("expert_size", "sharing-inner needs the size of each (overlapping) expert")
        if self.method == "sharing-inter" and self.residual_size < 1:
            bad("residual_size", "sharing-inter needs a residual block of at least one neuron")
        if self.routed_rule not in ("greedy", "share"):
            bad("routed_rule", f"{self.routed_rule!r} is not one of greedy, share")
        if self.method == "sharing-inter" and self.routed_rule == "share" and not self.expert_size:
            bad("expert_size", "sharing-inter with routed_rule='share' needs the size of each routed expert")
        if self.method != "sharing-inter" and self.residual_size:
            bad("residual_size", f"only sharing-inter builds a residual block (method is {self.method})")
        if ffn_width is not None:
            routed = ffn_width - self.residual_size
            if self.num_experts > ffn_width:
                bad("num_experts", f"{self.num_experts} exceeds the FFN width ({ffn_width})")
            if self.method in ("random", "clustering", "coactivation", "gradient") and ffn_width % self.num_experts:
                bad("num_experts", f"{self.num_experts} does not divide the FFN width ({ffn_width}); the "
                    f"{self.method} method makes {ffn_width}/E-neuron experts")
            if self.method == "sharing-inter" and not 0 < self.residual_size < ffn_width:
                bad("residual_size", f"{self.residual_size} must be in [1, {ffn_width})")
            if (self.method == "sharing-inter" and self.routed_rule == "greedy"
                    and (self.expert_size or routed / self.num_experts) * self.num_experts != routed):
                bad("num_experts", f"{self.num_experts} experts do not split the {routed} routed neurons "
                    f"(FFN width {ffn_width} - residual_size {self.residual_size}) evenly"
                    + (f" into {self.expert_size}" if self.expert_size else ""))
        if num_layers is not None and self.layers is not None:
            out = [i for i in self.layers if not 0 <= i < num_layers]
            if out:
                bad("layers", f"{out} are not layer indices in [0, {num_layers})")
        return self


@dataclass
class ConstructionResult:
    partitions: dict                       # {layer: Partition}
    centroids: dict | None = None          # {layer: [E, H] float32} when gate_init="centroids"
    report: dict = field(default_factory=dict)


def match_centroids(features, cluster_of_token, partition: Partition, gate_w, up_w, act=torch.nn.functional.silu):
    """Permutation p such that centroid p[e] serves expert e: maximises sum_e mean_{t in cluster p[e]} sum_{j in e}
    |h_tj| (Hungarian assignment). features [N, H] MLP inputs, cluster_of_token [N]."""
    from scipy.optimize import linear_sum_assignment
    x = torch.as_tensor(features, dtype=torch.float32)
    h = (act(x @ gate_w.float().T) * (x @ up_w.float().T)).abs()
    k = partition.num_experts
    lab = torch.as_tensor(cluster_of_token)
    score = np.zeros((k, k))
    for c in range(k):
        sel = lab == c
        if not sel.any():
            continue
        m = h[sel].mean(0)
        for e, idx in enumerate(partition.experts):
            score[e, c] = float(m[idx].sum())
    rows, cols = linear_sum_assignment(-score)
    perm = np.empty(k, np.int64)
    perm[rows] = cols
    return perm


def construct(model_dir: str, spec: ConstructionSpec, data: CalibrationData | None = None,
              progress=None) -> ConstructionResult:
    """Partitions (and centroids) of every MoE layer of the dense HF LLaMA at `model_dir` (see module docstring)."""
    t0 = time.time()
    m = LayerStream(model_dir, dtype=torch.float32 if spec.dtype == "float32" else torch.bfloat16)
    spec.validate(m.ffn_width, m.num_layers)
    layers = list(range(m.num_layers)) if spec.layers is None else sorted(spec.layers)
    needs_data = spec.method in DATA_METHODS or (spec.gate_init == "centroids" and spec.method != "clustering")
    if needs_data and data is None:
        raise PartitionError(f"data: method {spec.method!r} with gate_init {spec.gate_init!r} needs calibration "
                             "tokens (a JSONL file with a tokenizer, or a megatron dataset)")
    e = spec.num_experts
    if needs_data and spec.method in GRADIENT_METHODS and spec.clusters == "kmeans" and data.ids.shape[0] < e:
        # checked here, before any forward pass: k-means needs a sequence per cluster at least
        raise PartitionError(f"token_budget: {e} experts cluster the calibration sequences into {e} groups, but "
                             f"token_budget {data.num_tokens} / seq_len {data.ids.shape[1]} gives only "
                             f"{data.ids.shape[0]} sequences; raise --token-budget to at least "
                             f"{e * data.ids.shape[1]} or lower --seq-len")
    parts, cents, report = {}, ({} if spec.gate_init == "centroids" else None), {}
    log = progress or (lambda msg: None)

    if spec.method == "random":
        for i in layers:
            parts[i] = split_random(m.ffn_width, e, seed=spec.seed + i)
    elif spec.method == "clustering":
        for i in layers:
            rows = m.mlp_weight(i, spec.proj).float().numpy()
            parts[i], c = split_clustering(rows, e, seed=spec.seed, iters=spec.kmeans_iters, metric=spec.metric)
            parts[i].meta["proj"] = spec.proj
            if cents is not None:
                cents[i] = c
            log(f"clustering: layer {i} done")
    elif spec.method == "coactivation":
        feats = spec.centroid_tokens if cents is not None else 0
        for st in activation_stats(m, data, activation=spec.activation, kernel=spec.kernel, coact=True,
                                   feature_tokens=feats, micro_batch=spec.micro_batch, seed=spec.seed,
                                   layers=layers, dtype=m.dtype, progress=progress):
            parts[st.layer] = split_coactivation(st.coact, e, seed=spec.seed)
            parts[st.layer].meta.update(activation=spec.activation, kernel=spec.kernel, tokens=st.num_tokens)
            if cents is not None:
                cents[st.layer] = _matched_centroids(m, st.layer, st.features, parts[st.layer], spec)
            del st                      # drop this layer's F x F matrix before the next one is accumulated
    else:
        report.update(_gradient_family(m, spec, data, layers, parts, cents, progress))

    if spec.method in ("random",) and cents is not None:
        for st in activation_stats(m, data, coact=False, feature_tokens=spec.centroid_tokens,
                                   micro_batch=spec.micro_batch, seed=spec.seed, layers=layers, dtype=m.dtype,
                                   progress=progress):
            cents[st.layer] = _matched_centroids(m, st.layer, st.features, parts[st.layer], spec)

    report.update(method=spec.method, num_experts=e, layers=layers, seconds=round(time.time() - t0, 2),
                  tokens=None if data is None else data.num_tokens,
                  duplicated={i: p.duplicated for i, p in parts.items()},
                  missing={i: p.missing for i, p in parts.items()})
    return ConstructionResult(parts, cents, report)


def _matched_centroids(m, i, features, part, spec):
    c = router_centroids(features, spec.num_experts, seed=spec.seed, jitter=spec.centroid_jitter)
    lab = (torch.as_tensor(features) @ torch.as_tensor(c).T).argmax(-1).numpy()
    perm = match_centroids(features, lab, part, m.mlp_weight(i, "gate_proj"), m.mlp_weight(i, "up_proj"))
    return c[perm]


def _gradient_family(m, spec, data, layers, parts, cents, progress):
    e = spec.num_experts
    clusters = spec.clusters
    if clusters == "domain":
        _, names = data.domain_ids()
        if len(names) != e:
            raise PartitionError(f"num_experts: {e} experts, but clusters='domain' gives one expert per domain and "
                                 f"the calibration data has {len(names)} ({', '.join(names)})")
    g = gradient_importance(m, data, clusters=clusters, num_clusters=e, centroid_tokens=spec.centroid_tokens,
                            jitter=spec.centroid_jitter, micro_batch=spec.micro_batch, seed=spec.seed,
                            dtype=m.dtype, offload_dir=spec.offload_dir, progress=progress,
                            store_dtype=None if spec.store_dtype is None else getattr(torch, spec.store_dtype))
    for i in layers:
        v = g.importance[i]
        if spec.method == "gradient":
            p = split_gradient(v, spec.expert_size)
        elif spec.method == "sharing-inner":
            p = split_sharing_inner(v, spec.expert_size)
        else:
            p = split_sharing_inter(v, spec.residual_size, spec.expert_size, spec.routed_rule)
        p.meta.update(clusters=clusters, tokens_per_cluster=g.counts[i].tolist())
        parts[i] = p
        if cents is not None:
            cents[i] = g.centroids[i] if clusters == "centroids" else g.cluster_means[i]
    return {"calibration_loss": g.loss}


def write_construction(out_dir: str, result: ConstructionResult, spec: ConstructionSpec | None = None) -> list:
    """partition/layers.{i}.mlp.json per layer, partition/construction.json (spec + report) and, with centroids,
    partition/centroids.safetensors ("layers.{i}" -> [E, H]). Returns the paths written."""
    paths = write_partitions(out_dir, result.partitions)
    d = os.path.join(out_dir, "partition")
    summary = {"spec": asdict(spec) if spec is not None else None,
               "report": json.loads(json.dumps(result.report, default=str))}
    p = os.path.join(d, "construction.json")
    atomic_write_text(p, json.dumps(summary, indent=1, sort_keys=True))
    paths.append(p)
    if result.centroids:
        from safetensors.numpy import save_file
        p = os.path.join(d, "centroids.safetensors")
        tmp = temp_path(p)
        save_file({f"layers.{i}": np.ascontiguousarray(c, np.float32) for i, c in result.centroids.items()}, tmp)
        os.replace(tmp, p)
        paths.append(p)
    return paths
