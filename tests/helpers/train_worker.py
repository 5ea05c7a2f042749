"""One process of a multi-process training run (run by test_train_distributed.py).

    python -m tests.helpers.train_worker PROCESS_ID NUM_PROCESSES PORT ROOT WORKDIR [FLAGS]

FLAGS: --config.F=V overrides for every process. Run from the repository root.
"""
import sys

import jax

from infusing_jax import cli
from infusing_jax import main
from tests.helpers import train_world

if __name__ == "__main__":
    process_id, num_processes, port, root, workdir = sys.argv[1:6]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    sys.argv = [sys.argv[0], f"--config={train_world.CONFIG_FILE}:{root}",
                f"--workdir={workdir}", "--distributed", f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={num_processes}", f"--process_id={process_id}"] + sys.argv[6:]
    cli.run(main.main, main.define_flags)
