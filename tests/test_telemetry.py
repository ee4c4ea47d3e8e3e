"""The telemetry LLaMA-MoE's monitoring promises: token-level loss (rows that average to the batch loss), the paper's
Figure 9 (Jensen-Shannon distance between domains' routing, against scipy), evaluation routing beside training load,
and the Weights & Biases logger (offline run files hold the step scalars of metrics.jsonl, expert load per expert)."""

import glob
import json
import os
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from scipy.spatial.distance import jensenshannon

from megamoe.config import ModelConfig, MoEConfig
from megamoe.divergence import js_distance, js_distance_matrix, routing_js_distances
from megamoe.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("world")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------------
# Jensen-Shannon distance (Figure 9)

def test_js_distance_equals_scipy_and_is_a_bounded_metric():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p, q = rng.random(8) * (rng.random(8) > 0.3), rng.random(8)
        p[0] += 0.1   # never all zero
        assert js_distance(p, q) == pytest.approx(jensenshannon(p, q, base=2), abs=1e-12)
    assert js_distance([1, 0], [0, 1]) == pytest.approx(1.0)                 # disjoint experts
    assert js_distance([3, 1], [0.75, 0.25]) == pytest.approx(0.0, abs=1e-7)  # normalised first
    names, d = js_distance_matrix({"a": [1, 2, 3], "b": [3, 2, 1], "c": [1, 1, 1]})
    assert names == ["a", "b", "c"] and np.allclose(d, d.T) and np.all(np.diag(d) == 0)
    assert d[0, 1] <= d[0, 2] + d[2, 1] + 1e-12                               # triangle inequality
    r = routing_js_distances({"code": [[0.5, 0.5], [1, 0]], "web": [[0.5, 0.5], [0, 1]], "empty": None})
    assert r["domains"] == ["code", "web"] and r["layers"][0][0][1] == 0 and r["layers"][1][0][1] == pytest.approx(1)
    with pytest.raises(ValueError, match="sum to 0"):
        js_distance([0, 0], [1, 1])


# ---------------------------------------------------------------------------------------------------------------
# token-level loss

def _tiny_model():
    from megamoe import parallel
    from megamoe.config import ParallelConfig
    from megamoe.model import LlamaMoEModel
    cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_position_embeddings=64, moe=MoEConfig(num_experts=4, top_k=2)).validate()
    parallel.initialize(ParallelConfig(), cfg)
    torch.manual_seed(0)
    return LlamaMoEModel(cfg)


def test_token_loss_rows_average_to_the_batch_loss():
    """Per-token CE equals torch's cross entropy on the logits; the token-weighted mean of the loss by position and
    the mean of all tokens equal the batch loss of the model's own (fused, on a CPU) loss path; with a loss mask the
    masked positions are left out (None) and the weighted mean is the masked loss."""
    from megamoe.training.token_loss import token_losses
    m = _tiny_model()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 96, (3, 21), generator=g)
    m.train()                                          # token_losses evaluates in eval mode and restores train mode
    r = token_losses(m, tokens)
    assert m.training
    m.eval()
    with torch.no_grad():
        logits = m(tokens[:, :-1], return_logits=True).logits
        ref = F.cross_entropy(logits.reshape(-1, 96), tokens[:, 1:].reshape(-1), reduction="none").view(3, 20)
        fused = float(m(tokens[:, :-1], labels=tokens[:, 1:], return_logits=False).lm_loss)
    assert r["sample_loss"] == pytest.approx(ref[0].tolist(), abs=1e-4)
    assert r["loss_by_position"] == pytest.approx(ref.mean(0).tolist(), abs=1e-4)
    assert r["tokens_by_position"] == [3] * 20 and r["tokens"] == 60 and r["sample_ids"] == tokens[0, 1:].tolist()
    by_pos = np.average(r["loss_by_position"], weights=r["tokens_by_position"])
    assert by_pos == pytest.approx(fused, abs=1e-4) and r["loss"] == pytest.approx(fused, abs=1e-4)
    assert r["model_loss"] == pytest.approx(fused, abs=1e-4)

    mask = torch.ones(3, 20)
    mask[0, :5] = 0
    mask[:, 17:] = 0
    r = token_losses(m, (tokens, mask))
    with torch.no_grad():
        masked = float(m(tokens[:, :-1], labels=tokens[:, 1:], loss_mask=mask, return_logits=False).lm_loss)
    assert r["sample_loss"][:5] == [None] * 5 and r["loss_by_position"][17:] == [None] * 3
    assert r["tokens_by_position"][:5] == [2] * 5 and r["tokens"] == int(mask.sum())
    scored = [(v, n) for v, n in zip(r["loss_by_position"], r["tokens_by_position"]) if n]
    assert np.average([v for v, _ in scored], weights=[n for _, n in scored]) == pytest.approx(masked, abs=1e-4)
    assert r["loss"] == pytest.approx(masked, abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# the trainer: token-loss rows, plots, W&B offline

def _wandb_history(path: str) -> list[dict]:
    """History rows of an offline W&B run file (run-*.wandb: a LevelDB-style log of protobuf Records -- 7-byte
    file header ':W&B' + magic + version, 32 KiB blocks, each chunk a 7-byte header crc32/length/type FULL=1
    FIRST=2 MIDDLE=3 LAST=4), read with wandb's own protobuf schema."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", path
    block, hdr = 32768, 7
    pos, buf, rows = hdr, b"", []
    while pos + hdr <= len(data):
        left = block - pos % block
        if left < hdr:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + hdr])
        if kind == 0 and n == 0:
            pos += left
            continue
        chunk, pos = data[pos + hdr:pos + hdr + n], pos + hdr + n
        if kind in (1, 2):
            buf = chunk
        else:
            buf += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def _tiny_cfg(tmp_path, **log) -> TrainConfig:
    d = yaml.safe_load(open(os.path.join(REPO, "configs", "tiny.yaml")))
    d["out_dir"] = str(tmp_path / "run")
    d["train"]["steps"] = 4
    d["eval"] = {"interval": 2, "batches": 1, "batch_size": 4, "plots": True}
    d["checkpoint"] = {"interval": 0, "save_at_end": False}
    d["log"] = {"interval": 1, "tgs_window": 2, "tensorboard": False, "progress": False, "token_loss_interval": 2,
                **log}
    return TrainConfig.from_dict(d)


def test_trainer_writes_token_loss_rows_and_the_routing_plots(tmp_path):
    from megamoe.training.trainer import run
    s = run(_tiny_cfg(tmp_path))
    recs = [json.loads(line) for line in open(s["metrics"])]
    rows = [r for r in recs if r["kind"] == "token_loss"]
    at_log = [(r["step"], r["domain"]) for r in rows if "at" not in r]
    at_eval = [(r["step"], r["domain"]) for r in rows if r.get("at") == "eval"]
    first = [r for r in recs if r["kind"] == "eval"][0]
    domains = sorted(k.split("/")[1] for k in first if k.startswith("eval/") and k.endswith("/loss"))
    assert at_log == [(2, at_log[0][1]), (4, at_log[0][1])] and at_log[0][1] in domains
    assert sorted(at_eval) == sorted((st, d) for st in (2, 4) for d in domains)
    for r in rows:
        assert len(r["loss_by_position"]) == 32 and len(r["sample_loss"]) == 32
        assert np.average(r["loss_by_position"], weights=r["tokens_by_position"]) == pytest.approx(r["loss"], abs=2e-4)
        assert r["model_loss"] == pytest.approx(r["loss"], abs=2e-4)
    # the evaluation's per-domain loss is over 1 batch of 4 rows = the probe batch: the same number
    for r in rows:
        if r.get("at") == "eval":
            ev = [e for e in recs if e["kind"] == "eval" and e["step"] == r["step"]][0]
            assert ev[f"eval/{r['domain']}/loss"] == pytest.approx(r["loss"], abs=2e-4)
    plots = os.listdir(os.path.join(s["out_dir"], "plots"))
    for name in ("expert_load.png", "routing_by_domain.png", "routing_js.png", "load_train_vs_eval.png",
                 "token_loss.png", "loss.png"):
        assert name in plots, plots
    man = json.load(open(os.path.join(s["final_model"], "manifest.json")))
    assert man["training"]["tokens"] == s["tokens"] and man["training"]["steps"] == 4


def test_wandb_offline_run_holds_the_step_scalars(tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install megamoe[wandb]; in the test extra)")
    from megamoe.training.trainer import run
    os.environ.setdefault("WANDB_SILENT", "true")
    s = run(_tiny_cfg(tmp_path, token_loss_interval=0, wandb={"project": "t", "mode": "offline",
                                                              "dir": str(tmp_path / "wb")}))
    files = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    hist = {}
    for row in _wandb_history(files[0]):
        hist.setdefault(row["_step"], {}).update(row)
    recs = [json.loads(line) for line in open(s["metrics"])]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        h = hist[r["step"]]
        for k in ("loss", "lm_loss", "balance_loss", "lr", "grad_norm", "tokens", "tgs"):
            assert h[k] == pytest.approx(r[k], rel=1e-6), (r["step"], k)
        for li, row in enumerate(r["expert_load"]):            # per expert, not a histogram
            assert [h[f"expert_load/L{li}/e{e}"] for e in range(4)] == pytest.approx(row)
        assert sum(h[f"domain_weight/{d}"] for d in r["domain_weights"]) == pytest.approx(1.0)
    ev = [r for r in recs if r["kind"] == "eval"][-1]
    loss_keys = [k for k in ev if k.startswith("eval/") and k.endswith("/loss")]
    assert loss_keys and all(hist[ev["step"]][k] == pytest.approx(ev[k]) for k in loss_keys)
    h = hist[ev["step"]]
    assert h["eval/routing_by_domain/_type"] == h["eval/routing_js_distance/_type"] == "table-file"
    table = json.load(open(os.path.join(os.path.dirname(files[0]), "files", h["eval/routing_by_domain/path"])))
    assert table["columns"] == ["domain", "layer", "expert", "share"]
    got = {(d, li, e): x for d, li, e, x in table["data"]}
    assert got == {(d, li, e): pytest.approx(x) for d, layers in ev["routing_by_domain"].items()
                   for li, row in enumerate(layers) for e, x in enumerate(row)}


def test_wandb_config_is_checked():
    from megamoe.errors import ConfigError
    from megamoe.training.config import load_train_config
    cfg = load_train_config(os.path.join(REPO, "configs", "tiny.yaml"), ["log.wandb.mode=offline"])
    assert cfg.log.wandb.mode == "offline" and cfg.log.wandb.project == "megamoe"
    with pytest.raises(ConfigError, match="log.wandb.mode"):
        load_train_config(os.path.join(REPO, "configs", "tiny.yaml"), ["log.wandb.mode=cloud"]).validate()
