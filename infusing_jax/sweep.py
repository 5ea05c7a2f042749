"""Hyperparameter search with the paper's validation protocol, on Optuna.

    python -m infusing_jax.sweep --config=configs/toy_sweep.py:world=W,trials=20 --workdir=DIR \
        [--storage=postgresql://user@host/db] [--distributed ...]

The config is a run config plus `config.sweep` (infusing_jax/hpo/config.py): the
search space over run-config fields, the number of trials, the sampler, the
objectives (validation metrics; by default the paper's selection score 'all') and
the pruner. Every trial is a run of the trainer in DIR/trials/<number>/ with the
trial's values set: its checkpoints, metrics and test results as any run's; its
validation scores reach the study at every validation, so a pruner stops bad
trials early. The test sets are run but never looked at to choose.

Workers: any number run this same command (a SLURM job array, several TPU VMs,
several processes on one host: launch/sweep.sh) and pull trials from the study
until it has config.sweep.num_trials; restarting the command continues the study.
Give each worker its own --worker index (launch/sweep.sh and SLURM arrays do): it
seeds the worker's sampler, so that workers do not draw the same values (a trial
whose values another already has is skipped, not trained twice).
The study lives in DIR/study.db (SQLite, no server) unless --storage names a
database that workers on several hosts share. A worker killed mid-trial leaves a
trial that the next worker takes over once its heartbeat is 3 x
sweep.heartbeat_seconds old: it is retried once, resuming from its latest
checkpoint (hpo/study.py). On a multi-host slice every host runs the command with
--distributed; process 0 talks to the study and the others train its trials.

Trials compile the same programs: unless jax_compilation_cache_dir is set, JAX's
persistent compilation cache lives in DIR/compile_cache, so every trial after the
first loads them instead of compiling them again (on the tests' tiny world, a trial
then takes half the time).

DIR also gets reference.json (the pretrained model's and the baseline's
validation), trials.jsonl, best.json and pareto.png, rewritten after every trial
(hpo/report.py), and a progress line per finished trial.
"""
if __name__ == "__main__":  # before the heavy imports (see infusing_jax/main.py)
    from infusing_jax import host_memory
    host_memory.restart_with_tunables()

import json  # noqa: E402
import os
import sys
import warnings

import jax
import ml_collections
import optuna
from absl import flags

from infusing_jax import cli
from infusing_jax import errors
from infusing_jax.hpo import config as hpo_config
from infusing_jax.hpo import reference as reference_lib
from infusing_jax.hpo import report
from infusing_jax.hpo import space as space_lib
from infusing_jax.hpo import study as study_lib
from infusing_jax.hpo import trial as trial_lib
from infusing_jax.training import config as config_lib
from infusing_jax.training import run_checkpoints

FLAGS = flags.FLAGS


def define_flags():
    cli.define_config_flag("A sweep config: a run config with a `sweep` field "
                           "(configs/toy_sweep.py).")
    cli.define_workdir_flag("The sweep's folder: trials/, study.db, trials.jsonl, best.json, "
                            "pareto.png.")
    flags.DEFINE_string("storage", "", "An Optuna storage URL that the workers share, e.g. "
                        "postgresql://user@host/db (default: sqlite in --workdir).")
    flags.DEFINE_integer("worker", None, "This worker's index, which seeds its sampler apart "
                         "from the others' (default: SLURM_ARRAY_TASK_ID, else 0).")
    cli.define_distributed_flags()


def split(cfg) -> tuple:
    """-> (the run config, config.sweep)."""
    if "sweep" not in cfg:
        raise errors.UserError("--config: has no `sweep` field; a sweep config is a run config "
                               "plus config.sweep (see configs/toy_sweep.py)")
    run_cfg = ml_collections.ConfigDict({k: v for k, v in cfg.items() if k != "sweep"})
    return run_cfg, cfg.sweep


def _check_same_sweep(cfg, workdir: str) -> None:
    """A restarted sweep must be the same sweep: DIR/config.json is its config."""
    path = os.path.join(workdir, "config.json")
    current = json.loads(cfg.to_json_best_effort())
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous != current:
            raise errors.UserError(
                f"--workdir={workdir}: holds a sweep with another config (changed: "
                f"{config_lib.describe_changes(previous, current)}); continue it with its own "
                "config (DIR/config.json), or give a new --workdir")
    run_checkpoints.write_json(path, current)


def run_sweep(cfg, workdir: str, storage_url: str = "", worker: int = 0) -> None:
    """Take part in the sweep of `cfg` in `workdir` until its study is done (module doc);
    worker: this worker's index (it seeds the sampler)."""
    run_cfg, sweep = split(cfg)
    hpo_config.validate(sweep, run_cfg)
    coordinator = trial_lib.Coordinator()
    measure = lambda: reference_lib.measure(sweep, run_cfg, workdir)  # noqa: E731
    if jax.process_index() != 0:
        trial_lib.follow(run_cfg, workdir, coordinator, on_reference=measure)
        return
    _check_same_sweep(cfg, workdir)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines say what happened
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = study_lib.make_storage(study_lib.storage_url(storage_url, workdir),
                                     sweep.heartbeat_seconds)
    study = study_lib.open_study(
        storage, sweep.study_name, len(sweep.objectives),
        study_lib.make_sampler(sweep, lambda: space_lib.grid_of(sweep.space), worker),
        study_lib.make_pruner(sweep))
    references = study_lib.open_study(storage, f"{sweep.study_name}/reference", 1)

    def write_reports(_=None, finished=None):
        report.write(study, sweep, run_cfg, workdir, finished)

    def reference_job(trial):
        study_lib.claim(trial.study, trial, 1)
        coordinator.share(dict(do="reference"))
        try:
            measure()
        except errors.UserError as e:
            print(f"sweep: the reference job failed: {e}", file=sys.stderr, flush=True)
            raise
        return 0.0

    try:
        study_lib.work(references, 1, reference_job, on_trial_end=lambda *_: write_reports(),
                       wait=False)
        study_lib.work(study, sweep.num_trials,
                       trial_lib.make_objective(sweep, run_cfg, workdir, sweep.num_trials,
                                                coordinator),
                       on_trial_end=write_reports)
        study_lib.work(references, 1, reference_job, on_trial_end=lambda *_: write_reports())
        write_reports()
    finally:
        coordinator.share(dict(do="done"))


def share_compiled_programs(workdir: str) -> None:
    """JAX's persistent compilation cache in DIR/compile_cache, every program in it,
    unless a cache is set already."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "compile_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def main(argv):
    del argv
    cli.check_folder("--workdir", FLAGS.workdir)
    share_compiled_programs(FLAGS.workdir)
    worker = FLAGS.worker
    if worker is None:
        worker = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0") or 0)
    if worker < 0:
        raise errors.UserError(f"--worker={worker}: give an index >= 0")
    cli.start_processes()
    run_sweep(FLAGS.config, FLAGS.workdir, FLAGS.storage, worker)


if __name__ == "__main__":
    cli.run(main, define_flags)
