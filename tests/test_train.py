"""The training loop: exact resume after SIGTERM, atomic checkpoints under a kill, keep-last-K, the NaN guard,
the command line (the falling loss on real text: tests/test_quickstart.py). Tiny model on the synthetic mixture (seconds each)."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from megamoe.training.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")


def tiny(tmp_path, **over) -> TrainConfig:
    import yaml
    d = yaml.safe_load(open(TINY))
    d["out_dir"] = str(tmp_path)
    d["eval"] = {"interval": 0, "at_end": False, "batches": 2, "batch_size": 4, "plots": False}
    d["log"]["progress"] = True
    for k, v in over.items():
        sec, field = k.split("__")
        d.setdefault(sec, {})[field] = v
    return TrainConfig.from_dict(d)


def test_exact_resume_after_sigterm(tmp_path):
    from megamoe.training.trainer import run
    full = run(tiny(tmp_path / "full", train__steps=8, checkpoint__interval=0, checkpoint__save_at_end=False))
    assert sorted(full["losses"]) == list(range(1, 9))

    def term_at_4(step, model):
        if step == 3:                       # during the 4th step: the loop saves after it and exits
            os.kill(os.getpid(), signal.SIGTERM)
    part = run(tiny(tmp_path / "run", train__steps=8), callbacks={"step_start": term_at_4})
    assert part["stopped_by"] == "SIGTERM" and sorted(part["losses"]) == [1, 2, 3, 4]
    ck = tmp_path / "run" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000004"
    assert (ck / "config.yaml").is_file()
    resumed = run(tiny(tmp_path / "run", train__steps=8, checkpoint__resume=True))
    assert resumed["start_step"] == 4 and sorted(resumed["losses"]) == [5, 6, 7, 8]
    got = {**part["losses"], **resumed["losses"]}
    assert got == full["losses"], "resumed run must reproduce the uninterrupted losses step for step"
    assert resumed["tokens"] == full["tokens"] == 8 * 256


def test_bf16_training_tracks_fp32_and_resumes_exactly(tmp_path):
    """bf16 weights with fp32 master weights and grads (megatron mixed precision), on a CPU: the losses follow the
    fp32 run's, and a run stopped after step 4 and resumed reproduces the uninterrupted bf16 run exactly (the
    distributed optimizer's fp32 master weights are in the checkpoint)."""
    from megamoe.formats.shards import load_shards
    from megamoe.training.trainer import run
    ref = run(tiny(tmp_path / "fp32", train__steps=6, train__precision="fp32", checkpoint__interval=0,
                   checkpoint__save_at_end=False))
    full = run(tiny(tmp_path / "full", train__steps=6, train__precision="bf16", checkpoint__interval=0,
                    checkpoint__save_at_end=False))
    for step, loss in ref["losses"].items():
        assert abs(full["losses"][step] - loss) < 2e-3 * loss, (step, full["losses"][step], loss)
    part = run(tiny(tmp_path / "run", train__steps=4, train__precision="bf16"))
    resumed = run(tiny(tmp_path / "run", train__steps=6, train__precision="bf16", checkpoint__resume=True))
    assert resumed["start_step"] == 4
    assert {**part["losses"], **resumed["losses"]} == full["losses"]
    sd = load_shards(resumed["final_model"])
    assert {v.dtype for v in sd.values()} == {torch.bfloat16} and "layers.1.mlp.router.gate.0.weight" in sd


def test_keep_last_and_final_model(tmp_path):
    from megamoe.formats.shards import load_shards
    from megamoe.training.trainer import run
    s = run(tiny(tmp_path, train__steps=6, checkpoint__interval=2, checkpoint__keep_last=2))
    names = sorted(n for n in os.listdir(tmp_path / "checkpoints") if n.startswith("step_"))
    assert names == ["step_00000004", "step_00000006"]
    sd = load_shards(s["final_model"])
    assert "layers.1.mlp.experts.3.down_proj.weight" in sd
    recs = [json.loads(line) for line in open(s["metrics"])]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6]
    for r in train:  # per-layer expert load over the whole global batch: each row is a distribution over experts
        assert len(r["expert_load"]) == 2 and all(abs(sum(row) - 1) < 1e-5 for row in r["expert_load"])
        assert r["tgs"] > 0 and r["mfu"] is None and r["flops_per_s"] > 0


def test_nan_guard_skips_a_bad_step(tmp_path):
    from megamoe.training.trainer import run
    snap = {}

    def poison_step_3(step, model):
        w = model.layers[1].mlp.router.gate[0].weight
        if step == 2:                                # the 3rd step sees a NaN router weight
            snap["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            snap["w"] = w.detach().clone()
            with torch.no_grad():
                w[0, 0] = float("nan")
        if step == 3:                                # the skipped step changed nothing (apart from the poison)
            snap["after"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            with torch.no_grad():
                w.copy_(snap["w"])
    s = run(tiny(tmp_path, train__steps=5, checkpoint__save_at_end=False), callbacks={"step_start": poison_step_3})
    assert s["skipped_steps"] == 1
    assert sorted(s["losses"]) == [1, 2, 4, 5] and all(math.isfinite(v) for v in s["losses"].values())
    changed = [n for n in snap["before"] if not torch.equal(snap["before"][n], snap["after"][n])
               and not torch.isnan(snap["after"][n]).any()]
    assert changed == []


def test_nan_guard_stops_and_names_the_layer(tmp_path):
    from megamoe.training.trainer import run
    from megamoe.training.nan_guard import NonFiniteError

    def poison(step, model):
        if step == 1:
            with torch.no_grad():
                model.layers[1].mlp.experts[2].up_proj.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteError) as e:
        run(tiny(tmp_path, train__steps=10, train__max_consecutive_nonfinite=3), callbacks={"step_start": poison})
    msg = str(e.value)
    assert msg.startswith("step 4: 3 non-finite losses in a row"), msg
    assert "layer 1" in msg and "experts" in msg, msg


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    from safetensors.torch import save_file
    from megamoe.training import checkpoint as checkpointing
    from megamoe.training.config import TrainConfig
    import yaml
    if __name__ == "__main__":
        out = sys.argv[1]
        d = yaml.safe_load(open(sys.argv[2]))
        d["out_dir"] = out
        d["eval"] = {"interval": 0, "at_end": False}
        d["train"]["steps"] = 4
        d["checkpoint"] = {"interval": 2}
        from megatron.core import dist_checkpointing
        real_save = dist_checkpointing.save
        calls = []
        def save_then_die(sd, path, *a, **k):
            calls.append(path)
            if len(calls) == 2:                      # the 2nd save: write part of it, then get killed
                real_save(sd, path, *a, **k)
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(sd, path, *a, **k)
        dist_checkpointing.save = save_then_die
        def snap(step, model):
            if step == 2:
                save_file({n: p.detach().clone().contiguous() for n, p in model.state_dict().items() if p is not None},
                          os.path.join(out, "at_step2.safetensors"))
        from megamoe.training.trainer import run
        run(TrainConfig.from_dict(d), callbacks={"step_start": snap})
""")


def test_atomic_save_survives_kill(tmp_path):
    from safetensors.torch import load_file

    from megamoe.training.checkpoint import CheckpointManager
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    out = tmp_path / "run"
    logf = tmp_path / "kill.log"
    with open(logf, "w") as f:   # a file, not a pipe: dist_checkpointing's helper process outlives the kill
        p = subprocess.Popen([sys.executable, str(script), str(out), TINY], stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=180)
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)   # the process group this test started (the helper included)
            except ProcessLookupError:
                pass
    assert rc == -signal.SIGKILL, logf.read_text()[-3000:]
    ck = out / "checkpoints"
    assert (ck / "step_00000004.tmp").is_dir() and not (ck / "step_00000004").exists()
    cm = CheckpointManager(str(ck))
    assert cm.find_latest() == str(ck / "step_00000002")
    # the previous checkpoint loads, with the weights it had
    from megamoe.training.trainer import run
    ref = load_file(str(out / "at_step2.safetensors"))
    seen = {}
    def grab(step, model):
        if step == 2 and not seen:
            seen.update({n: p.detach().clone() for n, p in model.state_dict().items() if p is not None})
    s = run(tiny(out, train__steps=4, checkpoint__interval=2, checkpoint__resume=True), callbacks={"step_start": grab})
    assert s["start_step"] == 2
    assert seen.keys() == ref.keys() and all(torch.equal(seen[k], ref[k]) for k in ref)
    assert not (ck / "step_00000004.tmp").exists() and (ck / "latest").read_text().strip() == "step_00000004"


def test_cli_overrides_and_errors(tmp_path, capsys):
    from megamoe.train import main
    rc = main(["--config", TINY, "--set", f"out_dir={tmp_path}", "--train.steps", "2", "--log.tensorboard=false",
               "--eval.at_end", "false", "--checkpoint.save_at_end", "false"])
    assert rc == 0
    import yaml
    saved = yaml.safe_load(open(tmp_path / "config.yaml"))
    assert saved["train"]["steps"] == 2 and saved["model"]["moe"]["num_experts"] == 4
    rc = main(["--config", TINY, "--set", f"out_dir={tmp_path}", "--set", "optim.warmup_steps=-1"])
    assert rc == 2 and "optim.warmup_steps" in capsys.readouterr().err


def test_eval_feeds_dynamic_domain_weights(tmp_path):
    """Sheared-LLaMA dynamic loading: the domain furthest above its reference loss gains weight at each eval, and
    the new weights are what the data uses (and what the next log line reports)."""
    from megamoe.training.trainer import run
    s = run(tiny(tmp_path, train__steps=4, eval__interval=2, checkpoint__save_at_end=False,
                 data__dynamic=True, data__reference_losses={"alpha": 0.0, "beta": 4.0, "gamma": 4.0}))
    recs = [json.loads(line) for line in open(s["metrics"])]
    ev = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in ev] == [2, 4]
    w = ev[0]["domain_weights"]
    # alpha's loss is ~4.5 above its reference, the others ~0.5: softmax(log 1/3 + (l - ref)) favours alpha
    losses = {d: ev[0][f"eval/{d}/loss"] for d in ("alpha", "beta", "gamma")}
    z = {d: math.exp(losses[d] - {"alpha": 0.0, "beta": 4.0, "gamma": 4.0}[d]) for d in losses}
    expect = {d: (1 - 1e-4) * z[d] / sum(z.values()) + 1e-4 / 3 for d in z}
    assert all(abs(w[d] - expect[d]) < 1e-6 for d in w), (w, expect)
    after = [r for r in recs if r["kind"] == "train" and r["step"] == 4][0]["domain_weights"]
    assert after == pytest.approx(w)


def test_time_limit_saves_and_resumes(tmp_path):
    from megamoe.training.trainer import run
    s = run(tiny(tmp_path, train__steps=50, train__max_minutes=1e-9, eval__at_end=False))
    assert s["stopped_by"] == "time limit" and sorted(s["losses"]) == [1]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert s["final_model"] is not None


def test_train_freeze_routers_keeps_every_router_as_initialised(tmp_path):
    """train.freeze_routers (without stages): the routers of runs of 2 and 4 steps from the same initialisation are
    identical, while their experts moved; without the flag the routers move (the quickstart freezes calibrated
    routers, whose ~1e-4 weights one AdamW step would overturn)."""
    from megamoe.formats.shards import load_shards
    from megamoe.training.trainer import run
    sds = {}
    for name, steps, frozen in (("a", 2, True), ("b", 4, True), ("c", 2, False)):
        s = run(tiny(tmp_path / name, train__steps=steps, train__freeze_routers=frozen, checkpoint__interval=0))
        sds[name] = load_shards(s["final_model"])
    routers = [k for k in sds["a"] if ".router." in k]
    experts = [k for k in sds["a"] if ".experts." in k]
    assert routers and experts
    assert all(torch.equal(sds["a"][k], sds["b"][k]) for k in routers)
    assert any(not torch.equal(sds["a"][k], sds["b"][k]) for k in experts)
    assert any(not torch.equal(sds["a"][k], sds["c"][k]) for k in routers)
