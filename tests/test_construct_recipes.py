"""Conversion recipes and fine-grained experts:

- `--recipe llama-moe-v1` writes exactly what hf-to-moe wrote before recipes existed: a digest of every tensor and of
  the MoE config, recorded from the conversion at commit fda8ceb (before this change), for the CLI's former default
  and for the quickstart's former call;
- fine-grained experts (64 experts, top-16) end to end: a calibrated conversion (fitted router, per-layer scale,
  refitted down_proj) passes the guard, one MoE layer equals a plain-torch reference in values and gradients, two
  training steps run (router statistics for all 64 experts), and the Mixtral export loads in transformers with the
  same logits as our model.
"""

import hashlib
import importlib.util
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from megamoe.construct.calib_data import CalibrationData
from megamoe.construct.calibrate import CalibrationSpec
from megamoe.construct.recipes import RECIPES, recipe_kwargs
from megamoe.errors import ConfigError
from megamoe.formats.shards import ShardedCheckpoint, load_shards
from megamoe.interchange import hf_to_moe, moe_to_hf

pytestmark = pytest.mark.usefixtures("world")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# sha256 over (name, dtype, shape, bytes) of every tensor of the written shards + the MoE config fields below,
# recorded by running hf_to_moe at commit fda8ceb on tiny_dense() (before recipes and calibration existed)
V1_DEFAULT = "2b5c175412f3b6e7a9b564d78c75fbcec5d8876edbda45c23684079d22c8649a"       # hf_to_moe(src, out)
V1_QUICKSTART = "deea63ca8bdea1601b9ef7c1d0515213171ed47359026903629a7326313a7ae9"    # the quickstart's call


def tiny_dense(path, layers=2, hidden=32, ffn=64, vocab=96, heads=4, kv=2, seed=0, tie=False):
    """A dense HF LLaMA directory from a seeded torch.Generator (stable across library versions)."""
    g = torch.Generator().manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    hd = hidden // heads
    sd = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * 0.5,
          "model.norm.weight": 1 + 0.1 * torch.randn(hidden, generator=g),
          "lm_head.weight": torch.randn(vocab, hidden, generator=g) * 0.2}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
        sd[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
        sd[p + "self_attn.q_proj.weight"] = torch.randn(heads * hd, hidden, generator=g) * 0.2
        sd[p + "self_attn.k_proj.weight"] = torch.randn(kv * hd, hidden, generator=g) * 0.2
        sd[p + "self_attn.v_proj.weight"] = torch.randn(kv * hd, hidden, generator=g) * 0.2
        sd[p + "self_attn.o_proj.weight"] = torch.randn(hidden, heads * hd, generator=g) * 0.2
        sd[p + "mlp.gate_proj.weight"] = torch.randn(ffn, hidden, generator=g) * 0.2
        sd[p + "mlp.up_proj.weight"] = torch.randn(ffn, hidden, generator=g) * 0.2
        sd[p + "mlp.down_proj.weight"] = torch.randn(hidden, ffn, generator=g) * 0.2
    if tie:
        del sd["lm_head.weight"]
    save_file(sd, os.path.join(path, "model.safetensors"))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
           "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128,
           "tie_word_embeddings": tie, "hidden_act": "silu"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(path)


def digest(d):
    sd = load_shards(d)
    h = hashlib.sha256()
    for n in sorted(sd):
        t = sd[n].contiguous()
        h.update(n.encode())
        h.update(str(t.dtype).encode())
        h.update(str(list(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    ck = ShardedCheckpoint(d)
    m = ck.config.moe
    ck.close()
    h.update(json.dumps({k: getattr(m, k) for k in ("num_experts", "top_k", "router", "gate_network", "score_scale",
                                                      "expert_sizes", "gate_init_std")}, sort_keys=True).encode())
    return h.hexdigest()


def _cli():
    spec = importlib.util.spec_from_file_location("checkpoint_convert", os.path.join(ROOT, "tools",
                                                                                       "checkpoint_convert.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_llama_moe_v1_recipe_is_bit_identical_to_the_former_conversion(tmp_path, capsys):
    src = tiny_dense(tmp_path / "dense")
    hf_to_moe(src, str(tmp_path / "a"), progress=False, **recipe_kwargs("llama-moe-v1"))
    assert digest(tmp_path / "a") == V1_DEFAULT
    # the CLI with --recipe llama-moe-v1
    assert _cli().main(["hf-to-moe", "--src", src, "--out", str(tmp_path / "b"), "--recipe", "llama-moe-v1",
                        "--quiet", "--json"]) == 0
    assert digest(tmp_path / "b") == V1_DEFAULT
    # the quickstart's former call: v1 with a linear gate, scale 4, seed 1227
    kw = recipe_kwargs("llama-moe-v1", gate_network="linear", score_scale=4.0)
    hf_to_moe(src, str(tmp_path / "c"), seed=1227, progress=False, **kw)
    assert digest(tmp_path / "c") == V1_QUICKSTART
    assert RECIPES["llama-moe-v1"]["calibrate"] is None


def test_experts_alone_keep_the_recipes_active_fraction():
    """--experts E without --top-k: k = E * k_r / E_r (megamoe 128/32 -> 8/2, 4/1; v1 8/2 -> 16/4), never 0."""
    assert recipe_kwargs("megamoe", num_experts=8)["top_k"] == 2
    assert recipe_kwargs("megamoe", num_experts=4)["top_k"] == 1
    assert recipe_kwargs("megamoe", num_experts=2)["top_k"] == 1
    assert recipe_kwargs("llama-moe-v1", num_experts=16)["top_k"] == 4
    assert recipe_kwargs("megamoe", num_experts=8, top_k=3)["top_k"] == 3
    assert recipe_kwargs("megamoe", num_experts=8, granularity=2)["top_k"] == 4


def test_recipe_resolution_and_errors():
    kw = recipe_kwargs("megamoe", granularity=2, top_k=4)
    assert kw["num_experts"] == 256 and kw["top_k"] == 8 and kw["calibrate"].router == "rank"
    assert kw["calibration"]["local"] is True
    kw = recipe_kwargs("megamoe", calibrate={"off": True}, calibration={"jsonl": "x.jsonl"})
    assert kw["calibrate"] is None and "local" not in kw["calibration"]
    kw = recipe_kwargs("llama-moe-v1", calibrate={"reconstruct": ("experts",)})
    assert kw["calibrate"].reconstruct == ("experts",) and kw["num_experts"] == 8
    with pytest.raises(ConfigError, match="--recipe"):
        recipe_kwargs("llama-moe-v3")
    with pytest.raises(ConfigError, match="--granularity"):
        recipe_kwargs("megamoe", granularity=0)


def reference_moe(x, w_router, experts, k, scale):
    """Plain torch: logits x W^T, top-k, softmax over the k, times scale; sum of the selected experts' SwiGLU."""
    logits = x.float() @ w_router.float().T
    top, idx = logits.topk(k, -1)
    p = top.softmax(-1) * scale
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(k):
            g, u, d = experts[int(idx[t, j])]
            y[t] = y[t] + p[t, j] * F.linear(F.silu(F.linear(x[t], g)) * F.linear(x[t], u), d)
    return y


def test_fine_grained_64_experts_top16_end_to_end(tmp_path):
    from megamoe.model import LlamaMoEModel
    from megamoe.moe.experts import per_expert_items
    from megamoe.train import main as train_main

    # 4 neurons per expert: transformers' Mixtral (grouped_mm) needs 16-byte rows, 4 fp32 values at least
    src = tiny_dense(tmp_path / "dense", hidden=64, ffn=256, vocab=128, tie=True)
    data = CalibrationData(torch.randint(0, 128, (24, 32), generator=torch.Generator().manual_seed(0)))
    out = tmp_path / "moe"
    s = hf_to_moe(src, str(out), num_experts=64, top_k=16, method="clustering", router="mixtral",
                  gate_network="linear", calibrate=CalibrationSpec(router="rank", reconstruct=("experts",)),
                  calibration_data=data, progress=False)
    assert all(line.startswith("[ok") for line in s["guard"]), s["guard"]
    assert s["experts"] == 64 and s["top_k"] == 16 and len(s["calibration"]["score_scale"]) == 2
    cal = json.load(open(out / "partitions" / "calibration.json"))
    assert [st["step"] for st in cal["layers"]["0"]["steps"]] == ["initial", "rank", "weights", "reconstruct-experts"]

    ck = ShardedCheckpoint(str(out))
    cfg = ck.config
    ck.close()
    assert isinstance(cfg.moe.score_scale, list) and cfg.moe.score_scale == pytest.approx(s["calibration"]["score_scale"], abs=1e-3)
    model = LlamaMoEModel(cfg)
    model.load_state_dict(load_shards(str(out)), strict=True)
    layer = model.layers[1].mlp
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y, _ = layer(x.view(12, 1, 64))
    gy = torch.randn(12, 64, generator=torch.Generator().manual_seed(2))
    (y.view(12, 64) * gy).sum().backward()
    sd = {k: v.detach().clone().requires_grad_(True) for k, v in layer.state_dict().items()}
    experts = [(sd[f"experts.{e}.gate_proj.weight"], sd[f"experts.{e}.up_proj.weight"],
                sd[f"experts.{e}.down_proj.weight"]) for e in range(64)]
    xr = x.detach().clone().requires_grad_(True)
    yr = reference_moe(xr, sd["router.gate.weight"], experts, 16, cfg.moe.layer_scale(1))
    (yr * gy).sum().backward()
    torch.testing.assert_close(y.view(12, 64), yr, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    grads = per_expert_items(layer, {n: p.grad for n, p in layer.named_parameters()})
    for n, t in sd.items():
        if t.grad is not None:
            torch.testing.assert_close(grads[n], t.grad, rtol=1e-4, atol=1e-5, msg=n)

    run = tmp_path / "run"
    assert train_main(["--set", f"out_dir={run}", "--set", "init.source=megamoe", "--set", f"init.path={out}",
                       "--set", "train.steps=2", "--set", "data.seq_len=32", "--set", "train.global_batch_tokens=128",
                       "--set", "train.micro_batch_size=2", "--set", "eval.batches=1", "--set", "eval.batch_size=2",
                       "--set", "log.interval=1", "--set", "log.tensorboard=false", "--set", "optim.warmup_steps=1",
                       "--set", "checkpoint.interval=0", "--set", "train.precision=fp32"]) == 0
    summary = json.load(open(run / "summary.json"))
    recs = [json.loads(r) for r in open(run / "metrics.jsonl") if r.strip()]
    loads = [r["expert_load"] for r in recs if r.get("expert_load")]
    assert loads and all(len(layer_load) == 64 for layer_load in loads[-1])

    hf = tmp_path / "hf"
    moe_to_hf(summary["final_model"], str(hf), fmt="mixtral", progress=False)
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    ck = ShardedCheckpoint(summary["final_model"])
    ours = LlamaMoEModel(ck.config)
    ck.close()
    ours.load_state_dict(load_shards(summary["final_model"]), strict=True)
    ours.eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_science_oracle_router_agrees_with_the_calibration_oracle(tmp_path):
    """tools/science.py's oracle (our model's experts run on every token) picks the same experts as the Gram-matrix
    oracle the calibration fits to (megamoe.construct.ffn + router_fit.oracle_topk): two implementations."""
    from megamoe.construct.ffn import PartitionedFFN
    from megamoe.construct.partition import read_partitions
    from megamoe.construct.router_fit import oracle_topk
    from megamoe.model import LlamaMoEModel
    spec = importlib.util.spec_from_file_location("science", os.path.join(ROOT, "tools", "science.py"))
    science = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(science)
    src = tiny_dense(tmp_path / "dense", hidden=32, ffn=64)
    out = tmp_path / "moe"
    hf_to_moe(src, str(out), num_experts=16, top_k=4, method="random", progress=False, guard_tokens=0)
    ck = ShardedCheckpoint(str(out))
    model = LlamaMoEModel(ck.config)
    ck.close()
    model.load_state_dict(load_shards(str(out)), strict=True)
    assert science.use_oracle_routers(model) == 2
    layer = model.layers[0].mlp
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(4))
    routing = layer.router(x)
    dense = load_shards(str(out))
    part = read_partitions(str(out / "partitions"))[0]
    gate = torch.cat([dense[f"layers.0.mlp.experts.{e}.gate_proj.weight"] for e in range(16)])
    up = torch.cat([dense[f"layers.0.mlp.experts.{e}.up_proj.weight"] for e in range(16)])
    down = torch.cat([dense[f"layers.0.mlp.experts.{e}.down_proj.weight"] for e in range(16)], 1)
    order = torch.as_tensor([j for e in part.experts for j in e])
    inv = torch.empty_like(order)
    inv[order] = torch.arange(len(order))
    f = PartitionedFFN(gate[inv], up[inv], down[:, inv], part)        # the dense FFN, neurons back in place
    want = oracle_topk(f.expert_norms(f.hidden(x)), 4)
    assert torch.equal(routing.indices.sort(-1).values, want.sort(-1).values)
    assert torch.equal(routing.weights, torch.ones(40, 4))
    m = science.routing_specialisation({"a": [[0.5, 0.5], [1.0, 0.0]], "b": [[0.5, 0.5], [0.0, 1.0]]})
    assert m["js_mean_per_layer"] == pytest.approx([0.0, 1.0])


def test_science_loss_curves_are_the_cross_entropy(tmp_path):
    """fig3/fig7 plot each arm's training cross entropy from its run's metrics.jsonl, not the summary's losses (which
    add the balance loss: ~9.7 for a 128/32 mixtral router, ~0.01 for top-2 noisy, so a better arm looked worse)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("science", os.path.join(ROOT, "tools", "science.py"))
    science = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(science)
    run = tmp_path / "run"
    (run / "final_model").mkdir(parents=True)
    rows = [{"kind": "train", "step": 1, "lm_loss": 5.0, "loss": 14.7}, {"kind": "eval", "step": 1},
            {"kind": "train", "step": 2, "lm_loss": 4.5, "loss": 14.2}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    arm = {"losses": {"1": 14.7, "2": 14.2}, "final_model": str(run / "final_model")}
    assert science._lm_losses(arm) == {1: 5.0, 2: 4.5}
    assert science._lm_losses({"losses": {"1": 14.7}, "final_model": None}) == {1: 14.7}
