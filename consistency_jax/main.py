"""Entry point: ``python -m consistency_jax.main --config=configs/toy.py:method=ct --workdir=DIR``.

Any config field can be overridden on the command line, e.g. ``--config.train.num_steps=2000``; an
override of a field the config does not have fails naming it and the nearest known fields.
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


def unknown_override(argv: list[str]) -> str | None:
    """The message for the first ``--config.FIELD`` override in ``argv`` whose field the config file
    (``--config=PATH[:ARG]``) does not have; None when every override names a known field."""
    from consistency_jax import config as config_lib

    path, fields = None, []
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config."):
            fields.append(arg[len("--config.") :].split("=", 1)[0])
    if path is None:
        return None
    c = config_lib.load_config(path)
    for field in fields:
        message = config_lib.unknown_field(c, field)
        if message:
            return message
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (``app.parse_flags_with_usage``), where an override of an unknown config
    field (ml_collections raises a bare AttributeError or KeyError) ends the process with a message
    naming the field and the nearest known ones."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        message = unknown_override(argv) or f"a --config override failed: {e!r}"
        print(f"FATAL Flags parsing error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


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
    app.run(main, flags_parser=parse_flags)
