"""The FID Inception-v3 network in Flax: 2048-d pool features and 1008-way logits.

This is the network of the TensorFlow graph ``classify_image_graph_def.pb`` of 2015-12-05 (Szegedy
et al. 2016, "Rethinking the Inception Architecture for Computer Vision"), the one with which
Heusel et al. 2017 defined the FID, Salimans et al. 2016 the Inception Score, Bińkowski et al. 2018
the KID, and on which the consistency-model papers report their numbers. It differs from the
Inception-v3 of the Keras/torchvision model zoos in its weights, in 1008 output classes, and in three
details of its blocks, all kept here:

* the 3x3 average pools inside the Mixed_5*, Mixed_6b-e and Mixed_7b-c blocks divide by the number
  of *valid* (unpadded) inputs (TF's ``avg_pool`` with SAME padding);
* the pool branch of the last block (Mixed_7c) is a 3x3 *max* pool with stride 1;
* batch normalisation has ε = 0.001.

Input conventions (what makes numbers comparable with the papers):

1. images are uint8 (N, H, W, C), C = 3 or 1 (grey repeated to RGB): quantise generated samples to
   uint8 first (``evaluation.images.to_uint8``);
2. resized to 299x299 bilinearly *as TensorFlow 1 does* (``tf.image.resize_bilinear`` with
   ``align_corners=False``): output pixel k samples the input at k · (in/out), with no half-pixel
   shift, the scale rounded to float32 as TF computes it. This is not ``jax.image.resize`` (nor
   torch's ``F.interpolate``), which sample at (k + ½) · in/out − ½; the two differ by up to a
   pixel, which changes FIDs noticeably. An image already 299x299 is left as it is;
3. scaled by (x − 128) / 128.

Outputs: ``pool`` (N, 2048), the spatial mean of the last block (TF's ``pool_3``), used by FID,
KID and precision/recall; ``logits`` (N, 1008) = pool · Wᵀ *without* the bias of the final layer,
the tensor that the Inception-Score code of Salimans et al. (and torch-fidelity's
``logits_unbiased``, and the TF evaluator of the ADM/CM papers) feeds to its softmax. The bias is
loaded too (``variables["params"]["fc"]["bias"]``): ``logits + bias`` is the full layer.

Weights. ``load_inception_params`` reads pytorch-fid's published conversion of the TF graph,
``pt_inception-2015-12-05-6726825d.pth`` (see ``PT_INCEPTION_URL``), with ``torch_pickle`` (no
PyTorch), or a ``.safetensors`` copy of it (``tools/convert_inception_weights.py``). The file
keeps PyTorch's names and layouts (``Mixed_5b.branch1x1.conv.weight`` (out, in, kh, kw),
``….bn.{weight,bias,running_mean,running_var}``, ``fc.weight`` (1008, 2048), ``fc.bias``). Where no
path is passed, the environment variable ``INCEPTION_WEIGHTS`` names the file, else the ``.pth`` is
fetched once into the cache and its SHA-256 checked (``consistency_jax.weights_cache``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "CPU_COMPILER_OPTIONS",
    "CompiledOnDevices",
    "INCEPTION_WEIGHTS_ENV",
    "InceptionFeatureExtractor",
    "InceptionOutput",
    "InceptionV3",
    "PT_INCEPTION_URL",
    "inception_outputs",
    "inception_tensor_shapes",
    "load_inception_params",
    "preprocess",
    "tf1_bilinear_matrix",
]

INCEPTION_WEIGHTS_ENV = "INCEPTION_WEIGHTS"
PT_INCEPTION_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
INPUT_SIZE = 299
POOL_DIM = 2048
NUM_CLASSES = 1008
_BN_EPS = 1e-3
INCEPTION_FORMAT = "fid-inception-v3-2015-12-05"
_BATCH_AXIS = "batch"

Variables = Mapping[str, Any]


class InceptionOutput(NamedTuple):
    """What the network returns: pool_3 features (N, 2048) and bias-free logits (N, 1008)."""

    pool: jax.Array
    logits: jax.Array


# --------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------


class _KernelParam(nn.Module):
    """A convolution's kernel (kh, kw, in, out), no bias: the parameter ``nn.Conv`` would hold."""

    features: int
    kernel: tuple[int, int]

    @nn.compact
    def __call__(self, in_features: int) -> jax.Array:
        shape = (*self.kernel, in_features, self.features)
        return self.param("kernel", nn.initializers.lecun_normal(), shape)


class _BatchNormParams(nn.Module):
    """BatchNorm's variables at inference (as ``nn.BatchNorm`` holds them: params ``scale``,
    ``bias``; batch_stats ``mean``, ``var``), returned as the affine map y = x·a + b it applies:
    a = scale / √(var + ε), b = bias − mean·a, ε = 0.001."""

    features: int

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        f = self.features
        scale = self.param("scale", nn.initializers.ones, (f,))
        bias = self.param("bias", nn.initializers.zeros, (f,))
        mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((f,), jnp.float32)).value
        var = self.variable("batch_stats", "var", lambda: jnp.ones((f,), jnp.float32)).value
        a = scale * jax.lax.rsqrt(var + _BN_EPS)
        return a, bias - mean * a


class _Conv(nn.Module):
    """Conv (no bias) + BatchNorm (running statistics, ε = 0.001) + ReLU: TF's conv blocks.

    The normalisation is folded into the convolution (kernel·a, then + b: ``folded``), which a Mixed
    block also uses to run the 1x1 convolutions that read one input as one (``_pointwise_branches``).
    Every convolution is a plain ``conv_general_dilated``, except with ``cpu_forms`` (see
    ``InceptionV3``).
    """

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: Any = "highest"
    cpu_forms: bool = False

    def setup(self):
        self.conv = _KernelParam(self.features, self.kernel)
        self.bn = _BatchNormParams(self.features)

    def folded(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        """(kernel · a, b): the convolution with the normalisation's scale, and its shift."""
        a, b = self.bn()
        return self.conv(in_features) * a, b

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, shift = self.folded(x.shape[-1])
        ph, pw = self.padding
        y = _convolve(x, kernel, self.stride, ((ph, ph), (pw, pw)), self.precision, self.cpu_forms)
        return nn.relu(y + shift)


def _convolve(x, kernel, stride, padding, precision, cpu_forms=False):
    """``conv_general_dilated`` (NHWC, HWIO); with ``cpu_forms``, a 1x1 convolution as a matmul
    over the channels and an unpadded one as a padded one cut back to the same outputs."""
    kh, kw = kernel.shape[:2]
    if cpu_forms and (kh, kw) == (1, 1) and stride == 1:
        n, h, w, c = x.shape
        y = jnp.dot(x.reshape(n * h * w, c), kernel[0, 0], precision=precision)
        return y.reshape(n, h, w, -1)
    crop = None
    if cpu_forms and padding == ((0, 0), (0, 0)):
        padding, crop = _padded_valid(x.shape[1:3], (kh, kw), stride)
    y = jax.lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision,
    )
    if crop is not None:
        (h0, h1), (w0, w1) = crop
        y = y[:, h0:h1, w0:w1]
    return y


def _padded_valid(size, kernel, stride):
    """(padding, crop) computing an unpadded ("VALID") convolution as a padded one cut back to the
    same outputs, bit for bit. Stride 1: pad k//2 on each side, drop the k//2 border outputs;
    stride s > 1: pad s − 1 after the end only (the sampled positions stay), keep the first
    (size − k) // s + 1 outputs."""
    padding, crop = [], []
    for n, k in zip(size, kernel):
        out = (n - k) // stride + 1
        if stride == 1 and k % 2 == 1:
            padding.append((k // 2, k // 2))
            crop.append((k // 2, k // 2 + out))
        else:
            padding.append((0, stride - 1))
            crop.append((0, out))
    return tuple(padding), tuple(crop)


def _pointwise_branches(
    x: jax.Array, convs: list[_Conv], pooled: _Conv | None = None
) -> list[jax.Array]:
    """The 1x1 conv blocks of a Mixed block that read the same input ``x``, as one convolution.

    Returns each block's output, in order, then (if ``pooled`` is given) the output of the pool
    branch ``pooled(avg_pool(x))``, computed as relu(avg_pool(x·W) + b): the average pool and the
    1x1 convolution are both linear and commute, and pooling the convolution's fewer channels is
    cheaper. One (in, Σ out) 1x1 convolution instead of three to four reads ``x`` once and runs a
    wider product (bench/RESULTS.md §15). Precision and forms: the blocks' (one Mixed block's, alike).
    """
    blocks = list(convs) + ([pooled] if pooled is not None else [])
    folded = [block.folded(x.shape[-1]) for block in blocks]
    kernel = jnp.concatenate([k for k, _ in folded], axis=-1)
    y = _convolve(x, kernel, 1, ((0, 0), (0, 0)), blocks[0].precision, blocks[0].cpu_forms)
    bounds = np.cumsum([block.features for block in blocks])[:-1]
    parts = jnp.split(y, bounds, axis=-1)
    outs = [nn.relu(part + shift) for part, (_, shift) in zip(parts[: len(convs)], folded)]
    if pooled is not None:
        outs.append(nn.relu(_avg_pool_valid_count(parts[-1]) + folded[-1][1]))
    return outs


def _avg_pool_valid_count(x: jax.Array) -> jax.Array:
    """3x3 average pool, stride 1, padding 1, averaging only the unpadded inputs (TF SAME): sums of
    three along rows, then along columns, divided by the number of valid inputs (2 or 3 per axis;
    XLA:CPU's windowed reduction is several times slower)."""
    h, w = x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = xp[:, :-2] + xp[:, 1:-1] + xp[:, 2:]
    total = rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]

    def counts(n: int) -> np.ndarray:
        c = np.full(n, 3.0, np.float32)
        c[0] -= 1
        c[-1] -= 1
        return c

    inv = 1.0 / (counts(h)[:, None] * counts(w)[None, :])
    return total * jnp.asarray(inv, x.dtype)[None, :, :, None]


def _max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
    """3x3 max pool, unpadded (stride 2) or padded by one (stride 1; padding never wins a max of
    real inputs), as a max of three strided slices along rows, then along columns: the same values
    as a windowed max, which XLA:CPU runs 2-2.5x slower."""
    if stride == 1:
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    for axis in (1, 2):
        n = (x.shape[axis] - 3) // stride + 1
        taps = [
            jax.lax.slice_in_dim(x, i, i + stride * (n - 1) + 1, stride, axis) for i in range(3)
        ]
        x = jnp.maximum(jnp.maximum(taps[0], taps[1]), taps[2])
    return x


class _MixedA(nn.Module):
    """Mixed_5b/5c/5d (35x35): 1x1 | 1x1→5x5 | 1x1→3x3→3x3 | avgpool→1x1."""

    pool_features: int
    precision: Any = "highest"
    cpu_forms: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(_Conv, precision=self.precision, cpu_forms=self.cpu_forms)
        b1, b5, b3, bp = _pointwise_branches(
            x,
            [
                conv(64, (1, 1), name="branch1x1"),
                conv(48, (1, 1), name="branch5x5_1"),
                conv(64, (1, 1), name="branch3x3dbl_1"),
            ],
            conv(self.pool_features, (1, 1), name="branch_pool"),
        )
        b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class _MixedB(nn.Module):
    """Mixed_6a (35x35 → 17x17): 3x3/2 | 1x1→3x3→3x3/2 | maxpool/2."""

    precision: Any = "highest"
    cpu_forms: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(_Conv, precision=self.precision, cpu_forms=self.cpu_forms)
        b3 = conv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class _MixedC(nn.Module):
    """Mixed_6b-6e (17x17), factorised 7x7: 1x1 | 1x1→1x7→7x1 | 1x1→7x1→1x7→7x1→1x7 | avgpool→1x1."""

    channels_7x7: int
    precision: Any = "highest"
    cpu_forms: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(_Conv, precision=self.precision, cpu_forms=self.cpu_forms)
        c7 = self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1, b7, bd, bp = _pointwise_branches(
            x,
            [
                conv(192, (1, 1), name="branch1x1"),
                conv(c7, (1, 1), name="branch7x7_1"),
                conv(c7, (1, 1), name="branch7x7dbl_1"),
            ],
            conv(192, (1, 1), name="branch_pool"),
        )
        b7 = conv(c7, **row, name="branch7x7_2")(b7)
        b7 = conv(192, **col, name="branch7x7_3")(b7)
        bd = conv(c7, **col, name="branch7x7dbl_2")(bd)
        bd = conv(c7, **row, name="branch7x7dbl_3")(bd)
        bd = conv(c7, **col, name="branch7x7dbl_4")(bd)
        bd = conv(192, **row, name="branch7x7dbl_5")(bd)
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class _MixedD(nn.Module):
    """Mixed_7a (17x17 → 8x8): 1x1→3x3/2 | 1x1→1x7→7x1→3x3/2 | maxpool/2."""

    precision: Any = "highest"
    cpu_forms: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(_Conv, precision=self.precision, cpu_forms=self.cpu_forms)
        b3, b7 = _pointwise_branches(
            x,
            [conv(192, (1, 1), name="branch3x3_1"), conv(192, (1, 1), name="branch7x7x3_1")],
        )
        b3 = conv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class _MixedE(nn.Module):
    """Mixed_7b/7c (8x8), expanded filter bank: 1x1 | 1x1→(1x3, 3x1) | 1x1→3x3→(1x3, 3x1) | pool→1x1.

    ``max_pool``: Mixed_7c's pool branch is a 3x3 max pool (stride 1), Mixed_7b's an average pool.
    """

    max_pool: bool = False
    precision: Any = "highest"
    cpu_forms: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(_Conv, precision=self.precision, cpu_forms=self.cpu_forms)
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        pointwise = [
            conv(320, (1, 1), name="branch1x1"),
            conv(384, (1, 1), name="branch3x3_1"),
            conv(448, (1, 1), name="branch3x3dbl_1"),
        ]
        if self.max_pool:  # a max pool does not commute with the 1x1 convolution
            b1, b3, bd = _pointwise_branches(x, pointwise)
            pooled = _max_pool_3x3(x, 1)
            bp = conv(192, (1, 1), name="branch_pool")(pooled)
        else:
            b1, b3, bd, bp = _pointwise_branches(
                x, pointwise, conv(192, (1, 1), name="branch_pool")
            )
        b3 = jnp.concatenate(
            [conv(384, **row, name="branch3x3_2a")(b3), conv(384, **col, name="branch3x3_2b")(b3)],
            axis=-1,
        )
        bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                conv(384, **row, name="branch3x3dbl_3a")(bd),
                conv(384, **col, name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """The FID Inception-v3 on preprocessed input (see ``preprocess``).

    Attributes:
        precision: precision of the convolutions and the final matmul. "highest" (the default) is
            true float32 on every backend: GPUs' TF32 or TPUs' bf16 passes ("default") shift
            features by ~1e-3 relative, enough to move FIDs in the second decimal.
        cpu_forms: run 1x1 convolutions as matmuls over the channels and unpadded convolutions as
            padded ones cut back (same outputs): the forms XLA:CPU's default build runs faster
            (1x1: 3-6x; unpadded 3x3: 1.3-2.6x). With the extractor's XLA:CPU build
            (``CPU_COMPILER_OPTIONS``) the plain convolutions are the faster forms (bench/RESULTS.md
            §14, §15), and they are the native forms of GPU and TPU compilers (not measured here);
            ``InceptionFeatureExtractor`` picks per build.
    """

    precision: Any = "highest"
    cpu_forms: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> InceptionOutput:
        """Runs the network.

        Args:
            x: (N, 299, 299, 3) float32 images scaled by (x − 128) / 128.

        Returns:
            ``InceptionOutput(pool (N, 2048), logits (N, 1008) without the final bias)``.
        """
        p = self.precision
        conv = functools.partial(_Conv, precision=p, cpu_forms=self.cpu_forms)
        x = conv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)  # 149
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # 147
        x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x, 2)  # 73
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # 71
        x = _max_pool_3x3(x, 2)  # 35
        x = _MixedA(32, precision=p, cpu_forms=self.cpu_forms, name="Mixed_5b")(x)  # 256 channels
        x = _MixedA(64, precision=p, cpu_forms=self.cpu_forms, name="Mixed_5c")(x)  # 288
        x = _MixedA(64, precision=p, cpu_forms=self.cpu_forms, name="Mixed_5d")(x)  # 288
        x = _MixedB(precision=p, cpu_forms=self.cpu_forms, name="Mixed_6a")(x)  # 17x17x768
        x = _MixedC(128, precision=p, cpu_forms=self.cpu_forms, name="Mixed_6b")(x)
        x = _MixedC(160, precision=p, cpu_forms=self.cpu_forms, name="Mixed_6c")(x)
        x = _MixedC(160, precision=p, cpu_forms=self.cpu_forms, name="Mixed_6d")(x)
        x = _MixedC(192, precision=p, cpu_forms=self.cpu_forms, name="Mixed_6e")(x)
        x = _MixedD(precision=p, cpu_forms=self.cpu_forms, name="Mixed_7a")(x)  # 8x8x1280
        x = _MixedE(precision=p, cpu_forms=self.cpu_forms, name="Mixed_7b")(x)  # 8x8x2048
        x = _MixedE(max_pool=True, precision=p, cpu_forms=self.cpu_forms, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        fc = nn.Dense(NUM_CLASSES, precision=p, name="fc")
        full = fc(pool)
        # pool · Wᵀ: the full layer minus its bias (declared through the Dense above).
        logits = full - fc.variables["params"]["bias"]
        return InceptionOutput(pool=pool, logits=logits)


# --------------------------------------------------------------------------------------------------
# Input conventions
# --------------------------------------------------------------------------------------------------


def tf1_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The (out, in) matrix of TF1's ``resize_bilinear(align_corners=False)`` along one axis.

    Output index k samples the input at s = k · scale with scale = float32(in / out) (TF's legacy
    rule: no half-pixel centres), s₀ = ⌊s⌋, s₁ = min(s₀ + 1, in − 1), weights 1 − (s − s₀) and s − s₀.

    Args:
        in_size: input length.
        out_size: output length.

    Returns:
        float64 (out_size, in_size), rows summing to 1.
    """
    scale = float(np.float32(in_size / out_size))
    src = np.arange(out_size, dtype=np.float64) * scale
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    matrix = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lo), 1.0 - frac)
    np.add.at(matrix, (rows, hi), frac)
    return matrix


def _check_images(images: Any) -> tuple[int, ...]:
    shape = tuple(np.shape(images))
    dtype = np.dtype(images.dtype) if hasattr(images, "dtype") else np.asarray(images).dtype
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise ValueError(
            f"Inception expects uint8 images (N, H, W, 3) or (N, H, W, 1), got shape {shape}."
        )
    if dtype != np.uint8:
        raise ValueError(
            f"Inception expects uint8 images (quantise samples first, e.g. evaluation.images.to_uint8), "
            f"got dtype {dtype}."
        )
    return shape


def preprocess(images: jax.typing.ArrayLike, size: int = INPUT_SIZE) -> jax.Array:
    """uint8 (N, H, W, C) → float32 (N, size, size, 3): grey to RGB, TF1 bilinear resize, (x − 128)/128.

    Args:
        images: uint8 images, C = 1 or 3.
        size: the output side (299 for the network; other sizes for tests).

    Returns:
        float32 network input.
    """
    _check_images(images)
    x = jnp.asarray(images).astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    height, width = x.shape[1], x.shape[2]
    if (height, width) != (size, size):
        # Two small interpolation matrices (the resize is separable), exact in float32 products.
        rows = jnp.asarray(tf1_bilinear_matrix(height, size), jnp.float32)
        cols = jnp.asarray(tf1_bilinear_matrix(width, size), jnp.float32)
        hi = jax.lax.Precision.HIGHEST
        x = jnp.einsum("oh,nhwc->nowc", rows, x, precision=hi)
        x = jnp.einsum("pw,nowc->nopc", cols, x, precision=hi)
    return (x - 128.0) / 128.0


def inception_outputs(
    variables: Variables,
    images: jax.typing.ArrayLike,
    precision: Any = "highest",
    cpu_forms: bool = False,
) -> InceptionOutput:
    """Pool features and logits of uint8 images (``preprocess`` then ``InceptionV3``). Jittable.

    Args:
        variables: ``{"params": ..., "batch_stats": ...}`` from ``load_inception_params``.
        images: uint8 (N, H, W, C), C = 1 or 3, any H and W.
        precision, cpu_forms: see ``InceptionV3``.

    Returns:
        ``InceptionOutput(pool (N, 2048), logits (N, 1008))``, float32.
    """
    network = InceptionV3(precision=precision, cpu_forms=cpu_forms)
    return network.apply(variables, preprocess(images))


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def _abstract_variables() -> Any:
    return jax.eval_shape(
        InceptionV3().init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32),
    )


_FLAX_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _torch_name(path: tuple[str, ...]) -> str:
    collection, *modules, leaf = path
    return ".".join(modules + [_FLAX_TO_TORCH[(collection, leaf)]])


@functools.lru_cache(maxsize=1)
def _variable_paths() -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """{torch name: (Flax path, Flax shape)} of every variable of ``InceptionV3``."""
    out = {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(_abstract_variables()):
        path = tuple(k.key for k in key_path)
        out[_torch_name(path)] = (path, tuple(leaf.shape))
    return out


def _to_torch_shape(name: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(flax_shape) == 4:  # HWIO -> OIHW
        return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
    if len(flax_shape) == 2:  # Dense (in, out) -> Linear (out, in)
        return (flax_shape[1], flax_shape[0])
    return flax_shape


def inception_tensor_shapes() -> dict[str, tuple[int, ...]]:
    """Names and PyTorch shapes of the tensors an Inception weight file must hold.

    Returns:
        {name: shape}: ``{block}.conv.weight`` (out, in, kh, kw), ``{block}.bn.{weight, bias,
        running_mean, running_var}`` (out,), ``fc.weight`` (1008, 2048), ``fc.bias`` (1008,): the
        names of pytorch-fid's ``FIDInceptionA``… blocks (torchvision's Inception3 names), 472 in all.
    """
    return {name: _to_torch_shape(name, shape) for name, (_, shape) in _variable_paths().items()}


def variables_from_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """PyTorch-named tensors (already validated) → Flax ``{"params": ..., "batch_stats": ...}``."""
    variables: dict[str, Any] = {}
    for name, (path, _) in _variable_paths().items():
        array = np.asarray(tensors[name], np.float32)
        if array.ndim == 4:
            array = array.transpose(2, 3, 1, 0)
        elif array.ndim == 2:
            array = array.T
        node = variables
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(array)
    return variables


def build_inception_tensors(
    state: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, np.ndarray]:
    """Checks and selects the tensors of one Inception weight file.

    Args:
        state: the PyTorch state_dict as NumPy arrays.
        shapes: the required {name: shape} (default: ``inception_tensor_shapes()``).

    Returns:
        {name: float32 array} holding exactly the names of ``shapes``.

    Raises:
        ValueError: tensors missing, unexpected (other than ``*.num_batches_tracked``) or of another
            shape, all named.
    """
    shapes = inception_tensor_shapes() if shapes is None else shapes
    kept = {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")}
    missing = sorted(set(shapes) - set(kept))
    unexpected = sorted(set(kept) - set(shapes))
    wrong = sorted(
        f"{name!r} has shape {tuple(np.shape(kept[name]))}, expected {tuple(shapes[name])}"
        for name in set(shapes) & set(kept)
        if tuple(np.shape(kept[name])) != tuple(shapes[name])
    )
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    problems.extend(wrong)
    if problems:
        raise ValueError("Not the FID Inception-v3 state_dict: " + "; ".join(problems) + ".")
    return {name: np.ascontiguousarray(np.asarray(kept[name], np.float32)) for name in shapes}


def save_inception_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Writes ``tensors`` to ``path`` with metadata {"format": "fid-inception-v3-2015-12-05"}."""
    from safetensors.numpy import save_file

    save_file(dict(tensors), os.fspath(path), metadata={"format": INCEPTION_FORMAT})


def _missing_weights_message(origin: str) -> str:
    return (
        f"No Inception weights: {origin}. FID/IS/KID need the FID Inception-v3 of 2015-12-05: "
        f"pytorch-fid's pt_inception-2015-12-05-6726825d.pth ({PT_INCEPTION_URL}), which is "
        "fetched into the cache on first use when no path is given, or a .safetensors copy made by "
        "tools/convert_inception_weights.py; pass the file's path, or set "
        f"{INCEPTION_WEIGHTS_ENV}=/path/to/the/file."
    )


def resolve_weights_path(path: str | os.PathLike | None = None) -> str:
    """The weight file to use: ``path``, else ``$INCEPTION_WEIGHTS``, else pytorch-fid's file in the
    cache (``weights_cache.fetch``: downloaded and SHA-256-checked on first use); checked to exist.

    Raises:
        ValueError: the file given does not exist, or none is given and the cache has none that
            can be fetched (the message names the address, the cache path and the manual command).
    """
    from consistency_jax import weights_cache

    if path is None or os.fspath(path) == "":
        path = os.environ.get(INCEPTION_WEIGHTS_ENV, "")
        if not path:
            try:
                return weights_cache.fetch(weights_cache.PT_INCEPTION)
            except weights_cache.WeightsUnavailableError as e:
                raise ValueError(
                    _missing_weights_message(
                        f"no path given, ${INCEPTION_WEIGHTS_ENV} is not set, and {e}"
                    )
                ) from None
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(_missing_weights_message(f"the file {path!r} does not exist"))
    return path


def check_tensors(tensors: Mapping[str, np.ndarray], origin: str) -> None:
    """Raises ValueError naming every missing, unexpected, mis-shaped or non-float tensor."""
    expected = inception_tensor_shapes()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{name} {tuple(np.shape(tensors[name]))} (expected {expected[name]})"
        for name in sorted(set(expected) & set(tensors))
        if tuple(np.shape(tensors[name])) != expected[name]
    ]
    not_float = sorted(
        name
        for name in set(expected) & set(tensors)
        if not np.issubdtype(np.asarray(tensors[name]).dtype, np.floating)
    )
    if missing or unexpected or wrong or not_float:
        raise ValueError(
            f"{origin} is not the FID Inception-v3: missing tensors {missing[:10]}"
            f"{' …' if len(missing) > 10 else ''} ({len(missing)}), unexpected tensors {unexpected[:10]}"
            f"{' …' if len(unexpected) > 10 else ''} ({len(unexpected)}), wrong shapes {wrong[:10]}, "
            f"not floating point {not_float[:10]}."
        )


def load_inception_params(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Reads the FID Inception-v3 weights: pytorch-fid's ``.pth`` (read by ``torch_pickle``: no
    PyTorch, nothing unpickled but tensors) or a ``.safetensors`` copy.

    Args:
        path: the ``.pth`` or a file written by ``tools/convert_inception_weights.py``; None:
            ``$INCEPTION_WEIGHTS``, else pytorch-fid's file in the cache (fetched on first use).

    Returns:
        Flax variables ``{"params": ..., "batch_stats": ...}`` for ``InceptionV3``.

    Raises:
        ValueError: no file (the message says where it comes from), an unreadable file, or
            tensors missing, unexpected, mis-shaped or not floating point (named).
    """
    from safetensors import SafetensorError, safe_open

    path = resolve_weights_path(path)
    if not path.lower().endswith(".safetensors"):  # a torch.save file: pytorch-fid's .pth
        from consistency_jax import torch_pickle

        try:
            tensors = build_inception_tensors(torch_pickle.read_state_dict(path))
        except torch_pickle.TorchPickleError as err:
            raise ValueError(f"Inception weight file {path!r}: {err}") from None
        except ValueError as err:
            raise ValueError(f"Inception weight file {path!r}: {err}") from None
        check_tensors(tensors, f"Inception weight file {path!r}")
        return variables_from_tensors(tensors)
    try:
        with safe_open(path, framework="numpy") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"Inception weight file {path!r} is not a readable .safetensors file: {err}"
        ) from err
    check_tensors(tensors, f"Inception weight file {path!r}")
    return variables_from_tensors(tensors)


# --------------------------------------------------------------------------------------------------
# Batched, sharded extraction
# --------------------------------------------------------------------------------------------------


def _as_batches(images: np.ndarray | Iterable[np.ndarray]) -> Iterable[np.ndarray]:
    if hasattr(images, "shape"):  # one array (NumPy or jax)
        return (np.asarray(images),)
    return images


# XLA:CPU compiler options of the extractor: its convolutions and dots through the YNNPACK library
# (features within 1e-6 relative of the default build; with the network's plain convolutions 2.5x the
# images/s of the default build's best forms on 2 cores: bench/RESULTS.md §14, §15). Experimental in
# XLA: where a version does not accept them, the network compiles without, in its ``cpu_forms``.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


class CompiledOnDevices:
    """``fn`` jitted onto ``sharding`` (its outputs), compiled once per input shape; on CPU with the
    XLA ``cpu_options``, falling back to the default build of ``fallback`` (default ``fn``: the same
    function, in forms that build runs faster) when this XLA refuses them.

    Attributes:
        used_options: per input shape, whether the executable was built with ``cpu_options``.
    """

    def __init__(
        self,
        fn,
        sharding: NamedSharding,
        cpu_options: Mapping[str, Any],
        fallback=None,
    ):
        self._jitted = jax.jit(fn, out_shardings=sharding)
        self._fallback = jax.jit(fallback or fn, out_shardings=sharding)
        cpu = all(d.platform == "cpu" for d in sharding.mesh.devices.flat)
        self._options = dict(cpu_options) if cpu else {}
        self._executables: dict[Any, Any] = {}
        self.used_options: dict[Any, bool] = {}

    def __call__(self, *args: Any) -> Any:
        key = tuple((a.shape, a.dtype) for a in jax.tree.leaves(args))
        executable = self._executables.get(key)
        if executable is None:
            if self._options:
                try:
                    executable = self._jitted.lower(*args).compile(compiler_options=self._options)
                except Exception:  # an XLA without these (experimental) options
                    executable = None
                self.used_options[key] = executable is not None
                if executable is None:
                    executable = self._fallback.lower(*args).compile()
            else:
                self.used_options[key] = False
                executable = self._jitted.lower(*args).compile()
            self._executables[key] = executable
        return executable(*args)


@functools.lru_cache(maxsize=8)
def _compiled_outputs(precision: Any, sharding: NamedSharding) -> CompiledOnDevices:
    """One compiled ``inception_outputs`` per (precision, sharding): extractors share compilations."""
    fn = functools.partial(inception_outputs, precision=precision)
    fallback = functools.partial(inception_outputs, precision=precision, cpu_forms=True)
    return CompiledOnDevices(fn, sharding, CPU_COMPILER_OPTIONS, fallback)


class InceptionFeatureExtractor:
    """Pool features and logits of many uint8 images, the batch split over a 1-D device mesh.

    One compiled program per image shape: every batch is padded to ``batch_size`` rows (a multiple
    of the number of devices) and the padding trimmed off the outputs, so the last, short batch
    does not compile again. The weights are replicated on the mesh once.

    Multi-host: the default mesh holds this process's devices (``jax.local_devices()``), so each
    host extracts the features of the images it is given; ``metrics.fid.GaussianStats.allgather``
    combines per-host statistics.

    Args:
        variables: from ``load_inception_params`` (or a path / None, read with it).
        batch_size: rows per compiled batch (rounded up to a multiple of the device count).
        mesh: a 1-D mesh; default all local devices along one axis "batch".
        precision: see ``InceptionV3``.
    """

    def __init__(
        self,
        variables: Variables | str | os.PathLike | None = None,
        *,
        batch_size: int = 200,
        mesh: Mesh | None = None,
        precision: Any = "highest",
    ):
        if variables is None or isinstance(variables, (str, os.PathLike)):
            variables = load_inception_params(variables)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.mesh = (
            mesh if mesh is not None else Mesh(np.asarray(jax.local_devices()), (_BATCH_AXIS,))
        )
        if len(self.mesh.axis_names) != 1:
            raise ValueError(
                f"InceptionFeatureExtractor needs a 1-D mesh, got axes {self.mesh.axis_names}."
            )
        self.num_devices = self.mesh.size
        self.batch_size = -(-batch_size // self.num_devices) * self.num_devices
        self._batch_sharding = NamedSharding(self.mesh, PartitionSpec(self.mesh.axis_names[0]))
        self.variables = jax.device_put(variables, NamedSharding(self.mesh, PartitionSpec()))
        self._apply = _compiled_outputs(precision, self._batch_sharding)

    def _run(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = chunk.shape[0]
        if rows < self.batch_size:
            chunk = np.concatenate(
                [chunk, np.zeros((self.batch_size - rows,) + chunk.shape[1:], chunk.dtype)]
            )
        out = self._apply(self.variables, jax.device_put(chunk, self._batch_sharding))
        return np.asarray(out.pool)[:rows], np.asarray(out.logits)[:rows]

    def iter_outputs(
        self, images: np.ndarray | Iterable[np.ndarray]
    ) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        """Yields ``(pool, logits)`` NumPy float32 arrays batch by batch.

        Args:
            images: a uint8 (N, H, W, C) array, or an iterable of such arrays (any sizes).
        """
        for array in _as_batches(images):
            _check_images(array)
            array = np.asarray(array)
            for start in range(0, array.shape[0], self.batch_size):
                yield self._run(array[start : start + self.batch_size])

    def __call__(self, images: np.ndarray | Iterable[np.ndarray]) -> InceptionOutput:
        """All pool features (N, 2048) and logits (N, 1008) as NumPy float32 arrays."""
        pools, logits = [], []
        for pool, logit in self.iter_outputs(images):
            pools.append(pool)
            logits.append(logit)
        if not pools:
            raise ValueError("No images were given.")
        return InceptionOutput(pool=np.concatenate(pools), logits=np.concatenate(logits))
