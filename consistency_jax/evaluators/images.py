"""Evaluation of image models during training: sample grids; on the digits, digits-FD; with the FID
Inception weights (``config.eval.inception_weights``), FID / IS (and KID, precision/recall) too.

For every evaluation the model generates ``config.eval.num_samples`` images from the eval EMA (1-step and
2-step for consistency models, EDM Heun for teachers). On ``sklearn_digits`` it reports the Fréchet
distance to the held-out digits in the features of a fixed classifier (digits-FD, ``evaluators.digits``)
and the classifier's confident fraction and class entropy (a mode-collapse detector).
"""

from __future__ import annotations

import io
import os

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from consistency_jax import fs
from consistency_jax import parameterization as param_lib
from consistency_jax.evaluators.samples import SampleGenerator


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 pixels."""
    return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, ncols: int = 8, scale: int = 1, pad: int = 1) -> Image.Image:
    """Tiles (N, H, W, C) images in [-1, 1] into one PIL image, nearest-neighbour upscaled."""
    x = to_uint8(images)
    n, h, w, c = x.shape
    nrows = -(-n // ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        grid[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + col * (w + pad) : pad + col * (w + pad) + w,
        ] = x[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid, mode="L" if c == 1 else "RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def is_digits(name: str) -> bool:
    return name.split("/")[0] == "sklearn_digits"


class ImageEvaluator:
    """Generates samples and computes the figures of one evaluation (see the module docstring)."""

    def __init__(
        self,
        config,
        family: str,
        sigmas,
        example_shape,
        consistency_fn=param_lib.consistency_fn,
        grid_size: int | None = None,
    ):
        self.config = config
        self.shape = (int(config.eval.num_samples),) + tuple(example_shape)
        self.num_classes = (
            config.model.kwargs.get("num_classes") if config.data.use_labels else None
        )
        self.digits = is_digits(config.data.name)
        self.generate = SampleGenerator(
            family,
            sigmas,
            config,
            self.shape,
            labels=self.labels(),
            consistency_fn=consistency_fn,
            grid_size=grid_size,
        )
        if self.digits:
            from consistency_jax.evaluators import digits as digits_lib

            self.digits_lib = digits_lib
            # Train (or load) the fixed feature extractor now, before the first training step.
            digits_lib.get_digits_extractor(example_shape[0], config.data.data_dir or None)
        self.inception = None
        if config.eval.get("inception_weights"):
            self._init_inception(config)

    def _init_inception(self, config) -> None:
        """The FID Inception and the reference statistics, before the first training step (a bad
        weight file or reference fails now, not after hours of training)."""
        from consistency_jax.evaluators import inception_metrics as inception_eval

        self.inception = inception_eval.InceptionMetrics(
            config.eval.inception_weights, batch_size=min(200, self.shape[0])
        )
        self.fid_metrics = tuple(config.eval.fid_metrics)
        need_features = bool(set(self.fid_metrics) & {"kid", "pr"})
        if config.eval.fid_reference:
            mu, sigma, _, features = inception_eval.read_reference(
                config.eval.fid_reference, self.inception, keep_features=need_features
            )
        else:
            mu, sigma, _, features = inception_eval.reference_statistics(
                config.data.name,
                "train",
                config.data.data_dir or None,
                metrics=self.inception,
                keep_features=need_features,
            )
        self.fid_reference = ((mu, sigma), features)

    def labels(self):
        if not self.num_classes:
            return None
        return jnp.arange(self.shape[0], dtype=jnp.int32) % self.num_classes

    def __call__(self, apply_fn, params, rng) -> tuple[dict, dict]:
        samples = self.generate(apply_fn, params, rng)
        figures: dict[str, float] = {}
        for name, x in samples.items():
            if not np.isfinite(x).all():
                figures[f"nonfinite_{name}"] = float(np.mean(~np.isfinite(x)))
                continue
            if self.digits:
                data_dir = self.config.data.data_dir or None
                figures[f"digits_fd_{name}"] = self.digits_lib.digits_fd(x, data_dir=data_dir)
                stats = self.digits_lib.digits_classifier_stats(x, data_dir=data_dir)
                figures[f"confident_{name}"] = float(stats["confident_fraction"])
                figures[f"class_entropy_{name}"] = float(stats["normalized_class_entropy"])
            if self.inception is not None:
                figures.update(self.inception_figures(x, name))
        return figures, samples

    def inception_figures(self, x: np.ndarray, name: str) -> dict[str, float]:
        """FID / IS / KID / precision-recall of samples in [−1, 1] (quantised to uint8 first, as the
        papers' evaluations do), named ``fid_1step`` etc. With eval.num_samples ≪ 50 000 these are
        biased upwards and comparable only between runs at equal sample counts."""
        from consistency_jax.evaluators.inception_metrics import InceptionMetrics

        _, outputs = self.inception.statistics(to_uint8(x), keep=True)
        (mu, sigma), ref_features = self.fid_reference
        got = InceptionMetrics.score(
            outputs,
            (mu, sigma),
            ref_features=ref_features,
            metrics=self.fid_metrics,
            kid_subset_size=min(1000, len(x), len(ref_features))
            if ref_features is not None
            else 1000,
        )
        return {f"{k}_{name}": float(v) for k, v in got.items()}

    def plot(self, samples: dict, path: str, title: str) -> None:
        """One PNG with a 8×8 grid per sample set, side by side, captioned."""
        scale = max(1, 96 // self.shape[1])
        grids = [(name, image_grid(x[:64], 8, scale)) for name, x in samples.items()]
        width = sum(g.width for _, g in grids) + 10 * (len(grids) + 1)
        height = max(g.height for _, g in grids) + 40
        canvas = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(canvas)
        draw.text((10, 4), title, fill="black")
        x0 = 10
        for name, g in grids:
            draw.text((x0, 20), name, fill="black")
            canvas.paste(g.convert("RGB"), (x0, 36))
            x0 += g.width + 10
        if not fs.is_url(path):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        buf = io.BytesIO()
        canvas.save(buf, format="PNG")
        fs.write_bytes(path, buf.getvalue())  # a local path or gs://
