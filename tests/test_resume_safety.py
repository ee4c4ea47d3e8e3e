"""--resume never executes code from a checkpoint directory, and a corrupt newest checkpoint falls back to the newest
one that loads (issue 14). A run of the tiny config saves at steps 2 and 4; each test damages a copy of it."""

import io
import logging
import os
import pickle
import shutil
import subprocess

import pytest
import torch
from test_train import tiny

from megamoe.errors import CheckpointError

STEP2, STEP4 = "step_00000002", "step_00000004"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4, and its losses."""
    from megamoe.training.trainer import run
    out = tmp_path_factory.mktemp("resume") / "run"
    s = run(tiny(out, train__steps=4, checkpoint__interval=2, checkpoint__keep_last=3))
    assert sorted(os.listdir(out / "checkpoints")) == ["config.yaml", "latest", STEP2, STEP4]
    return out, s["losses"]


def _copy(saved, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved[0], out)
    return out


class _Evil:
    """Unpickling this calls `fn(*args)`: what a crafted checkpoint file would do."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker):
    return {
        "os.system": _Evil(os.system, (f"touch {marker}",)),
        "builtins.exec": _Evil(exec, (f"open({str(marker)!r}, 'w').close()",)),
        "subprocess": _Evil(subprocess.check_call, (["touch", str(marker)],)),
    }


@pytest.mark.parametrize("how", ["os.system", "builtins.exec", "subprocess"])
def test_crafted_metadata_does_not_run_code(saved, tmp_path, how):
    """Guards against torch's checkpoint reader unpickling `.metadata` without restriction: a crafted file whose
    unpickling would create a file must not create it; resuming fails with a CheckpointError naming the file and
    the forbidden global (and so does loading that checkpoint directly)."""
    from megamoe.training.checkpoint import CheckpointManager
    from megamoe.training.trainer import run
    out = _copy(saved, tmp_path)
    marker = tmp_path / "pwned"
    shutil.rmtree(out / "checkpoints" / STEP2)
    (out / "checkpoints" / STEP4 / ".metadata").write_bytes(pickle.dumps(_payloads(marker)[how]))
    forbidden = {"os.system": "posix.system", "builtins.exec": "builtins.exec",
                 "subprocess": "subprocess.check_call"}[how]
    named = rf"{STEP4}/\.metadata: refers to {forbidden}"
    with pytest.raises(CheckpointError, match=named):
        run(tiny(out, train__steps=6, checkpoint__interval=2, checkpoint__resume=True))
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=named):
        CheckpointManager(str(out / "checkpoints")).load(str(out / "checkpoints" / STEP4), None, None)
    assert not marker.exists()


def test_crafted_common_state_does_not_run_code(saved, tmp_path):
    """megatron's common.pt is read with torch.load: a crafted one (weights_only off by an environment variable)
    would run code. It is read with weights_only=True whatever the environment says, and refused by name."""
    from megamoe.training.checkpoint import CheckpointManager
    out = _copy(saved, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"optimizer": _payloads(marker)["os.system"]}, out / "checkpoints" / STEP4 / "common.pt")
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with pytest.raises(CheckpointError, match=rf"{STEP4}/common\.pt: refers to posix\.system"):
            CheckpointManager(str(out / "checkpoints")).load(str(out / "checkpoints" / STEP4), None, None)
    finally:
        del os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]
    assert not marker.exists()


def test_crafted_checkpoint_falls_back_to_the_older_one(saved, tmp_path, caplog):
    """With an older good checkpoint beside a crafted newest one, --resume uses the older one and the warning names
    the crafted file and its global; nothing runs."""
    from megamoe.training.trainer import run
    out = _copy(saved, tmp_path)
    marker = tmp_path / "pwned"
    (out / "checkpoints" / STEP4 / ".metadata").write_bytes(pickle.dumps(_payloads(marker)["os.system"]))
    with caplog.at_level(logging.WARNING, logger="megamoe.train"):
        s = run(tiny(out, train__steps=4, checkpoint__interval=2, checkpoint__resume=True))
    assert s["start_step"] == 2 and not marker.exists()
    assert any(f"{STEP4}/.metadata: refers to posix.system" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------------------------
# corrupt newest checkpoint (COMPLETE present): fall back, name the bad file

def _truncate_distcp(d):
    f = sorted(p for p in os.listdir(d) if p.endswith(".distcp"))[-1]
    p = os.path.join(d, f)
    with open(p, "r+b") as fh:
        fh.truncate(os.path.getsize(p) // 2)
    return rf"{f}: truncated"


def _garbage_train_state(d):
    with open(os.path.join(d, "train_state.json"), "w") as f:
        f.write('{"step": 4, "tokens": ')
    return r"train_state\.json: not valid JSON"


def _missing_train_state(d):
    os.remove(os.path.join(d, "train_state.json"))
    return r"train_state\.json: missing"


def _missing_rank_state(d):
    os.remove(os.path.join(d, "rank_00000.json"))
    return r"rank_00000\.json: missing"


def _truncated_index(d):
    p = os.path.join(d, ".metadata")
    with open(p, "r+b") as fh:
        fh.truncate(100)
    return r"\.metadata: unreadable"


CORRUPTIONS = {"truncated .distcp": _truncate_distcp, "bad train_state.json": _garbage_train_state,
               "missing train_state.json": _missing_train_state, "missing rank state": _missing_rank_state,
               "truncated .metadata": _truncated_index}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back(saved, tmp_path, caplog, case):
    """Guards against a damaged newest checkpoint (COMPLETE present, `latest` naming it) stopping --resume with a
    traceback or loading garbage: the resume picks step 2, and the warning names the damaged file."""
    from megamoe.training.checkpoint import CheckpointManager
    out = _copy(saved, tmp_path)
    ck = out / "checkpoints"
    named = CORRUPTIONS[case](str(ck / STEP4))
    assert (ck / "latest").read_text().strip() == STEP4 and (ck / STEP4 / "COMPLETE").is_file()
    with caplog.at_level(logging.WARNING, logger="megamoe.train"):
        assert CheckpointManager(str(ck)).find_latest() == str(ck / STEP2)
    msgs = "\n".join(r.getMessage() for r in caplog.records)
    assert "falling back to step_00000002" in msgs
    import re
    assert re.search(rf"{STEP4}/{named}", msgs), msgs


def test_fallback_resume_reproduces_the_run(saved, tmp_path):
    """After the fallback, training continues from step 2 exactly as the original run did (losses of steps 3-4
    equal), and rewrites step 4 over the damaged one."""
    from megamoe.training.checkpoint import CheckpointManager
    from megamoe.training.trainer import run
    out = _copy(saved, tmp_path)
    _truncate_distcp(str(out / "checkpoints" / STEP4))
    s = run(tiny(out, train__steps=4, checkpoint__interval=2, checkpoint__keep_last=3, checkpoint__resume=True))
    assert s["start_step"] == 2
    assert {k: s["losses"][k] for k in (3, 4)} == {k: saved[1][k] for k in (3, 4)}
    assert CheckpointManager(str(out / "checkpoints")).find_latest() == str(out / "checkpoints" / STEP4)


def test_no_loadable_checkpoint_is_a_clear_error(saved, tmp_path):
    """Every checkpoint damaged: one CheckpointError that names each bad file, not a traceback from deep inside
    torch."""
    from megamoe.training.trainer import run
    out = _copy(saved, tmp_path)
    _truncate_distcp(str(out / "checkpoints" / STEP4))
    _garbage_train_state(str(out / "checkpoints" / STEP2))
    with pytest.raises(CheckpointError, match=r"no checkpoint can be resumed from: .*step_00000004/__.*truncated.*"
                                              r"step_00000002/train_state\.json: not valid JSON"):
        run(tiny(out, train__steps=4, checkpoint__interval=2, checkpoint__resume=True))


def test_byte_objects_in_distcp_are_checked(tmp_path):
    """Defence in depth: a `.metadata` made only of allowed classes can mark an entry as a byte object, which torch's
    load planner unpickles with weights_only=False (shown first with torch's own reader: the payload runs). Through
    our reader such bytes must pass torch.load(weights_only=True) first: refused, nothing runs. (megatron's shape
    validation stops this for ShardedTensors before any read; a ShardedObject would reach it.)"""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex

    from megamoe.training.safe_load import _SafeFileSystemReader, our_errors
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(_payloads(marker)["os.system"], buf)
    (tmp_path / "evil.distcp").write_bytes(buf.getvalue())
    md = Metadata(state_dict_metadata={"obj": BytesStorageMetadata()},
                  storage_data={MetadataIndex("obj"): _StorageInfo("evil.distcp", 0, len(buf.getvalue()))})
    (tmp_path / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError, match=r"byte object 'obj'.*refers to posix\.system"), our_errors():
        dcp.load({"obj": io.BytesIO()}, storage_reader=_SafeFileSystemReader(str(tmp_path)), no_dist=True)
    assert not marker.exists()
    dcp.load({"obj": io.BytesIO()}, storage_reader=FileSystemReader(str(tmp_path)), no_dist=True)
    assert marker.exists(), "the reference path no longer runs the payload: this test lost its point"


@pytest.mark.parametrize("how", ["enospc", "zip"])
def test_full_disk_during_a_save_is_a_clear_error(tmp_path, monkeypatch, how):
    """A save that fails because the disk is full (ENOSPC, or torch's zip writer's bare "unexpected pos 704 vs 598"
    with no space left, as seen when the VM's disk filled) is one CheckpointError naming the disk and the last
    complete checkpoint, which stays the one --resume finds; any other failure propagates unchanged."""
    import errno
    from megamoe.training import checkpoint as C
    from megamoe.training.trainer import run
    real, real_usage = C.CheckpointManager._write, shutil.disk_usage

    def failing(self, tmp, step, *a, **k):
        if step == 4:
            if how == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device")
            monkeypatch.setattr(C.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100 << 30, 100 << 30, 52 << 10))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real(self, tmp, step, *a, **k)
    monkeypatch.setattr(C.CheckpointManager, "_write", failing)
    with pytest.raises(CheckpointError, match=r"step 4 could not be saved: the disk holding .* is full .*"
                                              + STEP2 + r".*--resume"):
        run(tiny(tmp_path, train__steps=4, checkpoint__interval=2))
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == STEP2
    monkeypatch.setattr(C.shutil, "disk_usage", real_usage)
    monkeypatch.setattr(C.CheckpointManager, "_write",
                        lambda self, tmp, step, *a, **k: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        run(tiny(tmp_path / "other", train__steps=2, checkpoint__interval=2))
