"""The documentation cannot drift from the code: the CLI and recipe reference pages are what
``python -m cli.docgen`` generates from the Typer app and the recipe dataclasses, every command,
flag and recipe key appears in them, and every relative link in the README and docs/ resolves."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from cli import docgen

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
# Pages linked before they exist: written by other changes of the same round. Once a page exists,
# its entry must go (the test below says so), so this list never hides a broken link for long.


@pytest.mark.parametrize("page", sorted(docgen.PAGES, key=str), ids=lambda p: p.name)
def test_reference_page_is_what_the_generator_writes(page: Path) -> None:
    assert page.is_file() and page.read_text() == docgen.PAGES[page](), (
        f"{page.relative_to(ROOT)} is out of date: run `{docgen.REGENERATE}` and commit the result")


def test_every_command_and_flag_is_in_the_cli_reference() -> None:
    import typer

    from cli.main import app

    text = docgen.cli_reference()
    commands = list(docgen._commands(typer.main.get_command(app), "surgery"))
    assert len(commands) >= 15
    for path, cmd in commands:
        assert f"## {path}\n" in text, path
        section = text.split(f"## {path}\n", 1)[1].split("\n## ", 1)[0]
        for p in cmd.params:
            if not getattr(p, "hidden", False):
                name = p.name.upper() if type(p).__name__.endswith("Argument") else p.opts[0]
                assert f"`{name}`" in section, (path, name)


def test_every_recipe_key_is_in_the_recipe_reference() -> None:
    from surgery.config.recipe import Recipe

    text = docgen.recipe_reference()

    def keys(cls: type, prefix: str) -> list[str]:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            if not f.metadata.get("internal"):
                out.append(prefix + f.name)
                if (sub := docgen._nested(hints[f.name])) is not None:
                    out += keys(sub, f"{prefix}{f.name}.")
        return out

    found = keys(Recipe, "")
    assert {"prune.ratio", "prune.target_latency", "sweep.int8", "train.steps"} <= set(found)
    assert [k for k in found if f"| `{k}` |" not in text] == []


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return out


def broken_links(path: Path) -> list[str]:
    broken = []
    in_code = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        if in_code:
            continue
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                broken.append(target)
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(target)
    return broken


def test_every_relative_link_in_the_readme_and_docs_resolves() -> None:
    found = {str(p.relative_to(ROOT)): broken_links(p) for p in _markdown_files()}
    assert {k: v for k, v in found.items() if v} == {}


def test_the_link_check_finds_a_broken_link(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# A title, here\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md) [ok](there.md#a-title-here) [web](https://x.org/y)\n"
                    "[gone](missing.md) [bad anchor](there.md#nope)\n```\n[in code](nowhere.md)\n```\n")
    assert broken_links(page) == ["missing.md", "there.md#nope"]


def test_readme_is_short_and_quotes_no_commit_hash() -> None:
    """The README keeps the set-up commands, one worked example and links (under 200 lines); a
    commit hash there goes stale with the next commit."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 200
    hashes = [w for w in re.findall(r"\b[0-9a-f]{7,40}\b", text) if re.search(r"\d", w) and re.search(r"[a-f]", w)]
    assert hashes == []


def _documented_commands() -> list[tuple[str, str]]:
    """``(page, command line)`` of every ``surgery ...`` line in the README's and docs' bash blocks."""
    found = []
    for path in _markdown_files():
        in_bash = False
        for line in path.read_text().splitlines():
            if line.startswith("```"):
                in_bash = line.strip() == "```bash"
                continue
            if in_bash and line.startswith("surgery "):
                found.append((str(path.relative_to(ROOT)), line.split("  #")[0].strip()))
    return found


def test_every_documented_command_and_flag_exists() -> None:
    """The commands the pages tell a reader to type use commands and flags the app has."""
    import shlex

    import typer

    from cli.main import app

    root = typer.main.get_command(app)
    commands = _documented_commands()
    assert len(commands) > 30
    wrong = []
    for page, line in commands:
        try:
            words = shlex.split(line)[1:]
        except ValueError:  # a Windows path or a lone quote: whitespace is enough to find the flags
            words = line.split()[1:]
        cmd, rest = root.commands.get(words[0]), words[1:]
        if cmd is not None and hasattr(cmd, "commands") and rest:
            cmd, rest = cmd.commands.get(rest[0]), rest[1:]
        if cmd is None:
            wrong.append((page, line, words[0]))
            continue
        flags = {o for p in cmd.params for o in (*p.opts, *getattr(p, "secondary_opts", []))} | {"--help"}
        wrong += [(page, line, w) for w in rest if w.startswith("-") and w.split("=")[0] not in flags]
    assert wrong == []
