"""What to generate (``SampleRequest``, the command's flags, checked) and the run it is generated from
(``describe_run``): every refusal is a ``SampleError`` raised before anything is compiled or written.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

EDITS = ("inpaint", "colorize", "superres", "sdedit", "denoise", "interpolate")
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
class SampledRun:
    """A run read for sampling: its config, how to sample it, and the parameters' step."""

    config: Any
    family: str
    consistency_fn: Any
    sigmas: Any
    example_shape: tuple[int, ...]
    num_classes: int | None
    step: int


def describe_run(request: SampleRequest) -> SampledRun:
    """Reads the run's config and checkpoint metadata (no arrays) and checks that it can be
    sampled as requested.

    Raises:
      SampleError: not an image run, a sampler the method family has no use for, times or labels
        that do not fit the run.
      checkpoint.CheckpointError: no readable checkpoint / EMA.
    """
    from consistency_jax import loading, methods
    from consistency_jax import parameterization as param_lib
    from consistency_jax.toy import TOY_DATASETS

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
    model = SampledRun(
        config, family, spec.consistency_fn, sigmas, (size, size, channels), num_classes, int(step)
    )
    sample_times(request, model)  # checks the times now
    return model


def sample_times(request: SampleRequest, model: SampledRun) -> tuple[float, ...]:
    """The times of a consistency sampler: (T,) for one step, else --ts or the grid of --ts_indices.

    Raises:
      SampleError: times not strictly decreasing or outside [σ_min, σ_max], indices off the grid.
    """
    from consistency_jax import samplers

    if model.family != "consistency":
        return ()
    sigmas = model.sigmas
    try:
        if request.ts_indices:
            num_scales = request.num_scales
            if not num_scales:
                from consistency_jax import methods

                num_scales = methods.get(model.config.method).grid_size(model.config)
                if not num_scales:
                    raise SampleError(
                        f"method={model.config.method!r} has no discrete grid; give "
                        "--num_scales with --ts_indices, or the times as --ts."
                    )
            return samplers.times_from_indices(request.ts_indices, int(num_scales), sigmas)
        if request.ts:
            return samplers.check_times(request.ts, sigmas)
    except ValueError as e:
        if isinstance(e, SampleError):
            raise
        raise SampleError(f"Sampling times: {e}") from None
    return (sigmas.sigma_max,)
