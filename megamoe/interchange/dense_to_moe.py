"""`hf_to_moe` (megamoe-convert hf-to-moe): a dense HF LLaMA -> LLaMA-MoE shards (expert construction), checked by the guard.

    hf_to_moe(src, out, num_experts=8, top_k=2, method="random", tp=2, ep=2)   # dense LLaMA -> LLaMA-MoE shards
    hf_to_moe(src_v1_or_mixtral, out)                                          # a released MoE: import_moe.py

Streams one decoder layer at a time (a 7B model converts in well under 4 GB of RAM); writes into a temporary sibling
directory renamed into place only after the guard passed. The guard compares (guard.py) the dense source with the
written MoE with every expert active, a uniform router and scale E (the construct-then-check identity: the
partition lost no neuron), and the conversion's real routing in memory with the same routing read back from the
written shards. Partitions come from megamoe.construct (random, clustering, or calibrated methods).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import replace

import numpy as np
import torch
from tqdm import tqdm

from megamoe.config import ModelConfig, MoEConfig, ParallelConfig
from megamoe.construct import partition as P
from megamoe.construct.build import moe_config_for, router_state
from megamoe.construct.calibrate import CalibrationSpec, CalibrationStream, calibrate_layer, mlp_gate_from_linear
from megamoe.construct.calib_data import tokens_from_indexed, tokens_from_jsonl, tokens_from_local_corpus
from megamoe.construct.pipeline import ConstructionSpec, construct
from megamoe.data.tokenizers import load_tokenizer
from megamoe.errors import ConfigError, InputError
from megamoe.fileio import atomic_write_text
from megamoe.formats.buffers import Arena
from megamoe.formats.checksum import BackgroundHasher
from megamoe.formats.checksum import resolve as checksum_resolve
from megamoe.formats.hf_dir import HFDir
from megamoe.formats.hf_llama import config_from_hf
from megamoe.formats.layout import expected_names, hf_llama_to_ours_name
from megamoe.formats.safetensors_io import DTYPES
from megamoe.formats.shards import FILE_SOURCE, ShardedCheckpoint, ShardWriter, check_output, staged_output
from megamoe.formats.tokenizer_files import copy_tokenizer
from megamoe.interchange.attn_experts import attn_layer_state, attn_moe_for, check_attn_args
from megamoe.interchange.common import (check_tensors, check_vocab, layer_names, no_gc, resolve_source, shard_logits,
                                        source_info, source_kind, summary, torch_dtype_code, torch_threads,
                                        update_manifest)
from megamoe.interchange.forward import Forward, threads, usable_cores
from megamoe.interchange.guard import DEFAULT_TOLERANCE, GuardReport, Skipped, check, guard_ids
from megamoe.interchange.import_moe import import_moe

CALIBRATED_METHODS = ("coactivation", "gradient", "sharing-inner", "sharing-inter")


def make_partitions(hf: HFDir, dense_cfg: ModelConfig, key_of: dict, method: str, num_experts: int, seed: int,
                    moe_layers, partitions_dir: str | None, progress: bool, calibration: dict | None = None,
                    gate_init: str = "random", data=None):
    """{layer: Partition} and {layer: centroids or None} for every MoE layer.

    `calibration` (for the calibrated methods): {"jsonl": path or {domain: path}} or {"prefix": megatron prefix or
    {domain: prefix}}, plus optional seq_len, token_budget, clusters, expert_size, residual_size, routed_rule."""
    layers = [i for i in range(dense_cfg.num_layers) if moe_layers is None or i in moe_layers]
    if partitions_dir:
        parts = P.read_partitions(partitions_dir)
        parts = {i: p for i, p in parts.items() if i in layers}
        missing = [i for i in layers if i not in parts]
        if missing:
            raise ConfigError(f"--partitions {partitions_dir}: no partition for layers {missing}")
        cents = {}
        cpath = os.path.join(partitions_dir, "partition", "centroids.safetensors")
        if os.path.isfile(cpath):  # router centroids written by megamoe.construct.write_construction
            from safetensors.numpy import load_file
            cents = {int(k.split(".")[1]): v for k, v in load_file(cpath).items()}
        return parts, cents, (next(iter(parts.values())).method if parts else "file")
    F = dense_cfg.intermediate_size
    if method in ("random", "clustering") and F % num_experts:
        raise ConfigError(f"--experts: {num_experts} experts do not divide the FFN width (intermediate_size {F} in "
                          f"{os.path.join(hf.path, 'config.json')}); the balanced method {method!r} needs F/E "
                          f"neurons per expert: choose E among the divisors of {F}")
    if method == "random":
        return {i: P.split_random(F, num_experts, seed=seed + i) for i in layers}, {}, method
    if method == "clustering":
        parts, cents = {}, {}
        for i in tqdm(layers, desc="clustering", disable=not progress, unit="layer"):
            up = hf.get(key_of[f"layers.{i}.mlp.up_proj.weight"]).float().numpy()
            parts[i], cents[i] = P.split_clustering(up, num_experts, seed=seed)
        return parts, cents, method
    if method in CALIBRATED_METHODS:
        if data is None and not (calibration and (calibration.get("jsonl") or calibration.get("prefix")
                                                  or calibration.get("local"))):
            raise ConfigError(f"method: {method!r} needs calibration statistics: give --calib-jsonl FILE (or "
                              "DOMAIN=FILE ...), --calib-prefix PREFIX or --calib-local, or compute partitions with "
                              "`python -m megamoe.construct` and pass them with --partitions DIR")
        data = data if data is not None else calibration_tokens(hf.path, calibration)
        calibration = calibration or {}
        spec = ConstructionSpec(method=method, num_experts=num_experts, seed=seed, layers=layers,
                                gate_init="centroids" if gate_init == "centroids" else "random",
                                clusters=calibration.get("clusters", "kmeans"),
                                expert_size=calibration.get("expert_size"),
                                residual_size=calibration.get("residual_size", 0) or 0,
                                routed_rule=calibration.get("routed_rule", "greedy"))
        res = construct(hf.path, spec, data, progress=tqdm.write if progress else None)
        return res.partitions, res.centroids or {}, method
    raise ConfigError(f"method: {method!r} is not one of random, clustering, {', '.join(CALIBRATED_METHODS)}")


def calibration_tokens(model_dir: str, calibration: dict):
    """CalibrationData from {"jsonl": path or {domain: path}} | {"prefix": prefix or {domain: prefix}} |
    {"local": True} (megamoe.data.build_local_corpus: text that ships with Python, one domain per source, tokenized
    with the model's tokenizer), with seq_len (default 2048) and token_budget (default 65536)."""
    seq_len, budget = calibration.get("seq_len", 2048), calibration.get("token_budget", 65536)
    if calibration.get("prefix"):
        return tokens_from_indexed(calibration["prefix"], seq_len=seq_len, token_budget=budget)
    if not (calibration.get("jsonl") or calibration.get("local")):
        raise ConfigError("calibration: give --calib-jsonl, --calib-prefix or --calib-local")
    try:
        tok = load_tokenizer(model_dir)
    except (ValueError, OSError) as err:
        raise InputError(f"{model_dir}: calibration text needs the source's tokenizer, and none loads ({err}). Add "
                         "its tokenizer files, give pre-tokenized data with --calib-prefix, or convert without "
                         "calibration (--recipe llama-moe-v1, or --no-calibrate with a split that needs no data)"
                         ) from err
    if calibration.get("jsonl"):
        return tokens_from_jsonl(calibration["jsonl"], tokenizer=tok, seq_len=seq_len, token_budget=budget)
    return tokens_from_local_corpus(tok, seq_len=seq_len, token_budget=budget)


def _default_calibration_tokens(hf: HFDir, calibration: dict | None):
    """The calibration tokens `calibration` names, or the local corpus (256-token sequences, 16384 tokens)."""
    src = dict(calibration or {})
    if not any(src.get(k) for k in ("jsonl", "prefix", "local")):
        src = {"seq_len": 256, "token_budget": 16384, **{k: v for k, v in src.items() if v}, "local": True}
    return calibration_tokens(hf.path, src)


def _check_args(*, num_experts, top_k, guard_tokens, tp, ep, etp, tolerance, score_scale, moe_layers):
    """The arguments' own ranges, before any file is read (the flag names are the CLI's)."""
    def bad(flag, msg):
        raise ConfigError(f"{flag}: {msg}")
    for flag, v, lo in (("--experts", num_experts, 1), ("--top-k", top_k, 1), ("--guard-tokens", guard_tokens, 0),
                        ("--tp", tp, 1), ("--ep", ep, 1), ("--etp", etp, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            bad(flag, f"{v!r} must be an integer >= {lo}")
    if top_k > num_experts:
        bad("--top-k", f"{top_k} is more than the {num_experts} experts (--experts)")
    if not tolerance > 0:
        bad("--tolerance", f"{tolerance!r} must be > 0")
    if score_scale is not None and not score_scale > 0:
        bad("--score-scale", f"{score_scale!r} must be > 0")
    if moe_layers is not None and (not all(isinstance(i, int) and i >= 0 for i in moe_layers)
                                   or len(set(moe_layers)) != len(moe_layers)):
        bad("--moe-layers", f"{moe_layers!r}: expected distinct non-negative layer indices")


def hf_to_moe(src: str, out: str, *, num_experts: int = 8, top_k: int = 2, method: str = "random",
              partitions_dir: str | None = None, router: str = "topk_noisy", gate_network: str = "mlp",
              score_scale: float | None = None, gate_init: str = "random", moe_layers=None, seed: int = 0,
              score_order: str | None = None,
              tp: int = 1, ep: int = 1, etp: int = 1, dtype: str | None = None,
              tolerance: float = DEFAULT_TOLERANCE, guard_tokens: int = 16, progress: bool = True,
              allow_pickle: bool = False, checksum: bool | str = True, calibration: dict | None = None,
              calibrate: CalibrationSpec | None = None, calibration_data=None,
              hasher: BackgroundHasher | None = None, attn_experts: int | None = None,
              attn_top_k: int | None = None, attn_scale: float | None = None, attn_mode: str | None = None) -> dict:
    """Dense HF LLaMA -> LLaMA-MoE shards (construct), or llama-moe v1 / Mixtral -> shards (import).
    `calibration`: see make_partitions (needed by the coactivation, gradient and sharing methods).
    `checksum`: True (xxh3_128, or sha256 without the xxhash package), an algorithm name ("xxh3_128", "sha256"), or
    False. `hasher`: a `checksum.BackgroundHasher` already started on the source's weight files (the CLI starts it
    before importing torch); used when it hashes exactly `hf.files` with the requested algorithm."""
    t0 = time.time()
    _check_args(num_experts=num_experts, top_k=top_k, guard_tokens=guard_tokens, tp=tp, ep=ep, etp=etp,
                tolerance=tolerance, score_scale=score_scale, moe_layers=moe_layers)
    check_attn_args(attn_experts, attn_top_k, attn_scale, attn_mode)
    attn = None if attn_experts is None else dict(num_experts=attn_experts, top_k=attn_top_k,
                                                  score_scale=attn_scale, mode=attn_mode)
    src = resolve_source(src)
    check_output(os.path.abspath(out))
    try:
        algorithm = checksum_resolve(None if checksum is True else checksum) if checksum else None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    hf = HFDir(src, allow_pickle=allow_pickle)
    kind = source_kind(hf)
    if hasher is not None and (algorithm is None or hasher.algorithm != algorithm
                               or [os.path.abspath(p) for p in hasher.paths] != [os.path.abspath(p) for p in hf.files]):
        hasher = None  # started on other files or with another algorithm: let it finish unused
    if algorithm is not None and hasher is None:
        hasher = BackgroundHasher(hf.files, algorithm)
    try:
        if kind == "llama":
            return _construct(hf, out, t0, hasher, num_experts=num_experts, top_k=top_k, method=method,
                              partitions_dir=partitions_dir, router=router, gate_network=gate_network,
                              score_scale=score_scale, gate_init=gate_init, moe_layers=moe_layers, seed=seed,
                              score_order=score_order, attn=attn,
                              par=ParallelConfig(tp=tp, ep=ep, etp=etp), dtype=torch_dtype_code(dtype),
                              tolerance=tolerance, guard_tokens=guard_tokens, progress=progress,
                              calibration=calibration, calibrate=calibrate, calibration_data=calibration_data)
        return import_moe(hf, kind, out, t0, hasher, par=ParallelConfig(tp=tp, ep=ep, etp=etp),
                       dtype=torch_dtype_code(dtype), tolerance=tolerance, guard_tokens=guard_tokens, progress=progress)
    finally:
        if hasher is not None:
            with contextlib.suppress(BaseException):
                hasher.result()
        hf.close()


def _construct(hf: HFDir, out, t0, hasher, *, num_experts, top_k, method, partitions_dir, router, gate_network,
               score_scale, gate_init, moe_layers, seed, par, dtype, tolerance, guard_tokens, progress,
               score_order=None, attn=None, calibration=None, calibrate=None, calibration_data=None):
    where = os.path.join(hf.path, "config.json")
    dense_cfg = config_from_hf(hf.config, where)
    attn_cfg = attn_moe_for(dense_cfg, where, **attn) if attn else None   # attention experts: checked before any work
    bad_layers = [i for i in moe_layers or [] if i >= dense_cfg.num_layers]
    if bad_layers:
        raise ConfigError(f"--moe-layers: {bad_layers} are not layers of {where} (num_hidden_layers "
                          f"{dense_cfg.num_layers}: indices 0..{dense_cfg.num_layers - 1})")
    if num_experts > dense_cfg.intermediate_size:
        raise ConfigError(f"--experts: {num_experts} experts exceed the FFN width (intermediate_size "
                          f"{dense_cfg.intermediate_size} in {where})")
    check_vocab(hf, dense_cfg, "model.embed_tokens.weight")
    key_of = check_tensors(hf, dense_cfg, hf_llama_to_ours_name)
    if calibration_data is None and calibrate is not None and method in CALIBRATED_METHODS and not partitions_dir:
        calibration_data = _default_calibration_tokens(hf, calibration)   # one token set for the split and routers
    parts, cents, method = make_partitions(hf, dense_cfg, key_of, method, num_experts, seed, moe_layers,
                                           partitions_dir, progress, calibration, gate_init, calibration_data)
    E = next(iter(parts.values())).num_experts
    moe = MoEConfig(num_experts=E, top_k=top_k, router=router, gate_network=gate_network,
                    score_scale=float(score_scale) if score_scale is not None else _default_scale(parts, E, top_k),
                    moe_layers=moe_layers,
                    score_order=score_order)
    cfg = moe_config_for(dense_cfg, parts, moe)
    if attn_cfg is not None:
        cfg = replace(cfg, attn_moe=attn_cfg).validate()
    par.validate(cfg)
    cal = None
    if calibrate is not None:
        cal = _Calibrator(hf, cfg, parts, calibrate, calibration, calibration_data, gate_init, progress)
    src_dtype = {n: hf.dtype(k) for n, k in key_of.items()}
    emb_dt = src_dtype["embed.weight"]
    dtypes = {n: dtype or src_dtype.get(n) or src_dtype.get(_dense_mlp_name(n)) or emb_dt for n in expected_names(cfg)}
    dup = {i: p.duplicated for i, p in parts.items()}
    miss = {i: p.missing for i, p in parts.items()}
    exact = all(p.is_exact_cover for p in parts.values())
    ids = guard_ids(cfg.vocab_size, guard_tokens)
    report = GuardReport()

    guard = guard_tokens > 0
    # the source pass runs beside the writer thread: the other cores (none spare on 2 cores) share its matmuls
    with staged_output(out) as tmp, no_gc(), torch_threads(1), threads(usable_cores() - WRITE_THREADS):
        info = {"partition": {"method": method, "seed": seed, "gate_init": gate_init,
                              "duplicated_neurons": sum(dup.values()), "missing_neurons": sum(miss.values())}}
        if cal is not None:
            info["calibration"] = cal.info
        # the bytes go out on a background thread (file writes release the GIL) while this thread gathers the next
        # experts and runs the guard's source pass on the same memory-mapped weights
        w = ShardWriter(tmp, cfg, par, dtypes, info, threads=WRITE_THREADS)
        bar = tqdm(total=w.nbytes, desc="hf-to-moe", unit="B", unit_scale=True, disable=not progress)
        arena = Arena()
        # one pass, two rows: row 0 the dense source (every neuron weight 1), row 1 the conversion's real routing
        # applied to the dense FFN through the partition; both share each weight read
        f_src = Forward(cfg, ids.repeat(2, 1), partitions=parts, row_modes=["identity", "routed"]) if guard else None
        H = cfg.hidden_size
        try:
            def read(n):
                """Source tensor `n` (our name), memory-mapped (no read copy), cast to the output dtype. An uncast
                map is tagged with its place in the source file: the writer then copies those bytes file to file
                in the kernel (nothing here modifies a source tensor)."""
                t = hf.map(key_of[n])
                want = DTYPES[dtype] if dtype else t.dtype
                if t.dtype != want:
                    return t.to(want)
                where = hf.file_source(key_of[n])
                if where is not None:
                    setattr(t, FILE_SOURCE, where)
                return t

            def emit(n, t):
                w.write(n, t)
                bar.update(t.numel() * t.element_size())

            emb = read("embed.weight")
            emit("embed.weight", emb)
            if guard:
                f_src.embed({"embed.weight": emb}.__getitem__)
            done_before = w.mark()
            for i in range(cfg.num_layers):
                src = {n: read(n) for n in layer_names(key_of, i)}
                written = {}   # attention experts: k/v heads copied into sibling experts (the source pass keeps the
                if cfg.is_attn_moe_layer(i):  # dense k/v: the identity check compares them), and the router
                    gen_a = torch.Generator().manual_seed(seed * 100003 + i)
                    written = attn_layer_state(cfg, i, src, gate_init, gen_a)
                    src.update({n: t for n, t in written.items() if n.endswith("router.gate.weight")})
                pre = f"layers.{i}.mlp."
                if cfg.moe_index(i) is not None:
                    g, u, d = (src[pre + x] for x in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
                    gen = torch.Generator().manual_seed(seed * 100003 + i)  # build_moe's per-layer convention
                    src.update(router_state(pre, H, E, cfg.moe, gate_init, cents.get(i), g.dtype, gen))
                    if cal is not None:  # fitted router, the layer's score scale, a refitted down_proj
                        with torch_threads(usable_cores()):
                            src.update(cal.layer(i, src, pre))
                        d = src[pre + "down_proj.weight"]
                    # every block's neurons back to back: rows of gate/up, columns of down, gathered once per
                    # layer into buffers that alternate between layers (the previous layer may still be writing)
                    cut = _gather_experts(parts[i], g, u, d, arena, f"{i % 2}")
                for n in layer_names(w.names, i):
                    t = written.get(n, src.get(n))
                    if t is None:  # an expert (or shared) tensor: a slice of the gathered matrices
                        block, proj = n[len(pre):].rsplit(".", 2)[0], n.rsplit(".", 2)[1]
                        t = cut[block][proj]
                    elif t.dtype != DTYPES[dtypes[n]]:
                        t = t.to(DTYPES[dtypes[n]])
                    emit(n, t)
                layer_done = w.mark()
                if guard:
                    f_src.layer(i, src.__getitem__)  # the stored dtype; the forward converts blocks to fp32
                del src
                w.wait(done_before)  # at most two layers in flight: bounds memory, frees this parity's buffers
                done_before = layer_done
            tail = {"norm.weight": read("norm.weight"), "embed.weight": emb}
            emit("norm.weight", tail["norm.weight"])
            if not cfg.tie_word_embeddings:
                tail["lm_head.weight"] = read("lm_head.weight")
                emit("lm_head.weight", tail["lm_head.weight"])
            if guard:
                lg = f_src.head(tail.__getitem__)
                dense_logits, mem_logits = lg[: ids.shape[0]], lg[ids.shape[0]:]
            del tail, emb
            w.close()
            arena.clear()
            bar.close()
        except BaseException:
            w.abort()
            raise
        P.write_partitions(os.path.join(tmp, "partitions"), parts)
        if cal is not None:
            cal.write(os.path.join(tmp, "partitions", "calibration.json"))
        copy_tokenizer(hf.path, tmp)

        if guard:
            # read back what was written: identity (all experts, uniform router, scale E) and real routing
            ck = ShardedCheckpoint(tmp)
            try:
                id_logits, real_logits = shard_logits(ck, ids, progress, both=True)
            finally:
                ck.close()
            if exact and cal is not None and cal.modified:
                report.add(check("construct identity: the calibrated FFN (dense weights, refitted/aligned "
                                 "down_proj) vs written MoE (all experts active, uniform router, scale E)",
                                 dense_logits, id_logits, tolerance))
            elif exact:
                report.add(check("construct identity: dense source vs written MoE (all experts active, uniform "
                                 "router, scale E)", dense_logits, id_logits, tolerance))
            else:
                report.add(Skipped("construct identity", f"{method}: {sum(dup.values())} neurons duplicated and "
                                   f"{sum(miss.values())} missing across layers, so the MoE is not a re-partition of "
                                   "the dense FFN and cannot reproduce it; compared the real routing only"))
            report.add(check("written experts vs the partition applied to the dense FFN (real routing)",
                             mem_logits, real_logits, tolerance))
        else:
            report.add(Skipped("guard", "disabled (--guard-tokens 0): the result was NOT checked"))
        report.raise_if_failed(f"hf-to-moe {hf.path} -> {out}")
        update_manifest(tmp, source=source_info(hf, "hf-llama", hasher),
                         guard=[c.to_dict() for c in report.checks])
        nbytes = w.nbytes
    extra = {"method": method, "duplicated_neurons": sum(dup.values()), "missing_neurons": sum(miss.values()),
             "source": hf.path}
    if cal is not None:
        extra["calibration"] = cal.summary()
    return summary("hf-to-moe", out, cfg, par, nbytes, t0, report, extra)

class _Calibrator:
    """Router calibration / reconstruction / alignment inside the conversion loop (megamoe.construct.calibrate),
    one MoE layer at a time as the writer reaches it: the dense model's MLP inputs on the calibration tokens are
    advanced layer by layer beside it (CalibrationStream), so memory stays at one layer plus [N, H] hidden states.

    Per layer it replaces the router tensors (linear gate: the fitted rows; mlp gate: mlp_gate_from_linear), sets
    the layer's entry of cfg.moe.score_scale (a list per MoE layer from here on; the manifest is written at the end
    and the guard's in-memory forward reads it per layer) and, when experts are reconstructed or aligned, the
    down_proj the experts are cut from."""

    def __init__(self, hf, cfg, parts, spec, calibration, data, gate_init, progress):
        spec = spec if isinstance(spec, CalibrationSpec) else CalibrationSpec(**spec)
        self.spec = spec.validate()
        linear_init = cfg.moe.gate_network == "linear" or gate_init in ("centroids", "zeros")
        if not spec.fits_router and not linear_init:
            raise ConfigError(f"calibration.router: {spec.router!r} keeps the converter's router, but a random "
                              "mlp gate (Linear, Tanh, Linear) is not a linear router to calibrate: fit the router "
                              "(--calib-router rank|regression), or use --gate linear / --gate-init centroids")
        if data is None:
            data = _default_calibration_tokens(hf, calibration)
        self.cfg, self.parts, self.gate_init, self.linear_init = cfg, parts, gate_init, linear_init
        self.stream = CalibrationStream(hf.path, data)
        self.tokens = int(data.ids.numel())
        self.progress = progress
        n = cfg.num_moe_layers
        self.scales = [cfg.moe.layer_scale(j) for j in range(n)]
        cfg.moe.score_scale = list(self.scales)
        self.reports = {}
        self.modified = False
        self.t0 = time.time()
        self.info = {"spec": spec.to_dict(), "tokens": self.tokens, "seq_len": int(data.ids.shape[1]),
                     "domains": sorted(set(data.domains)) if data.domains else None}

    def _initial_router(self, src, pre):
        if not self.linear_init:
            return None
        if self.cfg.moe.gate_network == "linear":
            return src[pre + "router.gate.weight"].float()
        return src[pre + "router.gate.0.weight"].float()   # centroids / zeros: W2 is the identity / zero

    def layer(self, i: int, src: dict, pre: str) -> dict:
        cfg, mi = self.cfg, self.cfg.moe_index(i)
        g, u, d = (src[pre + x] for x in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
        t = time.time()
        x = self.stream.inputs(i)
        res = calibrate_layer(g, u, d, self.parts[i], x, cfg.moe.top_k, self.spec,
                              init_router=self._initial_router(src, pre), init_scale=self.scales[mi],
                              seq_len=self.stream.seq_len)
        self.scales[mi] = res.scale
        cfg.moe.score_scale[mi] = res.scale
        dt = g.dtype
        out = {}
        if cfg.moe.gate_network == "linear":
            out[pre + "router.gate.weight"] = res.router.to(dt)
        else:
            w1, w2 = mlp_gate_from_linear(res.router, x[:: max(1, x.shape[0] // 4096)])
            out[pre + "router.gate.0.weight"] = w1.to(dt)
            out[pre + "router.gate.2.weight"] = w2.to(dt)
        if res.down is not None:
            out[pre + "down_proj.weight"] = res.down.to(dt)
            self.modified = True
        rep = dict(res.report, seconds=round(time.time() - t, 2))
        self.reports[i] = rep
        if self.progress:
            first, last = rep["steps"][0], rep["steps"][-1]
            tqdm.write(f"calibrate layer {i}: held-out rel. error {first['rel_error']:.3f} ({first['step']}) -> "
                       f"{last['rel_error']:.3f} ({last['step']}), oracle {rep['oracle']['rel_error']:.3f}, recall "
                       f"{last['recall']:.2f}, scale {res.scale:.3g} ({rep['seconds']:.1f}s)")
        return out

    def summary(self) -> dict:
        r = self.reports
        mean = (lambda key: round(sum(v[key] for v in r.values()) / max(1, len(r)), 4))
        return {"layers": len(r), "tokens": self.tokens, "seconds": round(time.time() - self.t0, 1),
                "rel_error_mean": mean("rel_error"),
                "oracle_rel_error_mean": round(sum(v["oracle"]["rel_error"] for v in r.values()) / max(1, len(r)), 4),
                "recall_mean": round(sum(v["steps"][-1]["recall"] for v in r.values()) / max(1, len(r)), 4),
                "score_scale": [round(s, 4) for s in self.scales]}

    def write(self, path: str):
        atomic_write_text(path, json.dumps({**self.info, "summary": self.summary(), "layers": self.reports},
                                           indent=1, default=float))


WRITE_THREADS = 1  # background writer threads of hf-to-moe (the main thread gathers and runs the guard meanwhile)
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _gather_experts(part, g, u, d, arena: Arena, slot: str) -> dict:
    """{block: {"gate_proj", "up_proj", "down_proj": tensor}} for the experts (`experts.{e}`) and the residual
    block (`shared`) of partition `part`: all blocks' neurons are gathered back to back with one index_select of
    the rows of gate/up and one gather of the columns of down, into arena slots named after `slot`; each block's
    tensors are views (gate/up: row ranges, contiguous; down: column ranges, rows contiguous)."""
    blocks = [(f"experts.{e}", idx) for e, idx in enumerate(part.experts)]
    if part.residual:
        blocks.append(("shared", part.residual))
    order = torch.as_tensor([int(j) for _, idx in blocks for j in idx], dtype=torch.long)
    n = len(order)
    G = torch.index_select(g, 0, order, out=arena.empty(f"cut.gate.{slot}", [n, g.shape[1]], g.dtype))
    U = torch.index_select(u, 0, order, out=arena.empty(f"cut.up.{slot}", [n, u.shape[1]], u.dtype))
    D = arena.empty(f"cut.down.{slot}", [d.shape[0], n], d.dtype)
    it = _INT_OF_SIZE.get(d.element_size())
    if it is not None and d.is_contiguous():
        # numpy's take is about 2x torch's index_select along dim 1, and releases the GIL
        np.take(d.view(it).numpy(), order.numpy(), axis=1, out=D.view(it).numpy())
    else:
        torch.index_select(d, 1, order, out=D)
    cut, a = {}, 0
    for name, idx in blocks:
        b = a + len(idx)
        cut[name] = {"gate_proj": G[a:b], "up_proj": U[a:b], "down_proj": D[:, a:b]}
        a = b
    return cut


def _default_scale(parts, num_experts: int, top_k: int) -> float:
    """E/k (llama-moe v1); 1.0 with a residual block (LLaMA-MoE v2's residual models: scale_factor 1.0)."""
    return 1.0 if any(p.residual for p in parts.values()) else num_experts / top_k


def _dense_mlp_name(n: str) -> str:
    """The dense tensor an MoE tensor is cut from (for its dtype)."""
    parts = n.split(".")
    if len(parts) > 4 and parts[2] == "mlp" and parts[3] in ("experts", "shared"):
        return f"layers.{parts[1]}.mlp.{parts[-2]}.weight"
    return n
