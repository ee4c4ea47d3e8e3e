"""How a command ends: one line on stderr and the documented exit status (megamoe/errors.py), never a traceback
for a problem with the user's input or outputs. A bug (any other exception) keeps its traceback and exits 5.

    def main(argv=None) -> int:
        args = build_parser().parse_args(argv)
        return run_command("megamoe-convert", lambda: run(args), outputs=[args.out])
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Callable

from megamoe.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, MegamoeError, exit_code

__all__ = ["run_command", "describe_os_error"]

_WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
                 errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                 errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large"}


def describe_os_error(e: OSError, outputs=()) -> str:
    """'cannot write OUT: the disk is full (...)' for write failures; the file and reason otherwise."""
    reason = _WRITE_ERRNOS.get(e.errno)
    where = next((o for o in outputs if o), None) or e.filename  # the user's path, not our temporary sibling
    if reason is not None:
        return (f"cannot write {where or 'the output'}: {reason} ({e.strerror}); nothing half-written was kept"
                if where else f"cannot write the output: {reason} ({e.strerror})")
    return f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}"


def run_command(prog: str, fn: Callable[[], int | None], outputs=()) -> int:
    """Run `fn`; map what it raises to one line and an exit status."""
    try:
        rc = fn()
        return EXIT_OK if rc is None else int(rc)
    except MegamoeError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        if not (isinstance(e, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError))
                or e.errno in _WRITE_ERRNOS):
            return _internal(prog)
        print(f"{prog}: error: {describe_os_error(e, [os.path.abspath(o) for o in outputs if o])}", file=sys.stderr)
        return exit_code(e)
    except Exception:  # noqa: BLE001 - a bug: keep the traceback
        return _internal(prog)


def _internal(prog: str) -> int:
    traceback.print_exc()
    print(f"{prog}: internal error (a bug in megamoe; please report it with the traceback above)", file=sys.stderr)
    return EXIT_INTERNAL
