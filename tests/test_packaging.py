"""Installable like its peers: the wheel holds ``surgery``, ``surgery_cli`` and the recipes as
``surgery_recipes`` package data, and no generic top-level ``cli``; installed into a fresh venv it
runs by recipe name from an empty folder. The editable install (``make venv``) keeps working.

Nothing is downloaded: the wheel is built with ``--no-build-isolation --no-index`` and the fresh
venvs see this interpreter's site-packages through a ``.pth`` file (torch and friends), not through
``--system-site-packages``, so only the wheel itself is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from surgery.config.catalog import find_recipe, list_recipes
from surgery.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "surgery", "cli", "recipes")


def _copy_source(dest: Path) -> Path:
    """The distribution's sources in a temporary folder (a build writes build/ and *.egg-info)."""
    dest.mkdir()
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def _pip(*args: str, python: str = sys.executable) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([python, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True, env=env,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip


def _venv(path: Path) -> Path:
    """A fresh venv whose own site-packages is empty, with this interpreter's libraries behind it."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    Path(purelib, "_surgery_test_base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _run(exe: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SURGERY_DEBUG")}
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_source(tmp / "src")
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"), str(src))
    (built,) = (tmp / "dist").glob("surgery-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The ``bin`` folder of a fresh venv holding only the wheel."""
    python = _venv(tmp_path_factory.mktemp("venv") / "env")
    _pip("install", "--no-deps", "--no-index", str(wheel), python=str(python))
    return python.parent


def test_wheel_holds_the_namespaced_cli_and_the_recipes(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"surgery", "surgery_cli", "surgery_recipes"}, top
    shipped = {Path(n).name for n in names if n.startswith("surgery_recipes/") and n.endswith(".yaml")}
    assert shipped == {p.name for p in (ROOT / "recipes").glob("*.yaml")}
    assert "surgery_cli/main.py" in names and "surgery_cli/recipes_cmd.py" in names
    entry = [n for n in names if n.endswith("entry_points.txt")][0]
    assert "surgery = surgery_cli.main:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_installed_wheel_runs_by_recipe_name_from_an_empty_folder(installed, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    surgery = installed / "surgery"
    r = _run(installed / "python", "-c", "import cli", cwd=empty)
    assert r.returncode != 0 and "No module named 'cli'" in r.stderr  # no generic top-level package

    r = _run(surgery, "sweep", "quickstart", "--help", cwd=empty)
    assert r.returncode == 0, r.stderr
    assert "Usage: surgery sweep" in r.stdout

    r = _run(surgery, "recipes", "--format", "csv", cwd=empty)
    assert r.returncode == 0, r.stderr
    rows = {line.split(",")[0]: line.split(",")[-1] for line in r.stdout.splitlines()[1:]}
    assert {"quickstart", "retinanet_resnet50_fpn", "yolov8n"} <= set(rows)
    assert all(Path(p).is_file() and str(installed.parent) in p for p in rows.values()), rows

    r = _run(surgery, "prune", "--recipe", "retinanet_resnet50_fpn", "--out", "r.pt", cwd=empty)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "saved r.pt (kind: structured)" in " ".join(r.stdout.split())
    r = _run(surgery, "info", "r.pt", "--format", "json", cwd=empty)
    assert r.returncode == 0 and '"builder": "retinanet_resnet50_fpn"' in r.stdout, r.stderr
    assert sorted(p.name for p in empty.iterdir()) == ["r.pt"]  # nothing else written there


def test_editable_install_maps_cli_and_recipes_to_the_checkout(tmp_path):
    src = _copy_source(tmp_path / "src")
    python = _venv(tmp_path / "env")
    _pip("install", "--no-deps", "--no-index", "--no-build-isolation", "-e", str(src), python=str(python))
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _run(python, "-c", "import surgery_cli.main, surgery; print(surgery_cli.main.__file__, surgery.__file__)", cwd=empty)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(src / "cli" / "main.py"), str(src / "surgery" / "__init__.py")]
    r = _run(python.parent / "surgery", "recipes", "--format", "csv", cwd=empty)
    assert r.returncode == 0 and str(src / "recipes" / "quickstart.yaml") in r.stdout, r.stderr
    r = _run(python, "-m", "surgery", "--version", cwd=empty)
    assert r.returncode == 0 and r.stdout.startswith("surgery "), r.stderr


def test_recipe_names_resolve_and_a_file_path_wins(tmp_path, monkeypatch):
    names = [e.name for e in list_recipes()]
    assert names == sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    assert find_recipe("quickstart") == find_recipe("quickstart.yaml") == ROOT / "recipes" / "quickstart.yaml"
    monkeypatch.chdir(tmp_path)
    Path("quickstart.yaml").write_text("version: 1\n")
    assert find_recipe("quickstart.yaml") == Path("quickstart.yaml")  # the user's file, not the shipped one
    assert find_recipe("quickstart") == ROOT / "recipes" / "quickstart.yaml"
    assert find_recipe("sub/quickstart.yaml") == Path("sub/quickstart.yaml")  # a path is never a name
    assert find_recipe("recipes/quickstart.yaml") == ROOT / "recipes" / "quickstart.yaml"  # as the README writes it
    Path("recipes").mkdir()
    Path("recipes/quickstart.yaml").write_text("version: 1\n")
    assert find_recipe("recipes/quickstart.yaml") == Path("recipes/quickstart.yaml")  # unless that file exists
    with pytest.raises(RecipeError, match="did you mean 'quickstart'"):
        find_recipe("quikstart")


def test_missing_export_extra_names_the_extra(monkeypatch):
    from surgery.deployment.export import export_onnx
    from surgery.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'surgery\[export\]'"):
        export_onnx(None, "x.onnx", 64)  # type: ignore[arg-type]
