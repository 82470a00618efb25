"""tools/relayout.py (issue 25 item 6) on a small tree of its own: the moved package still imports
and runs (Python itself is the oracle for the rewritten imports), a second run changes nothing, an
unmapped module and an ambiguous mapping are refused; a path taken from ``__file__`` follows the move; and the real tree's modules are all mapped."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("relayout", ROOT / "tools" / "relayout.py")
relayout = importlib.util.module_from_spec(_spec)
sys.modules["relayout"] = relayout  # dataclasses look their module up
_spec.loader.exec_module(relayout)

MAPPING = {
    "surgery": "surgery",
    "surgery.errors": "surgery.errors",
    "surgery.ckpt": "surgery.storage.ckpt",
    "surgery.util": "surgery.tools.util",
    "surgery.plan": "surgery.tools.plan",
    "surgery.data": "surgery.data",
    "surgery.data.x": "surgery.data.x",
}

FILES = {
    "surgery/__init__.py": '_EXPORTS = {"load": "ckpt"}\n\n\ndef __getattr__(name):\n'
    "    import importlib\n\n    return getattr(importlib.import_module(f\".{_EXPORTS[name]}\", __name__), name)\n",
    "surgery/errors.py": "class E(Exception):\n    pass\n",
    "surgery/util.py": '"""See surgery/ckpt.py and :mod:`surgery.ckpt`."""\n\nfrom pathlib import Path\n\n'
    "HOME = Path(__file__).resolve().parent.parent  # the tree: moved a folder deeper, one more .parent\n\n\n"
    "def f():\n    return 1\n",
    "surgery/plan.py": "from .errors import E\n\nP = E\n",
    "surgery/ckpt.py": "from . import plan, util\nfrom .errors import E\n\n\ndef load():\n    return util.f() + (plan.P is E)\n",
    "surgery/data/__init__.py": "",
    "surgery/data/x.py": "from .. import util as u\nfrom ..util import f\n\nG = f() + u.f()\n",
    "tests/test_a.py": "import surgery.ckpt as c\nfrom surgery import util\n\n"
    'TARGET = "surgery.util.f"\nV = c.load() + util.f()\n',
    "tests/__init__.py": "",
    "README.md": "# x\n\n## Layout\n\nrows\n\n```\nckpt · data/x   checkpoints; x\nplan · {u}      plans\n"
    "measure/{a,b} · util   no project imports\n```\n\n```\ntests/      pytest\n```\n",
}


def _tree(tmp_path: Path) -> Path:
    for rel, text in FILES.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def _run(root: Path, mapping: dict[str, str]) -> tuple[relayout.Plan, dict]:
    plan = relayout.make_plan(root, mapping)
    edits = relayout.compute_edits(root, plan)
    relayout.apply(root, plan, edits)
    return plan, edits


def test_moved_modules_import_and_run_and_a_second_run_changes_nothing(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    plan, _ = _run(root, MAPPING)
    assert sorted(str(d) for _, d in plan.moves) == ["surgery/storage/ckpt.py", "surgery/tools/plan.py", "surgery/tools/util.py"]
    assert not (root / "surgery" / "ckpt.py").exists() and (root / "surgery" / "tools" / "__init__.py").is_file()
    probe = ("import surgery, surgery.data.x as x, tests.test_a as t; "
             "import surgery.tools.util as u; print(surgery.load(), x.G, t.V, t.TARGET, u.HOME)")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "2", "3", "surgery.tools.util.f", str(root.resolve())]
    ckpt = (root / "surgery/storage/ckpt.py").read_text()
    assert "from ..tools import plan, util" in ckpt and "from ..errors import E" in ckpt
    assert "surgery/storage/ckpt.py and :mod:`surgery.storage.ckpt`" in (root / "surgery/tools/util.py").read_text()
    readme = (root / "README.md").read_text()
    assert "storage/ckpt · data/x" in readme and "measure/{a,b} · tools/util" in readme and "tools/plan ·" in readme
    before = {p: p.read_text() for p in root.rglob("*.py")}
    plan2, edits2 = _run(root, MAPPING)
    assert plan2.moves == [] and edits2 == {} and plan2.new_packages == []
    assert {p: p.read_text() for p in root.rglob("*.py")} == before


def test_an_onnx_metadata_key_is_not_a_module(tmp_path: Path) -> None:
    moved = {"surgery.recipe": "surgery.config.recipe"}
    src = 'a = meta["surgery.recipe"]\nb = "surgery.recipe"\nc = surgery.recipe.load\n'
    assert relayout.rewrite_dotted(src, moved, python=True) == (
        'a = meta["surgery.recipe"]\nb = "surgery.config.recipe"\nc = surgery.config.recipe.load\n'
    )


def test_an_unmapped_module_is_listed_and_nothing_moves(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (root / "surgery" / "budget.py").write_text("")
    with pytest.raises(relayout.RelayoutError, match=r'"surgery\.budget": "surgery\.budget"'):
        relayout.make_plan(root, MAPPING)
    assert (root / "surgery" / "ckpt.py").is_file()


def test_an_old_name_that_lives_on_as_a_package_is_refused(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    with pytest.raises(relayout.RelayoutError, match="surgery.util is still a name"):
        relayout.make_plan(root, {**MAPPING, "surgery.util": "surgery.util.core"})


def test_every_module_of_this_tree_is_in_the_mapping() -> None:
    plan = relayout.make_plan(ROOT)  # fails listing the modules to add to MAPPING
    assert all(v.startswith("surgery") for v in plan.mapping.values())
