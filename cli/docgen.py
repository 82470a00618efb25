"""The generated reference pages: every CLI command and flag (from the Typer app) and every recipe
key (from the recipe dataclasses), so the reference cannot drift from the code.

``python -m cli.docgen`` rewrites ``docs/reference/cli.md`` and ``docs/reference/recipes.md``;
``--check`` exits 1 when a committed page differs from what the code gives
(``tests/test_docs.py`` runs the same comparison).
"""

from __future__ import annotations

import ast
import dataclasses
import io
import sys
import tokenize
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from .main import app

ROOT = Path(__file__).resolve().parents[1]
CLI_PAGE = ROOT / "docs" / "reference" / "cli.md"
RECIPES_PAGE = ROOT / "docs" / "reference" / "recipes.md"
REGENERATE = "python -m cli.docgen"


def _cell(text: Any) -> str:
    """One Markdown table cell: a single line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


# --------------------------------------------------------------------------------------------
# the CLI


def _commands(group: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    for name, cmd in group.commands.items():
        if getattr(cmd, "hidden", False):
            continue
        path = f"{prefix} {name}"
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, path)
        else:
            yield path, cmd


def _type_name(param: Any) -> str:
    if getattr(param, "is_flag", False):
        return "switch"
    descriptor = getattr(param, "type_descriptor", None)
    annotation = getattr(descriptor, "annotation", None)
    if annotation is None:
        return ""
    name = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
    return "path" if name in ("Path", "PosixPath") else name


def _default(param: Any) -> str:
    default = param.default
    if default is None or getattr(param, "required", False):
        return ""
    if isinstance(default, (list, tuple)):
        return ", ".join(map(str, default)) if default else ""
    return f"`{default}`"


def _option_names(param: Any) -> str:
    names = [*param.opts, *param.secondary_opts]
    return ", ".join(f"`{n}`" for n in names)


def cli_reference() -> str:
    """``docs/reference/cli.md``: each command's help, its arguments and every option."""
    root = typer.main.get_command(app)
    lines = [
        "# CLI reference",
        "",
        f"Generated from the Typer app by `{REGENERATE}`; do not edit by hand (`tests/test_docs.py`",
        "fails when this page and the code differ). `surgery COMMAND --help` prints the same.",
        "",
    ]
    commands = list(_commands(root, "surgery"))
    lines += [f"- [`{path}`](#{path.replace(' ', '-')})" for path, _ in commands] + [""]
    for path, cmd in commands:
        lines += [f"## {path}", ""]
        help_text = (cmd.help or "").strip()
        if help_text:
            lines += [help_text, ""]
        args = [p for p in cmd.params if type(p).__name__.endswith("Argument")]
        opts = [p for p in cmd.params if not type(p).__name__.endswith("Argument") and not getattr(p, "hidden", False)]
        usage = " ".join([path, "[OPTIONS]", *(p.name.upper() + ("..." if p.nargs == -1 else "") for p in args)])
        lines += ["```", usage, "```", ""]
        if args:
            lines += ["| argument | type | help |", "|---|---|---|"]
            lines += [f"| `{p.name.upper()}` | {_type_name(p)} | {_cell(getattr(p, 'help', '') or '')} |" for p in args]
            lines.append("")
        if opts:
            lines += ["| option | type | default | help |", "|---|---|---|---|"]
            lines += [f"| {_option_names(p)} | {_type_name(p)} | {_cell(_default(p))} | {_cell(p.help or '')} |" for p in opts]
            lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the recipe schema


def _field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the class source: the comment lines right above it and the one at
    the end of its line (the schema's documentation lives there, next to the default)."""
    import inspect  # only the generator reads source

    source = inspect.getsource(cls)
    lines = source.splitlines()
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out: dict[str, str] = {}
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above = []
        row = node.lineno - 1
        while row >= 1 and lines[row - 1].strip().startswith("#"):
            above.insert(0, comments.get(row, ""))
            row -= 1
        trailing = comments.get(node.end_lineno or node.lineno, "")
        out[node.target.id] = " ".join(t for t in [*above, trailing] if t and not t.startswith("fmt:"))
    return out


def _nested(tp: Any) -> type | None:
    """The dataclass inside ``X``, ``X | None`` or ``Optional[X]``, else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _type_text(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("surgery.config.recipe.", "").replace("NoneType", "None")


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return "(section)"
    return f"`{value!r}`"


def _section(cls: type, key: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    lines = [f"## `{key}`" if key else "## top level", ""]
    doc = (cls.__doc__ or "").strip()
    if doc and not doc.startswith(f"{cls.__name__}("):  # dataclasses give undocumented classes a signature
        lines += [" ".join(doc.split()), ""]
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    for f in fields:
        sub = _nested(hints[f.name])
        name = f"{key}.{f.name}" if key else f.name
        if sub is not None:
            nested.append((sub, name))
        lines.append(f"| `{name}` | {_cell(_type_text(hints[f.name]))} | {_cell(_default_text(f))} | "
                     f"{_cell(comments.get(f.name, ''))}{' (see below)' if sub is not None else ''} |")
    lines.append("")
    for sub, name in nested:
        lines += _section(sub, name)
    return lines


def recipe_reference() -> str:
    """``docs/reference/recipes.md``: every key of the recipe schema with its type, default and
    the comment beside it in :mod:`surgery.config.recipe`."""
    from surgery.config.recipe import (  # the app above is torch-free; so is the recipe module
        SCHEMA_VERSION,
        Recipe,
    )

    lines = [
        "# Recipe reference",
        "",
        f"Generated from the dataclasses in `surgery/config/recipe.py` by `{REGENERATE}`; do not edit by hand",
        "(`tests/test_docs.py` fails when this page and the code differ). A recipe is YAML",
        f"(`version: {SCHEMA_VERSION}`) read with `yaml.safe_load`; an unknown key or a bad value is one error",
        "naming the file, the key and what is allowed. CLI flags override recipe values.",
        "",
    ]
    return "\n".join(lines + _section(Recipe, ""))


PAGES = {CLI_PAGE: cli_reference, RECIPES_PAGE: recipe_reference}


def main(argv: list[str]) -> int:
    if not (ROOT / "pyproject.toml").is_file():
        print("python -m cli.docgen writes docs/reference/ of a source checkout: run it from one", file=sys.stderr)
        return 2
    check = "--check" in argv
    stale = []
    for path, make in PAGES.items():
        text = make()
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(str(p.relative_to(ROOT)) for p in stale)}; run `{REGENERATE}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
