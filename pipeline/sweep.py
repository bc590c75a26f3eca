"""Hyperparameter sweeps as a pipeline: Optuna proposes params, DVC reproduces each trial, MLflow records it.

    python -m pipeline.sweep sweeps/NAME.yaml [--max-parallel N] [--trials N] [--keep] [--prefect] [--no-track]
    make sweep NAME=quick

The sweep file (format: :mod:`pipeline.sweep_spec`) names params.yaml keys to vary, the sampler (Optuna's
GridSampler, RandomSampler(seed) or TPESampler(seed)), the budget and the objective: a number in a DVC
stage's metrics file. It is checked completely before anything runs (each error names the field).

Design:

* **The checkout is never touched.** Every trial runs ``dvc repro <targets>`` in its own workspace,
  ``sweeps/.work/<NAME>/trial_<n>/``: a copy of the repository's files (like
  ``benchmarks/orchestration.fresh_copy``, but keeping ``dvc.lock``) whose ``params.yaml`` holds the trial's
  params, sharing the checkout's DVC cache (:mod:`pipeline.sweep_workspace`). ``dvc.lock`` of the checkout
  stays as it is; trials never wait on one DVC repository lock, so they run concurrently.
* **Unchanged upstream stages are reused, never re-run.** A base workspace (params.yaml + ``base_params``)
  is reproduced once first: stages found in the shared cache or DVC's run cache are restored, others run
  once. Each trial starts from the base's ``dvc.lock`` and outputs, so DVC finds ``train@ncsn`` up to date
  in a sampler sweep and re-runs only the stages that read a varied key (printed at start; each trial's
  record lists the stages that ran, were restored, or were unchanged).
* **Parallel trials.** Up to ``max_parallel`` trials at once, each a ``dvc repro`` process with
  ``OMP_NUM_THREADS=1`` (params.yaml's ``cpu_threads: 1`` pins torch) started from a thread pool of this
  driver; the driver alone talks to Optuna (ask before, tell after each trial). With ``--prefect`` the same
  trial function runs as Prefect tasks (``sweep-trial``, ``cache_policy=NONE``) of a ``sweep`` flow on a
  ThreadPoolTaskRunner, like :mod:`pipeline.flow` runs stages, with the run visible in the Prefect UI. On
  several workers, the trial function needs only a path: give the workers a shared filesystem (the
  checkout, the DVC cache and ``sweeps/.work`` on NFS) and swap the flow's task runner for a distributed
  one (e.g. prefect-dask's ``DaskTaskRunner(address=...)``): ask/tell stays in the driver, so the study
  storage needs no network access from the workers. Without a shared filesystem, trials would pull the
  base run's outputs from a DVC remote (``dvc push`` in the base workspace, ``dvc pull`` in the trial);
  that variant is not implemented.
* **Restartable.** The Optuna study lives in SQLite beside the MLflow store (``sweeps/<NAME>.db`` next to
  ``mlflow.db``; ``SCORESDE_SWEEP_STORAGE`` or ``--storage`` overrides), named after the sweep, opened with
  ``load_if_exists``. A restarted driver keeps every COMPLETE trial (and trials that failed on their own),
  marks RUNNING trials left by a dead driver FAIL (``killed``; their leftover ``dvc repro`` is stopped)
  and enqueues their params again, then runs only what is missing; a finished sweep re-runs nothing
  (and creates no MLflow run). Changing the sweep's definition under the same name is refused.
* **Results.** MLflow (experiment ``<experiment>-sweeps``, so the comparison report of ``<experiment>``
  never mistakes a trial for a reproduction): one parent run per sweep (tags ``sweep``, ``method``,
  ``objective``), one nested run per trial (params = the varied keys, metrics = the objective and seconds,
  tag ``status``), and the stage runs of that trial nested under it. ``reports/sweeps/<NAME>.json``
  (every trial, the best, the base run's objective as baseline) and ``reports/sweeps/<NAME>.png``
  (objective against each varied key), rewritten atomically after each trial (:mod:`pipeline.sweep_report`).
"""
from __future__ import annotations

from pipeline.env import MLFLOW_TRACKING_URI, SWEEP_STORAGE, TRACKING_OFF, flow_defaults

flow_defaults()  # offline defaults before Prefect / MLflow / DVC read their settings (only where unset)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from pipeline import sweep_report  # noqa: E402
from pipeline.configs import merge_text  # noqa: E402
from pipeline.sweep_exec import LocalPool, PrefectPool, TrialJob, TrialResult, ask, make_sampler  # noqa: E402
from pipeline.sweep_spec import SweepError, SweepSpec, check_repo, objective_value, parse_sweep  # noqa: E402
from pipeline.sweep_workspace import (absolute_sqlite, driver_alive, dvc_executable, kill_group,  # noqa: E402
                                      kill_leftover, make_workspace, repro_env, restorable_lock, run_repro,
                                      source_files)

WORK_DIR = Path("sweeps") / ".work"
REPORT_DIR = Path("reports") / "sweeps"
PGID_FILE = ".sweep-pgid"


class SweepFailed(RuntimeError):
    """The base run failed: no trial can start."""


class Sweep:
    def __init__(self, spec: SweepSpec, root: Path, *, keep: bool = False, track: bool = True,
                 storage: str | None = None, experiment: str | None = None, use_prefect: bool = False,
                 trial_timeout_s: float | None = None, run_cache: bool = True):
        self.spec, self.root, self.keep, self.track = spec, root.resolve(), keep, track
        self.repro_args = [] if run_cache else ["--no-run-cache"]
        self.use_prefect, self.timeout_s = use_prefect, trial_timeout_s
        self.info = check_repo(spec, self.root)
        params = self.info.params
        self.experiment = experiment or f"{params.get('experiment', 'scoresde')}-sweeps"
        from pipeline.tracking import resolve_uri

        self.params_source = (self.root / "params.yaml").read_text()  # read once: trials differ only as the sweep says
        self.uri = absolute_sqlite(resolve_uri(params.get("tracking")), self.root)
        folder = Path(self.uri[len("sqlite:///"):]).parent if self.uri.startswith("sqlite:///") else self.root
        self.storage = storage or os.environ.get(SWEEP_STORAGE) or f"sqlite:///{folder / 'sweeps' / (spec.name + '.db')}"
        self.workdir = self.root / WORK_DIR / spec.name
        self.report_json = self.root / REPORT_DIR / f"{spec.name}.json"
        self.files = source_files(self.root, self.info.outs)
        self.cache_dir, self.parent_run_id, self.client = self.info.cache_dir, None, None

    # ------------------------------------------------------------------------------ plumbing
    def params_text(self, values: dict) -> str:
        overlay = self.spec.overlay(values)
        overlay["experiment"] = self.experiment  # the stage runs of trials go to the sweep's experiment
        return merge_text(self.params_source, overlay)

    def env(self, workspace: Path, group: str, trial: str, parent: str | None) -> dict:
        env = repro_env(workspace, tracking_uri=self.uri if self.track else None, parent_run_id=parent,
                        group=group, trial=trial)
        if not self.track:
            env[TRACKING_OFF] = "off"
        return env

    def log(self, message: str) -> None:
        print(f"[sweep {self.spec.name}] {message}", flush=True)

    # -------------------------------------------------------------------------------- MLflow
    def _start_tracking(self) -> None:
        if not self.track:
            return
        from mlflow.tracking import MlflowClient

        from pipeline import tracking

        os.environ[MLFLOW_TRACKING_URI] = self.uri
        settings = dict(self.info.params.get("tracking") or {})
        self.uri = absolute_sqlite(tracking.configure({**settings, "uri": self.uri}), self.root)
        self.client = MlflowClient()
        exp_id = tracking._experiment_id(self.experiment)
        self.exp_id = exp_id
        found = self.client.search_runs([exp_id], f"tags.`scoresde.role` = 'sweep' and tags.sweep = '{self.spec.name}'",
                                        max_results=1, order_by=["attributes.start_time ASC"])
        if found:
            self.parent_run_id = found[0].info.run_id
            return
        o = self.spec.objective
        tags = {"scoresde.role": "sweep", "sweep": self.spec.name, "method": self.spec.method,
                "objective": f"{o.stage}: {o.key} ({o.direction})", "sweep_file": self.spec.source,
                "study": self.storage, "git_commit": tracking.git_commit(self.root), "host": socket.gethostname()}
        run = self.client.create_run(exp_id, run_name=f"sweep-{self.spec.name}", tags=tags)
        self.parent_run_id = run.info.run_id
        for key, dist in self.spec.params.items():
            self.client.log_param(self.parent_run_id, f"space.{key}", json.dumps(dist.describe()))

    def _trial_run(self, number: int, values: dict) -> str | None:
        if not self.client:
            return None
        run = self.client.create_run(self.exp_id, run_name=f"{self.spec.name}-trial-{number}", tags={
            "mlflow.parentRunId": self.parent_run_id, "scoresde.role": "trial", "sweep": self.spec.name,
            "trial": str(number), "status": "RUNNING", "host": socket.gethostname()})
        for key, value in values.items():
            self.client.log_param(run.info.run_id, key, value)
        return run.info.run_id

    def _end_trial_run(self, run_id: str | None, result: TrialResult) -> None:
        if not (self.client and run_id):
            return
        if result.value is not None:
            self.client.log_metric(run_id, self.spec.objective.key, result.value)
            self.client.log_metric(run_id, "objective", result.value)
        self.client.log_metric(run_id, "seconds", result.seconds)
        self.client.set_tag(run_id, "status", result.state)
        self.client.set_tag(run_id, "ran_stages", ",".join(result.ran) or "none")
        if result.error:
            self.client.set_tag(run_id, "error", result.error[-4000:])
        self.client.set_terminated(run_id, "FINISHED" if result.state == "COMPLETE" else "FAILED")

    # -------------------------------------------------------------------------------- study
    def _open_study(self):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if self.storage.startswith("sqlite:///"):
            Path(self.storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(study_name=self.spec.name, storage=self.storage, load_if_exists=True,
                                    direction=self.spec.objective.direction, sampler=make_sampler(self.spec))
        identity = json.loads(json.dumps(self.spec.identity()))
        stored = study.user_attrs.get("identity")
        if stored is None:
            study.set_user_attr("identity", identity)
        elif stored != identity:
            changed = sorted(k for k in identity if identity[k] != stored.get(k))
            raise SweepError(self.spec.source, ", ".join(changed),
                             f"differs from the definition study {self.spec.name!r} in {self.storage} was created "
                             "with: rename the sweep, or delete the study to start over")
        return study

    def _counted(self, study) -> int:
        """Trials that count towards the budget: COMPLETE, and FAIL on their own (not killed)."""
        return sum(t.state.name == "COMPLETE" or (t.state.name == "FAIL" and "error" in t.user_attrs)
                   for t in study.get_trials(deepcopy=False))

    def _recover(self, study) -> None:
        """RUNNING trials of a dead driver -> FAIL (killed), leftover process stopped, params enqueued again."""
        from optuna.trial import TrialState

        host = socket.gethostname()
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid, where = t.user_attrs.get("driver_pid"), t.user_attrs.get("host")
            if where == host and pid and pid != os.getpid() and driver_alive(int(pid)):
                raise SweepError(self.spec.source, "<study>", f"trial {t.number} is being run by driver {pid} "
                                                              "on this host: one driver per sweep at a time")
            ws = self.workdir / f"trial_{t.number}"
            pgid = (ws / PGID_FILE).read_text().strip() if (ws / PGID_FILE).exists() else ""
            stopped = kill_leftover(int(pgid) if pgid.isdigit() else None, ws)
            reason = f"driver {pid} on {where} died during the trial" + ("; its dvc repro stopped" if stopped else "")
            study._storage.set_trial_user_attr(t._trial_id, "killed", reason)
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            run_id = t.user_attrs.get("mlflow_run_id")
            if self.client and run_id:
                self.client.set_tag(run_id, "scoresde.end_reason", reason)
                self.client.set_tag(run_id, "status", "FAIL")
                self.client.set_terminated(run_id, "KILLED")
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            shutil.rmtree(ws, ignore_errors=True)
            self.log(f"trial {t.number} was left RUNNING ({reason}): marked FAIL, enqueued again")

    # ------------------------------------------------------------------------------- base run
    def _base_run(self, study) -> Path:
        base = self.workdir / "base"
        self.log(f"base run: dvc repro {' '.join(self.spec.targets)} with the checkout's params + base_params")
        lock, kept, dropped, files = restorable_lock(self.root, self.cache_dir, self.info.cached_outs,
                                                     self.info.uncached_outs)
        if set(self.info.closure) & set(dropped):
            self.log(f"dvc.lock entries of {', '.join(n for n in self.info.closure if n in dropped)} name outputs "
                     "missing from the DVC cache or the checkout: left out of the base's dvc.lock (DVC's run cache "
                     "is consulted instead)")
        make_workspace(self.root, base, self.files, self.cache_dir, self.params_text({}), lock_text=lock,
                       outs_from=self.root, outs=files)
        env = self.env(base, f"sweep-{self.spec.name}-base", f"{self.spec.name}/base", self.parent_run_id)
        restore = [n for n in self.info.closure if n in kept]
        if restore:  # outputs of the kept entries from the shared cache: DVC then finds those stages up to date
            subprocess.run([*dvc_executable(), "checkout", "--quiet", *restore], cwd=base, env=env, capture_output=True)
        result = run_repro(base, self.spec.targets, env)
        if result.returncode != 0:
            raise SweepFailed(f"the base run failed (dvc repro exited {result.returncode}); {base}/sweep-trial.log:\n"
                              + result.tail())
        self.log(f"base run done in {result.seconds:.1f} s (ran: {', '.join(result.ran) or 'nothing'}; restored from "
                 f"the run cache: {', '.join(result.restored) or 'nothing'}; up to date: "
                 f"{', '.join(result.unchanged) or 'nothing'})")
        path = base / self.info.metrics
        value, context = objective_value(self.spec, json.loads(path.read_text()), f"{self.info.metrics} of the base run")
        study.set_user_attr("baseline", {"objective": value, "metrics": context, "params": self.info.defaults})
        if self.client:
            self.client.log_metric(self.parent_run_id, "baseline_objective", value)
        return base

    # ------------------------------------------------------------------------------- trials
    def run_trial(self, job: TrialJob) -> TrialResult:
        """One trial: workspace from the base run, ``dvc repro``, objective from the metrics file."""
        start = time.perf_counter()
        result = TrialResult(job.number, "FAIL")
        try:
            base = self.workdir / "base"
            make_workspace(self.root, job.workspace, self.files, self.cache_dir, job.params_text, lock_from=base,
                           outs_from=base, outs=self.info.closure_outs)
            repro = run_repro(job.workspace, self.repro_args + self.spec.targets, job.env, timeout_s=self.timeout_s,
                              on_start=lambda pid: (job.workspace / PGID_FILE).write_text(str(pid)))
            result.ran, result.restored, result.unchanged = repro.ran, repro.restored, repro.unchanged
            if repro.returncode != 0:
                result.error = f"dvc repro exited {repro.returncode}:\n{repro.tail()}"
                return result
            metrics = json.loads((job.workspace / self.info.metrics).read_text())
            result.value, result.metrics = objective_value(self.spec, metrics, f"trial {job.number}'s {self.info.metrics}")
            result.state = "COMPLETE"
        except SweepError as err:
            result.error = str(err)
        except Exception as err:  # noqa: BLE001 - a trial's failure is recorded, the sweep goes on
            result.error = f"{type(err).__name__}: {err}"
        finally:
            result.seconds = time.perf_counter() - start
        if result.state == "COMPLETE" and not self.keep:
            shutil.rmtree(job.workspace, ignore_errors=True)
        return result

    def _submit(self, study, pool) -> tuple:
        trial = ask(study, self.spec)
        for key, value in (("driver_pid", os.getpid()), ("host", socket.gethostname())):
            trial.set_user_attr(key, value)
        values = dict(trial.params)
        run_id = self._trial_run(trial.number, values)
        if run_id:
            trial.set_user_attr("mlflow_run_id", run_id)
        ws = self.workdir / f"trial_{trial.number}"
        job = TrialJob(trial.number, ws, self.params_text(values),
                       self.env(ws, f"sweep-{self.spec.name}-{trial.number}", f"{self.spec.name}/{trial.number}", run_id),
                       run_id)
        self.log(f"trial {trial.number} started: " + ", ".join(f"{k}={v!r}" for k, v in values.items()))
        return pool.submit(job), trial, job

    def _finish(self, study, trial, job: TrialJob, result: TrialResult) -> None:
        from optuna.trial import TrialState

        attrs = {"seconds": round(result.seconds, 3), "metrics": result.metrics, "ran": result.ran,
                 "restored": result.restored, "unchanged": result.unchanged}
        if result.error:
            attrs["error"] = result.error[-4000:]
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if result.state == "COMPLETE":
            study.tell(trial, result.value)
        else:
            study.tell(trial, state=TrialState.FAIL)
        self._end_trial_run(job.trial_run_id, result)
        what = f"{self.spec.objective.key} = {result.value:.6g}" if result.value is not None else \
            f"FAILED: {(result.error or '').splitlines()[0] if result.error else ''}"
        self.log(f"trial {result.number} {result.state} in {result.seconds:.1f} s: {what} "
                 f"(ran: {', '.join(result.ran) or 'nothing'})")
        if result.error:
            print(result.error, file=sys.stderr)
        self.write_outputs(study)

    def write_outputs(self, study) -> dict:
        records = [sweep_report.trial_record(t) for t in study.get_trials(deepcopy=False) if t.state.name != "WAITING"]
        data = sweep_report.payload(self.spec, records=records, defaults=self.info.defaults,
                                    baseline=study.user_attrs.get("baseline"), rerun=self.info.rerun,
                                    storage=self.storage, experiment=self.experiment if self.track else None,
                                    parent_run_id=self.parent_run_id)
        data["objective"]["metrics"] = self.info.metrics
        sweep_report.write_json(self.report_json, data)
        sweep_report.plot(self.report_json.with_suffix(".png"), data)
        if self.client and data["best"]:
            self.client.log_metric(self.parent_run_id, "best_objective", data["best"]["objective"],
                                   step=data["complete"])
        return data

    # ---------------------------------------------------------------------------------- loop
    def _loop(self, study, pool) -> None:
        from optuna.trial import TrialState

        running: dict = {}
        try:
            while True:
                while len(running) < self.spec.max_parallel and self._counted(study) + len(running) < self.spec.budget:
                    future, trial, job = self._submit(study, pool)
                    running[future] = (trial, job)
                if not running:
                    return
                for future in pool.wait(list(running)):
                    trial, job = running.pop(future)
                    self._finish(study, trial, job, pool.result(future))
        finally:
            for trial, job in running.values():  # interrupted: stop the trials, retry them next time
                pgid = (job.workspace / PGID_FILE).read_text().strip() if (job.workspace / PGID_FILE).exists() else ""
                if pgid.isdigit():
                    kill_group(int(pgid))
                trial.set_user_attr("killed", "the driver was interrupted")
                study.tell(trial, state=TrialState.FAIL)
                study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
                if self.client and job.trial_run_id:
                    self.client.set_terminated(job.trial_run_id, "KILLED")
            pool.shutdown()

    def run(self) -> dict:
        spec = self.spec
        self.log(f"{spec.method} over {', '.join(spec.params)}; objective {spec.objective.stage}: {spec.objective.key} "
                 f"({spec.objective.direction}); {spec.budget} trials, {spec.max_parallel} at a time")
        reused = [n for n in self.info.closure if n not in self.info.rerun]
        self.log(f"each trial re-runs: {', '.join(self.info.rerun)}; reused from the base run: {', '.join(reused) or '-'}")
        study = self._open_study()
        self._start_tracking()
        self._recover(study)
        done = self._counted(study)
        status = "FINISHED"
        try:
            if done < spec.budget:
                self.log(f"study {self.storage}: {done} of {spec.budget} trials done")
                self._base_run(study)
                pool = PrefectPool(self) if self.use_prefect else LocalPool(spec.max_parallel, self.run_trial)
                if self.use_prefect:
                    def sweep_trials() -> None:
                        self._loop(study, pool)

                    pool.run(sweep_trials)
                else:
                    self._loop(study, pool)
            else:
                self.log(f"all {spec.budget} trials are done (study {self.storage}): nothing to run")
        except Exception:
            status = "FAILED"
            raise
        except BaseException:
            status = "KILLED"
            raise
        finally:
            data = self.write_outputs(study)
            if self.client:
                self.client.log_artifact(self.parent_run_id, str(self.report_json), "sweep")
                self.client.log_artifact(self.parent_run_id, str(self.report_json.with_suffix(".png")), "sweep")
                self.client.set_terminated(self.parent_run_id, status)
            if not self.keep:
                shutil.rmtree(self.workdir / "base", ignore_errors=True)
        best, base = data["best"], (data.get("baseline") or {}).get("objective")
        if best:
            self.log(f"best: trial {best['number']} {spec.objective.key} = {best['objective']:.6g} "
                     f"(defaults: {base if base is None else f'{base:.6g}'}) with {best['params']}")
        self.log(f"wrote {self.report_json} and {self.report_json.with_suffix('.png').name}")
        return data


def _interrupt(signum, frame) -> None:
    """SIGTERM: stop like Ctrl-C (running trials are stopped and marked for a retry)."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_file", help="sweeps/NAME.yaml")
    p.add_argument("--max-parallel", type=int, default=None, help="trials at once (default: the file's max_parallel)")
    p.add_argument("--trials", type=int, default=None, help="trials to finish (default: the file's trials)")
    p.add_argument("--keep", action="store_true", help="keep the trial and base workspaces under sweeps/.work/")
    p.add_argument("--prefect", action="store_true", help="run the trials as Prefect tasks of a 'sweep' flow")
    p.add_argument("--no-track", action="store_true", help="no MLflow runs (trials run with SCORESDE_TRACKING=off)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sweeps/NAME.db beside mlflow.db)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: <params experiment>-sweeps)")
    p.add_argument("--trial-timeout", type=float, default=None, help="seconds after which a trial's dvc repro is stopped")
    p.add_argument("--no-run-cache", action="store_true",
                   help="trials run their stages even when DVC's run cache has a result for the same inputs (timing)")
    p.add_argument("--repo", default=".", help="the repository (default: the current directory)")
    args = p.parse_args(argv)
    root = Path(args.repo).resolve()
    sweep_file = Path(args.sweep_file).resolve()
    os.chdir(root)
    sys.path.insert(0, str(root))  # check_all imports the stage modules of this checkout
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        spec = parse_sweep(sweep_file, trials=args.trials, max_parallel=args.max_parallel, source=args.sweep_file)
        data = Sweep(spec, root, keep=args.keep, track=not args.no_track, storage=args.storage,
                     experiment=args.experiment, use_prefect=args.prefect, trial_timeout_s=args.trial_timeout,
                     run_cache=not args.no_run_cache).run()
    except SweepError as err:
        print(f"[sweep] {err}", file=sys.stderr)
        return 2
    except SweepFailed as err:
        print(f"[sweep] {err}", file=sys.stderr)
        return 1
    return 0 if data["best"] is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
