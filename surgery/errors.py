"""Errors the CLI maps to one clear line.

Every failure caused by user input (a bad name, file, ratio or dataset) raises a subclass of
:class:`SurgeryError`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SurgeryError(Exception):
    """Base class for errors that have a clear, user-facing message."""


class UnknownModelError(SurgeryError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown model"


class RecipeError(SurgeryError, ValueError):
    """A recipe file or a recipe value is invalid."""


class CheckpointError(SurgeryError):
    """A checkpoint is missing, corrupt or not written by surgery."""


class PruningError(SurgeryError, ValueError):
    """The requested pruning cannot be done (bad ratio, pattern matching nothing, ...)."""


class DataError(SurgeryError):
    """A dataset is missing, malformed or empty."""


class TrainingError(SurgeryError):
    """Training had to stop (for example a NaN/inf loss)."""


class MeasureError(SurgeryError):
    """A measurement cannot be done as asked (no CUDA device, a model that does not run...)."""


class MissingExtraError(SurgeryError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require_extra(modules: tuple[str, ...], extra: str, what: str) -> None:
    """Raise :class:`MissingExtraError` naming ``pip install 'surgery[EXTRA]'`` unless every module
    of ``modules`` is importable (checked without importing them)."""
    import importlib.util  # stdlib; kept here so that this module's top imports nothing

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(
            f"{what} needs {', '.join(missing)}, which is not installed: pip install 'surgery[{extra}]'"
        )
