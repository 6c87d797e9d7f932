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

Determinism: sample i is a function of (seed, i) alone (``sampling.indexed_sample``), so the images
are the same whatever the number of devices and hosts. The work is cut into shards of
``--examples_per_shard`` consecutive samples; shard s goes to host s mod (number of hosts), whose local
devices split each batch. A finished shard is written atomically (``parts/part-SSSSS.npz`` and, when
exporting, the dataset's shard files), so a killed command started again with the same flags writes
only what is missing; ``plan.json`` records what is being generated and a rerun with different
flags is refused. A finished export is never overwritten without ``--overwrite``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Any

import numpy as np

from consistency_jax import fs

EDITS = ("inpaint", "colorize", "superres", "sdedit", "denoise", "interpolate")
PARTS = "parts"
PLAN = "plan.json"
SAMPLERS = ("auto", "onestep", "multistep", "heun")


class SampleError(ValueError):
    """A sampling request that cannot run (bad flags, a run that cannot be sampled, an existing
    output); raised before anything is compiled or written."""


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    """What to generate (the command's flags). See the module docstring."""

    workdir: str
    out: str
    num_samples: int = 1000
    seed: int = 0
    sampler: str = "auto"
    ts: tuple[float, ...] = ()
    ts_indices: tuple[int, ...] = ()
    num_scales: int = 0
    heun_steps: int = 18
    ema_rate: float | None = None
    step: int | None = None
    labels: str = "uniform"
    clip: float = 1.0
    per_device_batch: int = 64
    examples_per_shard: int = 10000
    export_tfds: str = ""
    data_dir: str = ""
    tfds_formats: tuple[str, ...] = ("array_record", "tfrecord")
    npz: bool = True
    grid: bool = True
    overwrite: bool = False
    keep_parts: bool = False
    edit: str = ""
    inputs: str = ""
    mask: str = "center_box"
    patch_size: int = 2
    edit_sigma: float = 0.0
    noise_inputs: bool = False
    num_alphas: int = 9
    tau_search: bool = False
    search_steps: int = 2
    search: str = "ternary"
    search_stride: int = 1
    inception_weights: str = ""
    ref: str = ""

    def __post_init__(self):
        for name in ("num_samples", "per_device_batch", "examples_per_shard", "heun_steps"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise SampleError(f"--{name} must be a positive integer, got {value!r}.")
        if not self.workdir:
            raise SampleError("--workdir (the run to sample from) is required.")
        if not self.out:
            raise SampleError("--out (the directory the samples go to) is required.")
        if self.sampler not in SAMPLERS:
            raise SampleError(f"--sampler must be one of {SAMPLERS}, got {self.sampler!r}.")
        if self.ts and self.ts_indices:
            raise SampleError(
                "Give the sampling times either as --ts or as --ts_indices, not both."
            )
        if self.clip < 0:
            raise SampleError(f"--clip must be >= 0 (0: no clipping), got {self.clip}.")
        if self.labels not in ("uniform", "cycle") and not str(self.labels).lstrip("-").isdigit():
            raise SampleError(
                f"--labels must be 'uniform', 'cycle' or a class index, got {self.labels!r}."
            )
        if self.edit:
            if self.edit not in EDITS:
                raise SampleError(f"--edit must be one of {EDITS}, got {self.edit!r}.")
            if self.edit != "interpolate" and not self.inputs:
                raise SampleError(
                    f"--edit={self.edit} needs --inputs (an .npz with uint8 NHWC images "
                    "under arr_0, a PNG file or directory, or tfds:NAME[:SPLIT])."
                )
            if self.edit in ("sdedit", "denoise") and self.edit_sigma <= 0:
                raise SampleError(
                    f"--edit={self.edit} needs --edit_sigma > 0 (the noise level the "
                    f"{'edit starts from' if self.edit == 'sdedit' else 'inputs carry'})."
                )
            if self.export_tfds:
                raise SampleError(
                    "--export_tfds writes generated samples; it does not apply to --edit."
                )
        if self.tau_search:
            if self.edit or self.export_tfds:
                raise SampleError(
                    "--tau_search is a mode of its own: not with --edit or --export_tfds."
                )
            if self.search not in ("ternary", "exhaustive") or self.search_steps < 2:
                raise SampleError(
                    f"--search must be ternary or exhaustive and --search_steps >= 2, got "
                    f"{self.search!r} and {self.search_steps}."
                )
        if self.export_tfds:
            from consistency_jax import export

            try:
                export.check_dataset_name(self.export_tfds)
            except export.ExportError as e:
                raise SampleError(f"--export_tfds: {e}") from None


@dataclasses.dataclass(frozen=True)
class _Model:
    """A run read for sampling: its config, how to sample it, and the parameters' step."""

    config: Any
    family: str
    consistency_fn: Any
    sigmas: Any
    example_shape: tuple[int, ...]
    num_classes: int | None
    step: int


def describe_run(request: SampleRequest) -> _Model:
    """Reads the run's config and checkpoint metadata (no arrays) and checks that it can be
    sampled as requested.

    Raises:
      SampleError: not an image run, a sampler the method family has no use for, times or labels
        that do not fit the run.
      checkpoint.CheckpointError: no readable checkpoint / EMA.
    """
    from consistency_jax import loading, methods
    from consistency_jax import parameterization as param_lib
    from consistency_jax.toy_data import TOY_DATASETS

    config, step, _ = loading.eval_params_metadata(request.workdir, request.ema_rate)
    if request.step is not None:
        step = request.step
    if config.data.name in TOY_DATASETS:
        raise SampleError(
            f"{request.workdir} is a run on the 2-D toy ({config.data.name}); the sampling "
            "command writes images (the toy's own evaluation samples it)."
        )
    spec = methods.get(config.method)
    family = spec.family
    sampler = request.sampler
    if family == "denoiser" and sampler not in ("auto", "heun"):
        raise SampleError(
            f"{request.workdir} is an EDM denoiser (method={config.method!r}); sample it "
            f"with --sampler=heun, not {sampler!r}."
        )
    if family == "consistency" and sampler == "heun":
        raise SampleError(
            f"{request.workdir} is a consistency model (method={config.method!r}); "
            "--sampler=heun is for EDM teachers. Use onestep or multistep."
        )
    if sampler == "multistep" and not (request.ts or request.ts_indices):
        raise SampleError(
            "--sampler=multistep needs the times: --ts=T,t1,... (σ units, decreasing) "
            "or --ts_indices=0,i1,... (grid indices from T, the cm convention)."
        )
    if (request.ts or request.ts_indices) and sampler not in ("multistep", "auto"):
        raise SampleError(f"--ts/--ts_indices are for --sampler=multistep, not {sampler!r}.")
    sigmas = param_lib.SigmaConfig(**config.sigmas.to_dict())
    num_classes = None
    if config.data.use_labels:
        num_classes = int(config.model.kwargs.get("num_classes") or 0) or None
    if num_classes is None and request.labels not in ("uniform", "cycle"):
        raise SampleError(
            f"--labels={request.labels} given but {request.workdir} is unconditional."
        )
    if (
        num_classes is not None
        and request.labels not in ("uniform", "cycle")
        and not 0 <= int(request.labels) < num_classes
    ):
        raise SampleError(
            f"--labels={request.labels} is not a class of this run (0..{num_classes - 1})."
        )
    size, channels = int(config.data.image_size), int(config.data.num_channels)
    model = _Model(
        config, family, spec.consistency_fn, sigmas, (size, size, channels), num_classes, int(step)
    )
    sample_times(request, model)  # checks the times now
    return model


def sample_times(request: SampleRequest, model: _Model) -> tuple[float, ...]:
    """The times of a consistency sampler: (T,) for one step, else --ts or the grid of --ts_indices.

    Raises:
      SampleError: times not strictly decreasing or outside [σ_min, σ_max], indices off the grid.
    """
    from consistency_jax import sampling

    if model.family != "consistency":
        return ()
    sigmas = model.sigmas
    try:
        if request.ts_indices:
            num_scales = request.num_scales
            if not num_scales:
                from consistency_jax.methods import discrete

                try:
                    num_scales = discrete.grid_size(model.config)
                except Exception:  # noqa: BLE001 -- a continuous-time run has no grid of its own
                    num_scales = None
                if not num_scales:
                    raise SampleError(
                        f"method={model.config.method!r} has no discrete grid; give "
                        "--num_scales with --ts_indices, or the times as --ts."
                    )
            return sampling.times_from_indices(request.ts_indices, int(num_scales), sigmas)
        if request.ts:
            return sampling.check_times(request.ts, sigmas)
    except ValueError as e:
        if isinstance(e, SampleError):
            raise
        raise SampleError(f"Sampling times: {e}") from None
    return (sigmas.sigma_max,)


def plan_of(request: SampleRequest, model: _Model) -> dict:
    """What determines the samples (compared on a rerun) and the layout of the work."""
    return {
        "workdir": fs.resolve(request.workdir),
        "step": model.step,
        "ema_rate": request.ema_rate,
        "method": model.config.method,
        "family": model.family,
        "seed": request.seed,
        "num_samples": request.num_samples,
        "times": list(sample_times(request, model)),
        "heun_steps": request.heun_steps if model.family == "denoiser" else None,
        "labels": request.labels if model.num_classes else None,
        "num_classes": model.num_classes,
        "clip": request.clip,
        "example_shape": list(model.example_shape),
        "examples_per_shard": request.examples_per_shard,
        "export_tfds": request.export_tfds,
        "tfds_formats": list(request.tfds_formats),
        "data_dir": os.path.abspath(_data_dir(request)) if request.export_tfds else "",
    }


def _data_dir(request: SampleRequest) -> str:
    return (
        request.data_dir
        or os.environ.get("TFDS_DATA_DIR")
        or os.path.expanduser("~/tensorflow_datasets")
    )


def _tfds_export(request: SampleRequest, model: _Model):
    from consistency_jax import export

    if not request.export_tfds:
        return None
    return export.TfdsExport(
        _data_dir(request),
        request.export_tfds,
        model.example_shape,
        model.num_classes,
        request.num_samples,
        request.examples_per_shard,
        formats=request.tfds_formats,
        description=f"{request.num_samples} samples of the {model.config.method} run "
        f"{fs.resolve(request.workdir)} "
        f"(step {model.step}), generated by consistency_jax.sample.",
    )


def prepare_output(request: SampleRequest, model: _Model) -> dict:
    """Checks ``--out`` (and the TFDS dataset) against the plan before anything is computed.

    A new output gets ``plan.json``; an unfinished one with the same plan is resumed; a different
    plan or a finished output is refused unless ``--overwrite`` (which deletes the output and the
    dataset first).

    Returns:
      The plan (with "complete": False).

    Raises:
      SampleError: the output or the dataset exists and would be overwritten.
    """
    from consistency_jax import export

    plan = plan_of(request, model)
    path = os.path.join(request.out, PLAN)
    tfds_export = _tfds_export(request, model)
    if request.overwrite:
        if os.path.isdir(request.out):
            shutil.rmtree(request.out)
        if tfds_export is not None:
            tfds_export.remove()
    elif os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("complete"):
            raise SampleError(
                f"{request.out} holds a finished sampling run; use --overwrite to replace "
                "it, or another --out."
            )
        differ = sorted(k for k in plan if saved.get(k) != plan[k])
        if differ:
            raise SampleError(
                f"{request.out} holds an unfinished sampling run of a different request "
                f"(differs in {differ}: saved {[saved.get(k) for k in differ]}, now "
                f"{[plan[k] for k in differ]}). Rerun with the same flags to complete it, "
                "or --overwrite to start again."
            )
    elif os.path.isdir(request.out) and os.listdir(request.out):
        raise SampleError(
            f"--out={request.out} exists and is not a sampling output; choose an empty or "
            "new directory, or --overwrite."
        )
    if tfds_export is not None and not request.overwrite:
        if tfds_export.is_complete() or (tfds_export.exists() and not os.path.exists(path)):
            raise SampleError(
                f"The TFDS dataset {request.export_tfds!r} already exists in "
                f"{tfds_export.dir}; use --overwrite to replace it, or another name."
            )
    os.makedirs(os.path.join(request.out, PARTS), exist_ok=True)
    plan["complete"] = False
    if not os.path.exists(path):
        export.write_json_atomic(path, plan)
    return plan


def _label_of(request: SampleRequest, model: _Model):
    if not model.num_classes:
        return None
    return request.labels


def make_generator(request: SampleRequest, model: _Model, apply_fn, mesh):
    """A jitted ``generate(params, indices) -> (uint8 images, labels or None)`` over ``mesh``'s
    "data" axis: example i from (seed, i) alone."""
    import jax
    import jax.numpy as jnp

    from consistency_jax import parameterization as param_lib
    from consistency_jax import sampling

    P = jax.sharding.PartitionSpec
    key = jax.random.key(request.seed)
    times = sample_times(request, model)
    clip = request.clip or None
    labels_mode = _label_of(request, model)

    def labels_of(indices):
        if labels_mode is None:
            return None
        if labels_mode == "uniform":
            return sampling.example_labels(sampling.example_keys(key, indices), model.num_classes)
        if labels_mode == "cycle":
            return (indices % model.num_classes).astype(jnp.int32)
        return jnp.full(indices.shape, int(labels_mode), jnp.int32)

    def generate(params, indices):
        labels = labels_of(indices)
        if model.family == "denoiser":
            denoise = lambda x, t: param_lib.denoiser_fn(
                apply_fn, params, x, t, model.sigmas, labels=labels
            )
            x = sampling.indexed_heun_sample(
                denoise, key, indices, model.example_shape, model.sigmas, request.heun_steps
            )
            if clip:
                x = jnp.clip(x, -clip, clip)
        else:
            x = sampling.indexed_sample(
                apply_fn,
                params,
                key,
                indices,
                model.example_shape,
                times,
                model.sigmas,
                labels=labels,
                clip=clip,
                consistency_fn=model.consistency_fn,
            )
        images = jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
        return images, (labels if labels is not None else jnp.zeros(indices.shape, jnp.int32))

    data = jax.sharding.NamedSharding(mesh, P("data"))
    jitted = jax.jit(
        generate,
        in_shardings=(jax.sharding.NamedSharding(mesh, P()), data),
        out_shardings=(data, data),
    )
    # The indices are put on this host's devices first: with several processes jit takes no NumPy
    # input with a non-trivial sharding, even over a mesh of local devices.
    return lambda params, indices: jitted(params, jax.device_put(indices, data))


def _part_path(out: str, shard: int) -> str:
    return os.path.join(out, PARTS, f"part-{shard:05d}.npz")


def _read_part(out: str, shard: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(_part_path(out, shard), allow_pickle=False) as z:
        return z["images"], z["labels"]


def run(request: SampleRequest) -> dict:
    """Generates (or completes) the samples of ``request``; returns a summary (paths, counts, rate).

    Raises:
      SampleError, checkpoint.CheckpointError, export.ExportError: before anything is computed.
    """
    import jax

    from consistency_jax import export, loading, networks
    from consistency_jax.evaluation.images import image_grid

    model = describe_run(request)
    pid, nproc = jax.process_index(), jax.process_count()
    if nproc == 1:
        plan = prepare_output(request, model)
    else:  # one host checks and prepares the output; every host stops if it refuses
        from jax.experimental import multihost_utils

        refusal = ""
        if pid == 0:
            try:
                prepare_output(request, model)
            except SampleError as e:
                refusal = str(e)
        if int(multihost_utils.broadcast_one_to_all(np.int32(bool(refusal)))):
            raise SampleError(refusal or "Process 0 refused the output (see its log).")
        plan = plan_of(request, model)
        plan["complete"] = False
    tfds_export = _tfds_export(request, model)
    num_shards = -(-request.num_samples // request.examples_per_shard)
    mine = [s for s in range(num_shards) if s % nproc == pid]
    todo = [
        s
        for s in mine
        if not os.path.exists(_part_path(request.out, s))
        or (tfds_export is not None and not tfds_export.shard_done(s))
    ]

    devices = jax.local_devices()
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    _, params, step = loading.load_eval_params(
        request.workdir, request.ema_rate, step=model.step, sharding=replicated
    )
    apply_fn = networks.make_apply_fn(networks.from_config(model.config.model))
    generate = make_generator(request, model, apply_fn, mesh)
    batch = request.per_device_batch * len(devices)

    total = sum(_shard_size(request, s) for s in todo)
    progress = _progress(total, disable=pid != 0 or not total)
    start = time.time()
    done = 0
    for s in todo:
        lo = s * request.examples_per_shard
        hi = lo + _shard_size(request, s)
        if os.path.exists(_part_path(request.out, s)):
            images, labels = _read_part(request.out, s)
        else:
            chunks, label_chunks = [], []
            for b in range(lo, hi, batch):
                indices = np.arange(b, b + batch, dtype=np.int32)  # the tail past hi is discarded
                x, y = generate(params, indices)
                n = min(batch, hi - b)
                chunks.append(np.asarray(x)[:n])
                label_chunks.append(np.asarray(y)[:n])
                progress.update(n)
            images, labels = np.concatenate(chunks), np.concatenate(label_chunks)
            tmp = _part_path(request.out, s) + f".tmp.{os.getpid()}.npz"
            np.savez(tmp, images=images, labels=labels)
            os.replace(tmp, _part_path(request.out, s))
        if tfds_export is not None and not tfds_export.shard_done(s):
            tfds_export.write_shard(s, images, labels if model.num_classes else None)
        done += hi - lo
    progress.close()
    elapsed = time.time() - start

    if nproc > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("consistency_jax.sample: shards written")
    summary = {
        "out": os.path.abspath(request.out),
        "step": step,
        "generated": done,
        "seconds": round(elapsed, 3),
        "images_per_s": round(done / elapsed, 2) if done else None,
    }
    if pid == 0:
        missing = [s for s in range(num_shards) if not os.path.exists(_part_path(request.out, s))]
        if missing:
            raise SampleError(
                f"Parts {missing} of {request.out} are missing after every host finished "
                "(is --out on a file system all hosts share?)."
            )
        images, labels = (
            np.concatenate(a) for a in zip(*(_read_part(request.out, s) for s in range(num_shards)))
        )
        if request.npz:
            export.save_npz(
                os.path.join(request.out, "samples.npz"),
                images,
                labels if model.num_classes else None,
            )
            summary["npz"] = os.path.join(request.out, "samples.npz")
        if request.grid:
            n = min(64, len(images))
            grid = image_grid(
                images[:n].astype(np.float32) / 127.5 - 1.0,
                ncols=8,
                scale=max(1, 96 // model.example_shape[0]),
            )
            grid.save(os.path.join(request.out, "grid.png"))
            summary["grid"] = os.path.join(request.out, "grid.png")
        if tfds_export is not None:
            tfds_export.write_metadata({k: v for k, v in plan.items() if k != "complete"})
            summary["tfds"] = tfds_export.dir
        plan["complete"] = True
        export.write_json_atomic(os.path.join(request.out, PLAN), plan)
        if not request.keep_parts:
            shutil.rmtree(os.path.join(request.out, PARTS), ignore_errors=True)
    if nproc > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("consistency_jax.sample: metadata written")
    return summary


# --------------------------------------------------------------------------------------------------
# Zero-shot editing (CM Algorithm 4; consistency_jax.editing)
# --------------------------------------------------------------------------------------------------
def load_inputs(
    spec: str, example_shape: tuple[int, ...], limit: int, data_dir: str = ""
) -> np.ndarray:
    """Images to edit as float32 (N, H, W, C) in [−1, 1]: from an .npz (uint8 under ``arr_0``), a PNG
    file or a directory of them, or ``tfds:NAME[:SPLIT]``; at most ``limit``.

    Raises:
      SampleError: a missing file, or images whose size or channels differ from the run's.
    """
    h, w, c = example_shape
    if spec.startswith("tfds:"):
        from consistency_jax import data as data_lib

        parts = spec[len("tfds:") :].split(":")
        cfg = data_lib.ImageDataConfig(
            name=parts[0],
            data_dir=data_dir or None,
            split=parts[1] if len(parts) > 1 else "test",
            image_size=h,
            num_channels=c,
            random_flip=False,
        )
        return data_lib.load_image_arrays(cfg, max_examples=limit)["image"]
    if not os.path.exists(spec):
        raise SampleError(f"--inputs={spec} does not exist.")
    if spec.endswith(".npz"):
        with np.load(spec, allow_pickle=False) as z:
            key = "arr_0" if "arr_0" in z.files else "images" if "images" in z.files else None
            if key is None:
                raise SampleError(f"{spec} has no 'arr_0' (or 'images') array; it holds {z.files}.")
            images = z[key][:limit]
    else:
        from PIL import Image

        files = (
            sorted(
                os.path.join(spec, n)
                for n in os.listdir(spec)
                if n.lower().endswith((".png", ".jpg", ".jpeg"))
            )
            if os.path.isdir(spec)
            else [spec]
        )
        if not files:
            raise SampleError(f"--inputs={spec} holds no PNG or JPEG files.")
        images = np.stack(
            [np.asarray(Image.open(f).convert("L" if c == 1 else "RGB")) for f in files[:limit]]
        )
        images = images[..., None] if images.ndim == 3 else images
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (h, w, c):
        raise SampleError(
            f"--inputs={spec}: expected uint8 images of shape (N, {h}, {w}, {c}) like the "
            f"run's, got {images.dtype} {images.shape}."
        )
    return images.astype(np.float32) / 127.5 - 1.0


def _load_mask(spec: str, shape) -> Any:
    from consistency_jax import editing

    if spec in editing.INPAINTING_PRESETS:
        return spec
    if not os.path.exists(spec):
        raise SampleError(
            f"--mask={spec} is neither a preset {editing.INPAINTING_PRESETS} nor a file."
        )
    if spec.endswith(".npy"):
        return np.load(spec, allow_pickle=False) != 0
    from PIL import Image

    return np.asarray(Image.open(spec).convert("L")) != 0


def _edit_times(request: SampleRequest, model: _Model) -> tuple[float, ...]:
    """--ts/--ts_indices, else four steps of the Karras grid from T (from --edit_sigma for sdedit)."""
    from consistency_jax import sampling, schedules

    if request.ts or request.ts_indices:
        return sample_times(request, model)
    grid = np.asarray(schedules.karras_sigmas(5, model.sigmas), np.float64)[::-1][:-1]
    if request.edit == "sdedit":
        grid = np.concatenate([[request.edit_sigma], grid[grid < request.edit_sigma]])
    return sampling.check_times(tuple(float(t) for t in grid), model.sigmas)


def run_edit(request: SampleRequest) -> dict:
    """Zero-shot editing of ``--inputs`` (or interpolation) with the run: CM Algorithm 4 for a
    consistency model, the same projections along EDM's Heun sampler for an EDM teacher. Writes
    ``edit.npz`` (``arr_0`` the results as uint8, ``float`` the same in [−1, 1] before quantising (a
    projection can leave the known part just outside the uint8 range), ``inputs`` and ``degraded``
    beside them) and ``edit.png``
    (rows: input, what the editor sees, result).

    Raises:
      SampleError: bad flags or inputs, before anything is compiled.
    """
    import jax
    import jax.numpy as jnp

    from consistency_jax import editing, export, loading, networks
    from consistency_jax import parameterization as param_lib
    from consistency_jax.evaluation.images import image_grid

    model = describe_run(request)
    if request.edit == "colorize" and model.example_shape[-1] != 3:
        raise SampleError(
            f"--edit=colorize needs an RGB run; {request.workdir} makes "
            f"{model.example_shape[-1]}-channel images."
        )
    if request.edit == "superres" and (model.example_shape[0] % request.patch_size):
        raise SampleError(
            f"--patch_size={request.patch_size} does not divide the image size "
            f"{model.example_shape[0]}."
        )
    if os.path.exists(os.path.join(request.out, "edit.npz")) and not request.overwrite:
        raise SampleError(f"{request.out}/edit.npz exists; use --overwrite or another --out.")
    times = _edit_times(request, model) if model.family == "consistency" else ()
    key = jax.random.key(request.seed)
    n = request.num_samples
    if request.edit == "interpolate":
        inputs = None
    else:
        inputs = load_inputs(request.inputs, model.example_shape, n, request.data_dir)
        n = len(inputs)
    mask = _load_mask(request.mask, None) if request.edit in ("inpaint", "sdedit") else None
    if mask is not None and not isinstance(mask, str):
        editing.as_mask(mask, (n,) + model.example_shape)  # the shape check, before compiling
    _, params, step = loading.load_eval_params(request.workdir, request.ema_rate, step=model.step)
    apply_fn = networks.make_apply_fn(networks.from_config(model.config.model))
    labels = None
    if model.num_classes:
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(n, dtype=jnp.uint32))
        labels = (
            jnp.full((n,), int(request.labels), jnp.int32)
            if request.labels not in ("uniform", "cycle")
            else jnp.arange(n, dtype=jnp.int32) % model.num_classes
            if request.labels == "cycle"
            else jax.vmap(lambda k: jax.random.randint(k, (), 0, model.num_classes))(keys)
        )
    clip = request.clip or None
    p, sigma = request.patch_size, request.edit_sigma
    cm_kw = dict(labels=labels, clip=clip, consistency_fn=model.consistency_fn)
    teacher = model.family == "denoiser"
    denoise = (
        (lambda x, t: param_lib.denoiser_fn(apply_fn, params, x, t, model.sigmas, labels=labels))
        if teacher
        else None
    )
    k_edit, k_noise = jax.random.split(key)
    degraded = inputs
    if request.edit == "inpaint":
        omega = np.asarray(editing.as_mask(mask, (n,) + model.example_shape, seed=request.seed))
        degraded = np.where(omega, -1.0, inputs)
        fn = (
            (
                lambda: editing.edm_inpaint(
                    denoise, k_edit, inputs, mask, model.sigmas, request.heun_steps
                )
            )
            if teacher
            else (
                lambda: editing.inpaint(
                    apply_fn, params, k_edit, inputs, mask, times, model.sigmas, **cm_kw
                )
            )
        )
    elif request.edit == "colorize":
        gray = np.repeat(
            np.sum(inputs * np.array([0.299, 0.587, 0.114], np.float32), -1, keepdims=True),
            3,
            axis=-1,
        )
        degraded = gray
        fn = (
            (lambda: editing.edm_colorize(denoise, k_edit, gray, model.sigmas, request.heun_steps))
            if teacher
            else (
                lambda: editing.colorize(
                    apply_fn, params, k_edit, gray, times, model.sigmas, **cm_kw
                )
            )
        )
    elif request.edit == "superres":
        low = np.asarray(editing.patch_average(inputs, p))
        degraded = np.asarray(editing.upsample_nearest(low, p))
        fn = (
            (
                lambda: editing.edm_super_resolve(
                    denoise, k_edit, low, model.sigmas, request.heun_steps, patch_size=p
                )
            )
            if teacher
            else (
                lambda: editing.super_resolve(
                    apply_fn, params, k_edit, low, times, model.sigmas, patch_size=p, **cm_kw
                )
            )
        )
    elif request.edit == "sdedit":
        m = None if request.mask == "center_box" and mask == "center_box" else mask
        fn = (
            (
                lambda: editing.edm_sdedit(
                    denoise, k_edit, inputs, sigma, model.sigmas, request.heun_steps, mask=m
                )
            )
            if teacher
            else (
                lambda: editing.sdedit(
                    apply_fn, params, k_edit, inputs, times, model.sigmas, mask=m, **cm_kw
                )
            )
        )
    elif request.edit == "denoise":
        if request.noise_inputs:
            degraded = inputs + sigma * np.asarray(jax.random.normal(k_noise, inputs.shape))
        fn = (
            (
                lambda: editing.edm_denoise(
                    denoise, degraded, sigma, model.sigmas, request.heun_steps
                )
            )
            if teacher
            else (
                lambda: editing.denoise(
                    apply_fn,
                    params,
                    None,
                    degraded,
                    sigma,
                    model.sigmas,
                    labels=labels,
                    clip=clip,
                    consistency_fn=model.consistency_fn,
                )
            )
        )
    else:  # interpolate: n pairs of noises, num_alphas points each
        z0 = jax.random.normal(k_edit, (n,) + model.example_shape)
        z1 = jax.random.normal(k_noise, (n,) + model.example_shape)
        alphas = np.linspace(0.0, 1.0, request.num_alphas)
        fn = (
            (
                lambda: editing.edm_interpolate(
                    denoise, z0, z1, alphas, model.sigmas, request.heun_steps
                )
            )
            if teacher
            else (
                lambda: editing.interpolate(
                    apply_fn, params, k_edit, z0, z1, alphas, times[:1], model.sigmas, **cm_kw
                )
            )
        )
    start = time.time()
    result = np.asarray(jax.jit(fn)())
    elapsed = time.time() - start
    os.makedirs(request.out, exist_ok=True)
    to_u8 = lambda x: np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    arrays = {
        "arr_0": to_u8(result),
        "float": result.astype(np.float32),
    }  # float: before quantising
    if inputs is not None:
        arrays.update(inputs=to_u8(inputs), degraded=to_u8(np.clip(degraded, -1, 1)))
    tmp = os.path.join(request.out, "edit.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, os.path.join(request.out, "edit.npz"))
    k = min(n, 8)
    if request.edit == "interpolate":  # rows: pairs; columns: α from 0 to 1
        rows = np.transpose(result[:, :k], (1, 0, 2, 3, 4)).reshape((-1,) + model.example_shape)
        grid = image_grid(
            rows, ncols=request.num_alphas, scale=max(1, 64 // model.example_shape[0])
        )
    else:
        rows = np.concatenate([inputs[:k], np.clip(degraded[:k], -1, 1), result[:k]])
        grid = image_grid(rows, ncols=k, scale=max(1, 64 // model.example_shape[0]))
    grid.save(os.path.join(request.out, "edit.png"))
    export.write_json_atomic(
        os.path.join(request.out, "edit.json"),
        {
            "edit": request.edit,
            "workdir": fs.resolve(request.workdir),
            "step": step,
            "method": model.config.method,
            "times": list(times),
            "heun_steps": request.heun_steps if teacher else None,
            "inputs": request.inputs,
            "mask": request.mask if request.edit in ("inpaint", "sdedit") else None,
            "patch_size": p if request.edit == "superres" else None,
            "edit_sigma": sigma or None,
            "seed": request.seed,
            "count": n,
            "seconds": round(elapsed, 3),
        },
    )
    return {
        "out": os.path.abspath(request.out),
        "edit": request.edit,
        "step": step,
        "count": n,
        "npz": os.path.join(request.out, "edit.npz"),
        "png": os.path.join(request.out, "edit.png"),
    }


# --------------------------------------------------------------------------------------------------
# τ search (CM §6; consistency_jax.tau_search)
# --------------------------------------------------------------------------------------------------
def search_grid(request: SampleRequest, model: _Model) -> np.ndarray:
    """The candidate times: the Karras grid of --num_scales points (default: the run's final grid, 40
    for a continuous-time run), from T down to ε."""
    from consistency_jax import schedules

    n = request.num_scales
    if not n:
        from consistency_jax.methods import discrete

        try:
            n = discrete.grid_size(model.config)
        except Exception:  # noqa: BLE001 -- continuous time: no grid of its own
            n = None
        n = n or 40
    return np.asarray(schedules.karras_sigmas(int(n), model.sigmas), np.float64)[::-1]


def run_tau_search(request: SampleRequest) -> dict:
    """Greedy τ search (``tau_search.greedy_search``) for a run, scored by digits-FD on the digits, by
    FID (``--inception_weights``, ``--ref``) otherwise, on ``--num_samples`` samples from fixed noise;
    writes ``tau_search.json`` (the choice and every score computed).

    Raises:
      SampleError: an EDM run, a metric that cannot be computed, an existing result.
    """
    import jax

    from consistency_jax import export, loading, networks, tau_search
    from consistency_jax.evaluation.images import is_digits

    model = describe_run(request)
    if model.family != "consistency":
        raise SampleError(
            f"--tau_search is for consistency models; {request.workdir} is an "
            f"{model.config.method} run."
        )
    path = os.path.join(request.out, "tau_search.json")
    if os.path.exists(path) and not request.overwrite:
        raise SampleError(f"{path} exists; use --overwrite or another --out.")
    data_dir = model.config.data.data_dir or None
    if is_digits(model.config.data.name):
        from consistency_jax.metrics import digits as digits_lib

        digits_lib.get_digits_extractor(model.example_shape[0], data_dir)
        metric_name = "digits_fd"
        metric = lambda x: digits_lib.digits_fd(x, data_dir=data_dir)
    elif request.inception_weights and request.ref:
        from consistency_jax.evaluation import inception_metrics as inception_eval

        metrics = inception_eval.InceptionMetrics(request.inception_weights)
        if request.ref.endswith(".npz"):
            mu, sigma, _, _ = inception_eval.read_reference(request.ref, metrics)
        else:
            mu, sigma, _, _ = inception_eval.reference_statistics(
                request.ref, data_dir=request.data_dir or None, metrics=metrics
            )
        ref_stats = (mu, sigma)
        metric_name = "fid"
        metric = lambda x: metrics.score(
            metrics.statistics(np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8))[0],
            ref_stats,
        )["fid"]
    else:
        raise SampleError(
            "--tau_search scores samples by digits-FD (digits runs) or by FID: give "
            "--inception_weights=FILE and --ref=TFDS_NAME|stats.npz."
        )
    grid = search_grid(request, model)
    _, params, step = loading.load_eval_params(request.workdir, request.ema_rate, step=model.step)
    apply_fn = networks.make_apply_fn(networks.from_config(model.config.model))
    score = tau_search.make_scorer(
        apply_fn,
        params,
        model.sigmas,
        model.example_shape,
        request.num_samples,
        metric,
        seed=request.seed,
        num_classes=model.num_classes,
        clip=request.clip or None,
        consistency_fn=model.consistency_fn,
        batch=min(500, request.num_samples),
    )
    start = time.time()
    result = tau_search.greedy_search(
        score, grid, request.search_steps, method=request.search, stride=request.search_stride
    )
    result.update(
        metric=metric_name,
        workdir=fs.resolve(request.workdir),
        step=step,
        method=model.config.method,
        num_samples=request.num_samples,
        seed=request.seed,
        grid_size=len(grid),
        one_step_score=score((float(grid[0]),)),
        seconds=round(time.time() - start, 1),
        devices=jax.local_device_count(),
    )
    os.makedirs(request.out, exist_ok=True)
    export.write_json_atomic(path, result)
    return {k: result[k] for k in ("indices", "times", "score", "one_step_score", "metric")} | {
        "json": path,
        "evaluations": len(result["evaluations"]),
    }


def _shard_size(request: SampleRequest, shard: int) -> int:
    lo = shard * request.examples_per_shard
    return min(request.examples_per_shard, request.num_samples - lo)


def _progress(total: int, disable: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, unit="img", disable=disable, file=sys.stderr, smoothing=0.1, desc="sampling"
    )


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
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


def _define_flags():
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
    from absl import app

    from consistency_jax import checkpoint, export
    from consistency_jax.distributed import maybe_initialize

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        request = request_from_flags(_FLAGS)
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


if __name__ == "__main__":
    from absl import app as _app

    _FLAGS = _define_flags()
    _app.run(main)
