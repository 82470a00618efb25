"""Property-based fuzzing (Hypothesis): recipe dicts, recipe YAML text and checkpoint dicts either
load or raise a clear :class:`~surgery.errors.SurgeryError`; never another exception (which the CLI
would show as a traceback), and never any code run from the file."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from surgery.config.recipe import Recipe, load_recipe, recipe_from_dict
from surgery.detectors.builders import ModelSpec, build_model
from surgery.errors import SurgeryError
from surgery.storage.checkpoint import load_checkpoint, save_checkpoint
from surgery.storage.trust import safe_yaml_load

SLIM = {"num_classes": 3, "fpn_channels": 32, "num_convs": 1, "min_size": 64, "max_size": 64}
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)  # fmt: skip
values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)  # fmt: skip


def _field_values(section: dict) -> st.SearchStrategy:
    """A section dict whose keys are mostly real (so validation goes deep) with hostile values."""
    keys = list(section)
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=8), values | st.sampled_from(list(section.values())), max_size=5)


RECIPE = Recipe().to_dict()
recipe_dicts = st.fixed_dictionaries(
    {}, optional={name: _field_values(sec) if isinstance(sec, dict) else values for name, sec in RECIPE.items()}
) | values


@FAST
@given(recipe_dicts)
def test_recipe_dicts_give_a_recipe_or_a_clear_error(data) -> None:
    try:
        r = recipe_from_dict(data, "fuzz.yaml")
    except SurgeryError as e:
        assert str(e).startswith("fuzz.yaml") and "\n" not in str(e)
        return
    # what validates is usable: finite, in range
    assert math.isfinite(r.train.lr) and r.train.lr > 0
    assert r.train.clip_grad is None or r.train.clip_grad > 0
    assert r.data.num_workers >= 0 and 0 < r.prune.ratio < 1


yaml_texts = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200),
    recipe_dicts.map(lambda d: yaml.safe_dump(d, allow_unicode=True) if not isinstance(d, float) else "x: 1"),
)


@FAST
@given(yaml_texts)
def test_recipe_files_give_a_recipe_or_a_clear_error(tmp_path_factory, text) -> None:
    path = Path(tmp_path_factory.mktemp("r")) / "r.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        r = load_recipe(path)
    except SurgeryError as e:
        assert str(e).strip() and "r.yaml" in str(e), str(e)  # one message naming the file
        return
    assert isinstance(r, Recipe) and 0 < r.prune.ratio < 1 and r.train.lr > 0


def test_alias_bomb_is_refused_quickly() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
    )
    with pytest.raises(SurgeryError, match="alias"):
        safe_yaml_load(bomb, "bomb.yaml")
    with pytest.raises(SurgeryError, match="recursive"):
        safe_yaml_load("a: &a [*a]\n", "loop.yaml")
    assert safe_yaml_load("a: &a [1, 2]\nb: *a\n") == {"a": [1, 2], "b": [1, 2]}  # small aliases are fine


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("ck") / "d.pt"
    save_checkpoint(path, build_model(ModelSpec("fcos_resnet18_slim", dict(SLIM))), ModelSpec("fcos_resnet18_slim", dict(SLIM)))
    return torch.load(path, weights_only=True)


# Payloads that create MARKER when their builder runs (the control test below shows they do). A file
# whose load ran any of them would leave MARKER behind.
_PAYLOAD_DIR = Path(tempfile.mkdtemp(prefix="surgery-fuzz-"))
MARKER = _PAYLOAD_DIR / "code-ran.marker"
_PAYLOAD_PY = _PAYLOAD_DIR / "payload.py"
_PAYLOAD_PY.write_text(f"from pathlib import Path\nPath({str(MARKER)!r}).touch()  # on import\n\n\ndef build(**kw):\n"
                       f"    Path({str(MARKER)!r}).touch()\n")  # fmt: skip
PAYLOADS = [
    {"name": "os:system", "kwargs": {"command": f"touch {MARKER}"}},
    {"name": "subprocess:run", "kwargs": {"args": ["touch", str(MARKER)]}},
    {"name": f"{_PAYLOAD_PY}:build", "kwargs": {}},
    {"name": "tests.fuzz_payload:build", "kwargs": {"marker": str(MARKER)}},
]

FIELDS = ["format", "version", "model", "kind", "plan", "masks", "recipe", "metrics", "train_state", "meta", "state_dict"]
model_fields = st.one_of(
    values,
    st.sampled_from(PAYLOADS),
    st.fixed_dictionaries({"name": st.sampled_from(["fcos_resnet18_slim", "os:system", "subprocess:run", "x.py:f",
                                                    "builtins:eval", "nope", ""]) | values,
                           "kwargs": st.dictionaries(st.sampled_from(list(SLIM) + ["command", "zzz"]), values, max_size=3) | values}),
)  # fmt: skip
tensor_dicts = st.dictionaries(st.text(max_size=6), st.sampled_from([torch.zeros(2), torch.ones(1, 1), 3]), max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(FIELDS), values, max_size=3), model=st.none() | model_fields,
       sd=st.none() | tensor_dicts)  # fmt: skip
def test_checkpoint_dicts_load_or_give_a_clear_error(tmp_path_factory, base_checkpoint, changes, model, sd) -> None:
    obj = dict(base_checkpoint)
    obj.update(changes)
    if model is not None:
        obj["model"] = model
    if sd is not None:
        obj["state_dict"] = sd
    path = Path(tmp_path_factory.mktemp("h")) / "h.pt"
    torch.save(obj, path)
    assert not MARKER.exists()
    try:
        load_checkpoint(path)
    except SurgeryError as e:
        assert str(e).strip()
    assert not MARKER.exists(), f"loading {obj.get('model')!r} ran code"


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: p["name"].rsplit("/", 1)[-1])
def test_code_payloads_do_not_run_on_load_and_do_when_trusted(tmp_path, base_checkpoint, payload) -> None:
    """The absence check above can fail: each payload, untrusted, is refused without running; the
    same payload trusted deliberately does create the marker."""
    MARKER.unlink(missing_ok=True)
    path = tmp_path / "p.pt"
    torch.save({**base_checkpoint, "model": dict(payload)}, path)
    with pytest.raises(SurgeryError):
        load_checkpoint(path)
    assert not MARKER.exists()
    # control: run deliberately, the payload does execute (a surgery error follows: not a model)
    try:
        build_model(ModelSpec(payload["name"], dict(payload["kwargs"])), trust_code=True)
    except SurgeryError:
        pass
    assert MARKER.exists(), "the payload cannot create the marker: the check above would be vacuous"
    MARKER.unlink()
