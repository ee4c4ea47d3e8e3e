"""The quickstart's whole journey, wired end to end, on a tiny dense LLaMA that uses the embedded SmolLM2 tokenizer
(the real run on SmolLM2-135M takes ~15 minutes; `scripts/quickstart.sh`)."""

import json
import os
import shutil

import torch


def test_quickstart_tiny(tmp_path, smollm2_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    from megamoe.quickstart import main
    dense = tmp_path / "dense"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                 max_position_embeddings=512)).save_pretrained(dense, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(smollm2_dir, f), dense / f)
    out = tmp_path / "qs"
    rc = main(["--hf-dir", str(dense), "--out", str(out), "--steps", "4", "--seq-len", "32", "--batch", "4",
               "--micro-batch", "2", "--corpus-mb", "0.1", "--eval-batches", "1", "--lr", "1e-2"])
    assert rc == 0
    s = json.load(open(out / "quickstart_summary.json"))
    doms = set(s["ppl"]["dense"])
    assert {"code", "docstrings", "reference"} <= doms
    for k in ("moe_before", "moe_after"):
        assert set(s["ppl"][k]) == doms and all(v["ppl"] > 1 for v in s["ppl"][k].values())
    assert s["params"]["moe"]["active"] < s["params"]["moe"]["total"]
    assert len(s["samples"]) == 3 and all(isinstance(x["completion"], str) for x in s["samples"])
    for p in ("hf_mixtral", "metrics", "final_model", "checkpoints"):
        assert os.path.exists(s["paths"][p]), p
    assert json.load(open(os.path.join(s["paths"]["hf_mixtral"], "config.json")))["model_type"] == "mixtral"
    # after training (12 tokens/step x 4 steps at lr 1e-2) the tiny MoE is better than the converted one on average
    before = sum(v["loss"] for v in s["ppl"]["moe_before"].values())
    after = sum(v["loss"] for v in s["ppl"]["moe_after"].values())
    assert after < before
