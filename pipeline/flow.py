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
  :class:`~prefect.task_runners.ThreadPoolTaskRunner` (``max_workers``, default: the CPU count divided by params' ``cpu_threads``).
  A stage is submitted as soon as all of its upstream stages have finished, so a long branch never
  holds back an independent one.
* Prefect's result cache is off (``cache_policy=NONE``): DVC is the cache. Like ``dvc repro``, a
  stage whose exact inputs were run before is restored from DVC's run cache instead of re-run
  (``run_cache=False`` disables that).
* Retries with backoff (``prefect.tasks.exponential_backoff`` for a number, or a list of delays) and
  per-stage overrides come from the ``prefect:`` section of ``params.yaml`` (see
  :data:`pipeline.orchestration.CONFIG_SCHEMA`); a failed stage fails the flow with the last lines of
  its output. A deterministic failure -- exit status 2, invalid parameters -- is not retried
  (:func:`pipeline.runner.should_retry` is the task's ``retry_condition_fn``).
* Progress bars reach the log at most once per ~10 s per stage (:mod:`pipeline.flow_output`).
* At its end, success or failure, a flow run publishes Prefect artifacts (:mod:`pipeline.flow_artifacts`):
  ``scoresde-stages`` (table: stage, action, attempts, seconds), ``scoresde-report`` (the Markdown
  report) and ``scoresde-mlflow-run`` (link to the MLflow parent run, or its coordinates for a
  local store).
* Stages matching ``prefect.gpu_stages`` (default ``train*``, ``sample*``) carry the Prefect tag
  ``gpu``, so ``prefect concurrency-limit create gpu 1`` lets each GPU run one of them at a time.
* One MLflow parent run per flow run (:func:`pipeline.flow_tracking.start_parent_run`); its id reaches
  every stage as ``SCORESDE_PARENT_RUN_ID`` (and the group as ``SCORESDE_RUN_GROUP``) so the
  stages' runs nest under it.
* Worker loss: a flow run whose process dies (SIGKILL) leaves its parent run RUNNING; the next flow
  run marks it KILLED (its process is gone, or Prefect put its flow run in a final state), and an
  ``on_crashed``/``on_cancellation`` hook does the same where Prefect can still run it. The re-run
  itself is plain DVC: finished stages are up to date and skipped, and an interrupted training
  stage resumes from its last checkpoint.
* Several hosts: with ``dvc_remote`` each task pulls its missing deps from that DVC remote (and, like
  ``dvc repro --pull``, restores a stage another host already ran from the remote's run cache) and
  pushes its outputs and run-cache entry after the commit. The alternative is a shared filesystem:
  every worker uses the same checkout (NFS/Lustre), in which case the file lock in ``.dvc/tmp``
  serialises the bookkeeping of all workers (use ``core.hardlink_lock`` on NFS).

Run it locally with ``python -m pipeline.flow`` (an ephemeral Prefect API is started in-process, no
server needed); with ``PREFECT_API_URL`` set the run reports to that server. Deployments and work
pools: see ``prefect.yaml``. This module is the flow itself; one stage is run by
:func:`pipeline.runner.dvc_stage`, and the ``prefect:`` section is read by :mod:`pipeline.orchestration`.
"""
from __future__ import annotations

from pipeline.env import MLFLOW_TRACKING_URI, OMP_NUM_THREADS, PARENT_RUN_ID, RUN_GROUP, flow_defaults

flow_defaults()  # offline-friendly defaults, before Prefect/MLflow read their settings (only where unset)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import queue  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from prefect import flow, get_run_logger  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from pipeline import flow_artifacts, flow_tracking  # noqa: E402
from pipeline.dvcgraph import Pipeline, find_root, load_pipeline, working_directory  # noqa: E402
from pipeline.orchestration import OrchestrationConfig  # noqa: E402
from pipeline.params import ParamsError  # noqa: E402
from pipeline.runner import StageContext, StageFailed, dvc_stage, split_command, stage_stats  # noqa: E402


class PipelineFailed(RuntimeError):
    """One or more stages failed; the message holds each failed stage's error and log tail."""


# ======================================================================== the flow
def _prefect_run_info() -> tuple[str, str]:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id or ""), str(flow_run.name or "")
    except Exception:  # noqa: BLE001
        return "", ""


def _read_params(path: Path) -> dict:
    if not path.exists():
        return {}
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    return data if isinstance(data, dict) else {}


@flow(name="reproduce", log_prints=True, validate_parameters=True,
      on_crashed=[flow_tracking.close_parent_on_crash], on_cancellation=[flow_tracking.close_parent_on_crash])
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
        max_workers: stage commands running at once (default: ``prefect.max_workers``, else CPU count // cpu_threads).
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
    # Default: as many stages at once as the cores hold at params' cpu_threads each (the thread count is a
    # stage input: the flow must not change it, or its numbers would differ from `dvc repro`'s).
    threads = params.get("cpu_threads", 1) if isinstance(params.get("cpu_threads", 1), int) else 1
    workers = int(max_workers or config["max_workers"] or max(1, (os.cpu_count() or 1) // threads))
    flow_run_id, flow_run_name = _prefect_run_info()
    group = run_group or os.environ.get(RUN_GROUP) or f"prefect-{flow_run_name or 'local'}-{flow_run_id[:8] or os.getpid()}"
    logger.info("DVC pipeline at %s: %d stages (%s), %d workers%s", root, len(pipeline), ", ".join(pipeline.order),
                workers, f", DVC remote {dvc_remote!r}" if dvc_remote else "")
    if pipeline.skipped:
        logger.info("not run by the flow (no command: data sources/imports): %s", ", ".join(pipeline.skipped))

    env: dict[str, str] = {RUN_GROUP: group}
    # Stages running side by side would each start one torch thread per core and fight over the cores:
    # give each its share, unless the user pinned the thread count.
    if OMP_NUM_THREADS not in os.environ and workers > 1:
        env[OMP_NUM_THREADS] = str(max(1, (os.cpu_count() or 1) // workers))
    parent_id = uri = None
    experiment = str(params.get("experiment") or "scoresde")
    if track:
        parent_id, uri = flow_tracking.start_parent_run(root, params, group, {
            "orchestrator": "prefect", "prefect.flow_run_id": flow_run_id, "prefect.flow_run_name": flow_run_name,
            "targets": ",".join(targets or ["all"]), "host": socket.gethostname(), "dvc_remote": dvc_remote or "",
        }, logger)
        env[PARENT_RUN_ID] = parent_id
        env[MLFLOW_TRACKING_URI] = os.environ.get(MLFLOW_TRACKING_URI) or uri
    ctx = StageContext(root=root, env=env, dvc_remote=dvc_remote, run_cache=run_cache, force=force,
                       log_tail_lines=config["log_tail_lines"], lock_timeout_s=config["lock_timeout_s"],
                       gpu_slots=config["gpu_slots"], run_key=uuid.uuid4().hex,
                       progress_interval_s=config["progress_interval_s"])
    status = "FAILED"
    results: dict[str, str] = {}
    failures: dict[str, BaseException] = {}
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
                tracking.sync_lock_tags(experiment, group, Path(root) / "dvc.lock")
        flow_artifacts.publish(root=root, pipeline=pipeline, results=results, failures=failures,
                               stats=stage_stats(ctx.run_key, pop=True), report_rel=config["report_markdown"],
                               status=status, parent_run_id=parent_id, tracking_uri=uri, experiment=experiment,
                               logger=logger)
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
            stage_task = dvc_stage.with_options(  # retry_condition_fn (runner.should_retry) is the task's own
                name=name, task_run_name=name, tags=tags, retries=policy.retries,
                retry_delay_seconds=policy.prefect_delays(), retry_jitter_factor=policy.retry_jitter_factor)
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
