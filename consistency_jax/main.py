"""Entry point: ``python -m consistency_jax.main --config=configs/toy.py:method=ct --workdir=DIR``.

Any config field can be overridden on the command line, e.g. ``--config.train.num_steps=2000``.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file (with :arg).",
                                          lock_config=True)


def distributed_args(env) -> dict:
    """Arguments of ``jax.distributed.initialize`` beyond what JAX detects by itself.

    On TPU pods, SLURM, Open MPI and GKE JAX finds the coordinator, the process count and this
    process's index itself. Elsewhere (several GPU nodes started by hand, or several processes on
    one machine) set ``JAX_COORDINATOR_ADDRESS=host:port`` (read by JAX), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` on every process.
    """
    args = {}
    for key, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if env.get(key, "") != "":
            try:
                args[arg] = int(env[key])
            except ValueError:
                raise app.UsageError(f"{key} must be an integer, got {env[key]!r}.") from None
    if ("num_processes" in args) != ("process_id" in args):
        raise app.UsageError("Set both JAX_NUM_PROCESSES and JAX_PROCESS_ID, or neither.")
    if args and not 0 <= args["process_id"] < args["num_processes"]:
        raise app.UsageError(f"Need 0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES, got "
                             f"{args['process_id']} and {args['num_processes']}.")
    return args


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import jax

    from consistency_jax import experiment

    if os.environ.get("CONSISTENCY_JAX_DISTRIBUTED", "") == "1":
        jax.distributed.initialize(**distributed_args(os.environ))
    from consistency_jax import checkpoint, workdir_lock

    logging.info("JAX %s on %d process(es), %d device(s): %s", jax.__version__, jax.process_count(),
                 jax.device_count(), jax.devices()[0].device_kind)
    try:
        experiment.train_and_evaluate(_CONFIG.value, FLAGS.value, argv=sys.argv[1:])
    except experiment.RunInterrupted as e:
        _exit(130, str(e))
    except (workdir_lock.WorkdirLockedError, workdir_lock.WorkdirLockLostError,
            checkpoint.CheckpointError, checkpoint.CheckpointSaveError, experiment.NonFiniteError,
            experiment.SkipLimitError, checkpoint.NonFiniteStateError) as e:
        _exit(1, f"{type(e).__name__}: {e}")


def _exit(code: int, message: str) -> None:
    """Ends the process with ``message`` as the last thing on stderr (no traceback: the run's own
    errors say what happened and what to do)."""
    logging.flush()
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
