"""Wall time of the default reproduction: a clean `dvc repro`, then a no-op `dvc repro`.

    python benchmarks/repro.py [--params FILE] [--keep DIR] [--out results.json]

Runs in a fresh copy of the repository (tracked + untracked-not-ignored files, no outputs, no DVC cache,
no dvc.lock, its own mlflow.db), so the figures are those of a fresh clone. Targets on 2 CPU cores:
clean ≤ 600 s, no-op ≤ 3 s. Per-stage seconds are read back from the MLflow runs of the copy (start to
end of each stage run, process start-up excluded) and printed beside the clean total, so it is plain where
the time goes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.orchestration import fresh_copy  # noqa: E402

TARGET_CLEAN_S, TARGET_NOOP_S = 600.0, 3.0


def _env(repo: Path) -> dict:
    env = dict(os.environ)
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", MLFLOW_TRACKING_URI=f"sqlite:///{repo}/mlflow.db",
               DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", PYTHONPATH=str(repo),
               SCORESDE_RUN_GROUP=f"bench-{int(time.time())}")
    env.pop("SCORESDE_PARENT_RUN_ID", None)
    return env


def _repro(repo: Path, env: dict) -> float:
    dvc = str(Path(sys.executable).parent / "dvc")
    start = time.perf_counter()
    proc = subprocess.run([dvc, "repro"], cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"dvc repro failed after {seconds:.0f} s:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds


def stage_seconds(repo: Path) -> dict[str, float]:
    """Seconds inside each stage's MLflow run (the work, without interpreter/import start-up)."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    runs = mlflow.search_runs(search_all_experiments=True)
    runs = runs[runs["tags.dvc_stage"].notna()]
    return {r["tags.dvc_stage"]: (r["end_time"] - r["start_time"]).total_seconds() for _, r in runs.iterrows()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, help="params file to use instead of the repository's params.yaml")
    ap.add_argument("--keep", type=Path, help="run in this (empty or new) folder and keep it")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="scoresde-repro-") as tmp:
        repo = args.keep.resolve() if args.keep else Path(tmp)
        repo.mkdir(parents=True, exist_ok=True)
        if any(repo.iterdir()):
            raise SystemExit(f"--keep {repo}: expected an empty or new folder")
        fresh_copy(ROOT, repo, args.params)
        env = _env(repo)
        subprocess.run(["git", "add", "-A"], cwd=repo, check=True, capture_output=True)
        subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench"],
                       cwd=repo, check=True, capture_output=True)
        print(f"clean dvc repro in {repo} (cores: {os.cpu_count()}) ...", flush=True)
        clean = _repro(repo, env)
        noop = _repro(repo, env)
        per_stage = stage_seconds(repo)

    inside = sum(per_stage.values())
    print(f"\n{'stage':<22}{'seconds':>9}")
    for name, s in sorted(per_stage.items(), key=lambda kv: -kv[1]):
        print(f"{name:<22}{s:>9.1f}")
    print(f"{'(start-up, DVC)':<22}{clean - inside:>9.1f}")
    print(f"\n{'run':<22}{'seconds':>9}{'target':>9}")
    print(f"{'clean dvc repro':<22}{clean:>9.1f}{TARGET_CLEAN_S:>9.0f}  {'ok' if clean <= TARGET_CLEAN_S else 'OVER'}")
    print(f"{'no-op dvc repro':<22}{noop:>9.2f}{TARGET_NOOP_S:>9.0f}  {'ok' if noop <= TARGET_NOOP_S else 'OVER'}")
    if args.out:
        args.out.write_text(json.dumps({"clean_s": clean, "noop_s": noop, "stages_s": per_stage,
                                        "cpu_count": os.cpu_count()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
