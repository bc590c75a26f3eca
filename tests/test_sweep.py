"""Hyperparameter sweeps (pipeline.sweep): sweep-file validation, seeded Optuna samplers, the Tuning section;
slow: sweeps/quick.yaml end to end in a copy of the repository (tiny params), a restart re-running nothing,
and a restart after SIGKILL re-running no finished trial.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.sweep_exec import ask, make_sampler
from pipeline.sweep_spec import SweepError, check_repo, objective_value, parse_sweep
from pipeline.sweep_workspace import restorable_lock, stage_actions

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "sweeps" / "quick.yaml"


def _write(tmp_path: Path, data: dict, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _base() -> dict:
    return yaml.safe_load(QUICK.read_text())


def _with(change: dict) -> dict:
    data = _base()
    for key, value in change.items():
        node = data
        *parents, last = key.split("/")
        for part in parents:
            node = node[part]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return data


# ------------------------------------------------------------------------- the file on its own
@pytest.mark.parametrize("change, field, words", [
    ({"method": "bayes"}, "method", "unknown method"),
    ({"trials": 0}, "trials", ">= 1"),
    ({"max_parallel": 0}, "max_parallel", ">= 1"),
    ({"trails": 4}, "trails", "did you mean 'trials'"),
    ({"params/annealing.step_lr": {"uniform": [1e-4, 1e-5]}}, "params.annealing.step_lr.uniform", "inverted"),
    ({"params/annealing.step_lr": {"uniform": [1e-4, 1e-4]}}, "params.annealing.step_lr.uniform", "empty"),
    ({"params/annealing.step_lr": {"log_uniform": [0.0, 1e-3]}}, "params.annealing.step_lr.log_uniform", "low > 0"),
    ({"params/annealing.n_steps_each": {"grid": []}}, "params.annealing.n_steps_each.grid", "non-empty"),
    ({"params/annealing.n_steps_each": {"int": [2.5, 4]}}, "params.annealing.n_steps_each.int", "integers"),
    ({"params/annealing.step_lr": {"loguniform": [1e-5, 1e-3]}}, "params.annealing.step_lr.loguniform",
     "did you mean 'log_uniform'"),
    ({"params/annealing.step_lr": {"log_uniform": [1e-5, 1e-3]}}, "params.annealing.step_lr.log_uniform",
     "method grid needs"),
    ({"objective/direction": "down"}, "objective.direction", "minimize"),
    ({"objective/key": None}, "objective.key", "missing"),
    ({"base_params": {"annealing.step_lr": 1e-5}}, "base_params.annealing.step_lr", "also varied"),
])
def test_bad_sweep_file_names_the_field(tmp_path, change, field, words):
    with pytest.raises(SweepError) as err:
        parse_sweep(_write(tmp_path, _with(change)))
    assert err.value.path == field and f": {field}: " in str(err.value) and words in str(err.value), str(err.value)


def test_shipped_sweeps_parse_and_check():
    for name, method, budget in (("quick", "grid", 4), ("annealed_langevin", "tpe", 16), ("sigma_end", "grid", 3)):
        spec = parse_sweep(ROOT / "sweeps" / f"{name}.yaml")
        assert (spec.method, spec.budget) == (method, budget)
    assert parse_sweep(ROOT / "sweeps" / "annealed_langevin.yaml").max_parallel == 2
    info = check_repo(parse_sweep(QUICK), ROOT)
    assert info.rerun == ["annealing"] and "train@ncsn" in info.closure  # a sampler sweep never retrains
    assert info.defaults == {"annealing.step_lr": 4e-5, "annealing.n_steps_each": 20}
    sigma = check_repo(parse_sweep(ROOT / "sweeps" / "sigma_end.yaml"), ROOT)
    assert {"noise", "train@ncsn", "evaluate@ncsn"} <= set(sigma.rerun) and "classifier" not in sigma.rerun


# ------------------------------------------------------------------- against the repository
@pytest.mark.parametrize("change, field, words", [
    ({"params/annealing.step_lrr": {"grid": [1e-5]}}, "params.annealing.step_lrr", "did you mean 'annealing.step_lr'"),
    ({"base_params": {"annealing.nn": 8}}, "base_params.annealing.nn", "unknown params.yaml key"),
    ({"params/annealing.n_steps_each": {"grid": [0, 2]}}, "params.annealing.n_steps_each", "annealing.n_steps_each"),
    ({"params/toy.n": {"grid": [100, 200]}}, "params.toy.n", "no stage of the trial"),
    ({"objective/stage": "anealing"}, "objective.stage", "did you mean 'annealing'"),
    ({"objective/metrics": "reports/metrics/toy.json"}, "objective.metrics", "not a metrics output"),
    ({"targets": ["trian@ncsn"]}, "targets[0]", "no stage"),
    ({"targets": ["train@ncsn"]}, "targets", "do not reproduce"),
])
def test_repository_checks_name_the_field(tmp_path, change, field, words):
    with pytest.raises(SweepError) as err:
        check_repo(parse_sweep(_write(tmp_path, _with(change))), ROOT)
    assert err.value.path == field and words in str(err.value), str(err.value)


def test_objective_key_checked_against_the_metrics():
    spec = parse_sweep(QUICK)
    metrics = {"annealed_langevin": {"fid_digits_cnn_n32": 12.5, "nfe": 21}, "langevin_fixed_sigma": {}}
    assert objective_value(spec, metrics, "m.json") == (12.5, {"fid_digits_cnn_n32": 12.5, "nfe": 21})
    with pytest.raises(SweepError) as err:
        objective_value(spec, {"annealed_langevin": {"fid_digits_cnn_n200": 1.0}}, "m.json")
    assert err.value.path == "objective.key" and "fid_digits_cnn_n200" in str(err.value)
    with pytest.raises(SweepError, match="not a finite number"):
        objective_value(spec, {"annealed_langevin": {"fid_digits_cnn_n32": float("nan")}}, "m.json")


def test_cli_rejects_a_bad_file_before_anything_runs(tmp_path):
    data = _with({"params/annealing.step_lrr": {"grid": [1e-5]}})
    data["name"] = "bad-sweep-test"
    path = _write(tmp_path, data)
    storage = tmp_path / "study.db"
    proc = subprocess.run([sys.executable, "-m", "pipeline.sweep", str(path), "--storage", f"sqlite:///{storage}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "params.annealing.step_lrr: unknown params.yaml key" in proc.stderr, proc.stderr
    assert not storage.exists() and not (ROOT / "sweeps" / ".work" / "bad-sweep-test").exists()
    assert not (ROOT / "reports" / "sweeps" / "bad-sweep-test.json").exists()


# ------------------------------------------------------------------------------- samplers
def _spec(tmp_path, method: str, seed: int = 0, trials: int = 8):
    data = _base()
    data.update(method=method, seed=seed, trials=trials)
    if method != "grid":
        data["params"] = {"annealing.step_lr": {"log_uniform": [1e-6, 1e-3]}, "annealing.n_steps_each": {"int": [1, 9]}}
    return parse_sweep(_write(tmp_path, data, f"{method}-{seed}.yaml"))


def _draws(spec, n: int, tell=lambda p: p["annealing.step_lr"]) -> list[dict]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize")
    out = []
    for _ in range(n):
        trial = ask(study, spec)
        out.append(dict(trial.params))
        study.tell(trial, tell(trial.params))
    return out


@pytest.mark.parametrize("method, cls", [("grid", "GridSampler"), ("random", "RandomSampler"), ("tpe", "TPESampler")])
def test_samplers_are_optunas_and_seeded(tmp_path, method, cls):
    import optuna

    spec = _spec(tmp_path, method)
    assert isinstance(make_sampler(spec), getattr(optuna.samplers, cls))
    n = 4 if method == "grid" else 8       # tpe: past its start-up trials
    first, again = _draws(spec, n), _draws(spec, n)
    assert first == again                  # same seed, same trials
    if method == "grid":
        assert sorted(map(str, first)) == sorted(map(str, [{"annealing.step_lr": a, "annealing.n_steps_each": b}
                                                           for a in (2e-5, 8e-5) for b in (2, 4)]))
        assert len({str(p) for p in first}) == 4   # the whole grid, no repeats
    else:
        assert _draws(_spec(tmp_path, method, seed=1), n) != first
        assert len({p["annealing.step_lr"] for p in first}) == n  # a resumed study does not replay draws


# ------------------------------------------------------------------------------- workspaces
def test_lock_keeps_only_entries_dvc_can_restore_from(tmp_path):
    import hashlib

    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "a.json").write_text('{"fid": 1}')
    good = hashlib.md5(b'{"fid": 1}').hexdigest()
    lock = {"schema": "2.0", "stages": {
        "train@ncsn": {"cmd": "x", "outs": [{"path": "models/ncsn.pt", "hash": "md5", "md5": "ab" + "1" * 30}]},
        "prepare": {"cmd": "y", "outs": [{"path": "data/prepared/data.parquet", "hash": "md5", "md5": "cd" + "2" * 30}]},
        "annealing": {"cmd": "z", "outs": [{"path": "reports/a.json", "hash": "md5", "md5": good}]},
        "toy": {"cmd": "t", "outs": [{"path": "reports/a.json", "hash": "md5", "md5": "0" * 32}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    cache = tmp_path / "cache"
    (cache / "files" / "md5" / "cd").mkdir(parents=True)
    (cache / "files" / "md5" / "cd" / ("2" * 30)).write_text("data")
    cached = {"train@ncsn": ["models/ncsn.pt"], "prepare": ["data/prepared/data.parquet"]}
    uncached = {"annealing": ["reports/a.json"], "toy": ["reports/a.json"]}
    text, kept, dropped, files = restorable_lock(tmp_path, cache, cached, uncached)
    assert sorted(dropped) == ["toy", "train@ncsn"]       # object not cached / metrics file differs
    assert set(yaml.safe_load(text)["stages"]) == set(kept) == {"prepare", "annealing"} and files == ["reports/a.json"]
    assert restorable_lock(tmp_path / "none", cache, cached, uncached) == (None, [], [], [])


def test_stage_actions_from_dvc_output():
    log = ("Stage 'prepare' didn't change, skipping\nStage 'train@ncsn' is cached - skipping run, checking out outputs\n"
           "Running stage 'annealing':\n> python -m stages.annealing\n")
    assert stage_actions(log) == {"ran": ["annealing"], "restored": ["train@ncsn"], "unchanged": ["prepare"]}


# ------------------------------------------------------------------------------- the report
def test_tuning_section(tmp_path):
    from pipeline.report_render import render_markdown
    from pipeline.report_sections import section_tuning
    from pipeline.sweep_report import plot

    data = {"sweep": "demo", "method": "tpe", "objective": {"stage": "annealing", "key": "a.fid", "direction": "minimize"},
            "params": {"annealing.step_lr": {"log_uniform": [1e-6, 1e-3]}}, "log_params": ["annealing.step_lr"],
            "defaults": {"annealing.step_lr": 4e-5}, "baseline": {"objective": 13.0}, "complete": 2,
            "trials_requested": 2,
            "trials": [{"number": 0, "params": {"annealing.step_lr": 1e-5}, "objective": 12.0, "status": "COMPLETE"},
                       {"number": 1, "params": {"annealing.step_lr": 1e-4}, "objective": 15.0, "status": "COMPLETE"}],
            "best": {"number": 0, "params": {"annealing.step_lr": 1e-5}, "objective": 12.0}}
    (tmp_path / "demo.json").write_text(json.dumps(data))
    plot(tmp_path / "demo.png", data)
    params = {"annealing": {"step_lr": 4e-5}}
    md = render_markdown("t", [section_tuning(tmp_path, params, tmp_path.parent)], "now")
    assert "| annealing.step_lr (log range) | 4.000e-05 | 1.000e-05 |" in md
    assert "| annealing: a.fid (minimize) | 13 | 12 |" in md and "best (trial 0)" in md
    assert f"]({tmp_path.name}/demo.png)" in md
    assert "No sweep results" in render_markdown("t", [section_tuning(tmp_path / "none", params)], "now")


# ============================================================================ slow: end to end
def _env(repo: Path) -> dict:
    env = dict(os.environ)
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", MLFLOW_TRACKING_URI=f"sqlite:///{repo}/mlflow.db",
               DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", PYTHONPATH=str(repo))
    for key in ("SCORESDE_PARENT_RUN_ID", "SCORESDE_RUN_GROUP", "SCORESDE_SWEEP_STORAGE"):
        env.pop(key, None)
    return env


def _sweep(repo: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.sweep", *args], cwd=repo, env=_env(repo),
                          capture_output=True, text=True, timeout=timeout)


def _runs(repo: Path, experiment: str = "e2e-sweeps"):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    exp = mlflow.get_experiment_by_name(experiment)
    return mlflow.search_runs([exp.experiment_id]) if exp else None


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A copy of the repository on tiny params, reproduced up to the annealing stage (its own dvc.lock)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_pipeline_e2e import dvc, make_repo

    path = make_repo(tmp_path_factory.mktemp("sweep"))
    shutil.copytree(ROOT / "sweeps", path / "sweeps", ignore=shutil.ignore_patterns(".work", "*.db"))
    dvc(path, "repro", "annealing")
    return path


@pytest.fixture(scope="module")
def quick(repo):
    lock = (repo / "dvc.lock").read_bytes()
    start = time.perf_counter()
    proc = _sweep(repo, "sweeps/quick.yaml")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return repo, lock, proc, time.perf_counter() - start


@pytest.mark.slow
def test_quick_sweep_results_and_mlflow(quick):
    repo, lock, proc, seconds = quick
    data = json.loads((repo / "reports/sweeps/quick.json").read_text())
    trials = data["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3]
    assert all(t["status"] == "COMPLETE" and isinstance(t["objective"], float) for t in trials)
    assert {(t["params"]["annealing.step_lr"], t["params"]["annealing.n_steps_each"]) for t in trials} == \
        {(a, b) for a in (2e-5, 8e-5) for b in (2, 4)}
    assert data["best"]["objective"] == min(t["objective"] for t in trials)
    assert isinstance(data["baseline"]["objective"], float) and (repo / "reports/sweeps/quick.png").stat().st_size > 0
    runs = _runs(repo)
    parents = runs[runs["tags.scoresde.role"] == "sweep"]
    assert len(parents) == 1 and parents.iloc[0]["tags.sweep"] == "quick" and parents.iloc[0]["tags.method"] == "grid"
    children = runs[(runs["tags.scoresde.role"] == "trial") & (runs["tags.mlflow.parentRunId"] == parents.iloc[0]["run_id"])]
    assert sorted(children["tags.trial"].astype(int)) == [0, 1, 2, 3] and (children["status"] == "FINISHED").all()
    key = "metrics.annealed_langevin.fid_digits_cnn_n32"
    assert children[key].notna().all() and children["params.annealing.step_lr"].notna().all()
    assert children["metrics.seconds"].notna().all()
    # the stage runs of each trial nest under that trial's run, in the sweep's experiment only
    stages = runs[runs["tags.mlflow.parentRunId"].isin(children["run_id"])]
    assert set(stages["tags.dvc_stage"]) == {"annealing"} and len(stages) == 4


@pytest.mark.slow
def test_quick_sweep_reuses_upstream_and_leaves_the_checkout(quick):
    repo, lock, proc, _ = quick
    assert (repo / "dvc.lock").read_bytes() == lock
    data = json.loads((repo / "reports/sweeps/quick.json").read_text())
    for t in data["trials"]:
        assert t["ran"] == ["annealing"], t                          # only the varied stage ran
        assert "train@ncsn" in t["unchanged"] + t["restored"]       # never retrained
    assert not list((repo / "sweeps/.work/quick").glob("trial_*"))
    # the checkout was reproduced: the base run finds everything upstream up to date (only annealing's base
    # params differ), nothing is retrained there either
    base = re.search(r"base run done in [0-9.]+ s \(ran: ([^;]*);", proc.stdout)
    assert base and base.group(1) in ("nothing", "annealing"), proc.stdout


@pytest.mark.slow
def test_second_invocation_reruns_nothing(quick):
    repo = quick[0]
    before = json.loads((repo / "reports/sweeps/quick.json").read_text())["trials"]
    n_runs = len(_runs(repo))
    proc = _sweep(repo, "sweeps/quick.yaml")
    assert proc.returncode == 0 and "nothing to run" in proc.stdout, proc.stdout + proc.stderr
    after = json.loads((repo / "reports/sweeps/quick.json").read_text())["trials"]
    assert [(t["number"], t["objective"], t["mlflow_run_id"]) for t in after] == \
        [(t["number"], t["objective"], t["mlflow_run_id"]) for t in before]
    assert len(_runs(repo)) == n_runs


@pytest.mark.slow
def test_sigkill_then_restart_reruns_no_finished_trial(repo):
    spec = yaml.safe_load(QUICK.read_text())
    spec.update(name="killed", trials=3, max_parallel=1)  # other values than quick's: no run-cache hits
    spec["params"]["annealing.step_lr"] = {"grid": [3.0e-5, 6.0e-5]}
    (repo / "sweeps" / "killed.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    work = repo / "sweeps/.work/killed"
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.sweep", "sweeps/killed.yaml"], cwd=repo, env=_env(repo),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not (work / "trial_1" / ".sweep-pgid").exists():  # trial 0 finished, trial 1 running
            assert driver.poll() is None and time.monotonic() < deadline, driver.stdout.read()
            time.sleep(0.5)
        pgid = int((work / "trial_1" / ".sweep-pgid").read_text())
        time.sleep(3)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    before = json.loads((repo / "reports/sweeps/killed.json").read_text())["trials"]
    assert [(t["number"], t["status"]) for t in before] == [(0, "COMPLETE")]
    proc = _sweep(repo, "sweeps/killed.yaml")
    assert proc.returncode == 0 and "trial 1 was left RUNNING" in proc.stdout, proc.stdout + proc.stderr
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)   # the dead driver's dvc repro was stopped
    after = {t["number"]: t for t in json.loads((repo / "reports/sweeps/killed.json").read_text())["trials"]}
    assert after[0] == before[0]                                   # finished: kept, not re-run
    assert after[1]["status"] == "FAIL" and "killed" in after[1]
    retry = [t for t in after.values() if t.get("retry_of") == 1]
    assert len(retry) == 1 and retry[0]["params"] == after[1]["params"] and retry[0]["status"] == "COMPLETE"
    assert sum(t["status"] == "COMPLETE" for t in after.values()) == 3
    runs = _runs(repo)
    killed = runs[runs["run_id"] == after[1]["mlflow_run_id"]]
    assert killed.iloc[0]["status"] == "KILLED"


@pytest.mark.slow
def test_trials_as_prefect_tasks(repo, tmp_path):
    spec = yaml.safe_load(QUICK.read_text())
    spec.update(name="prefect", trials=2)
    spec["params"] = {"annealing.step_lr": {"grid": [1.0e-5, 3.0e-5]}, "annealing.n_steps_each": {"grid": [2]}}
    (repo / "sweeps" / "prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    env_extra = {"PREFECT_HOME": str(tmp_path / "prefect-home")}
    proc = subprocess.run([sys.executable, "-m", "pipeline.sweep", "sweeps/prefect.yaml", "--prefect"], cwd=repo,
                          env={**_env(repo), **env_extra}, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Task run 'trial-0'" in out and "Flow run 'sweep-prefect'" in out, out[-4000:]
    data = json.loads((repo / "reports/sweeps/prefect.json").read_text())
    assert [t["status"] for t in data["trials"]] == ["COMPLETE", "COMPLETE"]
