"""Calibrate one converted MoE layer on cached MLP inputs, and stream the inputs of a dense model layer by layer.

    spec = CalibrationSpec(router="rank", weights="calibrated", reconstruct=("router", "experts"))
    stream = CalibrationStream(model_dir, data)           # dense hidden states, advanced one layer at a time
    for i in layers:                                        # increasing order
        x = stream.inputs(i)                                # [N, H] MLP inputs (post-attention RMSNorm) of layer i
        res = calibrate_layer(gate_w, up_w, down_w, partition, x, top_k, spec, init_router=W0, init_scale=E / k)
        res.router   # [E, H] linear router rows (softmax temperature included): logits x W^T
        res.scale    # the layer's score scale
        res.down     # [H, F] refitted dense down_proj the experts are cut from (None: unchanged)
        res.report   # oracle bound, recall, errors after each step, on held-out calibration tokens

Steps, each optional (CalibrationSpec):
  router       "random" / "centroids": keep the given initial router; "regression" / "rank": fitted to the oracle
               (router_fit.fit_router) on the fit tokens.
  weights      "fixed": the router's own softmax and init_scale (llama-moe v1: E/k);
               "calibrated": softmax temperature and score scale chosen on the fit tokens (router_fit.calibrate_weights).
  reconstruct  "router": the router and scale trained on the layer error (reconstruct.reconstruct_router);
               "experts": the experts' down projections refitted for the final routing (reconstruct.reconstruct_down).
  align        "v2" / "lsq": per-channel output scale folded into down (align.py); the v2 bias is not exportable and is
               only reported.
Held-out tokens (`holdout`, the last fraction of the sequences) are never fitted on; every number in the report is
measured on them: `oracle` (top-k by expert output norm, weights 1: the bound for this partition and k),
`initial` (the given router and scale), then one entry per step.

`CalibrationStream` runs transformers' own LlamaDecoderLayer (via layer_stream.LayerStream) on the calibration tokens
and returns each layer's MLP inputs as it goes: one layer's weights and the [N, H] hidden states in memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from megamoe.construct import router_fit as R
from megamoe.construct.align import channel_alignment
from megamoe.construct.calib_data import CalibrationData
from megamoe.construct.calibration import _Capture, _batches
from megamoe.construct.ffn import PartitionedFFN
from megamoe.construct.layer_stream import LayerStream
from megamoe.construct.partition import Partition, PartitionError
from megamoe.construct.reconstruct import layer_error, reconstruct_down, reconstruct_router

__all__ = ["CalibrationSpec", "LayerCalibration", "calibrate_layer", "CalibrationStream", "mlp_gate_from_linear",
           "ROUTERS", "WEIGHTS", "RECONSTRUCT", "ALIGN"]

ROUTERS = ("random", "centroids", "regression", "rank")
WEIGHTS = ("fixed", "calibrated")
RECONSTRUCT = ("router", "experts")
ALIGN = ("none", "v2", "lsq")


@dataclass
class CalibrationSpec:
    router: str = "rank"
    weights: str = "calibrated"
    reconstruct: tuple = ()
    align: str = "none"
    router_steps: int = 40
    ridge: float = 1e-3
    down_ridge: float = 1e-2
    holdout: float = 0.125
    stats_tokens: int = 4096               # fit tokens used for the quadratic form (weights, router reconstruction)

    def validate(self) -> "CalibrationSpec":
        def bad(f, msg):
            raise PartitionError(f"calibration.{f}: {msg}")
        if self.router not in ROUTERS:
            bad("router", f"{self.router!r} is not one of {', '.join(ROUTERS)}")
        if self.weights not in WEIGHTS:
            bad("weights", f"{self.weights!r} is not one of {', '.join(WEIGHTS)}")
        self.reconstruct = tuple(self.reconstruct or ())
        extra = [r for r in self.reconstruct if r not in RECONSTRUCT]
        if extra:
            bad("reconstruct", f"{extra} are not among {', '.join(RECONSTRUCT)}")
        if self.align not in ALIGN:
            bad("align", f"{self.align!r} is not one of {', '.join(ALIGN)}")
        if not 0 <= self.holdout < 1:
            bad("holdout", f"{self.holdout} must be in [0, 1)")
        if self.router_steps < 0:
            bad("router_steps", f"{self.router_steps} must be >= 0")
        return self

    @property
    def fits_router(self) -> bool:
        return self.router in ("regression", "rank")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reconstruct"] = list(self.reconstruct)
        return d


@dataclass
class LayerCalibration:
    router: torch.Tensor                   # [E, H] linear router rows
    scale: float
    down: torch.Tensor | None = None       # [H, F] refitted down_proj, or None
    report: dict = field(default_factory=dict)


def _split(n: int, holdout: float, seq_len: int | None):
    """(fit, held) index tensors: the last `holdout` fraction of the tokens (whole sequences when seq_len is given)."""
    if holdout <= 0 or n < 2:
        idx = torch.arange(n)
        return idx, idx
    unit = seq_len or 1
    units = n // unit
    held_units = max(1, int(round(units * holdout)))
    if held_units >= units:
        held_units = units - 1 if units > 1 else 0
    cut = (units - held_units) * unit
    if held_units == 0:
        cut = n - max(1, int(n * holdout))
    return torch.arange(cut), torch.arange(cut, n)


def _route(x, w, k, scale):
    idx, p = R.topk_softmax(x @ w.T, k)
    return idx, p * scale


@torch.no_grad()
def _errors(f, x, y, w, k, scale, down=None):
    idx, p = _route(x, w, k, scale)
    return layer_error(f, x, y, idx, p, down=down)


def calibrate_layer(gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor, partition: Partition,
                    x: torch.Tensor, k: int, spec: CalibrationSpec, init_router: torch.Tensor | None = None,
                    init_scale: float | None = None, seq_len: int | None = None) -> LayerCalibration:
    """One layer (module docstring). x [N, H]: the layer's MLP inputs on the calibration tokens; `init_router`
    [E, H] linear router rows (needed unless the router is fitted); seq_len: keep held-out tokens whole
    sequences."""
    spec.validate()
    f = PartitionedFFN(gate_w, up_w, down_w, partition)
    E = f.E
    if not 1 <= k <= E:
        raise PartitionError(f"top_k: {k} must be in [1, {E}]")
    scale = float(init_scale if init_scale is not None else E / k)
    x = x.float()
    fit, held = _split(x.shape[0], spec.holdout, seq_len)
    xf, xh = x[fit], x[held]
    with torch.no_grad():
        hf, hh = f.hidden(xf), f.hidden(xh)
        yf, yh = hf @ f.down.T, hh @ f.down.T
        nf, nh = f.expert_norms(hf), f.expert_norms(hh)
    del hf, hh
    rep: dict = {"tokens_fit": int(xf.shape[0]), "tokens_held": int(xh.shape[0])}
    oi = R.oracle_topk(nh, k)
    rep["oracle"] = {"rel_error": layer_error(f, xh, yh, oi, torch.ones(oi.shape))}
    steps = []

    def record(name, w, s, down=None, extra=None):
        e = {"step": name, "rel_error": _errors(f, xh, yh, w, k, s, down),
             **R.routing_quality(xh @ w.T, nh, k).to_dict(), "scale": round(s, 4)}
        if extra:
            e.update(extra)
        steps.append(e)

    if spec.fits_router:
        w = R.fit_router(xf, nf, k, method=spec.router, ridge=spec.ridge)
        if init_router is not None:
            record("initial", init_router.float(), scale)
        record(spec.router, w, scale)
    else:
        if init_router is None:
            raise PartitionError(f"calibration.router: {spec.router!r} keeps the converter's router, but none was given")
        w = init_router.float()
        record("initial", w, scale)
    stats = None
    xs = xf
    if spec.weights == "calibrated" or "router" in spec.reconstruct:
        # the [N, E, E] form costs N E^2 H to build: an evenly spaced subset of the fit tokens
        sub = torch.linspace(0, xf.shape[0] - 1, min(xf.shape[0], max(1, spec.stats_tokens))).round().long()
        xs = xf[sub]
        stats = f.pair_stats(xs, yf[sub])
    if spec.weights == "calibrated":
        cal = R.calibrate_weights(xs @ w.T, k, *stats)
        # a factor of 0 (uniform weights) is kept as a tiny positive one: the ranking must survive
        factor = cal["factor"] if cal["factor"] > 0 else 1e-3 / float((xs @ w.T).std().clamp_min(1e-12))
        w, scale = w * factor, float(cal["scale"])
        record("weights", w, scale, extra={"factor": factor})
    if "router" in spec.reconstruct:
        w, scale, hist = reconstruct_router(xs, w, scale, k, *stats, steps=spec.router_steps)
        record("reconstruct-router", w, scale, extra={"fit_history": [round(v, 5) for v in hist]})
    del stats
    down = None
    if "experts" in spec.reconstruct:
        idx, p = _route(xf, w, k, scale)
        down = reconstruct_down(f, xf, yf, idx, p, ridge=spec.down_ridge)
        record("reconstruct-experts", w, scale, down)
    if spec.align != "none":
        with torch.no_grad():
            idx, p = _route(xf, w, k, scale)
            ym = f.moe(xf, idx, p, down=down)
        al = channel_alignment(ym, yf, spec.align)
        base = f.down if down is None else down
        down = base * al["scale"][:, None]
        record(f"align-{spec.align}", w, scale, down,
               extra={"fit_rel_error_with_bias": round(al["rel_error_scale_bias"], 5),
                      "fit_rel_error_scale_only": round(al["rel_error_scale"], 5), "bias_norm": al["bias_norm"]})
    rep["steps"] = steps
    rep["rel_error"] = steps[-1]["rel_error"]
    return LayerCalibration(w.contiguous(), scale, down, rep)


def mlp_gate_from_linear(w: torch.Tensor, x_sample: torch.Tensor | None = None, bound: float = 0.5) -> tuple:
    """(W1 [E, H], W2 [E, E]) of a Linear-Tanh-Linear gate (llama-moe v1) whose logits W2 tanh(W1 x) rank the experts
    as x W^T does (tanh is monotone) and nearly equal it: W1 = c W with c such that |c x W^T| <= `bound` on the
    sample (tanh is almost linear there), W2 = I / c."""
    c = 1.0
    if x_sample is not None:
        m = float((x_sample.float() @ w.float().T).abs().max())
        if m > bound:
            c = bound / m
    e = w.shape[0]
    return w * c, torch.eye(e) / c


class CalibrationStream:
    """The dense model's MLP inputs at each layer on the calibration tokens, one layer at a time (module docstring).

    `inputs(i)` must be called with increasing i; layers in between are run without being returned."""

    def __init__(self, model_dir: str, data: CalibrationData, micro_batch: int = 4, dtype=torch.float32):
        self.m = LayerStream(model_dir, dtype=dtype)
        self.ids = data.ids
        self.micro_batch = micro_batch
        self.next = 0
        self.seq_len = int(data.ids.shape[1])
        with torch.no_grad():
            self.h = self.m.embed(self.ids)

    @torch.no_grad()
    def inputs(self, i: int) -> torch.Tensor:
        if i < self.next:
            raise ValueError(f"CalibrationStream.inputs({i}): already past layer {i} (next is {self.next})")
        if i >= self.m.num_layers:
            raise ValueError(f"CalibrationStream.inputs({i}): the model has {self.m.num_layers} layers")
        x = None
        while self.next <= i:
            layer = self.m.layer(self.next)
            cap = _Capture(layer, "gate") if self.next == i else None
            xs = []
            for b in _batches(self.h.shape[0], self.micro_batch):
                self.h[b] = self.m.run_layer(layer, self.h[b])
                if cap is not None:
                    xs.append(cap.x.reshape(-1, cap.x.shape[-1]).float())
            if cap is not None:
                cap.remove()
                x = torch.cat(xs)
            del layer
            self.next += 1
        return x
