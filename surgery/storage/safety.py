"""Writes that cannot destroy data.

- :func:`check_output` refuses an output that is a symbolic link, a device, a folder or anything
  but a regular file, an output that is one of the call's inputs (``retrain X --out X``), an
  unwritable folder (checked *before* the work starts) and a read-only file.
- :func:`protecting` marks input files for the duration of a command; the atomic writer refuses to
  replace them whatever path the output arrives by.
- Temporary files carry the writer's pid; :func:`clean_stale_temporaries` removes those whose
  process is gone (a killed run), never a live writer's.
- :class:`RunLock` holds an exclusive lock on a run folder (two sweeps on one folder refuse);
  :class:`OutputLock` one on an output file (two ``train --out same.pt`` refuse), removed after.
- :func:`no_space` turns a full disk (``ENOSPC``/``EDQUOT`` anywhere in an error's chain) into one
  :class:`OutputError` line naming the device.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ..errors import SurgeryError


class OutputError(SurgeryError):
    """An output path would destroy data or cannot be written."""


_PROTECTED: dict[str, str] = {}  # realpath -> how the user named it


def _key(path: str | Path) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


@contextlib.contextmanager
def protecting(paths: Iterable[str | Path | None]) -> Iterator[None]:
    """Within the block, no output may replace any of ``paths`` (the command's inputs)."""
    added = []
    for p in paths:
        if p is None or str(p) == "":
            continue
        k = _key(p)
        if k not in _PROTECTED and os.path.isfile(k):
            _PROTECTED[k] = str(p)
            added.append(k)
    try:
        yield
    finally:
        for k in added:
            _PROTECTED.pop(k, None)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_folder(path: str | Path, what: str = "output folder") -> Path:
    """A folder that exists and is writable, or that can be created."""
    p = Path(path)
    if p.is_symlink() and not p.is_dir():
        raise OutputError(f"{what} {p} is a symbolic link to nothing usable")
    if p.exists() and not p.is_dir():
        raise OutputError(f"{what} {p} is a file, not a folder")
    base = _nearest_existing(p)
    if not base.is_dir():
        raise OutputError(f"{what} {p}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {p}: cannot write in {base} (permission denied)")
    return p


def check_output(path: str | Path, *, inputs: Iterable[str | Path | None] = (), what: str = "output") -> Path:
    """Raise :class:`OutputError` unless ``path`` can be (re)written without destroying anything."""
    p = Path(path)
    if p.is_symlink():
        raise OutputError(
            f"{what} {p} is a symbolic link; surgery never replaces links: give the real path ({os.path.realpath(p)})"
        )
    if p.exists():
        mode = os.stat(p).st_mode
        if stat.S_ISDIR(mode):
            raise OutputError(f"{what} {p} is a folder; give a file name")
        if not stat.S_ISREG(mode):
            raise OutputError(f"{what} {p} is not a regular file (a device, pipe or socket); refusing to replace it")
        # the mode bits, not os.access alone: root passes os.access on a chmod 444 file
        if not os.access(p, os.W_OK) or not stat.S_IMODE(mode) & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
            raise OutputError(f"{what} {p} is read-only; refusing to replace it")
    key = _key(p)
    for inp in inputs:
        if inp is None or str(inp) == "":
            continue
        if _key(inp) == key or (p.exists() and _same_file(str(inp), str(p))):
            raise OutputError(f"{what} {p} is also an input ({inp}); writing it would destroy the input: choose another path")
    if key in _PROTECTED or (p.exists() and any(_same_file(k, str(p)) for k in _PROTECTED)):
        src = _PROTECTED.get(key, str(p))
        raise OutputError(f"{what} {p} is also an input ({src}); writing it would destroy the input: choose another path")
    check_folder(p.parent if str(p.parent) else Path("."), what=f"{what} {p}: folder")
    return p


# --------------------------------------------------------------------------------------------
# temporaries

_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


def name_key(name: str) -> str:
    """``name`` itself, or its sha256 (32 hex) when a temporary or lock file built from it
    (``.NAME.PID.XXXXXXXX.tmp``, ``.NAME.lock``) would pass the 255-byte file-name limit: a valid
    250-character output name must not be refused for the names of its helpers."""
    if len(os.fsencode(name)) <= 200:
        return name
    import hashlib  # only here: the one use

    return hashlib.sha256(os.fsencode(name)).hexdigest()[:32]


def tmp_prefix(path: Path) -> str:
    return f".{name_key(path.name)}.{os.getpid()}."


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(folder: str | Path, name: str | None = None) -> list[Path]:
    """Remove ``.NAME.PID.XXXX.tmp`` files in ``folder`` left by processes that no longer run."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _TMP.match(e.name)
        # NAME's own temporaries, and those of its temporaries (a pending checkpoint being written)
        key = name_key(name) if name is not None else None
        if not m or (key is not None and m.group("name") != key and not m.group("name").startswith(f".{key}.")):
            continue
        if _alive(int(m.group("pid"))):
            continue
        with contextlib.suppress(OSError):
            if e.is_file(follow_symlinks=False):
                os.unlink(e.path)
                removed.append(Path(e.path))
    return removed


# --------------------------------------------------------------------------------------------
# run-folder lock


def _flock_or_refuse(fd: int, busy: Callable[[str], str]) -> None:
    """An exclusive, non-blocking ``flock`` on ``fd``; when another process holds it, ``fd`` is
    closed and ``busy(pid of the holder, as its lock file says)`` is raised as an OutputError."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        finally:
            os.close(fd)
        raise OutputError(busy(holder)) from None


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``folder/.surgery.lock`` (released when the process
    ends, however it ends)."""

    NAME = ".surgery.lock"

    def __init__(self, folder: str | Path, what: str = "run folder") -> None:
        self.folder = Path(folder)
        self.what = what
        self.fd: int | None = None
        self.created = False

    def __enter__(self) -> RunLock:
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / self.NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        _flock_or_refuse(fd, lambda pid: f"{self.what} {self.folder} is in use by another surgery process (pid {pid}); "
                                          "wait for it to finish or use another folder")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            # a folder this lock created and nothing else was written to (the run failed at once):
            # removed, not left holding only the lock file
            if self.created and [e.name for e in os.scandir(self.folder)] == [self.NAME]:
                with contextlib.suppress(OSError):
                    os.unlink(self.folder / self.NAME)
                    os.rmdir(self.folder)
            os.close(self.fd)
            self.fd = None


class OutputLock:
    """An exclusive, non-blocking ``flock`` on ``.NAME.lock`` beside an output file, held while a
    command writes it; the lock file is removed when released. (After taking the lock the file is
    checked to be still the one at that path: a releasing holder may have just unlinked it.)"""

    def __init__(self, path: str | Path, what: str = "output") -> None:
        self.path = Path(path)
        self.lock = self.path.with_name(f".{name_key(self.path.name)}.lock")
        self.what = what
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.lock.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            try:
                fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except OSError as e:  # no inode left, a read-only folder...
                raise no_space(e, self.path, self.what) or OutputError(
                    f"{self.what} {self.path}: cannot create its lock file {self.lock} ({e.strerror})"
                ) from None
            _flock_or_refuse(fd, lambda pid: f"{self.what} {self.path} is being written by another surgery process "
                                              f"(pid {pid}); wait for it to finish or choose another path")
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                with contextlib.suppress(OSError):  # the pid is for the message only (a full disk: none)
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, str(os.getpid()).encode(), 0)
                self.fd = fd
                return self
            os.close(fd)  # unlinked by the previous holder between our open and flock: retry
        raise OutputError(f"{self.what} {self.path}: cannot take its lock {self.lock}")

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.lock)
            os.close(self.fd)
            self.fd = None


_FULL = (errno.ENOSPC, errno.EDQUOT)


def _mount_of(path: Path) -> str:
    p = _nearest_existing(path)
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return str(p)


def no_space(error: BaseException, path: str | Path, what: str = "output", *, free: int | None = None) -> OutputError | None:
    """An :class:`OutputError` if ``error`` (or what caused it) is a full disk or quota, else ``None``.
    ``free``: bytes left on the target's file system, for writers that wrap the ``OSError`` in their
    own error (the ONNX exporter blames onnxscript): under 1 MiB left counts as a full disk."""
    if free is not None and free < (1 << 20) and not (isinstance(error, OSError) and error.errno not in _FULL):
        error = OSError(errno.ENOSPC, f"{type(error).__name__} with {free} bytes free")
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL:
            kind = "disk quota exceeded" if e.errno == errno.EDQUOT else "no space left on device"
            return OutputError(
                f"{what} {path}: {kind} {_mount_of(Path(path).absolute().parent)}; nothing was written "
                "(an earlier file there is unchanged): free some space and run again"
            )
        e = e.__cause__ or e.__context__
    return None
