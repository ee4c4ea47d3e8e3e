"""Knowledge distillation from a teacher (`distill:` in the config): the converted MoE learns the dense model's whole
next-token distribution instead of one token per position.

    teacher = Teacher.load(cfg.distill, device)          # the dense source (HF LLaMA dir) or any model load_model reads
    t_logits = teacher.logits(inputs)                    # [B, S, V], no grad
    kd = kd_loss(student_logits, t_logits, weights, T)   # sum_t w_t * T^2 * KL(p_teacher,t || p_student,t)
    loss = (1 - alpha) * lm_loss + alpha * kd + aux_loss

Why: a converted MoE keeps a fraction of each FFN per token, and continual pre-training has to re-learn what the dense
model computed. The dense model is at hand (it is the conversion's source) and its soft targets carry far more per
token than the one-hot next token (Hinton et al. 2015; the pruning-recovery recipes of Minitron and Sheared-LLaMA
distil from, or measure against, the source model). docs/training.md (Distillation) has the quickstart's measurement.

The weights w_t are the cross entropy's own (trainer.py): 1 / (B * S) per token for text, mask / N for chat data
(the response-only loss), so lm_loss and kd are means over the same tokens and alpha mixes like with like.
T^2 keeps the gradient's scale independent of the temperature (Hinton et al.).

Limits (refused by TrainConfig.validate, before any work): tensor, pipeline and context parallelism (the student's
logits must be whole on one rank); data and expert parallelism work (every rank runs its own copy of the teacher on its
own batch). The teacher must have the student's vocabulary. Cost: one teacher forward per micro-batch (no backward),
and the student's logits are materialised (the fused CPU cross entropy is not used).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from megamoe.errors import ConfigError

log = logging.getLogger("megamoe.train")

__all__ = ["Teacher", "kd_loss", "kd_loss_reference", "mixed_loss"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """sum over positions t of weights[t] * T^2 * KL(softmax(teacher[t] / T) || softmax(student[t] / T)).

    student_logits, teacher_logits: [B, S, V]; weights: [B, S] (the cross entropy's per-token weights). Computed in
    fp32; the gradient flows into student_logits only."""
    T = float(temperature)
    log_q = F.log_softmax(student_logits.float() / T, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().float() / T, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)     # [B, S]
    return (T * T) * (kl * weights.to(kl.dtype)).sum()


def mixed_loss(lm, kd, aux, weight: float):
    """(1 - weight) * lm + weight * kd + aux: the loss a distilling step follows (tensors or floats)."""
    return (1.0 - weight) * lm + weight * kd + aux


def kd_loss_reference(student_logits, teacher_logits, weights, temperature=1.0):
    """The same quantity written out term by term (tests): sum_t w_t T^2 sum_v p_v (log p_v - log q_v)."""
    T = float(temperature)
    p = torch.softmax(teacher_logits.double() / T, -1)
    q = torch.softmax(student_logits.double() / T, -1)
    return (T * T) * ((p * (p.log() - q.log())).sum(-1) * weights.double()).sum()


class Teacher:
    """A frozen model whose logits the student learns (eval mode, no grad, the student's device)."""

    def __init__(self, model: torch.nn.Module, path: str):
        self.model, self.path = model, path
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @classmethod
    def load(cls, dcfg, vocab_size: int, device, dtype: str | None = None) -> "Teacher":
        """The teacher of `distill.teacher`: any directory megamoe.eval.load.load_model reads (a dense HF LLaMA, our
        shards, Mixtral, llama-moe v1/v2), in `dtype` (default: the student's params dtype)."""
        from megamoe.eval.load import load_model
        path = dcfg.teacher            # a directory: TrainConfig.validate checked it
        # building it draws init weights: the run's RNG streams (router noise, dropout) stay as they were
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda):
            lm = load_model(path, dtype=dtype, device=device)
        if lm.cfg.vocab_size != vocab_size:
            raise ConfigError(f"distill.teacher: {path} has a vocabulary of {lm.cfg.vocab_size} tokens, the student "
                              f"{vocab_size}; distillation compares the two distributions token by token")
        log.info("distillation: teacher %s (%s, %.1fM parameters), weight %g, temperature %g", path, lm.layout,
                 sum(p.numel() for p in lm.model.parameters()) / 1e6, dcfg.weight, dcfg.temperature)
        return cls(lm.model, path)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, position_ids=None, segment_ids=None) -> torch.Tensor:
        return self.model(input_ids, return_logits=True, position_ids=position_ids, segment_ids=segment_ids).logits
