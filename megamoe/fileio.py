"""Atomic small-file writes: a reader sees the old file or the new one, never a half-written one.

`atomic_write_text(path, text)` writes to a temporary file in the same directory, fsyncs it and renames it over
`path`; on any error (or interrupt) the temporary file is removed and the old `path`, if any, is untouched. Used for
every manifest, summary, config and partition file megamoe writes (large outputs stream into temporary names of
their own and are renamed the same way)."""

from __future__ import annotations

import os
import tempfile

__all__ = ["atomic_write_text"]


def atomic_write_text(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
