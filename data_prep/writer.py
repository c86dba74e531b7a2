"""Atomic, deterministic output.

Every file data_prep writes goes to a temporary name in the destination folder first and is then renamed over the
target with :func:`os.replace`, which is atomic on POSIX: a reader sees the old file or the new one, never half of one.
The JSON text is deterministic (fixed key order, ``indent=2``, no timestamps, trailing newline), so re-running with
the same options produces a byte-identical datalist.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def dumps_datalist(obj: dict[str, Any]) -> str:
    """Serialise a datalist the same way every time (insertion order is built deterministically by the caller)."""
    return json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; datalists are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj: dict[str, Any]) -> None:
    """Write a datalist JSON atomically and deterministically."""
    write_bytes_atomic(path, dumps_datalist(obj).encode("utf-8"))


def gzip_deterministic(data: bytes) -> bytes:
    """gzip with ``mtime=0`` and no file name, so that ``.nii.gz`` outputs are byte-identical across runs."""
    return gzip.compress(data, compresslevel=6, mtime=0)


class StagingDir:
    """A folder of generated images (PNG/NIfTI) that replaces its previous version in one step.

    Files are written under ``<final>.tmp-XXXX``; :meth:`commit` moves the old folder aside, renames the new one into
    place and removes the old one. Only folders created by data_prep inside the output directory are ever removed;
    nothing under SRC is touched.
    """

    def __init__(self, final: str | os.PathLike):
        self.final = Path(final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-", dir=self.final.parent))
        os.chmod(self.path, 0o755)

    def commit(self) -> None:
        """Swap the staged folder into place."""
        old = None
        if self.final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.old-", dir=self.final.parent))
            os.rmdir(old)
            os.replace(self.final, old)
        os.replace(self.path, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Remove the staged folder (after an error)."""
        shutil.rmtree(self.path, ignore_errors=True)
