"""End to end on a tiny model: dense HF LLaMA -> convert to LLaMA-MoE -> train (CLI) with checkpoints -> resume (CLI)
-> export to the Mixtral layout -> reload in transformers, whose logits must equal our trained model's."""

import json
import os

import pytest
import torch

pytestmark = pytest.mark.usefixtures("world")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_llama_dir(path, vocab=128):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, rms_norm_eps=1e-5)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return str(path)


def test_convert_train_resume_export_reload(tmp_path):
    from megamoe.interchange import hf_to_moe, moe_to_hf
    from megamoe.formats.shards import ShardedCheckpoint, load_shards
    from megamoe.model import LlamaMoEModel
    from megamoe.train import main
    dense = tiny_llama_dir(tmp_path / "dense")
    moe = tmp_path / "moe"
    hf_to_moe(dense, str(moe), num_experts=4, top_k=2, method="random", router="topk_noisy", gate_network="linear",
              score_scale=2.0, progress=False)
    run = tmp_path / "run"
    common = ["--set", f"out_dir={run}", "--set", "init.source=megamoe", "--set", f"init.path={moe}",
              "--set", "data.seq_len=32", "--set", "train.global_batch_tokens=128", "--set",
              "train.micro_batch_size=2", "--set", "checkpoint.interval=2", "--set", "log.tensorboard=false",
              "--set", "eval.batches=1", "--set", "eval.batch_size=2", "--set", "optim.warmup_steps=1",
              "--set", "train.precision=fp32"]   # the logits are compared to 1e-4 below: fp32 on every CPU
    assert main(common + ["--set", "train.steps=2", "--set", "eval.at_end=false"]) == 0
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert main(common + ["--set", "train.steps=4", "--resume"]) == 0
    summary = json.load(open(run / "summary.json"))
    assert summary["start_step"] == 2 and summary["tokens"] == 4 * 128
    saved = __import__("yaml").safe_load(open(run / "checkpoints" / "config.yaml"))
    assert saved["model"]["moe"]["num_experts"] == 4 and saved["train"]["steps"] == 4

    hf = tmp_path / "hf_mixtral"
    moe_to_hf(summary["final_model"], str(hf), fmt="mixtral", progress=False)
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    assert type(ref).__name__ == "MixtralForCausalLM"

    ck = ShardedCheckpoint(summary["final_model"])
    cfg = ck.config
    ck.close()
    ours = LlamaMoEModel(cfg)
    ours.load_state_dict(load_shards(summary["final_model"]), strict=True)
    ours.eval()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = ours(ids).logits
        b = ref(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    # the trained weights differ from the converted ones (training happened and was exported)
    conv = load_shards(str(moe))
    trained = load_shards(summary["final_model"])
    assert not torch.equal(conv["layers.0.mlp.router.gate.weight"], trained["layers.0.mlp.router.gate.weight"])
