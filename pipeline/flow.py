"""The DVC pipeline as a Prefect 3 flow: DVC decides *what* to run, Prefect runs it in parallel.

DVC cannot run two stages of one repository at once (``dvc repro`` holds the repository lock for the
whole reproduction), so Prefect is the parallel and distributed executor while DVC stays the record of
what was produced from what:

* The tasks are the stages of ``dvc.yaml`` read through DVC's API (:mod:`pipeline.dvcgraph`):
  foreach/matrix expanded, edges from deps/outs. There is no hand-written copy of the DAG.
* Each task asks DVC whether its stage is up to date and skips it if so; otherwise it runs the
  stage's ``cmd`` (an argument list via :func:`shlex.split`, no shell; cwd = the stage's ``wdir``;
  the environment passes through, plus ``DVC_ROOT``/``DVC_STAGE`` like ``dvc repro`` and the MLflow
  parent run) and then records the result in ``dvc.lock`` exactly like ``dvc commit -f STAGE``. After
  the flow, ``dvc status`` is clean and ``dvc repro`` is a no-op.
* Only the DVC bookkeeping (status, commit, pull, push) is serialised, by a thread lock plus a file
  lock in ``.dvc/tmp``; the stage commands themselves run concurrently on a
  :class:`~prefect.task_runners.ThreadPoolTaskRunner` (``max_workers``, default: the CPU count).
  A stage is submitted as soon as all of its upstream stages have finished, so a long branch never
  holds back an independent one.
* Prefect's result cache is off (``cache_policy=NONE``): DVC is the cache. Like ``dvc repro``, a
  stage whose exact inputs were run before is restored from DVC's run cache instead of re-run
  (``run_cache=False`` disables that).
* Retries with backoff and per-stage overrides come from the ``prefect:`` section of ``params.yaml``
  (see :data:`CONFIG_SCHEMA`); a failed stage fails the flow with the last lines of its output.
* Stages matching ``prefect.gpu_stages`` (default ``train*``, ``sample*``) carry the Prefect tag
  ``gpu``, so ``prefect concurrency-limit create gpu 1`` lets each GPU run one of them at a time.
* One MLflow parent run per flow run (:func:`pipeline.tracking.start_parent_run`); its id reaches
  every stage as ``SCORESDE_PARENT_RUN_ID`` (and the group as ``SCORESDE_RUN_GROUP``) so the
  stages' runs nest under it.
* Several hosts: with ``dvc_remote`` each task pulls its missing deps from that DVC remote (and, like
  ``dvc repro --pull``, restores a stage another host already ran from the remote's run cache) and
  pushes its outputs and run-cache entry after the commit. The alternative is a shared filesystem:
  every worker uses the same checkout (NFS/Lustre), in which case the file lock in ``.dvc/tmp``
  serialises the bookkeeping of all workers (use ``core.hardlink_lock`` on NFS).

Run it locally with ``python -m pipeline.flow`` (an ephemeral Prefect API is started in-process, no
server needed); with ``PREFECT_API_URL`` set the run reports to that server. Deployments and work
pools: see ``prefect.yaml``.
"""
from __future__ import annotations

import os

# Offline-friendly defaults, set before Prefect/MLflow read their settings (only where unset).
for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}.items():
    os.environ.setdefault(_key, _value)

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import fnmatch  # noqa: E402
import logging  # noqa: E402
import queue  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Iterator  # noqa: E402

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NONE  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from pipeline.dvcgraph import Pipeline, StageSpec, find_root, load_pipeline, working_directory  # noqa: E402
from pipeline.params import Bool, Float, Int, List, Optional, ParamsError, Section, Spec, Str  # noqa: E402

PARENT_ENV = "SCORESDE_PARENT_RUN_ID"
GROUP_ENV = "SCORESDE_RUN_GROUP"
LOCK_NAME = "scoresde-flow.lock"          # in .dvc/tmp: serialises DVC bookkeeping across processes
LOG_DIR = Path(".dvc") / "tmp" / "flow-logs"  # full output of the last run of each stage

# Shell syntax that would silently mean something else without a shell.
_SHELL_TOKENS = {"&&", "||", "|", ";", "&", ">", ">>", "<", "<<", "2>", "2>>", "&>", "2>&1", "1>&2", "|&"}


# ===================================================================== configuration
def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class Delays(Spec):
    """Retry delays: a list of seconds, or one number = base of an exponential backoff (b, 2b, 4b, ...)."""

    def __init__(self, default: Any = ...):
        self.default = default

    def describe(self) -> str:
        return "a number of seconds >= 0 (exponential backoff base) or a list of them"

    def validate(self, value: Any, path: str) -> Any:
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            sub = f"{path}[{i}]" if isinstance(value, list) else path
            if isinstance(item, bool) or not isinstance(item, (int, float)) or item < 0:
                raise ParamsError(sub, f"expected {self.describe()}, got {item!r} ({_type_name(item)})")
        if isinstance(value, list) and not value:
            raise ParamsError(path, f"expected {self.describe()}, got an empty list")
        return [float(v) for v in value] if isinstance(value, list) else float(value)


class Patterns(Spec):
    """A mapping from stage names or fnmatch patterns (``train@*``) to a section of overrides."""

    def __init__(self, item: Section, default: Any = None):
        self.item, self.default = item, default

    def describe(self) -> str:
        return "a mapping from stage name/pattern to overrides"

    def validate(self, value: Any, path: str) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ParamsError(path, f"expected {self.describe()}, got {value!r} ({_type_name(value)})")
        return {str(k): self.item.validate(v, f"{path}.{k}") for k, v in value.items()}


STAGE_OVERRIDES = Section({
    "retries": Optional(Int(ge=0, le=50)),
    "retry_delay_seconds": Optional(Delays()),
    "retry_jitter_factor": Optional(Float(ge=0)),
    "timeout_s": Optional(Float(gt=0)),
    "gpu": Optional(Bool()),
})

#: The ``prefect:`` section of params.yaml (every key optional). No stage lists it in its DVC
#: ``params``, so changing it never invalidates a stage.
CONFIG_SCHEMA = Section({
    "max_workers": Optional(Int(ge=1)),            # null = number of CPU cores
    "retries": Int(2, ge=0, le=50),                # per stage, after the first attempt
    "retry_delay_seconds": Delays([2.0, 10.0]),     # list, or a number b for b, 2b, 4b, ...
    "retry_jitter_factor": Optional(Float(ge=0)),
    "timeout_s": Optional(Float(gt=0)),            # wall-time limit of one attempt of a stage
    "gpu_stages": List(Str(), default=["train*", "sample*"]),  # fnmatch patterns -> Prefect tag "gpu"
    "gpu_slots": Optional(Int(ge=1)),              # also cap concurrent gpu stages inside one flow run
    "log_tail_lines": Int(40, ge=1, le=10000),     # lines of a failed stage's output in the error
    "lock_timeout_s": Float(120.0, gt=0),          # waiting for a DVC lock held by another process
    "stages": Patterns(STAGE_OVERRIDES),           # per stage name / pattern overrides
})


@dataclasses.dataclass(frozen=True)
class StagePolicy:
    retries: int
    retry_delay_seconds: tuple[float, ...]
    retry_jitter_factor: float | None
    timeout_s: float | None
    gpu: bool


@dataclasses.dataclass(frozen=True)
class OrchestrationConfig:
    values: dict

    @classmethod
    def load(cls, params_file: str | os.PathLike | None) -> "OrchestrationConfig":
        section: Any = None
        if params_file is not None and Path(params_file).exists():
            import yaml

            data = yaml.safe_load(Path(params_file).read_text()) or {}
            if not isinstance(data, dict):
                raise ParamsError("<file>", f"{params_file} must hold a mapping at the top level")
            section = data.get("prefect")
        return cls(CONFIG_SCHEMA.validate(section, "prefect"))

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def policy(self, stage: str) -> StagePolicy:
        merged = {k: self.values[k] for k in ("retries", "retry_delay_seconds", "retry_jitter_factor", "timeout_s")}
        merged["gpu"] = any(fnmatch.fnmatchcase(stage, pat) for pat in self.values["gpu_stages"])
        overrides = self.values["stages"] or {}
        # Patterns first (file order), the exact stage name last: the most specific wins.
        matching = [v for k, v in overrides.items() if k != stage and fnmatch.fnmatchcase(stage, k)]
        if stage in overrides:
            matching.append(overrides[stage])
        for entry in matching:
            merged.update({k: v for k, v in entry.items() if v is not None})
        delays = merged["retry_delay_seconds"]
        if not isinstance(delays, list):  # exponential backoff from a base delay
            delays = [delays * 2 ** i for i in range(max(merged["retries"], 1))]
        return StagePolicy(retries=int(merged["retries"]), retry_delay_seconds=tuple(delays),
                           retry_jitter_factor=merged["retry_jitter_factor"], timeout_s=merged["timeout_s"],
                           gpu=bool(merged["gpu"]))


# ======================================================================== errors
class StageFailed(RuntimeError):
    """A stage's command failed (or did not produce its outputs); the message ends with its log tail."""


class PipelineFailed(RuntimeError):
    """One or more stages failed; the message holds each failed stage's error and log tail."""


# ================================================================ DVC bookkeeping
_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()
_gpu_semaphores: dict[tuple[str, int], threading.BoundedSemaphore] = {}


def _thread_lock(root: str) -> threading.Lock:
    with _thread_locks_guard:
        return _thread_locks.setdefault(root, threading.Lock())


@dataclasses.dataclass(frozen=True)
class StageContext:
    """What a stage task needs besides its :class:`StageSpec` (identical for all stages of a run)."""

    root: str
    env: dict                      # added to os.environ for the stage command
    dvc_remote: str | None = None
    run_cache: bool = True
    force: bool = False
    log_tail_lines: int = 40
    lock_timeout_s: float = 120.0
    gpu_slots: int | None = None


@contextlib.contextmanager
def dvc_session(ctx: StageContext) -> Iterator[Any]:
    """A fresh ``dvc.repo.Repo`` holding DVC's repository lock, serialised with every other
    bookkeeping call of this process (thread lock) and of other processes using this checkout (a
    ``flock`` on ``.dvc/tmp/scoresde-flow.lock``). Stage commands never run inside it."""
    import fcntl

    from dvc.lock import LockError
    from dvc.repo import Repo, lock_repo

    config = {"core": {"remote": ctx.dvc_remote}} if ctx.dvc_remote else None
    lock_path = Path(ctx.root) / ".dvc" / "tmp" / LOCK_NAME
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with _thread_lock(ctx.root), open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        repo = Repo(ctx.root, config=config)
        try:
            with contextlib.ExitStack() as stack:
                deadline = time.monotonic() + ctx.lock_timeout_s
                while True:  # DVC's lock may be held by a `dvc` command someone else started
                    try:
                        stack.enter_context(lock_repo(repo))
                        break
                    except LockError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.5)
                yield repo
        finally:
            repo.close()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _get_stage(repo: Any, name: str) -> Any:
    stages = repo.stage.collect(name)
    if len(stages) != 1:
        raise StageFailed(f"DVC resolves stage {name!r} to {len(stages)} stages; expected exactly one")
    return stages[0]


def _status_text(stage: Any) -> str:
    try:
        status = stage.status().get(stage.addressing, [])
    except Exception:  # noqa: BLE001 - only used for a log line
        return "changed"
    parts = []
    for entry in status:
        if isinstance(entry, dict):
            parts += [f"{k}: {', '.join(f'{p} {s}' for p, s in v.items()) if isinstance(v, dict) else v}"
                      for k, v in entry.items()]
        else:
            parts.append(str(entry))
    return "; ".join(parts) or "changed"


def _pull_missing_deps(repo: Any, stage: Any, logger: Any) -> None:
    """``dvc pull`` every dependency that is not in the workspace (multi-host mode)."""
    for dep in stage.deps:
        if dep.__class__.__name__ in {"ParamsDependency", "RepoDependency", "DatasetDependency", "DbDependency"}:
            continue
        if not dep.exists:
            try:
                repo.pull(dep.def_path)
                logger.info("pulled dependency %s from the DVC remote", dep.def_path)
            except Exception as err:  # noqa: BLE001 - the command will fail with a clearer message
                logger.warning("could not pull dependency %s: %s", dep.def_path, err)


def _push(repo: Any, stage: Any, remote: str | None, logger: Any) -> None:
    """``dvc push`` the stage's outputs plus its run-cache entry and the objects that entry names
    (incl. ``cache: false`` outputs, which another host restores from the run cache)."""
    repo.push(targets=[stage.addressing], remote=remote, run_cache=True)
    try:
        from dvc.stage.serialize import to_single_stage_lockfile

        entry_stage = repo.stage_cache._create_stage(to_single_stage_lockfile(stage), wdir=stage.wdir)
        for objs in entry_stage.get_used_objs().values():
            repo.cloud.push(objs, remote=remote)
    except Exception as err:  # noqa: BLE001 - outputs are pushed; only run-cache restore may miss
        logger.warning("pushing run-cache objects of %s failed: %s", stage.addressing, err)


def _try_restore(repo: Any, stage: Any, ctx: StageContext, logger: Any) -> str | None:
    """Avoid running ``stage``: pull its outputs (remote, unchanged deps) or restore it from DVC's run
    cache (local, or the remote's with ``dvc_remote``). Returns the action taken, or None."""
    if ctx.dvc_remote and not stage.changed(allow_missing=True):
        try:  # dvc.lock already describes these outputs: another host pushed them
            repo.pull(stage.addressing)
            if not _get_stage(repo, stage.addressing).changed():
                return "pulled"
        except Exception as err:  # noqa: BLE001
            logger.info("outputs of %s not pulled (%s); trying the run cache", stage.addressing, err)
    if not ctx.run_cache:
        return None
    from dvc.stage.cache import RunCacheNotFoundError

    try:
        if ctx.dvc_remote:
            with contextlib.suppress(Exception):
                repo.stage_cache.pull(None)  # run-cache entries only (small); objects on demand
        repo.stage_cache.restore(stage, pull=bool(ctx.dvc_remote))
    except RunCacheNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001 - e.g. a missing dependency: the run decides
        logger.debug("run-cache restore of %s failed: %s", stage.addressing, err)
        return None
    repo.commit(stage.addressing, force=True)
    return "restored"


# =================================================================== the command
def split_command(cmd: str) -> list[str]:
    """``cmd`` as an argument list; refuses shell syntax, which would mean something else here."""
    argv = shlex.split(cmd)
    bad = [tok for tok in argv if tok in _SHELL_TOKENS]
    if bad or not argv:
        raise StageFailed(
            f"command {cmd!r} uses shell syntax {bad} (or is empty): the flow runs commands without a "
            "shell. Use a list of commands in dvc.yaml (`cmd: [a, b]`) or move the logic into a script.")
    return argv


def stage_env(spec: StageSpec, ctx: StageContext) -> dict[str, str]:
    env = dict(os.environ)
    env.update({k: str(v) for k, v in ctx.env.items()})
    env.setdefault("DVC_ROOT", ctx.root)
    env["DVC_STAGE"] = spec.name
    env.setdefault("PYTHONUNBUFFERED", "1")
    # `python` in dvc.yaml means the interpreter running this flow (a venv need not be activated).
    bindir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if bindir not in path.split(os.pathsep):
        env["PATH"] = bindir + (os.pathsep + path if path else "")
    return env


def run_command(argv: list[str], *, cwd: str, env: dict, tail_lines: int, log_file: Path,
                timeout_s: float | None, on_line: Any = None) -> tuple[int, list[str], bool]:
    """Run one command, streaming its merged stdout/stderr; returns (exit code, last lines, timed out)."""
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    timed_out = threading.Event()
    with open(log_file, "a", encoding="utf-8", errors="replace") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1)
        except OSError as err:
            tail.append(f"cannot start {argv[0]!r}: {err}")
            log.write(tail[-1] + "\n")
            return 127, list(tail), False

        def kill() -> None:
            timed_out.set()
            _terminate(proc)

        timer = threading.Timer(timeout_s, kill) if timeout_s else None
        if timer:
            timer.daemon = True
            timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                log.write(line + "\n")
                if on_line:
                    on_line(line)
            code = proc.wait()
        except BaseException:
            _terminate(proc)
            raise
        finally:
            if timer:
                timer.cancel()
    return code, list(tail), timed_out.is_set()


def _terminate(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(OSError):
        proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait()


# ======================================================================== the task
@task(cache_policy=NONE, persist_result=False)
def dvc_stage(spec: StageSpec, ctx: StageContext, timeout_s: float | None = None, gpu: bool = False) -> dict:
    """Bring one DVC stage up to date: skip, restore, or run its command and ``dvc commit`` it."""
    from prefect.runtime import task_run as current_task_run

    logger = get_run_logger()
    attempt = current_task_run.run_count or 1
    started = time.perf_counter()

    def done(action: str, **extra: Any) -> dict:
        return {"stage": spec.name, "action": action, "seconds": round(time.perf_counter() - started, 3),
                "attempt": attempt, **extra}

    with dvc_session(ctx) as repo:
        stage = _get_stage(repo, spec.name)
        if stage.frozen and not ctx.force:
            logger.info("%s is frozen: not run", spec.name)
            return done("frozen")
        if not ctx.force and not stage.changed():
            if ctx.dvc_remote:
                _push(repo, stage, None, logger)
            logger.info("%s is up to date", spec.name)
            return done("skipped")
        reason = "forced" if ctx.force else _status_text(stage)
        if not ctx.force:
            action = _try_restore(repo, stage, ctx, logger)
            if action:
                if ctx.dvc_remote and action == "restored":
                    _push(repo, stage, None, logger)
                logger.info("%s %s without running (%s)", spec.name, action, reason)
                return done(action, reason=reason)
        if ctx.dvc_remote:
            _pull_missing_deps(repo, stage, logger)
        stage.remove_outs(ignore_remove=False, force=False)  # as `dvc repro` does before a run
        commands = [split_command(c) for c in spec.cmd]

    logger.info("running %s (attempt %d; %s)", spec.name, attempt, reason)
    env = stage_env(spec, ctx)
    log_file = Path(ctx.root) / LOG_DIR / (re.sub(r"[^A-Za-z0-9_.@-]+", "_", spec.name) + ".log")
    log_file.unlink(missing_ok=True)
    semaphore = (_gpu_semaphores.setdefault((ctx.root, ctx.gpu_slots), threading.BoundedSemaphore(ctx.gpu_slots))
                 if ctx.gpu_slots and gpu else contextlib.nullcontext())
    with semaphore:
        for argv in commands:
            code, tail, timed_out = run_command(
                argv, cwd=spec.wdir, env=env, tail_lines=ctx.log_tail_lines, log_file=log_file,
                timeout_s=timeout_s, on_line=lambda line: logger.info("[%s] %s", spec.name, line))
            if code != 0 or timed_out:
                why = f"timed out after {timeout_s:g} s" if timed_out else f"exited with code {code}"
                raise StageFailed(
                    f"stage {spec.name!r} failed (attempt {attempt}): `{shlex.join(argv)}` {why} "
                    f"(cwd {spec.wdir}; full log {log_file}). Last {len(tail)} lines of its output:\n"
                    + "\n".join(tail))

    with dvc_session(ctx) as repo:
        try:
            repo.commit(spec.name, force=True)  # == `dvc commit -f STAGE`: dvc.lock + cache + run cache
        except Exception as err:
            raise StageFailed(f"stage {spec.name!r} ran but DVC could not record it in dvc.lock: {err}") from err
        if ctx.dvc_remote:
            _push(repo, _get_stage(repo, spec.name), None, logger)
    return done("ran", reason=reason)


# ======================================================================== the flow
def _prefect_run_info() -> tuple[str, str]:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id or ""), str(flow_run.name or "")
    except Exception:  # noqa: BLE001
        return "", ""


def _absolute_sqlite(uri: str, root: str) -> str:
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str((Path(root) / uri[len(prefix):]).resolve())
    return uri


def _start_tracking(root: str, params: dict, group: str, tags: dict, logger: Any) -> tuple[str, str]:
    """Configure MLflow like the stages do and open the parent run; returns (run id, tracking URI)."""
    from pipeline import tracking

    settings = dict(params.get("tracking") or {})
    uri = _absolute_sqlite(tracking.resolve_uri(settings), root)
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri  # configure() lets the environment win; restored below
    try:
        uri = _absolute_sqlite(tracking.configure({**settings, "uri": uri}), root)
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
    import mlflow

    mlflow.set_tracking_uri(uri)
    experiment = str(params.get("experiment") or "scoresde")
    run_id = tracking.start_parent_run(experiment, group, {"git_commit": tracking.git_commit(root), **tags})
    logger.info("MLflow parent run %s (experiment %r, group %r, %s)", run_id, experiment, group, uri)
    return run_id, uri


def _read_params(path: Path) -> dict:
    if not path.exists():
        return {}
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    return data if isinstance(data, dict) else {}


@flow(name="reproduce", log_prints=True, validate_parameters=True)
def reproduce(
    repo: str = ".",
    targets: list[str] | None = None,
    max_workers: int | None = None,
    dvc_remote: str | None = None,
    force: bool = False,
    run_cache: bool = True,
    keep_going: bool = True,
    track: bool = True,
    params_file: str = "params.yaml",
    run_group: str | None = None,
) -> dict[str, str]:
    """Reproduce the DVC pipeline at ``repo`` (like ``dvc repro [targets]``), stages in parallel.

    Args:
        repo: a path inside the DVC repository (a deployment runs in its checkout: ".").
        targets: stages to bring up to date, with their upstream (default: all stages).
        max_workers: stage commands running at once (default: ``prefect.max_workers``, else CPU count).
        dvc_remote: DVC remote to pull dependencies from and push outputs to (several hosts).
        force: run every selected stage even if DVC reports it up to date (``dvc repro -f``).
        run_cache: restore stages from DVC's run cache when their exact inputs were run before.
        keep_going: after a failure, still run the stages that do not depend on it.
        track: open an MLflow parent run for the stages' runs (``pipeline.tracking``).
        params_file: the params file holding ``experiment``, ``tracking`` and ``prefect`` (vs root).
        run_group: MLflow run group (default: ``$SCORESDE_RUN_GROUP`` or one per flow run).

    Returns:
        ``{stage: action}`` with action one of ran, skipped, restored, pulled, frozen.
    """
    root = find_root(repo)
    with working_directory(root):  # DVC's API addresses stages relative to the current directory
        return _reproduce(root, targets, max_workers, dvc_remote, force, run_cache, keep_going, track,
                          params_file, run_group)


def _reproduce(root: str, targets: list[str] | None, max_workers: int | None, dvc_remote: str | None,
               force: bool, run_cache: bool, keep_going: bool, track: bool, params_file: str,
               run_group: str | None) -> dict[str, str]:
    logger = get_run_logger()
    started = time.perf_counter()
    logging.getLogger("dvc").setLevel(logging.WARNING)  # our own log lines say what DVC did
    params_path = Path(root) / params_file
    params = _read_params(params_path)
    config = OrchestrationConfig.load(params_path)
    pipeline = load_pipeline(root, targets)
    for spec in pipeline.stages.values():  # refuse shell syntax before anything runs
        for cmd in spec.cmd:
            try:
                split_command(cmd)
            except StageFailed as err:
                raise StageFailed(f"stage {spec.name!r}: {err}") from None
    workers = int(max_workers or config["max_workers"] or os.cpu_count() or 1)
    flow_run_id, flow_run_name = _prefect_run_info()
    group = run_group or os.environ.get(GROUP_ENV) or f"prefect-{flow_run_name or 'local'}-{flow_run_id[:8] or os.getpid()}"
    logger.info("DVC pipeline at %s: %d stages (%s), %d workers%s", root, len(pipeline), ", ".join(pipeline.order),
                workers, f", DVC remote {dvc_remote!r}" if dvc_remote else "")
    if pipeline.skipped:
        logger.info("not run by the flow (no command: data sources/imports): %s", ", ".join(pipeline.skipped))

    env: dict[str, str] = {GROUP_ENV: group}
    # Stages running side by side would each start one torch thread per core and fight over the cores:
    # give each its share, unless the user pinned the thread count.
    if "OMP_NUM_THREADS" not in os.environ and workers > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    parent_id = None
    if track:
        parent_id, uri = _start_tracking(root, params, group, {
            "orchestrator": "prefect", "prefect.flow_run_id": flow_run_id, "prefect.flow_run_name": flow_run_name,
            "targets": ",".join(targets or ["all"]), "host": socket.gethostname(), "dvc_remote": dvc_remote or "",
        }, logger)
        env[PARENT_ENV] = parent_id
        env["MLFLOW_TRACKING_URI"] = os.environ.get("MLFLOW_TRACKING_URI") or uri
    ctx = StageContext(root=root, env=env, dvc_remote=dvc_remote, run_cache=run_cache, force=force,
                       log_tail_lines=config["log_tail_lines"], lock_timeout_s=config["lock_timeout_s"],
                       gpu_slots=config["gpu_slots"])
    status = "FAILED"
    try:
        stages_started = time.perf_counter()
        results, failures = _execute(pipeline, config, ctx, workers, keep_going, logger)
        stages_s = time.perf_counter() - stages_started
        status = "FINISHED" if not failures else "FAILED"
    except BaseException:
        status = "KILLED"
        raise
    finally:
        if parent_id:
            from pipeline import tracking

            with contextlib.suppress(Exception):
                tracking.end_parent_run(parent_id, status)
            with contextlib.suppress(Exception):
                tracking.sync_lock_tags(str(params.get("experiment") or "scoresde"), group,
                                        Path(root) / "dvc.lock")
    summary = ", ".join(f"{name}: {action}" for name, action in results.items())
    logger.info("pipeline finished in %.2f s (stages %.2f s): %s", time.perf_counter() - started, stages_s, summary)
    if failures:
        not_run = [n for n, a in results.items() if a.startswith("not run")]
        raise PipelineFailed(
            f"{len(failures)} stage(s) failed: {', '.join(failures)}"
            + (f"; not run because of them: {', '.join(not_run)}" if not_run else "") + "\n\n"
            + "\n\n".join(str(err) for err in failures.values()))
    return results


def _execute(pipeline: Pipeline, config: OrchestrationConfig, ctx: StageContext, workers: int,
             keep_going: bool, logger: Any) -> tuple[dict[str, str], dict[str, BaseException]]:
    """Submit each stage once all its upstream stages are done; collect actions and failures."""
    waiting = {name: set(spec.upstream) for name, spec in pipeline.stages.items()}
    results: dict[str, str] = {}
    failures: dict[str, BaseException] = {}
    futures: dict[str, Any] = {}
    finished: queue.Queue[str] = queue.Queue()
    blocked: set[str] = set()

    with ThreadPoolTaskRunner(max_workers=workers) as runner:
        def submit(name: str) -> None:
            spec = pipeline.stages[name]
            policy = config.policy(name)
            tags = ["gpu"] if policy.gpu else []
            stage_task = dvc_stage.with_options(
                name=name, task_run_name=name, tags=tags, retries=policy.retries,
                retry_delay_seconds=list(policy.retry_delay_seconds), retry_jitter_factor=policy.retry_jitter_factor)
            upstream = [futures[u] for u in spec.upstream if u in futures]
            future = runner.submit(stage_task, parameters={"spec": spec, "ctx": ctx, "timeout_s": policy.timeout_s,
                                                           "gpu": policy.gpu},
                                   wait_for=upstream if upstream and workers > len(tags) else None)
            futures[name] = future
            future.add_done_callback(lambda _f, n=name: finished.put(n))

        for name, deps in waiting.items():
            if not deps:
                submit(name)
        running = len(futures)
        while running:
            name = finished.get()
            running -= 1
            value = futures[name].result(raise_on_failure=False)  # sets the final state first
            state = futures[name].state
            if state.is_completed() and isinstance(value, dict):
                results[name] = value["action"]
            else:
                error = value if isinstance(value, BaseException) else StageFailed(
                    f"stage {name!r} ended in state {state.type.value}: {state.message}")
                failures[name] = error
                results[name] = "failed"
                logger.error("%s", error)
                for child in pipeline.downstream(name):
                    blocked.add(child)
                    results.setdefault(child, f"not run ({name} failed)")
            for child, deps in waiting.items():
                if name in deps:
                    deps.discard(name)
                    if not deps and child not in blocked and child not in futures and (keep_going or not failures):
                        submit(child)
                        running += 1
    for name in pipeline.order:  # stages never submitted after a failure without keep_going
        results.setdefault(name, "not run (stopped after a failure)")
    return {name: results[name] for name in pipeline.order}, failures


# ========================================================================= the CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.flow",
        description="Run the DVC pipeline as a Prefect flow (ephemeral Prefect unless PREFECT_API_URL is set).")
    parser.add_argument("--repo", default=".", help="path inside the DVC repository (default: .)")
    parser.add_argument("--targets", nargs="*", default=None, help="stages to reproduce with their upstream")
    parser.add_argument("--max-workers", type=int, default=None, help="stage commands at once (default: CPU count)")
    parser.add_argument("--dvc-remote", default=None, help="DVC remote to pull deps from / push outs to")
    parser.add_argument("--force", action="store_true", help="run all selected stages (dvc repro -f)")
    parser.add_argument("--no-run-cache", action="store_true", help="never restore stages from DVC's run cache")
    parser.add_argument("--fail-fast", action="store_true", help="submit nothing new after a failure")
    parser.add_argument("--no-track", action="store_true", help="no MLflow parent run")
    parser.add_argument("--params", default="params.yaml", help="params file, relative to the repo root")
    args = parser.parse_args(argv)
    try:
        results = reproduce(repo=args.repo, targets=args.targets or None, max_workers=args.max_workers,
                            dvc_remote=args.dvc_remote, force=args.force, run_cache=not args.no_run_cache,
                            keep_going=not args.fail_fast, track=not args.no_track, params_file=args.params)
    except (PipelineFailed, StageFailed, ParamsError) as err:
        print(f"pipeline failed: {err}", file=sys.stderr)
        return 1
    width = max((len(n) for n in results), default=0)
    for name, action in results.items():
        print(f"{name:<{width}}  {action}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
