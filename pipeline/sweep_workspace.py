"""Workspaces of a sweep: copies of the repository in which ``dvc repro`` runs, one per trial.

A workspace is made like ``benchmarks/orchestration.fresh_copy`` (the git-tracked and untracked,
not-ignored files; no stage outputs, no ``.dvc/cache``) but it keeps ``dvc.lock`` and shares the checkout's
DVC cache (``.dvc/config.local``: ``cache.dir`` = the checkout's cache), and the sweep's params are written
into its ``params.yaml``. Then ``dvc repro <targets>`` runs in it.

The *base* workspace (the checkout's params plus ``base_params``) is reproduced first: stages found in the
shared cache and DVC's run cache are restored, the rest run once, and its ``dvc.lock`` now describes every
upstream stage. (The base's copy of ``dvc.lock`` keeps the entries whose outputs are all in the cache or
the checkout -- they are checked out and copied, so DVC finds those stages up to date -- and leaves the
others out, so that DVC consults its run cache instead of re-running them: :func:`restorable_lock`.) A *trial* workspace takes that ``dvc.lock`` and the base's outputs of those stages, so DVC
finds every stage whose params did not change up to date (``Stage 'train@ncsn' didn't change, skipping``)
and re-runs only the ones that read a varied key. Copying the outputs, not only relying on DVC's run cache,
matters: DVC keeps no run-cache entry for a stage with a ``cache: false`` output that is neither a metric
nor a plot (``noise``'s ``forward_process.png``, ``sample@*``'s sample grids), so those would re-run in every
trial (and so would everything after them, had they not been deterministic).

Only the trial's own log (``sweep-trial.log``) says what DVC did: :func:`stage_actions` parses it.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.env import (DVC_ROOT, MLFLOW_TRACKING_URI, OMP_NUM_THREADS, PARENT_RUN_ID, PYTHONUNBUFFERED,
                          RUN_GROUP, SWEEP_TRIAL, flow_defaults)

LOG_NAME = "sweep-trial.log"
SKIP_DIRS = ("sweeps/.work", "reports/sweeps", ".dvc/cache", ".dvc/tmp", ".git", ".venv")
_RAN = re.compile(r"^Running stage '([^']+)'", re.M)
_RESTORED = re.compile(r"^Stage '([^']+)' is cached - skipping run", re.M)
_UNCHANGED = re.compile(r"^Stage '([^']+)' didn't change, skipping", re.M)


def source_files(root: Path, outs: list[str]) -> list[str]:
    """Files of the checkout a workspace copies (relative paths): tracked + untracked-not-ignored, minus outputs."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                                capture_output=True, text=True, check=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file outside the skipped folders
        listed = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
    keep = []
    for rel in filter(None, listed):
        if rel == "dvc.lock" or rel.endswith("/dvc.lock"):
            continue  # written separately: the checkout's, or the base workspace's
        if any(rel == d or rel.startswith(d + "/") for d in SKIP_DIRS):
            continue
        if any(rel == o or rel.startswith(o.rstrip("/") + "/") for o in outs):
            continue  # a stage output left in the checkout
        if (root / rel).is_file():
            keep.append(rel)
    return keep


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    elif src.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def restorable_lock(root: Path, cache_dir: Path, cached_outs: dict[str, list[str]],
                    uncached_outs: dict[str, list[str]]) -> tuple[str | None, list[str], list[str], list[str]]:
    """The checkout's dvc.lock, less the entries a fresh copy cannot be brought up to date from.

    ``dvc repro`` skips a stage whose deps, params and outputs all match its dvc.lock entry. When an output
    is missing it removes the others and restores the stage from *that entry's* outputs only if all of
    them are available, else it runs the stage -- it does not look at its run cache then. A fresh copy has
    no outputs, so every stage with a metrics file (``cache: false``) would re-run (retrain) even though
    the shared cache holds it. So an entry is kept when every cached output is in ``cache_dir`` (the base
    workspace then runs ``dvc checkout`` on it) and every uncached one is in the checkout with the lock's
    md5 (copied into the workspace): DVC then finds the stage up to date. Any other entry is left out,
    and DVC consults its run cache for that stage (an entry nothing can restore is not worth keeping).
    Returns ``(lock text or None without a dvc.lock, stages kept, stages left out, checkout files to copy)``.
    """
    lock = root / "dvc.lock"
    if not lock.exists():
        return None, [], [], []
    import hashlib

    import yaml

    data = yaml.safe_load(lock.read_text()) or {}
    stages = data.get("stages") or {}
    kept, dropped, files = [], [], []
    for name, entry in list(stages.items()):
        ok, mine = True, []
        for out in entry.get("outs") or []:
            path, md5 = out.get("path"), str(out.get("md5") or "")
            if path in cached_outs.get(name, []):
                ok = ok and bool(md5) and (cache_dir / "files" / "md5" / md5[:2] / md5[2:]).exists()
            elif path in uncached_outs.get(name, []):
                f = root / path
                ok = ok and f.is_file() and hashlib.md5(f.read_bytes()).hexdigest() == md5
                mine.append(path)
        if ok:
            files += mine
            kept.append(name)
        else:
            dropped.append(name)
            del stages[name]
    return (lock.read_text() if not dropped else yaml.safe_dump(data, sort_keys=False)), kept, dropped, files


def make_workspace(root: Path, dest: Path, files: list[str], cache_dir: Path, params_text: str,
                   lock_from: Path | None = None, outs_from: Path | None = None, outs: list[str] = (),
                   lock_text: str | None = None) -> Path:
    """Create (or re-create) a workspace at ``dest``; see the module docstring.

    dvc.lock: ``lock_text`` if given, else a copy of ``lock_from``'s (default: the checkout's)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for rel in files:
        _copy(root / rel, dest / rel)
    lock = (lock_from or root) / "dvc.lock"
    if lock_text is not None:
        (dest / "dvc.lock").write_text(lock_text)
    elif lock.exists():
        shutil.copy2(lock, dest / "dvc.lock")
    if outs_from is not None:
        for rel in outs:
            _copy(outs_from / rel, dest / rel)
    (dest / "params.yaml").write_text(params_text)
    dvc_dir = dest / ".dvc"
    dvc_dir.mkdir(exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    (dvc_dir / "config.local").write_text(f"[cache]\n    dir = {cache_dir}\n")
    if not (dest / ".git").exists():  # DVC expects an SCM (or core.no_scm); an empty repository is enough
        subprocess.run(["git", "init", "-q"], cwd=dest, check=True, capture_output=True)
    return dest


@dataclass
class ReproResult:
    returncode: int
    seconds: float
    log: str
    ran: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.splitlines()[-lines:])


def stage_actions(log: str) -> dict[str, list[str]]:
    """What ``dvc repro`` did per stage, from its output: ran, restored (run cache), unchanged."""
    return {"ran": _RAN.findall(log), "restored": _RESTORED.findall(log), "unchanged": _UNCHANGED.findall(log)}


def dvc_executable() -> list[str]:
    exe = Path(sys.executable).parent / "dvc"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dvc"]


def repro_env(workspace: Path, *, tracking_uri: str | None, parent_run_id: str | None, group: str,
              trial: str, threads: int = 1) -> dict[str, str]:
    """Environment of a workspace's ``dvc repro``: the venv first on PATH, one thread, the MLflow parent run."""
    flow_defaults()
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(workspace)
    env[OMP_NUM_THREADS] = str(threads)   # params.yaml's cpu_threads pins torch; this pins OpenMP/BLAS too
    env[PYTHONUNBUFFERED] = "1"
    env[RUN_GROUP] = group
    env[SWEEP_TRIAL] = trial
    env.pop(DVC_ROOT, None)
    if tracking_uri:
        env[MLFLOW_TRACKING_URI] = tracking_uri
    if parent_run_id:
        env[PARENT_RUN_ID] = parent_run_id
    else:
        env.pop(PARENT_RUN_ID, None)
    return env


def run_repro(workspace: Path, targets: list[str], env: dict[str, str], on_start=None,
              timeout_s: float | None = None) -> ReproResult:
    """``dvc repro <targets>`` in ``workspace`` (own process group), output to ``sweep-trial.log``.

    ``on_start(pid)`` is called with the process id (= its process group id) once it runs, so the driver
    can stop it, or a restarted driver find it.
    """
    log_file = workspace / LOG_NAME
    start = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen([*dvc_executable(), "repro", *targets], cwd=workspace, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        if on_start:
            on_start(proc.pid)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            rc = proc.wait()
            log.write(f"\n[sweep] dvc repro stopped after {timeout_s} s\n")
        except BaseException:
            kill_group(proc.pid)
            proc.wait()
            raise
    text = log_file.read_text(errors="replace")
    return ReproResult(rc, time.perf_counter() - start, text, **stage_actions(text))


def kill_group(pgid: int, grace_s: float = 5.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.1)


def kill_leftover(pgid: int | None, workspace: Path) -> bool:
    """Stop a trial's ``dvc repro`` left running by a dead driver, if that process is really it.

    Checked through ``/proc/<pid>/cwd`` (the workspace), so a recycled pid is never signalled.
    """
    if not pgid:
        return False
    try:
        cwd = Path(os.readlink(f"/proc/{pgid}/cwd"))
    except OSError:
        return False
    if cwd.resolve() != workspace.resolve():
        return False
    kill_group(pgid)
    return True


def absolute_sqlite(uri: str, root: Path) -> str:
    """``sqlite:///mlflow.db`` -> ``sqlite:////abs/root/mlflow.db`` (trials run in other directories)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str((root / uri[len(prefix):]).resolve())
    return uri


def driver_alive(pid: int) -> bool:
    """Is ``pid`` a running sweep driver (not a recycled pid)?"""
    try:
        return "pipeline.sweep" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
