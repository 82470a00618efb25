"""The trust boundary: what a checkpoint or a recipe may make this process run.

A checkpoint or a recipe names the builder that rebuilds its model. Registered builders (the
project's own and torchvision's) always run. Anything else (``package.module:function`` or
``path/to/file.py:function``) is *user code*: it runs only when the caller opts in for that call,
with ``--trust-code`` on the command line or ``trust_code=True`` in Python (like Hugging Face's
``trust_remote_code``). Otherwise :class:`UntrustedCodeError` says what the file asks to run and how
to allow it.

When user code is trusted, the spec records an importable reference plus the SHA-256 of the file
that defines the builder; loading verifies the hash before the file is executed, so a checkpoint
whose builder file changed since it was saved is refused even with ``--trust-code``.

User modules are imported without the current directory on ``sys.path`` (unless it is listed in
``PYTHONPATH`` on purpose): a file dropped in the working directory is never picked up implicitly.

YAML (recipes, ``--kwarg`` values, model yamls) is read with :func:`safe_yaml_load`, which refuses
documents whose aliases expand beyond a small bound (the "billion laughs" alias bomb), duplicate
keys (YAML would keep the last one silently) and non-UTF-8 text.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import yaml

from ..detectors.specs import scheme_of
from ..errors import RecipeError, SurgeryError, UnknownModelError

_TRUST: ContextVar[bool] = ContextVar("surgery_trust_code", default=False)
_ORIGIN: ContextVar[str | None] = ContextVar("surgery_trust_origin", default=None)

HOW_TO_ALLOW = "pass --trust-code (trust_code=True in Python) only if you trust it"

# a recipe is a few hundred nodes; 20k expanded nodes is far above any real one and far below a bomb
MAX_YAML_NODES = 20_000
MAX_YAML_BYTES = 1 << 20


class UntrustedCodeError(SurgeryError):
    """A checkpoint, recipe or flag names code that was not trusted for this call."""


@contextlib.contextmanager
def trusting(enabled: bool = True) -> Iterator[None]:
    """Within the block, user-code builders may run (``--trust-code``)."""
    token = _TRUST.set(bool(enabled))
    try:
        yield
    finally:
        _TRUST.reset(token)


@contextlib.contextmanager
def origin(text: str | None) -> Iterator[None]:
    """Name where a model spec comes from (``checkpoint x.pt``, ``recipe r.yaml``) in errors."""
    token = _ORIGIN.set(text)
    try:
        yield
    finally:
        _ORIGIN.reset(token)


def trust_enabled(explicit: bool | None = None) -> bool:
    return _TRUST.get() if explicit is None else bool(explicit)


def is_user_code(name: str) -> bool:
    """``module:function`` / ``file.py:function``; not a ``scheme:reference`` model such as
    ``ultralytics:yolov8n.yaml`` (data; its resolver checks trust itself where a pickle is read)."""
    return ":" in name and scheme_of(name) is None


def _who(name: str) -> str:
    src = _ORIGIN.get()
    return f"{src} asks to run user code {name!r}" if src else f"model {name!r} is user code"


def refuse(name: str, kwargs: dict[str, Any] | None = None) -> UntrustedCodeError:
    args = ""
    if kwargs:
        text = repr(kwargs)
        args = f" with arguments {text[:120] + '...' if len(text) > 120 else text}"
    return UntrustedCodeError(
        f"{_who(name)}{args}, not a registered builder (`surgery models` lists those); nothing was run. "
        f"To run it, {HOW_TO_ALLOW}."
    )


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# imports without the current directory


def _explicit_paths() -> set[str]:
    return {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}


def _is_implicit_cwd(entry: str, cwd: str, explicit: set[str]) -> bool:
    path = os.path.abspath(entry or ".")
    return path == cwd and path not in explicit


def drop_implicit_cwd(keep: str | Path | None = None) -> None:
    """Remove the current directory from ``sys.path`` (``python -m`` puts it first) unless it is
    in ``PYTHONPATH`` or is ``keep`` (the folder this package itself lives in)."""
    cwd = os.getcwd()
    explicit = _explicit_paths()
    if keep is not None:
        explicit.add(os.path.abspath(keep))
    sys.path[:] = [p for p in sys.path if not _is_implicit_cwd(p, cwd, explicit)]


@contextlib.contextmanager
def _no_cwd_on_path() -> Iterator[None]:
    saved = list(sys.path)
    cwd = os.getcwd()
    explicit = _explicit_paths()
    sys.path[:] = [p for p in saved if not _is_implicit_cwd(p, cwd, explicit)]
    try:
        yield
    finally:
        sys.path[:] = saved


def _module_file(mod_name: str) -> str | None:
    mod = sys.modules.get(mod_name)
    if mod is not None:
        f = getattr(mod, "__file__", None)
        return os.path.abspath(f) if f else None
    spec = importlib.util.find_spec(mod_name)
    if spec is None:
        raise ImportError(f"no module named {mod_name!r}")
    if spec.origin and spec.has_location and os.path.isfile(spec.origin):
        return os.path.abspath(spec.origin)
    return None


def code_reference(name: str) -> dict[str, Any] | None:
    """``{"file": ..., "sha256": ...}`` for the file defining user builder ``name`` (``None`` for a
    registered builder). Does not execute the file (a module's parent packages are imported)."""
    if not is_user_code(name):
        return None
    mod_name = name.rpartition(":")[0]
    try:
        if mod_name.endswith(".py"):
            file = os.path.abspath(mod_name)
        else:
            with _no_cwd_on_path():
                file = _module_file(mod_name)
    except (ImportError, ValueError, OSError):
        return None
    if file is None or not os.path.isfile(file):
        return {"file": None, "sha256": None}
    return {"file": file, "sha256": sha256_file(file)}


def _check_hash(name: str, file: str | None, expected: dict[str, Any] | None) -> None:
    if not expected or not isinstance(expected, dict) or "sha256" not in expected:
        return  # nothing recorded (written before hashes were recorded): trusted as is
    now = sha256_file(file) if file and os.path.isfile(file) else None
    if now != expected.get("sha256"):
        raise UntrustedCodeError(
            f"{_who(name)} whose file {file or '(none)'} changed since it was saved "
            f"(sha256 {str(expected.get('sha256'))[:12]}... recorded, {str(now)[:12]}... now); nothing was run. "
            "Rebuild the model from the current code and load only the weights (--weights FILE)."
        )


def import_user_builder(
    name: str, *, trust_code: bool | None = None, expected: dict[str, Any] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any] | None]:
    """Resolve user builder ``name`` if trusted; verify ``expected`` (a recorded code reference)
    before executing anything. Returns the callable and the reference of what ran."""
    if not trust_enabled(trust_code):
        raise refuse(name, kwargs)
    mod_name, _, attr = name.rpartition(":")
    if not mod_name or not attr:
        raise UnknownModelError(f"model {name!r}: expected 'package.module:function' or 'path/to/file.py:function'")
    try:
        if mod_name.endswith(".py"):
            recorded = expected.get("file") if isinstance(expected, dict) else None
            path = Path(mod_name)
            if not path.is_file() and isinstance(recorded, str) and Path(recorded).is_file():
                path = Path(recorded)
            if not path.is_file():
                where = f" nor at the recorded {recorded}" if isinstance(recorded, str) else ""
                raise UnknownModelError(
                    f"model {name!r}: builder file {mod_name} does not exist here ({os.getcwd()}){where}; "
                    "put the file back or run from the folder it is relative to"
                )
            file = os.path.abspath(path)
            _check_hash(name, file, expected)
            spec = importlib.util.spec_from_file_location(path.stem, path)
            if spec is None or spec.loader is None:
                raise UnknownModelError(f"model {name!r}: cannot load {mod_name}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            recorded = expected.get("file") if isinstance(expected, dict) else None
            with _no_cwd_on_path():
                try:
                    file = _module_file(mod_name)
                except ImportError:
                    if not (isinstance(recorded, str) and Path(recorded).is_file()):
                        raise
                    file = None  # not importable from here: the recorded file (hash-checked below)
            if file is None and isinstance(recorded, str) and Path(recorded).is_file():
                file = os.path.abspath(recorded)
                _check_hash(name, file, expected)
                spec = importlib.util.spec_from_file_location(mod_name, file)
                if spec is None or spec.loader is None:
                    raise UnknownModelError(f"model {name!r}: cannot load the recorded file {file}")
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            else:
                with _no_cwd_on_path():
                    _check_hash(name, file, expected)
                    module = importlib.import_module(mod_name)
    except ImportError as e:
        rec = expected.get("file") if isinstance(expected, dict) else None
        missing = f"; the recorded file {rec} does not exist either" if isinstance(rec, str) else ""
        raise UnknownModelError(
            f"model {name!r}: cannot import {mod_name!r} ({e}){missing}; the current directory is not searched: "
            "add its folder to PYTHONPATH or give 'path/to/file.py:function'"
        ) from e
    except (ValueError, OSError, SyntaxError) as e:
        raise UnknownModelError(f"model {name!r}: cannot load {mod_name!r} ({e.__class__.__name__}: {e})") from e
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise UnknownModelError(f"model {name!r}: {mod_name!r} has no callable {attr!r}")
    ref = {"file": file, "sha256": sha256_file(file) if file and os.path.isfile(file) else None}
    return fn, ref


# --------------------------------------------------------------------------------------------
# YAML


class _DuplicateKey(RecipeError):
    pass


class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """PyYAML keeps the last of two equal keys without a word (``steps: 2`` ... ``steps: 100000``,
        two ``train:`` sections): refuse them."""
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(f"duplicate key {key!r} at line {line} (first at line {seen[key]}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep)


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Nodes after alias expansion (memoised per node; recursion through an alias is refused)."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    active: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        if isinstance(node, yaml.ScalarNode):
            sizes[key] = 1
            continue
        children: list[yaml.Node]
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = list(node.value)
        if done:
            active.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > limit:
                return sizes[key]
            continue
        if key in sizes:
            continue
        if key in active:
            raise RecipeError("recursive YAML alias")
        active.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def read_small_file(path: str | Path, what: str, limit: int = MAX_YAML_BYTES,
                    error: type[SurgeryError] = RecipeError) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, sized with ``stat`` before it is read
    (a 3 GB yaml is one line, not 3.9 GB of memory; a FIFO is named, never opened to block)."""
    import stat  # only here: the one use

    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) else "a device or socket"
        raise error(f"{what} {path} is {kind}, not a regular file; refused")
    if st.st_size > limit:
        raise error(f"{what} {path} is {st.st_size} bytes, more than {limit} ({limit >> 20} MiB); refused before reading it")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    if len(data) > limit:  # grew since the stat
        raise error(f"{what} {path} is more than {limit} bytes; refused")
    return data


def safe_yaml_load(text: str | bytes, source: str = "<yaml>", max_nodes: int = MAX_YAML_NODES) -> Any:
    """``yaml.safe_load`` that refuses alias bombs, recursive aliases and non-UTF-8 bytes."""
    if isinstance(text, bytes):
        if len(text) > MAX_YAML_BYTES:
            raise RecipeError(f"{source}: {len(text)} bytes is too large for a recipe (at most {MAX_YAML_BYTES})")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecipeError(f"{source}: not UTF-8 text (byte 0x{text[e.start]:02x} at offset {e.start})") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size = _expanded_size(node, max_nodes)
        except RecipeError as e:
            raise RecipeError(f"{source}: {e} (refused)") from None
        if size > max_nodes:
            raise RecipeError(
                f"{source}: YAML aliases expand to more than {max_nodes} nodes (an alias bomb?); refused"
            )
        return loader.construct_document(node)
    except ValueError as e:  # e.g. a 5000-digit integer: Python's int() refuses more than 4300 digits
        raise RecipeError(f"{source}: {' '.join(str(e).split())[:200]}") from None
    except _DuplicateKey as e:
        raise RecipeError(f"{source}: {e}") from None
    except RecursionError:
        raise RecipeError(f"{source}: YAML nested too deeply") from None
    finally:
        loader.dispose()
