"""What a run killed with -9 leaves behind (issue 14): temporaries carry their owner (pid@host); the next run removes
those whose owner is gone and leaves a live one alone; directory scans never read them as data."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from megamoe.fileio import owner_tag, remove_stale_temps, temp_owner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture
def live_pid():
    p = subprocess.Popen(["sleep", "300"])
    yield p.pid
    p.kill()
    p.wait()


def _run_until(script: str, marker, timeout=180) -> int:
    """Start `script` (python) in its own session, wait until it creates `marker`, kill it with -9; its pid."""
    p = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    t0 = time.time()
    while not os.path.exists(marker):
        if p.poll() is not None:
            pytest.fail(f"the run ended before the kill point (exit {p.returncode}):\n{p.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout:
            os.killpg(p.pid, signal.SIGKILL)
            pytest.fail("the run did not reach the kill point")
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    p.stderr.close()
    return p.pid


def test_stale_temps_removed_live_and_foreign_kept(tmp_path, live_pid):
    """Unit: a temporary of a dead process (this host) goes; one of a live process, one of another host, and data
    files stay."""
    dead = _dead_pid()
    host = owner_tag().split("@")[1]
    names = {"dead": f".out.ab12cd.{dead}@{host}.tmp", "live": f".out.ef34ab.{live_pid}@{host}.tmp",
             "foreign": f".out.cd56ef.{dead}@elsewhere-node.tmp", "data": "out.jsonl"}
    for k, n in names.items():
        (tmp_path / n).mkdir() if k != "data" else (tmp_path / n).write_text("{}\n")
    removed = remove_stale_temps(str(tmp_path))
    assert [os.path.basename(p) for p in removed] == [names["dead"]]
    assert sorted(os.listdir(tmp_path)) == sorted(v for k, v in names.items() if k != "dead")


# ---------------------------------------------------------------------------------------------------------------
# a conversion killed with -9

CONVERT = """
import os, sys, time
sys.path.insert(0, {tests!r})
import megamoe.interchange.dense_to_moe as d
def stop_here(src, dst):  # every shard is written; the output is still the hidden temporary directory
    open({marker!r}, "w").close()
    time.sleep(600)
d.copy_tokenizer = stop_here
from megamoe import parallel
parallel.initialize()
d.hf_to_moe({src!r}, {out!r}, num_experts=4, top_k=2, progress=False)
"""


def test_killed_conversion_is_cleaned_by_the_next_run(tmp_path, live_pid):
    """Guards against a conversion killed with -9 leaving its hidden temporary directory (all shards written: up to
    the model's size) that no later run removes. The temporary names its owner; the next conversion into the same
    parent directory removes it (owner gone), succeeds, and leaves alone a temporary whose owner is alive."""
    from test_e2e_train import tiny_llama_dir

    from megamoe.interchange import hf_to_moe
    dense = tiny_llama_dir(tmp_path / "dense")
    work = tmp_path / "ckpts"
    work.mkdir()
    out, marker = work / "moe", tmp_path / "reached"
    pid = _run_until(CONVERT.format(tests=os.path.dirname(__file__), marker=str(marker), src=dense, out=str(out)),
                     marker)
    left = [n for n in os.listdir(work) if n.startswith(".moe.")]
    assert len(left) == 1 and temp_owner(left[0]) == (pid, owner_tag().split("@")[1]), left
    assert any(f.endswith(".safetensors") for f in os.listdir(work / left[0])) and not out.exists()
    live = work / f".other.0a1b2c.{live_pid}@{owner_tag().split('@')[1]}.tmp"
    live.mkdir()
    hf_to_moe(dense, str(out), num_experts=4, top_k=2, progress=False)
    assert sorted(os.listdir(work)) == sorted(["moe", live.name]), os.listdir(work)


# ---------------------------------------------------------------------------------------------------------------
# preprocessing killed with -9

PREPROCESS = """
import sys, time
import megamoe.data.indexed as ix
real = ix.IndexedWriter.append_bin_file
def stop_here(self, path, sizes):  # a part is merged: parts dir and .bin temporaries exist
    real(self, path, sizes)
    open({marker!r}, "w").close()
    time.sleep(600)
ix.IndexedWriter.append_bin_file = stop_here
sys.path.insert(0, {tools!r})
import preprocess_data
sys.exit(preprocess_data.main({args!r}))
"""


def _jsonl(path, n, tag):
    import json
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"{tag} document number {i}: " + "lorem ipsum dolor sit amet " * 20}) + "\n")


def test_killed_preprocessing_is_cleaned_and_never_read_as_data(tmp_path, smollm2_dir, live_pid):
    """Guards against a preprocessing killed with -9 leaving `<prefix>.parts...tmp/` and `.bin` temporaries that no
    run removes, and `--per-domain` then taking the stale parts directory for a domain. Now the domain scan skips
    hidden and temporary names, and the next preprocessing of that prefix removes the dead run's temporaries,
    succeeds, and leaves a live one alone."""
    from megamoe.data.preprocess import PreprocessConfig, preprocess_domains
    root = tmp_path / "corpus"
    _jsonl(root / "wiki" / "a.jsonl", 400, "wiki")
    _jsonl(root / "code" / "b.jsonl", 50, "code")
    marker = tmp_path / "reached"
    args = ["--input", str(root / "wiki"), "--output-prefix", str(root / "wiki"), "--tokenizer", smollm2_dir,
            "--workers", "1", "--chunk-mb", "0.01", "--quiet"]
    pid = _run_until(PREPROCESS.format(marker=str(marker), tools=os.path.join(REPO, "tools"), args=args), marker)
    left = sorted(n for n in os.listdir(root) if temp_owner(n) is not None)
    assert any(".parts." in n for n in left) and any(".bin." in n for n in left), os.listdir(root)
    assert all(temp_owner(n)[0] == pid for n in left)
    assert not (root / "wiki_text_document.idx").exists()

    cfg = PreprocessConfig(workers=1, progress=False)
    manifest = preprocess_domains(str(root), str(tmp_path / "out"), smollm2_dir, cfg)
    assert sorted(manifest["domains"]) == ["code", "wiki"]

    live = root / f"wiki_text_document.bin.0a1b2c.{live_pid}@{owner_tag().split('@')[1]}.tmp"
    live.write_bytes(b"")
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import preprocess_data
    assert preprocess_data.main(args) == 0
    assert (root / "wiki_text_document.idx").is_file()
    assert sorted(n for n in os.listdir(root) if temp_owner(n) is not None) == [live.name]


# ---------------------------------------------------------------------------------------------------------------
# training checkpoints: step_N.tmp of a live save is left alone

def test_checkpoint_tmp_of_a_live_save_is_left_alone(tmp_path, live_pid, monkeypatch):
    """Guards against a save deleting every `step_N.tmp` in the checkpoint directory, including one another live
    run is writing: only saves whose OWNER process is gone (or unowned and old), or that an earlier attempt of this
    torchrun job wrote (on whatever host), are removed."""
    from megamoe.training.checkpoint import OWNER, STALE_UNOWNED_S, CheckpointManager
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    host = owner_tag().split("@")[1]
    dirs = {"live": ("step_00000008.tmp", f"{live_pid}@{host}"), "dead": ("step_00000006.tmp", f"{_dead_pid()}@{host}"),
            "old_unowned": ("step_00000004.tmp", None), "fresh_unowned": ("step_00000010.tmp", None),
            "other_host": ("step_00000012.tmp", f"{_dead_pid()}@elsewhere-node\njob=job3 attempt=0"),
            "earlier_attempt": ("step_00000014.tmp", f"{_dead_pid()}@elsewhere-node\njob=job7 attempt=0")}
    for name, owner in dirs.values():
        (tmp_path / name).mkdir()
        if owner:
            (tmp_path / name / OWNER).write_text(owner + "\n")
    old = time.time() - STALE_UNOWNED_S - 5
    os.utime(tmp_path / "step_00000004.tmp", (old, old))
    CheckpointManager(str(tmp_path))._remove_stale_tmp()
    assert sorted(os.listdir(tmp_path)) == sorted(dirs[k][0] for k in ("live", "fresh_unowned", "other_host"))


def test_temporary_names_are_recognised():
    from megamoe.fileio import is_temp_name, temp_path
    for n in (os.path.basename(temp_path("/x/moe", hidden=True)), "wiki.parts.123.tmp", ".moe.tmp-a1b2c3d4",
              "a.jsonl.77.tmp"):
        assert is_temp_name(n), n
    for n in ("wiki", "a.jsonl", "tmp", "step_00000002"):
        assert not is_temp_name(n), n
    assert re.fullmatch(r"\.moe\.[0-9a-f]{6}\.\d+@[A-Za-z0-9-]+\.tmp", os.path.basename(temp_path("/x/moe", True)))
