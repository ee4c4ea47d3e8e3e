"""Neuron partitions of one FFN: which intermediate neurons each expert (and the always-on residual block) takes.

Pure functions on numpy arrays; no model is needed. A LLaMA FFN computes `down(silu(gate x) * up x)`; neuron j is row
j of `gate_proj`/`up_proj` and column j of `down_proj`. Splitting the F neurons into blocks and summing the blocks'
outputs gives back the dense FFN exactly, which is why a converted model with every expert active, equal router weights
and score scale E reproduces the dense logits.

Methods (LLaMA-MoE v1 section 1.2, v2 section 2):

| function               | input                          | result                                              |
|------------------------|--------------------------------|-----------------------------------------------------|
| `split_random`         | F, E, seed                     | balanced random split (v1 "Independent-Random")     |
| `split_clustering`     | rows of W_up (or W_gate) [F,H] | balanced k-means, exactly F/E per expert + centroids|
| `split_coactivation`   | co-activation matrix [F,F]     | balanced graph partition (spectral + kernel k-means)|
| `split_gradient`       | importance [C,F]               | greedy non-sharing split (v1/v2 GradientSplit)      |
| `split_sharing_inner`  | importance [C,F]               | each expert = its cluster's top neurons; overlaps   |
| `split_sharing_inter`  | importance [C,F]               | most-shared neurons -> residual, rest routed        |

`Partition.to_json()` is the small human-readable per-layer file written next to a converted checkpoint
(`write_partitions` / `read_partitions`).
"""

from __future__ import annotations

import heapq
import json
import os
from dataclasses import dataclass, field

import numpy as np

from megamoe.construct.balanced import balanced_assign, balanced_kmeans
from megamoe.errors import InputError
from megamoe.fileio import atomic_write_text

__all__ = ["Partition", "PartitionError", "split_random", "split_clustering", "split_coactivation",
           "split_gradient", "split_sharing_inner", "split_sharing_inter", "greedy_assign",
           "write_partitions", "read_partitions", "partition_file", "METHODS"]

METHODS = ("random", "clustering", "coactivation", "gradient", "sharing-inner", "sharing-inter")
FORMAT = "megamoe.partition/1"


class PartitionError(InputError):
    """Bad input to a split, or an invalid partition file. The message names the field."""


@dataclass
class Partition:
    """The neuron partition of one FFN layer.

    experts:   neuron indices per routed expert, ascending within an expert.
    residual:  always-on neurons (the shared/residual expert), ascending; [] when none.
    method:    the construction method that produced it.
    ffn_width: F, the dense FFN width the indices refer to.
    meta:      free-form, JSON-serialisable details (seed, sizes asked for, objective values...).
    """
    experts: list
    residual: list = field(default_factory=list)
    method: str = ""
    ffn_width: int = 0
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.experts = [sorted(int(j) for j in e) for e in self.experts]
        self.residual = sorted(int(j) for j in self.residual)
        if not self.ffn_width:
            self.ffn_width = 1 + max([max(b) for b in self.experts + [self.residual] if b], default=-1)
        self.validate()

    # ---- derived ----
    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def expert_sizes(self) -> list:
        return [len(e) for e in self.experts]

    @property
    def residual_size(self) -> int:
        return len(self.residual)

    def multiplicity(self) -> np.ndarray:
        """How many blocks (experts + residual) hold each neuron: int [F]."""
        m = np.zeros(self.ffn_width, np.int64)
        for b in self.experts + [self.residual]:
            np.add.at(m, np.asarray(b, np.int64), 1)
        return m

    @property
    def duplicated(self) -> int:
        """Neurons appearing in more than one block (0 for the non-sharing methods)."""
        return int((self.multiplicity() > 1).sum())

    @property
    def missing(self) -> int:
        """Neurons in no block (0 for every method except sharing-inner with small experts)."""
        return int((self.multiplicity() == 0).sum())

    @property
    def is_exact_cover(self) -> bool:
        """Every neuron in exactly one block: the converted MoE can reproduce the dense FFN."""
        return bool(np.all(self.multiplicity() == 1))

    def labels(self) -> np.ndarray:
        """For a non-sharing partition without residual: expert id per neuron (llama-moe v1's label list)."""
        if not self.is_exact_cover or self.residual:
            raise PartitionError("labels: only defined for a non-sharing partition without a residual block")
        lab = np.empty(self.ffn_width, np.int64)
        for e, b in enumerate(self.experts):
            lab[b] = e
        return lab

    def validate(self) -> "Partition":
        if not isinstance(self.ffn_width, int) or self.ffn_width < 1:
            raise PartitionError(f"ffn_width: {self.ffn_width!r} must be a positive integer")
        if not self.experts:
            raise PartitionError("experts: a partition needs at least one expert")
        for name, b in [(f"experts[{e}]", b) for e, b in enumerate(self.experts)] + [("residual", self.residual)]:
            if name != "residual" and not b:
                raise PartitionError(f"{name}: an expert needs at least one neuron")
            if b and (b[0] < 0 or b[-1] >= self.ffn_width):
                raise PartitionError(f"{name}: neuron indices must lie in [0, {self.ffn_width}), "
                                     f"got {b[0]}..{b[-1]}")
            if len(set(b)) != len(b):
                raise PartitionError(f"{name}: a neuron appears twice in the same block")
        return self

    # ---- (de)serialisation: one small JSON file per layer ----
    def to_dict(self) -> dict:
        return {"format": FORMAT, "method": self.method, "ffn_width": self.ffn_width,
                "num_experts": self.num_experts, "expert_sizes": self.expert_sizes,
                "residual_size": self.residual_size, "duplicated": self.duplicated, "missing": self.missing,
                "meta": self.meta, "residual": self.residual, "experts": self.experts}

    def to_json(self) -> str:
        """Human-readable JSON: summary fields first, then one line per expert."""
        d = self.to_dict()
        head = {k: v for k, v in d.items() if k not in ("residual", "experts")}
        lines = ["{"]
        for k, v in head.items():
            lines.append(f"  {json.dumps(k)}: {json.dumps(v, sort_keys=True)},")
        lines.append(f'  "residual": {json.dumps(self.residual)},')
        lines.append('  "experts": [')
        for e, b in enumerate(self.experts):
            lines.append(f"    {json.dumps(b)}{',' if e < len(self.experts) - 1 else ''}")
        lines.append("  ]")
        lines.append("}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_dict(cls, d: dict, where: str = "partition") -> "Partition":
        if not isinstance(d, dict):
            raise PartitionError(f"{where}: expected a JSON object")
        if d.get("format") != FORMAT:
            raise PartitionError(f"{where}.format: expected {FORMAT!r}, got {d.get('format')!r}")
        for k in ("experts", "residual", "ffn_width"):
            if k not in d:
                raise PartitionError(f"{where}.{k}: missing")
        if not isinstance(d["experts"], list) or not all(isinstance(b, list) for b in d["experts"]):
            raise PartitionError(f"{where}.experts: expected a list of lists of neuron indices")
        for b in d["experts"] + [d["residual"]]:
            if not all(isinstance(j, int) and not isinstance(j, bool) for j in b):
                raise PartitionError(f"{where}.experts: neuron indices must be integers")
        try:
            p = cls(experts=d["experts"], residual=d["residual"], method=d.get("method", ""),
                    ffn_width=d["ffn_width"], meta=d.get("meta", {}))
        except PartitionError as e:
            raise PartitionError(f"{where}.{e}") from None
        if "expert_sizes" in d and d["expert_sizes"] != p.expert_sizes:
            raise PartitionError(f"{where}.expert_sizes: {d['expert_sizes']} does not match the expert lists")
        return p

    @classmethod
    def from_json(cls, text: str, where: str = "partition") -> "Partition":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PartitionError(f"{where}: not valid JSON: {e}") from None
        return cls.from_dict(d, where)


# ---------------------------------------------------------------------------------------------------------------
# files


def partition_file(directory: str, layer: int) -> str:
    """`<directory>/partition/layers.{i}.mlp.json`: the per-layer file next to the converted checkpoint."""
    return os.path.join(directory, "partition", f"layers.{layer}.mlp.json")


def write_partitions(directory: str, partitions: dict) -> list:
    """Write one JSON file per layer (atomically: temp file + rename). Returns the paths written."""
    os.makedirs(os.path.join(directory, "partition"), exist_ok=True)
    paths = []
    for layer, p in sorted(partitions.items()):
        path = partition_file(directory, int(layer))
        atomic_write_text(path, p.to_json())
        paths.append(path)
    return paths


def read_partitions(directory: str) -> dict:
    """{layer: Partition} from the files `write_partitions` wrote."""
    d = os.path.join(directory, "partition")
    if not os.path.isdir(d):
        raise PartitionError(f"{d}: no partition directory")
    out = {}
    for name in sorted(os.listdir(d)):
        if not (name.startswith("layers.") and name.endswith(".mlp.json")):
            continue
        try:
            layer = int(name[len("layers."):-len(".mlp.json")])
        except ValueError:
            continue
        with open(os.path.join(d, name)) as f:
            out[layer] = Partition.from_json(f.read(), where=name)
    if not out:
        raise PartitionError(f"{d}: holds no layers.<i>.mlp.json files")
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------------------------
# input checks


def _check_ffn(ffn_width, num_experts, balanced=True):
    if not isinstance(ffn_width, (int, np.integer)) or ffn_width < 1:
        raise PartitionError(f"ffn_width: {ffn_width!r} must be a positive integer")
    if not isinstance(num_experts, (int, np.integer)) or num_experts < 1:
        raise PartitionError(f"num_experts: {num_experts!r} must be a positive integer")
    if num_experts > ffn_width:
        raise PartitionError(f"num_experts: {num_experts} exceeds the FFN width ({ffn_width})")
    if balanced and ffn_width % num_experts:
        raise PartitionError(f"num_experts: {num_experts} does not divide the FFN width ({ffn_width}); "
                             f"a balanced split needs F/E neurons per expert")


def _check_importance(importance) -> np.ndarray:
    v = np.asarray(importance, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] < 1 or v.shape[1] < 1:
        raise PartitionError(f"importance: expected [clusters, ffn_width], got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise PartitionError("importance: contains NaN or infinite values")
    return v


def _from_labels(labels, num_experts, method, meta, ffn_width):
    return Partition([np.flatnonzero(labels == e).tolist() for e in range(num_experts)], [], method,
                     int(ffn_width), meta)


# ---------------------------------------------------------------------------------------------------------------
# methods


def split_random(ffn_width: int, num_experts: int, seed: int = 0) -> Partition:
    """Balanced random split: labels [0..E-1] * (F/E), shuffled with a seeded generator (v1 Independent-Random)."""
    _check_ffn(ffn_width, num_experts)
    labels = np.repeat(np.arange(num_experts), ffn_width // num_experts)
    np.random.default_rng(seed).shuffle(labels)
    return _from_labels(labels, num_experts, "random", {"seed": seed}, ffn_width)


def split_clustering(weight_rows, num_experts: int, seed: int = 0, iters: int = 100, metric: str = "l2",
                     normalize: bool = True, n_init: int = 1):
    """Balanced k-means on the rows of W_up (or W_gate): exactly F/E neurons per expert (v1 Independent-Clustering).

    weight_rows: [F, H]. Rows are L2-normalised first (as v1 does with sklearn's Normalizer) unless `normalize=False`.
    Returns (Partition, centroids [E, H] float32) -- the centroids live in the normalised row space.
    """
    w = np.asarray(weight_rows, dtype=np.float64)
    if w.ndim != 2:
        raise PartitionError(f"weight_rows: expected [ffn_width, hidden], got shape {w.shape}")
    _check_ffn(w.shape[0], num_experts)
    if normalize:
        w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    labels, cent, inertia = balanced_kmeans(w, num_experts, seed=seed, iters=iters, metric=metric, n_init=n_init)
    p = _from_labels(labels, num_experts, "clustering",
                     {"seed": seed, "iters": iters, "metric": metric, "normalize": normalize, "inertia": inertia},
                     w.shape[0])
    return p, cent.astype(np.float32)


def split_coactivation(coact, num_experts: int, seed: int = 0, iters: int = 50, normalize: bool = True) -> Partition:
    """Balanced partition of the co-activation graph: neurons that fire together share an expert.

    coact: symmetric non-negative [F, F] (e.g. sum over tokens of |h| |h|^T, see `calibration.CoactivationStats`).
    Maximises the within-expert co-activation weight with exactly F/E neurons per expert, with our own algorithm
    (no METIS needed, balanced exactly rather than trimmed afterwards as v1 did):

    With `normalize` (default) the graph is A_ij / sqrt(A_ii A_jj), the cosine similarity of the two neurons'
    activation patterns, so that "fire together" is not swamped by a few high-magnitude neurons (a congruence
    transform: the matrix stays PSD).

    1. spectral start: the top-E eigenvectors of the normalised graph D^-1/2 A D^-1/2, rows normalised, clustered
       by exact balanced k-means;
    2. balanced kernel k-means refinement: each neuron's affinity to each part is G = A Z (Z = one-hot parts); the
       next partition is the exactly balanced assignment maximising sum_j G[j, part_j]. For a positive
       semi-definite A (a Gram matrix of activations, as ours) every step cannot lower the objective
       tr(Z^T A Z); we stop when it no longer rises.
    """
    a = np.asarray(coact, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise PartitionError(f"coact: expected a square [ffn_width, ffn_width] matrix, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise PartitionError("coact: contains NaN or infinite values")
    if np.any(a < 0):
        raise PartitionError("coact: co-activation weights must be non-negative")
    f = a.shape[0]
    _check_ffn(f, num_experts)
    a = 0.5 * (a + a.T)
    if normalize:
        d = np.sqrt(np.maximum(np.diag(a), 1e-300))
        a = a / d[:, None] / d[None, :]
    size = f // num_experts
    labels = _spectral_start(a, num_experts, seed)

    def objective(lab):
        z = np.zeros((f, num_experts))
        z[np.arange(f), lab] = 1.0
        return float((z * (a @ z)).sum()), z

    best, z = objective(labels)
    start = best
    steps = 0
    for steps in range(1, iters + 1):
        g = a @ z
        new = balanced_assign(-g, size)
        val, znew = objective(new)
        if val <= best * (1 + 1e-12) or np.array_equal(new, labels):
            break
        labels, best, z = new, val, znew
    off = float(a.sum() - np.trace(a))
    frac = (lambda v: (v - float(np.trace(a))) / off if off > 0 else 1.0)
    # fraction of the off-diagonal co-activation weight kept inside experts (1/E for a random split, on average)
    meta = {"seed": seed, "normalize": normalize, "within_weight_fraction": frac(best), "spectral_start_fraction": frac(start),
            "refine_steps": steps}
    return _from_labels(labels, num_experts, "coactivation", meta, f)


def _spectral_start(a, k, seed):
    f = a.shape[0]
    if k == 1:
        return np.zeros(f, np.int64)
    deg = a.sum(1)
    dinv = 1.0 / np.sqrt(np.maximum(deg, 1e-12))
    m = a * dinv[:, None] * dinv[None, :]
    if f <= 128:
        _, vec = np.linalg.eigh(m)
        emb = vec[:, -k:]
    else:                                   # Lanczos: only k eigenvectors, matrix-vector products only
        from scipy.sparse.linalg import eigsh
        v0 = np.random.default_rng(seed).standard_normal(f)
        _, emb = eigsh(m, k=k, which="LA", v0=v0)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    labels, _, _ = balanced_kmeans(emb, k, seed=seed, iters=100)
    return labels


def greedy_assign(importance, expert_size, neurons=None) -> list:
    """The v1/v2 GradientSplit non-sharing rule.

    Each expert e ranks the candidate neurons by importance[e] (descending). Repeat until every expert is full:
    every expert that is not full proposes its best unassigned neuron; the proposal with the highest score wins
    (ties go to the later expert, as in the reference code) and that neuron joins that expert.

    importance: [E, F]; expert_size: int or list of E ints; neurons: the candidate neuron ids (default all F),
    whose count must equal the total size. Returns a list of E neuron lists.
    """
    v = _check_importance(importance)
    e_count, f = v.shape
    cand = np.arange(f) if neurons is None else np.asarray(sorted(neurons), np.int64)
    sizes = [int(expert_size)] * e_count if np.isscalar(expert_size) else [int(s) for s in expert_size]
    if len(sizes) != e_count or any(s < 1 for s in sizes):
        raise PartitionError(f"expert_size: need {e_count} positive sizes, got {expert_size}")
    if sum(sizes) != len(cand):
        raise PartitionError(f"expert_size: {e_count} experts x sizes {sum(sizes)} in all must equal the number of "
                             f"neurons to place ({len(cand)})")
    # each expert's ranking: descending score, ascending neuron id among ties (stable sort)
    rank = [cand[np.argsort(-v[e, cand], kind="stable")] for e in range(e_count)]
    ptr = [0] * e_count
    used = np.zeros(f, bool)
    out = [[] for _ in range(e_count)]
    heap = [(-v[e, rank[e][0]], -e) for e in range(e_count)]
    heapq.heapify(heap)
    while heap:
        negs, nege = heapq.heappop(heap)
        e = -nege
        j = rank[e][ptr[e]]
        if used[j]:                       # stale proposal: advance to this expert's best free neuron
            while used[rank[e][ptr[e]]]:
                ptr[e] += 1
            heapq.heappush(heap, (-v[e, rank[e][ptr[e]]], -e))
            continue
        used[j] = True
        out[e].append(int(j))
        ptr[e] += 1
        if len(out[e]) < sizes[e]:
            while used[rank[e][ptr[e]]]:
                ptr[e] += 1
            heapq.heappush(heap, (-v[e, rank[e][ptr[e]]], -e))
    return out


def split_gradient(importance, expert_size: int | None = None) -> Partition:
    """Non-sharing split from per-cluster neuron importance [C, F] (one expert per calibration cluster).

    expert_size defaults to F/C (error if C does not divide F). Uses `greedy_assign`.
    """
    v = _check_importance(importance)
    c, f = v.shape
    if expert_size is None:
        _check_ffn(f, c)
        expert_size = f // c
    if expert_size * c != f:
        raise PartitionError(f"expert_size: {c} experts x {expert_size} neurons != FFN width {f}; the non-sharing "
                             f"gradient split places every neuron exactly once")
    return Partition(greedy_assign(v, expert_size), [], "gradient", f, {"expert_size": int(expert_size)})


def _top(v_row, k, cand):
    order = cand[np.argsort(-v_row[cand], kind="stable")]
    return order[:k]


def split_sharing_inner(importance, expert_size: int) -> Partition:
    """Expert e = the `expert_size` most important neurons for cluster e (v1 Sharing-Inner; `criterion=max`).

    Experts may overlap (`Partition.duplicated`) and some neurons may be left out (`Partition.missing`).
    """
    v = _check_importance(importance)
    c, f = v.shape
    if not isinstance(expert_size, (int, np.integer)) or not 1 <= expert_size <= f:
        raise PartitionError(f"expert_size: {expert_size!r} must be an integer in [1, {f}]")
    cand = np.arange(f)
    p = Partition([_top(v[e], expert_size, cand).tolist() for e in range(c)], [], "sharing-inner", f,
                  {"expert_size": int(expert_size)})
    p.meta.update(duplicated=p.duplicated, missing=p.missing)
    return p


def select_residual(importance, residual_size: int, list_size: int) -> list:
    """The v1/v2 residual (shared-expert) rule: the neurons most often among the clusters' top lists.

    Repeat until `residual_size` neurons are collected: take each cluster's top-`list_size` list among the neurons
    not yet collected, count for each neuron how many lists contain it, and collect neurons by descending count
    (ties: larger summed importance first, then lower index), truncating at capacity.
    """
    v = _check_importance(importance)
    c, f = v.shape
    chosen: list = []
    alive = np.ones(f, bool)
    total = v.sum(0)
    while len(chosen) < residual_size:
        cand = np.flatnonzero(alive)
        counts = np.zeros(f, np.int64)
        for e in range(c):
            counts[_top(v[e], list_size, cand)] += 1
        hit = cand[counts[cand] > 0]
        order = hit[np.lexsort((hit, -total[hit], -counts[hit]))]
        take = order[:residual_size - len(chosen)]
        if len(take) == 0:
            break
        chosen.extend(int(j) for j in take)
        alive[take] = False
    return chosen


def split_sharing_inter(importance, residual_size: int, expert_size: int | None = None,
                        routed_rule: str = "greedy") -> Partition:
    """Residual split (v1 Sharing-Inter, v2 residual MoE): the most commonly important neurons become an always-on
    residual block of `residual_size` neurons (`select_residual`, top lists of `expert_size`), the rest are routed.

    importance: [C, F], one routed expert per cluster. routed_rule:
      "greedy"  the remaining F - residual_size neurons go to the C experts with the non-sharing greedy rule
                (expert_size defaults to (F - residual_size) / C, which must be whole);
      "share"   expert e = its top-`expert_size` remaining neurons, overlaps allowed.
    """
    v = _check_importance(importance)
    c, f = v.shape
    if not isinstance(residual_size, (int, np.integer)) or not 0 <= residual_size < f:
        raise PartitionError(f"residual_size: {residual_size!r} must be an integer in [0, {f})")
    if routed_rule not in ("greedy", "share"):
        raise PartitionError(f"routed_rule: {routed_rule!r} is not one of 'greedy', 'share'")
    routed = f - residual_size
    if expert_size is None:
        if routed_rule == "share" or routed % c:
            raise PartitionError(f"expert_size: needed, since {c} experts do not split the {routed} routed neurons "
                                 f"evenly" if routed_rule == "greedy" else "expert_size: needed for routed_rule='share'")
        expert_size = routed // c
    if not isinstance(expert_size, (int, np.integer)) or expert_size < 1:
        raise PartitionError(f"expert_size: {expert_size!r} must be a positive integer")
    if routed_rule == "greedy" and expert_size * c != routed:
        raise PartitionError(f"expert_size: {c} experts x {expert_size} != {routed} routed neurons "
                             f"(FFN width {f} - residual_size {residual_size})")
    residual = select_residual(v, residual_size, expert_size)
    rest = np.setdiff1d(np.arange(f), residual)
    if routed_rule == "greedy":
        experts = greedy_assign(v, expert_size, rest)
    else:
        if expert_size > len(rest):
            raise PartitionError(f"expert_size: {expert_size} exceeds the {len(rest)} routed neurons")
        experts = [_top(v[e], expert_size, rest).tolist() for e in range(c)]
    p = Partition(experts, residual, "sharing-inter", f,
                  {"expert_size": int(expert_size), "routed_rule": routed_rule})
    p.meta.update(duplicated=p.duplicated, missing=p.missing)
    return p
