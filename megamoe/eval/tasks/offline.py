"""Offline lm-eval tasks built from text every Python installation has: for tests, the quickstart and smoke runs
where the benchmark datasets cannot be downloaded.

    build_offline_tasks("out/tasks")       # -> {"dir": ..., "tasks": {...}, "group": "megamoe_offline"}
    HF_DATASETS_OFFLINE=1 lm_eval --model megamoe --model_args path=ckpt/moe --include_path out/tasks \\
        --tasks megamoe_offline

| task | lm_eval output_type | items | what it asks |
|---|---|---|---|
| `megamoe_docstring_mc` | multiple_choice (acc, acc_norm) | 24 | which function of a stdlib module a docstring's first sentence describes (4 names of that module) |
| `megamoe_lastword` | loglikelihood (acc, perplexity) | 20 | LAMBADA-style: the last word of a sentence of Python's LICENSE.txt |
| `megamoe_nextline` | generate_until (exact_match) | 16 | the next line of stdlib code after four lines (greedy, up to the newline) |
| `megamoe_rolling` | loglikelihood_rolling (word/byte perplexity, bits per byte) | 8 | whole paragraphs of the language reference topics (`pydoc_data`) |

Each task is an lm_eval YAML with `dataset_path: json` and an absolute `data_files` path to its JSONL under
`<dir>/data/` (lm_eval's local-dataset route: no download, works with HF_DATASETS_OFFLINE=1). `megamoe_offline` groups
the four. `fewshot_split: test` makes lm_eval leave the evaluated document out of its own shots (with --num_fewshot;
without it lm_eval 0.4.13 may show a document its own answer). Deterministic: sources are read in a fixed order and sampled with `random.Random(seed)`; the same Python
installation and seed give byte-identical files (`offline_tasks.json` records the Python version and each file's
sha256). Python's own text is part of the local training corpus (megamoe.data.corpus), so on a model trained on it
these tasks measure memorisation as much as skill: they are plumbing checks, not benchmarks.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import re
import sys
import sysconfig

import yaml

from megamoe.errors import OutputError
from megamoe.fileio import atomic_write_text

__all__ = ["build_offline_tasks", "GROUP", "TASKS"]

GROUP = "megamoe_offline"
TASKS = ("megamoe_docstring_mc", "megamoe_lastword", "megamoe_nextline", "megamoe_rolling")

# pure-Python stdlib modules with many documented public functions (stable across 3.10-3.13)
_DOC_MODULES = ("textwrap", "shlex", "fnmatch", "glob", "base64", "difflib", "calendar", "heapq", "bisect",
                "statistics", "copy", "posixpath", "gettext", "colorsys", "shutil", "tempfile", "string", "random",
                "json/__init__", "html/__init__", "urllib/parse", "os", "inspect", "tokenize", "locale")
_CODE_MODULES = ("textwrap", "shlex", "fnmatch", "glob", "difflib", "calendar", "heapq", "bisect", "statistics",
                 "colorsys", "string", "base64")


def _stdlib(rel: str) -> str:
    return os.path.join(sysconfig.get_paths()["stdlib"], rel + ("" if rel.endswith(".txt") else ".py"))


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def _first_sentence(doc: str) -> str:
    para = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    para = " ".join(para.split())
    m = re.match(r"(.+?[.!?])(\s|$)", para)
    return (m.group(1) if m else para)[:240]


def _docstring_items(rng: random.Random, n: int) -> list[dict]:
    pool = []
    for mod in _DOC_MODULES:
        src = _read(_stdlib(mod))
        if not src:
            continue
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        funcs = []
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= 4 and node.name not in doc.split("\n")[0]:
                    funcs.append((node.name, _first_sentence(doc)))
        names = sorted({f for f, _ in funcs})
        if len(names) < 4:
            continue
        name_of_mod = mod.replace("/__init__", "").replace("/", ".")
        for f, doc in rng.sample(funcs, min(2, len(funcs))):  # at most two per module: many modules, not one
            others = rng.sample([x for x in names if x != f], 3)
            choices = others + [f]
            rng.shuffle(choices)
            pool.append({"module": name_of_mod, "docstring": doc, "choices": choices, "answer": choices.index(f)})
    rng.shuffle(pool)
    return pool[:n]


def _lastword_items(rng: random.Random, n: int) -> list[dict]:
    text = _read(_stdlib("LICENSE.txt")) or ""
    sents = re.split(r"(?<=[.;:])\s+", " ".join(text.split()))
    items = []
    for s in sents:
        words = s.rstrip(".;:").split()
        if 12 <= len(words) <= 45 and re.fullmatch(r"[A-Za-z]{3,}", words[-1]):
            items.append({"context": " ".join(words[:-1]), "last": words[-1]})
    uniq = list({it["context"]: it for it in items}.values())
    rng.shuffle(uniq)
    return uniq[:n]


def _nextline_items(rng: random.Random, n: int) -> list[dict]:
    pool = []
    for mod in _CODE_MODULES:
        src = _read(_stdlib(mod)) or ""
        lines = [ln.rstrip() for ln in src.splitlines()]
        for i in range(4, len(lines)):
            window, target = lines[i - 4:i], lines[i]
            if all(w.strip() for w in window) and 8 <= len(target.strip()) <= 60 and not target.strip().startswith(
                    ("#", '"', "'")) and '"""' not in "".join(window + [target]):
                pool.append({"prompt": "\n".join(window) + "\n", "target": target})
    rng.shuffle(pool)
    return pool[:n]


def _rolling_items(rng: random.Random, n: int) -> list[dict]:
    from pydoc_data.topics import topics  # the stdlib's help() texts
    paras = []
    for name in sorted(topics):
        for p in re.split(r"\n\s*\n", topics[name]):
            words = p.split()
            if 60 <= len(words) <= 200 and not p.startswith(" "):
                paras.append({"text": " ".join(words)})
    rng.shuffle(paras)
    return paras[:n]


def _yaml(task: str, data: str, body: dict) -> str:
    cfg = {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data}},
           "test_split": "test", **body, "metadata": {"version": 1.0}}
    return "# built by megamoe.eval.tasks.offline (do not edit: rebuild)\n" + yaml.safe_dump(cfg, sort_keys=False,
                                                                                          width=1000)


_BODIES = {
    "megamoe_docstring_mc": {
        "fewshot_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "Module: {{module}}\nDocstring: {{docstring}}\nFunction:",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]},
    "megamoe_lastword": {
        "fewshot_split": "test", "output_type": "loglikelihood", "doc_to_text": "{{context}}",
        "doc_to_target": "{{' ' + last}}", "target_delimiter": "",
        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                        {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
    "megamoe_nextline": {
        "fewshot_split": "test", "output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{target}}",
        "target_delimiter": "",
        "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": 24},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": False, "ignore_punctuation": False}]},
    "megamoe_rolling": {
        "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "should_decontaminate": False,
        "metric_list": [{"metric": m, "aggregation": a, "higher_is_better": False}
                        for m, a in (("word_perplexity", "weighted_perplexity"),
                                     ("byte_perplexity", "weighted_perplexity"), ("bits_per_byte", "bits_per_byte"))]},
}


def build_offline_tasks(out_dir: str, seed: int = 1234, sizes: dict | None = None) -> dict:
    """Write the offline task set into `out_dir` (created; files written under temporary names, then renamed).
    sizes: {task: items} to override the defaults of the module docstring. Returns the summary that is also written
    to `<out_dir>/offline_tasks.json`."""
    n = {"megamoe_docstring_mc": 24, "megamoe_lastword": 20, "megamoe_nextline": 16, "megamoe_rolling": 8}
    n.update(sizes or {})
    out_dir = os.path.abspath(out_dir)
    data_dir = os.path.join(out_dir, "data")
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot create the task directory ({e.strerror})") from None
    makers = {"megamoe_docstring_mc": _docstring_items, "megamoe_lastword": _lastword_items,
              "megamoe_nextline": _nextline_items, "megamoe_rolling": _rolling_items}
    summary = {"dir": out_dir, "group": GROUP, "seed": seed, "python": sys.version.split()[0], "tasks": {}}
    for task in TASKS:
        items = makers[task](random.Random(f"{seed}:{task}"), n[task])
        body = "".join(json.dumps(it, ensure_ascii=False, sort_keys=True) + "\n" for it in items)
        data = os.path.join(data_dir, f"{task}.jsonl")
        atomic_write_text(data, body)
        atomic_write_text(os.path.join(out_dir, f"{task}.yaml"), _yaml(task, data, _BODIES[task]))
        summary["tasks"][task] = {"items": len(items), "data": data,
                                  "sha256": hashlib.sha256(body.encode("utf-8")).hexdigest()}
    group = {"group": GROUP, "task": list(TASKS), "metadata": {"version": 1.0}}
    atomic_write_text(os.path.join(out_dir, f"{GROUP}.yaml"), yaml.safe_dump(group, sort_keys=False))
    atomic_write_text(os.path.join(out_dir, "offline_tasks.json"), json.dumps(summary, indent=1) + "\n")
    return summary
