"""How a sweep's trials are proposed and executed: Optuna samplers, and the pools that run trial functions.

The driver (:mod:`pipeline.sweep`) alone talks to the Optuna study: it asks for a trial, hands a
:class:`TrialJob` to a pool, and tells the study the :class:`TrialResult`. :class:`LocalPool` runs trials on
threads of the driver (each trial is a ``dvc repro`` subprocess); :class:`PrefectPool` runs the same trial
function as Prefect tasks of a ``sweep`` flow (``--prefect``).
"""
from __future__ import annotations

import concurrent.futures as cf
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.sweep_spec import SweepSpec


@dataclass
class TrialJob:
    number: int
    workspace: Path
    params_text: str
    env: dict
    trial_run_id: str | None = None


@dataclass
class TrialResult:
    number: int
    state: str                      # COMPLETE | FAIL
    value: float | None = None
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    ran: list = field(default_factory=list)
    restored: list = field(default_factory=list)
    unchanged: list = field(default_factory=list)
    error: str | None = None


def _grid_sampler_class():
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        """Optuna's GridSampler, except that it does not call ``study.stop()`` once the grid is covered.

        That call only works inside ``study.optimize``; with ask/tell the driver stops at the budget.
        """

        def after_trial(self, study, trial, state, values) -> None:
            return None

    return GridSampler


def _GridSampler(*args, **kwargs):
    return _grid_sampler_class()(*args, **kwargs)


def make_sampler(spec: SweepSpec, n_existing: int = 0):
    """The Optuna sampler of ``spec.method``, seeded.

    Random and TPE are re-created before each ``ask`` with ``seed + n_existing`` (trials already in the
    study): the draws are reproducible, and a restarted driver does not replay the draws of the trials it
    already has (an RNG state is not stored with the study). Grid keeps one seeded order of the grid.
    """
    import warnings

    import optuna

    if spec.method == "grid":
        return _GridSampler({k: list(d.values) for k, d in spec.params.items()}, seed=spec.seed)
    seed = spec.seed + n_existing
    if spec.method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # a third of the budget (3..10) random start-up trials, then TPE; constant liar: parallel trials in
        # flight count as bad guesses, so two workers do not get the same suggestion
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(3, spec.trials // 3)),
                                          multivariate=True, constant_liar=True)


def search_space(spec: SweepSpec) -> dict:
    return {k: d.distribution() for k, d in spec.params.items()}


def ask(study, spec: SweepSpec):
    """The next trial: an enqueued one (a retry) first, else the sampler's suggestion (see :func:`make_sampler`)."""
    study.sampler = make_sampler(spec, len(study.get_trials(deepcopy=False)))
    return study.ask(search_space(spec))


class LocalPool:
    """Trials on threads of this process (each one a ``dvc repro`` subprocess)."""

    def __init__(self, workers: int, fn):
        self.pool, self.fn = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="trial"), fn

    def submit(self, job: TrialJob):
        return self.pool.submit(self.fn, job)

    def wait(self, futures: list) -> set:
        return cf.wait(futures, return_when=cf.FIRST_COMPLETED)[0]

    def result(self, future) -> TrialResult:
        return future.result()

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class PrefectPool:
    """Trials as Prefect tasks (``sweep-trial``) of a ``sweep`` flow; the jobs stay in this process."""

    def __init__(self, sweep):
        from prefect import task
        from prefect.cache_policies import NONE

        self.sweep, self.jobs = sweep, {}

        def sweep_trial(number: int) -> dict:  # only the trial number is a task parameter (no environment)
            return asdict(sweep.run_trial(self.jobs[number]))

        self.task = task(sweep_trial, name="sweep-trial", cache_policy=NONE, task_run_name="trial-{number}")

    def run(self, body) -> None:
        from prefect import flow
        from prefect.task_runners import ThreadPoolTaskRunner

        flow(body, name="sweep", flow_run_name=f"sweep-{self.sweep.spec.name}", log_prints=True,
             task_runner=ThreadPoolTaskRunner(max_workers=self.sweep.spec.max_parallel))()

    def submit(self, job: TrialJob):
        self.jobs[job.number] = job
        return self.task.submit(job.number)

    def wait(self, futures: list) -> set:
        from prefect.futures import wait

        while True:
            done = wait(futures, timeout=1.0).done
            if done:
                return set(done)

    def result(self, future) -> TrialResult:
        return TrialResult(**future.result())

    def shutdown(self) -> None:
        pass
