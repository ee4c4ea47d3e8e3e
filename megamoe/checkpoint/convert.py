"""Conversions between Hugging Face checkpoints and our sharded LLaMA-MoE format, each one checked.

    hf_to_moe(src, out, num_experts=8, top_k=2, method="random", tp=2, ep=2)   # dense LLaMA -> LLaMA-MoE shards
    hf_to_moe(src_v1_or_mixtral, out, tp=1, ep=1)                              # released MoE -> shards (import)
    moe_to_hf(shards, out, fmt="mixtral" | "llama-moe-v1" | "auto")           # shards -> HF directory
    reshard_checked(shards, out, tp=1, ep=1)                                   # another TP/EP/ETP layout
    inspect(path)                                                              # what a directory holds

Every conversion
- streams: one decoder layer in memory at a time (a 7B model converts in well under 4 GB of RAM);
- writes into a temporary sibling directory and renames it into place only after the guard passed, so a failure
  leaves nothing behind and an existing directory is never touched (an output that already holds anything is
  refused before any work);
- runs the guard (`guard.py`): logits on a few tokens, source vs result, and refuses success when they differ:
    hf-to-moe (construct)  dense source vs the written MoE with every expert active, uniform router and scale E
                           (the construct-then-check identity: the partition lost no neuron); and the converted
                           model under its real routing, in memory vs loaded back from the written shards;
    hf-to-moe (import)     the source under its own format's semantics (llama-moe v1: the independent
                           `llama_moe_v1_reference`) vs our forward over the written shards;
    moe-to-hf              our forward over the shards vs transformers' MixtralForCausalLM on the export (small
                           models; larger ones: a streaming forward over the exported Mixtral keys), or vs
                           `llama_moe_v1_reference` on the llama-moe v1 export;
    reshard                every tensor bit-identical to the source.
Each returns a summary dict (experts, sizes, active/total parameters, bytes, seconds, guard lines).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import time

import numpy as np
import torch
from tqdm import tqdm

from ..config import ConfigError, MoEConfig, ModelConfig, ParallelConfig
from . import llama_moe_v1 as v1
from . import mixtral as mx
from .buffers import Arena
from .forward import Forward, SplitWeight, reference_logits, threads, usable_cores
from .guard import DEFAULT_TOLERANCE, GuardReport, Skipped, check, guard_ids
from .hf_dir import HFDir, read_json
from .hf_writer import HFWriter, write_json
from .layout import expected_names, expected_shape, hf_llama_to_ours_name
from .checksum import BackgroundHasher, resolve as checksum_resolve
from .safetensors_io import DTYPES, CheckpointError
from .shards import (FILE_SOURCE, MANIFEST, ShardWriter, ShardedCheckpoint, check_output, is_shard_dir,
                     staged_output, write_tensors)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt", "added_tokens.json")
EMBEDDED_NAMES = ("smollm2", "embedded")
CALIBRATED_METHODS = ("coactivation", "gradient", "sharing-inner", "sharing-inter")
TRANSFORMERS_CHECK_MAX_BYTES = 2 << 30


# ---------------------------------------------------------------------------------------------------------------
# output staging: temporary sibling directory, renamed into place on success

def copy_tokenizer(src_dir: str, dst_dir: str) -> list[str]:
    copied = []
    for f in TOKENIZER_FILES:
        p = os.path.join(src_dir, f)
        if os.path.isfile(p):
            shutil.copyfile(p, os.path.join(dst_dir, f))
            copied.append(f)
    return copied


def resolve_source(src: str) -> str:
    """A checkpoint path, or "smollm2"/"embedded" for the embedded SmolLM2-135M (materialised once, cached)."""
    if src in EMBEDDED_NAMES and not os.path.exists(src):
        from .embedded import materialize_smollm2
        try:
            return materialize_smollm2()
        except (RuntimeError, FileExistsError) as e:
            raise CheckpointError(f"--src {src}: the embedded model is unavailable: {e}") from None
    return src


def _torch_dtype(name: str | None):
    if name is None:
        return None
    table = {"float32": "F32", "fp32": "F32", "bfloat16": "BF16", "bf16": "BF16", "float16": "F16", "fp16": "F16"}
    if name not in table:
        raise ConfigError(f"dtype: {name!r} is not one of {sorted(table)}")
    return table[name]


def _summary(kind, out, cfg: ModelConfig, par, nbytes, t0, report: GuardReport, extra=None) -> dict:
    counts = cfg.param_counts()
    s = {"command": kind, "output": os.path.abspath(out), "layers": cfg.num_layers,
         "params_total": counts["total"], "params_active": counts["active"], "bytes_written": nbytes,
         "seconds": round(time.time() - t0, 3), "guard": report.lines()}
    if cfg.moe is not None:
        sizes = sorted({x for i in range(cfg.num_layers) if cfg.moe_index(i) is not None for x in cfg.expert_sizes(i)})
        s.update({"experts": cfg.moe.num_experts, "top_k": cfg.moe.top_k, "expert_sizes": sizes,
                  "moe_layers": cfg.num_moe_layers,
                  "residual_size": cfg.moe.residual_size, "router": cfg.moe.router,
                  "gate_network": cfg.moe.gate_network, "score_scale": cfg.moe.score_scale})
    if par is not None:
        s["parallel"] = {"tp": par.tp, "ep": par.ep, "etp": par.etp}
    s.update(extra or {})
    return s


def _layer_names(names, i):
    p = f"layers.{i}."
    return [n for n in names if n.startswith(p)]


def _update_manifest(d: str, **fields):
    p = os.path.join(d, MANIFEST)
    m = read_json(p)
    m.update(fields)
    with open(p, "w") as f:
        json.dump(m, f, indent=1)


# ---------------------------------------------------------------------------------------------------------------
# source checks

def source_kind(hf: HFDir) -> str:
    mt = hf.config.get("model_type")
    if mt == "llama":
        return "llama"
    if mt == "llama_moe":
        return "llama-moe-v1"
    if mt == "mixtral":
        return "mixtral"
    where = os.path.join(hf.path, "config.json")
    raise ConfigError(f"{where}: model_type is {mt!r}; expected a dense LLaMA ('llama'), a llama-moe v1 "
                      "('llama_moe') or a Mixtral ('mixtral') checkpoint")


def check_vocab(hf: HFDir, cfg: ModelConfig, embed_key: str):
    where = os.path.join(hf.path, "config.json")
    rows = hf.shape(embed_key)[0] if embed_key in hf else None
    if rows is not None and rows != cfg.vocab_size:
        raise CheckpointError(f"vocabulary mismatch: {embed_key} has {rows} rows but {where} says "
                              f"vocab_size {cfg.vocab_size}")
    tok = os.path.join(hf.path, "tokenizer.json")
    if os.path.isfile(tok):
        try:
            t = read_json(tok)
            n = len((t.get("model") or {}).get("vocab") or {})
            ids = [a.get("id", -1) for a in t.get("added_tokens") or []]
            n = max([n] + [i + 1 for i in ids])
        except (CheckpointError, AttributeError, TypeError):
            n = 0
        if n > cfg.vocab_size:
            raise CheckpointError(f"vocabulary mismatch: {tok} defines {n} tokens but {where} says vocab_size "
                                  f"{cfg.vocab_size}; token ids past the embedding would be out of range")


def check_tensors(hf: HFDir, cfg: ModelConfig, to_ours, optional=()) -> dict:
    """{our name: HF name} for every tensor `cfg` needs; errors name the file and tensor. Unknown keys are errors
    too: silently skipping a tensor is how a converter leaves experts at random init."""
    ours_of = {}
    for k in hf.keys():
        try:
            o = to_ours(k)
        except KeyError:
            raise CheckpointError(f"{hf.path}: unexpected tensor {k!r} for a {cfg.moe and 'MoE' or 'LLaMA'} "
                                  "checkpoint of this config") from None
        if o is not None:
            ours_of[o] = k
    need = expected_names(cfg)
    if cfg.tie_word_embeddings:
        ours_of.pop("lm_head.weight", None)
    out = {}
    for n in need:
        if n not in ours_of:
            if n in optional:
                continue
            raise CheckpointError(f"{hf.path}: missing tensor for {n!r} (config says {cfg.num_layers} layers"
                                  f"{', %d experts' % cfg.moe.num_experts if cfg.moe else ''})")
        k = ours_of[n]
        if hf.shape(k) != expected_shape(cfg, n):
            raise CheckpointError(f"{hf.path}: tensor {k!r} has shape {hf.shape(k)}, config.json implies "
                                  f"{expected_shape(cfg, n)}")
        out[n] = k
    extra = sorted(set(ours_of) - set(need))
    if extra:
        raise CheckpointError(f"{hf.path}: tensors {extra[:3]} do not belong to the model config.json describes")
    return out


# ---------------------------------------------------------------------------------------------------------------
# partitions

def make_partitions(hf: HFDir, dense_cfg: ModelConfig, key_of: dict, method: str, num_experts: int, seed: int,
                    moe_layers, partitions_dir: str | None, progress: bool, calibration: dict | None = None,
                    gate_init: str = "random"):
    """{layer: Partition} and {layer: centroids or None} for every MoE layer.

    `calibration` (for the calibrated methods): {"jsonl": path or {domain: path}} or {"prefix": megatron prefix or
    {domain: prefix}}, plus optional seq_len, token_budget, clusters, expert_size, residual_size, routed_rule."""
    from ..construct import partition as P
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
        if not calibration or not (calibration.get("jsonl") or calibration.get("prefix")):
            raise ConfigError(f"method: {method!r} needs calibration statistics: give --calib-jsonl FILE (or "
                              "DOMAIN=FILE ...) or --calib-prefix PREFIX, or compute partitions with "
                              "`python -m megamoe.construct` and pass them with --partitions DIR")
        from ..construct.calib_data import tokens_from_indexed, tokens_from_jsonl
        from ..construct.pipeline import ConstructionSpec, construct
        seq_len, budget = calibration.get("seq_len", 2048), calibration.get("token_budget", 65536)
        if calibration.get("jsonl"):
            data = tokens_from_jsonl(calibration["jsonl"], tokenizer=hf.path, seq_len=seq_len, token_budget=budget)
        else:
            data = tokens_from_indexed(calibration["prefix"], seq_len=seq_len, token_budget=budget)
        spec = ConstructionSpec(method=method, num_experts=num_experts, seed=seed, layers=layers,
                                gate_init="centroids" if gate_init == "centroids" else "random",
                                clusters=calibration.get("clusters", "kmeans"),
                                expert_size=calibration.get("expert_size"),
                                residual_size=calibration.get("residual_size", 0) or 0,
                                routed_rule=calibration.get("routed_rule", "greedy"))
        res = construct(hf.path, spec, data, progress=tqdm.write if progress else None)
        return res.partitions, res.centroids or {}, method
    raise ConfigError(f"method: {method!r} is not one of random, clustering, {', '.join(CALIBRATED_METHODS)}")


# ---------------------------------------------------------------------------------------------------------------
# hf -> moe

def hf_to_moe(src: str, out: str, *, num_experts: int = 8, top_k: int = 2, method: str = "random",
              partitions_dir: str | None = None, router: str = "topk_noisy", gate_network: str = "mlp",
              score_scale: float | None = None, gate_init: str = "random", moe_layers=None, seed: int = 0,
              tp: int = 1, ep: int = 1, etp: int = 1, dtype: str | None = None,
              tolerance: float = DEFAULT_TOLERANCE, guard_tokens: int = 16, progress: bool = True,
              allow_pickle: bool = False, checksum: bool | str = True, calibration: dict | None = None,
              hasher: BackgroundHasher | None = None) -> dict:
    """Dense HF LLaMA -> LLaMA-MoE shards (construct), or llama-moe v1 / Mixtral -> shards (import).
    `calibration`: see make_partitions (needed by the coactivation, gradient and sharing methods).
    `checksum`: True (xxh3_128, or sha256 without the xxhash package), an algorithm name ("xxh3_128", "sha256"), or
    False. `hasher`: a `checksum.BackgroundHasher` already started on the source's weight files (the CLI starts it
    before importing torch); used when it hashes exactly `hf.files` with the requested algorithm."""
    t0 = time.time()
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
                              par=ParallelConfig(tp=tp, ep=ep, etp=etp), dtype=_torch_dtype(dtype),
                              tolerance=tolerance, guard_tokens=guard_tokens, progress=progress,
                              calibration=calibration)
        return _import(hf, kind, out, t0, hasher, par=ParallelConfig(tp=tp, ep=ep, etp=etp),
                       dtype=_torch_dtype(dtype), tolerance=tolerance, guard_tokens=guard_tokens, progress=progress)
    finally:
        if hasher is not None:
            with contextlib.suppress(BaseException):
                hasher.result()
        hf.close()


def _source_info(hf: HFDir, kind: str, hasher) -> dict:
    """The manifest's `source`: path, format, bytes and `checksum` {"algorithm", "files": {file: hexdigest}}
    (sha256 digests also under the `sha256` key that earlier manifests used; see checksum.manifest_checksums)."""
    d = {"path": os.path.abspath(hf.path), "format": kind, "bytes": hf.nbytes()}
    if hasher is not None:
        d["checksum"] = hasher.info()
        if d["checksum"]["algorithm"] == "sha256":
            d["sha256"] = d["checksum"]["files"]
    return d


def _construct(hf: HFDir, out, t0, hasher, *, num_experts, top_k, method, partitions_dir, router, gate_network,
               score_scale, gate_init, moe_layers, seed, par, dtype, tolerance, guard_tokens, progress,
               calibration=None):
    from ..construct.build import moe_config_for, router_state
    from ..construct.partition import write_partitions
    from .hf_llama import config_from_hf

    where = os.path.join(hf.path, "config.json")
    dense_cfg = config_from_hf(hf.config, where)
    check_vocab(hf, dense_cfg, "model.embed_tokens.weight")
    key_of = check_tensors(hf, dense_cfg, hf_llama_to_ours_name)
    parts, cents, method = make_partitions(hf, dense_cfg, key_of, method, num_experts, seed, moe_layers,
                                           partitions_dir, progress, calibration, gate_init)
    E = next(iter(parts.values())).num_experts
    moe = MoEConfig(num_experts=E, top_k=top_k, router=router, gate_network=gate_network,
                    score_scale=float(score_scale) if score_scale is not None else E / top_k, moe_layers=moe_layers)
    cfg = moe_config_for(dense_cfg, parts, moe)
    par.validate(cfg)
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
    with staged_output(out) as tmp, _no_gc(), _torch_threads(1), threads(usable_cores() - WRITE_THREADS):
        info = {"partition": {"method": method, "seed": seed, "gate_init": gate_init,
                              "duplicated_neurons": sum(dup.values()), "missing_neurons": sum(miss.values())}}
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
                src = {n: read(n) for n in _layer_names(key_of, i)}
                pre = f"layers.{i}.mlp."
                if cfg.moe_index(i) is not None:
                    g, u, d = (src[pre + x] for x in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
                    gen = torch.Generator().manual_seed(seed * 100003 + i)  # build_moe's per-layer convention
                    src.update(router_state(pre, H, E, cfg.moe, gate_init, cents.get(i), g.dtype, gen))
                    # every block's neurons back to back: rows of gate/up, columns of down, gathered once per
                    # layer into buffers that alternate between layers (the previous layer may still be writing)
                    cut = _gather_experts(parts[i], g, u, d, arena, f"{i % 2}")
                for n in _layer_names(w.names, i):
                    t = src.get(n)
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
        write_partitions(os.path.join(tmp, "partitions"), parts)
        copy_tokenizer(hf.path, tmp)

        if guard:
            # read back what was written: identity (all experts, uniform router, scale E) and real routing
            ck = ShardedCheckpoint(tmp)
            try:
                id_logits, real_logits = _shard_logits(ck, ids, progress, both=True)
            finally:
                ck.close()
            if exact:
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
        _update_manifest(tmp, source=_source_info(hf, "hf-llama", hasher),
                         guard=[c.to_dict() for c in report.checks])
        nbytes = w.nbytes
    return _summary("hf-to-moe", out, cfg, par, nbytes, t0, report,
                    {"method": method, "duplicated_neurons": sum(dup.values()), "missing_neurons": sum(miss.values()),
                     "source": hf.path})


@contextlib.contextmanager
def _no_gc():
    """No cyclic garbage collection while streaming: the writes create many short-lived buffer views, which would
    trigger collections that walk every object torch created (several % of the conversion); nothing here makes
    cycles that must be freed before the end."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch intra-op threads for the guard's small matmuls. One: the guard splits each matrix between its own
    threads (forward.threads: one per usable core, less the writer while it runs), and OpenMP workers that
    spin-wait for a busy core cost up to 4x the CPU time on a shared machine (measured: 31 s instead of 8.6 s user
    for the 8-layer bench)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


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


def _dense_mlp_name(n: str) -> str:
    """The dense tensor an MoE tensor is cut from (for its dtype)."""
    parts = n.split(".")
    if len(parts) > 4 and parts[2] == "mlp" and parts[3] in ("experts", "shared"):
        return f"layers.{parts[1]}.mlp.{parts[-2]}.weight"
    return n


def _shard_logits(ck: ShardedCheckpoint, ids, progress, both=False):
    """Logits from the written shards: real routing (and, with both=True, first the all-experts identity). Every
    tensor is used straight from the memory-mapped shard files, part by part (the forward converts blocks of rows
    to fp32 in a small buffer: no full-size fp32 copy); the two variants run as two rows of one batch. Each matrix
    is split by rows between every usable core (forward.threads)."""
    cfg = ck.config
    n = ids.shape[0]
    f = Forward(cfg, ids.repeat(2, 1), row_modes=["identity"] * n + ["routed"] * n) if both else Forward(cfg, ids)

    def get(name):
        pieces, dim = ck.map_parts(name)
        return pieces[0] if len(pieces) == 1 else SplitWeight(pieces, dim)

    with _torch_threads(1), threads(usable_cores()):  # nothing else runs now: every core, our row split
        f.embed(get)
        for i in tqdm(range(cfg.num_layers), desc="verify", disable=not progress, unit="layer"):
            f.layer(i, get)
        logits = f.head(get)
    return [logits[:n], logits[n:]] if both else logits


def _import(hf: HFDir, kind, out, t0, hasher, *, par, dtype, tolerance, guard_tokens, progress):
    """llama-moe v1 or Mixtral HF checkpoint -> our shards (renaming only; the score scale stays a config field)."""
    where = os.path.join(hf.path, "config.json")
    fmt = v1 if kind == "llama-moe-v1" else mx
    cfg = fmt.config_from_hf(hf.config, where)
    par.validate(cfg)
    optional = [n for n in expected_names(cfg) if n.endswith("router.noise.weight")]
    check_vocab(hf, cfg, "model.embed_tokens.weight")
    key_of = check_tensors(hf, cfg, fmt.hf_to_ours_name, optional=optional)
    emb_dt = hf.dtype(key_of["embed.weight"])
    dtypes = {n: dtype or (hf.dtype(key_of[n]) if n in key_of else emb_dt) for n in expected_names(cfg)}
    ids = guard_ids(cfg.vocab_size, guard_tokens)
    report = GuardReport()
    with staged_output(out) as tmp:
        w = ShardWriter(tmp, cfg, par, dtypes, {"partition": {"method": f"imported from {kind}"}})
        write_tensors(w, ((n, (hf.get(key_of[n]) if n in key_of else torch.zeros(expected_shape(cfg, n)))
                           .to(DTYPES[dtypes[n]])) for n in w.names), w.nbytes, f"{kind}-to-moe", progress)
        copy_tokenizer(hf.path, tmp)
        ck = ShardedCheckpoint(tmp)
        try:
            ours = _shard_logits(ck, ids, progress)
        finally:
            ck.close()
        if kind == "llama-moe-v1":
            from .llama_moe_v1_reference import v1_logits
            ref = v1_logits(hf.config, hf.get, ids)
            report.add(check("llama-moe v1 source (independent v1 reference forward) vs written shards", ref, ours,
                             tolerance))
        else:
            ref = _mixtral_logits(hf.path, hf.config, hf.get, ids, hf.nbytes())
            report.add(check(f"Mixtral source ({ref[1]}) vs written shards", ref[0], ours, tolerance))
        report.raise_if_failed(f"hf-to-moe {hf.path} -> {out}")
        _update_manifest(tmp, source=_source_info(hf, kind, hasher), guard=[c.to_dict() for c in report.checks])
        nbytes = w.nbytes
    return _summary("hf-to-moe", out, cfg, par, nbytes, t0, report, {"method": f"import {kind}", "source": hf.path})


def _mixtral_logits(path, config, get, ids, nbytes):
    """Logits of an HF Mixtral directory: transformers' MixtralForCausalLM when it fits comfortably in memory,
    else our streaming forward over the Mixtral keys (config re-read from the file)."""
    if nbytes <= TRANSFORMERS_CHECK_MAX_BYTES:
        try:
            from transformers import MixtralForCausalLM
        except ImportError:
            MixtralForCausalLM = None
        if MixtralForCausalLM is not None:
            m = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            with torch.no_grad():
                logits = m(ids).logits.float()
            del m
            return logits, "transformers MixtralForCausalLM"
    cfg = mx.config_from_hf(config, os.path.join(path, "config.json"))
    back = {}
    for hf_name, ours, _ in mx.export_plan(cfg):
        back[ours] = hf_name
    return reference_logits(cfg, lambda n: get(back[n]), ids), "streaming forward over the Mixtral keys"


# ---------------------------------------------------------------------------------------------------------------
# moe -> hf

def moe_to_hf(src: str, out: str, fmt: str = "auto", *, max_shard_bytes: int = 5 << 30,
              tolerance: float = DEFAULT_TOLERANCE, guard_tokens: int = 16, progress: bool = True) -> dict:
    """Our shards -> an HF directory: `mixtral` (transformers, no remote code; the model must fit, see
    mixtral.why_not_mixtral), `llama-moe-v1` (always, for every model its remote code can express), or `auto`."""
    t0 = time.time()
    check_output(os.path.abspath(out))
    ck = ShardedCheckpoint(src)
    try:
        cfg = ck.config
        if fmt == "auto":
            fmt = "mixtral" if mx.why_not_mixtral(cfg) is None else "llama-moe-v1"
        if fmt == "mixtral":
            reason = mx.why_not_mixtral(cfg)
            if reason:
                raise ConfigError(f"{src}: does not fit the Mixtral layout: {reason}. Export --format llama-moe-v1")
            plan = mx.export_plan(cfg)
        elif fmt == "llama-moe-v1":
            reason = v1.why_not_v1(cfg)
            if reason:
                raise ConfigError(f"{src}: does not fit the llama-moe v1 layout: {reason}")
            plan = [(h, o, None) for h, o in v1.export_plan(cfg)]
        else:
            raise ConfigError(f"format: {fmt!r} is not one of mixtral, llama-moe-v1, auto")
        ref_dt = ck.dtype("embed.weight")
        hplan = [(h, ck.dtype(o) if o else ref_dt, ck.shape(o) if o else expected_shape(cfg, o_noise(h)))
                 for h, o, _ in plan]
        ids = guard_ids(cfg.vocab_size, guard_tokens)
        report = GuardReport()
        with staged_output(out) as tmp:
            w = HFWriter(tmp, hplan, max_shard_bytes)
            write_tensors(w, ((h, mx.apply_scale(ck.get(o) if o else torch.zeros(shape, dtype=DTYPES[dt]), scale))
                              for (h, o, scale), (_, dt, shape) in zip(plan, hplan)),
                          w.total, f"moe-to-{fmt}", progress)
            config = (mx.config_to_hf if fmt == "mixtral" else v1.config_to_hf)(cfg, _dtype_word(ref_dt))
            write_json(os.path.join(tmp, "config.json"), config)
            copy_tokenizer(src, tmp)
            if fmt == "llama-moe-v1":
                _write_v1_readme(tmp)
            ours = _shard_logits(ck, ids, progress)
            res = HFDir(tmp)
            try:
                if fmt == "mixtral":
                    theirs, how = _mixtral_logits(tmp, config, res.get, ids, w.total)
                    report.add(check(f"our forward over the shards vs the export in {how}", ours, theirs, tolerance))
                else:
                    from .llama_moe_v1_reference import v1_logits
                    theirs = v1_logits(read_json(os.path.join(tmp, "config.json")), res.get, ids)
                    report.add(check("our forward over the shards vs the export in the independent llama-moe v1 "
                                     "reference forward", ours, theirs, tolerance))
            finally:
                res.close()
            report.raise_if_failed(f"moe-to-hf {src} -> {out}")
            nbytes = w.total
        return _summary("moe-to-hf", out, cfg, None, nbytes, t0, report, {"format": fmt, "files": w.files})
    finally:
        ck.close()


def o_noise(hf_name: str) -> str:
    """Our noise-weight name for a llama-moe v1 weight_noise key (written as zeros for a router without one)."""
    i = hf_name.split(".")[2]
    return f"layers.{i}.mlp.router.noise.weight"


def _dtype_word(dt: str) -> str:
    return {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(dt, "float32")


def _write_v1_readme(d: str):
    with open(os.path.join(d, "README.md"), "w") as f:
        f.write(V1_README)


V1_README = """# llama-moe v1 checkpoint (exported by megamoe)

This directory uses the layout of the released LLaMA-MoE v1 models (`model_type: llama_moe`, per-expert
`mlp.calculator.experts.weight_{gate,up,down}.{j}` tensors, MLP gate `mlp.gate.gate_network.{0,2}.weight`).
It loads with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` once you copy the two remote-code
files named in `config.json`'s `auto_map` (`configuration_llama_moe.py`, `modeling_llama_moe_hf.py`) from a released
LLaMA-MoE v1 Hub repository (the base models' revision, repo commit d7d0989, runs forward and generate correctly).
megamoe does not redistribute that code.

transformers versions: use transformers <= 4.44, or >= 4.45 *without* `low_cpu_mem_usage=True` / `device_map`:
since 4.45 meta-device loading renames every key containing `weight_g` (so `weight_gate.j`) and leaves those
experts uninitialised without an error (llama-moe issue #74).
"""


# ---------------------------------------------------------------------------------------------------------------
# reshard and inspect

def reshard_checked(src: str, out: str, tp: int = 1, ep: int = 1, etp: int = 1, progress: bool = True) -> dict:
    """Re-partition shards into another TP/EP/ETP layout; verifies that every tensor is bit-identical."""
    from .shards import reshard
    t0 = time.time()
    check_output(os.path.abspath(out))
    ck = ShardedCheckpoint(src)
    cfg = ck.config
    par = ParallelConfig(tp=tp, ep=ep, etp=etp).validate(cfg)
    report = GuardReport()
    with staged_output(out) as tmp:
        res = reshard(src, tmp, par, progress=progress)
        new = ShardedCheckpoint(tmp)
        try:
            bad = [n for n in tqdm(ck.names, desc="verify", disable=not progress, unit="tensor")
                   if not torch.equal(ck.get(n), new.get(n)) or ck.dtype(n) != new.dtype(n)]
        finally:
            new.close()
            ck.close()
        diff = 0.0 if not bad else float("inf")
        report.add(check(f"every tensor bit-identical ({len(ck.names)} tensors{'; differ: ' + ', '.join(bad[:3]) if bad else ''})",
                         torch.zeros(1), torch.full((1,), diff), 0.0))
        report.raise_if_failed(f"reshard {src} -> {out}")
        for f in TOKENIZER_FILES + ("partitions",):
            p = os.path.join(src, f)
            if os.path.isfile(p):
                shutil.copyfile(p, os.path.join(tmp, f))
            elif os.path.isdir(p):
                shutil.copytree(p, os.path.join(tmp, f))
    return _summary("reshard", out, cfg, par, res["bytes"], t0, report)


def inspect(path: str) -> dict:
    """What a directory holds: our shards (manifest) or an HF checkpoint (config + tensors)."""
    if is_shard_dir(path):
        ck = ShardedCheckpoint(path)
        try:
            m = ck.manifest
            cfg = ck.config
            d = {"kind": "megamoe shards", "path": path, "format_version": m["version"], "parallel": m["parallel"],
                 "files": {f: os.path.getsize(os.path.join(path, f)) for f in m["files"]},
                 "tensors": len(ck.names), "dtypes": sorted({ck.dtype(n) for n in ck.names}),
                 "bytes": ck.nbytes(), "partition": m.get("partition"), "source": m.get("source"),
                 "guard": m.get("guard"), "params": cfg.param_counts(), "model": _cfg_line(cfg)}
        finally:
            ck.close()
        return d
    hf = HFDir(path)
    try:
        kind = source_kind(hf)
        if kind == "llama":
            from .hf_llama import config_from_hf
            cfg = config_from_hf(hf.config, os.path.join(path, "config.json"))
        else:
            cfg = (v1 if kind == "llama-moe-v1" else mx).config_from_hf(hf.config, os.path.join(path, "config.json"))
        return {"kind": f"Hugging Face {kind}", "path": path, "files": [os.path.basename(f) for f in hf.files],
                "tensors": len(hf.keys()), "dtypes": sorted({hf.dtype(k) for k in hf.keys()}), "bytes": hf.nbytes(),
                "params": cfg.param_counts(), "model": _cfg_line(cfg)}
    finally:
        hf.close()


def _cfg_line(cfg: ModelConfig) -> str:
    s = (f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, FFN {cfg.intermediate_size}, {cfg.num_heads} heads / "
         f"{cfg.kv_heads} kv, vocab {cfg.vocab_size}{', tied embeddings' if cfg.tie_word_embeddings else ''}")
    if cfg.moe is not None:
        m = cfg.moe
        sizes = sorted({x for i in range(cfg.num_layers) if cfg.moe_index(i) is not None for x in cfg.expert_sizes(i)})
        s += (f"; MoE: {m.num_experts} experts (sizes {sizes}), top-{m.top_k}, router {m.router}, gate "
              f"{m.gate_network}, score scale {m.score_scale}, residual {m.residual_size}")
    return s
