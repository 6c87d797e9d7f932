"""Entry point: ``python -m consistency_jax.main --config=configs/toy.py:method=ct --workdir=DIR``.

Any config field can be overridden on the command line, e.g. ``--config.train.num_steps=2000``.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from consistency_jax.distributed import distributed_args, maybe_initialize

__all__ = ["distributed_args", "main"]

FLAGS = flags.DEFINE_string(
    "workdir",
    None,
    "Directory for checkpoints, metrics and samples: a local path or gs://BUCKET/PATH.",
)
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file (with :arg).", lock_config=True
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import jax

    from consistency_jax import experiment

    maybe_initialize(os.environ)
    from consistency_jax import checkpoint, workdir_lock

    logging.info(
        "JAX %s on %d process(es), %d device(s): %s",
        jax.__version__,
        jax.process_count(),
        jax.device_count(),
        jax.devices()[0].device_kind,
    )
    try:
        experiment.train_and_evaluate(_CONFIG.value, FLAGS.value, argv=sys.argv[1:])
    except experiment.RunInterrupted as e:
        _exit(130, str(e))
    except KeyboardInterrupt:
        _exit(
            130,
            "Aborted by Ctrl-C: the checkpoints committed before are kept (a save in flight was "
            "finished or left as a temporary directory, removed on the next start); run the same "
            "command again to resume.",
        )
    except (
        workdir_lock.WorkdirLockedError,
        workdir_lock.WorkdirLockLostError,
        checkpoint.CheckpointError,
        checkpoint.CheckpointSaveError,
        experiment.NonFiniteError,
        experiment.SkipLimitError,
        experiment.UnhealthyStateError,
        experiment.WorkdirError,
        checkpoint.NonFiniteStateError,
    ) as e:
        _exit(1, f"{type(e).__name__}: {e}")


def _exit(code: int, message: str) -> None:
    """Ends the process with ``message`` as the last thing on stderr (no traceback: the run's own
    errors say what happened and what to do)."""
    logging.flush()
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    from consistency_jax import checkpoint

    if checkpoint.orbax_threads():
        # Threads of a failed save may wait minutes for a signal of its failed part; the lease is
        # released and the error printed, so the process ends now instead of joining them.
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
