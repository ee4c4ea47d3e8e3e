"""SFT in the trainer: configs/sft_tiny.yaml end to end (embedded chat set built on the fly, two stages, response-only
loss, per-stage evaluation and chat samples); the global token-weighted loss (micro-batches and data-parallel ranks
against one batch); stage transitions and resume inside stage 2 (and at the boundary) reproducing the uninterrupted
run step for step; routers frozen bit for bit; realised stage-2 mixture; config errors naming the field."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from megamoe.errors import ConfigError
from megamoe.training.config import TrainConfig, load_train_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_TINY = os.path.join(REPO, "configs", "sft_tiny.yaml")
V2_8B = os.path.join(REPO, "configs", "llama3_8b_v2_sft.yaml")
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def chat_manifest(tmp_path_factory):
    """The embedded chat set, built and tokenized once for this module by the trainer's own preparation step."""
    from megamoe.training.data import prepare_embedded_chat
    cfg = load_train_config(SFT_TINY)
    cfg.data.manifest = str(tmp_path_factory.mktemp("chat") / "chat_tok" / "manifest.json")
    prepare_embedded_chat(cfg.data)
    assert os.path.isfile(cfg.data.manifest)
    return cfg.data.manifest


def sft(tmp_path, manifest, steps=(3, 3), **over) -> TrainConfig:
    d = yaml.safe_load(open(SFT_TINY))
    d["out_dir"] = str(tmp_path)
    d["data"]["manifest"] = manifest
    for st, n in zip(d["stages"], steps):
        st["steps"] = n
    d["eval"].update(sample_tokens=4, batches=1)
    d["checkpoint"] = {"interval": 0, "keep_last": 2, "save_at_end": False}
    d["log"]["progress"] = False
    for k, v in over.items():
        sec, field = k.split("__")
        d.setdefault(sec, {})[field] = v
    return TrainConfig.from_dict(d)


def test_sft_tiny_config_end_to_end(tmp_path):
    """`python -m megamoe.train --config configs/sft_tiny.yaml` from nothing: builds the chat set, two stages."""
    from megamoe.train import main
    manifest = tmp_path / "chat_tok" / "manifest.json"
    rc = main(["--config", SFT_TINY, "--set", f"out_dir={tmp_path / 'run'}", "--set", f"data.manifest={manifest}",
               "--set", "checkpoint.interval=8", "--set", "log.progress=false"])
    assert rc == 0 and manifest.is_file()
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["stage"] for r in train] == ["general"] * 4 + ["math_replay"] * 4   # log.interval 2, 8 + 8 steps
    assert all("stage" in r for r in rows if r["kind"] in ("train", "eval", "sample"))
    assert train[-1]["lm_loss"] < train[0]["lm_loss"] - 0.5
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [(r["step"], r["stage"]) for r in evals] == [(8, "general"), (16, "math_replay")]
    assert all({"eval/general/loss", "eval/math/loss"} <= set(r) for r in evals)
    samples = [r for r in rows if r["kind"] == "sample"]
    assert sorted((r["step"], r["domain"]) for r in samples) == [(8, "general"), (8, "math"), (16, "general"),
                                                                 (16, "math")]
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") and r["reference"] for r in samples)
    stage = [r for r in rows if r["kind"] == "stage"]
    assert len(stage) == 1 and stage[0]["step"] == 8 and stage[0]["freeze_routers"]
    assert stage[0]["domain_weights"] == pytest.approx({"general": 0.3, "math": 0.7})
    ts = json.load(open(tmp_path / "run" / "checkpoints" / "step_00000008" / "train_state.json"))
    assert (ts["stage"], ts["stage_name"], ts["stage_step"]) == (0, "general", 8)
    assert (tmp_path / "run" / "final_model" / "manifest.json").is_file()


def test_masked_loss_is_the_global_token_weighted_mean():
    """train_step on SFT micro-batches: 2 micro-batches of 1 row (very different numbers of trained tokens) give
    the loss, gradient norm and gradients of the same 2 rows as one micro-batch, and the loss equals
    sum(CE * mask) / sum(mask) over both rows by a plain cross entropy."""
    from megamoe import parallel
    from megamoe.config import ModelConfig, ParallelConfig
    from megamoe.data import SFTBatch
    from megamoe.model import LlamaMoEModel
    from megamoe.training.config import OptimConfig
    from megamoe.training.optim import build_optimizer, wrap_model
    from megamoe.training.trainer import train_step
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=64).validate()
    pcfg = ParallelConfig()
    parallel.initialize(pcfg, cfg)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (2, 17), generator=g)
    mask = torch.zeros(2, 16)
    mask[0, 2:14] = 1                      # 12 trained tokens in row 0
    mask[1, 9:11] = 1                      # 2 in row 1
    seg = torch.ones(2, 16, dtype=torch.int32)
    seg[0, 8:] = 2                         # row 0 packs two documents
    pos = torch.arange(16).repeat(2, 1)
    pos[0, 8:] -= 8
    mask[0, 7] = 0                         # no label across the boundary
    rows = [SFTBatch(tokens[i:i + 1], mask[i:i + 1], pos[i:i + 1], seg[i:i + 1], torch.zeros(1, dtype=torch.long))
            for i in range(2)]
    whole = SFTBatch(tokens, mask, pos, seg, torch.zeros(2, dtype=torch.long))
    results, weights = [], []
    for batches in ([whole], rows):
        torch.manual_seed(0)
        model = LlamaMoEModel(cfg)
        ddp = wrap_model(model, cfg, pcfg, "fp32")
        opt = build_optimizer(ddp, OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0), pcfg, "fp32")
        it = iter(batches)
        results.append(train_step(ddp, opt, lambda: next(it), len(batches)))
        weights.append({n: p.main_grad.detach().clone() for n, p in model.named_parameters()})  # DDP's grads
    a, b = results
    assert a.ok and b.ok
    assert a.lm_loss == pytest.approx(b.lm_loss, rel=1e-6) and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    for n in weights[0]:
        torch.testing.assert_close(weights[0][n], weights[1][n], rtol=1e-4, atol=1e-7, msg=n)
    torch.manual_seed(0)
    ref = LlamaMoEModel(cfg)
    with torch.no_grad():
        logits = ref(tokens[:, :-1], position_ids=pos, segment_ids=seg).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1), reduction="none")
    assert a.lm_loss == pytest.approx(float((ce * mask.reshape(-1)).sum() / mask.sum()), rel=1e-5)


def test_dp2_global_token_mean_equals_one_process():
    """torchrun, 2 data-parallel ranks (distributed optimizer) with different numbers of trained tokens: loss and
    gradient norm of the global batch computed in plain torch (tests/dist_scripts/sft_dp_worker.py)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", MEGAMOE_DIST_TIMEOUT="120")
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        os.path.join(HERE, "dist_scripts", "sft_dp_worker.py")], env=env, capture_output=True,
                       text=True, timeout=240)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "FAIL" not in out and out.count("OK ") >= 2, out[-4000:]


def test_stage_transition_and_resume_reproduce_the_uninterrupted_run(tmp_path, chat_manifest):
    from megamoe.training.trainer import run
    full = run(sft(tmp_path / "full", chat_manifest))
    assert sorted(full["losses"]) == list(range(1, 7))

    def term_at(k):
        def cb(step, model):
            if step == k:
                os.kill(os.getpid(), signal.SIGTERM)
        return cb
    # inside stage 2 (steps 4-6): stopped after step 5
    part = run(sft(tmp_path / "in2", chat_manifest), callbacks={"step_start": term_at(4)})
    assert part["stopped_by"] == "SIGTERM" and sorted(part["losses"]) == [1, 2, 3, 4, 5]
    ts = json.load(open(tmp_path / "in2" / "checkpoints" / "step_00000005" / "train_state.json"))
    assert (ts["stage"], ts["stage_name"], ts["stage_step"]) == (1, "math_replay", 2)
    resumed = run(sft(tmp_path / "in2", chat_manifest, checkpoint__resume=True))
    assert resumed["start_step"] == 5
    assert {**part["losses"], **resumed["losses"]} == full["losses"]
    # at the boundary: stopped after step 3 (the last of stage 1), the transition happens after the resume
    part = run(sft(tmp_path / "at", chat_manifest), callbacks={"step_start": term_at(2)})
    assert sorted(part["losses"]) == [1, 2, 3]
    resumed = run(sft(tmp_path / "at", chat_manifest, checkpoint__resume=True))
    assert resumed["start_step"] == 3
    assert {**part["losses"], **resumed["losses"]} == full["losses"]
    # a config whose stages moved refuses the checkpoint, naming the stages
    with pytest.raises(ConfigError, match="stages: .* was written in stage 1"):
        run(sft(tmp_path / "at", chat_manifest, steps=(2, 4), checkpoint__resume=True))


def test_frozen_routers_stay_bit_identical(tmp_path, chat_manifest):
    """Stage 2 freezes the routers (with weight decay on, and AdamW moments from stage 1 discarded): router weights
    at the end equal those at the stage boundary bit for bit, while they moved in stage 1 and the experts move in
    stage 2."""
    from megamoe.formats.shards import load_shards
    from megamoe.training.trainer import run
    seen = {}

    def grab(step, model):
        if step in (0, 3):
            seen[step] = {n: p.detach().clone() for n, p in model.state_dict().items() if torch.is_tensor(p)}
    s = run(sft(tmp_path, chat_manifest, optim__weight_decay=0.1, checkpoint__save_at_end=True),
            callbacks={"step_start": grab})
    final = load_shards(s["final_model"])
    routers = [n for n in seen[0] if ".router." in n]
    assert routers
    assert any(not torch.equal(seen[0][n], seen[3][n]) for n in routers), "routers should train in stage 1"
    for n in routers:
        assert torch.equal(final[n], seen[3][n]), f"{n} changed while frozen"
    assert not torch.equal(final["layers.0.mlp.experts.0.gate_proj.weight"],
                           seen[3]["layers.0.mlp.experts.0.gate_proj.weight"])


def test_stage2_mixture_proportions_through_the_trainer(tmp_path, chat_manifest):
    """The trainer's data after entering stage 2: the rows drawn follow math 0.7 / general 0.3."""
    from megamoe import parallel
    from megamoe.training.trainer import Trainer
    cfg = sft(tmp_path, chat_manifest)
    cfg.validate()
    parallel.initialize(cfg.parallel, cfg.model)
    t = Trainer(cfg, "fp32")
    assert t.data.weights == pytest.approx({"general": 1.0, "math": 0.0})
    first = [int(d) for _ in range(20) for d in t.data.next_batch(8).domain_ids]
    assert first.count(t.data.domains.index("math")) == 0
    t.enter_stage(1, 3)
    dom = torch.cat([t.data.next_batch(8).domain_ids for _ in range(500)])
    share = float((dom == t.data.domains.index("math")).float().mean())
    assert abs(share - 0.7) < 0.025, share          # 4000 rows: 5 standard deviations
    t.monitor.close()


def test_stage_config_errors_name_the_field(tmp_path, chat_manifest):
    def bad(match, **stage_over):
        cfg = sft(tmp_path, chat_manifest)
        for k, v in stage_over.items():
            setattr(cfg.stages[1], k, v)
        with pytest.raises(ConfigError, match=match):
            cfg.validate()
    bad(r"stages\[1\]\.mixture\.code: no dataset 'code' in .*manifest.json \(datasets: general, math\)",
        mixture={"math": 0.7, "code": 0.3})
    bad(r"stages\[1\]\.mixture: the weights .* do not sum to a positive number", mixture={"math": 0, "general": 0})
    bad(r"stages\[1\]\.mixture\.math: -0.5 must be a number >= 0", mixture={"math": -0.5, "general": 1.0})
    bad(r"stages\[1\]: give exactly one of steps or tokens", tokens=1000)
    bad(r"stages\[1\]\.optim\.decay_style: 'wsd' is not one of", optim={"decay_style": "wsd"})
    bad(r"stages\[1\]\.optim\.lrate: unknown field", optim={"lrate": 1e-3})
    bad(r"stages\[1\]\.reset_optimizer: false needs the same freeze_routers", reset_optimizer=False)
    bad(r"stages\[1\]\.optim\.beta2: differs from the stage before", reset_optimizer=False, freeze_routers=False,
        optim={"beta2": 0.99})
    dense = sft(tmp_path, chat_manifest)
    dense.model.moe = None
    with pytest.raises(ConfigError, match=r"stages\[1\]\.freeze_routers: the model has no routers"):
        dense.validate()
    d = yaml.safe_load(open(SFT_TINY))
    d["stages"] = {"name": "x"}
    with pytest.raises(ConfigError, match="stages: expected a non-empty list"):
        TrainConfig.from_dict(d)
    d["stages"] = [{"name": "x", "steps": 2, "freeze_gate": True}]
    with pytest.raises(ConfigError, match=r"stages\[0\]\.freeze_gate: unknown field"):
        TrainConfig.from_dict(d)
    # tokens: steps = ceil(tokens / global_batch_tokens); train.steps becomes the sum
    cfg = sft(tmp_path, chat_manifest)
    cfg.stages[1].steps, cfg.stages[1].tokens = None, 1000     # 512 tokens per step
    cfg.validate()
    assert [s.steps for s in cfg.stage_plan()] == [3, 2] and cfg.train.steps == 5


def test_llama3_8b_v2_sft_config_validates(tmp_path):
    """configs/llama3_8b_v2_sft.yaml: v2's recipe (lr 2e-5 cosine, 3% warmup, 256 x 4096 tokens, bf16); its data is
    not here, so a stand-in manifest names its datasets."""
    cfg = load_train_config(V2_8B)
    names = sorted({k for st in cfg.stages for k in st.mixture})
    man = tmp_path / "manifest.json"
    man.write_text(json.dumps({"data_format": "chat", "domains": {n: {} for n in names}}))
    cfg.data.manifest = str(man)
    cfg.validate()
    plan = cfg.stage_plan()
    assert [s.name for s in plan] == ["general", "math_replay"]
    assert cfg.train.global_batch_tokens == 256 * 4096 and cfg.data.seq_len == 4096
    assert cfg.train.precision == "bf16" and cfg.data.format == "chat"
    for s in plan:
        assert (s.optim.lr, s.optim.decay_style, s.optim.warmup_ratio, s.optim.min_lr_ratio) == (2e-5, "cosine",
                                                                                                  0.03, 0.0)
    assert plan[1].weights == {"metamathqa": 0.7, "infinity_instruct": 0.3}
    man.write_text(json.dumps({"data_format": "chat", "domains": {n: {} for n in names if n != "metamathqa"}}))
    with pytest.raises(ConfigError, match=r"stages\[1\]\.mixture\.metamathqa: no dataset"):
        cfg.validate()
