"""The model card written with every HF export (megamoe/formats/model_card.py): the Hub's own parser
(huggingface_hub.ModelCard / metadata_load) reads its front matter, and it carries the numbers of the model and of
its making (experts, top-k, activated/total parameters from the config, the construction method, the training tokens,
the evaluation); the llama-moe v1 loader notes are kept; --push-to-hub uploads the export through HfApi (here a fake
that writes into a local directory: never the network)."""

import json
import os
import shutil

import pytest
import torch
from huggingface_hub import ModelCard, metadata_load
from safetensors.torch import save_file

from megamoe.formats.model_card import card_facts, hub_id_of, load_eval_results
from megamoe.formats.shards import ShardedCheckpoint, load_shards, save_shards
from megamoe.interchange import hf_to_moe, moe_to_hf
from megamoe.interchange.hub import push_to_hub

pytestmark = pytest.mark.usefixtures("world")

H, F, V, L = 16, 32, 40, 2


def write_llama(path):
    os.makedirs(path)
    g = torch.Generator().manual_seed(0)
    sd = {"model.embed_tokens.weight": [V, H], "model.norm.weight": [H], "lm_head.weight": [V, H]}
    for i in range(L):
        p = f"model.layers.{i}."
        sd.update({p + f"self_attn.{x}_proj.weight": [H, H] for x in "qkvo"})
        sd.update({p + "input_layernorm.weight": [H], p + "post_attention_layernorm.weight": [H],
                   p + "mlp.gate_proj.weight": [F, H], p + "mlp.up_proj.weight": [F, H],
                   p + "mlp.down_proj.weight": [H, F]})
    save_file({k: torch.randn(v, generator=g) for k, v in sd.items()}, os.path.join(path, "model.safetensors"))
    json.dump({"model_type": "llama", "vocab_size": V, "hidden_size": H, "intermediate_size": F,
               "num_hidden_layers": L, "num_attention_heads": 2, "num_key_value_heads": 2, "hidden_act": "silu",
               "rms_norm_eps": 1e-5}, open(os.path.join(path, "config.json"), "w"))
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write("---\nlicense: apache-2.0\n---\n# a dense model\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A dense model in a Hub-cache-like path -> hf-to-moe (4 experts, Mixtral-exportable) -> the trainer's export
    layout: final_model (manifest "training" pointing at the converted MoE) and summary.json beside it."""
    root = tmp_path_factory.mktemp("card")
    dense = write_llama(str(root / "hub" / "models--acme--tiny-llama" / "snapshots" / "0123abc"))
    moe = str(root / "moe")
    hf_to_moe(dense, moe, num_experts=4, top_k=2, router="mixtral", gate_network="linear", progress=False)
    run = root / "run"
    ck = ShardedCheckpoint(moe)
    cfg = ck.config
    ck.close()
    final = str(run / "final_model")
    save_shards(final, cfg, load_shards(moe),
                info={"source": "megamoe.train", "training": {"tokens": 123456, "steps": 30, "init": moe,
                                                              "init_source": "megamoe", "data": "tok/manifest.json"}})
    summary = {"final_model": os.path.abspath(final), "tokens": 123456, "steps": 30,
               "eval": {"code": {"loss": 2.5, "ppl": 12.182494, "tokens": 4096},
                        "web": {"loss": 3.0, "ppl": 20.085537, "tokens": 4096}}}
    (run / "summary.json").write_text(json.dumps(summary))
    return {"root": root, "dense": dense, "moe": moe, "final": final, "cfg": cfg}


def test_card_of_a_trained_export_parses_as_hub_metadata_and_carries_the_numbers(trained, tmp_path):
    out = str(tmp_path / "hf")
    moe_to_hf(trained["final"], out, "mixtral", progress=False)
    readme = os.path.join(out, "README.md")
    meta = metadata_load(readme)
    card = ModelCard.load(readme)
    assert meta["base_model"] == card.data.base_model == "acme/tiny-llama"     # the Hub-cache path of the source
    assert meta["license"] == "apache-2.0"                                      # the base model's card
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"moe", "mixture-of-experts", "mixtral", "megamoe"} <= set(meta["tags"])
    res = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert res[("code", "perplexity")] == pytest.approx(12.1825) and res[("web", "loss")] == pytest.approx(3.0)
    pc = trained["cfg"].param_counts()
    text = card.text
    assert "| experts per MoE layer | 4 |" in text and "| top-k | 2 |" in text
    assert f"({pc['active']:,})" in text and f"({pc['total']:,})" in text and pc["active"] < pc["total"]
    assert "method: **random**" in text and "123,456 tokens in 30 steps" in text
    assert "| code | 2.5000 | 12.182 | 4096 |" in text
    assert "AutoModelForCausalLM.from_pretrained" in text


def test_v1_export_keeps_its_loader_notes_and_given_options_win(trained, tmp_path):
    out = str(tmp_path / "v1")
    ev = tmp_path / "eval.json"   # a megamoe-eval --json output
    ev.write_text(json.dumps({"domains": {"code": 9.0}, "loss": {"code": 2.1972246}, "tokens_per_domain": {"code": 64}}))
    moe_to_hf(trained["moe"], out, "llama-moe-v1", progress=False,
              card={"base_model": "acme/other", "license": "mit", "evaluation": load_eval_results(str(ev)),
                    "name": "tiny-moe"})
    card = ModelCard.load(os.path.join(out, "README.md"))
    assert card.data.base_model == "acme/other" and card.data.license == "mit" and card.data.model_name == "tiny-moe"
    assert [(r.dataset_type, r.metric_type, r.metric_value) for r in card.data.eval_results][0] == \
        ("code", "perplexity", 9.0)
    assert "transformers versions, as executed" in card.text and "trust_remote_code=True" in card.text
    assert "None after the conversion" in card.text                   # shards straight from hf-to-moe: no training


def test_card_facts_follow_the_lineage(trained):
    f = card_facts(trained["final"])
    assert f["construction"]["method"] == "random" and f["training"]["tokens"] == 123456
    assert f["base_path"] == os.path.abspath(trained["dense"]) and f["summary"]["eval"]["web"]["loss"] == 3.0
    assert hub_id_of(trained["dense"]) == "acme/tiny-llama"
    assert hub_id_of("/somewhere/smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id_of("/no/such/dir") is None
    with pytest.raises(ValueError, match="summary.json"):
        load_eval_results(os.path.join(trained["moe"], "manifest.json"))


class LocalHub:
    """HfApi's two calls, writing into a local directory (the test's stand-in for the Hub)."""

    def __init__(self, root):
        self.root, self.calls = root, []

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, repo_type, private, exist_ok))
        os.makedirs(os.path.join(self.root, repo_id), exist_ok=True)

    def upload_folder(self, folder_path, repo_id, repo_type=None, revision=None, commit_message=None):
        self.calls.append(("upload_folder", repo_id, repo_type, commit_message))
        shutil.copytree(folder_path, os.path.join(self.root, repo_id), dirs_exist_ok=True)
        return f"file://{self.root}/{repo_id}/commit/1"


def test_push_to_hub_uploads_the_export(trained, tmp_path):
    out = str(tmp_path / "hf")
    moe_to_hf(trained["final"], out, "mixtral", progress=False)
    hub = LocalHub(str(tmp_path / "hub"))
    url = push_to_hub(out, "me/tiny-moe", private=True, api=hub)
    assert url.endswith("/me/tiny-moe/commit/1")
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"] and hub.calls[0][3] is True
    pushed = tmp_path / "hub" / "me" / "tiny-moe"
    assert sorted(os.listdir(pushed)) == sorted(os.listdir(out))
    assert metadata_load(str(pushed / "README.md"))["base_model"] == "acme/tiny-llama"
    from megamoe.errors import InputError
    with pytest.raises(InputError, match="ORG_OR_USER/NAME"):
        push_to_hub(out, "no-slash", api=hub)
    with pytest.raises(InputError, match="no config.json"):
        push_to_hub(str(tmp_path), "me/x", api=hub)


def test_convert_cli_writes_the_card_and_pushes(trained, tmp_path, monkeypatch, capsys):
    """megamoe-convert moe-to-hf --eval-results --base-model --push-to-hub: the card takes the given results and
    base model, the upload goes through huggingface_hub.HfApi (replaced by the local stand-in), the summary says
    where; a failed guard pushes nothing."""
    import megamoe.interchange.hub as hub_mod
    from megamoe.cli.convert import main
    hub = LocalHub(str(tmp_path / "hub"))
    monkeypatch.setattr(hub_mod, "HfApi", lambda token=None: hub)
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"domains": {"code": 7.0}, "loss": {"code": 1.9459101}}))
    out = tmp_path / "hf"
    rc = main(["moe-to-hf", "--src", trained["final"], "--out", str(out), "--format", "mixtral", "--quiet",
               "--eval-results", str(ev), "--base-model", "acme/base", "--push-to-hub", "me/cli-moe", "--private"])
    text = capsys.readouterr().out
    assert rc == 0 and "pushed" in text and "me/cli-moe/commit/1" in text
    pushed = tmp_path / "hub" / "me" / "cli-moe"
    card = ModelCard.load(str(pushed / "README.md"))
    assert card.data.base_model == "acme/base"
    assert [(r.dataset_type, r.metric_value) for r in card.data.eval_results if r.metric_type == "perplexity"] == \
        [("code", 7.0)]
    assert hub.calls[0][3] is True                                    # --private
    rc = main(["moe-to-hf", "--src", trained["final"], "--out", str(tmp_path / "hf2"), "--format", "mixtral",
               "--quiet", "--eval-results", str(trained["moe"]) + "/manifest.json"])
    assert rc == 2 and "--eval-results" in capsys.readouterr().err and not (tmp_path / "hf2").exists()
