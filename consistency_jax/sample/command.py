"""The command line of ``python -m consistency_jax.sample``: its flags, the request they make, and
``main``, which runs the mode the flags ask for (sampling, ``--edit`` or ``--tau_search``)."""

from __future__ import annotations

import json
import os
import sys

from consistency_jax.sample.edit import run_edit
from consistency_jax.sample.generate import run
from consistency_jax.sample.request import EDITS, SAMPLERS, SampleError, SampleRequest
from consistency_jax.sample.tau_search import run_tau_search


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SampleError(f"Expected comma-separated numbers, got {text!r}.") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SampleError(f"Expected comma-separated integers, got {text!r}.") from None


def request_from_flags(flags) -> SampleRequest:
    """A SampleRequest from the absl flags of ``main``."""
    ema = flags.ema_rate
    return SampleRequest(
        workdir=flags.workdir or "",
        out=flags.out or "",
        num_samples=flags.num_samples,
        seed=flags.seed,
        sampler=flags.sampler,
        ts=_floats(flags.ts),
        ts_indices=_ints(flags.ts_indices),
        num_scales=flags.num_scales,
        heun_steps=flags.heun_steps,
        ema_rate=float(ema) if ema not in (None, "") else None,
        step=flags.step,
        labels=flags.labels,
        clip=flags.clip,
        per_device_batch=flags.per_device_batch,
        examples_per_shard=flags.examples_per_shard,
        export_tfds=flags.export_tfds,
        data_dir=flags.data_dir,
        tfds_formats=tuple(v for v in flags.tfds_formats.split(",") if v),
        npz=flags.npz,
        grid=flags.grid,
        overwrite=flags.overwrite,
        keep_parts=flags.keep_parts,
        edit=flags.edit,
        inputs=flags.inputs,
        mask=flags.mask,
        patch_size=flags.patch_size,
        edit_sigma=flags.edit_sigma,
        noise_inputs=flags.noise_inputs,
        num_alphas=flags.num_alphas,
        tau_search=flags.tau_search,
        search_steps=flags.search_steps,
        search=flags.search,
        search_stride=flags.search_stride,
        inception_weights=flags.inception_weights,
        ref=flags.ref,
    )


def define_flags():
    """Defines the command's flags (only when it runs: importing the package defines none)."""
    from absl import flags

    f = flags
    f.DEFINE_string(
        "workdir", None, "The run to sample from (its checkpoints are read, never written)."
    )
    f.DEFINE_string("out", None, "Output directory: samples.npz, grid.png, plan.json.")
    f.DEFINE_integer("num_samples", 1000, "How many samples.")
    f.DEFINE_integer("seed", 0, "Sample i is a function of (seed, i).")
    f.DEFINE_enum(
        "sampler",
        "auto",
        list(SAMPLERS),
        "auto: one step for consistency models, Heun for EDM teachers.",
    )
    f.DEFINE_string("ts", "", "Multistep times in σ units, decreasing from T (e.g. 80,0.821).")
    f.DEFINE_string(
        "ts_indices",
        "",
        "Multistep times as indices of the Karras grid counted from T "
        "(the cm convention, e.g. 0,22,39 on N=40).",
    )
    f.DEFINE_integer(
        "num_scales", 0, "Grid size N for --ts_indices (default: the run's final grid)."
    )
    f.DEFINE_integer(
        "heun_steps", 18, "Steps of EDM's Heun sampler (2·steps − 1 network evaluations)."
    )
    f.DEFINE_string("ema_rate", None, "Which eval EMA (default: the slowest saved).")
    f.DEFINE_integer("step", None, "Which checkpoint (default: the newest readable).")
    f.DEFINE_string("labels", "uniform", "Class labels of a conditional run: uniform, cycle or K.")
    f.DEFINE_float("clip", 1.0, "Clip every x0 estimate to [-clip, clip] (0: no clipping).")
    f.DEFINE_integer("per_device_batch", 64, "Examples per device per batch.")
    f.DEFINE_integer(
        "examples_per_shard", 10000, "Examples per shard (unit of work and of resume)."
    )
    f.DEFINE_string("export_tfds", "", "Also write the samples as the TFDS dataset of this name.")
    f.DEFINE_string(
        "data_dir",
        "",
        "TFDS data dir of --export_tfds (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).",
    )
    f.DEFINE_string("tfds_formats", "array_record,tfrecord", "File formats of the TFDS export.")
    f.DEFINE_boolean("npz", True, "Write samples.npz.")
    f.DEFINE_boolean("grid", True, "Write grid.png of the first 64 samples.")
    f.DEFINE_boolean("overwrite", False, "Replace an existing output and dataset.")
    f.DEFINE_boolean("keep_parts", False, "Keep the per-shard parts after finishing.")
    f.DEFINE_string("edit", "", f"Zero-shot editing instead of sampling: one of {EDITS}.")
    f.DEFINE_string(
        "inputs",
        "",
        "Images to edit: an .npz (uint8 NHWC under arr_0), a PNG file or "
        "directory, or tfds:NAME[:SPLIT] (the first --num_samples).",
    )
    f.DEFINE_string(
        "mask",
        "center_box",
        "Inpainting mask: a preset (center_box, left_half, right_half, "
        "top_half, bottom_half, random_strokes) or an .npy/.png file (non-zero: generated).",
    )
    f.DEFINE_integer(
        "patch_size", 2, "Super-resolution factor p (the inputs are p× downsampled first)."
    )
    f.DEFINE_float(
        "edit_sigma", 0.0, "sdedit: the σ it starts from; denoise: the σ of the inputs' noise."
    )
    f.DEFINE_boolean(
        "noise_inputs", False, "denoise: add σ·z to the (clean) inputs first (a demo)."
    )
    f.DEFINE_integer("num_alphas", 9, "interpolate: points between the two noises, ends included.")
    f.DEFINE_boolean(
        "tau_search",
        False,
        "Search the intermediate times of multistep sampling (CM §6) "
        "on the Karras grid of --num_scales points; writes tau_search.json.",
    )
    f.DEFINE_integer(
        "search_steps", 2, "tau search: the number of sampling steps K (K − 1 times chosen)."
    )
    f.DEFINE_enum(
        "search",
        "ternary",
        ["ternary", "exhaustive"],
        "tau search: ternary (the paper's) or "
        "every --search_stride-th grid index (the whole curve).",
    )
    f.DEFINE_integer("search_stride", 1, "tau search: index stride of the exhaustive search.")
    f.DEFINE_string(
        "inception_weights",
        "",
        "tau search on images other than the digits: FID with "
        "these Inception weights (.safetensors) against --ref.",
    )
    f.DEFINE_string("ref", "", "tau search: FID reference, a TFDS name or a statistics .npz.")
    return flags.FLAGS


def main(argv):
    """Runs the mode the flags (``define_flags``, parsed by ``absl.app``) ask for; prints its summary."""
    from absl import app, flags

    from consistency_jax import checkpoint, export
    from consistency_jax.distributed import maybe_initialize

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        request = request_from_flags(flags.FLAGS)
    except SampleError as e:
        raise app.UsageError(str(e)) from None
    maybe_initialize(os.environ)
    try:
        summary = (
            run_edit(request)
            if request.edit
            else run_tau_search(request)
            if request.tau_search
            else run(request)
        )
    except (SampleError, checkpoint.CheckpointError, export.ExportError) as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(json.dumps(summary, indent=2), flush=True)
