"""Model wrapping and optimizer: megatron-core DDP + `get_megatron_optimizer` (AdamW) for our LlamaMoEModel.

    ddp = wrap_model(model, model_cfg, pcfg, precision)          # megatron.core.distributed.DistributedDataParallel
    opt = build_optimizer(ddp, optim_cfg, pcfg, precision)        # megatron-core optimizer (distributed or not)
    chunks = wrap_model([stage0, stage1], ...)                   # pipeline: one DDP per model chunk (virtual stage)

Gradients accumulate in DDP's fp32 main-grad buffers over micro-batches; `finalize_model_grads([ddp])` all-reduces
them over the data-parallel group (experts over the expert-data-parallel group, sequence-parallel norm weights over
TP). Weight decay skips 1-D parameters and biases (megatron-core's standard override: wd_mult = 0; applied by
megamoe.training.schedule.LRSchedule). On a CPU, megatron's optimizer/DDP code runs inside
`megamoe.compat.cpu.cuda_to_cpu()` (its `device='cuda'` literals become CPU).
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.transformer import TransformerConfig

from megamoe.compat.cpu import cuda_to_cpu
from megamoe.compat.megatron import empty_optimizer_fix, single_rank_ddp

__all__ = ["transformer_config", "wrap_model", "build_optimizer", "unwrap"]


def unwrap(model):
    """The model inside megatron's / torch's DDP wrappers; a list of pipeline chunks -> the list of their models."""
    if isinstance(model, (list, tuple)):
        return [unwrap(m) for m in model]
    while hasattr(model, "module"):
        model = model.module
    return model


def transformer_config(model_cfg, pcfg, precision: str):
    """The megatron TransformerConfig that DDP and the optimizer read (layout, dtypes); the model itself is ours."""
    bf16 = precision == "bf16"
    return TransformerConfig(
        num_layers=model_cfg.num_layers, hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_heads, num_query_groups=model_cfg.kv_heads,
        ffn_hidden_size=model_cfg.intermediate_size,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        expert_model_parallel_size=pcfg.ep, expert_tensor_parallel_size=pcfg.etp,
        sequence_parallel=pcfg.sequence_parallel,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=pcfg.vpp if pcfg.vpp > 1 else None,
        # pipeline p2p as separate isend/irecv ordered by stage parity: megatron's batched ops post both directions
        # to the same peer at pp = 2 (interleaved schedule), where the activation and the gradient then cross
        batch_p2p_comm=False,
        use_cpu_initialization=True, gradient_accumulation_fusion=False,
        # megatron validates expert parallelism against these (the experts themselves are ours)
        num_moe_experts=model_cfg.moe.num_experts if model_cfg.moe is not None else None, add_bias_linear=False,
    )


def wrap_model(model, model_cfg, pcfg, precision: str):
    """megatron DDP around our model (fp32 main-grad buffers); at one data-parallel rank without the self-copies
    (compat/megatron.py: single_rank_ddp). A list of pipeline model chunks gives a list of DDPs sharing one
    TransformerConfig (bucketing off after the first chunk, as megatron's get_model)."""
    tcfg = transformer_config(model_cfg, pcfg, precision)
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    out = []
    for i, m in enumerate(chunks):
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                use_distributed_optimizer=pcfg.distributed_optimizer,
                                                check_for_nan_in_grad=False)
        with cuda_to_cpu():
            ddp = DistributedDataParallel(config=tcfg, ddp_config=ddp_cfg, module=m, disable_bucketing=i > 0)
        if ps.get_data_parallel_world_size(with_context_parallel=True) == 1 \
                and ps.get_expert_data_parallel_world_size() == 1:
            single_rank_ddp(ddp, pcfg.distributed_optimizer)
        out.append(ddp)
    return out if isinstance(model, (list, tuple)) else out[0]


def build_optimizer(ddp_model, optim_cfg, pcfg, precision: str):
    """megatron-core's optimizer (AdamW, distributed when pcfg.distributed_optimizer) on torch's fused AdamW kernel.
    Its checkpoints are written in the fully reshardable format (megamoe/training/resharding.py)."""
    ocfg = OptimizerConfig(
        optimizer="adam", lr=optim_cfg.lr, min_lr=optim_cfg.lr * optim_cfg.min_lr_ratio,
        weight_decay=optim_cfg.weight_decay, adam_beta1=optim_cfg.beta1, adam_beta2=optim_cfg.beta2,
        adam_eps=optim_cfg.eps, clip_grad=optim_cfg.clip_grad, bf16=precision == "bf16",
        params_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
        use_distributed_optimizer=pcfg.distributed_optimizer,
    )
    with cuda_to_cpu():
        opt = get_megatron_optimizer(ocfg, list(ddp_model) if isinstance(ddp_model, (list, tuple)) else [ddp_model])
    empty_optimizer_fix(opt)   # pipeline: a stage without experts has an empty expert optimizer
    _use_fast_adam(opt)
    return opt


def _use_fast_adam(opt):
    """megatron builds torch.optim.AdamW (no TE/apex) with neither `foreach` nor `fused`; on a CPU torch then
    defaults to the per-parameter Python loop. The same update runs as torch's fused kernel (`_fused_adamw_`: one
    pass over each tensor; on CPU and CUDA), else as the multi-tensor (foreach) implementation. Groups whose
    options were set already (e.g. by a loaded checkpoint) are left as they are."""
    try:  # a private helper of torch.optim; without it, foreach everywhere
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        fused_ok = set(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - other torch releases
        fused_ok = set()
    for o in getattr(opt, "chained_optimizers", [opt]):
        inner = getattr(o, "optimizer", None)
        if not (isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))
                and type(inner).__module__.startswith("torch.optim")):
            continue
        for g in inner.param_groups:
            if g.get("foreach") is not None or g.get("fused") or g.get("differentiable") or g.get("capturable"):
                continue
            ps = g["params"]
            if ps and all(p.device.type in fused_ok and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                          for p in ps):
                g["fused"], g["foreach"] = True, False
            else:
                g["foreach"] = True


def guarded_step(optimizer) -> tuple[bool, float]:
    """megatron's optimizer.step() split open so that a non-finite gradient norm skips the update:
    prepare grads -> global grad norm -> (finite?) clip to optimizer.config.clip_grad -> update.
    Returns (updated, grad_norm before clipping)."""
    if optimizer.prepare_grads():          # found inf (dynamic loss scaling)
        return False, float("nan")
    gn = optimizer.get_grad_norm()
    gn = float(gn) if gn is not None else 0.0
    if not math.isfinite(gn):
        return False, gn
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(o, "is_stub_optimizer", False):
            continue
        params = o.get_parameters()
        if params and o.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(params, max_norm=o.config.clip_grad, total_norm=gn)
    return bool(optimizer.step_with_ready_grads()), gn
