"""Image resampling for the denoisers: FIR up-/down-sampling (StyleGAN2's ``upfirdn2d`` and its fused
up-/down-sampling convolutions, as NCSN++ uses them: score_sde App. H.1, item 1, kernel [1, 3, 3, 1])
and the plain nearest-neighbour / average-pooling resampling of DDPM++ without FIR and of the ADM UNet.

Written here because no maintained JAX library provides upfirdn2d with StyleGAN2's exact padding
(``jax.image.resize`` and dm-pix resize with their own kernels and alignments). Separable kernels run
as sums of strided slices (``_upfirdn1d``), which XLA fuses forward and backward; 2-D kernels as a
depthwise convolution. Pure functions of arrays: ``layers.FIRConv2d`` holds the parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = [
    "conv_downsample_2d",
    "downsample_2d",
    "naive_downsample_2d",
    "naive_upsample_2d",
    "setup_fir_kernel",
    "upfirdn2d",
    "upsample_2d",
    "upsample_conv_2d",
]


def setup_fir_kernel(k: Sequence[float] | np.ndarray) -> np.ndarray:
    """Normalised 2-D FIR kernel: a 1-D kernel becomes its outer product; the sum is 1.

    Args:
      k: a 1-D (separable) or square 2-D kernel, e.g. [1, 3, 3, 1].

    Returns:
      A float32 (K, K) array summing to 1.
    """
    k = _checked_fir_kernel(k)
    if k.ndim == 1:
        k = np.outer(k, k)
    return (k / k.sum()).astype(np.float32)


def _checked_fir_kernel(k: Sequence[float] | np.ndarray) -> np.ndarray:
    """``k`` as float64 after checking it is a non-empty 1-D or square 2-D kernel with a non-zero
    sum (for a 1-D kernel the sum of its outer product is the square of its own sum)."""
    k = np.asarray(k, dtype=np.float64)
    if k.ndim not in (1, 2) or k.shape[0] < 1 or (k.ndim == 2 and k.shape[0] != k.shape[1]):
        raise ValueError(f"FIR kernel must be 1-D or square 2-D; got shape {k.shape}.")
    if k.sum() == 0:
        raise ValueError("FIR kernel sums to zero and cannot be normalised.")
    return k


def _fir_taps(k: Sequence[float] | np.ndarray, scale: float = 1.0) -> np.ndarray:
    """FIR taps for ``upfirdn2d``: a 1-D kernel stays 1-D (separable), normalised so that its outer
    product sums to ``scale``; a 2-D kernel goes through ``setup_fir_kernel`` times ``scale``."""
    k = _checked_fir_kernel(k)
    if k.ndim != 1:
        return setup_fir_kernel(k) * np.float32(scale)
    return (k / k.sum() * math.sqrt(scale)).astype(np.float32)


def _upfirdn1d(
    x: Array, taps: np.ndarray, up: int, down: int, pad: tuple[int, int], axis: int
) -> Array:
    """``upfirdn2d`` along one spatial axis with a 1-D kernel, as a sum of strided slices.

    Output j is Σ_m taps[K−1−m]·u[j·down + m], u the zero-upsampled, padded input along ``axis``
    (a true convolution, valid part). Written with slices rather than a convolution because
    depthwise and zero-inserted convolutions are slow in XLA (CPU and GPU alike): the slices fuse
    into one elementwise loop, and so do their transposes (pads) in the backward pass.
    """
    p0, p1 = pad
    spatial = (p0, p1 + up - 1, up - 1)
    cfg = [(0, 0, 0)] * x.ndim
    cfg[axis] = spatial
    u = jax.lax.pad(x, jnp.zeros((), x.dtype), cfg)
    size = taps.shape[0]
    n_out = (u.shape[axis] - size) // down + 1
    if n_out < 1:
        raise ValueError(
            f"upfirdn2d: the padded length {u.shape[axis]} is shorter than the kernel "
            f"({size} taps)."
        )
    flipped = taps[::-1]
    out = None
    for m in range(size):
        if flipped[m] == 0.0:
            continue
        part = jax.lax.slice_in_dim(u, m, m + (n_out - 1) * down + 1, stride=down, axis=axis)
        part = part * float(flipped[m])  # a weakly typed Python float keeps x's dtype
        out = part if out is None else out + part
    if out is None:
        out = jnp.zeros_like(
            jax.lax.slice_in_dim(u, 0, (n_out - 1) * down + 1, stride=down, axis=axis)
        )
    return out


def upfirdn2d(
    x: Array, kernel: np.ndarray | Array, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)
) -> Array:
    """Upsample, pad, FIR-filter and downsample a batch of images (NHWC), channel by channel.

    The same sequence as StyleGAN2's ``upfirdn_2d`` (and ``scipy.signal.upfirdn`` per axis):
    1. insert ``up − 1`` zeros after every pixel (H -> H·up);
    2. pad ``pad[0]`` zeros before and ``pad[1]`` after on both spatial axes (negative crops);
    3. convolve (true convolution) with ``kernel`` keeping only fully-overlapping outputs;
    4. keep every ``down``-th pixel.

    A 1-D ``kernel`` k means the separable 2-D kernel outer(k, k) and is applied along H, then W, as
    sums of strided slices (fast in XLA's forward and backward passes); a 2-D kernel is applied as a
    depthwise convolution. Both compute the same values (up to float rounding).

    Args:
      x: (B, H, W, C).
      kernel: (K,) separable or (K, K) filter, already normalised / scaled (not flipped).
      up: integer upsampling factor.
      down: integer downsampling factor.
      pad: (before, after) padding.

    Returns:
      (B, (H·up + pad0 + pad1 − K) // down + 1, ..., C), in x's dtype.
    """
    if up < 1 or down < 1:
        raise ValueError(f"up and down must be >= 1; got up={up}, down={down}.")
    if np.ndim(kernel) == 1:
        taps = np.asarray(kernel, np.float32)
        for axis in (1, 2):
            x = _upfirdn1d(x, taps, up, down, pad, axis)
        return x
    kernel = jnp.asarray(kernel, dtype=x.dtype)
    channels = x.shape[-1]
    p0, p1 = pad
    # Zero insertion (interior padding) and edge padding in one op; the extra up − 1 at the end makes
    # the upsampled length H·up as in StyleGAN2. Negative edge padding crops.
    spatial = (p0, p1 + up - 1, up - 1)
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), spatial, spatial, (0, 0, 0)))
    # lax convolutions are cross-correlations: flip the kernel for a true convolution.
    w = jnp.tile(kernel[::-1, ::-1, None, None], (1, 1, 1, channels))
    return jax.lax.conv_general_dilated(
        x,
        w,
        window_strides=(down, down),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels,
    )


def upsample_2d(
    x: Array, k: Sequence[float] = (1, 3, 3, 1), factor: int = 2, gain: float = 1.0
) -> Array:
    """FIR upsampling by ``factor`` (StyleGAN2 ``upsample_2d``): (B, H, W, C) -> (B, fH, fW, C).

    Args:
      x: images (B, H, W, C).
      k: FIR kernel (normalised so that a constant image keeps its value times ``gain``).
      factor: integer factor.
      gain: signal gain.

    Returns:
      The upsampled images.
    """
    kernel = _fir_taps(k, gain * factor**2)
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(
    x: Array, k: Sequence[float] = (1, 3, 3, 1), factor: int = 2, gain: float = 1.0
) -> Array:
    """FIR downsampling by ``factor`` (StyleGAN2 ``downsample_2d``): (B, H, W, C) -> (B, H/f, W/f, C).

    Args:
      x: images (B, H, W, C).
      k: FIR kernel.
      factor: integer factor.
      gain: signal gain.

    Returns:
      The downsampled images.
    """
    kernel = _fir_taps(k, gain)
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(
    x: Array, w: Array, k: Sequence[float] = (1, 3, 3, 1), factor: int = 2
) -> Array:
    """Fused "upsample then 3×3 convolution" (StyleGAN2 ``upsample_conv_2d``).

    A stride-``factor`` transposed convolution with ``w`` followed by the FIR filter, padded once.

    Args:
      x: (B, H, W, Cin).
      w: (kh, kw, Cin, Cout) convolution weight, kh == kw odd.
      k: FIR kernel.
      factor: integer factor.

    Returns:
      (B, factor·H, factor·W, Cout).
    """
    kh, kw = w.shape[:2]
    if kh != kw:
        raise ValueError(f"Convolution kernel must be square; got {w.shape[:2]}.")
    # Transposed convolution = correlation of the zero-dilated input, fully padded.
    x = jax.lax.conv_general_dilated(
        x,
        w.astype(x.dtype),
        window_strides=(1, 1),
        padding=((kh - 1, kh - 1), (kw - 1, kw - 1)),
        lhs_dilation=(factor, factor),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    kernel = _fir_taps(k, factor**2)
    p = (kernel.shape[0] - factor) - (kw - 1)
    return upfirdn2d(x, kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(
    x: Array, w: Array, k: Sequence[float] = (1, 3, 3, 1), factor: int = 2
) -> Array:
    """Fused "3×3 convolution then downsample" (StyleGAN2 ``conv_downsample_2d``).

    The FIR filter (padded once) followed by a stride-``factor`` valid convolution with ``w``.

    Args:
      x: (B, H, W, Cin).
      w: (kh, kw, Cin, Cout) convolution weight.
      k: FIR kernel.
      factor: integer factor.

    Returns:
      (B, H/factor, W/factor, Cout).
    """
    kw = w.shape[1]
    kernel = _fir_taps(k)
    p = (kernel.shape[0] - factor) + (kw - 1)
    x = upfirdn2d(x, kernel, pad=((p + 1) // 2, p // 2))
    return jax.lax.conv_general_dilated(
        x,
        w.astype(x.dtype),
        window_strides=(factor, factor),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def naive_upsample_2d(x: Array, factor: int = 2) -> Array:
    """Nearest-neighbour upsampling (B, H, W, C) -> (B, fH, fW, C)."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def naive_downsample_2d(x: Array, factor: int = 2) -> Array:
    """Average pooling over factor×factor blocks (B, H, W, C) -> (B, H/f, W/f, C)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
