"""The quickstart's whole journey, wired end to end, on a tiny dense LLaMA that uses the embedded SmolLM2 tokenizer
(the real run on SmolLM2-135M takes ~15 minutes: `scripts/quickstart.sh`); and a real learning signal on the local
corpus it tokenized."""

import json
import os
import shutil

import pytest
import torch


def write_tiny_dense(dense, smollm2_dir):
    """A tiny dense LLaMA (2 layers, hidden 32) with the embedded SmolLM2 tokenizer, as the quickstart's --hf-dir."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                 max_position_embeddings=512)).save_pretrained(dense, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(smollm2_dir, f), dense / f)
    return dense


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory, smollm2_dir):
    from megamoe.quickstart import main
    tmp = tmp_path_factory.mktemp("quickstart")
    dense = write_tiny_dense(tmp / "dense", smollm2_dir)
    out = tmp / "qs"
    rc = main(["--hf-dir", str(dense), "--out", str(out), "--experts", "8", "--steps", "4", "--seq-len", "32",
               "--batch", "4", "--micro-batch", "2", "--corpus-mb", "0.1", "--eval-batches", "1", "--lr", "1e-2"])
    assert rc == 0
    return out


def test_quickstart_tiny(quickstart_run):
    out = quickstart_run
    s = json.load(open(out / "quickstart_summary.json"))
    doms = set(s["ppl"]["dense"])
    assert {"code", "docstrings", "reference"} <= doms
    for k in ("moe_before", "moe_after"):
        assert set(s["ppl"][k]) == doms and all(v["ppl"] > 1 for v in s["ppl"][k].values())
    assert s["params"]["moe"]["active"] < s["params"]["moe"]["total"]
    assert len(s["samples"]) == 3 and all(isinstance(x["completion"], str) for x in s["samples"])
    for p in ("hf_mixtral", "metrics", "final_model", "checkpoints", "plots"):
        assert os.path.exists(s["paths"][p]), p
    assert os.path.isfile(os.path.join(s["paths"]["final_model"], "tokenizer.json"))  # usable by megamoe-eval as is
    assert json.load(open(os.path.join(s["paths"]["hf_mixtral"], "config.json")))["model_type"] == "mixtral"
    assert os.path.isfile(os.path.join(s["paths"]["plots"], "routing_by_domain.png"))
    # after training (4 steps at lr 1e-2) the tiny MoE is better than the converted one on average
    before = sum(v["loss"] for v in s["ppl"]["moe_before"].values())
    after = sum(v["loss"] for v in s["ppl"]["moe_after"].values())
    assert after < before


def test_loss_decreases_on_local_corpus(quickstart_run, tmp_path):
    """A tiny LLaMA-MoE from random init, trained on the real multi-domain corpus (SmolLM2 tokenizer): the
    validation loss of every domain falls well below its start (ln 49152 = 10.8 for a uniform guess)."""
    from megamoe.training.trainer import run
    from megamoe.training.config import TrainConfig
    cfg = TrainConfig.from_dict({
        "out_dir": str(tmp_path),
        "model": {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
                  "num_heads": 4, "num_kv_heads": 2, "tie_word_embeddings": True,
                  "moe": {"num_experts": 4, "top_k": 2}},
        "data": {"manifest": str(quickstart_run / "tokenized" / "manifest.json"), "weights": "uniform",
                 "seq_len": 64, "seed": 3},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "train": {"steps": 25, "global_batch_tokens": 512, "micro_batch_size": 8},
        "eval": {"at_start": True, "at_end": True, "batches": 1, "batch_size": 8, "plots": False},
        "checkpoint": {"save_at_end": False}, "log": {"tensorboard": False, "interval": 5}})
    s = run(cfg)
    before, after = s["eval_history"][0]["results"], s["eval_history"][-1]["results"]
    assert set(before) >= {"code", "docstrings", "reference"}
    for d in before:
        assert before[d]["loss"] > 10.0
        assert after[d]["loss"] < before[d]["loss"] - 2.0, (d, before[d], after[d])


@pytest.mark.slow  # a quickstart in a subprocess up to its training stage (~30-60 s on 2 cores)
def test_sigterm_during_training_is_one_line_and_exit_130(tmp_path, smollm2_dir):
    """SIGTERM while the quickstart trains: the trainer saves a checkpoint and writes no final model; the quickstart
    used to go on and crash in the export (a traceback on final_model=None). Now: one line naming the checkpoint and
    how to resume, exit status 130, the checkpoint on disk."""
    import signal
    import subprocess
    import sys
    import time

    dense = write_tiny_dense(tmp_path / "dense", smollm2_dir)
    out = tmp_path / "qs"
    proc = subprocess.Popen([sys.executable, "-u", "-m", "megamoe.quickstart", "--hf-dir", str(dense), "--out",
                             str(out), "--experts", "8", "--steps", "100000", "--seq-len", "32", "--batch", "4", "--micro-batch", "2",
                             "--corpus-mb", "0.1", "--eval-batches", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if "continual pre-training" in line:
                break
        time.sleep(8)  # into the training loop (the trainer's set-up takes a few seconds)
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (rest[-2000:], err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("megamoe-quickstart:")]
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "--resume" in lines[0], err[-3000:]
    ckpts = out / "train" / "checkpoints"
    assert ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir())
    assert not (out / "hf_mixtral").exists()


def test_converted_model_is_reused_only_for_the_same_construction(tmp_path, smollm2_dir):
    """The quickstart reuses a complete conversion in its output directory, but only one made from the same source
    with the same flags: a run with --recipe llama-moe-v1 after a default run used to train the calibrated 8-expert
    model it found there (and freeze its routers) instead of converting anew."""
    from megamoe.quickstart import convert, parse_args, routers_calibrated
    dense = write_tiny_dense(tmp_path / "dense", smollm2_dir)
    out = tmp_path / "qs"
    out.mkdir()

    def run(*flags):
        a = parse_args(["--hf-dir", str(dense), "--out", str(out), "--experts", "8", *flags])
        moe = convert(a, str(out), str(dense))
        path = os.path.join(moe, "manifest.json")
        with open(path) as f:
            return f.read(), os.stat(path).st_mtime_ns, routers_calibrated(moe)

    first, when, calibrated = run()
    assert calibrated
    assert run() == (first, when, True)                             # reused: the same file, not re-written
    v1, _, calibrated = run("--recipe", "llama-moe-v1")
    assert v1 != first and not calibrated and json.loads(v1)["model"]["moe"]["router"] == "topk_noisy"
