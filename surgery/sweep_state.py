"""A sweep's ``state.json``: which steps finished, with which settings, and what they produced."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .storage.atomic import atomic_open


class StepState:
    """``state.json``: finished steps and what they produced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"steps": {}}
        if path.is_file():
            try:
                self.data = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.data = {"steps": {}}
            if not isinstance(self.data, dict) or not isinstance(self.data.get("steps"), dict):
                self.data = {"steps": {}}  # damaged: every step is redone

    def get(self, step: str, key: str | None = None) -> dict[str, Any] | None:
        """The finished step, if it was produced by the same settings (``key``); a step produced by
        other settings is forgotten and its files removed, so it and everything after it is redone."""
        entry = self.data["steps"].get(step)
        if entry is None:
            return None
        if key is not None and entry.get("key") != key:
            self._forget(step)
            return None
        if entry.get("started"):
            return None  # interrupted: its training resumes from its checkpoint
        files = [Path(f) for f in entry.get("files", [])]
        return entry if all(f.is_file() for f in files) else None

    def _forget(self, step: str) -> None:
        entry = self.data["steps"].pop(step, None) or {}
        for f in entry.get("files", []):
            Path(f).unlink(missing_ok=True)

    def begin(self, step: str, key: str, files: list[Path]) -> None:
        """Mark ``step`` as started with settings ``key``; stale files of other settings are removed."""
        entry = self.data["steps"].get(step)
        if entry is None or entry.get("key") != key:
            for f in files:
                f.unlink(missing_ok=True)
        self.data["steps"][step] = {"started": True, "key": key, "files": [str(f) for f in files]}
        self._write()

    def put(self, step: str, result: dict[str, Any], files: list[Path], key: str | None = None) -> None:
        self.data["steps"][step] = {**result, "files": [str(f) for f in files], **({"key": key} if key else {})}
        self._write()

    def _write(self) -> None:
        with atomic_open(self.path, "w") as f:
            json.dump(self.data, f, indent=1)
