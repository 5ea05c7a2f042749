"""Fine-tune: python -m infusing_jax.main --config=configs/X.py --workdir=DIR [--config.F=V].

Restarting the same command in the same workdir resumes from the latest
checkpoint. On several hosts (TPU pod slices, GPU clusters) run the same command
on every host with --distributed (jax.distributed finds the coordinator on TPU
and SLURM; elsewhere give --coordinator_address, --num_processes, --process_id).

The command restarts itself once with glibc tunables that keep the host memory
XLA:CPU frees after each step (host_memory.py: ~20% of a B/16 step on a 2-core
CPU); set GLIBC_TUNABLES yourself, even to '', to keep your own.
"""
if __name__ == "__main__":  # before the heavy imports: glibc reads tunables only at exec
    from infusing_jax import host_memory
    host_memory.restart_with_tunables()

from absl import flags  # noqa: E402 (after the restart above)

from infusing_jax import cli  # noqa: E402
from infusing_jax import errors  # noqa: E402
from infusing_jax.training import config as config_lib  # noqa: E402
from infusing_jax.training import loop  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    cli.define_config_flag("A configs/*.py file (and :ARG).")
    cli.define_workdir_flag("Checkpoints, logs and results go here.")
    cli.define_distributed_flags()


def main(argv):
    del argv
    if "pretrain" in FLAGS.config:
        raise errors.UserError("--config: a pretraining config; run it with "
                               "python -m infusing_jax.toy.pretrain")
    config_lib.validate(FLAGS.config)
    cli.check_folder("--workdir", FLAGS.workdir)
    cli.start_processes()
    loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main, define_flags)
