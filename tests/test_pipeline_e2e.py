"""End to end: `dvc repro` of the whole pipeline on tiny params in a temp copy of the repo.

Asserts the declared outputs and metrics exist, every stage logged an MLflow run nested under the
reproduction's parent with the documented tags, `dvc status` is clean and a second `dvc repro` is a
no-op.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COPY = ["dvc.yaml", "params.yaml", "pyproject.toml", ".dvcignore", ".gitignore", "stages", "scoresde", "pipeline"]


def tiny_params(params: dict) -> dict:
    """Shrink every stage to seconds while keeping the structure (and the validation) intact."""
    p = json.loads(json.dumps(params))
    p["experiment"] = "e2e"
    p["noise"]["n_examples"] = 2
    for kind in ("ncsn", "ve", "vp", "subvp", "edm"):
        t = p["train"][kind]
        t.update(steps=6, batch_size=16, warmup=0, ckpt_every=3, log_every=2)
        t["model"].update(ch=8, ch_mult=[1, 2], attn_resolutions=[])
        s = p["sample"][kind]
        s.update(n=8, batch_size=8)
        if kind == "ncsn":
            s.update(n_steps_each=2)
        elif kind == "edm":
            s.update(num_steps=3)
        else:
            s.update(steps=4)
    for section, values in TINY_EXTRA.items():
        if section in p:
            _deep_update(p[section], values)
    return p


# Other stages' sections (evaluation, experiments): shrunk the same way.
TINY_EXTRA: dict = {
    "classifier": {"epochs": 8},
    "evaluate": {"n_reference": 400, "kid_subsets": 5},
    "toy": {"n": 400, "n_learned": 200, "n_steps_each": 4,
            "train": {"steps": 20, "batch_size": 64, "warmup": 0, "n_data": 400, "ckpt_every": 10, "log_every": 5}},
    "annealing": {"n": 8, "batch_size": 8, "n_steps_each": 2, "n_show": 8},
    "ablation": {"train": {"steps": 4, "batch_size": 16, "warmup": 0, "ckpt_every": 2, "log_every": 2,
                           "model": {"ch": 8, "attn_resolutions": []}},
                 "sample": {"n": 8, "batch_size": 8, "n_steps_each": 2}, "n_show": 8},
    "samplers": {"n": 8, "batch_size": 8, "n_show": 8, "pc": {"steps": 4}, "reverse_diffusion": {"steps": 4},
                 "ode": {"rtol": 1.0e-2, "atol": 1.0e-2}, "heun": {"num_steps": 3},
                 "dpm_solver_10": {"steps": 3}, "dpm_solver_20": {"steps": 4},
                 "annealed_langevin": {"n_steps_each": 2}},
}


def _deep_update(d: dict, u: dict) -> None:
    for k, v in u.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            _deep_update(d[k], v)
        else:
            d[k] = v


def env_for(repo: Path) -> dict:
    env = dict(os.environ)
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", MLFLOW_TRACKING_URI=f"sqlite:///{repo}/mlflow.db",
               SCORESDE_RUN_GROUP="e2e-group", DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true",
               DO_NOT_TRACK="true", PYTHONPATH=str(repo))
    env.pop("SCORESDE_PARENT_RUN_ID", None)
    return env


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=repo, env=env_for(repo),
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def make_repo(dest: Path, params_fn=tiny_params) -> Path:
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, dest / name)
    (dest / "params.yaml").write_text(yaml.safe_dump(params_fn(yaml.safe_load((ROOT / "params.yaml").read_text())),
                                                     sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=dest, check=True, env=env_for(dest))
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "config", "core.analytics", "false"], cwd=dest, check=True)
    shutil.copytree(ROOT / ".dvc" / "plots", dest / ".dvc" / "plots")  # the plot templates dvc.yaml names
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=dest, check=True)
    return dest


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("e2e"))
    first = dvc(repo, "repro")
    # what `make repro` does after dvc repro: tag each run with its stage's dvc.lock hash
    subprocess.run([sys.executable, "-m", "pipeline.tracking", "sync-lock"], cwd=repo, env=env_for(repo), check=True,
                   capture_output=True, timeout=120)
    return repo, first


def declared_outputs(repo: Path) -> list[Path]:
    """Every out/metric/plot path DVC knows for the pipeline (foreach expanded by DVC itself)."""
    proc = dvc(repo, "stage", "list", "--name-only")
    names = proc.stdout.split()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(names) == set(lock), "every stage ran and was recorded in dvc.lock"
    return [repo / out["path"] for name in names for out in lock[name].get("outs", [])]


def test_declared_outputs_exist(reproduced):
    repo, _ = reproduced
    outs = declared_outputs(repo)
    assert outs, "pipeline declares outputs"
    missing = [str(p) for p in outs if not p.exists()]
    assert not missing, missing
    for kind in ("ncsn", "ve", "vp", "subvp", "edm"):
        m = json.loads((repo / f"reports/metrics/sample_{kind}.json").read_text())
        assert m["nfe"] > 0 and m["seconds"] > 0 and m["n"] == 8
        t = json.loads((repo / f"reports/metrics/train_{kind}.json").read_text())
        assert t["steps"] == 6
    schedule = json.loads((repo / "data/noise/schedule.json").read_text())
    sig = schedule["sigmas"]
    assert len(sig) == schedule["num_levels"] and sig[0] > sig[-1] and abs(sig[-1] - schedule["sigma_end"]) < 1e-12


def test_mlflow_runs_nested_with_tags(reproduced):
    repo, _ = reproduced
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    exp = mlflow.get_experiment_by_name("e2e")
    runs = mlflow.search_runs([exp.experiment_id])
    parents = runs[runs["tags.scoresde.role"] == "parent"]
    assert len(parents) == 1 and parents.iloc[0]["tags.run_group"] == "e2e-group"
    children = runs[runs["tags.mlflow.parentRunId"] == parents.iloc[0]["run_id"]]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(children["tags.dvc_stage"]) == set(lock)
    for col in ("tags.stage", "tags.sde", "tags.git_commit", "tags.version.torch", "tags.seed", "tags.dvc_lock_md5"):
        assert children[col].notna().all(), col
    assert (children["status"] == "FINISHED").all()
    ve = children[children["tags.dvc_stage"] == "train@ve"].iloc[0]
    assert float(ve["params.train.ve.lr"]) == yaml.safe_load((repo / "params.yaml").read_text())["train"]["ve"]["lr"]
    history = mlflow.tracking.MlflowClient().get_metric_history(ve["run_id"], "loss")
    assert len(history) >= 2 and history[-1].step > history[0].step  # loss curve with steps


def test_second_repro_is_noop_and_status_clean(reproduced):
    repo, _ = reproduced
    assert "up to date" in dvc(repo, "status").stdout
    second = dvc(repo, "repro")
    assert "Running stage" not in second.stdout, second.stdout


def test_unreachable_tracking_server_fails_fast(reproduced, tmp_path):
    """A dead server fails the stage within the bound, names the URI, and writes nothing."""
    import socket

    repo, _ = reproduced
    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = env_for(repo)
    env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{port}"
    before = (repo / "reports/metrics/train_ve.json").stat().st_mtime_ns
    proc = subprocess.run([sys.executable, "-m", "stages.train", "--sde", "ve"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and f"127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert (repo / "reports/metrics/train_ve.json").stat().st_mtime_ns == before


def test_logging_settings_are_not_stage_inputs(reproduced):
    """Pointing MLflow elsewhere (tracking.*) re-runs nothing: `dvc status` stays clean."""
    repo, _ = reproduced
    params_file = repo / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["tracking"].update(uri="http://127.0.0.1:5999", timeout_s=3, offline_fallback=True)
    try:
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        status = dvc(repo, "status", "--json")
        assert json.loads(status.stdout or "{}") == {}, status.stdout
    finally:
        params_file.write_text(original)


def test_remote_push_then_fresh_clone_pull_makes_repro_a_noop(reproduced, tmp_path):
    """The README's remote recipe: `dvc remote add -d` to a folder, `dvc push`; a fresh `git clone` + `dvc pull`
    has every output, `dvc status` is clean and `dvc repro` runs nothing."""
    repo, _ = reproduced
    origin, store, clone = tmp_path / "origin", tmp_path / "dvc-store", tmp_path / "clone"
    shutil.copytree(repo, origin, symlinks=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    dvc(origin, "remote", "add", "-d", "store", str(store))
    pushed = dvc(origin, "push")
    assert store.exists() and any(store.rglob("*")), pushed.stdout
    subprocess.run(["git", "add", "-A"], cwd=origin, check=True)
    subprocess.run([*git, "commit", "-qm", "reproduction"], cwd=origin, check=True)
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True)
    assert not (clone / "models/ve.pt").exists()          # DVC-tracked: not in git
    dvc(clone, "pull")
    assert (clone / "models/ve.pt").read_bytes() == (repo / "models/ve.pt").read_bytes()
    assert "up to date" in dvc(clone, "status").stdout
    again = dvc(clone, "repro")
    assert "Running stage" not in again.stdout, again.stdout


def test_every_plot_renders_with_data(reproduced):
    """`dvc plots show --json`: every plot of dvc.yaml (CSVs drawn by the top-level definitions, images) has data."""
    repo, _ = reproduced
    shown = json.loads(dvc(repo, "plots", "show", "--json").stdout)
    assert not shown.get("errors"), shown.get("errors")
    declared = yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]
    names = [next(iter(p)) if isinstance(p, dict) else p for p in declared]
    data = shown["data"]
    for name in names:
        assert name in data and data[name], f"plot {name} has no data"
        for entry in data[name]:
            if entry.get("type") == "vega":
                values = entry["content"]["data"]["values"]
                assert values, f"plot {name}: no rows"
            else:
                assert entry.get("type") == "image" and Path(entry["url"]).suffix == ".png", entry
    loss = next(e for e in data["loss"] if e.get("type") == "vega")
    assert {"ncsn", "ve", "vp", "subvp", "edm"} <= {Path(v["filename"]).stem.split("_", 1)[1]
                                                    for v in loss["content"]["data"]["values"]}
    sigma = next(e for e in data["fid_vs_sigma_end"] if e.get("type") == "vega")["content"]
    assert sigma["encoding"]["x"]["scale"]["type"] == "log"
