"""Every console command of pyproject.toml answers --help (exit 0, its own name in the usage line) and takes
--log-level; the flag vocabulary is one (--experts wherever experts per layer are given; old spellings still work);
tools/*.py are the same commands."""

import importlib
import os
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["scripts"]
SUBCOMMANDS = {"megamoe-corpus": ["local", "chat"], "megamoe-eval-tasks": ["build", "suites"],
               "megamoe-convert": ["hf-to-moe", "moe-to-hf", "reshard", "inspect", "embedded"]}


def _entry(cmd):
    mod, func = SCRIPTS[cmd].split(":")
    return getattr(importlib.import_module(mod), func)


def _help(cmd, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        _entry(cmd)(argv)
    out = capsys.readouterr()
    assert e.value.code == 0, out.err
    return out.out


@pytest.mark.parametrize("cmd", sorted(set(SCRIPTS) - {"megamoe-lm-eval"}))
def test_help_and_log_level(cmd, capsys):
    text = _help(cmd, ["--help"], capsys)
    assert text.startswith("usage:"), text[:200]
    name = {"megamoe-construct": "python -m megamoe.construct"}.get(cmd, cmd)
    assert name in text.splitlines()[0]
    subs = [_help(cmd, [sub, "--help"], capsys) for sub in SUBCOMMANDS.get(cmd, [])]
    assert "--log-level" in text or (subs and all("--log-level" in h for h in subs))


def test_lm_eval_help_is_lm_evals_and_takes_log_level(capsys):
    """megamoe-lm-eval hands its arguments to lm_eval's CLI: --help is lm_eval's, megamoe's --log-level is taken out
    first (lm_eval would refuse it)."""
    pytest.importorskip("lm_eval", reason="megamoe-lm-eval is lm_eval's CLI (the lm-eval extra)")
    assert _entry("megamoe-lm-eval")(["--log-level", "warning", "--help"]) == 0
    assert "lm-eval" in capsys.readouterr().out.lower()
    from megamoe.eval.cli import _take_log_level
    from megamoe.errors import InputError
    assert _take_log_level(["--tasks", "x", "--log-level=debug", "--limit", "2"]) == ["--tasks", "x", "--limit", "2"]
    with pytest.raises(InputError, match="--log-level"):
        _take_log_level(["--log-level", "loud"])


def test_bad_log_level_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        _entry("megamoe-plot")(["run", "--log-level", "loud"])
    assert e.value.code == 2 and "--log-level" in capsys.readouterr().err


def test_construct_speaks_the_converters_flags_and_keeps_the_old_ones(capsys):
    """megamoe-construct spells its flags as megamoe-convert hf-to-moe does (--src, --experts, --moe-layers 0,2,
    --calib-jsonl, --calib-prefix); the former spellings are hidden aliases onto the same fields."""
    import argparse

    from megamoe.construct import __main__ as construct_cli
    text = _help("megamoe-construct", ["--help"], capsys)
    for new in ("--src", "--experts E", "--moe-layers", "--calib-jsonl", "--calib-prefix"):
        assert new in text, new
    opts = text.split("options:", 1)[1].replace("--moe-layers", "").replace("--calib-", "")
    for old in ("--model", "--num-experts", "--layers", "--jsonl", "--data-prefix"):
        assert old not in opts, old                                   # hidden aliases
    seen = []
    real_parse = argparse.ArgumentParser.parse_args

    def spy(self, args=None, namespace=None):
        ns = real_parse(self, args, namespace)
        seen.append(ns)
        return ns
    argparse.ArgumentParser.parse_args = spy
    try:
        for argv in (["--src", "/no/dir", "--experts", "4", "--moe-layers", "0,2", "--calib-jsonl", "a=x.jsonl",
                      "b=y.jsonl"],
                     ["--model", "/no/dir", "--num-experts", "4", "--layers", "0", "2", "--jsonl", "a=x.jsonl",
                      "--jsonl", "b=y.jsonl"]):
            rc = construct_cli.main([*argv, "--out", "/tmp/x", "--method", "random"])
            err = capsys.readouterr().err
            assert rc == 2 and "/no/dir" in err, err        # past the flags: the missing model directory
    finally:
        argparse.ArgumentParser.parse_args = real_parse
    new, old = seen
    assert (new.model, new.num_experts, new.layers, new.jsonl) == (old.model, old.num_experts, old.layers, old.jsonl) \
        == ("/no/dir", 4, [0, 2], ["a=x.jsonl", "b=y.jsonl"])
    with pytest.raises(SystemExit):
        construct_cli.main(["--out", "y", "--method", "random"])
    assert "--src, --experts" in capsys.readouterr().err


@pytest.mark.parametrize("tool,cmd", [("plot_routing.py", "megamoe-plot"), ("preprocess_data.py", "megamoe-preprocess"),
                                      ("checkpoint_convert.py", "megamoe-convert"),
                                      ("build_local_corpus.py", "megamoe-corpus local"),
                                      ("build_chat_corpus.py", "megamoe-corpus chat")])
def test_tools_are_the_commands(tool, cmd):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), "--help"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: {cmd}")


def test_logging_follows_the_current_stderr_and_rebinds_closed_streams(capsys, monkeypatch):
    """CI ran megamoe-lm-eval twice in one process: lm_eval's own handler (set up once per process) still held the
    stderr of an earlier, closed capture, and every record printed a '--- Logging error ---' traceback. After
    setup_logging such handlers write to the current stderr, and megamoe's own handler follows sys.stderr."""
    import io
    import logging

    from megamoe import console
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    lib = logging.getLogger("some_library_like_lm_eval")
    dead = io.StringIO()
    stale = logging.StreamHandler(dead)
    lib.addHandler(stale)
    dead.close()
    try:
        console.setup_logging("info")
        lib.warning("library says hello")
        logging.getLogger("megamoe.test").warning("megamoe says hello")
        err = capsys.readouterr().err
        assert "library says hello" in err and "megamoe says hello" in err, err
        assert "Logging error" not in err and "Traceback" not in err, err
        assert isinstance(root.handlers[0], console._StderrHandler)
        other = io.StringIO()
        monkeypatch.setattr(sys, "stderr", other)
        logging.getLogger("megamoe.test").warning("to the new stderr")
        assert "to the new stderr" in other.getvalue()
    finally:
        lib.removeHandler(stale)
