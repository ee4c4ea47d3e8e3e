"""Training metrics: FLOPs per token on ACTIVATED parameters, TGS over a recent window, MFU, router statistics.

FLOPs per trained token (model FLOPs: forward + backward = 3x forward; activation recompute is not counted):

    flops_per_token = 6 * N_active_matmul  +  attention
    N_active_matmul = activated parameters (ModelConfig.param_counts()["active"]: attention, the router, the k
                      experts a token is sent to -- the k largest when sizes differ -- the shared expert, lm_head)
                      minus the parameters that are not a matmul per token: the input embedding lookup when the
                      embeddings are untied (tied: the table is counted once, as lm_head) and the RMSNorm weights.
    attention       = 12 * L * S * n_heads * head_dim * c
                      per layer and token, Q K^T and A V are 2 * S * n_heads * head_dim FLOPs each in the forward;
                      x3 for forward + backward gives 12 * S * n_heads * head_dim. c = 1/2 for causal attention
                      (half the (query, key) pairs are masked, and flash/SDPA kernels skip them); c = 1 reproduces
                      the Megatron-LM / PaLM convention 12*L*H*S.

    TGS = tokens / (world_size * seconds), summed over the last `window` training steps (timed around the step
          only: evaluation and checkpoint saves are not in the window, and a resume starts a fresh window).
    MFU = TGS * flops_per_token / peak_flops_per_device

llama-moe v1 computed MFU = 6 * (ALL trainable params) * TGS / 312e12 with TGS averaged since the start: that
counts the experts a token does not visit, ignores attention, and drifts with eval/checkpoint time; see
docs/training.md.
"""

from __future__ import annotations

import collections
import time

import torch
import torch.distributed as dist

__all__ = ["flops_per_token", "matmul_active_params", "peak_flops_for_device", "ThroughputMeter", "mfu",
           "RouterStatsAccumulator"]

# Dense peak FLOP/s per device. bf16/fp16 tensor-core numbers; fp32 runs on TF32 tensor cores.
_PEAKS = (  # (substring of torch.cuda.get_device_name(), bf16 peak, tf32 peak)
    ("H200", 989.4e12, 494.7e12),
    ("H100", 989.4e12, 494.7e12),   # SXM5; anchors-perf.md §5
    ("H800", 989.4e12, 494.7e12),
    ("A100", 312e12, 156e12),
    ("A800", 312e12, 156e12),
    ("L40S", 362.05e12, 183e12),
    ("A10G", 70e12, 35e12),
)


def matmul_active_params(model_cfg) -> int:
    """Activated parameters that are a matmul for each token (see the module docstring)."""
    c = model_cfg.param_counts()["active"]
    H = model_cfg.hidden_size
    c -= H * (2 * model_cfg.num_layers + 1)                    # RMSNorm weights
    if not model_cfg.tie_word_embeddings:
        c -= model_cfg.vocab_size * H                          # input embedding lookup
    return int(c)


def flops_per_token(model_cfg, seq_len: int, causal_half: bool = True) -> float:
    attn = 12 * model_cfg.num_layers * seq_len * model_cfg.num_heads * model_cfg.dim_head
    if causal_half:
        attn /= 2
    return 6.0 * matmul_active_params(model_cfg) + attn


def peak_flops_for_device(device: torch.device | str | None = None, dtype: str = "bf16") -> float | None:
    """Peak dense FLOP/s of the current GPU by name; None on CPU or an unknown device (MFU is then not reported)."""
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(dev)
    for key, bf16, tf32 in _PEAKS:
        if key in name:
            return bf16 if dtype in ("bf16", "fp16") else tf32
    return None


def mfu(tgs: float, fpt: float, peak: float | None) -> float | None:
    return None if not peak else tgs * fpt / peak


class ThroughputMeter:
    """Tokens per device per second over the last `window` steps (not since the start of the run)."""

    def __init__(self, window: int = 20, world_size: int = 1):
        self.window, self.world_size = int(window), int(world_size)
        self._steps = collections.deque(maxlen=self.window)
        self._t0 = None

    def start(self):
        self._t0 = time.perf_counter()

    def stop(self, tokens: int) -> float:
        dt = time.perf_counter() - self._t0
        self.record(tokens, dt)
        return dt

    def record(self, tokens: int, seconds: float):
        """`tokens`: tokens of the global batch of one step (all ranks); `seconds`: that step's wall time."""
        self._steps.append((int(tokens), float(seconds)))

    @property
    def tokens_per_second(self) -> float:
        t = sum(s for _, s in self._steps)
        return sum(n for n, _ in self._steps) / t if t > 0 else 0.0

    @property
    def tgs(self) -> float:
        return self.tokens_per_second / self.world_size

    @property
    def step_seconds(self) -> float:
        return sum(s for _, s in self._steps) / len(self._steps) if self._steps else 0.0


class RouterStatsAccumulator:
    """Sums router statistics over micro-batches (and, with `reduce`, over data-parallel ranks).

    Per MoE layer: tokens_per_expert (routed (token, slot) assignments, before dropping), importance (sum of the
    combine probabilities), load (the router's load estimate), dropped tokens, balance and z losses (averaged over
    the micro-batches added)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.n = 0
        self.tpe = self.imp = self.load = None
        self.dropped = self.balance = self.zloss = None

    def add(self, stats_list):
        if not stats_list:
            return
        tpe = torch.stack([s.tokens_per_expert.detach().float().cpu() for s in stats_list])
        imp = torch.stack([s.importance.detach().float().cpu() for s in stats_list])
        load = torch.stack([s.load.detach().float().cpu() for s in stats_list])
        dropped = torch.tensor([float(s.num_dropped.detach()) if torch.is_tensor(s.num_dropped) else float(s.num_dropped)
                                for s in stats_list])
        bal = torch.tensor([float(s.balance_loss.detach()) if torch.is_tensor(s.balance_loss) else float(s.balance_loss)
                            for s in stats_list])
        z = torch.tensor([float(s.z_loss.detach()) if torch.is_tensor(s.z_loss) else float(s.z_loss or 0.0)
                          for s in stats_list])
        if self.n == 0:
            self.tpe, self.imp, self.load, self.dropped, self.balance, self.zloss = tpe, imp, load, dropped, bal, z
        else:
            self.tpe += tpe; self.imp += imp; self.load += load
            self.dropped += dropped; self.balance += bal; self.zloss += z
        self.n += 1

    def reduce(self, group=None):
        """All-reduce (sum) over `group` (the data-parallel group), so the stats cover the whole global batch."""
        if self.n == 0 or not dist.is_initialized() or dist.get_world_size(group) == 1:
            return
        flat = torch.cat([self.tpe.flatten(), self.imp.flatten(), self.load.flatten(), self.dropped, self.balance,
                          self.zloss, torch.tensor([float(self.n)])])
        dev = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        flat = flat.to(dev)
        dist.all_reduce(flat, group=group)
        flat = flat.cpu()
        L, E = self.tpe.shape
        sizes = [L * E, L * E, L * E, L, L, L, 1]
        parts = list(flat.split(sizes))
        self.tpe, self.imp, self.load = (p.view(L, E) for p in parts[:3])
        self.dropped, self.balance, self.zloss = parts[3:6]
        self.n = int(parts[6].item())

    def summary(self) -> dict | None:
        """Fractions per layer (rows sum to 1), dropped tokens per layer, mean balance / z losses."""
        if self.n == 0:
            return None
        def frac(x):
            return (x / x.sum(-1, keepdim=True).clamp_min(1e-12)).tolist()
        return {"expert_load": frac(self.tpe), "expert_importance": frac(self.imp),
                "load_estimate": frac(self.load), "tokens_per_expert": self.tpe.tolist(),
                "dropped_tokens": self.dropped.tolist(), "dropped_total": float(self.dropped.sum()),
                "balance_loss": float(self.balance.sum() / self.n),
                "z_loss": float(self.zloss.sum() / self.n)}
