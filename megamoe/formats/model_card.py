"""The model card (README.md) written with every Hugging Face export: YAML front matter the Hub reads, and a body that
says what the model is, how it was made and how to load it.

    facts = card_facts(src)                       # what our shard directory knows about itself (module doc below)
    text = model_card(cfg, fmt="mixtral", facts=facts, evaluation=load_eval_results(path), loader_notes=NOTES)
    write_model_card(out_dir, cfg, fmt=..., ...)  # README.md, atomically

Front matter (parsed by huggingface_hub.ModelCard / metadata_load):

    ---
    license: apache-2.0                 # --license, else the base model's card, else "other"
    base_model: HuggingFaceTB/SmolLM2-135M-Instruct    # only a Hub id (a local path is named in the body instead)
    base_model_relation: finetune       # with a base model: the experts are its FFN, continually trained or not
    library_name: transformers
    pipeline_tag: text-generation
    tags: [megamoe, moe, mixture-of-experts, llama-moe, <format>]
    model-index:                        # when evaluation results are given: perplexity per domain
    - name: <name>
      results: [{task: {type: text-generation}, dataset: {name, type}, metrics: [{type: perplexity, value}]}]
    ---

Body: the construction (method, seed, router init, duplicated/missing neurons, calibration), the architecture
(experts per layer, top-k, MoE layers, router, score scale, residual expert, attention experts), activated / total
parameters (ModelConfig.param_counts), the training (tokens, steps, data) when the shards come from megamoe-train,
per-domain evaluation results (the trainer's summary.json "eval", or a `megamoe-eval --json` output), and how to load
the directory (`loader_notes`: the layout's own README text, e.g. the llama-moe v1 remote-code notes).

Where the facts come from (`card_facts(src)`): the shard manifest's "partition" and "calibration" (written by
hf-to-moe), "source" (the dense checkpoint it was converted from), "training" (megamoe-train's final_model: tokens,
steps, and the initial checkpoint, whose own manifest then gives the construction and the base model), and
summary.json beside a trainer's final_model.
"""

from __future__ import annotations

import json
import math
import os
import re

import yaml

from megamoe.config import ModelConfig
from megamoe.fileio import atomic_write_text

__all__ = ["model_card", "write_model_card", "card_facts", "load_eval_results", "hub_id_of", "EMBEDDED_HUB_ID"]

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"   # megamoe.formats.embedded de-quantizes its Q4_1 GGUF
EMBEDDED_LICENSE = "apache-2.0"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            d = json.load(f)
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def _front_matter(readme: str) -> dict:
    """The YAML front matter of a model card file ({} when absent or unreadable)."""
    try:
        with open(readme, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return {}
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return {}
    try:
        d = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return d if isinstance(d, dict) else {}


def hub_id_of(path: str | None) -> str | None:
    """The Hub repository id of a local model directory, when it can be known: the embedded SmolLM2, a Hub cache
    snapshot (.../models--org--name/snapshots/<rev>), or a name written as org/name. None otherwise."""
    if not path:
        return None
    if _HUB_ID.match(path) and not os.path.exists(path):
        return path
    p = os.path.abspath(path)
    if os.path.basename(p).startswith("smollm2-135m-instruct"):
        return EMBEDDED_HUB_ID
    m = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", p + "/")
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    return None


def card_facts(src: str) -> dict:
    """What a shard directory `src` knows about its making (see the module docstring): {"base_path", "base_model",
    "license", "construction", "calibration", "training", "summary"} (absent keys: unknown)."""
    facts: dict = {}
    man = _read_json(os.path.join(src, "manifest.json")) or {}
    chain, seen = [man], {os.path.abspath(src)}
    training = man.get("training") if isinstance(man.get("training"), dict) else None
    if training:
        facts["training"] = training
        init = training.get("init")
        if init and os.path.abspath(init) not in seen and os.path.isfile(os.path.join(init, "manifest.json")):
            seen.add(os.path.abspath(init))
            chain.append(_read_json(os.path.join(init, "manifest.json")) or {})
        elif init and os.path.isfile(os.path.join(init, "config.json")):
            facts["base_path"] = init           # trained straight from a dense HF directory (init.source: hf)
        summary = _read_json(os.path.join(os.path.dirname(os.path.abspath(src)), "summary.json"))
        if summary and os.path.abspath(str(summary.get("final_model") or "")) == os.path.abspath(src):
            facts["summary"] = summary
    for m in chain:
        if "construction" not in facts and isinstance(m.get("partition"), dict):
            facts["construction"] = m["partition"]
        if "calibration" not in facts and isinstance(m.get("calibration"), dict):
            facts["calibration"] = m["calibration"]
        srcinfo = m.get("source")
        if "base_path" not in facts and isinstance(srcinfo, dict) and srcinfo.get("path"):
            facts["base_path"] = srcinfo["path"]
            facts["base_format"] = srcinfo.get("format")
    base = facts.get("base_path")
    if base:
        facts["base_model"] = hub_id_of(base) or _front_matter(os.path.join(base, "README.md")).get("base_model")
        lic = _front_matter(os.path.join(base, "README.md")).get("license")
        facts["license"] = lic or (EMBEDDED_LICENSE if facts["base_model"] == EMBEDDED_HUB_ID else None)
    return facts


def load_eval_results(path: str) -> dict:
    """Per-domain results {domain: {"loss", "ppl", "tokens"?}} from a trainer summary.json ("eval") or a
    `megamoe-eval --json` output ("loss", "domains" = ppl, "tokens_per_domain"). ValueError for anything else."""
    d = _read_json(path)
    if d is None:
        raise ValueError(f"{path}: not a JSON object")
    return _eval_rows(d, path)


def _eval_rows(d: dict, where: str = "evaluation") -> dict:
    if isinstance(d.get("eval"), dict):                         # summary.json
        return {k: dict(v) for k, v in d["eval"].items() if isinstance(v, dict) and "loss" in v}
    if isinstance(d.get("loss"), dict):                         # megamoe-eval --json
        toks = d.get("tokens_per_domain") or {}
        return {k: {"loss": v, "ppl": (d.get("domains") or {}).get(k, math.exp(min(v, 50.0))),
                    **({"tokens": toks[k]} if k in toks else {})} for k, v in d["loss"].items()}
    if d and all(isinstance(v, dict) and "loss" in v for v in d.values()):
        return {k: dict(v) for k, v in d.items()}
    raise ValueError(f"{where}: expected a megamoe-train summary.json (with 'eval') or a megamoe-eval --json "
                     "output (with 'loss' per domain)")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _moe_rows(cfg: ModelConfig) -> list[tuple[str, str]]:
    rows = [("layers", f"{cfg.num_layers} (hidden {cfg.hidden_size}, {cfg.num_heads} heads / {cfg.kv_heads} KV heads, "
                       f"vocabulary {cfg.vocab_size})")]
    m = cfg.moe
    if m is not None:
        moe_layers = [i for i in range(cfg.num_layers) if cfg.moe_index(i) is not None]
        sizes = sorted({s for i in moe_layers for s in cfg.expert_sizes(i)})
        rows += [("experts per MoE layer", str(m.num_experts)), ("top-k", str(m.top_k)),
                 ("MoE layers", "all" if len(moe_layers) == cfg.num_layers else
                  f"{len(moe_layers)} of {cfg.num_layers}: {moe_layers}"),
                 ("expert sizes (FFN neurons)", ", ".join(map(str, sizes))),
                 ("router", f"{m.router} ({m.gate_network} gate)"),
                 ("score scale", str(m.score_scale))]
        if m.residual_size:
            rows.append(("residual (always-on) expert", f"{m.residual_size} neurons"))
    a = getattr(cfg, "attn_moe", None)
    if a is not None:
        rows.append(("attention experts", f"{a.num_experts} per layer, top-{a.top_k}, mode {a.mode}"))
    pc = cfg.param_counts()
    rows += [("activated parameters", f"{_count(pc['active'])} ({pc['active']:,})"),
             ("total parameters", f"{_count(pc['total'])} ({pc['total']:,})")]
    return rows


def _construction_lines(c: dict | None, cal: dict | None) -> list[str]:
    if not c:
        return ["Not recorded in the checkpoint (imported from a released MoE, or converted by an older megamoe)."]
    out = [f"- method: **{c.get('method', '?')}** (seed {c.get('seed', '?')}); router initialisation: "
           f"{c.get('gate_init', '?')}"]
    if c.get("duplicated_neurons") or c.get("missing_neurons"):
        out.append(f"- {c.get('duplicated_neurons', 0)} FFN neurons duplicated, {c.get('missing_neurons', 0)} left out "
                   "(the MoE is not an exact re-partition of the dense FFN)")
    else:
        out.append("- every FFN neuron of the dense model is in exactly one expert: with all experts active at weight "
                   "1 the MoE computes the dense model (checked at conversion)")
    if cal:
        out.append("- calibration: " + ", ".join(f"{k} {v}" for k, v in cal.items() if not isinstance(v, (dict, list))))
    return out


def model_card(cfg: ModelConfig, *, fmt: str, facts: dict | None = None, evaluation: dict | None = None,
               loader_notes: str | None = None, name: str | None = None, base_model: str | None = None,
               license: str | None = None, tags=()) -> str:
    """The README.md text (see the module docstring). `evaluation`: {domain: {"loss", "ppl", "tokens"?}} (default:
    the trainer summary's "eval" in `facts`)."""
    facts = dict(facts or {})
    name = name or "megamoe-export"
    base = base_model or facts.get("base_model")
    if evaluation is None and facts.get("summary"):
        try:
            evaluation = _eval_rows(facts["summary"])
        except ValueError:
            evaluation = None
    meta: dict = {"license": license or facts.get("license") or "other"}
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = "finetune"
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = list(dict.fromkeys(["megamoe", "moe", "mixture-of-experts", "llama-moe", fmt, *tags]))
    if evaluation:
        meta["model-index"] = [{"name": name, "results": [
            {"task": {"type": "text-generation", "name": "Text Generation"},
             "dataset": {"name": f"{d} (held-out)", "type": d},
             "metrics": [{"type": "perplexity", "value": round(float(r["ppl"]), 4), "name": "perplexity"},
                         {"type": "loss", "value": round(float(r["loss"]), 5), "name": "loss"}]}
            for d, r in evaluation.items()]}]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {name}", ""]
    where = base or facts.get("base_path")
    lines.append(f"A mixture-of-experts LLaMA (LLaMA-MoE) built by megamoe "
                 f"from the dense model {f'`{where}`' if where else '(not recorded)'}: each FFN split into experts "
                 f"behind a router, exported in the **{fmt}** layout.")
    lines += ["", "## Architecture", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _moe_rows(cfg)]
    lines += ["", "## Construction", ""] + _construction_lines(facts.get("construction"), facts.get("calibration"))
    tr = facts.get("training")
    lines += ["", "## Training", ""]
    if tr:
        lines.append(f"Continual pre-training with megamoe-train: {int(tr.get('tokens', 0)):,} tokens in "
                     f"{tr.get('steps', '?')} steps" + (f", data `{tr['data']}`" if isinstance(tr.get("data"), str)
                                                        else "") + ".")
    else:
        lines.append("None after the conversion (the experts are the dense model's FFN as constructed).")
    lines += ["", "## Evaluation", ""]
    if evaluation:
        lines += ["| domain | loss | perplexity | tokens |", "|---|---:|---:|---:|"]
        lines += [f"| {d} | {float(r['loss']):.4f} | {float(r['ppl']):.3f} | {r.get('tokens', '')} |"
                  for d, r in evaluation.items()]
        lines += ["", "Token-weighted next-token loss on held-out text per domain (megamoe-eval / the trainer's "
                      "evaluation); the balance loss is excluded."]
    else:
        lines.append("No results were given to the export (`--eval-results FILE`: a megamoe-eval --json output or a "
                     "training run's summary.json).")
    lines += ["", "## How to load", ""]
    if loader_notes:
        lines.append(loader_notes.strip())
    else:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "tok = AutoTokenizer.from_pretrained(PATH)",
                  "model = AutoModelForCausalLM.from_pretrained(PATH)",
                  "```"]
    lines += ["", "megamoe loads it too (any layout): `megamoe.eval.load_model(PATH)`, `megamoe-generate --model PATH "
                  "--prompt ...`, and `megamoe-convert hf-to-moe --src PATH` brings it back for training.", ""]
    return "\n".join(lines)


def write_model_card(out_dir: str, cfg: ModelConfig, **kwargs) -> str:
    """Write README.md into `out_dir` (atomically); returns its path. kwargs: those of `model_card`."""
    path = os.path.join(out_dir, "README.md")
    atomic_write_text(path, model_card(cfg, **kwargs))
    return path
