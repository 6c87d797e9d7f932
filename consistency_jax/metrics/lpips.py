"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features
as a Perceptual Metric"), version 0.1 of the ``lpips`` package, in Flax.

It is the distance d of the consistency losses (CM Eq. 8-10): for images x0, x1
in [-1, 1],

    d(x0, x1) = Σ_l  mean_{h,w}  Σ_c  w_{l,c} · (ŷ0_{l,hwc} − ŷ1_{l,hwc})²      (paper Eq. 1)

where ŷ_l are the activations of backbone layer l (5 ReLU taps of torchvision's VGG16 or AlexNet
``features``) after the fixed input scaling, normalised to unit length along channels, and w_l ≥ 0
are the learned linear heads (a 1x1 convolution without bias).

Input conventions. The lpips package maps x ∈ [-1, 1] through (x − shift)/scale with
shift = (−.030, −.088, −.188), scale = (.458, .448, .450). That is exactly the ImageNet
standardisation ((x + 1)/2 − mean)/std with mean = (.485, .456, .406), std = (.229, .224, .225),
so the PyTorch consistency-models code, which feeds (x + 1)/2 to piq's LPIPS, computes the same
input map (cm ``cm/karras_diffusion.py``). Two details of that code are options here:

* ``resize_to=224, resize_below=256``: images with a side smaller than 256 are resized bilinearly
  (half-pixel centres, no antialiasing: ``F.interpolate(mode="bilinear")``) to 224x224 first.
* ``pooling="avg"``: piq's ``LPIPS(replace_pooling=True)`` used by the cm code replaces every
  max-pool of VGG16 by a 2x2 average pool. The default ``"max"`` is the lpips package (and jcm).

Weights. ``load_lpips_params`` reads one ``.safetensors`` file written by
``tools/convert_lpips_weights.py`` (torchvision's ImageNet backbone plus the lpips package's v0.1
linear heads). Tensors keep PyTorch's names and layouts in the file:

* ``features.{i}.weight`` (out, in, k, k) and ``features.{i}.bias`` (out,), ``i`` the index in
  torchvision's ``vgg16().features`` / ``alexnet().features``;
* ``lin{l}.weight`` (1, C_l, 1, 1) for l = 0..4.

Nothing here downloads anything.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "LPIPS",
    "LPIPSDistance",
    "AlexNetFeatures",
    "VGG16Features",
    "fetch_lpips_tensors",
    "load_lpips_params",
    "lpips_distance",
    "lpips_tensor_shapes",
    "make_lpips_distance",
]

Params = Mapping[str, Any]

# The lpips package's ScalingLayer (v0.1): x ∈ [-1, 1] ↦ (x − shift) / scale, per RGB channel.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# lpips.normalize_tensor adds this to the channel norm before dividing.
_NORM_EPS = 1e-10
LPIPS_FORMAT = "lpips-v0.1"


@dataclasses.dataclass(frozen=True)
class _Conv:
    """One Conv2d + ReLU of torchvision's ``features``; ``index`` is its position there."""

    index: int
    in_ch: int
    out_ch: int
    kernel: int
    stride: int = 1
    padding: int = 1


_POOL = "pool"  # a pooling layer
_TAP = "tap"  # LPIPS reads the activation here (after a ReLU)


@dataclasses.dataclass(frozen=True)
class _BackboneSpec:
    name: str
    pool_window: int
    ops: tuple[_Conv | str, ...]

    @property
    def convs(self) -> tuple[_Conv, ...]:
        return tuple(op for op in self.ops if isinstance(op, _Conv))

    @property
    def tap_channels(self) -> tuple[int, ...]:
        channels, last = [], 3
        for op in self.ops:
            if isinstance(op, _Conv):
                last = op.out_ch
            elif op == _TAP:
                channels.append(last)
        return tuple(channels)


# torchvision vgg16().features (config "D"); taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG16 = _BackboneSpec(
    name="vgg",
    pool_window=2,
    ops=(
        _Conv(0, 3, 64, 3),
        _Conv(2, 64, 64, 3),
        _TAP,
        _POOL,
        _Conv(5, 64, 128, 3),
        _Conv(7, 128, 128, 3),
        _TAP,
        _POOL,
        _Conv(10, 128, 256, 3),
        _Conv(12, 256, 256, 3),
        _Conv(14, 256, 256, 3),
        _TAP,
        _POOL,
        _Conv(17, 256, 512, 3),
        _Conv(19, 512, 512, 3),
        _Conv(21, 512, 512, 3),
        _TAP,
        _POOL,
        _Conv(24, 512, 512, 3),
        _Conv(26, 512, 512, 3),
        _Conv(28, 512, 512, 3),
        _TAP,
    ),
)

# torchvision alexnet().features; taps after each of the 5 ReLUs.
_ALEXNET = _BackboneSpec(
    name="alex",
    pool_window=3,
    ops=(
        _Conv(0, 3, 64, 11, stride=4, padding=2),
        _TAP,
        _POOL,
        _Conv(3, 64, 192, 5, padding=2),
        _TAP,
        _POOL,
        _Conv(6, 192, 384, 3),
        _TAP,
        _Conv(8, 384, 256, 3),
        _TAP,
        _Conv(10, 256, 256, 3),
        _TAP,
    ),
)

_SPECS: dict[str, _BackboneSpec] = {"vgg": _VGG16, "alex": _ALEXNET}
_POOLINGS = ("max", "avg")


def _spec(net: str) -> _BackboneSpec:
    if net not in _SPECS:
        raise ValueError(f"Unknown LPIPS backbone net={net!r}; expected one of {sorted(_SPECS)}.")
    return _SPECS[net]


def _check_pooling(pooling: str) -> None:
    if pooling not in _POOLINGS:
        raise ValueError(f"Unknown pooling={pooling!r}; expected one of {list(_POOLINGS)}.")


class _TorchvisionFeatures(nn.Module):
    """Shared body of the torchvision ``features`` stacks: Conv2d + ReLU layers and 2-D pools.

    Convolutions are named ``features_{i}`` after their index in torchvision's ``features``.
    """

    pooling: str = "max"
    _backbone: ClassVar[_BackboneSpec]

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """Runs the backbone.

        Args:
            x: (B, H, W, 3) images already scaled by the LPIPS ScalingLayer.

        Returns:
            The 5 post-ReLU activations that LPIPS reads (paper §3, Eq. 1), NHWC.
        """
        _check_pooling(self.pooling)
        spec = self._backbone
        window = (spec.pool_window, spec.pool_window)
        taps = []
        for op in spec.ops:
            if op == _TAP:
                taps.append(x)
            elif op == _POOL:
                # torch's MaxPool2d / AvgPool2d with stride 2, no padding, floor mode == "VALID".
                pool = nn.max_pool if self.pooling == "max" else nn.avg_pool
                x = pool(x, window, strides=(2, 2), padding="VALID")
            else:
                pad = (op.padding, op.padding)
                x = nn.Conv(
                    op.out_ch,
                    (op.kernel, op.kernel),
                    strides=(op.stride, op.stride),
                    padding=(pad, pad),
                    name=f"features_{op.index}",
                )(x)
                x = nn.relu(x)
        return tuple(taps)


class VGG16Features(_TorchvisionFeatures):
    """torchvision VGG16 ``features`` up to relu5_3; returns relu1_2, relu2_2, relu3_3, relu4_3,
    relu5_3 (64, 128, 256, 512, 512 channels)."""

    _backbone: ClassVar[_BackboneSpec] = _VGG16


class AlexNetFeatures(_TorchvisionFeatures):
    """torchvision AlexNet ``features`` without the last pool; returns relu1..relu5 (64, 192, 384,
    256, 256 channels)."""

    _backbone: ClassVar[_BackboneSpec] = _ALEXNET


def _scaling_layer(x: jax.Array) -> jax.Array:
    """The lpips v0.1 ScalingLayer: [-1, 1] ↦ ImageNet-standardised input."""
    return (x - jnp.asarray(_SHIFT, x.dtype)) / jnp.asarray(_SCALE, x.dtype)


def _unit_normalize(f: jax.Array, eps: float = _NORM_EPS) -> jax.Array:
    """f / (‖f‖₂ + eps) along the channel axis (paper Eq. 1, ŷ = unit-normalised activations).

    Same value as lpips.normalize_tensor; the square root is guarded so that an all-zero feature
    column (possible after a ReLU) gets a finite gradient instead of NaN (0 · ∞ in d√s/ds).
    """
    sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return f / (norm + eps)


class LPIPS(nn.Module):
    """The LPIPS v0.1 distance between two batches of same-size images (paper Eq. 1).

    No resizing happens here (see ``lpips_distance``). Parameters: ``backbone`` (the torchvision
    features) and ``lin0``..``lin4`` (1x1 convolutions, 1 output channel, no bias).

    Attributes:
        net: "vgg" (VGG16) or "alex" (AlexNet).
        pooling: "max" (torchvision/lpips) or "avg" (piq's ``replace_pooling=True``, cm code).
    """

    net: str = "vgg"
    pooling: str = "max"

    @nn.compact
    def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
        """Computes d(x0, x1).

        Args:
            x0: (B, H, W, 3) images in [-1, 1].
            x1: (B, H, W, 3) images in [-1, 1].

        Returns:
            (B,) distances.
        """
        spec = _spec(self.net)
        backbone_cls = VGG16Features if spec is _VGG16 else AlexNetFeatures
        backbone = backbone_cls(pooling=self.pooling, name="backbone")
        # Two passes rather than one over the concatenated batch: when x1 is a stop-gradient
        # target (CM Eq. 8) no backward pass is spent on it, and d(x, x) is exactly 0 (up to an
        # ulp where XLA compiles the two passes differently).
        feats0 = backbone(_scaling_layer(x0))
        feats1 = backbone(_scaling_layer(x1))
        total = jnp.zeros((x0.shape[0],), x0.dtype)
        for layer, (f0, f1) in enumerate(zip(feats0, feats1)):
            diff = jnp.square(_unit_normalize(f0) - _unit_normalize(f1))
            weighted = nn.Conv(1, (1, 1), use_bias=False, name=f"lin{layer}")(diff)
            total = total + jnp.mean(weighted, axis=(1, 2, 3))  # spatial average
        return total


def lpips_tensor_shapes(net: str = "vgg") -> dict[str, tuple[int, ...]]:
    """Names and shapes (PyTorch layouts) of the tensors an LPIPS weight file must hold.

    Args:
        net: "vgg" or "alex".

    Returns:
        {name: shape}: ``features.{i}.weight`` (out, in, k, k), ``features.{i}.bias`` (out,),
        ``lin{l}.weight`` (1, C_l, 1, 1).
    """
    spec = _spec(net)
    shapes: dict[str, tuple[int, ...]] = {}
    for conv in spec.convs:
        shapes[f"features.{conv.index}.weight"] = (
            conv.out_ch,
            conv.in_ch,
            conv.kernel,
            conv.kernel,
        )
        shapes[f"features.{conv.index}.bias"] = (conv.out_ch,)
    for layer, channels in enumerate(spec.tap_channels):
        shapes[f"lin{layer}.weight"] = (1, channels, 1, 1)
    return shapes


def build_lpips_tensors(
    backbone: Mapping[str, np.ndarray],
    lin: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, np.ndarray]:
    """Selects and renames the tensors of one LPIPS weight file.

    Args:
        backbone: torchvision state_dict as NumPy arrays (``features.*``, ``classifier.*``, ...).
        lin: the lpips package's state_dict (``lin{l}.model.1.weight``, or already ``lin{l}.weight``).
        shapes: the required {name: shape}, from ``lpips_tensor_shapes(net)``.

    Returns:
        {name: float32 array} holding exactly the names of ``shapes``.

    Raises:
        ValueError: a required tensor is missing or has another shape.
    """
    renamed_lin = {}
    for name, array in lin.items():
        parts = name.split(".")
        if len(parts) == 4 and parts[0].startswith("lin") and parts[1:] == ["model", "1", "weight"]:
            name = f"{parts[0]}.weight"
        renamed_lin[name] = array
    out: dict[str, np.ndarray] = {}
    problems = []
    for name, shape in shapes.items():
        source = backbone if name.startswith("features.") else renamed_lin
        what = "backbone" if source is backbone else "linear-head"
        if name not in source:
            problems.append(f"{what} tensor {name!r} is missing")
            continue
        array = np.asarray(source[name], dtype=np.float32)
        if array.shape != tuple(shape):
            problems.append(
                f"{what} tensor {name!r} has shape {array.shape}, expected {tuple(shape)}"
            )
            continue
        out[name] = np.ascontiguousarray(array)
    if problems:
        raise ValueError("Cannot build the LPIPS weight file: " + "; ".join(problems) + ".")
    return out


def save_lpips_safetensors(
    tensors: Mapping[str, np.ndarray], path: str | os.PathLike, net: str
) -> None:
    """Writes ``tensors`` to ``path`` with metadata {"net": net, "format": "lpips-v0.1"}."""
    from safetensors.numpy import save_file

    save_file(dict(tensors), os.fspath(path), metadata={"net": net, "format": LPIPS_FORMAT})


def _tensors_to_params(tensors: Mapping[str, np.ndarray], net: str) -> dict[str, Any]:
    """PyTorch-layout tensors (already validated) -> Flax variables {"params": ...}."""
    spec = _spec(net)
    backbone = {}
    for conv in spec.convs:
        weight = np.asarray(tensors[f"features.{conv.index}.weight"], np.float32)
        backbone[f"features_{conv.index}"] = {
            "kernel": jnp.asarray(weight.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
            "bias": jnp.asarray(np.asarray(tensors[f"features.{conv.index}.bias"], np.float32)),
        }
    params: dict[str, Any] = {"backbone": backbone}
    for layer in range(len(spec.tap_channels)):
        weight = np.asarray(tensors[f"lin{layer}.weight"], np.float32)
        params[f"lin{layer}"] = {"kernel": jnp.asarray(weight.transpose(2, 3, 1, 0))}
    return {"params": params}


def fetch_lpips_tensors(net: str = "vgg") -> dict[str, np.ndarray]:
    """The LPIPS tensors from the published files, fetched once into the cache and SHA-256-checked
    (``weights_cache``: torchvision's ImageNet backbone and the lpips package's v0.1 linear heads),
    read by ``torch_pickle`` (no PyTorch).

    Raises:
        ValueError: a file that cannot be fetched (the message names its address, the cache path
            and the manual command) or does not hold the tensors of ``net``.
    """
    from consistency_jax import torch_pickle, weights_cache

    backbone = {"vgg": weights_cache.VGG16, "alex": weights_cache.ALEXNET}[_spec(net).name]
    return build_lpips_tensors(
        torch_pickle.read_state_dict(weights_cache.fetch(backbone)),
        torch_pickle.read_state_dict(weights_cache.fetch(weights_cache.LPIPS_LIN[net])),
        lpips_tensor_shapes(net),
    )


def load_lpips_params(path: str | os.PathLike | None = None, net: str = "vgg") -> dict[str, Any]:
    """Reads LPIPS weights from a ``.safetensors`` file (no pickle), or from the published files.

    Args:
        path: a file written by ``tools/convert_lpips_weights.py``; None or "": the published
            backbone and linear heads, fetched once into the cache (``fetch_lpips_tensors``).
        net: "vgg" or "alex"; must match the file.

    Returns:
        Flax variables ``{"params": ...}`` for ``LPIPS(net=net)``.

    Raises:
        ValueError: the file is missing or unreadable, was made for another net, or a tensor is
            missing, unexpected, of the wrong shape or not floating point.
    """
    from safetensors import SafetensorError, safe_open

    expected = lpips_tensor_shapes(net)
    if path is None or os.fspath(path) == "":
        return _tensors_to_params(fetch_lpips_tensors(net), net)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"LPIPS weight file {path!r} does not exist.")
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"LPIPS weight file {path!r} is not a readable .safetensors file: {err}"
        ) from err

    file_net = metadata.get("net")
    if file_net is not None and file_net != net:
        raise ValueError(
            f"LPIPS weight file {path!r} holds net={file_net!r} weights, not net={net!r}."
        )
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"LPIPS weight file {path!r} does not match net={net!r}: "
            f"missing tensors {missing}, unexpected tensors {unexpected}."
        )
    for name, shape in expected.items():
        array = tensors[name]
        if tuple(array.shape) != shape:
            raise ValueError(
                f"LPIPS weight file {path!r}: tensor {name!r} has shape {tuple(array.shape)}, "
                f"expected {shape} for net={net!r}."
            )
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(
                f"LPIPS weight file {path!r}: tensor {name!r} has dtype {array.dtype}, not float."
            )
    return _tensors_to_params(tensors, net)


def _feature_sizes(size: int, net: str) -> list[int]:
    """Spatial size after every layer of the backbone for an input side ``size``."""
    spec = _spec(net)
    sizes = []
    for op in spec.ops:
        if op == _POOL:
            size = (size - spec.pool_window) // 2 + 1
        elif isinstance(op, _Conv):
            size = (size + 2 * op.padding - op.kernel) // op.stride + 1
        else:
            continue
        sizes.append(size)
    return sizes


def _min_input_size(net: str) -> int:
    size = 1
    while min(_feature_sizes(size, net)) < 1:
        size += 1
    return size


def _resize_bilinear(x: jax.Array, size: int) -> jax.Array:
    """Bilinear resize of NHWC images to size x size, as torch's
    ``F.interpolate(x, size, mode="bilinear", align_corners=False)`` (no antialiasing)."""
    return jax.image.resize(
        x, (x.shape[0], size, size, x.shape[3]), method="bilinear", antialias=False
    )


def _check_params(params: Params, net: str) -> None:
    """Raises ValueError when ``params`` is not a ``{"params": ...}`` tree for LPIPS(net)."""
    if not isinstance(params, Mapping) or "params" not in params:
        raise ValueError(
            'LPIPS params must be the {"params": ...} dict returned by load_lpips_params.'
        )
    expected = jax.eval_shape(
        LPIPS(net=net).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64, 3))
    )
    want = {
        jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)
    }
    got = {
        jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)
    }
    if want != got:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        raise ValueError(
            f"LPIPS params do not fit net={net!r}: missing {missing}, unexpected {extra}, "
            f"wrong shapes {wrong}."
        )


def lpips_distance(
    params: Params,
    a: jax.typing.ArrayLike,
    b: jax.typing.ArrayLike,
    *,
    net: str = "vgg",
    resize_to: int | None = 224,
    resize_below: int = 256,
    pooling: str = "max",
) -> jax.Array:
    """LPIPS distance d(a, b) per image (paper Eq. 1), the d of CM Eq. 8.

    Jittable and differentiable in ``a`` and ``b``. Here ``params`` is an argument, so under
    ``jax.jit`` it stays a runtime input instead of a compile-time constant.

    Args:
        params: ``{"params": ...}`` from ``load_lpips_params``.
        a: (B, H, W, C) images in [-1, 1], C = 1 (repeated to RGB) or 3.
        b: same shape as ``a``.
        net: "vgg" or "alex".
        resize_to: side of the bilinear resize; None never resizes.
        resize_below: resize when the height or width is smaller than this (cm: 256).
        pooling: "max" (lpips package) or "avg" (piq ``replace_pooling=True``, cm code).

    Returns:
        (B,) float32 distances, 0 (to float rounding) for identical images.

    Raises:
        ValueError: bad shapes or channel counts, images too small for the backbone, unknown
            ``net``/``pooling``.
    """
    _spec(net)
    _check_pooling(pooling)
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    if a.ndim != 4 or a.shape != b.shape:
        raise ValueError(
            f"LPIPS expects two NHWC image batches of the same shape, got {a.shape} and {b.shape}."
        )
    if a.shape[-1] not in (1, 3):
        raise ValueError(f"LPIPS expects 1 or 3 channels (NHWC), got shape {a.shape}.")
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    if a.shape[-1] == 1:
        a = jnp.repeat(a, 3, axis=-1)
        b = jnp.repeat(b, 3, axis=-1)
    height, width = a.shape[1], a.shape[2]
    if resize_to is not None and min(height, width) < resize_below:
        a = _resize_bilinear(a, resize_to)
        b = _resize_bilinear(b, resize_to)
        height = width = resize_to
    min_size = _min_input_size(net)
    if min(height, width) < min_size:
        raise ValueError(
            f"Images of size {height}x{width} are too small for the LPIPS {net!r} backbone "
            f"(needs at least {min_size}x{min_size}); set resize_to."
        )
    return LPIPS(net=net, pooling=pooling).apply(params, a, b)


class LPIPSDistance(flax.struct.PyTreeNode, eq=False):
    """LPIPS weights bound into a distance ``d(a, b) -> (B,)`` (see ``lpips_distance``).

    A pytree: ``params`` are its leaves, the other fields static. Closed over inside ``jax.jit``
    the weights become constants of the compiled program (about 59 MB for VGG16, and XLA then
    constant-folds parts of the backward pass, which slows compilation); passed as an argument of
    the jitted function they stay runtime inputs. Equality and hashing are by identity, so that
    ``jax.jit(d)`` works.
    """

    params: Params
    net: str = flax.struct.field(pytree_node=False, default="vgg")
    resize_to: int | None = flax.struct.field(pytree_node=False, default=224)
    resize_below: int = flax.struct.field(pytree_node=False, default=256)
    pooling: str = flax.struct.field(pytree_node=False, default="max")

    def __call__(self, a: jax.typing.ArrayLike, b: jax.typing.ArrayLike) -> jax.Array:
        """d(a, b) for NHWC batches in [-1, 1]; returns (B,) distances."""
        return lpips_distance(
            self.params,
            a,
            b,
            net=self.net,
            resize_to=self.resize_to,
            resize_below=self.resize_below,
            pooling=self.pooling,
        )


def make_lpips_distance(
    params: Params,
    net: str = "vgg",
    resize_to: int | None = 224,
    *,
    resize_below: int = 256,
    pooling: str = "max",
) -> LPIPSDistance:
    """Binds LPIPS weights into the distance ``d(a, b) -> (B,)`` of the consistency losses
    (CM Eq. 8).

    Args:
        params: ``{"params": ...}`` from ``load_lpips_params``; checked against ``net`` here.
        net: "vgg" or "alex".
        resize_to: side of the bilinear resize; None never resizes (cm: 224).
        resize_below: resize when the height or width is smaller than this (cm: 256).
        pooling: "max" (lpips package) or "avg" (piq ``replace_pooling=True``, cm code).

    Returns:
        An ``LPIPSDistance``: called as d(a, b) on NHWC batches in [-1, 1], it returns (B,)
        distances; jittable and differentiable in a and b, and a pytree (see its docstring on
        passing it to ``jax.jit`` rather than closing over it).

    Raises:
        ValueError: ``params`` does not fit ``net``, or an unknown ``net``/``pooling``.
    """
    _spec(net)
    _check_pooling(pooling)
    _check_params(params, net)
    return LPIPSDistance(
        params=params, net=net, resize_to=resize_to, resize_below=resize_below, pooling=pooling
    )
