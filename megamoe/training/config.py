"""The training configuration: one object, loaded from YAML, overridable from the command line.

    cfg = load_train_config("run.yaml", overrides=["optim.lr=1e-4", "train.steps=200"])
    cfg.validate()                       # raises ConfigError naming the field, e.g. "train.steps: 0 must be >= 1"
    save_train_config(cfg, "ckpt/config.yaml")   # the config in force, written atomically

Sections (all optional; see configs/*.yaml and docs/training.md):
  model       ModelConfig (megamoe.config); None: taken from `init` (our shard manifest or the HF config.json)
  init        where the weights come from: random | megamoe (our shards) | hf (a dense HF LLaMA directory)
  parallel    ParallelConfig (tp, ep, etp, sequence_parallel, distributed_optimizer)
  data        the domain mixture (dataset prefixes per domain, weights or a preset, sequence length, dynamic weights)
  optim       AdamW + warmup/cosine schedule + clipping (the llama-moe CPT recipe by default)
  train       steps, global batch in tokens, micro-batch size, precision, activation checkpointing, NaN guard
  eval        validation every N steps (loss and perplexity per domain)
  checkpoint  directory, interval, keep-last-K, resume
  log         console / JSONL / TensorBoard, TGS window, device peak FLOP/s for MFU
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch
import yaml

from megamoe.config import ModelConfig, ParallelConfig, apply_overrides, from_dict, read_yaml
from megamoe.errors import ConfigError
from megamoe.fileio import atomic_write_text

__all__ = ["TrainConfig", "InitConfig", "DataConfig", "OptimConfig", "LoopConfig", "EvalConfig",
           "CheckpointConfig", "LogConfig", "load_train_config", "save_train_config"]

INIT_SOURCES = ("random", "megamoe", "hf")
DECAY_STYLES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
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
class DataConfig:
    """The multi-domain corpus (megamoe.data.DomainMixture).

    `prefixes`: domain -> megatron dataset prefix (path without .bin/.idx) of the training split.
    `valid_prefixes`: domain -> prefix of the validation split (None: no evaluation).
    `weights`: domain -> weight, or a preset name understood by megamoe.data (e.g. "uniform", "sheared_llama").
    `manifest`: instead of prefixes, the manifest.json of `tools/preprocess_data.py --per-domain` (train and
    held-out valid prefixes of every domain).
    `dynamic`: update the domain weights at every evaluation (Sheared-LLaMA rule; needs `reference_losses`:
    a dict domain -> loss, or "llama2_7b")."""
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
    decay_steps: int | None = None     # None: train.steps
    decay_style: str = "cosine"        # cosine | linear | constant
    weight_decay: float = 0.1          # not applied to norms and biases (1-D parameters)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0             # 0: no clipping


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


@dataclass
class EvalConfig:
    interval: int = 0                  # steps between evaluations; 0: only at the end (if at_end)
    batches: int = 4                   # validation batches per domain
    batch_size: int = 4
    at_end: bool = True
    at_start: bool = False             # evaluate before the first step (not on resume): the "before" numbers
    plots: bool = True                 # routing heat-maps at each evaluation (matplotlib)


@dataclass
class CheckpointConfig:
    dir: str | None = None             # None: <out_dir>/checkpoints
    interval: int = 0                  # steps between checkpoints; 0: only at exit
    keep_last: int = 3
    save_at_end: bool = True
    resume: bool = False               # resume from <dir>/latest (the --resume flag)


@dataclass
class LogConfig:
    interval: int = 1
    tensorboard: bool = True           # when the tensorboard package is importable
    tgs_window: int = 20               # steps in the TGS / MFU window
    peak_flops: float | None = None    # per device; None: by device name (H100/H200 989.4e12, A100 312e12 bf16)
    progress: bool = True              # console progress bar


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

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.out_dir, "checkpoints")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return from_dict(cls, d)

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
        if self.data.prefixes is not None and not isinstance(self.data.prefixes, dict):
            raise ConfigError("data.prefixes: expected a mapping domain -> dataset prefix")
        if self.data.prefixes and self.data.manifest:
            raise ConfigError("data.manifest: give either data.manifest or data.prefixes, not both")
        if self.data.manifest and not os.path.isfile(self.data.manifest):
            raise ConfigError(f"data.manifest: {self.data.manifest} does not exist "
                              "(tools/preprocess_data.py --per-domain writes it)")
        if self.data.prefixes is not None and not self.data.prefixes:
            raise ConfigError("data.prefixes: empty; give at least one domain")
        if isinstance(self.data.weights, dict) and self.data.prefixes is not None:
            missing = sorted(set(self.data.prefixes) - set(self.data.weights))
            if missing:
                raise ConfigError(f"data.weights: no weight for domain {missing[0]!r}")
        if self.data.dynamic and not self.data.reference_losses:
            raise ConfigError("data.reference_losses: dynamic domain weights need a reference loss per domain")
        o = self.optim
        pos("optim.lr", o.lr)
        if not 0 <= o.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio: {o.min_lr_ratio} must be in [0, 1]")
        pos("optim.warmup_steps", o.warmup_steps, allow_zero=True)
        if o.decay_style not in DECAY_STYLES:
            raise ConfigError(f"optim.decay_style: {o.decay_style!r} is not one of {DECAY_STYLES}")
        pos("optim.weight_decay", o.weight_decay, allow_zero=True)
        for n in ("beta1", "beta2"):
            if not 0 <= getattr(o, n) < 1:
                raise ConfigError(f"optim.{n}: {getattr(o, n)} must be in [0, 1)")
        pos("optim.eps", o.eps)
        pos("optim.clip_grad", o.clip_grad, allow_zero=True)
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
        pos("checkpoint.interval", self.checkpoint.interval, allow_zero=True)
        pos("checkpoint.keep_last", self.checkpoint.keep_last)
        pos("log.interval", self.log.interval)
        pos("log.tgs_window", self.log.tgs_window)
        if self.log.peak_flops is not None:
            pos("log.peak_flops", self.log.peak_flops)
        self.parallel.validate(self.model)
        return self

    def micro_batches_per_step(self, dp_size: int) -> int:
        """Gradient-accumulation steps on each rank for the global batch in tokens."""
        per_step = self.train.micro_batch_size * self.data.seq_len * dp_size
        if self.train.global_batch_tokens % per_step:
            raise ConfigError(f"train.global_batch_tokens: {self.train.global_batch_tokens} is not a multiple of "
                              f"micro_batch_size * seq_len * data-parallel size = {per_step}")
        return self.train.global_batch_tokens // per_step


def load_train_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """The TrainConfig of a YAML file (megamoe.config.read_yaml) with `a.b=value` overrides applied."""
    d = apply_overrides(read_yaml(path) if path else {}, overrides or [])
    try:
        return TrainConfig.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def save_train_config(cfg: TrainConfig, path: str) -> None:
    """Write the config in force as YAML, atomically (temp file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
