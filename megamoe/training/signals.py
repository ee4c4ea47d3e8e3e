"""Stopping a run cleanly: SIGTERM / SIGINT become a flag that the loop checks at the next step boundary (then it
saves a checkpoint and exits; resume with --resume). Collective: any rank that got the signal stops all ranks."""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger("megamoe.train")


class StopSignal:
    """SIGTERM/SIGINT -> a flag the loop checks at the next step boundary (then it saves and exits). A second
    SIGINT (Ctrl-C twice) interrupts at once, without saving."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.requested = None
        self._old = {}
        for s in signals:
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread
                pass

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s: saving a checkpoint after this step, then exiting (Ctrl-C again to stop at once)",
                    self.requested)

    def should_stop(self, extra: bool = False) -> bool:
        """Collective when distributed: any rank that got the signal (or passes `extra`) stops all ranks."""
        flag = torch.tensor([1.0 if (self.requested or extra) else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)
