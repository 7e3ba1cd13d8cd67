"""Atomic outputs: write to a temporary sibling, then rename, so a killed stage never leaves half a file.

The temporary sibling is a folder ``.<name>.<pid>@<host>.<random>.tmp`` next to the target. A SIGKILL leaves it
behind (no ``finally`` runs); the next write of the same target removes every such folder whose writer
process is gone, so a killed-and-rerun stage ends with exactly the files of an uninterrupted one.

Hosts: in a folder several machines share (NFS, a multi-host ``accelerate launch``) a process id means something
only on the host that wrote it, so a writer judges its own host's temporaries by their process, and another host's
only by age: older than ``FOREIGN_STALE_S``, its writer is taken for dead. Names without a host (older digiq) count
as this host's.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FOREIGN_STALE_S = 24 * 3600.0  # another host's temporary older than this is removed: no write takes a day


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it replaces ``target`` (file or folder).

    A folder cannot be renamed over a non-empty one: the old folder is first moved into the temporary
    folder (removed with it), so a kill between the two renames leaves no target rather than half of one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}@{host_tag()}.", suffix=".tmp", dir=target.parent))
    tmp_target = tmp / target.name
    try:
        yield tmp_target
        if target.is_dir() and not target.is_symlink():
            os.replace(target, tmp / ".old")
        os.replace(tmp_target, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def host_tag() -> str:
    """This host's name as it appears in temporary names (dots would end the field: replaced)."""
    return socket.gethostname().replace(".", "_") or "localhost"


def remove_stale_temps(target: str | Path) -> list[Path]:
    """Delete the temporary siblings of ``target`` left by writers that no longer run (killed); return them."""
    target = Path(target)
    removed = []
    for path in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        if _stale(path.name[len(target.name) + 2:].split(".", 1)[0], path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _stale(owner: str, path: Path) -> bool:
    """Whether the writer ``<pid>@<host>`` (or a bare ``<pid>``: this host) of the temporary ``path`` is gone."""
    pid, _, host = owner.partition("@")
    if not pid.isdigit():
        return False
    if host and host != host_tag():
        try:
            return time.time() - path.stat().st_mtime > FOREIGN_STALE_S
        except FileNotFoundError:
            return False
    return not _alive(int(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | Path, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def write_json(target: str | Path, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
