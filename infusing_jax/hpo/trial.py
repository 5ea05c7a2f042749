"""One trial: the run config with the trial's values, trained like any run in its own
folder, its validation scores reported to the study as they come.

    objective = make_objective(sweep, run_cfg, workdir, budget, coordinator)
    value(s) = objective(optuna_trial)        # process 0; the others follow (below)

A trial's folder is DIR/trials/<number>; a retry (after a worker died) runs in its
original's folder, so the trainer resumes from the original's latest checkpoint.
What a trial leaves in the study (user attributes): `workdir`, `params` (field path
-> value), `val` (the validation metrics of the weights the run keeps), `steps`,
`test` (its results.json headlines: the kept weights' and the pretrained model's),
`error` (a failed trial's one line), `worker` (host:pid that ran it).

Several processes (a multi-host slice): process 0 alone talks to the study; it tells
the others what to run (`Coordinator.share`), and at each validation whether to go
on; they train the same trial with it.
"""
import json
import os
import socket
import sys
from typing import Callable, Optional

import jax
import numpy as np
import optuna
from jax.experimental import multihost_utils

from infusing_jax import errors
from infusing_jax.hpo import reference as reference_lib
from infusing_jax.hpo import space as space_lib
from infusing_jax.hpo import study as study_lib
from infusing_jax.training import loop
from infusing_jax.training import run_checkpoints


class Coordinator:
    """Process 0's word to the other processes: a JSON value broadcast to all."""

    def share(self, value=None):
        """Process 0's `value` on every process (the others pass nothing)."""
        if jax.process_count() == 1:
            return value
        data = json.dumps(value).encode() if jax.process_index() == 0 else b""
        size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
        buffer = np.zeros(size, np.uint8)
        buffer[:len(data)] = np.frombuffer(data, np.uint8)
        return json.loads(bytes(multihost_utils.broadcast_one_to_all(buffer)).decode())


def trial_dir(workdir: str, trial) -> str:
    return os.path.join(workdir, "trials", str(study_lib.original_number(trial)))


def objective_values(val: Optional[dict], objectives) -> list:
    """The objectives' values in a run's validation metrics; a one-line error for one the
    run did not report."""
    missing = [o for o in objectives if not val or o not in val]
    if missing:
        raise errors.UserError(f"config.sweep.objectives: {missing[0]!r} is not among the "
                               f"run's validation metrics ({', '.join(sorted(val or {}))})")
    return [float(val[o]) for o in objectives]


def run(run_cfg, values: dict, workdir: str, report: Callable, sweep_dir: str) -> dict:
    """Train the run config with {field path: value} set, in `workdir`; -> its summary.
    report(step, val) -> bool (stop) at each validation. The pretrained model's teacher
    descriptors come from the sweep's folder where the reference job has written them."""
    cfg = space_lib.apply(run_cfg, {**reference_lib.shared_teachers(run_cfg, sweep_dir),
                                    **values})
    return loop.train_and_evaluate(cfg, workdir, on_validation=report)


def make_objective(sweep, run_cfg, workdir: str, budget: int,
                   coordinator: Coordinator) -> Callable:
    """The Optuna objective of process 0 (module doc)."""
    pruning = sweep.pruner != "none"

    def objective(trial: optuna.Trial):
        study_lib.claim(trial.study, trial, budget)
        params = {name: space_lib.suggest(trial, name, sweep.space[name])
                  for name in sweep.space.keys()}
        values = space_lib.assignments(sweep.space, params)
        study_lib.claim_values(trial.study, trial, values)
        folder = trial_dir(workdir, trial)
        trial.set_user_attr("workdir", folder)
        trial.set_user_attr("params", values)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        coordinator.share(dict(do="trial", values=values, workdir=folder))

        def report(step: int, val: dict) -> bool:
            stop = False
            if pruning:
                trial.report(objective_values(val, sweep.objectives)[0], step)
                stop = trial.should_prune()
            return bool(coordinator.share(stop))

        try:
            summary = run(run_cfg, values, folder, report, workdir)
        except errors.UserError as e:
            trial.set_user_attr("error", str(e))
            raise
        trial.set_user_attr("steps", summary["step"])
        trial.set_user_attr("val", summary["val"])
        if summary["stopped_early"]:
            raise optuna.TrialPruned(f"pruned at step {summary['step']}")
        trial.set_user_attr("test", run_checkpoints.read_headlines(folder))
        result = objective_values(summary["val"], sweep.objectives)
        return result[0] if len(result) == 1 else result

    return objective


def follow(run_cfg, workdir: str, coordinator: Coordinator, on_reference: Callable) -> None:
    """Processes other than 0: run what process 0 shares, until it says 'done'."""
    while True:
        order = coordinator.share()
        if order["do"] == "done":
            return
        if order["do"] == "reference":
            on_reference()
            continue
        print(f"sweep: process {jax.process_index()} trains {order['workdir']}", file=sys.stderr,
              flush=True)
        try:
            run(run_cfg, order["values"], order["workdir"],
                lambda step, val: bool(coordinator.share()), workdir)
        except errors.UserError:
            pass  # process 0 fails the trial in the study, with the same error
