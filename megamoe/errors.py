"""Every kind of failure megamoe reports to a user, with the exit status its commands give it.

| class | exit | meaning |
|---|---|---|
| `GuardError` | 1 | a conversion's guard refused the result (logits differ); the output was removed |
| `InputError` | 2 | bad input: a config field, a file or line, a flag; the message names it and what was expected |
| `ConfigError` | 2 | a configuration value (dotted field name first) |
| `CheckpointError` | 2 | a checkpoint file or directory is missing, malformed, corrupt or inconsistent (names the file, tensor) |
| `DataError` | 2 | a dataset or text file (names the file and line) |
| `OutputError` | 3 | an output cannot be written (read-only, unwritable, disk full); nothing half-written is left |
| `DistributedError` | 4 | a rank died, hung past the timeout, or the process group failed |
| anything else | 5 | an internal error (a bug in megamoe): the traceback is printed, please report it |

Exit 0 is success; 130 an interrupt by the user. `exit_code(exc)` maps an exception to its status; entry points
catch `MegamoeError` (and OSError for outputs) and print one line instead of a traceback.
"""

from __future__ import annotations

import errno

EXIT_OK, EXIT_GUARD, EXIT_INPUT, EXIT_OUTPUT, EXIT_DISTRIBUTED, EXIT_INTERNAL = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130


class MegamoeError(Exception):
    """Base of every failure megamoe reports as one line."""
    exit_code = EXIT_INPUT


class InputError(MegamoeError, ValueError):
    """Bad input; the message names the file, line, field or flag and what was expected."""
    exit_code = EXIT_INPUT


class ConfigError(InputError):
    """A configuration value is wrong. The message starts with the dotted field name."""


class CheckpointError(InputError):
    """A checkpoint file or directory is missing, malformed, corrupt or inconsistent. The message names the file."""


class DataError(InputError):
    """A dataset or text input is malformed. The message names the file (and line)."""


class GuardError(MegamoeError, RuntimeError):
    """The converted checkpoint does not reproduce its source; the output has been removed."""
    exit_code = EXIT_GUARD


class OutputError(MegamoeError, OSError):
    """An output cannot be written (read-only, no permission, disk full); what was partly written is removed."""
    exit_code = EXIT_OUTPUT


class DistributedError(MegamoeError, RuntimeError):
    """A rank died or hung past the timeout, or the process group failed."""
    exit_code = EXIT_DISTRIBUTED


_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}


def exit_code(exc: BaseException) -> int:
    """The documented exit status of an exception (a raw OSError about writing counts as an output failure)."""
    if isinstance(exc, MegamoeError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, OSError) and exc.errno in _OUTPUT_ERRNOS:
        return EXIT_OUTPUT
    if isinstance(exc, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)):
        return EXIT_INPUT
    return EXIT_INTERNAL
