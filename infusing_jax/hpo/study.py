"""The study: Optuna's storage, sampler and pruner, and the worker loop that runs a
study's trials until it has its number of them, whatever workers share it.

    storage = make_storage(url, workdir, heartbeat_seconds)
    study = open_study(storage, "sweep", sweep)
    work(study, budget=20, objective=..., on_trial_end=...)

Storage: by default an SQLite file in the sweep's folder (DIR/study.db: no server,
for the processes of one host); any SQLAlchemy URL (`postgresql://user@host/db`)
lets workers on many hosts share a study. Heartbeats: a running trial's worker
writes one every `heartbeat_seconds`; a trial silent for 3x that is failed by the
next worker that looks, and retried once (Optuna's RetryHeartbeatStaleTrialCallback),
as a new trial with the same parameters that resumes in the first one's folder.

The rule for "done": a trial counts once it is complete, pruned, or failed for good
(its error was the trial's own, or its retry failed too). A trial that was retried
does not count (its retry does). `work` never starts more trials than the budget
leaves: it looks before it asks, and a trial that a concurrent worker made
surplus is failed at once, before any work, and marked `skipped`; so is a trial
whose sampled values another trial already has (workers whose samplers share a
seed: give each its own, `sweep --worker`).
"""
import dataclasses
import random
import time
import warnings
from typing import Callable, List

import optuna
import sqlalchemy
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from infusing_jax import errors

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
with warnings.catch_warnings():  # Optuna marks it experimental; its behaviour is tested here
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    RETRY = RetryHeartbeatStaleTrialCallback(max_retry=1, inherit_intermediate_values=True)


class Skip(Exception):
    """A trial not to run: asked for after the budget was reached by other workers, or
    with the values of another trial."""


def storage_url(url: str, workdir: str) -> str:
    """`url`, or the default SQLite file DIR/study.db."""
    return url or f"sqlite:///{workdir.rstrip('/')}/study.db"


def make_storage(url: str, heartbeat_seconds: int) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats; one-line error where it cannot be reached.

    Workers that start together may race to create the storage's tables; the loser's
    CREATE fails (PostgreSQL: a unique violation in its catalogue; SQLite: 'table ...
    already exists') and is tried again.
    """
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=heartbeat_seconds,
                grace_period=3 * heartbeat_seconds, heartbeat_stale_trial_callback=RETRY)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as e:
            lost_race = (isinstance(e, sqlalchemy.exc.IntegrityError)
                         or "already exists" in str(e))
            if not lost_race or attempt == 4:
                raise errors.UserError(f"--storage={url}: cannot open it ({type(e).__name__}: "
                                       f"{str(e).splitlines()[0][:200]})") from None
            time.sleep(1.0 + random.random())
        except Exception as e:  # SQLAlchemy's many errors: a bad URL, no server, no driver
            raise errors.UserError(f"--storage={url}: cannot open it ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:200]})") from None


def make_sampler(sweep, space_grid: Callable[[], dict], worker: int = 0):
    """config.sweep's sampler, seeded by sweep.seed and the worker's index: one worker
    draws the same values every time; workers of one study draw their own."""
    seed = sweep.seed + 1009 * worker
    if sweep.sampler == "grid":
        return optuna.samplers.GridSampler(space_grid(), seed=seed)
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if sweep.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=sweep.startup_trials,
                                      multivariate=True, constant_liar=True)


def make_pruner(sweep):
    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=sweep.startup_trials)
    if sweep.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def open_study(storage, name: str, directions: int, sampler=None, pruner=None) -> optuna.Study:
    """The study `name` in `storage`, created by whichever worker comes first."""
    return optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                               directions=["maximize"] * directions, sampler=sampler,
                               pruner=pruner)


@dataclasses.dataclass(frozen=True)
class Census:
    live: List[optuna.trial.FrozenTrial]  # neither retried nor skipped, by number
    done: List[optuna.trial.FrozenTrial]
    running: List[optuna.trial.FrozenTrial]
    waiting: List[optuna.trial.FrozenTrial]


def frozen(trial) -> optuna.trial.FrozenTrial:
    """A running trial's record as the storage holds it (system attributes included)."""
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


def original_number(trial) -> int:
    """The number of the trial that a retry repeats (its own for a first attempt)."""
    first = RETRY.retried_trial_number(frozen(trial))
    return trial.number if first is None else first


def census(trials) -> Census:
    """The trials that count (module doc), and which of them are done, running, waiting."""
    retried = {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
    live = sorted((t for t in trials if t.number not in retried and
                   not t.user_attrs.get("skipped")), key=lambda t: t.number)
    return Census(live=live, done=[t for t in live if t.state in FINISHED],
                  running=[t for t in live if t.state == TrialState.RUNNING],
                  waiting=[t for t in live if t.state == TrialState.WAITING])


def _skip(trial, reason: str):
    trial.set_user_attr("skipped", reason)
    raise Skip(f"trial {trial.number}: {reason}")


def claim(study, trial, budget: int) -> None:
    """Skip `trial` (just asked for, RUNNING) where it is past the budget: counted among
    the trials before it, by number; a retry always replaces its original."""
    if original_number(trial) != trial.number:
        return
    before = [t for t in census(study.get_trials(deepcopy=False)).live if t.number < trial.number]
    if len(before) >= budget:
        _skip(trial, f"surplus: the study has its {budget} trials")


def claim_values(study, trial, values: dict) -> None:
    """Skip a first attempt whose sampled values a live trial already has."""
    if original_number(trial) != trial.number:
        return
    for t in census(study.get_trials(deepcopy=False)).live:
        if t.number != trial.number and t.user_attrs.get("params") == values:
            _skip(trial, f"duplicate of trial {t.number}")


def work(study, budget: int, objective: Callable, on_trial_end: Callable = None,
         catch=(errors.UserError,), wait: bool = True, poll_seconds: float = None) -> None:
    """Run trials of `study` until `budget` of them are done (module doc).

    objective(trial) -> value(s), Optuna's: it raises optuna.TrialPruned to prune, an
    error in `catch` fails the trial alone, any other error stops the worker (a bug).
    on_trial_end(study, frozen trial) after each trial. When every trial left is running
    on other workers, this one waits (`wait`) up to their grace period for a silent one
    to take over, then leaves (they finish the study).
    """
    storage = study._storage  # pylint: disable=protected-access  # Optuna's own accessor
    interval = storage.get_heartbeat_interval() or 60
    poll = poll_seconds or max(1.0, interval / 2)
    callbacks = [on_trial_end] if on_trial_end else []
    idle_since = None
    while True:
        optuna.storages.fail_stale_trials(study)
        now = census(study.get_trials(deepcopy=False))
        if len(now.done) >= budget:
            return
        if now.waiting or len(now.live) < budget:
            idle_since = None
            study.optimize(objective, n_trials=1, catch=tuple(catch) + (Skip,),
                           callbacks=callbacks, gc_after_trial=True)
            continue
        idle_since = idle_since or time.monotonic()
        if not wait or time.monotonic() - idle_since > 3 * interval + poll:
            return
        time.sleep(poll)
