"""Pipeline parallelism (1F1B and interleaved virtual stages on megatron-core's schedules) and context parallelism
(ring attention) on torchrun + gloo, against single-process runs of the same models on the same global batches
(tests/dist_scripts/pipeline_worker.py): losses, grad norms and every parameter's gradient; checkpoints of a PP run
loaded at PP1, at another PP x TP split and in a world of one; the trainer under PP (evaluation, router statistics
of every stage, checkpoints) against the single-process trainer; a rank dying inside a schedule; the layout
validation; the ring attention itself and the stage split, in one process.

Launches (each runs many checks; a check prints "OK ..." or "FAIL ..."):
  reference   1 process: three 4-layer models (dense + MoE layers, tied embeddings, attention experts), 4 steps of
              4 micro-batches through the trainer's train_step
  2 ranks     PP2 (uneven stages), PP2 x VPP2 (interleaved), CP2
  4 ranks     PP2 x EP2, PP2 x TP2 + SP; save at PP2 x EP2 (distributed optimizer), load at PP1 x EP4 and PP2 x TP2
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from test_parallel import _checks, _env, _port, _run, _torchrun

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dist_scripts", "pipeline_worker.py")
ROOT = os.path.dirname(HERE)
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pipeline_ref"))
    p = _run([sys.executable, WORKER, "reference", d], 240)
    assert p.returncode == 0, p.stdout[-4000:]
    return d


def _layouts_ok(ok: list[str], layout: str, models: tuple):
    text = "\n".join(ok)
    for m in models:
        assert f"OK {layout}/{m} gradients of all" in text, f"{layout}/{m}: gradient check did not run"
        for i in (1, 2, 3):
            assert f"OK {layout}/{m} step {i} loss" in text and f"OK {layout}/{m} step {i} grad norm" in text
    assert f"OK {layout}+distopt/{models[0]} step 3 loss" in text


@pytest.mark.slow  # ~50 s when idle (two ranks, three layouts x two or three models); minutes on a busy machine
def test_pp_vpp_cp_match_single_process(ref):
    ok = _checks(_torchrun(2, [WORKER, "layouts", ref, "pp2,pp2vpp2,cp2"], timeout=400))
    _layouts_ok(ok, "pp2", ("moe4", "tied4", "attn4"))
    _layouts_ok(ok, "pp2vpp2", ("moe4", "tied4"))
    _layouts_ok(ok, "cp2", ("moe4", "tied4"))


@pytest.mark.slow  # ~60 s when idle (four ranks)
def test_pp_with_ep_and_tp_match_single_process(ref):
    ok = _checks(_torchrun(4, [WORKER, "layouts", ref, "pp2ep2,pp2tp2sp"], timeout=400))
    _layouts_ok(ok, "pp2ep2", ("moe4", "tied4"))
    _layouts_ok(ok, "pp2tp2sp", ("moe4", "tied4"))


@pytest.mark.slow  # ~60 s when idle (four ranks), then ~15 s in one process
def test_pp_checkpoint_loads_at_pp1_other_split_and_world_of_one(ref):
    ok = "\n".join(_checks(_torchrun(4, [WORKER, "reshard", ref], timeout=400)))
    for layout in ("pp1ep4", "pp2tp2"):
        for i, what in ((3, "weights"), (4, "optimizer state")):
            assert f"OK {layout} after loading pp2ep2: step {i} loss ({what})" in ok
    single = _run([sys.executable, WORKER, "load_single", ref], 200)
    assert single.returncode == 0 and single.stdout.count("OK single process") == 2, single.stdout[-3000:]


def _metrics(path, kind):
    with open(path) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == kind]


@pytest.mark.slow  # ~70 s when idle: a 1-step run for the initial weights, then the same 3 steps at PP1 and PP2
def test_trainer_under_pp_equals_one_process(tmp_path):
    """megamoe-train at PP2 (tied embeddings split over the stages, MoE in both) from the same initial shards as a
    single-process run: every logged training loss, balance loss, grad norm and expert load (router statistics of
    both stages merged for the logging rank), and every evaluation (forward-only pipeline) are the same; it writes
    checkpoints, and says how to export instead of exporting."""
    common = ["--set", "model.moe.noise=false", "--set", "log.progress=false", "--set", "log.interval=1"]
    init = str(tmp_path / "init")
    p = _run([sys.executable, "-m", "megamoe.train", "--config", TINY, *common, "--set", f"out_dir={init}",
              "--set", "train.steps=1", "--set", "eval.interval=0", "--set", "eval.at_end=false",
              "--set", "checkpoint.interval=0", "--set", "checkpoint.save_at_end=false"], 200)
    assert p.returncode == 0, p.stdout[-3000:]
    run = common + ["--set", "init.source=megamoe", "--set", f"init.path={init}/final_model", "--set",
                    "train.steps=3", "--set", "eval.interval=2", "--set", "checkpoint.interval=2",
                    "--set", "checkpoint.save_at_end=false"]
    one, pp = str(tmp_path / "pp1"), str(tmp_path / "pp2")
    p1 = _run([sys.executable, "-m", "megamoe.train", "--config", TINY, *run, "--set", f"out_dir={one}"], 200)
    assert p1.returncode == 0, p1.stdout[-3000:]
    p2 = _torchrun(2, ["-m", "megamoe.train", "--config", TINY, *run, "--set", f"out_dir={pp}",
                       "--set", "parallel.pp=2"], timeout=300)
    assert p2.returncode == 0, p2.stdout[-4000:]
    a, b = _metrics(f"{one}/metrics.jsonl", "train"), _metrics(f"{pp}/metrics.jsonl", "train")
    assert [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        for k in ("loss", "lm_loss", "balance_loss", "grad_norm", "router_balance_loss"):
            assert y[k] == pytest.approx(x[k], rel=2e-5, abs=1e-6), (x["step"], k)
        torch.testing.assert_close(torch.tensor(y["expert_load"]), torch.tensor(x["expert_load"]))
    ea, eb = _metrics(f"{one}/metrics.jsonl", "eval"), _metrics(f"{pp}/metrics.jsonl", "eval")
    assert [r["step"] for r in eb] == [2, 3]
    for x, y in zip(ea, eb):
        for k in (k for k in x if k.startswith("eval/")):
            assert y[k] == pytest.approx(x[k], rel=2e-5), k
        assert json.dumps(y["routing_by_domain"]) == json.dumps(x["routing_by_domain"])
    assert os.path.isdir(f"{pp}/checkpoints/step_00000002")
    assert not os.path.exists(f"{pp}/final_model") and "--set parallel.pp=1" in p2.stdout


@pytest.mark.slow  # ~40 s when idle: two processes started without torchrun
def test_rank_dying_inside_a_pipeline_schedule_stops_the_job(tmp_path):
    """Rank 1 exits inside its third stage forward (step 2, in the middle of the 1F1B schedule). Started without
    torchrun, nobody else stops rank 0: it must end by itself, promptly, with megamoe-train's DistributedError
    (exit 4) naming the lost peer, not hang in the pipeline's send/recv."""
    port = _port()
    procs, files = [], []
    for r in (0, 1):
        env = dict(_env(), RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), MEGAMOE_DIST_TIMEOUT="100")
        f = open(tmp_path / f"rank{r}.log", "w+")
        files.append(f)
        procs.append(subprocess.Popen([sys.executable, WORKER, "die", str(tmp_path / "out"), TINY, "3"], env=env,
                                      stdout=f, stderr=subprocess.STDOUT, text=True))
    t0 = time.time()
    try:
        rcs = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out = []
    for f in files:
        f.seek(0)
        out.append(f.read())
        f.close()
    assert "die: rank 1 exits inside the pipeline schedule" in out[1] and rcs[1] == 17, out[1][-2000:]
    assert rcs[0] == 4, out[0][-3000:]
    assert "megamoe-train: error: rank 0: a peer rank died or dropped its connection" in out[0], out[0][-3000:]
    assert time.time() - t0 < 200


# ---------------------------------------------------------------------------------------------------------------
# one process: validation, the stage split, the ring attention

def _cfg(**kw):
    from megamoe.config import ModelConfig, MoEConfig
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=8, num_heads=4, num_kv_heads=2,
                moe=MoEConfig(num_experts=4, top_k=2, router="mixtral", gate_network="linear"))
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("layout, world, batch, model_kw, message", [
    (dict(pp=3), 3, None, {}, r"parallel\.pp: num_layers 8 do not split evenly over pp \* vpp = 3"),
    (dict(pp=2, vpp=3), 2, None, {}, r"parallel\.pp: num_layers 8 do not split evenly over pp \* vpp = 6"),
    (dict(pp=2, pp_layers=[3, 4]), 2, None, {}, r"parallel\.pp_layers: \[3, 4\] add up to 7 layers"),
    (dict(pp=2, pp_layers=[3, 5, 0]), 2, None, {}, r"parallel\.pp_layers: .* must list 2 layer counts"),
    (dict(pp=2, pp_layers=[0, 8]), 2, None, {}, r"parallel\.pp_layers: .* at least one layer"),
    (dict(pp=2, vpp=2, pp_first_stage_layers=3), 2, None, {},
     r"parallel\.pp_first_stage_layers: 3 layers do not split over vpp = 2"),
    (dict(pp=3, pp_last_stage_layers=3), 3, None, {}, r"the remaining 5 of num_layers 8 do not split evenly"),
    (dict(pp=2, pp_layers=[3, 5], pp_first_stage_layers=3), 2, None, {}, r"parallel\.pp_layers: give either"),
    (dict(vpp=2), 1, None, {}, r"parallel\.vpp: 2 virtual stages need pipeline parallelism"),
    (dict(pp=2), 3, None, {}, r"parallel\.pp: tp\*pp = 2 does not divide the world size 3"),
    (dict(pp=2, ep=4), 4, None, {}, r"parallel\.ep: ep\*etp = 4 does not divide the 2 ranks of one pipeline stage"),
    (dict(cp=2, tp=2), 6, None, {}, r"parallel\.cp: tp\*pp\*cp = 4 does not divide the world size 6"),
    (dict(pp=2), 2, (32, 2, 64), {}, r"train\.global_batch_tokens: 1 micro-batch\(es\) per step .* parallel\.pp 2"),
    (dict(pp=2, vpp=2), 2, (32, 2, 192), {}, r"parallel\.vpp: the interleaved schedule needs the micro-batches"),
    (dict(cp=2), 2, (30, 2, 120), {}, r"parallel\.cp: data\.seq_len 30 does not split into 2 \* cp = 4"),
    (dict(cp=2), 2, None, dict(attn_moe={"num_experts": 2, "top_k": 1}), r"parallel\.cp: attention experts"),
    (dict(pp=2, pp_layers=[3, 5]), 2, (32, 2, 128), {}, None),          # valid: uneven stages, 2 micro-batches
    (dict(pp=4, pp_first_stage_layers=1, pp_last_stage_layers=1), 4, None, {}, None),
])
def test_bad_pipeline_and_context_layouts_fail_with_the_field_named(layout, world, batch, model_kw, message):
    from megamoe.config import AttnMoEConfig, BatchShape, ConfigError, ParallelConfig
    if "attn_moe" in model_kw:
        model_kw = dict(model_kw, attn_moe=AttnMoEConfig(**model_kw["attn_moe"]))
    pcfg, cfg = ParallelConfig(**layout), _cfg(**model_kw)
    shape = BatchShape(*batch) if batch else None
    if message is None:
        pcfg.validate(cfg, world, shape)
        return
    with pytest.raises(ConfigError, match=message):
        pcfg.validate(cfg, world, shape)


def test_stage_split_follows_megatron_virtual_stage_order():
    from megamoe.config import ParallelConfig
    from megamoe.parallel.pipeline import stage_of
    p = ParallelConfig(pp=2, vpp=2)
    got = [(s.first_layer, s.num_layers, s.pre_process, s.post_process)
           for s in (stage_of(p, 8, r, v) for r in range(2) for v in range(2))]
    # rank 0 holds virtual stages 0 and 2, rank 1 holds 1 and 3 (s = v * pp + r)
    assert got == [(0, 2, True, False), (4, 2, False, False), (2, 2, False, False), (6, 2, False, True)]
    assert ParallelConfig(pp=4, pp_first_stage_layers=1, pp_last_stage_layers=1).stage_layers(8) == [1, 3, 3, 1]
    assert ParallelConfig(pp=2, vpp=2, pp_first_stage_layers=2).stage_layers(8) == [1, 3, 1, 3]
    assert ParallelConfig(pp=2, pp_layers=[3, 5]).stage_layers(8) == [3, 5]


def test_load_balanced_cp_chunks():
    from megamoe.parallel.context import local_positions
    got = [local_positions(16, 2, r).tolist() for r in range(2)]
    assert got == [[0, 1, 2, 3, 12, 13, 14, 15], [4, 5, 6, 7, 8, 9, 10, 11]]
    all4 = sorted(sum((local_positions(24, 4, r).tolist() for r in range(4)), []))
    assert all4 == list(range(24))


def test_ring_attention_math_equals_plain_attention_in_one_rank():
    """cp = 1 (a ring of one): the online-softmax merge over a single block with packed segments and GQA equals plain
    masked attention (the multi-rank ring is checked against one process by the CP2 launch)."""
    from megamoe.parallel.context import RingContext, ring_attention, ring_attention_reference

    class _One:                       # a group of one: no exchange happens
        pass
    torch.manual_seed(0)
    B, h, kv, S, d = 2, 4, 2, 10, 8
    q, k, v = (torch.randn(B, n, S, d, dtype=torch.float64) for n in (h, kv, kv))
    pos = torch.tensor([list(range(6)) + list(range(4)), list(range(10))])
    seg = torch.tensor([[1] * 6 + [2] * 4, [1] * 10], dtype=torch.int32)
    ring = RingContext.__new__(RingContext)
    ring.group, ring.key_blocks = _One(), [(pos, seg)]
    out = ring_attention(q, k, v, pos, seg, ring)
    torch.testing.assert_close(out, ring_attention_reference(q, k, v, pos, seg, pos, seg), rtol=1e-10, atol=1e-10)
