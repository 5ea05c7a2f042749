"""Train a run: python -m infusing_jax.main --config=configs/X.py --workdir=DIR [--config.F=V].

A config with a `pretrain` field (configs/toy_pretrain.py) pretrains a two-tower
(pretrain.py); every other config fine-tunes (train.py).

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

import jax  # noqa: E402 (after the restart above)
import tensorflow as tf
from absl import flags
from absl import logging
from ml_collections import config_flags

from infusing_jax import cli
from infusing_jax import config as config_lib
from infusing_jax import pretrain
from infusing_jax import train

config_flags.DEFINE_config_file("config", None, "A configs/*.py file (and :ARG).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, logs and results go here.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize (multi-host).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
flags.DEFINE_integer("process_id", None, "This process's index (with --distributed).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    tf.config.set_visible_devices([], "GPU")  # tf.data only; the accelerators are JAX's
    if FLAGS.distributed:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    logging.info("process %d of %d, %d devices", jax.process_index(), jax.process_count(),
                 jax.device_count())
    if "pretrain" in FLAGS.config:
        cli.check_folder("--workdir", FLAGS.workdir)
        pretrain.pretrain(FLAGS.config, FLAGS.workdir)
    else:
        config_lib.validate(FLAGS.config)
        cli.check_folder("--workdir", FLAGS.workdir)
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main)
