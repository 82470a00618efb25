"""Atomic file writes: write to a temporary file in the same folder, then rename over the target,
so a killed process never leaves a half-written checkpoint, CSV or JSON behind.

The target is checked first (:func:`surgery.storage.safety.check_output`): a symbolic link, device,
folder, read-only file or one of the command's inputs is never replaced. Temporaries carry the
writer's pid; those of killed runs are removed on the next write to the same folder. A full disk
is one :class:`~surgery.storage.safety.OutputError` line ("no space left on device ..."), the target
unchanged and the temporary removed."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .safety import check_output, clean_stale_temporaries, no_space, tmp_prefix


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` if the block succeeds and is
    removed if it fails."""
    path = Path(path)
    check_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path.parent, path.name)
    fd, name = tempfile.mkstemp(prefix=tmp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        try:
            yield tmp
        except Exception as e:
            full = no_space(e, path, free=_free_bytes(path.parent))
            if full is not None:
                raise full from e
            raise
        umask = os.umask(0)  # mkstemp creates 0600; give the file the permissions open() would
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        check_output(path)  # still not a link / device / input after the work
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """``open()`` for writing, atomically (flushed and fsynced before the rename)."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
        f.flush()  # a full disk shows here (or at close) at the latest, before the rename
        os.fsync(f.fileno())


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` to ``path`` whole or not at all: a failed write (a full disk) truncates the
    file back to its previous length and raises one :class:`~surgery.storage.safety.OutputError` line."""
    data = text.encode()
    existed = os.path.lexists(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
                if not existed:  # created by this call: not left behind empty
                    os.unlink(path)
            full = no_space(e, path)
            if full is not None:
                raise full from e
            raise
    finally:
        os.close(fd)
