"""The evaluation commands (console scripts of setup.py; `python -m megamoe.eval.cli <command> ...` works too).

    megamoe-eval --model PATH --data MANIFEST_OR_JSONL [--json] [--batch-size 4] [--seq-len 256] [--max-batches N]
    megamoe-generate --model PATH (--prompt TEXT ... | --prompts FILE) [--max-new-tokens 64] [--greedy |
                     --temperature T --top-k K --top-p P --seed S] [--chat | --no-chat] [--stop STR ...]
    megamoe-lm-eval --model megamoe --model_args path=PATH ... (lm_eval's own options; megamoe's suites included)
    megamoe-eval-tasks build OUT_DIR | suites

Under torchrun every command builds the model for `--tp/--ep/--etp` (world = multiple of tp and ep*etp) and each
rank loads its slice; only rank 0 prints. Bad input (a file, a layout, a flag, a dataset of another tokenizer) ends
with one line on stderr and exit status 2 (megamoe.errors), never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from megamoe import parallel
from megamoe.config import DTYPES, ParallelConfig
from megamoe.console import LOG_LEVELS, add_log_level, setup_logging
from megamoe.errors import InputError, MegamoeError, exit_code
from megamoe.eval.load import load_model
from megamoe.eval.perplexity import PPL_CAP, domain_perplexity, jsonl_batches, manifest_batches
from megamoe.eval.sampling import Sampler
from megamoe.eval.tasks import SUITES, SUITES_DIR
from megamoe.eval.textgen import TextGenerator, is_instruct

__all__ = ["eval_main", "generate_main", "lm_eval_main", "tasks_main"]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def _add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, help="our shard directory (any TP/EP layout) or an HF directory "
                                                  "(dense LLaMA, Mixtral, llama-moe v1 / v2)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory's)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="parameter dtype (default float32)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size under torchrun")
    p.add_argument("--ep", type=int, default=1, help="expert parallel size under torchrun")
    p.add_argument("--etp", type=int, default=1, help="expert tensor parallel size under torchrun")
    add_log_level(p)


def _setup(a):
    parallel.initialize(ParallelConfig(tp=a.tp, ep=a.ep, etp=a.etp))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return load_model(a.model, dtype=a.dtype, device=device, tokenizer=a.tokenizer)


def _run(prog: str, fn, argv) -> int:
    setup_logging()
    try:
        return fn(argv)
    except (MegamoeError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt as e:
        print(f"{prog}: interrupted", file=sys.stderr)
        return exit_code(e)


# ---- megamoe-eval ---------------------------------------------------------------------------------------------

def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megamoe-eval", description="Per-domain perplexity (token-weighted next-token "
                                "cross entropy, balance loss excluded) of a model on megatron datasets or JSONL.")
    _add_model_args(p)
    p.add_argument("--data", required=True, nargs="+", help="a preprocessing manifest.json (per-domain megatron "
                   "datasets: their validation split) and/or .jsonl files (tokenized with the model's tokenizer)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sample (inputs); samples hold seq_len+1")
    p.add_argument("--max-batches", type=int, default=None, help="per domain (default: all)")
    p.add_argument("--domains", help="comma-separated domains of a manifest (default: all)")
    p.add_argument("--text-key", default="text", help="JSONL: the text field")
    p.add_argument("--domain-key", default="domain", help="JSONL: the field naming a line's domain (default: "
                   "'domain'; absent: the file's name)")
    p.add_argument("--cache-dir", help="megatron's sample-index cache for manifests (default: beside the data)")
    return p


def _eval(argv) -> int:
    a = _eval_parser().parse_args(argv)
    setup_logging(a.log_level)
    for k in ("batch_size", "seq_len"):
        if getattr(a, k) < 1:
            raise InputError(f"--{k.replace('_', '-')}: {getattr(a, k)} must be >= 1")
    if a.max_batches is not None and a.max_batches < 1:
        raise InputError(f"--max-batches: {a.max_batches} must be >= 1")
    for d in a.data:
        if not os.path.exists(d):
            raise InputError(f"--data: {d}: no such file")
    lm = _setup(a)
    batches, where = {}, {}
    for d in a.data:
        if d.endswith(".jsonl"):
            b, w = jsonl_batches(d, lm.tokenizer, a.seq_len, a.batch_size, a.max_batches, a.text_key, a.domain_key)
        else:
            b, w = manifest_batches(d, a.seq_len, a.batch_size, a.max_batches,
                                    a.domains.split(",") if a.domains else None, a.cache_dir)
        clash = sorted(set(b) & set(batches))
        if clash:
            raise InputError(f"--data: domain(s) {clash} appear in more than one input; name JSONL domains apart "
                             "(--domain-key) or pass the inputs separately")
        batches.update(b)
        where.update(w)
    t0 = time.perf_counter()
    res, _ = domain_perplexity(lm.model, batches, where=where)
    secs = time.perf_counter() - t0
    total = sum(r["tokens"] for r in res.values())
    loss_all = sum(r["loss"] * r["tokens"] for r in res.values()) / max(1, total)
    summary = {"domains": {d: r["ppl"] for d, r in res.items()}, "loss": {d: r["loss"] for d, r in res.items()},
               "tokens_per_domain": {d: r["tokens"] for d, r in res.items()}, "tokens": total,
               "all": {"loss": loss_all, "ppl": math.exp(min(loss_all, PPL_CAP))},
               "model": a.model, "layout": lm.layout, "data": a.data, "seq_len": a.seq_len, "dtype": a.dtype,
               "parallel": {"tp": a.tp, "ep": a.ep, "etp": a.etp,
                            "world": dist.get_world_size() if dist.is_initialized() else 1},
               "seconds": secs, "tokens_per_second": total / max(secs, 1e-9)}
    if _rank() == 0:
        if a.json:
            print(json.dumps(summary, indent=1))
        else:
            print(f"{a.model} ({lm.layout}, {a.dtype}), seq_len {a.seq_len}")
            print(f"{'domain':<24}{'loss':>10}{'ppl':>12}{'tokens':>12}")
            for d, r in res.items():
                print(f"{d:<24}{r['loss']:>10.4f}{r['ppl']:>12.3f}{r['tokens']:>12d}")
            print(f"{'all (token-weighted)':<24}{loss_all:>10.4f}{summary['all']['ppl']:>12.3f}{total:>12d}")
            print(f"{total / max(secs, 1e-9):.0f} tokens/s")
    return 0


def eval_main(argv=None) -> int:
    return _run("megamoe-eval", _eval, argv)


# ---- megamoe-generate -----------------------------------------------------------------------------------------

def _gen_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megamoe-generate", description="Prompts in, text out (KV cache).")
    _add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", nargs="+", help="one or more prompts")
    src.add_argument("--prompts", help="a file: one prompt per line, or JSONL with a 'prompt' field")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default without sampling flags)")
    p.add_argument("--temperature", type=float, help="sample with this temperature")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, help="sample from the top-p nucleus")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_const", const="on",
                      help="wrap each prompt in the tokenizer's chat template (user turn + generation prompt)")
    chat.add_argument("--no-chat", dest="chat", action="store_const", const="off", help="raw prompts")
    p.set_defaults(chat="auto")
    p.add_argument("--system", help="a system turn before each prompt (with the chat template)")
    p.add_argument("--stop", nargs="+", default=None, help="stop strings (the text is cut before them)")
    p.add_argument("--no-cache", action="store_true", help="full forward at every step (slow; the reference)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (left-padded, KV cache)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {prompt, completion, new_tokens}")
    return p


def _read_prompts(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.rstrip("\n") for ln in f]
    except OSError as e:
        raise InputError(f"--prompts: {path}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"--prompts: {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    out = []
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        if path.endswith(".jsonl"):
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise InputError(f"{path}:{i}: expected an object with a string field 'prompt'")
            out.append(obj["prompt"])
        else:
            out.append(ln)
    if not out:
        raise InputError(f"--prompts: {path}: no prompts")
    return out


def _generate(argv) -> int:
    a = _gen_parser().parse_args(argv)
    setup_logging(a.log_level)
    sampling = any(v is not None for v in (a.temperature, a.top_k, a.top_p))
    if a.greedy and sampling:
        raise InputError("--greedy: cannot be combined with --temperature/--top-k/--top-p")
    if a.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens: {a.max_new_tokens} must be >= 1")
    if a.batch_size < 1:
        raise InputError(f"--batch-size: {a.batch_size} must be >= 1")
    sampler = Sampler(greedy=False, temperature=a.temperature if a.temperature is not None else 1.0,
                      top_k=a.top_k or 0, top_p=a.top_p if a.top_p is not None else 1.0,
                      seed=a.seed) if sampling else Sampler()
    prompts = a.prompt if a.prompt else _read_prompts(a.prompts)
    lm = _setup(a)
    if lm.tokenizer is None:
        raise InputError(f"{a.model}: no tokenizer in the model directory (pass --tokenizer DIR)")
    has_template = bool(getattr(lm.tokenizer, "chat_template", None))
    if a.chat == "on" and not has_template:
        raise InputError(f"--chat: the tokenizer of {a.tokenizer or a.model} has no chat template")
    chat = a.chat == "on" or (a.chat == "auto" and is_instruct(lm))
    if _rank() == 0:
        why = {"on": "--chat", "off": "--no-chat"}.get(a.chat) or (
            "auto: the tokenizer has a chat template and the model is an instruct model by name" if chat else
            "auto: " + ("the model is not an instruct model by name" if has_template else
                        "the tokenizer has no chat template"))
        print(f"chat template: {'on' if chat else 'off'} ({why})", file=sys.stderr)
    gen = TextGenerator(lm, sampler, use_cache=not a.no_cache)
    out, t0 = [], time.perf_counter()
    for lo in range(0, len(prompts), a.batch_size):
        chunk = prompts[lo:lo + a.batch_size]
        news = gen.generate_batch([gen.prompt_ids(p, chat, a.system) for p in chunk], a.max_new_tokens, stop=a.stop)
        out += [{"prompt": p, "completion": gen.decode(new, a.stop), "new_tokens": len(new)}
                for p, new in zip(chunk, news)]
    secs = time.perf_counter() - t0
    ntok = sum(o["new_tokens"] for o in out)
    if _rank() == 0:
        if a.json:
            print(json.dumps(out, indent=1, ensure_ascii=False))
        else:
            for o in out:
                print(f"### {o['prompt']}\n{o['completion']}\n")
        print(f"{ntok} tokens in {secs:.2f} s ({ntok / max(secs, 1e-9):.1f} tokens/s)", file=sys.stderr)
    return 0


def generate_main(argv=None) -> int:
    return _run("megamoe-generate", _generate, argv)


# ---- megamoe-lm-eval ------------------------------------------------------------------------------------------

def _lm_eval(argv) -> int:
    from megamoe.eval import lm_eval_backend  # lm_eval (optional) and its CLI: only for this command
    lm_eval_backend.require_lm_eval()
    argv = _take_log_level(list(sys.argv[1:] if argv is None else argv))
    if not any(x == "--include_path" or x.startswith("--include_path=") for x in argv):
        argv += ["--include_path", SUITES_DIR]
    elif _rank() == 0:
        print(f"megamoe-lm-eval: --include_path given; megamoe's suites ({', '.join(SUITES)}) are in {SUITES_DIR}",
              file=sys.stderr)
    from lm_eval.__main__ import cli_evaluate
    old = sys.argv
    sys.argv = ["lm_eval"] + argv
    try:
        with open(os.devnull, "w") as null, (contextlib.redirect_stdout(null) if _rank() else contextlib.nullcontext()):
            cli_evaluate()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except ValueError as e:
        if str(e).startswith("Tasks not found"):  # lm_eval's own check of --tasks: bad input, one line
            raise InputError(f"--tasks: {e} (lm_eval does not know them; local task YAMLs: --include_path DIR)") \
                from None
        raise
    finally:
        sys.argv = old
    return 0


def _take_log_level(argv: list) -> list:
    """megamoe-lm-eval passes its arguments to lm_eval's CLI: take megamoe's --log-level out of them first."""
    out, i = [], 0
    while i < len(argv):
        x = argv[i]
        if x == "--log-level" or x.startswith("--log-level="):
            level = x.split("=", 1)[1] if "=" in x else (argv[i + 1] if i + 1 < len(argv) else "")
            if level.lower() not in LOG_LEVELS:
                raise InputError(f"--log-level: {level!r} is not one of {', '.join(LOG_LEVELS)}")
            setup_logging(level.lower())
            i += 1 if "=" in x else 2
            continue
        out.append(x)
        i += 1
    return out


def lm_eval_main(argv=None) -> int:
    return _run("megamoe-lm-eval", _lm_eval, argv)


# ---- megamoe-eval-tasks ---------------------------------------------------------------------------------------

def _tasks(argv) -> int:
    p = argparse.ArgumentParser(prog="megamoe-eval-tasks", description="lm-eval task files of megamoe.")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the offline task set (local text, no download) into OUT_DIR")
    b.add_argument("out_dir")
    b.add_argument("--seed", type=int, default=1234)
    sub.add_parser("suites", help="where the paper's task suites are (an lm_eval --include_path)")
    add_log_level(p)
    a = p.parse_args(argv)
    setup_logging(a.log_level)
    if a.cmd == "build":
        from megamoe.eval.tasks.offline import build_offline_tasks
        s = build_offline_tasks(a.out_dir, a.seed)
        print(json.dumps(s, indent=1))
        print(f"HF_DATASETS_OFFLINE=1 megamoe-lm-eval --model megamoe --model_args path=MODEL "
              f"--include_path {s['dir']} --tasks {s['group']}", file=sys.stderr)
    else:
        print(SUITES_DIR)
        for name, tasks in SUITES.items():
            print(f"  {name}: " + ", ".join(f"{t} ({n}-shot)" for t, n in tasks.items()))
    return 0


def tasks_main(argv=None) -> int:
    return _run("megamoe-eval-tasks", _tasks, argv)


COMMANDS = {"eval": eval_main, "generate": generate_main, "lm-eval": lm_eval_main, "tasks": tasks_main}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m megamoe.eval.cli {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        sys.exit(2)
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
