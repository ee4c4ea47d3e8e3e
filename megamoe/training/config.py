"""The training configuration: one object, loaded from YAML, overridable from the command line.

    cfg = load_train_config("run.yaml", overrides=["optim.lr=1e-4", "train.steps=200"])
    cfg.validate()                       # raises ConfigError naming the field, e.g. "train.steps: 0 must be >= 1"
    save_train_config(cfg, "ckpt/config.yaml")   # the config in force, written atomically

Sections (all optional; see configs/*.yaml and docs/training.md):
  model       ModelConfig (megamoe.config); None: taken from `init` (our shard manifest or the HF config.json)
  init        where the weights come from: random | megamoe (our shards) | hf (a dense HF LLaMA directory)
  parallel    ParallelConfig (tp, ep, etp, sequence_parallel, distributed_optimizer)
  data        the domain mixture (dataset prefixes per domain, weights or a preset, sequence length, dynamic weights);
              `format: chat` for SFT (a chat manifest: response-only loss, packing or padding)
  optim       AdamW + warmup/cosine schedule + clipping (the llama-moe CPT recipe by default)
  stages      optional list of training stages (SFT's two-stage recipe, or CPT phases): each with its data mixture,
              steps or tokens, lr schedule (overrides of `optim`), frozen routers; see `StageConfig`
  train       steps, global batch in tokens, micro-batch size, precision, activation checkpointing, NaN guard
  eval        validation every N steps (loss and perplexity per domain)
  checkpoint  directory, interval, keep-last-K, resume
  log         console / JSONL / TensorBoard, TGS window, device peak FLOP/s for MFU
  distill     knowledge distillation from a teacher (the dense source): its KL beside the cross entropy
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import torch
import yaml

from megamoe.config import ModelConfig, ParallelConfig, apply_overrides, from_dict, read_yaml
from megamoe.errors import ConfigError
from megamoe.fileio import atomic_write_text
from megamoe.training.schedule import LRSchedule

__all__ = ["TrainConfig", "InitConfig", "DataConfig", "EmbeddedChatConfig", "OptimConfig", "StageConfig", "Stage",
           "LoopConfig", "EvalConfig", "DistillConfig", "CheckpointConfig", "LogConfig", "load_train_config", "save_train_config",
           "build_schedule", "warmup_steps_of"]

INIT_SOURCES = ("random", "megamoe", "hf")
DECAY_STYLES = ("cosine", "linear", "constant")
DATA_FORMATS = ("text", "chat")
PRECISIONS = ("auto", "fp32", "bf16")
WANDB_MODES = ("offline", "online", "disabled")
PARAMS_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # a resolved precision -> ModelConfig.params_dtype


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU multiplies bf16 natively (oneDNN bf16 GEMMs then run ~2x its fp32 rate; without
    it bf16 is emulated and slower than fp32)."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        f = getattr(torch.cpu, probe, None)
        try:
            if f is not None and f():
                return True
        except Exception:  # a private torch probe: absent or failing means "not known to be native"
            pass
    return False


def resolve_precision(requested: str, cuda: bool) -> str:
    """train.precision "auto": bf16 (bf16 weights, fp32 master weights and grads) on a GPU, fp32 on a CPU. bf16 on a
    CPU is there to ask for (`train.precision: bf16`): with native bf16 (cpu_has_native_bf16) it trains ~1.5x faster
    than fp32 (docs/training.md), without it slower."""
    if requested != "auto":
        return requested
    return "bf16" if cuda else "fp32"


@dataclass
class InitConfig:
    source: str = "random"            # random | megamoe (our shard dir, manifest.json) | hf (dense HF LLaMA dir)
    path: str | None = None


@dataclass
class EmbeddedChatConfig:
    """`data.build_embedded_chat`: when `data.manifest` does not exist yet, build the embedded chat set
    (megamoe.data.chat_corpus: Python docstrings and man pages as `general`, worked arithmetic as `math`) into
    `<manifest dir>/jsonl/` and tokenize it (megamoe-preprocess --format chat --per-domain) into the manifest's
    directory. Deterministic; rank 0 builds, the others wait."""
    tokenizer: str = "smollm2"        # "smollm2": the embedded SmolLM2-135M-Instruct (its chat template); or an HF dir
    general: int = 400                # training conversations per domain
    math: int = 400
    seed: int = 1234
    workers: int = 1


@dataclass
class DataConfig:
    """The multi-domain corpus (megamoe.data.DomainMixture), or chat data for SFT (megamoe.data.SFTMixture).

    `prefixes`: domain -> megatron dataset prefix (path without .bin/.idx) of the training split.
    `valid_prefixes`: domain -> prefix of the validation split (None: no evaluation).
    `weights`: domain -> weight, or a preset name understood by megamoe.data (e.g. "uniform", "sheared_llama").
    `manifest`: instead of prefixes, the manifest.json of `megamoe-preprocess --per-domain` (train and
    held-out valid prefixes of every domain).
    `dynamic`: update the domain weights at every evaluation (Sheared-LLaMA rule; needs `reference_losses`:
    a dict domain -> loss, or "llama2_7b").
    `format`: "text" (pre-training documents, every token trained) or "chat" (the manifest of
    `megamoe-preprocess --format chat`: loss on assistant tokens only; `pack` conversations into rows with
    attention kept inside each, or one conversation per row, padded)."""
    format: str = "text"
    pack: bool = True
    build_embedded_chat: EmbeddedChatConfig | None = None
    manifest: str | None = None
    prefixes: dict | None = None
    valid_prefixes: dict | None = None
    weights: dict | str | None = None
    seq_len: int = 2048
    seed: int = 1227
    split: str | None = None           # megatron's "train,valid,test" split per domain; None: the mixture's default
    dynamic: bool = False
    dynamic_rule: str = "sheared_llama"
    reference_losses: dict | str | None = None
    dynamic_eta: float = 1.0
    dynamic_smoothing: float = 1e-4


@dataclass
class OptimConfig:
    lr: float = 2e-4
    min_lr_ratio: float = 0.1          # the floor, as a fraction of lr
    warmup_steps: int = 100
    warmup_ratio: float | None = None  # a fraction of the (stage's) steps, rounded up; wins over warmup_steps when set
    decay_steps: int | None = None     # None: train.steps (a stage's own steps within a stage)
    decay_style: str = "cosine"        # cosine | linear | constant
    weight_decay: float = 0.1          # not applied to norms and biases (1-D parameters)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0             # 0: no clipping


@dataclass
class StageConfig:
    """One training stage (top-level `stages:` list). Stages run in order, each for `steps` optimizer steps (or
    `tokens` / train.global_batch_tokens, rounded up); train.steps becomes their sum.

    `mixture`: dataset -> weight over the domains of data.manifest (or data.prefixes), e.g. {math: 0.7, general:
    0.3}; domains left out get weight 0; None keeps data.weights. Weights are >= 0 with a positive sum (normalised).
    `optim`: overrides of the optim section for this stage (lr, warmup_steps or warmup_ratio, decay_style,
    min_lr_ratio, weight_decay, ...); the schedule restarts at the stage's first step and decays over its steps.
    `freeze_routers`: every router's parameters (names containing ".router.") get no update in this stage
    (LLaMA-MoE v2's freeze_gate): they leave megatron's gradient buffers and the optimizer, so they stay
    bit-identical. `reset_optimizer`: start the stage with fresh AdamW moments, as a separate run from the previous
    stage's weights does (v2's recipe); false keeps them (only when freeze_routers equals the previous stage's)."""
    name: str | None = None
    mixture: dict | None = None
    steps: int | None = None
    tokens: int | None = None
    optim: dict | None = None
    freeze_routers: bool = False
    reset_optimizer: bool = True


@dataclass
class Stage:
    """A resolved stage: global steps [start, end), its optimizer settings and data weights."""
    index: int
    name: str
    start: int
    end: int
    optim: OptimConfig
    weights: dict | None
    freeze_routers: bool
    reset_optimizer: bool

    @property
    def steps(self) -> int:
        return self.end - self.start


def warmup_steps_of(optim: OptimConfig, steps: int) -> int:
    """optim.warmup_ratio * steps rounded up when a ratio is set (as HF's get_warmup_steps), else warmup_steps."""
    if optim.warmup_ratio is not None:
        return int(math.ceil(optim.warmup_ratio * steps))
    return optim.warmup_steps


def build_schedule(optim: OptimConfig, steps: int) -> LRSchedule:
    """The LR schedule of `steps` optimizer steps (a run without stages, or one stage) under `optim`."""
    return LRSchedule(optim.lr, warmup_steps_of(optim, steps), optim.decay_steps or steps, optim.min_lr_ratio,
                      optim.decay_style, optim.weight_decay)


@dataclass
class LoopConfig:
    steps: int = 1000
    global_batch_tokens: int = 4 * 2048   # tokens per optimizer step, all ranks together
    micro_batch_size: int = 1             # sequences per forward on one rank
    seed: int = 1227
    precision: str = "auto"               # auto: bf16 on a GPU, fp32 on a CPU; bf16 on a CPU when asked for
    activation_checkpointing: bool = False
    max_consecutive_nonfinite: int = 5    # NaN/Inf losses in a row before the run stops
    max_minutes: float | None = None      # wall-clock limit of the loop: save and stop (resumable) before passing it
    freeze_routers: bool = False          # routers get no update (without `stages:`; a stage has its own flag). For
    #                                       calibrated routers (the megamoe recipe): their weights are ~1e-4, so
    #                                       one AdamW step at lr 1e-4 re-routes every token


@dataclass
class DistillConfig:
    """`distill`: knowledge distillation from a teacher (megamoe/training/distill.py):
    loss = (1 - weight) * CE + weight * T^2 * KL(teacher || student) + the routers' aux losses, over the tokens the
    cross entropy counts. teacher: a directory megamoe-eval loads (typically the dense source of the conversion);
    null: off. Tensor, pipeline and context parallelism are refused (the student's logits must be whole on a rank)."""
    teacher: str | None = None
    weight: float = 1.0                # alpha, in [0, 1]
    temperature: float = 1.0


@dataclass
class EvalConfig:
    interval: int = 0                  # steps between evaluations; 0: only at the end (if at_end)
    batches: int = 4                   # validation batches per domain
    batch_size: int = 4
    at_end: bool = True
    at_start: bool = False             # evaluate before the first step (not on resume): the "before" numbers
    plots: bool = True                 # routing heat-maps at each evaluation (matplotlib)
    sample_tokens: int = 48            # chat data: greedy reply to the first held-out prompt(s) of each domain at the
    samples_per_domain: int = 1        #   end of every stage (0 tokens: none), in metrics.jsonl and on the console
    # lm-eval tasks at every evaluation, through the megamoe backend, logged as eval/lm/<task>/<metric> (null: off;
    # docs/evaluation.md); local task YAMLs (`megamoe-eval-tasks build DIR`); documents per task (null: all); the
    # tokenizer (null: init.path's, else data.manifest's)
    lm_eval_tasks: list | None = None
    lm_eval_include_path: str | None = None
    lm_eval_limit: int | None = None
    lm_eval_tokenizer: str | None = None


@dataclass
class CheckpointConfig:
    dir: str | None = None             # None: <out_dir>/checkpoints
    interval: int = 0                  # steps between checkpoints; 0: only at exit
    keep_last: int = 3
    save_at_end: bool = True
    resume: bool = False               # resume from <dir>/latest (the --resume flag)


@dataclass
class WandbConfig:
    """log.wandb: Weights & Biases beside metrics.jsonl and TensorBoard (megamoe/training/monitor.py)."""
    project: str = "megamoe"
    mode: str = "offline"              # offline (files under dir, `wandb sync` later) | online | disabled
    dir: str | None = None             # where wandb/ goes (default: out_dir)
    name: str | None = None            # run name (default: out_dir's name)
    entity: str | None = None
    tags: list | None = None


@dataclass
class LogConfig:
    interval: int = 1
    tensorboard: bool = True           # when the tensorboard package is importable
    tgs_window: int = 20               # steps in the TGS / MFU window
    peak_flops: float | None = None    # per device; None: by device name (H100/H200 989.4e12, A100 312e12 bf16)
    progress: bool = True              # console progress bar
    wandb: WandbConfig | None = None   # null: no W&B; {} or {mode: offline}: an offline run (needs the wandb package)
    # token-level loss rows (megamoe/training/token_loss.py) every N steps on a fixed held-out batch (0: only at the
    # evaluations, which always write one per domain when token_loss is on)
    token_loss: bool = True
    token_loss_interval: int = 100


@dataclass
class TrainConfig:
    out_dir: str = "runs/megamoe"
    model: ModelConfig | None = None
    init: InitConfig = field(default_factory=InitConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    stages: list | None = None         # list of StageConfig (see there); None: one stage of train.steps

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.out_dir, "checkpoints")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d) if isinstance(d, dict) else d
        stages = d.pop("stages", None) if isinstance(d, dict) else None
        cfg = from_dict(cls, d)
        if stages is not None:
            if not isinstance(stages, list) or not stages:
                raise ConfigError("stages: expected a non-empty list of stages (name, mixture, steps or tokens, "
                                  "optim, freeze_routers)")
            cfg.stages = [from_dict(StageConfig, s, f"stages[{i}]") for i, s in enumerate(stages)]
        return cfg

    # ---- stages ----
    def stage_plan(self) -> list[Stage]:
        """The resolved stages (one implicit stage "main" of train.steps without a `stages:` list). Sets
        train.steps to the sum of the stages' steps. Raises ConfigError naming the field."""
        if not self.stages:
            return [Stage(0, "main", 0, self.train.steps, self.optim,
                          self.data.weights if isinstance(self.data.weights, dict) else None,
                          bool(self.train.freeze_routers), True)]
        plan, start, names = [], 0, set()
        base = dataclasses.asdict(self.optim)
        for i, st in enumerate(self.stages):
            where = f"stages[{i}]"
            name = st.name or f"stage{i + 1}"
            if name in names:
                raise ConfigError(f"{where}.name: {name!r} names two stages")
            names.add(name)
            if (st.steps is None) == (st.tokens is None):
                raise ConfigError(f"{where}: give exactly one of steps or tokens")
            if st.steps is not None and st.steps < 1:
                raise ConfigError(f"{where}.steps: {st.steps} must be >= 1")
            if st.tokens is not None and st.tokens < 1:
                raise ConfigError(f"{where}.tokens: {st.tokens} must be >= 1")
            steps = st.steps if st.steps is not None else -(-st.tokens // max(1, self.train.global_batch_tokens))
            if st.optim is not None and not isinstance(st.optim, dict):
                raise ConfigError(f"{where}.optim: expected a mapping of optim fields")
            optim = from_dict(OptimConfig, {**base, **(st.optim or {})}, f"{where}.optim")
            _validate_optim(optim, f"{where}.optim")
            weights = None
            if st.mixture is not None:
                if not isinstance(st.mixture, dict) or not st.mixture:
                    raise ConfigError(f"{where}.mixture: expected a mapping dataset -> weight, e.g. "
                                      "{math: 0.7, general: 0.3}")
                for k, v in st.mixture.items():
                    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                        raise ConfigError(f"{where}.mixture.{k}: {v!r} must be a number >= 0")
                if sum(st.mixture.values()) <= 0:
                    raise ConfigError(f"{where}.mixture: the weights {st.mixture} do not sum to a positive number")
                weights = {str(k): float(v) for k, v in st.mixture.items()}
            if st.freeze_routers and self.model is not None and self.model.moe is None:
                raise ConfigError(f"{where}.freeze_routers: the model has no routers (a dense model: model.moe is "
                                  "null)")
            if not st.reset_optimizer and i > 0 and st.freeze_routers != self.stages[i - 1].freeze_routers:
                raise ConfigError(f"{where}.reset_optimizer: false needs the same freeze_routers as the stage before "
                                  "(the optimizer's parameters change)")
            if not st.reset_optimizer and plan:
                fixed = ("beta1", "beta2", "eps", "clip_grad")   # set when the optimizer is built
                changed = [f for f in fixed if getattr(optim, f) != getattr(plan[-1].optim, f)]
                if changed:
                    raise ConfigError(f"{where}.optim.{changed[0]}: differs from the stage before, which "
                                      "reset_optimizer: false keeps; reset the optimizer or keep the value")
            plan.append(Stage(i, name, start, start + steps, optim, weights, st.freeze_routers, st.reset_optimizer))
            start += steps
        self.train.steps = start
        return plan

    def data_domains(self) -> list[str] | None:
        """The domains of the configured data (manifest or prefixes), None when not known without the data."""
        if self.data.prefixes:
            return sorted(self.data.prefixes)
        if self.data.manifest and os.path.isfile(self.data.manifest):
            try:
                with open(self.data.manifest) as f:
                    return sorted(json.load(f).get("domains", {}))
            except (OSError, ValueError) as e:
                raise ConfigError(f"data.manifest: {self.data.manifest} is not a readable manifest ({e})") from None
        return None

    def validate_stage_data(self) -> None:
        """Stage mixtures name datasets of the data (once the manifest exists)."""
        domains = self.data_domains()
        if domains is None or not self.stages:
            return
        for i, st in enumerate(self.stages):
            for k in st.mixture or {}:
                if k not in domains:
                    raise ConfigError(f"stages[{i}].mixture.{k}: no dataset {k!r} in "
                                      f"{self.data.manifest or 'data.prefixes'} (datasets: {', '.join(domains)})")

    def validate(self) -> "TrainConfig":
        def pos(path, v, allow_zero=False):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or (v == 0 and not allow_zero):
                raise ConfigError(f"{path}: {v!r} must be {'>= 0' if allow_zero else '> 0'}")
        if self.init.source not in INIT_SOURCES:
            raise ConfigError(f"init.source: {self.init.source!r} is not one of {INIT_SOURCES}")
        if self.init.source != "random" and not self.init.path:
            raise ConfigError(f"init.path: needed for init.source={self.init.source!r}")
        if self.init.source == "random" and self.model is None:
            raise ConfigError("model: a random initialisation needs a model section")
        if self.model is not None:
            try:
                self.model.validate()
            except ConfigError as e:
                raise ConfigError(f"model.{e}") from None
        pos("data.seq_len", self.data.seq_len)
        if self.data.format not in DATA_FORMATS:
            raise ConfigError(f"data.format: {self.data.format!r} is not one of {DATA_FORMATS}")
        ec = self.data.build_embedded_chat
        if ec is not None:
            if self.data.format != "chat":
                raise ConfigError("data.build_embedded_chat: builds chat data; set data.format: chat")
            if not self.data.manifest or os.path.basename(self.data.manifest) != "manifest.json":
                raise ConfigError("data.manifest: data.build_embedded_chat writes <dir>/manifest.json; name the "
                                  "manifest path it should create (e.g. runs/sft/chat_tok/manifest.json)")
            pos("data.build_embedded_chat.general", ec.general)
            pos("data.build_embedded_chat.math", ec.math)
            pos("data.build_embedded_chat.workers", ec.workers)
        if self.data.format == "chat":
            if not self.data.manifest:
                raise ConfigError("data.manifest: chat data (data.format: chat) is read from the manifest of "
                                  "megamoe-preprocess --format chat --per-domain")
            if self.data.dynamic:
                raise ConfigError("data.dynamic: dynamic domain weights are for text data (data.format: text)")
        if self.data.prefixes is not None and not isinstance(self.data.prefixes, dict):
            raise ConfigError("data.prefixes: expected a mapping domain -> dataset prefix")
        if self.data.prefixes and self.data.manifest:
            raise ConfigError("data.manifest: give either data.manifest or data.prefixes, not both")
        if self.data.manifest and not os.path.isfile(self.data.manifest) and ec is None:
            raise ConfigError(f"data.manifest: {self.data.manifest} does not exist "
                              "(megamoe-preprocess --per-domain writes it)")
        if self.data.prefixes is not None and not self.data.prefixes:
            raise ConfigError("data.prefixes: empty; give at least one domain")
        if isinstance(self.data.weights, dict) and self.data.prefixes is not None:
            missing = sorted(set(self.data.prefixes) - set(self.data.weights))
            if missing:
                raise ConfigError(f"data.weights: no weight for domain {missing[0]!r}")
        if self.data.dynamic and not self.data.reference_losses:
            raise ConfigError("data.reference_losses: dynamic domain weights need a reference loss per domain")
        _validate_optim(self.optim, "optim")
        t = self.train
        pos("train.steps", t.steps)
        pos("train.global_batch_tokens", t.global_batch_tokens)
        pos("train.micro_batch_size", t.micro_batch_size)
        pos("train.max_consecutive_nonfinite", t.max_consecutive_nonfinite)
        if t.max_minutes is not None:
            pos("train.max_minutes", t.max_minutes)
        if t.precision not in PRECISIONS:
            raise ConfigError(f"train.precision: {t.precision!r} is not one of {PRECISIONS}")
        per_micro = t.micro_batch_size * self.data.seq_len
        if t.global_batch_tokens % per_micro:
            raise ConfigError(f"train.global_batch_tokens: {t.global_batch_tokens} is not a multiple of "
                              f"train.micro_batch_size * data.seq_len = {per_micro}")
        pos("eval.interval", self.eval.interval, allow_zero=True)
        pos("eval.batches", self.eval.batches)
        pos("eval.batch_size", self.eval.batch_size)
        pos("eval.sample_tokens", self.eval.sample_tokens, allow_zero=True)
        pos("eval.samples_per_domain", self.eval.samples_per_domain, allow_zero=True)
        pos("checkpoint.interval", self.checkpoint.interval, allow_zero=True)
        pos("checkpoint.keep_last", self.checkpoint.keep_last)
        pos("log.interval", self.log.interval)
        pos("log.tgs_window", self.log.tgs_window)
        pos("log.token_loss_interval", self.log.token_loss_interval, allow_zero=True)
        if self.log.wandb is not None and self.log.wandb.mode not in WANDB_MODES:
            raise ConfigError(f"log.wandb.mode: {self.log.wandb.mode!r} is not one of {WANDB_MODES}")
        if self.log.peak_flops is not None:
            pos("log.peak_flops", self.log.peak_flops)
        self._validate_distill()
        self.parallel.validate(self.model)
        self.stage_plan()
        self.validate_stage_data()
        return self

    def _validate_distill(self) -> None:
        d = self.distill
        if not 0 <= d.weight <= 1:
            raise ConfigError(f"distill.weight: {d.weight} must be in [0, 1] (the KD share of the loss)")
        if not isinstance(d.temperature, (int, float)) or d.temperature <= 0:
            raise ConfigError(f"distill.temperature: {d.temperature!r} must be > 0")
        if d.teacher is None:
            return
        if not os.path.isdir(d.teacher):
            raise ConfigError(f"distill.teacher: {d.teacher} is not a directory (a Hugging Face model or a megamoe "
                              "shard directory)")
        p = self.parallel
        for name, v in (("tp", p.tp), ("pp", p.pp), ("cp", p.cp)):
            if v > 1:
                raise ConfigError(f"distill.teacher: distillation needs the student's logits whole on one rank; "
                                  f"parallel.{name} is {v} (data and expert parallelism work)")

    def micro_batches_per_step(self, dp_size: int) -> int:
        """Gradient-accumulation steps on each rank for the global batch in tokens."""
        per_step = self.train.micro_batch_size * self.data.seq_len * dp_size
        if self.train.global_batch_tokens % per_step:
            raise ConfigError(f"train.global_batch_tokens: {self.train.global_batch_tokens} is not a multiple of "
                              f"micro_batch_size * seq_len * data-parallel size = {per_step}")
        return self.train.global_batch_tokens // per_step


def _validate_optim(o: OptimConfig, where: str) -> None:
    def pos(name, v, allow_zero=False):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or (v == 0 and not allow_zero):
            raise ConfigError(f"{where}.{name}: {v!r} must be {'>= 0' if allow_zero else '> 0'}")
    pos("lr", o.lr)
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"{where}.min_lr_ratio: {o.min_lr_ratio} must be in [0, 1]")
    pos("warmup_steps", o.warmup_steps, allow_zero=True)
    if o.warmup_ratio is not None and not 0 <= o.warmup_ratio < 1:
        raise ConfigError(f"{where}.warmup_ratio: {o.warmup_ratio} must be in [0, 1)")
    if o.decay_style not in DECAY_STYLES:
        raise ConfigError(f"{where}.decay_style: {o.decay_style!r} is not one of {DECAY_STYLES}")
    pos("weight_decay", o.weight_decay, allow_zero=True)
    for n in ("beta1", "beta2"):
        if not 0 <= getattr(o, n) < 1:
            raise ConfigError(f"{where}.{n}: {getattr(o, n)} must be in [0, 1)")
    pos("eps", o.eps)
    pos("clip_grad", o.clip_grad, allow_zero=True)


def bundled_configs_dir() -> str | None:
    """The directory of the configs shipped with megamoe: configs/ of a checkout, or megamoe/configs/ of an
    installed wheel (package data). None when neither exists."""
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))        # .../megamoe
    for d in (os.path.join(pkg, "configs"), os.path.join(os.path.dirname(pkg), "configs")):
        if os.path.isdir(d) and any(f.endswith(".yaml") for f in os.listdir(d)):
            return d
    return None


def resolve_config_path(path: str) -> str:
    """`path` itself when it exists; else a bundled config of that name (`quickstart`, `quickstart.yaml`,
    `configs/quickstart.yaml`), so that `megamoe-train --config quickstart.yaml` works from an installed wheel."""
    if os.path.exists(path):
        return path
    d = bundled_configs_dir()
    name = os.path.basename(path)
    for cand in (name, name + ".yaml"):
        if d and (os.path.dirname(path) in ("", "configs")) and os.path.isfile(os.path.join(d, cand)):
            return os.path.join(d, cand)
    return path    # read_yaml names the missing file


def load_train_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """The TrainConfig of a YAML file (megamoe.config.read_yaml; a bundled config by name, resolve_config_path) with
    `a.b=value` overrides applied."""
    if path:
        path = resolve_config_path(path)
    d = apply_overrides(read_yaml(path) if path else {}, overrides or [])
    try:
        return TrainConfig.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def save_train_config(cfg: TrainConfig, path: str) -> None:
    """Write the config in force as YAML, atomically (temp file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
