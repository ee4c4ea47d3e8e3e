"""Calibration statistics for expert construction, computed one decoder layer at a time.

Two passes over a `LayerStream` (a HF LLaMA checkpoint read layer by layer) and `CalibrationData` (token blocks):

`activation_stats(...)` -- a forward pass that yields, per layer, as soon as that layer is done:
    mean_abs [F]     mean |h_j| over calibration tokens, h = act(gate x) * up x (or act(gate x)), the down_proj input
    coact    [F, F]  co-activation sum_t k(h_t) k(h_t)^T with k = |.| ("abs", v1 l1_norm), (.)^2 ("square", v1
                     l2_norm) or 1[h > 0] ("binary", MoEfication's "fire together" count); a PSD Gram matrix
    features [n, H]  the MLP input x (post-attention RMSNorm output) of up to `feature_tokens` sampled tokens,
                     for the k-means router initialisation (LLaMA-MoE v2 section 2b)
  The caller partitions the layer and drops the matrix before the next one arrives, so a 7B model (F = 11008:
  a 0.9 GB co-activation matrix) needs one layer's weights, one matrix and the hidden states of the budget.

`gradient_importance(...)` -- per-neuron importance |h * dL/dh| averaged per calibration cluster (v1 and v2's
  first-order Taylor score, with the absolute value taken per token before averaging):
    1. forward layer by layer, storing each layer's input hidden states (in memory, or on disk with `offload_dir`);
    2. the loss: next-token cross entropy over all calibration positions (final norm + lm_head), mean over them;
    3. backward layer by layer from the last: reload layer i, recompute it from its stored input, back-propagate
       dL/d(output) to dL/d(input), and read h and dL/dh at the down_proj input on the way.
  Only one layer's weights and one micro-batch's autograd graph exist at a time; the stored inputs cost
  L x tokens x H x bytes (7B, 32k tokens, bf16 store: 8.6 GB; use `offload_dir` to keep them on disk).
  Clusters ("per calibration cluster"):
    "domain"     the sequence's source domain (CalibrationData.domains);
    "kmeans"     k-means on each sequence's mean final hidden state (v1 clusters texts by embedding);
    "centroids"  v2: each token goes to argmax_e x . c_e at every layer, with c the layer's router centroids
                 (given, or computed in the same forward pass by size-constrained k-means on the MLP inputs);
    an int array one cluster id per sequence.

Long passes log progress per layer (tokens/s, ETA) on the "megamoe.construct" logger, or call `progress(msg)`.
Computation is fp32 by default (CPU-friendly); `dtype=torch.bfloat16` halves memory and time on large models.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from megamoe.construct.balanced import balanced_kmeans
from megamoe.construct.calib_data import CalibrationData
from megamoe.construct.layer_stream import LayerStream
from megamoe.fileio import owner_tag, remove_stale_temps

log = logging.getLogger("megamoe.construct")

__all__ = ["LayerStats", "GradientStats", "activation_stats", "gradient_importance", "router_centroids",
           "KERNELS", "ACTIVATIONS"]

KERNELS = ("abs", "square", "binary")
ACTIVATIONS = ("swiglu", "gate")


@dataclass
class LayerStats:
    layer: int
    num_tokens: int
    mean_abs: np.ndarray
    coact: np.ndarray | None = None
    features: np.ndarray | None = None


@dataclass
class GradientStats:
    importance: dict                      # {layer: [C, F] float64}
    counts: dict                          # {layer: [C] tokens per cluster}
    loss: float                           # mean next-token cross entropy of the calibration set
    centroids: dict | None = None         # {layer: [C, H]} for clusters="centroids"
    sequence_clusters: np.ndarray | None = None
    cluster_means: dict | None = None     # {layer: [C, H]} mean MLP input of each cluster's tokens
    meta: dict = field(default_factory=dict)


class _Progress:
    def __init__(self, what, total_layers, tokens, progress):
        self.what, self.total, self.tokens, self.cb = what, total_layers, tokens, progress
        self.t0 = time.time()
        self.done = 0

    def step(self, layer, extra=""):
        self.done += 1
        el = time.time() - self.t0
        rate = self.done * self.tokens / max(el, 1e-9)
        eta = el / self.done * (self.total - self.done)
        msg = (f"{self.what}: layer {layer} done ({self.done}/{self.total}), {rate:,.0f} tok/s, "
               f"elapsed {el:.0f}s, ETA {eta:.0f}s{extra}")
        (self.cb or log.info)(msg)


def _stream(model) -> LayerStream:
    return model if isinstance(model, LayerStream) else LayerStream(model)


def _check_data(data: CalibrationData, model: LayerStream):
    if not isinstance(data, CalibrationData):
        raise TypeError("data: expected a CalibrationData (see megamoe.construct.calib_data)")
    if data.ids.ndim != 2 or data.ids.shape[0] < 1:
        raise ValueError(f"data.ids: expected [num_sequences, seq_len], got {list(data.ids.shape)}")
    vmax = int(data.ids.max())
    if vmax >= model.config.vocab_size or int(data.ids.min()) < 0:
        raise ValueError(f"data.ids: token id {vmax} outside the model's vocabulary ({model.config.vocab_size}); "
                         "was the data tokenized with this model's tokenizer?")


class _Capture:
    """Forward hooks on one decoder layer: the MLP input x and the down_proj input h (or act(gate x))."""

    def __init__(self, layer, activation):
        self.x = self.h = None
        mlp = layer.mlp
        self.handles = [mlp.register_forward_pre_hook(self._mlp_in)]
        if activation == "swiglu":
            self.handles.append(mlp.down_proj.register_forward_pre_hook(self._down_in))
        else:
            self.act = mlp.act_fn
            self.handles.append(mlp.gate_proj.register_forward_hook(self._gate_out))

    def _mlp_in(self, mod, args):
        self.x = args[0]

    def _down_in(self, mod, args):
        self.h = args[0]

    def _gate_out(self, mod, args, out):
        self.h = self.act(out)

    def remove(self):
        for h in self.handles:
            h.remove()


def _kernel(h, kernel):
    if kernel == "abs":
        return h.abs()
    if kernel == "square":
        return h * h
    return (h > 0).to(h.dtype)


def _batches(n, micro_batch):
    for s in range(0, n, micro_batch):
        yield slice(s, min(n, s + micro_batch))


def activation_stats(model, data: CalibrationData, *, activation: str = "swiglu", kernel: str = "abs",
                     coact: bool = True, feature_tokens: int = 0, micro_batch: int = 4, seed: int = 0,
                     layers: list | None = None, dtype: torch.dtype = torch.float32,
                     progress: Callable[[str], None] | None = None) -> Iterator[LayerStats]:
    """Yield `LayerStats` for each layer in `layers` (default all), in order, streaming the model layer by layer."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: {activation!r} is not one of {ACTIVATIONS}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel: {kernel!r} is not one of {KERNELS}")
    m = _stream(model)
    m.dtype = dtype
    _check_data(data, m)
    want = set(range(m.num_layers) if layers is None else layers)
    bad = sorted(i for i in want if not 0 <= i < m.num_layers)
    if bad:
        raise ValueError(f"layers: {bad} are not layer indices in [0, {m.num_layers})")
    last = max(want)
    ids = data.ids
    n, s = ids.shape
    ntok = n * s
    rng = np.random.default_rng(seed)
    sample = None
    if feature_tokens:
        sample = np.sort(rng.choice(ntok, size=min(feature_tokens, ntok), replace=False))
    prog = _Progress("activation stats", last + 1, ntok, progress)
    with torch.no_grad():
        h = m.embed(ids)
        for i in range(last + 1):
            layer = m.layer(i)
            collect = i in want
            cap = _Capture(layer, activation) if collect else None
            f = m.ffn_width
            sum_abs = torch.zeros(f, dtype=torch.float64)
            a = torch.zeros(f, f, dtype=torch.float64) if (collect and coact) else None
            feats = []
            for b in _batches(n, micro_batch):
                h[b] = m.run_layer(layer, h[b])
                if not collect:
                    continue
                hh = cap.h.reshape(-1, f).float()
                sum_abs += hh.abs().sum(0, dtype=torch.float64)
                if a is not None:                  # fp32 GEMM per micro-batch, fp64 running sum
                    k = _kernel(hh, kernel)
                    a += (k.T @ k).double()
                if sample is not None:
                    lo, hi = b.start * s, b.stop * s
                    sel = sample[(sample >= lo) & (sample < hi)] - lo
                    feats.append(cap.x.reshape(-1, cap.x.shape[-1])[torch.as_tensor(sel)].float().numpy())
            if cap is not None:
                cap.remove()
            del layer
            prog.step(i)
            if collect:
                yield LayerStats(i, ntok, (sum_abs / ntok).numpy(), None if a is None else a.numpy(),
                                 np.concatenate(feats) if sample is not None else None)


def router_centroids(features, num_experts: int, seed: int = 0, jitter: float = 0.4, iters: int = 100,
                     metric: str = "l2", n_init: int = 1) -> np.ndarray:
    """v2 router init: size-constrained k-means on MLP-input features [N, H] -> centroids [E, H] (gate rows).

    Cluster sizes are kept in [floor(N/E (1 - jitter)), ceil(N/E (1 + jitter))] (v2: balance_jitter_factor 0.4).
    """
    x = np.asarray(features, dtype=np.float64)
    n = x.shape[0]
    if n < num_experts:
        raise ValueError(f"features: {n} tokens cannot form {num_experts} clusters; raise the token budget")
    if not 0 <= jitter < 1:
        raise ValueError(f"jitter: {jitter} must be in [0, 1)")
    lo = int(np.floor(n / num_experts * (1 - jitter)))
    hi = int(np.ceil(n / num_experts * (1 + jitter)))
    _, cent, _ = balanced_kmeans(x, num_experts, seed=seed, iters=iters, size_min=lo, size_max=hi, metric=metric,
                                 n_init=n_init)
    return cent.astype(np.float32)


class _Store:
    """Per-layer hidden states kept in memory or in files under a directory (raw bytes, no pickles)."""

    def __init__(self, dtype, directory=None):
        self.dtype, self.dir, self.mem, self.shape = dtype, directory, {}, None
        self._tmp = None
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
            remove_stale_temps(directory, "megamoe-calib-")  # spills of killed runs (their owner is gone)
            self._tmp = tempfile.mkdtemp(prefix="megamoe-calib-", suffix=f".{owner_tag()}.tmp", dir=directory)

    def put(self, i, t):
        t = t.detach().to(self.dtype).contiguous()
        self.shape = t.shape
        if self._tmp is None:
            self.mem[i] = t.clone()         # the caller updates its hidden states in place
        else:
            t.view(torch.uint8).numpy().tofile(os.path.join(self._tmp, f"h{i}.raw"))

    def get(self, i):
        if self._tmp is None:
            return self.mem[i]
        numel = int(np.prod(self.shape))
        return torch.from_file(os.path.join(self._tmp, f"h{i}.raw"), size=numel, dtype=self.dtype).view(self.shape)

    def drop(self, i):
        self.mem.pop(i, None)
        if self._tmp is not None:
            p = os.path.join(self._tmp, f"h{i}.raw")
            if os.path.exists(p):
                os.remove(p)

    def close(self):
        self.mem.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _sequence_clusters(clusters, data, num_clusters, final_features, seed):
    if isinstance(clusters, str) and clusters == "domain":
        lab, names = data.domain_ids()
        return lab, len(names), {"cluster_names": names}
    if isinstance(clusters, str) and clusters == "kmeans":
        if not num_clusters:
            raise ValueError("num_clusters: needed for clusters='kmeans'")
        n = final_features.shape[0]
        if n < num_clusters:
            raise ValueError(f"num_clusters: {num_clusters} clusters need at least as many calibration sequences "
                             f"(have {n}); raise token_budget or lower seq_len")
        lab, _, _ = balanced_kmeans(final_features, num_clusters, seed=seed, size_min=1, size_max=n)
        return lab, num_clusters, {}
    lab = np.asarray(clusters, dtype=np.int64)
    if lab.shape != (data.ids.shape[0],) or lab.min() < 0:
        raise ValueError(f"clusters: expected 'domain', 'kmeans', 'centroids' or one non-negative cluster id per "
                         f"sequence ({data.ids.shape[0]}), got shape {lab.shape}")
    return lab, int(num_clusters or lab.max() + 1), {}


def gradient_importance(model, data: CalibrationData, *, clusters="kmeans", num_clusters: int | None = None,
                        centroids: dict | None = None, centroid_tokens: int = 65536, jitter: float = 0.4,
                        micro_batch: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32,
                        store_dtype: torch.dtype | None = None, offload_dir: str | None = None,
                        progress: Callable[[str], None] | None = None) -> GradientStats:
    """Per-layer importance [C, F] = mean over the tokens of cluster c of |h * dL/dh| (see the module docstring)."""
    m = _stream(model)
    m.dtype = dtype
    _check_data(data, m)
    ids = data.ids
    n, s = ids.shape
    ntok = n * s
    L, f = m.num_layers, m.ffn_width
    per_token = isinstance(clusters, str) and clusters == "centroids"
    if per_token:
        if centroids is None and not num_clusters:
            raise ValueError("num_clusters: needed for clusters='centroids' when no centroids are given")
        if centroids is not None:
            missing = [i for i in range(L) if i not in centroids]
            if missing:
                raise ValueError(f"centroids: no centroids for layers {missing}")
            num_clusters = int(np.asarray(centroids[0]).shape[0])
    elif isinstance(clusters, str) and clusters not in ("domain", "kmeans"):
        raise ValueError(f"clusters: {clusters!r} is not one of 'domain', 'kmeans', 'centroids' or an array")
    store = _Store(store_dtype or dtype, offload_dir)
    cents = {} if per_token else None
    rng = np.random.default_rng(seed)
    try:
        # ---- 1. forward, storing every layer's input ----
        prog = _Progress("gradient pass, forward", L, ntok, progress)
        with torch.no_grad():
            h = m.embed(ids)
            for i in range(L):
                store.put(i, h)
                layer = m.layer(i)
                need_feats = per_token and centroids is None
                cap = _Capture(layer, "swiglu") if need_feats else None
                feats = []
                sample = np.sort(rng.choice(ntok, size=min(centroid_tokens, ntok), replace=False)) if need_feats else None
                for b in _batches(n, micro_batch):
                    h[b] = m.run_layer(layer, h[b])
                    if need_feats:
                        lo, hi = b.start * s, b.stop * s
                        sel = sample[(sample >= lo) & (sample < hi)] - lo
                        feats.append(cap.x.reshape(-1, cap.x.shape[-1])[torch.as_tensor(sel)].float().numpy())
                if per_token:
                    cents[i] = (router_centroids(np.concatenate(feats), num_clusters, seed=seed, jitter=jitter)
                                if need_feats else np.asarray(centroids[i], np.float32))
                if cap is not None:
                    cap.remove()
                del layer
                prog.step(i)
        # ---- 2. loss and dL/dh_L ----
        denom = n * (s - 1)
        grad = torch.empty_like(h)
        total = 0.0
        norm, _ = m._final()
        final_feats = []
        for b in _batches(n, micro_batch):
            hl = h[b].detach().requires_grad_(True)
            loss = m.head_loss(hl, ids[b]) / denom
            (g,) = torch.autograd.grad(loss, hl)
            grad[b] = g
            total += float(loss.detach())
            with torch.no_grad():
                final_feats.append(norm(h[b]).double().mean(1).numpy())
        m.release_head()
        del h
        if per_token:
            seq_lab, c_count, meta = None, num_clusters, {}
        else:
            seq_lab, c_count, meta = _sequence_clusters(clusters, data, num_clusters, np.concatenate(final_feats), seed)
        tok_lab = None if per_token else torch.as_tensor(np.repeat(seq_lab, s).reshape(n, s))
        # ---- 3. backward, layer by layer ----
        imp, cnt, means = {}, {}, {}
        prog = _Progress("gradient pass, backward", L, ntok, progress)
        for i in reversed(range(L)):
            layer = m.layer(i)
            for p in layer.parameters():
                p.requires_grad_(False)
            cap = _Capture(layer, "swiglu")
            acc = torch.zeros(c_count, f, dtype=torch.float64)
            count = torch.zeros(c_count, dtype=torch.float64)
            xsum = torch.zeros(c_count, m.hidden_size, dtype=torch.float64)
            hin = store.get(i)
            cvec = torch.as_tensor(cents[i], dtype=dtype) if per_token else None
            for b in _batches(n, micro_batch):
                x = hin[b].to(dtype).requires_grad_(True)
                out = m.run_layer(layer, x)
                dx, dh = torch.autograd.grad(out, (x, cap.h), grad_outputs=grad[b])
                score = (cap.h.detach() * dh).abs().reshape(-1, f).double()
                xin = cap.x.detach().reshape(-1, cap.x.shape[-1])
                lab = (xin @ cvec.T).argmax(-1) if per_token else tok_lab[b].reshape(-1)
                xsum.index_add_(0, lab, xin.double())
                acc.index_add_(0, lab, score)
                count.index_add_(0, lab, torch.ones(lab.shape[0], dtype=torch.float64))
                grad[b] = dx
            cap.remove()
            del layer, hin
            store.drop(i)
            empty = (count == 0).nonzero().flatten().tolist()
            if empty:
                log.warning("gradient importance: layer %d clusters %s received no tokens; their scores are 0",
                            i, empty)
            imp[i] = (acc / count.clamp(min=1)[:, None]).numpy()
            cnt[i] = count.numpy().astype(np.int64)
            means[i] = (xsum / count.clamp(min=1)[:, None]).float().numpy()
            prog.step(i)
    finally:
        store.close()
    return GradientStats(dict(sorted(imp.items())), dict(sorted(cnt.items())), total, cents,
                         None if per_token else seq_lab, dict(sorted(means.items())), meta)
