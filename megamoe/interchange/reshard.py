"""reshard: our shards -> the same model in another TP/EP/ETP layout; every tensor checked bit-identical."""

from __future__ import annotations

import os
import shutil
import time

import torch
from tqdm import tqdm

from megamoe.config import ParallelConfig
from megamoe.formats.shards import ShardedCheckpoint, check_output, reshard, staged_output
from megamoe.formats.tokenizer_files import TOKENIZER_FILES
from megamoe.interchange.common import summary
from megamoe.interchange.guard import GuardReport, check


def reshard_checked(src: str, out: str, tp: int = 1, ep: int = 1, etp: int = 1, progress: bool = True) -> dict:
    """Re-partition shards into another TP/EP/ETP layout; verifies that every tensor is bit-identical."""
    t0 = time.time()
    check_output(os.path.abspath(out))
    ck = ShardedCheckpoint(src)
    cfg = ck.config
    par = ParallelConfig(tp=tp, ep=ep, etp=etp).validate(cfg)
    report = GuardReport()
    with staged_output(out) as tmp:
        res = reshard(src, tmp, par, progress=progress)
        new = ShardedCheckpoint(tmp)
        try:
            bad = [n for n in tqdm(ck.names, desc="verify", disable=not progress, unit="tensor")
                   if not torch.equal(ck.get(n), new.get(n)) or ck.dtype(n) != new.dtype(n)]
        finally:
            new.close()
            ck.close()
        diff = 0.0 if not bad else float("inf")
        report.add(check(f"every tensor bit-identical ({len(ck.names)} tensors{'; differ: ' + ', '.join(bad[:3]) if bad else ''})",
                         torch.zeros(1), torch.full((1,), diff), 0.0))
        report.raise_if_failed(f"reshard {src} -> {out}")
        for f in TOKENIZER_FILES + ("partitions",):
            p = os.path.join(src, f)
            if os.path.isfile(p):
                shutil.copyfile(p, os.path.join(tmp, f))
            elif os.path.isdir(p):
                shutil.copytree(p, os.path.join(tmp, f))
    return summary("reshard", out, cfg, par, res["bytes"], t0, report)
