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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # Make `configs/...` importable when run from the repository root.
    sys.path.insert(0, os.getcwd())
    import jax

    from consistency_jax import experiment

    if os.environ.get("CONSISTENCY_JAX_DISTRIBUTED", "") == "1":
        jax.distributed.initialize()
    logging.info("JAX %s on %d process(es), %d device(s): %s", jax.__version__, jax.process_count(),
                 jax.device_count(), jax.devices()[0].device_kind)
    experiment.train_and_evaluate(_CONFIG.value, FLAGS.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
