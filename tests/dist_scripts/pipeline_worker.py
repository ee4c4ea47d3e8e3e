"""Worker for tests/test_pipeline.py: tiny LLaMA-MoEs trained single-process (the reference) and under pipeline
(1F1B, interleaved virtual stages, uneven stages), context parallelism and their combinations with TP / SP / EP,
launched by torchrun (gloo). Every step goes through the trainer's own `train_step` (megatron's schedules under PP);
losses, grad norms and every parameter's gradient are compared with the single-process run on the same global batch.

    python pipeline_worker.py reference OUT
    torchrun --nproc_per_node=2 pipeline_worker.py layouts OUT pp2,pp2vpp2,cp2
    torchrun --nproc_per_node=4 pipeline_worker.py layouts OUT pp2ep2,pp2tp2sp
    torchrun --nproc_per_node=4 pipeline_worker.py reshard OUT      # save at PP2 x EP2, load at PP1
    python pipeline_worker.py load_single OUT                       # the same checkpoint in a world of one
    python pipeline_worker.py die OUT RANK WORLD PORT                # (no torchrun) rank 1 dies inside the schedule

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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import parallel_worker as pw  # noqa: E402

STEPS, N_MICRO, MICRO_B, SEQ = 3, 4, 2, 16
TOL = dict(rtol=2e-4, atol=2e-6)

# name: (ParallelConfig kwargs, models)
LAYOUTS = {
    "pp2": (dict(pp=2), ("moe4", "tied4", "attn4")),                        # uneven stages per model (pp_layers)
    "pp2vpp2": (dict(pp=2, vpp=2), ("moe4", "tied4")),
    "cp2": (dict(cp=2), ("moe4", "tied4")),
    "pp2ep2": (dict(pp=2, ep=2), ("moe4", "tied4")),
    "pp2tp2sp": (dict(pp=2, tp=2, sequence_parallel=True), ("moe4", "tied4")),
}
PP_LAYERS = {"moe4": [1, 3], "tied4": [3, 1], "attn4": [2, 2]}


def model_configs():
    from megamoe.config import AttnMoEConfig, ModelConfig, MoEConfig
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                max_position_embeddings=64, init_std=0.05)
    return {
        # dense layer 0, Mixtral MoE with z-loss in 1-3, untied head
        "moe4": ModelConfig(**base, moe=MoEConfig(num_experts=4, top_k=2, router="mixtral", gate_network="linear",
                                                  balance_loss_weight=0.1, z_loss_weight=1e-3, gate_init_std=0.3,
                                                  moe_layers=[1, 2, 3])),
        # llama-moe v1 router (noise off), uneven experts, residual expert, MoE in 0 and 2, tied embeddings
        "tied4": ModelConfig(**base, tie_word_embeddings=True, moe=MoEConfig(
            num_experts=4, top_k=2, router="topk_noisy", gate_network="mlp", noise=False, balance_loss_weight=0.1,
            expert_sizes=[8, 16, 8, 16], residual_size=16, moe_layers=[0, 2], gate_init_std=0.3)),
        # attention experts (token_sparse in layer 1, full_kv would need one mode per model: token_sparse here)
        # beside Mixtral MoE layers 2-3
        "attn4": ModelConfig(**base, attn_moe=AttnMoEConfig(
            num_experts=4, top_k=2, score_scale=2.0, mode="token_sparse", layers=[1, 3], balance_loss_weight=0.1,
            gate_init_std=0.3), moe=MoEConfig(num_experts=4, top_k=2, router="mixtral", gate_network="linear",
                                               balance_loss_weight=0.1, moe_layers=[2, 3], gate_init_std=0.3)),
    }


def pcfg_for(layout: str, mname: str, distopt: bool):
    from megamoe.config import ParallelConfig
    kw = dict(LAYOUTS[layout][0]) if layout in LAYOUTS else {}
    if kw.get("pp", 1) > 1 and kw.get("vpp", 1) == 1:
        kw["pp_layers"] = PP_LAYERS[mname]
    return ParallelConfig(distributed_optimizer=distopt, **kw)


def build(cfg, pcfg, full_sd=None):
    from megamoe.training.optim import build_optimizer, wrap_model
    from megamoe.training.pipeline import build_model
    from megamoe.training.resharding import load_full_state_dict
    torch.manual_seed(0)
    model = build_model(cfg, pcfg)
    if full_sd is not None:
        load_full_state_dict(model, full_sd)
    ddp = wrap_model(model, cfg, pcfg, "fp32")
    opt = build_optimizer(ddp, pw.optim_cfg(), pcfg, "fp32")
    for g in opt.param_groups:
        g["lr"] = pw.LR
    return model, ddp, opt


def micro_batches(batch):
    """This DP rank's micro-batches of the global batch [N_MICRO * MICRO_B * 2, S+1]: the global batch is cut into
    N_MICRO micro-batches (as the single-process run's), and each of those over the DP ranks (rank r its r-th
    part): the balance losses are per micro-batch, over all its DP parts."""
    from megatron.core import parallel_state as ps
    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    return [m.chunk(dp)[r] for m in batch.chunk(N_MICRO)]


def step(ddp, opt, batch, collect_grads=False):
    """One trainer step (megamoe.training.trainer.train_step); gradients captured after finalize (plain optimizer:
    complete on every rank) through the `finite` hook."""
    from megamoe.moe.experts import per_expert_items
    from megamoe.training.optim import unwrap
    from megamoe.training.trainer import train_step
    grads = {}

    def finite(lm, aux):
        if collect_grads:
            for m in (ddp if isinstance(ddp, list) else [ddp]):
                mod = unwrap(m)
                grads.update(per_expert_items(mod, {n: p.main_grad.detach().clone()
                                                    for n, p in mod.named_parameters()}))
        return True
    it = iter(micro_batches(batch))
    r = train_step(ddp, opt, lambda: next(it), N_MICRO, finite=finite)
    assert r.ok
    return r, grads


def reference(out_dir):
    from megamoe.config import ParallelConfig
    from megamoe.parallel import initialize
    initialize(ParallelConfig())
    res = {}
    for name, cfg in model_configs().items():
        torch.manual_seed(7)
        batches = [torch.randint(0, cfg.vocab_size, (N_MICRO * MICRO_B * 2, SEQ + 1)) for _ in range(STEPS + 1)]
        model, ddp, opt = build(cfg, ParallelConfig())
        full = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
        losses, norms, grads = [], [], None
        for i, b in enumerate(batches):
            r, g = step(ddp, opt, b, collect_grads=i == 0)
            losses.append((r.lm_loss, r.aux_loss))
            norms.append(r.grad_norm)
            grads = grads or g
        assert all(a > 1e-4 for _, a in losses), "balance loss too small to test"
        res[name] = {"cfg": cfg, "full": full, "batches": batches, "losses": losses, "norms": norms, "grads": grads}
        print(f"reference {name}: losses {[round(x[0] + x[1], 6) for x in losses]} norms {[round(x, 5) for x in norms]}")
    torch.save(res, os.path.join(out_dir, "reference.pt"))


def set_layout(pcfg):
    from megamoe import parallel
    parallel.destroy(keep_process_group=True)
    parallel.initialize(pcfg)


def run_layout(chk, ref, layout, mname, distopt):
    from megamoe.training.resharding import local_slice
    from megamoe.training.optim import unwrap
    r = ref[mname]
    pcfg = pcfg_for(layout, mname, distopt)
    set_layout(pcfg)
    model, ddp, opt = build(r["cfg"], pcfg, r["full"])
    tag = f"{layout}{'+distopt' if distopt else ''}/{mname}"
    for i in range(STEPS):
        want_grads = i == 0 and not distopt
        res, grads = step(ddp, opt, r["batches"][i], collect_grads=want_grads)
        chk.close(f"{tag} step {i + 1} loss", [res.lm_loss, res.aux_loss], r["losses"][i])
        chk.close(f"{tag} step {i + 1} grad norm", res.grad_norm, r["norms"][i])
        if want_grads:
            pw.check_same_over_world(chk, f"{tag} loss identical on all ranks", res.lm_loss + res.aux_loss)
            local = {}
            for m in (model if isinstance(model, list) else [model]):
                local.update(unwrap(m).state_dict(keep_vars=True))
            bad = []
            for n, g in grads.items():
                want = local_slice(n, local[n], r["grads"][n])
                if not torch.allclose(g, want, rtol=TOL["rtol"], atol=1e-6):
                    bad.append(f"{n} max err {float((g - want).abs().max()):.3g} (|g| {float(want.abs().max()):.3g})")
            chk.true(f"{tag} gradients of all {len(grads)} local params match the reference", not bad and grads,
                     "; ".join(bad[:6]))
    return model, ddp, opt


def layouts(out_dir, names):
    from megamoe.parallel import init_distributed
    init_distributed()
    chk = pw.Checker()
    ref = torch.load(os.path.join(out_dir, "reference.pt"), weights_only=False)
    for layout in names.split(","):
        for mname in LAYOUTS[layout][1]:
            run_layout(chk, ref, layout, mname, distopt=False)
        run_layout(chk, ref, layout, LAYOUTS[layout][1][0], distopt=True)
    return chk.failed


RESHARD_MODEL = "tied4"     # tied embeddings (the last stage's copy is a checkpoint replica), experts, uneven stages
LOADS = {"pp1ep4": dict(ep=4), "pp2tp2": dict(pp=2, tp=2, pp_layers=[2, 2])}


def reshard(out_dir):
    """Save a PP2 x EP2 (x DP2) run after step 2 with the distributed optimizer; load it into PP1 x EP4 (DP4) and
    into PP2 x TP2 with another stage split: step 3's loss checks the weights, step 4's the optimizer state."""
    from megamoe.config import ParallelConfig
    from megamoe.parallel import init_distributed
    from megamoe.training.checkpoint import CheckpointManager
    init_distributed()
    chk = pw.Checker()
    ref = torch.load(os.path.join(out_dir, "reference.pt"), weights_only=False)
    r = ref[RESHARD_MODEL]
    want = [a + b for a, b in r["losses"]]
    pcfg = pcfg_for("pp2ep2", RESHARD_MODEL, True)
    set_layout(pcfg)
    model, ddp, opt = build(r["cfg"], pcfg, r["full"])
    mgr = CheckpointManager(os.path.join(out_dir, "ckpt"), keep_last=2)
    for i in range(2):
        res, _ = step(ddp, opt, r["batches"][i])
        chk.close(f"pp2ep2 step {i + 1} loss", res.lm_loss + res.aux_loss, want[i])
    path = mgr.save(2, ddp, opt, {"tokens": 0})
    for i in range(2, STEPS + 1):
        res, _ = step(ddp, opt, r["batches"][i])
        chk.close(f"pp2ep2 uninterrupted step {i + 1} loss", res.lm_loss + res.aux_loss, want[i])
    del model, ddp, opt
    for name, kw in LOADS.items():
        pcfg = ParallelConfig(distributed_optimizer=True, **kw)
        set_layout(pcfg)
        torch.manual_seed(99)
        model, ddp, opt = build(r["cfg"], pcfg, None)
        ts, _ = mgr.load(path, ddp, opt)
        chk.true(f"{name}: train state step", ts["step"] == 2, str(ts))
        for i in range(2, STEPS + 1):
            res, _ = step(ddp, opt, r["batches"][i])
            what = "weights" if i == 2 else "optimizer state"
            chk.close(f"{name} after loading pp2ep2: step {i + 1} loss ({what})", res.lm_loss + res.aux_loss, want[i])
        del model, ddp, opt
    return chk.failed


def load_single(out_dir):
    """World of one (no torchrun): the PP2 x EP2 checkpoint written by `reshard`, then steps 3 and 4."""
    from megamoe.config import ParallelConfig
    from megamoe.parallel import initialize
    from megamoe.training.checkpoint import CheckpointManager
    initialize(ParallelConfig())
    ref = torch.load(os.path.join(out_dir, "reference.pt"), weights_only=False)
    r = ref[RESHARD_MODEL]
    torch.manual_seed(99)
    model, ddp, opt = build(r["cfg"], ParallelConfig(), None)
    mgr = CheckpointManager(os.path.join(out_dir, "ckpt"))
    mgr.load(mgr.find_latest(), ddp, opt)
    failed = 0
    for i in range(2, STEPS + 1):
        res, _ = step(ddp, opt, r["batches"][i])
        loss, want = res.lm_loss + res.aux_loss, sum(r["losses"][i])
        ok = abs(loss - want) <= 2e-4 * abs(want) + 2e-6
        print(f"{'OK' if ok else 'FAIL'} single process after loading pp2ep2: step {i + 1} loss {loss} want {want}")
        failed += not ok
    return failed


def die(out_dir, config, stop_call):
    """The training command (megamoe.train.main: its exit status and message are the users') at PP2, started
    without torchrun (nothing else stops rank 0): rank 1 exits with code 17 inside its `stop_call`-th stage forward,
    i.e. in the middle of a pipeline schedule; rank 0 must stop by itself with a DistributedError (exit 4)."""
    import megamoe.train as entry
    from megamoe.model import llama
    if int(os.environ["RANK"]) == 1:
        orig, calls = llama.LlamaMoEModel.forward, [0]

        def forward(self, *a, **k):
            calls[0] += 1
            if calls[0] == stop_call:
                print(f"die: rank 1 exits inside the pipeline schedule (stage forward {stop_call})", flush=True)
                os._exit(17)
            return orig(self, *a, **k)
        llama.LlamaMoEModel.forward = forward
    sets = ["parallel.pp=2", "train.steps=3", "eval.interval=0", "eval.at_end=false", "checkpoint.interval=0",
            "checkpoint.save_at_end=false", "log.progress=false", f"out_dir={out_dir}"]
    return entry.main(["--config", config] + [x for kv in sets for x in ("--set", kv)])


if __name__ == "__main__":
    if sys.argv[1] == "die":
        sys.exit(die(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "reference":
        reference(out)
        rc = 0
    elif mode == "layouts":
        rc = layouts(out, sys.argv[3])
    elif mode == "reshard":
        rc = reshard(out)
    elif mode == "load_single":
        rc = load_single(out)
    else:
        raise SystemExit(f"unknown mode {mode}")
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.exit(1 if rc else 0)
