"""`lm_eval --model megamoe`: an lm-evaluation-harness model class over our model, for our shards (any TP/EP layout)
and HF directories (megamoe.eval.load), without exporting first. Every router and every expert kind runs as in
training: the requests go through LlamaMoEModel's forward.

    megamoe-lm-eval --model megamoe --model_args path=ckpt/moe,dtype=bfloat16 --tasks llama_moe_v1 --batch_size 8
    lm_eval --model megamoe --model_args path=ckpt/moe ...          # plain lm_eval: see "Registration" below

    from megamoe.eval.lm_eval_backend import MegamoeLM, evaluate_tasks
    res = evaluate_tasks(loaded_model, ["megamoe_offline"], include_path=tasks_dir, limit=20)   # in-process

model_args: `path` (or `pretrained`), `dtype` (float32 | bfloat16 | float16), `tokenizer` (a directory; default: the
model's), `max_length` (default: max_position_embeddings), `max_gen_toks` (256), `tp`, `ep`, `etp` (the layout to
build under torchrun; default 1), `use_cache` (KV cache in generation; default true), `seed` (sampling). `batch_size`
comes from lm_eval's --batch_size ("auto" means 8 here).

Methods: `loglikelihood` (lm_eval's TemplateLM tokenization: context/continuation split, empty context -> the
prefix token), `loglikelihood_rolling`, `generate_until` (greedy or sampled, stop strings + EOS), batched, all
through megamoe.eval.scorer.Scorer and megamoe.eval.textgen.TextGenerator.

Registration. lm_eval 0.4.x has no plugin entry points: its model registry is filled by `lm_eval.models` and by the
`@register_model` decorator of an imported module. So:
- `import megamoe.eval.lm_eval_backend` registers `megamoe` (Python: `lm_eval.simple_evaluate(model="megamoe")`);
- `megamoe-lm-eval ...` is lm_eval's own command line with `megamoe` registered and megamoe's task suites on the
  include path (works for every install);
- plain `lm_eval --model megamoe` works after a regular (non-editable) `pip install .`, which installs
  `megamoe-lm-eval.pth`: at interpreter start it only adds an import hook (megamoe.eval.lm_eval_hook) that registers
  a lazy placeholder right after lm_eval imports its own model list; nothing of lm_eval or torch is imported before.

Under torchrun (TP/EP), every rank runs every request (the layout needs all ranks in each forward); lm_eval sees a
world of one on each rank, and `megamoe-lm-eval` silences the output of all ranks but rank 0.

lm_eval is an optional dependency (`pip install 'megamoe[lm-eval]'`): this module imports without it, and MegamoeLM /
evaluate_tasks raise an InputError saying how to install it.
"""

from __future__ import annotations

import difflib
import json
import logging
import os

import torch

from megamoe import parallel
from megamoe.config import ParallelConfig
from megamoe.errors import ConfigError, InputError
from megamoe.eval.load import LoadedModel, load_model, load_tokenizer
from megamoe.eval.sampling import Sampler
from megamoe.eval.scorer import Scorer, rolling_windows
from megamoe.eval.textgen import TextGenerator

try:  # optional dependency: pip install 'megamoe[lm-eval]'
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.tasks import TaskManager
except ImportError:  # the module still imports; using the backend says how to install lm_eval
    lm_eval = None
    TemplateLM = object

    def register_model(*names):
        return lambda cls: cls

log = logging.getLogger(__name__)

__all__ = ["MegamoeLM", "evaluate_tasks", "require_lm_eval", "task_manager", "PeriodicTasks", "DEFAULT_AUTO_BATCH"]

DEFAULT_AUTO_BATCH = 8


def require_lm_eval():
    if lm_eval is None:
        raise InputError("lm-evaluation-harness is not installed: pip install 'megamoe[lm-eval]' (lm_eval >= 0.4.13)")


def _batch_size(bs) -> int:
    if bs is None:
        return 1
    if isinstance(bs, int):
        return max(1, bs)
    s = str(bs)
    if s.startswith("auto"):
        return DEFAULT_AUTO_BATCH
    try:
        return max(1, int(s))
    except ValueError:
        raise InputError(f"--batch_size: {bs!r} is not a number or 'auto'") from None


def _flag(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")


@register_model("megamoe")
class MegamoeLM(TemplateLM):
    """lm-evaluation-harness model over a LoadedModel (module docstring)."""

    def __init__(self, path: str | None = None, pretrained: str | None = None, dtype: str = "float32",
                 batch_size=1, max_length=None, max_gen_toks=256, tokenizer: str | None = None, tp=1, ep=1, etp=1,
                 use_cache=True, seed=1234, device=None, model: LoadedModel | None = None, **kwargs):
        require_lm_eval()
        super().__init__()
        if model is None:
            path = path or pretrained
            if not path:
                raise InputError("--model_args: path=DIR is required (our shards or a Hugging Face directory)")
            if parallel.current() is None:
                parallel.initialize(ParallelConfig(tp=int(tp), ep=int(ep), etp=int(etp)))
            if device in (None, "auto") or (str(device).startswith("cuda") and not torch.cuda.is_available()):
                device = "cuda" if torch.cuda.is_available() else "cpu"  # lm_eval's CLI asks for cuda by default
            model = load_model(path, dtype=dtype, device=device, tokenizer=tokenizer)
        if model.tokenizer is None:
            raise InputError(f"{model.path}: no tokenizer in the model directory: pass tokenizer=DIR in --model_args")
        ignored = sorted(k for k in kwargs if k not in ("max_batch_size", "trust_remote_code"))
        if ignored:
            log.warning("megamoe backend: ignoring model_args %s", ignored)
        self.lm = model
        self.tokenizer = model.tokenizer
        self.scorer = Scorer(model, _batch_size(batch_size), int(max_length) if max_length else None)
        self._max_gen_toks = int(max_gen_toks)
        self._use_cache = _flag(use_cache)
        self._seed = int(seed)

    # ---- what TemplateLM needs ----
    @property
    def eot_token_id(self) -> int:
        return self.scorer.eot_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.scorer.prefix_token_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.scorer.batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", self.lm.path)).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        ids = self.scorer.encode(string, add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        return self.scorer.score([(ctx, cont) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        docs = [self.tok_encode(r.args[0]) for r in requests]
        windows, owner = [], []
        for i, toks in enumerate(docs):
            w = rolling_windows(toks, self.prefix_token_id, self.max_length)
            windows += w
            owner += [i] * len(w)
        sums = [0.0] * len(docs)
        for i, (s, _) in zip(owner, self.scorer.score(windows) if windows else []):
            sums[i] += s
        for r, s in zip(requests, sums):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, s)
        return sums

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same generation kwargs, longest prompt first, in batches of batch_size
        (TextGenerator.generate_batch); the answers come back in request order."""
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        out: list = [None] * len(requests)
        groups: dict = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        for idx in groups.values():
            kw = normalize_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            n = int(kw.pop("max_gen_toks"))
            if kw.get("do_sample"):
                sampler = Sampler(greedy=False, temperature=float(kw.get("temperature") or 1.0),
                                  top_k=int(kw.get("top_k", 50) or 0), top_p=float(kw.get("top_p", 1.0) or 1.0),
                                  seed=self._seed)
            else:
                sampler = Sampler()
            gen = TextGenerator(self.lm, sampler, use_cache=self._use_cache)
            prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - n) for i in idx}
            order = sorted(idx, key=lambda i: -len(prompts[i]))
            for lo in range(0, len(order), self.batch_size):
                chunk = order[lo:lo + self.batch_size]
                for i, new in zip(chunk, gen.generate_batch([prompts[i] for i in chunk], n, stop=until)):
                    text = postprocess_generated_text(self.tok_decode(new), until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    out[i] = text
        return out

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)


def task_manager(include_path=None, tasks=None, tm=None):
    """lm_eval's TaskManager (or `tm`, checked). When every task in `tasks` is found under `include_path`, lm_eval's
    own (large: ~15k names) task tree is not indexed. Unknown task names are an InputError naming them (and the
    closest known names)."""
    require_lm_eval()
    paths = [include_path] if isinstance(include_path, str) else list(include_path or [])
    if tm is None and paths and tasks:
        tm = TaskManager(include_path=paths, include_defaults=False)
        if any(not tm.match_tasks([t]) for t in tasks):
            tm = None
    if tm is None:
        tm = TaskManager(include_path=paths or None)
    if tasks:
        unknown = [t for t in tasks if not tm.match_tasks([t])]
        if unknown:
            hints = {t: difflib.get_close_matches(t, tm.all_tasks, n=3) for t in unknown}
            raise InputError("lm_eval does not know the task(s) " + ", ".join(
                f"{t!r}" + (f" (did you mean {', '.join(hints[t])}?)" if hints[t] else "") for t in unknown)
                + (f"; include_path: {paths}" if paths else "; pass --include_path DIR for local task YAMLs"))
    return tm


def evaluate_tasks(model: LoadedModel, tasks: list[str], include_path=None, limit=None, num_fewshot=None,
                   batch_size: int = 8, seed: int = 1234, tm=None) -> dict:
    """Run lm_eval tasks in-process on an already loaded model: {task: {metric: value}} (lm_eval's "results" with
    the ",none" filter suffix dropped; stderr entries and the sample counts left out)."""
    require_lm_eval()
    tm = tm or task_manager(include_path, tasks)
    lm = MegamoeLM(model=model, batch_size=batch_size, seed=seed)
    was_training = model.model.training
    model.model.eval()
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed)
    finally:
        model.model.train(was_training)
    out = {}
    for task, metrics in (res or {}).get("results", {}).items():
        out[task] = {k.split(",")[0]: v for k, v in metrics.items()
                     if "_stderr" not in k and k not in ("alias", "name", "sample_len") and isinstance(v, (int, float))}
    return out


def _tokenizer_dir(path: str) -> str | None:
    """A directory as is; a preprocessing manifest.json -> the tokenizer directory it records."""
    if path.endswith(".json") and os.path.isfile(path):
        try:
            with open(path) as f:
                return (json.load(f).get("tokenizer") or {}).get("path")
        except (OSError, ValueError, AttributeError):
            return None
    return path


class PeriodicTasks:
    """lm_eval tasks at the trainer's evaluations (`eval.lm_eval_tasks`): the task list is checked and indexed once,
    the tokenizer loaded once; each call evaluates the model being trained, in-process, and returns the flat record
    {"eval/lm/<task>/<metric>": value}.

    tokenizer_dirs: candidates in order (eval.lm_eval_tokenizer, init.path, data.manifest: a preprocessing
    manifest.json names its tokenizer): the first that holds a tokenizer wins. Problems are ConfigErrors naming the
    field."""

    def __init__(self, tasks, include_path=None, limit=None, batch_size: int = 8, tokenizer_dirs=(), seed=1234):
        if not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks):
            raise ConfigError(f"eval.lm_eval_tasks: expected a list of task names, got {tasks!r}")
        if limit is not None and (not isinstance(limit, (int, float)) or isinstance(limit, bool) or limit <= 0):
            raise ConfigError(f"eval.lm_eval_limit: {limit!r} must be a positive number (or null: every document)")
        try:
            require_lm_eval()
            self.tm = task_manager(include_path, tasks)
        except InputError as e:
            raise ConfigError(f"eval.lm_eval_tasks: {e}") from None
        dirs = [_tokenizer_dir(d) for d in tokenizer_dirs if d]
        self.tokenizer = next((t for t in (load_tokenizer(d) for d in dirs if d and os.path.isdir(d))
                               if t is not None), None)
        if self.tokenizer is None:
            raise ConfigError(f"eval.lm_eval_tokenizer: no tokenizer in {[d for d in tokenizer_dirs if d]}; set "
                              "eval.lm_eval_tokenizer to the model's tokenizer directory")
        self.tasks, self.include_path, self.limit = list(tasks), include_path, limit
        self.batch_size, self.seed = batch_size, seed

    def __call__(self, model, model_cfg) -> dict:
        m = model
        while hasattr(m, "module"):  # DDP wrappers
            m = m.module
        eos = sorted({int(self.tokenizer.eos_token_id)}) if self.tokenizer.eos_token_id is not None else []
        lm = LoadedModel(m, model_cfg, "megamoe", "(training)", self.tokenizer, eos)
        res = evaluate_tasks(lm, self.tasks, self.include_path, self.limit, batch_size=self.batch_size,
                             seed=self.seed, tm=self.tm)
        return {f"eval/lm/{task}/{k}": v for task, metrics in res.items() for k, v in metrics.items()}
