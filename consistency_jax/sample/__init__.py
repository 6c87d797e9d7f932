"""The sampling command: generate images from a trained run and write them where they are used.

    python -m consistency_jax.sample --workdir=RUN --out=DIR --num_samples=50000 \\
        [--sampler=onestep|multistep|heun] [--ts=80,0.8 | --ts_indices=0,22,39] \\
        [--ema_rate=0.9999] [--step=N] [--labels=uniform|cycle|K] [--seed=0] \\
        [--export_tfds=NAME --data_dir=DIR] [--overwrite]

It reads the run's evaluation EMA read-only (``loading.load_eval_params``), samples with the run's
own parameterisation — one step or CM Algorithm 1 for consistency models (TrigFlow runs in their
exact EDM-unit form), EDM's Heun sampler (EDM Algorithm 1) for an EDM teacher — and writes into
``--out``:

* ``samples.npz``: uint8 NHWC images under ``arr_0`` (and int labels under ``arr_1`` for a
  class-conditional run), the layout of the official evaluation scripts;
* ``grid.png``: the first 64 samples;
* with ``--export_tfds=NAME``: the TFDS dataset NAME in ``--data_dir`` (``consistency_jax.export``):
  ``tfds.data_source(NAME, data_dir=...)``, ``tfds.builder_from_directory`` and, with TensorFlow,
  ``tfds.load`` read it, and a training config with ``data.name=NAME`` trains on it.

Determinism: sample i is a function of (seed, i) alone (``samplers.indexed_sample``), so the images
are the same whatever the number of devices and hosts. The work is cut into shards of
``--examples_per_shard`` consecutive samples; shard s goes to host s mod (number of hosts), whose local
devices split each batch. A finished shard is written atomically (``parts/part-SSSSS.npz`` and, when
exporting, the dataset's shard files), so a killed command started again with the same flags writes
only what is missing; ``plan.json`` records what is being generated and a rerun with different
flags is refused. A finished export is never overwritten without ``--overwrite``.

  request.py     ``SampleRequest`` (the flags, checked) and ``describe_run`` (the run, checked)
  generate.py    the samples: sharded, resumable generation and what it writes (``run``)
  edit.py        ``--edit``: zero-shot editing and interpolation (CM Algorithm 4)
  tau_search.py  ``--tau_search``: CM §6's greedy search of the multistep times
  command.py     the flags and ``main`` (``python -m`` runs ``__main__.py``)
"""

from consistency_jax.sample.edit import load_inputs, run_edit
from consistency_jax.sample.generate import (
    PARTS,
    PLAN,
    make_generator,
    plan_of,
    prepare_output,
    run,
)
from consistency_jax.sample.request import (
    EDITS,
    SAMPLERS,
    SampledRun,
    SampleError,
    SampleRequest,
    describe_run,
    sample_times,
)
from consistency_jax.sample.tau_search import run_tau_search

__all__ = [
    "EDITS",
    "PARTS",
    "PLAN",
    "SAMPLERS",
    "SampleError",
    "SampleRequest",
    "SampledRun",
    "describe_run",
    "load_inputs",
    "make_generator",
    "plan_of",
    "prepare_output",
    "run",
    "run_edit",
    "run_tau_search",
    "sample_times",
]
