"""Worker for tests/test_parallel.py: the same tiny LLaMA-MoE trained single-process (the reference) and under
TP / SP / EP / expert-TP / DP layouts launched by torchrun (gloo), with every check inside one launch.

    python parallel_worker.py reference OUT                    # world of one: weights, batches, losses, grads
    torchrun --nproc_per_node=2 parallel_worker.py layouts OUT dp2,tp2,tp2sp,...
    torchrun --nproc_per_node=4 parallel_worker.py reshard OUT  # save TP2xEP2, load EP4 and TP1xEP1

Every failed check prints "FAIL ..." and the process exits 1; every passed one prints "OK ...".
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

warnings.filterwarnings("ignore")
logging.basicConfig(level=logging.WARNING)

import torch  # noqa: E402

STEPS = 4
GLOBAL_BATCH, SEQ = 4, 16
LR, CLIP = 1e-2, 0.05          # a small clip makes every update depend on the global grad norm (experts included)
TOL = dict(rtol=2e-4, atol=2e-6)

LAYOUTS = {   # name: (tp, ep, etp, sequence_parallel, distributed_optimizer)
    "dp2": (1, 1, 1, False, True), "tp2": (2, 1, 1, False, False), "tp2sp": (2, 1, 1, True, False),
    "ep2": (1, 2, 1, False, True), "tp2ep2sp": (2, 2, 1, True, False), "tp2ep2": (2, 2, 1, False, False),
    "tp2etp2sp": (2, 1, 2, True, False), "ep2etp2": (1, 2, 2, False, True),     # 4 ranks
    "tp2ep2sp_dp2": (2, 2, 1, True, True), "ep4": (1, 4, 1, False, True), "dp4": (1, 1, 1, False, True),
    "ep2_dp2": (1, 2, 1, False, True), "tp2ep2sp_do": (2, 2, 1, True, True),
}


def model_configs():
    from megamoe.config import ModelConfig, MoEConfig
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                max_position_embeddings=64, init_std=0.05)
    return {
        # every layer MoE, Mixtral router with z-loss, linear gate, equal experts
        "mixtral": ModelConfig(**base, moe=MoEConfig(num_experts=4, top_k=2, router="mixtral", gate_network="linear",
                                                     balance_loss_weight=0.1, z_loss_weight=1e-3, gate_init_std=0.3)),
        # llama-moe v1: noisy top-k (noise off: deterministic) cv^2 loss, MLP gate, uneven experts, a shared
        # residual expert, a dense first layer, tied embeddings
        "llamamoe": ModelConfig(**base, tie_word_embeddings=True, moe=MoEConfig(
            num_experts=4, top_k=2, router="topk_noisy", gate_network="mlp", noise=False, balance_loss_weight=0.1,
            expert_sizes=[8, 16, 8, 16], residual_size=16, moe_layers=[1], gate_init_std=0.3)),
    }


def _patch_transformer_config():
    """megamoe/training/optim.transformer_config builds megatron's TransformerConfig without num_moe_experts, which
    megatron refuses when expert_model_parallel_size > 1. Until it passes `num_moe_experts`, add it here (DDP and the
    optimizer only read the layout from this config; the groups come from parallel_state)."""
    from megamoe.training import optim
    orig = optim.transformer_config
    if getattr(orig, "_megamoe_test_patch", False):
        return

    def tc(model_cfg, pcfg, precision):
        try:
            return orig(model_cfg, pcfg, precision)
        except ValueError as e:
            if "num_moe_experts" not in str(e):
                raise
        import dataclasses
        t = orig(model_cfg, dataclasses.replace(pcfg, ep=1, etp=1), precision)
        t.expert_model_parallel_size, t.expert_tensor_parallel_size = pcfg.ep, pcfg.etp
        t.num_moe_experts = model_cfg.moe.num_experts
        return t
    tc._megamoe_test_patch = True
    optim.transformer_config = tc


def optim_cfg():
    from megamoe.training.config import OptimConfig
    return OptimConfig(lr=LR, warmup_steps=0, decay_style="constant", weight_decay=0.1, clip_grad=CLIP)


def build(cfg, pcfg, full_sd=None):
    """Model (full weights sliced to this rank), megatron DDP, megatron optimizer."""
    from megamoe.model import LlamaMoEModel
    from megamoe.training.resharding import load_full_state_dict
    from megamoe.training.optim import build_optimizer, wrap_model
    torch.manual_seed(0)
    model = LlamaMoEModel(cfg)
    if full_sd is not None:
        load_full_state_dict(model, full_sd)
    ddp = wrap_model(model, cfg, pcfg, "fp32")
    opt = build_optimizer(ddp, optim_cfg(), pcfg, "fp32")
    for g in opt.param_groups:
        g["lr"] = LR
    return model, ddp, opt


def local_batch(batch):
    """This DP rank's rows of the global batch."""
    from megatron.core import parallel_state as ps
    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    n = batch.shape[0] // dp
    return batch[r * n:(r + 1) * n]


def train_step(ddp, opt, batch, collect_grads=False):
    """One step; returns (global loss, lm, aux, grad norm, {name: main_grad} or None)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    from megamoe.compat.cpu import cuda_to_cpu
    from megamoe.moe.experts import per_expert_items
    from megamoe.training.optim import guarded_step
    ddp.zero_grad_buffer()
    opt.zero_grad()
    b = local_batch(batch)
    out = ddp(b[:, :-1], labels=b[:, 1:], return_logits=False)
    out.loss.backward()
    with cuda_to_cpu():
        finalize_model_grads([ddp])
        grads = None
        if collect_grads:
            # stacked expert gradients as per-expert views: comparable across EP/ETP layouts by name
            grads = per_expert_items(ddp.module, {n: p.main_grad.detach().clone()
                                                  for n, p in ddp.module.named_parameters()})
        ok, gn = guarded_step(opt)
    assert ok
    t = torch.tensor([float(out.loss), float(out.lm_loss), float(out.aux_loss)], dtype=torch.float64)
    if dist.get_world_size() > 1:   # mean over DP (values are identical over TP/EP: checked below)
        dist.all_reduce(t, group=ps.get_data_parallel_group())
        t /= ps.get_data_parallel_world_size()
    return float(t[0]), float(t[1]), float(t[2]), gn, grads


# ---------------------------------------------------------------------------------------------------------------

def reference(out_dir):
    from megamoe.config import ParallelConfig
    from megamoe.parallel import initialize
    initialize(ParallelConfig())
    torch.manual_seed(1234)
    res = {}
    for name, cfg in model_configs().items():
        torch.manual_seed(7)
        batches = [torch.randint(0, cfg.vocab_size, (GLOBAL_BATCH, SEQ + 1)) for _ in range(STEPS)]
        model, ddp, opt = build(cfg, ParallelConfig())
        full = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
        losses, norms, grads = [], [], None
        for i, b in enumerate(batches):
            loss, lm, aux, gn, g = train_step(ddp, opt, b, collect_grads=(i == 0))
            losses.append((loss, lm, aux))
            norms.append(gn)
            grads = grads or g
        assert all(a > 1e-4 for _, _, a in losses), "balance loss too small to test"
        res[name] = {"cfg": cfg, "full": full, "batches": batches, "losses": losses, "norms": norms, "grads": grads}
        print(f"reference {name}: losses {[round(x[0], 6) for x in losses]} grad norms {[round(x, 5) for x in norms]}")
    torch.save(res, os.path.join(out_dir, "reference.pt"))


class Checker:
    def __init__(self):
        import torch.distributed as dist
        self.rank = dist.get_rank()
        self.failed = 0

    def close(self, what, got, want, **tol):
        try:
            torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float64),
                                       torch.as_tensor(want, dtype=torch.float64), **(tol or TOL))
            if self.rank == 0:
                print(f"OK {what}", flush=True)
        except AssertionError as e:
            self.failed += 1
            print(f"FAIL rank {self.rank} {what}: {str(e).splitlines()[0:6]} got {got} want {want}", flush=True)

    def true(self, what, cond, detail=""):
        if cond:
            if self.rank == 0:
                print(f"OK {what}", flush=True)
        else:
            self.failed += 1
            print(f"FAIL rank {self.rank} {what} {detail}", flush=True)


def set_layout(name):
    from megamoe import parallel
    from megamoe.config import ParallelConfig
    tp, ep, etp, sp, dopt = LAYOUTS[name]
    parallel.destroy(keep_process_group=True)
    pcfg = ParallelConfig(tp=tp, ep=ep, etp=etp, sequence_parallel=sp, distributed_optimizer=dopt)
    parallel.initialize(pcfg)
    return pcfg


def check_same_over_world(chk, what, value):
    """A scalar that must be identical on every rank (e.g. the loss under TP)."""
    import torch.distributed as dist
    t = torch.tensor([value], dtype=torch.float64)
    lo, hi = t.clone(), t.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    chk.close(what, lo, hi, rtol=1e-6, atol=1e-7)


def run_layout(chk, ref, layout, model_names, distopt=True):
    """Gradients are compared with megatron's plain DDP optimizer (all-reduced grads are complete on every rank);
    with the distributed optimizer (sharded grads and state) the losses and grad norms are compared again."""
    import dataclasses

    from megamoe.training.resharding import local_slice
    pcfg = set_layout(layout)
    runs = [(mname, dataclasses.replace(pcfg, distributed_optimizer=False)) for mname in model_names]
    if pcfg.distributed_optimizer and distopt:
        runs += [(mname, pcfg) for mname in model_names]
    for mname, pc in runs:
        r = ref[mname]
        model, ddp, opt = build(r["cfg"], pc, r["full"])
        tag = f"{layout}{'+distopt' if pc.distributed_optimizer else ''}/{mname}"
        for i, b in enumerate(r["batches"]):
            want_grads = i == 0 and not pc.distributed_optimizer
            loss, lm, aux, gn, grads = train_step(ddp, opt, b, collect_grads=want_grads)
            chk.close(f"{tag} step {i + 1} loss", [loss, lm, aux], r["losses"][i])
            chk.close(f"{tag} step {i + 1} grad norm", gn, r["norms"][i])
            if want_grads:
                check_same_over_world(chk, f"{tag} loss identical on all ranks", loss)
                local = model.state_dict(keep_vars=True)     # per-expert views carry the sharding attributes
                bad = []
                for n, g in grads.items():
                    want = local_slice(n, local[n], r["grads"][n])
                    if not torch.allclose(g, want, rtol=TOL["rtol"], atol=1e-6):
                        bad.append(f"{n} max err {float((g - want).abs().max()):.3g} (|g| {float(want.abs().max()):.3g})")
                chk.true(f"{tag} gradients of all {len(grads)} local params match the reference", not bad,
                         "; ".join(bad[:6]))


def dispatcher_edge_cases(chk):
    """AllToAllDispatcher against LocalDispatcher with hand-made routings: one EP rank receives no tokens at all,
    and a rank that sends nothing (zero local tokens)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megamoe.moe.dispatcher import AllToAllDispatcher, LocalDispatcher
    from megamoe.moe.router import Routing
    set_layout("ep2")
    E, H, k = 4, 8, 2
    ep_rank = ps.get_expert_model_parallel_rank()
    local_ids = [2 * ep_rank, 2 * ep_rank + 1]
    torch.manual_seed(3)
    W = torch.randn(E, H, H)            # expert e: x -> tanh(x @ W[e]) on every rank
    for case, T0, T1, only in (("rank 1 experts get no tokens", 6, 5, (0, 1)),
                               ("rank 1 sends no tokens", 7, 0, (0, 1, 2, 3)),
                               ("uneven", 9, 3, (0, 1, 2, 3))):
        T = T0 if dist.get_rank() == 0 else T1
        g = torch.Generator().manual_seed(11 + dist.get_rank())
        x = torch.randn(T, H, generator=g, dtype=torch.float64, requires_grad=True)
        choice = torch.tensor(only)
        idx = torch.stack([choice[torch.randperm(len(only), generator=g)[:k]] for _ in range(T)]) if T else \
            torch.zeros(0, k, dtype=torch.long)
        w = torch.rand(T, k, generator=g, dtype=torch.float64, requires_grad=True)
        routing = Routing(idx, w, None, None, None)
        d = AllToAllDispatcher(E, local_ids)
        y_in, counts, h = d.dispatch(x, routing)
        outs, start = [], 0
        for e, n in zip(local_ids, counts):
            outs.append(torch.tanh(y_in[start:start + n] @ W[e].double()))
            start += n
        y = d.combine(torch.cat(outs) if outs else y_in, h)
        (y * torch.arange(1, H + 1, dtype=torch.float64)).sum().backward()
        gx, gw = x.grad.clone(), w.grad.clone()
        # reference: every expert locally
        x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        ld = LocalDispatcher(E)
        yi, c2, h2 = ld.dispatch(x2, Routing(idx, w2, None, None, None))
        outs, start = [], 0
        for e, n in enumerate(c2):
            outs.append(torch.tanh(yi[start:start + n] @ W[e].double()))
            start += n
        y2 = ld.combine(torch.cat(outs), h2)
        (y2 * torch.arange(1, H + 1, dtype=torch.float64)).sum().backward()
        chk.close(f"dispatcher ({case}): output", y.detach(), y2.detach(), rtol=1e-12, atol=1e-12)
        chk.close(f"dispatcher ({case}): input and weight grads", torch.cat([gx.flatten(), gw.flatten()]),
                  torch.cat([x2.grad.flatten(), w2.grad.flatten()]), rtol=1e-12, atol=1e-12)


def dispatcher_probs_in_experts(chk):
    """The router weights applied in the experts ("memory-efficient permutation": they travel with the rows through
    the all-to-all, the expert-TP all-gather and the chunk sort) against the weighted combine of LocalDispatcher,
    under EP2 and under expert-TP 2 (each expert-TP rank computes half of each expert's output). Experts here are
    linear, y = x W_e, so where the weight is applied does not change the value."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megamoe.moe.dispatcher import AllToAllDispatcher, LocalDispatcher
    from megamoe.moe.router import Routing
    E, H, k = 4, 8, 2
    for layout in ("ep2", "tp2etp2sp"):
        set_layout(layout)
        ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
        etp = ps.get_expert_tensor_parallel_world_size()
        local_ids = list(range(ep_rank * E // ep, (ep_rank + 1) * E // ep))
        torch.manual_seed(3)
        W = torch.randn(E, H, H, dtype=torch.float64)
        g = torch.Generator().manual_seed(21 + dist.get_rank())
        T = 7 + 2 * dist.get_rank()
        x = torch.randn(T, H, generator=g, dtype=torch.float64, requires_grad=True)
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        w = torch.rand(T, k, generator=g, dtype=torch.float64, requires_grad=True)
        d = AllToAllDispatcher(E, local_ids)
        y_in, counts, h = d.dispatch(x, Routing(idx, w, None, None, None), probs_in_experts=True)
        assert h.row_probs is not None and h.row_probs.shape == (y_in.shape[0],)
        outs, start = [], 0
        for e, n in zip(local_ids, counts):
            rows = slice(start, start + n)
            outs.append((y_in[rows] @ W[e]) * h.row_probs[rows, None] / etp)
            start += n
        y = d.combine(torch.cat(outs), h)
        (y * torch.arange(1, H + 1, dtype=torch.float64)).sum().backward()
        x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        ld = LocalDispatcher(E)
        yi, c2, h2 = ld.dispatch(x2, Routing(idx, w2, None, None, None))
        outs, start = [], 0
        for e, n in enumerate(c2.tolist()):
            outs.append(yi[start:start + n] @ W[e])
            start += n
        y2 = ld.combine(torch.cat(outs), h2)
        (y2 * torch.arange(1, H + 1, dtype=torch.float64)).sum().backward()
        chk.close(f"dispatcher probs in experts ({layout}): output", y.detach(), y2.detach(), rtol=1e-12, atol=1e-12)
        chk.close(f"dispatcher probs in experts ({layout}): input and router-weight grads",
                  torch.cat([x.grad.flatten(), w.grad.flatten()]), torch.cat([x2.grad.flatten(), w2.grad.flatten()]),
                  rtol=1e-12, atol=1e-12)


def layouts(out_dir, names):
    from megamoe.parallel import init_distributed
    init_distributed()
    chk = Checker()
    ref = torch.load(os.path.join(out_dir, "reference.pt"), weights_only=False)
    for item in names.split(","):          # "layout" or "layout:model" (one model, plain optimizer only)
        layout, _, only = item.partition(":")
        if layout == "dispatcher":
            dispatcher_edge_cases(chk)
            dispatcher_probs_in_experts(chk)
            continue
        run_layout(chk, ref, layout, [only] if only else list(ref), distopt=not only)
    return chk.failed


def reshard(out_dir, save_layout="tp2ep2sp_dp2", load_layouts="ep4,dp4,ep2etp2"):
    """Save a TP2xEP2 (x DP2) run after step 2 with the distributed optimizer; load it into EP4 and into TP1xEP1
    (DP4): step 3's loss checks the weights, step 4's loss (after an update) checks the optimizer state."""
    import torch.distributed as dist

    from megamoe.training.checkpoint import CheckpointManager
    from megamoe.parallel import init_distributed
    init_distributed()
    chk = Checker()
    ref = torch.load(os.path.join(out_dir, "reference.pt"), weights_only=False)
    r = ref["mixtral"]
    if save_layout == "tp2ep2sp_dp2":   # 4 ranks: gradients under EP2 x expert-TP2 (all-to-all + expert-TP gather)
        run_layout(chk, ref, "ep2etp2", ["llamamoe"], distopt=False)
    pcfg = set_layout(save_layout)
    model, ddp, opt = build(r["cfg"], pcfg, r["full"])
    mgr = CheckpointManager(os.path.join(out_dir, "ckpt"), keep_last=2)
    for i in range(2):
        loss, *_ = train_step(ddp, opt, r["batches"][i])
        chk.close(f"{save_layout} step {i + 1} loss", loss, r["losses"][i][0])
    path = mgr.save(2, ddp, opt, {"tokens": 0})
    for i in range(2, STEPS):   # uninterrupted continuation
        loss, *_ = train_step(ddp, opt, r["batches"][i])
        chk.close(f"{save_layout} uninterrupted step {i + 1} loss", loss, r["losses"][i][0])
    del model, ddp, opt
    for layout in load_layouts.split(","):
        pcfg = set_layout(layout)
        torch.manual_seed(99)     # different initial weights: the load must overwrite all of them
        model, ddp, opt = build(r["cfg"], pcfg, None)
        ts, _ = mgr.load(path, ddp, opt)
        chk.true(f"{layout}: train state step", ts["step"] == 2, str(ts))
        for i in range(2, STEPS):
            loss, *_ = train_step(ddp, opt, r["batches"][i])
            what = "weights" if i == 2 else "optimizer state"
            chk.close(f"{layout} after loading {save_layout}: step {i + 1} loss ({what})", loss, r["losses"][i][0])
        del model, ddp, opt
    dist.barrier()
    return chk.failed


def load_single(out_dir):
    """World of one (TP1xEP1, no torchrun): load the TP2xEP2 checkpoint written by `reshard`."""
    from megamoe.config import ParallelConfig
    from megamoe.parallel import initialize
    from megamoe.training.checkpoint import CheckpointManager
    initialize(ParallelConfig())
    ref = torch.load(os.path.join(out_dir, "reference.pt"), weights_only=False)
    r = ref["mixtral"]
    torch.manual_seed(99)
    model, ddp, opt = build(r["cfg"], ParallelConfig(), None)
    mgr = CheckpointManager(os.path.join(out_dir, "ckpt"))
    mgr.load(mgr.find_latest(), ddp, opt)
    failed = 0
    for i in range(2, STEPS):
        loss, *_ = train_step(ddp, opt, r["batches"][i])
        ok = abs(loss - r["losses"][i][0]) <= 2e-4 * abs(r["losses"][i][0]) + 2e-6
        print(f"{'OK' if ok else 'FAIL'} single process after loading TP2xEP2: step {i + 1} loss {loss} "
              f"want {r['losses'][i][0]}")
        failed += not ok
    return failed


def die(seconds):
    """Rank 1 exits with code 17 after the first collective; rank 0 keeps calling collectives. The job must stop
    (torchrun names rank 1 and its exit code) well within `seconds`, not hang."""
    import time

    import torch.distributed as dist
    from megamoe.parallel import init_distributed
    init_distributed()
    dist.barrier()
    if dist.get_rank() == 1:
        print("die: rank 1 exits with code 17", flush=True)
        os._exit(17)
    t0 = time.time()
    x = torch.ones(4)
    while time.time() - t0 < seconds:
        dist.all_reduce(x)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "die":
        die(float(sys.argv[2]))
        sys.exit(0)
    _patch_transformer_config()
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "reference":
        reference(out)
        rc = 0
    elif mode == "layouts":
        rc = layouts(out, sys.argv[3])
    elif mode == "reshard":
        rc = reshard(out, *sys.argv[3:])
    elif mode == "load_single":
        rc = load_single(out)
    else:
        raise SystemExit(f"unknown mode {mode}")
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.exit(1 if rc else 0)
