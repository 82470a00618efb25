"""Recognise an Ultralytics checkpoint (a pickle: Ultralytics' own ``best.pt``, or the file
``surgery export --format ultralytics`` writes) without unpickling it: the zip's ``data.pkl``
names Ultralytics' classes as plain text. Used to tell the user what the file is and how to load
it (``--model ultralytics:FILE --trust-code``) instead of "corrupt or not a torch file". Stdlib
only: no torch, no Ultralytics."""

from __future__ import annotations

import zipfile
from pathlib import Path

MAX_PICKLE_BYTES = 64 << 20  # the class names come first: a prefix of the pickle is enough
MARKERS = (b"ultralytics.nn.tasks", b"ultralytics.nn.modules")


def is_ultralytics_pickle(path: str | Path) -> bool:
    """Whether ``path`` is a torch zip file whose pickle references Ultralytics' model classes."""
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = next((n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pkl is None:
                return False
            with zf.open(pkl) as f:
                head = f.read(MAX_PICKLE_BYTES)
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError):
        return False
    return any(m in head for m in MARKERS)


def ultralytics_pickle_hint(path: str | Path) -> str:
    """The one line that says what such a file is and how surgery loads it."""
    return (f"{path} is an Ultralytics checkpoint (a pickle: Ultralytics' own .pt, or what `surgery export "
            f"--format ultralytics` writes), not a surgery checkpoint: load it as --model ultralytics:{path} "
            "--trust-code (a pickle runs code: only a file you trust)")
