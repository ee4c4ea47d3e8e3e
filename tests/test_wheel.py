"""A wheel built from the repository is a working megamoe: built with `pip wheel --no-deps --no-build-isolation` from a
copy of the repository's files (what git tracks, plus new files it does not ignore: no build/ leftovers), installed
into a fresh virtual environment that has *only that wheel* plus the dependencies already installed here, and used
there: every console command's --help, `megamoe-train` on a bundled config (package data: configs/ is
megamoe/configs/ in the wheel), `megamoe-plot` on its metrics, and `megamoe-convert inspect` on a tiny checkpoint.

The environment: `python -m venv --without-pip` (no system site-packages), and one .pth file in its site-packages
naming the directories where this interpreter's dependencies are installed (sysconfig purelib/platlib). A .pth line
that is a path only appends that directory to sys.path; it does not process the .pth files inside it, so the
editable install's import hook (__editable__.megamoe-*.pth, which maps `megamoe` to this checkout) never runs in the
venv, and the venv's own site-packages (the wheel) comes first. `import megamoe` there must resolve inside the venv:
the test checks it. (`--system-site-packages` would run that hook and import the checkout instead.)"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow   # ~2 min of CPU: the extension build, a 2-step training run


def _run(cmd, cwd, env, timeout=600):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _repo_files() -> list[str]:
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                       capture_output=True, check=True)
    return [f for f in r.stdout.decode().split("\0") if f and os.path.isfile(os.path.join(ROOT, f))]


def _tiny_llama(path):
    import torch
    from safetensors.torch import save_file
    os.makedirs(path)
    H, F, V = 16, 32, 40
    sd = {"model.embed_tokens.weight": [V, H], "model.norm.weight": [H], "lm_head.weight": [V, H]}
    for x in "qkvo":
        sd[f"model.layers.0.self_attn.{x}_proj.weight"] = [H, H]
    sd.update({"model.layers.0.input_layernorm.weight": [H], "model.layers.0.post_attention_layernorm.weight": [H],
               "model.layers.0.mlp.gate_proj.weight": [F, H], "model.layers.0.mlp.up_proj.weight": [F, H],
               "model.layers.0.mlp.down_proj.weight": [H, F]})
    save_file({k: torch.randn(v) for k, v in sd.items()}, os.path.join(path, "model.safetensors"))
    json.dump({"model_type": "llama", "vocab_size": V, "hidden_size": H, "intermediate_size": F,
               "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "hidden_act": "silu",
               "rms_norm_eps": 1e-5}, open(os.path.join(path, "config.json"), "w"))
    return path


def test_wheel_in_a_clean_venv_runs_the_journeys_commands(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    # 1. the wheel, from a copy of the repository's files
    src = tmp_path / "src"
    for f in _repo_files():
        os.makedirs(src / os.path.dirname(f), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), src / f)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
          str(src)], tmp_path, env, timeout=900)
    (wheel,) = (tmp_path / "dist").iterdir()
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".yaml")}
    assert {f"megamoe/configs/{f}" for f in configs} <= names
    assert {"megamoe/py.typed", "megamoe-lm-eval.pth", "megamoe/kernels/topk_gating.py",
            "megamoe/eval/tasks/suites/llama_moe_v1.yaml"} <= names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "tools/", "build/")) for n in names)

    # 2. a venv with only the wheel, plus the dependencies installed here (module docstring)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    py = str(venv / "bin" / "python")
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env).stdout.strip()
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    with open(os.path.join(site, "megamoe_test_dependencies.pth"), "w") as f:
        f.write("\n".join(deps) + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", str(wheel)],
         tmp_path, env)
    where = _run([py, "-c", "import megamoe, megamoe.kernels; print(megamoe.__file__); print(megamoe.kernels.__file__)"],
                 tmp_path, env).stdout.split()
    assert all(w.startswith(str(venv)) for w in where), where

    # 3. every console command of the wheel's metadata answers --help (one process: the entry points as the scripts
    #    load them), and the scripts in the venv's bin/ run the venv's python
    probe = """if True:
        import contextlib, importlib.metadata as md, io, json
        d = md.distribution("megamoe")
        res = {}
        for ep in d.entry_points:
            if ep.group != "console_scripts" or ep.name == "megamoe-lm-eval":   # lm_eval's own --help
                continue
            buf = io.StringIO()
            try:
                with contextlib.redirect_stdout(buf):
                    ep.load()(["--help"])
                code = 0
            except SystemExit as e:
                code = e.code
            res[ep.name] = [code, buf.getvalue()[:300]]
        print(json.dumps({"dist": str(d.locate_file("")), "help": res}))
    """
    got = json.loads(_run([py, "-c", probe], tmp_path, env).stdout.strip().splitlines()[-1])
    assert got["dist"].startswith(str(venv)), got["dist"]
    scripts = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["scripts"]
    assert set(got["help"]) == set(scripts) - {"megamoe-lm-eval"}
    for cmd, (code, text) in got["help"].items():
        assert code == 0 and text.startswith("usage:"), (cmd, code, text)
    for cmd in scripts:
        assert open(venv / "bin" / cmd).readline().strip() == f"#!{py}", cmd
    assert _run([str(venv / "bin" / "megamoe-plot"), "--help"], tmp_path, env).stdout.startswith("usage: megamoe-plot")

    # 4. the README journey's config from the wheel (no checkout here), training one step, its plots
    out = tmp_path / "run"
    _run([str(venv / "bin" / "megamoe-train"), "--config", "tiny.yaml", "--set", f"out_dir={out}",
          "--train.steps", "2", "--eval.interval", "0", "--eval.batches", "1", "--checkpoint.interval", "0",
          "--checkpoint.save_at_end", "false", "--log.interval", "1", "--log-level", "warning"], tmp_path, env)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    r = _run([str(venv / "bin" / "megamoe-plot"), str(out), "--out", str(tmp_path / "plots")], tmp_path, env)
    assert {"expert_load.png", "routing_by_domain.png", "routing_js.png", "loss.png"} <= set(os.listdir(tmp_path / "plots"))

    # 5. the converter on a tiny checkpoint
    if "megamoe-convert" in scripts:
        dense = _tiny_llama(str(tmp_path / "dense"))
        r = _run([str(venv / "bin" / "megamoe-convert"), "inspect", dense], tmp_path, env)
        assert json.loads(r.stdout)["kind"] == "Hugging Face llama"
