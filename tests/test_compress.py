"""`surgery compress`: the goal and its choice, the allocator that lands trials on a MACs budget,
and the study storage (kill and resume, two workers on SQLite, a real PostgreSQL server)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from surgery.compress import BUDGET_TOL, Goal, TrialConfig, TrialRecord, choose, stages_of
from tests.extras import in_ci, require

ROOT = Path(__file__).resolve().parents[1]
# the fastest trial there is: no recovery, 8 held-out images, one criterion, 64 px
FAST = ["--recover", "0", "--holdout", "8", "--criteria", "l1", "--round-to", "1,8", "--input-size", "64",
        "--sensitivity", "none"]


def _trial(n: int, m: float, macs: float) -> TrialRecord:
    return TrialRecord(number=n, state="COMPLETE", params={}, proxy_map=m, macs_ratio=macs)


# --------------------------------------------------------------------------------------------
# the goal (no model)


def test_budget_goal_chooses_the_most_accurate_trial_within_the_budget() -> None:
    trials = [_trial(0, 0.40, 0.50), _trial(1, 0.45, 0.49), _trial(2, 0.60, 0.70), _trial(3, 0.44, 0.30)]
    chosen, met, miss = choose(trials, Goal(keep_macs=0.5), dense_map=0.6)
    assert (chosen.number, met, miss) == (1, True, "")


def test_floor_goal_chooses_the_cheapest_trial_above_the_floor() -> None:
    trials = [_trial(0, 0.59, 0.50), _trial(1, 0.50, 0.30), _trial(2, 0.595, 0.45), _trial(3, 0.61, 0.80)]
    chosen, met, _ = choose(trials, Goal(keep_map=0.99), dense_map=0.6)  # floor 0.594
    assert (chosen.number, met) == (2, True)


def test_goal_that_cannot_be_met_names_the_closest_trial_and_the_shortfall() -> None:
    trials = [_trial(0, 0.50, 0.50), _trial(1, 0.58, 0.90), _trial(2, 0.40, 0.12)]
    chosen, met, miss = choose(trials, Goal(keep_map=1.0, keep_macs=0.1), dense_map=0.6)
    assert not met
    # relative violations: #0 3.99 + 0.17, #1 7.99 + 0.03, #2 0.19 + 0.33: the closest is #2
    assert chosen.number == 2
    assert "closest trial #2" in miss and "12.0% of dense > budget 10.0%" in miss and "0.200 short" in miss


def test_budget_tolerance_is_one_percent_relative() -> None:
    inside = _trial(0, 0.5, 0.5 * (1 + BUDGET_TOL) - 1e-6)
    outside = _trial(1, 0.6, 0.5 * (1 + BUDGET_TOL) + 1e-4)
    chosen, met, _ = choose([inside, outside], Goal(keep_macs=0.5), dense_map=0.6)
    assert (chosen.number, met) == (0, True)


def test_goal_without_floor_or_budget_is_refused() -> None:
    from surgery.errors import RecipeError

    with pytest.raises(RecipeError, match="no goal"):
        Goal(int8=True).validate()
    with pytest.raises(RecipeError, match="not both"):
        Goal(keep_macs=0.5, keep_latency=0.5).validate()


def test_stages_merge_until_at_most_the_limit() -> None:
    roots = [f"backbone.body.layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)] + \
            [f"head.cls.conv.{i}" for i in range(4)] + ["backbone.fpn.inner_blocks.0.0"]
    assert set(stages_of(roots).values()) == {"backbone.body.layer1", "backbone.body.layer2", "backbone.body.layer3",
                                              "backbone.body.layer4", "head.cls.conv", "backbone.fpn.inner_blocks"}
    assert set(stages_of(roots, max_stages=3).values()) == {"backbone.body", "head.cls", "backbone.fpn"}


def test_yolo_stages_are_contiguous_runs_of_its_modules_not_layer_types() -> None:
    # an Ultralytics YOLOv8n's group roots (modules 0..22, Detect at 22): a multiplier must move a
    # part of the network (modules next to each other), not a layer type spread over all of it
    idx = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 16, 18, 19, 21, 22]
    roots = [f"net.model.{i}.cv1.conv" for i in idx] + [f"net.model.{i}.m.0.cv2.conv" for i in (2, 4, 21)]
    roots += [f"net.model.22.cv{b}.{k}.0.conv" for b in (2, 3) for k in range(3)]
    stages = stages_of(roots)
    assert 2 <= len(set(stages.values())) <= 8
    members: dict[str, set[int]] = {}
    for r, s in stages.items():
        members.setdefault(s, set()).add(idx.index(int(r.split(".")[2])))
    for s, m in members.items():  # each stage: consecutive modules of the network
        assert m == set(range(min(m), max(m) + 1)), (s, sorted(m))
    assert stages["net.model.2.cv1.conv"] != stages["net.model.21.cv1.conv"]  # backbone and neck apart
    # a larger limit: every module its own stage
    assert set(stages_of(roots, max_stages=17).values()) == {f"net.model.{i}" for i in idx}


# --------------------------------------------------------------------------------------------
# the allocator: every trial lands on the MACs budget, multipliers shape where the cut goes


def test_allocator_lands_on_the_macs_budget_and_multipliers_move_the_cut(trained_slim: Path) -> None:
    from surgery.compress import Allocator, SearchSpace, cut_and_recover, group_ratios
    from surgery.config.recipe import PruneSection
    from surgery.storage.checkpoint import load_checkpoint

    dense, _ = load_checkpoint(trained_slim)
    dense.eval()
    alloc = Allocator(dense, PruneSection(), 64, 64, SearchSpace())
    stages = sorted(set(alloc.stages.values()))
    uniform = TrialConfig(keep=0.5, multipliers=dict.fromkeys(stages, 1.0), criterion="l1", round_to=1)
    skewed = TrialConfig(keep=0.5, multipliers={s: (1.5 if s == "backbone.body" else 0.5) for s in stages},
                         criterion="l1", round_to=1)
    achieved = {}
    for name, cfg in (("uniform", uniform), ("skewed", skewed)):
        _, result = cut_and_recover(dense, alloc.job(cfg, 0), macs_input_size=64, trace_size=64,
                                    calib_data=None, recover_data=None)
        achieved[name] = (group_ratios(result), result.report.macs_ratio)  # counted by fvcore on the real cut
    for name, (_, macs) in achieved.items():
        # within the budget's tolerance above, within the MACs search's 2% below (round_to steps)
        assert 0.5 * 0.98 <= macs <= 0.5 * (1 + BUDGET_TOL), f"{name}: {macs:.4f} of the MACs kept, budget 0.5"
    u, s = achieved["uniform"][0], achieved["skewed"][0]
    assert len(u) == len(alloc.roots) and len(set(u.values())) == 1  # one ratio everywhere
    body = [r for r in s if alloc.stages[r] == "backbone.body"]
    rest = [r for r in s if alloc.stages[r] != "backbone.body"]
    assert min(s[r] for r in body) > max(s[r] for r in rest)  # 1.5 vs 0.5: the body is cut 3x more


def _inspected_macs(checkpoint: Path, size: int) -> int:
    """The MACs `surgery inspect` reports for a checkpoint."""
    import json

    from typer.testing import CliRunner

    from cli.main import app

    res = CliRunner().invoke(app, ["inspect", "--model", str(checkpoint), "--macs-size", str(size), "--format", "json"])
    assert res.exit_code == 0, res.output
    return int(json.loads(res.stdout)["macs"])


def test_chosen_trial_macs_are_what_surgery_inspect_counts_on_its_cut(trained_slim: Path, tmp_path: Path) -> None:
    require("optuna")
    from surgery.compress import SearchSettings, SearchSpace, rebuild_trial, search
    from surgery.storage.checkpoint import load_checkpoint, read_checkpoint, save_pruned
    from surgery.workflows import recipe_for_checkpoint

    dense, ckpt = load_checkpoint(trained_slim)
    rec = recipe_for_checkpoint(read_checkpoint(trained_slim), None, {})
    settings = SearchSettings(trials=1, recover_batches=0, holdout=8, macs_input_size=64, trace_size=64)
    result = search(dense, rec, Goal(keep_macs=0.5), tmp_path / "run", settings=settings,
                    space=SearchSpace(criteria=("l1",), round_to=(1,)))
    chosen = result.chosen
    assert chosen is not None and chosen.ratios
    model, pruned = rebuild_trial(dense, rec, chosen, settings)
    path = save_pruned(tmp_path / "chosen.pt", model, ckpt.spec, pruned.plan)
    ratio = _inspected_macs(path, 64) / _inspected_macs(trained_slim, 64)
    assert chosen.macs_ratio == pytest.approx(ratio, rel=1e-9), "compress's MACs are not the pipeline's count"
    assert ratio <= 0.5 * (1 + BUDGET_TOL)


# --------------------------------------------------------------------------------------------
# storage: kill and resume, two workers, PostgreSQL


def _compress(dense: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "surgery", "compress", str(dense), "--out", str(out), "--keep-macs", "0.5",
            "--search-only", *FAST, *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "") + os.pathsep + str(ROOT),
            "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}


def _trials(url: str) -> list:
    optuna = require("optuna")
    # sqlalchemy comes with optuna (imported after require: a missing extra is require's one message)
    from sqlalchemy.exc import IntegrityError, OperationalError

    try:
        return optuna.load_study(study_name="compress", storage=url).get_trials(deepcopy=False)
    except KeyError:  # the worker has created the tables but not the study yet
        return []
    except (IntegrityError, OperationalError):  # opened while the worker creates the schema: both
        return []  # stamp its version (surgery.compress retries the same race for its workers)


def _complete(url: str) -> list:
    return [t for t in _trials(url) if t.state.name == "COMPLETE"]


def test_killed_search_resumes_without_repeating_a_finished_trial(trained_slim: Path, tmp_path: Path) -> None:
    require("optuna")
    out = tmp_path / "run"
    url = f"sqlite:///{out / 'study.db'}"
    proc = subprocess.Popen(_compress(trained_slim, out, "--trials", "3"), env=_env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "study.db").exists() and len(_complete(url)) >= 1:
            break
        time.sleep(0.5)
    assert proc.poll() is None, f"the search ended before it could be killed:\n{proc.stdout.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {t.number: t.params for t in _complete(url)}
    assert 1 <= len(before) < 3
    run = subprocess.run(_compress(trained_slim, out, "--trials", "3"), env=_env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{len(before)} finished trials kept" in run.stdout
    after = _complete(url)
    assert len(after) == 3
    ran = [int(x) for x in run.stdout.split("ran trials ")[1].split(";")[0].split(", ")]
    assert not set(ran) & set(before), "a finished trial was run again"
    assert len(ran) == 3 - len(before)
    params = [tuple(sorted(t.params.items())) for t in after]
    assert len(set(params)) == len(params), "two finished trials with the same parameters"


def test_two_workers_share_one_sqlite_study_without_losing_or_repeating_a_trial(trained_slim: Path, tmp_path: Path) -> None:
    require("optuna")
    out = tmp_path / "run"
    procs = [subprocess.Popen(_compress(trained_slim, out, "--trials", "4", "--seed", str(i)), env=_env(),
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    ran = [[int(x) for x in o.split("ran trials ")[1].split(";")[0].split(", ") if x.strip().isdigit()] for o in outputs]
    trials = _trials(f"sqlite:///{out / 'study.db'}")
    complete = {t.number for t in trials if t.state.name == "COMPLETE"}
    assert 4 <= len(complete) <= 5  # each worker stops once 4 are finished: at most one more was in flight
    assert not set(ran[0]) & set(ran[1]), "a trial was run by both workers"
    assert set(ran[0]) | set(ran[1]) == complete, "a finished trial no worker reports, or a reported one lost"
    workers = {t.user_attrs["worker"] for t in trials if t.state.name == "COMPLETE"}
    assert len(workers) == 2, "both workers should have run trials"


def test_workers_flag_searches_one_study_in_two_processes_without_losing_or_repeating_a_trial(
        trained_slim: Path, tmp_path: Path) -> None:
    require("optuna")
    out = tmp_path / "run"
    run = subprocess.run(_compress(trained_slim, out, "--trials", "4", "--workers", "2"), env=_env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 workers, 1 torch threads each" in run.stdout
    trials = _complete(f"sqlite:///{out / 'study.db'}")
    assert 4 <= len(trials) <= 5  # each process stops once 4 are finished: at most one more was in flight
    assert len({t.user_attrs["worker"] for t in trials}) == 2, "both processes should have run trials"
    # the MACs budget fixes the cost: the sampler optimises the proxy mAP alone
    assert all(t.values == [t.user_attrs["proxy_map"]] for t in trials)
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == len(params), "two finished trials with the same parameters"


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while listed
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


def test_killing_the_command_ends_its_worker_processes(trained_slim: Path, tmp_path: Path) -> None:
    require("optuna")
    if not Path("/proc/self/stat").exists():
        pytest.skip("reads the process table from /proc (Linux)")
    proc = subprocess.Popen(_compress(trained_slim, tmp_path / "run", "--trials", "50", "--workers", "2"), env=_env(),
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, kids = time.monotonic() + 300, []
    while time.monotonic() < deadline and proc.poll() is None and not any(_spawned(k) for k in kids):
        kids = _children(proc.pid)
        time.sleep(0.5)
    assert any(_spawned(k) for k in kids) and proc.poll() is None, "the worker process never started"
    time.sleep(3)  # the worker is searching now
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(Path(f"/proc/{k}").exists() and _alive(k) for k in kids):
        time.sleep(0.5)
    assert not [k for k in kids if Path(f"/proc/{k}").exists() and _alive(k)], "a worker outlived its command"


def _spawned(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A real PostgreSQL server on a temporary folder and a free port of 127.0.0.1, stopped at teardown.
    Under CI=true a server that cannot start is a failure (.ci/run installs it), elsewhere a skip."""
    require("psycopg")
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    initdb = Path(shutil.which("initdb") or (bins[-1] if bins else "initdb"))
    if not initdb.exists():
        (pytest.fail if in_ci() else pytest.skip)("PostgreSQL is not installed (apt-get install postgresql)")
    bindir = initdb.parent
    tmp = Path(tempfile.mkdtemp(prefix="surgery-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root: the package's own user
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(tmp, "postgres")
    data, port = tmp / "data", _free_port()
    pg_ctl = [*as_user, str(bindir / "pg_ctl"), "-D", str(data)]
    try:
        subprocess.run([*as_user, str(initdb), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([*pg_ctl, "-w", "-t", "60", "-l", str(tmp / "log"), "-o",
                        f"-c listen_addresses=127.0.0.1 -p {port} -k {tmp} -c fsync=off", "start"],
                       check=True, capture_output=True, timeout=120)
    except (subprocess.SubprocessError, OSError) as e:
        log = (tmp / "log").read_text() if (tmp / "log").exists() else ""
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (pytest.fail if in_ci() else pytest.skip)(f"PostgreSQL did not start: {e} {getattr(e, 'stderr', '')} {log}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*pg_ctl, "-m", "fast", "stop"], capture_output=True, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)


def test_workers_join_one_study_on_a_postgresql_server(trained_slim: Path, tmp_path: Path, postgres_url: str) -> None:
    # worker 1 runs two trials; worker 2 (another run folder, as on another machine) joins and adds one
    first = subprocess.run(_compress(trained_slim, tmp_path / "a", "--trials", "2", "--storage", postgres_url),
                           env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr
    second = subprocess.run(_compress(trained_slim, tmp_path / "b", "--trials", "3", "--storage", postgres_url),
                            env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "2 finished trials kept" in second.stdout
    complete = _complete(postgres_url)
    assert len(complete) == 3
    assert not (tmp_path / "a" / "study.db").exists() and not (tmp_path / "b" / "study.db").exists()
    assert len({t.user_attrs["worker"] for t in complete}) == 2


# --------------------------------------------------------------------------------------------
# the command: a goal it cannot meet, a goal it meets


def test_unmeetable_goal_exits_1_with_the_closest_trial_and_writes_no_model(trained_slim: Path, tmp_path: Path) -> None:
    require("optuna")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "surgery", "compress", str(trained_slim), "--out", str(out), "--keep-map", "1.0",
           "--keep-macs", "0.1", "--trials", "2", *FAST]
    run = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 1, run.stdout + run.stderr
    last = run.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith("goal not met: closest trial #"), run.stderr
    # every trial lands on the MACs budget (keep is fixed to it): the miss is the floor, with its shortfall
    assert "< floor" in last[0] and "short" in last[0] and "try " in last[0]
    assert not (out / "model.pt").exists() and not (out / "pruned.pt").exists() and not (out / "model.onnx").exists()
    report = (out / "report.md").read_text()
    assert "**Goal not met in the search**" in report and "Goal met" not in report
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("trial,state,proxy_map")
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "a temporary file was left behind"


@pytest.mark.slow
def test_met_goal_is_retrained_verified_and_delivered(trained_slim: Path, tmp_path: Path) -> None:
    require("optuna")
    require("onnxruntime")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "surgery", "compress", str(trained_slim), "--out", str(out), "--keep-macs", "0.6",
           "--trials", "2", "--retrain-steps", "3", *FAST]
    run = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert run.returncode in (0, 1), run.stdout + run.stderr
    from surgery.measure import count_macs
    from surgery.storage.checkpoint import load_checkpoint

    dense, _ = load_checkpoint(trained_slim)
    model, ckpt = load_checkpoint(out / "model.pt")
    kept = count_macs(model, 64).total / count_macs(dense, 64).total
    assert kept <= 0.6 * (1 + BUDGET_TOL)  # the budget holds on the delivered model, counted again
    assert ckpt.plan.extra["compress"]["trial"] in (0, 1)
    assert (out / "model.onnx").exists()
    report = (out / "report.md").read_text()
    assert ("Goal met on the validation split" in report) == (run.returncode == 0)


def test_missing_search_extra_names_the_extra_to_install(monkeypatch) -> None:
    import importlib.util

    from surgery import compress
    from surgery.errors import MissingExtraError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a))
    with pytest.raises(MissingExtraError, match=r"pip install 'surgery\[search\]'"):
        compress._optuna()


def test_time_limit_reads_seconds_minutes_and_hours() -> None:
    import typer

    from cli.compress_cmd import parse_duration

    assert [parse_duration(t) for t in ("90s", "30m", "2h", "45", None)] == [90, 1800, 7200, 45, None]
    with pytest.raises(typer.BadParameter, match="30 minutes"):
        parse_duration("30 minutes")


def test_sensitivity_weights_cut_the_insensitive_group_more(tmp_path: Path) -> None:
    from surgery.compress import sensitivity_weights
    from surgery.pruning.sensitivity import COLUMNS

    rows = [["k", "dense", 0.0, 0, 0, 100, 1.0, 0.5, 0.7, 0]]
    for group, losses in (("a", (0.0, 0.1, 0.3)), ("b", (0.1, 0.3, 0.4))):
        rows += [["k", group, r, 16, 8, 80, 0.8, 0.5 - loss, 0.6, 0] for r, loss in zip((0.25, 0.5, 0.75), losses)]
    path = tmp_path / "sens.csv"
    path.write_text("\n".join(",".join(map(str, r)) for r in [list(COLUMNS), *rows]) + "\n")
    w = sensitivity_weights(path, ["a", "b", "c"])
    # losses at the middle ratio (0.5): a 0.1, b 0.3, mean 0.2; a group the table lacks gets 1
    assert w == pytest.approx({"a": 2.0, "b": 2 / 3, "c": 1.0})


def test_a_dense_checkpoint_inside_out_that_would_be_replaced_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"dense")
    run = subprocess.run([sys.executable, "-m", "surgery", "compress", str(tmp_path / "model.pt"), "--out", str(tmp_path),
                          "--keep-macs", "0.5"], env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "one of the files compress writes" in run.stderr, run.stderr
    assert (tmp_path / "model.pt").read_bytes() == b"dense"


# --------------------------------------------------------------------------------------------
# the paths of a trial: a latency budget, sensitivity weights, a YOLO delivered with INT8


def test_latency_budget_costs_each_trial_its_measured_onnxruntime_latency(trained_slim: Path, tmp_path: Path,
                                                                          monkeypatch) -> None:
    require("optuna")
    require("onnxruntime")
    from typer.testing import CliRunner

    from cli.main import app
    from surgery import compress

    timed: list[tuple[int, str, int]] = []
    real = compress.network_ms

    def spy(models, runtime, input_size, **kw):  # noqa: ANN001, ANN202 - network_ms's signature
        timed.append((len(models), runtime, input_size))
        return real(models, runtime, input_size, **kw)

    monkeypatch.setattr(compress, "network_ms", spy)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["compress", str(trained_slim), "--out", str(out), "--keep-latency", "0.9",
                                   "--runtime", "onnxruntime", "--trials", "1", "--search-only", *FAST])
    assert res.exit_code == 0, (res.output, res.exception)
    trials = _complete(f"sqlite:///{out / 'study.db'}")
    assert len(trials) == 1
    assert timed == [(2, "onnxruntime", 64)]  # the trial timed against the dense model, on the runtime asked
    assert [t.values for t in trials] == [[trials[0].user_attrs["proxy_map"], trials[0].user_attrs["latency_ratio"]]]
    for t in trials:
        a = t.user_attrs
        assert 0 < a["latency_ratio"] and a["cost"] == a["latency_ratio"] != a["macs_ratio"]  # the cost is latency
        assert a["constraints"][0] == pytest.approx(a["latency_ratio"] - 0.9 * (1 + BUDGET_TOL))
        assert a["feasible"] == (a["latency_ratio"] <= 0.9 * (1 + BUDGET_TOL))


def test_multiplier_and_max_stages_flags_widen_the_sampled_space(trained_slim: Path, tmp_path: Path) -> None:
    require("optuna")
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["compress", str(trained_slim), "--out", str(out), "--keep-macs", "0.5", "--trials", "1",
                                   "--search-only", "--multiplier", "0.25,2.0", "--max-stages", "9", *FAST])
    assert res.exit_code == 0, (res.output, res.exception)
    trials = _complete(f"sqlite:///{out / 'study.db'}")
    assert len(trials) == 1
    nine = {"backbone.body.conv1", "backbone.body.layer1", "backbone.body.layer2", "backbone.body.layer3",
            "backbone.body.layer4", "backbone.fpn.inner_blocks", "backbone.fpn.layer_blocks",
            "head.classification_head.conv", "head.regression_head.conv"}
    for t in trials:  # nine stages (the default 8 merges them into body, FPN and the two heads), each in [0.25, 2]
        mults = {k.split(":", 1)[1]: d for k, d in t.distributions.items() if k.startswith("mult:")}
        assert set(mults) == nine
        assert all((d.low, d.high) == (0.25, 2.0) for d in mults.values())
    res = CliRunner().invoke(app, ["compress", str(trained_slim), "--out", str(tmp_path / "bad"), "--keep-macs", "0.5",
                                   "--multiplier", "2,1", *FAST])
    assert res.exit_code != 0 and "--multiplier: LO,HI" in res.output + str(res.exception)


def _sensitivity_table(path: Path, losses: dict[str, float]) -> Path:
    from surgery.pruning.sensitivity import COLUMNS

    rows = [["k", "dense", 0.0, 0, 0, 100, 1.0, 0.5, 0.7, 0]]
    rows += [["k", group, 0.5, 16, 8, 80, 0.8, 0.5 - loss, 0.6, 0] for group, loss in losses.items()]
    path.write_text("\n".join(",".join(map(str, r)) for r in [list(COLUMNS), *rows]) + "\n")
    return path


def test_sensitivity_power_cuts_insensitive_groups_more_and_sensitive_ones_less(tmp_path: Path) -> None:
    optuna = require("optuna")
    from surgery.compress import Allocator, SearchSpace, cut_and_recover, group_ratios, suggest
    from surgery.config.recipe import PruneSection
    from surgery.detectors.builders import ModelSpec, build_model

    model = build_model(ModelSpec("fcos_resnet18_slim", {"min_size": 64, "max_size": 64, "fpn_channels": 64})).eval()
    roots = Allocator(model, PruneSection(), 64, 64, SearchSpace()).roots
    insensitive, sensitive = roots[1], roots[2]
    space = SearchSpace(criteria=("l1",), round_to=(1,),
                        sensitivity=str(_sensitivity_table(tmp_path / "s.csv", {insensitive: 0.05, sensitive: 0.3})))
    alloc = Allocator(model, PruneSection(), 64, 64, space)
    stages = sorted(set(alloc.stages.values()))
    params = {"keep": 0.5, **{f"mult:{s}": 1.0 for s in stages}, "criterion": "l1", "round_to": 1}
    ratios = {}
    for power in (0.0, 1.0):
        cfg = suggest(optuna.trial.FixedTrial({**params, "sens_power": power}), Goal(keep_macs=0.5), space, stages)
        assert cfg.sens_power == power  # the search space samples it
        _, result = cut_and_recover(model, alloc.job(cfg, 0), macs_input_size=64, trace_size=64, calib_data=None,
                                    recover_data=None)
        assert 0.5 * 0.98 <= result.report.macs_ratio <= 0.5 * (1 + BUDGET_TOL)
        ratios[power] = group_ratios(result)
    assert len(set(ratios[0.0].values())) == 1  # power 0: the uniform cut
    cut = ratios[1.0]
    others = [cut[r] for r in roots if r not in (insensitive, sensitive)]
    # weights mean/loss: 3.5 and 0.58 (the lightest: cut by the searched ratio), the others 1
    assert cut[insensitive] > max(others) and min(others) > cut[sensitive]
    assert others[0] / cut[sensitive] == pytest.approx(0.3 / 0.175, rel=1e-6)


@pytest.mark.slow
def test_yolo_compress_delivers_the_int8_onnx_and_the_ultralytics_file(ultralytics, tmp_path: Path) -> None:
    require("optuna")
    require("onnxruntime")
    from surgery.detectors.builders import ModelSpec, build_model
    from surgery.storage.checkpoint import load_checkpoint, save_checkpoint

    spec = ModelSpec("ultralytics:yolov8n.yaml", {"nc": 4, "size": 64})
    dense = save_checkpoint(tmp_path / "dense.pt", build_model(spec), spec)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  root: {tmp_path / 'synth'}\n  images: 24\n  size: 64\nretrain:\n  steps: 1\n"
                      "  batch_size: 4\n  checkpoint_every: 0\nbench:\n  input_size: 64\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "surgery", "compress", str(dense), "--recipe", str(recipe), "--out", str(out),
           "--keep-macs", "0.7", "--trials", "1", "--int8", *FAST]
    run = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout + run.stderr
    for name in ("model.pt", "model.onnx", "model.int8.onnx", "model.ultralytics.pt", "report.md", "trials.csv"):
        assert (out / name).exists(), name
    model, _ = load_checkpoint(out / "model.pt")
    ours = sum(p.numel() for p in model.parameters())
    from ultralytics import YOLO

    theirs = YOLO(str(out / "model.ultralytics.pt"))
    assert sum(p.numel() for p in theirs.model.parameters()) == ours  # the pruned widths, handed back
    assert "model.int8.onnx" in (out / "report.md").read_text()


def test_a_latency_budget_searches_the_macs_around_it_and_starts_from_a_uniform_cut_in_their_middle() -> None:
    """Trials of ``--keep-latency B`` aim their cut at [0.5 B, 1.1 B] of the dense MACs (the
    network's latency falls no faster than its MACs), trial 0 (the uniform cut) at the middle; a MACs
    budget fixes the MACs, a floor alone searches the whole range."""
    optuna = require("optuna")
    from surgery.compress import LATENCY_KEEP, SearchSpace, keep_range, suggest, uniform_params
    from surgery.config.recipe import PruneSection

    space, budget = SearchSpace(criteria=("l1",), round_to=(8,)), 0.58
    lo, hi = LATENCY_KEEP[0] * budget, LATENCY_KEEP[1] * budget
    goal = Goal(keep_latency=budget)
    assert keep_range(goal, space) == pytest.approx((lo, hi))
    assert keep_range(Goal(keep_macs=0.4), space) == (0.4, 0.4)
    assert keep_range(Goal(keep_map=0.99), space) == space.keep
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    keeps = [suggest(study.ask(), goal, space, ["s"]).keep for _ in range(40)]
    assert lo <= min(keeps) and max(keeps) <= hi and max(keeps) - min(keeps) > 0.5 * (hi - lo)
    assert uniform_params(goal, space, ["s"], PruneSection())["keep"] == pytest.approx((lo + hi) / 2)
    assert uniform_params(Goal(keep_macs=0.4), space, ["s"], PruneSection())["keep"] == 0.4
    assert uniform_params(Goal(keep_map=0.99), space, ["s"], PruneSection())["keep"] == 0.5


@pytest.mark.slow
def test_by_default_a_label_free_table_is_measured_in_the_run_folder_and_adds_its_power_to_the_space(
        trained_slim: Path, tmp_path: Path) -> None:
    """``--sensitivity label-free``, the default: the table is measured on the dense checkpoint (one row per group
    and a dense row scored 1 against the model's own detections), kept in ``--out``, and the trial
    samples ``sens_power``; a rerun reuses the table."""
    require("optuna")
    from typer.testing import CliRunner

    from cli.main import app
    from surgery.pruning.sensitivity import DENSE, read_table

    out = tmp_path / "run"
    args = ["compress", str(trained_slim), "--out", str(out), "--keep-macs", "0.5", "--trials", "1", "--search-only",
            *FAST[:-2]]  # without FAST's "--sensitivity none": the label-free table is the default
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, (res.output, res.exception)
    tables = list(out.glob("sensitivity-*.csv"))
    assert len(tables) == 1
    rows = read_table(tables[0])[1]
    assert next(r.map for r in rows if r.group == DENSE) == pytest.approx(1.0) and len(rows) > 5
    trials = _complete(f"sqlite:///{out / 'study.db'}")
    assert "sens_power" in trials[0].params
    before = tables[0].stat().st_mtime_ns
    res = CliRunner().invoke(app, [*args[:7], "2", *args[8:]])  # one more trial: the study resumes
    assert res.exit_code == 0, (res.output, res.exception)
    assert list(out.glob("sensitivity-*.csv")) == tables and tables[0].stat().st_mtime_ns == before
    from cli.compress_cmd import _sensitivity  # workers on other machines would each measure their own table

    assert _sensitivity(None, "postgresql://db-host/s") is None and _sensitivity("None", None) is None
