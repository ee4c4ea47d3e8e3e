"""Atomic writes and owned temporaries: a reader sees the old file or the new one, never a half-written one, and
what a killed run leaves behind is removed by the next run.

`atomic_write_text(path, text)` writes to a temporary file in the same directory, fsyncs it and renames it over
`path`; on any error (or interrupt) the temporary file is removed and the old `path`, if any, is untouched. Used for
every manifest, summary, config and partition file megamoe writes (large outputs stream into temporary names of
their own and are renamed the same way).

Temporaries carry their owner: `temp_path(path)` is `<dir>/<name>.<random>.<pid>@<host>.tmp` (`hidden=True` adds a
leading dot). A run killed with -9 cannot remove its temporaries; the next run that writes into the same directory
calls `remove_stale_temps(dir)`, which deletes every temporary there whose owner process is gone (same host, no
process with that pid) and leaves alone one whose owner is alive (another run writing there right now) or runs on
another host (a shared file system: its liveness cannot be checked from here). `is_temp_name(name)` says whether a
file or directory name is a temporary (ours, or one of the older forms `*.tmp`, `.<name>.tmp-*`), so readers that
scan a directory for data (`--per-domain`, corpus builders) skip it.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
import tempfile

__all__ = ["atomic_write_text", "owner_tag", "parse_owner", "temp_path", "is_temp_name", "temp_owner", "owner_alive",
           "remove_stale_temps"]

log = logging.getLogger("megamoe.fileio")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]) or "localhost"


def owner_tag(pid: int | None = None) -> str:
    """`<pid>@<host>` of this process (or of `pid` on this host)."""
    return f"{os.getpid() if pid is None else pid}@{_host()}"


_OURS = re.compile(r"\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.tmp$")
_OLDER = (re.compile(r"\.tmp$"), re.compile(r"^\..+\.tmp-[A-Za-z0-9_]+$"))  # `x.<pid>.tmp`, mkdtemp's `.x.tmp-abc`


def temp_path(path: str, hidden: bool = False) -> str:
    """A fresh temporary name beside `path`, owned by this process: `<name>.<random>.<pid>@<host>.tmp`."""
    d, name = os.path.split(os.path.abspath(path))
    return os.path.join(d, f"{'.' if hidden else ''}{name}.{secrets.token_hex(3)}.{owner_tag()}.tmp")


def is_temp_name(name: str) -> bool:
    """True for a temporary file or directory name (this module's, or the older `*.tmp` / `.x.tmp-*` forms)."""
    name = os.path.basename(name.rstrip("/"))
    return bool(_OURS.search(name)) or any(r.search(name) for r in _OLDER)


def temp_owner(name: str) -> tuple[int, str] | None:
    """(pid, host) recorded in a temporary's name, or None."""
    m = _OURS.search(os.path.basename(name.rstrip("/")))
    return (int(m.group("pid")), m.group("host")) if m else None


def parse_owner(tag: str) -> tuple[int, str] | None:
    """(pid, host) of an owner tag `<pid>@<host>` (owner_tag), or None."""
    m = re.fullmatch(r"(\d+)@([A-Za-z0-9-]+)", tag.strip())
    return (int(m.group(1)), m.group(2)) if m else None


def owner_alive(pid: int, host: str) -> bool:
    """Whether the owner may still be running: True unless it is on this host and no process has that pid."""
    if host != _host():
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user holds that pid
        return True
    return True


def remove_stale_temps(directory: str, prefix: str = "") -> list[str]:
    """Delete the temporaries in `directory` (names starting with `prefix`, when given) whose owner process is gone;
    returns the paths removed. Temporaries of live owners, of other hosts, and older unowned ones are left."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for n in names:
        if prefix and not n.startswith(prefix):
            continue
        owner = temp_owner(n)
        if owner is None or owner_alive(*owner):
            continue
        p = os.path.join(directory, n)
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
        except FileNotFoundError:
            continue  # another run removed it first
        except OSError as e:
            log.warning("could not remove the leftover temporary %s: %s", p, e)
            continue
        log.info("removed %s, left by a run that no longer exists (pid %d on %s)", p, *owner)
        removed.append(p)
    return removed


def atomic_write_text(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    remove_stale_temps(d, "." + os.path.basename(path) + ".")
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=f".{owner_tag()}.tmp", dir=d)
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
