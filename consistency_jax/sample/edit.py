"""The editing mode (``--edit``): zero-shot editing of given images, or interpolation, with a run (CM
Algorithm 4; ``consistency_jax.editing``)."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from consistency_jax import fs
from consistency_jax.sample.request import (
    SampledRun,
    SampleError,
    SampleRequest,
    describe_run,
    sample_times,
)


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


def _edit_times(request: SampleRequest, model: SampledRun) -> tuple[float, ...]:
    """--ts/--ts_indices, else four steps of the Karras grid from T (from --edit_sigma for sdedit)."""
    from consistency_jax import samplers, schedules

    if request.ts or request.ts_indices:
        return sample_times(request, model)
    grid = np.asarray(schedules.karras_sigmas(5, model.sigmas), np.float64)[::-1][:-1]
    if request.edit == "sdedit":
        grid = np.concatenate([[request.edit_sigma], grid[grid < request.edit_sigma]])
    return samplers.check_times(tuple(float(t) for t in grid), model.sigmas)


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

    from consistency_jax import editing, export, loading, methods, networks
    from consistency_jax import parameterization as param_lib
    from consistency_jax.evaluators.images import image_grid

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
    _, params, step = loading.load_model_params(request.workdir, request.ema_rate, step=model.step)
    apply_fn = networks.make_apply_fn(methods.network(model.config))
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
