"""Running one DVC stage as a Prefect task: the :func:`dvc_stage` task of :mod:`pipeline.flow`.

DVC decides *whether* the stage runs (up to date, frozen, restorable from its run cache or a DVC
remote); otherwise its ``cmd`` runs as an argument list (:func:`split_command`, no shell; cwd = the
stage's ``wdir``; environment from :func:`stage_env`), streamed to the Prefect log and to
``.dvc/tmp/flow-logs/STAGE.log``, and the result is recorded in ``dvc.lock`` like ``dvc commit -f
STAGE``. Only the DVC bookkeeping is serialised (:func:`dvc_session`: a thread lock plus a file lock
in ``.dvc/tmp``); stage commands of one flow run execute concurrently.

Progress bars do not flood the log: :func:`run_command` relays ordinary lines as they come but
progress refreshes (``\r``-terminated segments, tqdm-like lines) at most once per
``progress_interval_s`` (10 s) per command, and always the last one (see :class:`OutputRelay`).
A stage exiting with status 2 (invalid parameters: :func:`pipeline.params.exit_on_params_error`, the
stage harness, argparse) fails at once: :func:`should_retry` is the task's ``retry_condition_fn``.
Each attempt is counted in :func:`stage_stats` (attempts, seconds) for the flow's summary artifact.
"""
from __future__ import annotations

from pipeline.env import DVC_ROOT, DVC_STAGE, PYTHONUNBUFFERED, flow_defaults

flow_defaults()  # before Prefect/DVC read their settings (only where unset)

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Iterator  # noqa: E402

from prefect import get_run_logger, task  # noqa: E402
from prefect.cache_policies import NONE  # noqa: E402

from pipeline.dvcgraph import StageSpec  # noqa: E402
from pipeline.flow_output import PROGRESS_INTERVAL_S, OutputRelay, run_command  # noqa: E402,F401 (re-exported)

LOCK_NAME = "scoresde-flow.lock"          # in .dvc/tmp: serialises DVC bookkeeping across processes
LOG_DIR = Path(".dvc") / "tmp" / "flow-logs"  # full output of the last run of each stage

# Shell syntax that would silently mean something else without a shell.
_SHELL_TOKENS = {"&&", "||", "|", ";", "&", ">", ">>", "<", "<<", "2>", "2>>", "&>", "2>&1", "1>&2", "|&"}


#: Exit statuses that mean "the same inputs will fail the same way": no retry. 2 = invalid parameters
#: (pipeline.params.exit_on_params_error, the stage harness) and argparse usage errors.
DETERMINISTIC_EXIT_CODES = frozenset({2})


class StageFailed(RuntimeError):
    """A stage's command failed (or did not produce its outputs); the message ends with its log tail.

    ``exit_code`` is the command's exit status (None when it did not exit by itself); ``retryable`` is
    False for failures that a retry would repeat (invalid parameters, shell syntax in ``cmd``).
    """

    def __init__(self, message: str, *, exit_code: int | None = None, retryable: bool = True):
        super().__init__(message)
        self.exit_code, self.retryable = exit_code, retryable

    def __reduce__(self):  # keep the attributes through pickling (results and states may be pickled)
        return (_stage_failed, (str(self), self.exit_code, self.retryable))


def _stage_failed(message: str, exit_code: int | None, retryable: bool) -> StageFailed:
    return StageFailed(message, exit_code=exit_code, retryable=retryable)


def should_retry(task: Any, task_run: Any, state: Any) -> bool:
    """``retry_condition_fn`` of the stage task: retry unless the failure is deterministic."""
    error = getattr(state, "data", None)
    if not isinstance(error, BaseException):
        try:
            error = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - cannot tell: retry as configured
            return True
    return not (isinstance(error, StageFailed) and not error.retryable)


# ======================================================= per-attempt bookkeeping
_stats: dict[str, dict[str, dict]] = {}
_stats_guard = threading.Lock()


def _record_attempt(run_key: str, stage: str, attempt: int, started: float, ended: float) -> None:
    with _stats_guard:
        entry = _stats.setdefault(run_key, {}).setdefault(stage, {"attempts": 0, "first_start": started})
        entry["attempts"] = max(entry["attempts"], attempt)
        entry["seconds"] = round(ended - entry["first_start"], 3)


def stage_stats(run_key: str, *, pop: bool = False) -> dict[str, dict]:
    """``{stage: {"attempts": n, "seconds": s}}`` of the tasks run with ``StageContext.run_key``:
    attempts started, and seconds from the first attempt's start to the last one's end (retry waits
    included)."""
    with _stats_guard:
        stats = _stats.pop(run_key, {}) if pop else dict(_stats.get(run_key, {}))
    return {name: {"attempts": e["attempts"], "seconds": e.get("seconds", 0.0)} for name, e in stats.items()}


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
    run_key: str = ""              # groups the attempts of one flow run in stage_stats()
    progress_interval_s: float = PROGRESS_INTERVAL_S


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
            "shell. Use a list of commands in dvc.yaml (`cmd: [a, b]`) or move the logic into a script.",
            retryable=False)
    return argv


def stage_env(spec: StageSpec, ctx: StageContext) -> dict[str, str]:
    env = dict(os.environ)
    env.update({k: str(v) for k, v in ctx.env.items()})
    env.setdefault(DVC_ROOT, ctx.root)
    env[DVC_STAGE] = spec.name
    env.setdefault(PYTHONUNBUFFERED, "1")
    # `python` in dvc.yaml means the interpreter running this flow (a venv need not be activated).
    bindir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if bindir not in path.split(os.pathsep):
        env["PATH"] = bindir + (os.pathsep + path if path else "")
    return env


# ======================================================================== the task
@task(cache_policy=NONE, persist_result=False, retry_condition_fn=should_retry)
def dvc_stage(spec: StageSpec, ctx: StageContext, timeout_s: float | None = None, gpu: bool = False) -> dict:
    """Bring one DVC stage up to date: skip, restore, or run its command and ``dvc commit`` it."""
    from prefect.runtime import task_run as current_task_run

    attempt = current_task_run.run_count or 1
    started = time.perf_counter()
    try:
        return _bring_up_to_date(spec, ctx, timeout_s, gpu, attempt, started)
    finally:
        _record_attempt(ctx.run_key, spec.name, attempt, started, time.perf_counter())


def _bring_up_to_date(spec: StageSpec, ctx: StageContext, timeout_s: float | None, gpu: bool, attempt: int,
                      started: float) -> dict:
    logger = get_run_logger()

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
                timeout_s=timeout_s, on_line=lambda line: logger.info("[%s] %s", spec.name, line),
                progress_interval_s=ctx.progress_interval_s)
            if code != 0 or timed_out:
                deterministic = not timed_out and code in DETERMINISTIC_EXIT_CODES
                why = f"timed out after {timeout_s:g} s" if timed_out else f"exited with code {code}"
                if deterministic:
                    why += " (invalid parameters or usage: not retried)"
                    logger.error("%s %s: a retry would fail the same way, not retrying", spec.name, why)
                raise StageFailed(
                    f"stage {spec.name!r} failed (attempt {attempt}): `{shlex.join(argv)}` {why} "
                    f"(cwd {spec.wdir}; full log {log_file}). Last {len(tail)} lines of its output:\n"
                    + "\n".join(tail), exit_code=None if timed_out else code, retryable=not deterministic)

    with dvc_session(ctx) as repo:
        try:
            repo.commit(spec.name, force=True)  # == `dvc commit -f STAGE`: dvc.lock + cache + run cache
        except Exception as err:
            raise StageFailed(f"stage {spec.name!r} ran but DVC could not record it in dvc.lock: {err}") from err
        if ctx.dvc_remote:
            _push(repo, _get_stage(repo, spec.name), None, logger)
    return done("ran", reason=reason)
