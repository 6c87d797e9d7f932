"""Per-example and per-batch preprocessing: centre crop and resize, stored pixels to [-1, 1], and the
horizontal flips (drawn per batch from ``(seed, process_index, step)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from consistency_jax.data.spec import ImageDataConfig

# Its own stream tag, so that the flips never share random bits with the shuffle (``iterator``).
_FLIP_STREAM = 0xF11B


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Centre crop to a square and resize to ``size`` (box halving, then bicubic; as ADM's loader)."""
    from PIL import Image  # pylint: disable=g-import-not-at-top

    if image.dtype != np.uint8:
        raise ValueError(f"Resizing is supported for uint8 images only, got {image.dtype}.")
    squeeze = image.shape[2] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(s // 2 for s in pil.size), resample=Image.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(max(size, round(s * scale)) for s in pil.size), resample=Image.BICUBIC)
    arr = np.asarray(pil)
    if squeeze:
        arr = arr[..., None]
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def prepare_example(example: Mapping[str, Any], cfg: ImageDataConfig) -> dict[str, np.ndarray]:
    """One decoded TFDS example -> {"image": (S, S, C) stored dtype, "label": int32 ()}."""
    image = np.asarray(example["image"])
    if image.ndim != 3:
        raise ValueError(
            f"Decoded image of {cfg.name!r} has shape {image.shape}; expected (H, W, C)."
        )
    if image.shape[:2] != (cfg.image_size, cfg.image_size):
        image = center_crop_resize(image, cfg.image_size)
    out = {"image": image}
    if cfg.use_labels:
        out["label"] = np.asarray(example["label"], dtype=np.int32)
    return out


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """Stored pixels -> float32 in [-1, 1] (integers by their dtype's range, floats from [0, 1])."""
    if image.dtype == np.bool_ or not np.issubdtype(image.dtype, np.number):
        raise ValueError(f"Images must have a numeric dtype, got {image.dtype}.")
    if np.issubdtype(image.dtype, np.integer):
        top = float(np.iinfo(image.dtype).max)
        return (image.astype(np.float32) * np.float32(2.0 / top) - 1.0).astype(np.float32)
    return (image.astype(np.float32) * 2.0 - 1.0).astype(np.float32)


def flip_mask(seed: int, process_index: int, step: int, rows: int) -> np.ndarray:
    """Boolean (rows,) mask of horizontal flips, a pure function of (seed, process, step)."""
    rng = np.random.default_rng(np.random.SeedSequence([_FLIP_STREAM, seed, process_index, step]))
    return rng.random(rows) < 0.5
