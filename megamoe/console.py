"""What the commands print: logging set up once per process (rank 0 at INFO, other ranks at WARNING, or the level a
command's `--log-level` asks for), and the library warnings that say nothing to a user (megatron without TE/apex,
torch.distributed deprecations) silenced.

    p = argparse.ArgumentParser(...)
    add_log_level(p)                      # --log-level {debug,info,warning,error} (every megamoe command has it)
    args = p.parse_args(argv)
    setup_logging(args.log_level)

Without `--log-level`, the environment variable MEGAMOE_LOG_LEVEL sets the level of rank 0 (for commands started by
scripts); ranks other than 0 stay at WARNING unless a level is given explicitly.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

__all__ = ["setup_logging", "quiet_library_warnings", "add_log_level", "LOG_LEVELS"]

LOG_LEVELS = ("debug", "info", "warning", "error")


def add_log_level(parser: argparse.ArgumentParser):
    """Add `--log-level` to a command's parser (default: info on rank 0, warning elsewhere)."""
    parser.add_argument("--log-level", choices=LOG_LEVELS, type=str.lower, default=None,
                        help="logging verbosity (default: info on rank 0, warning on the other ranks; "
                             "also MEGAMOE_LOG_LEVEL)")


def _asked(level: str | None) -> int | None:
    """The level given by --log-level, else by MEGAMOE_LOG_LEVEL on rank 0; None when neither is set (or invalid)."""
    name = level or (os.environ.get("MEGAMOE_LOG_LEVEL") if int(os.environ.get("RANK", 0)) == 0 else None)
    value = logging.getLevelName(name.upper()) if name else None
    return value if isinstance(value, int) else None


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever sys.stderr is when a record is emitted (not the one at set-up): a command run
    twice in one process, under redirected or captured stderr, never writes to a stream closed since."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def _rebind_closed_streams():
    """Handlers that libraries bound to a sys.stderr/stdout closed since (lm_eval's, set up once per process) write
    to the current sys.stderr instead of failing with a '--- Logging error ---' traceback on every record."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                        if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            if (type(h) is logging.StreamHandler and getattr(h.stream, "closed", False)):
                with h.lock:          # not setStream: it flushes the closed stream first
                    h.stream = sys.stderr


def setup_logging(level: str | None = None, fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s"):
    """Configure the root logger of a command. A level asked for explicitly is applied even when a handler is
    already installed (basicConfig alone would ignore it)."""
    asked = _asked(level)
    default = logging.INFO if int(os.environ.get("RANK", 0)) == 0 else logging.WARNING
    root = logging.getLogger()
    if not root.handlers:   # as logging.basicConfig, with a handler that follows sys.stderr
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(default if asked is None else asked)
    if asked is not None:
        root.setLevel(asked)
    _rebind_closed_streams()
    quiet_library_warnings()


def quiet_library_warnings():
    for mod in ("megatron", "torch.distributed", "megamoe.compat", "torch.utils.checkpoint"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=mod)
        warnings.filterwarnings("ignore", category=UserWarning, module=mod)
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*.grad attribute of a Tensor that is not a leaf.*")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    logging.getLogger("megatron.core").setLevel(logging.WARNING)


# filters first, at import: entry points import this module before megatron, whose imports warn
quiet_library_warnings()
