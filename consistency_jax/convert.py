"""Converting the released PyTorch consistency models into runs of this library.

    python -m consistency_jax.convert --from=cm --checkpoint=cd_imagenet64_lpips.pt \\
        --config=imagenet64 --method=cd --out=runs/cd_imagenet64_lpips

The reference PyTorch code of Consistency Models (Song et al. 2023; openai/consistency_models,
"cm") released its EDM teachers and its CD and CT models for ImageNet 64 (class-conditional) and
LSUN 256 (unconditional) as state dicts of the ADM UNet (Dhariwal & Nichol 2021). This command reads
one (``torch.load(weights_only=True)``, or a ``.safetensors`` copy of it: nothing is unpickled), maps
every tensor onto ``networks.unet.ADMUNet`` and writes a run directory that the sampling command
(whose samples the evaluation command scores), CD (``--config.teacher.workdir=``, for an EDM run)
and ``--config.init.workdir=`` read like any trained run. The run holds the released weights as θ, with
no eval EMA, θ⁻ or optimizer state of its own (it cannot be resumed as a training run).

Tensor mapping (PyTorch -> Flax):

* convolutions OIHW -> HWIO; linear layers (out, in) -> (in, out); GroupNorm weight -> scale;
  ``label_emb.weight`` -> ``Embed_0.embedding``; ``time_embed.{0,2}`` -> the two dense layers of the
  timestep MLP (the sinusoidal embedding [cos | sin] with frequencies 10000^(−i/half) has no weights).
* attention ``qkv`` (a 1×1 convolution to 3C channels) is read as ``(three h d)``: rows [0, C) are
  Q, [C, 2C) K and [2C, 3C) V, each split into heads of ``num_head_channels`` consecutive channels.
  That is the layout of the FlashAttention path the released models ran (``QKVFlashAttention``) and
  of cm's ``QKVAttention``; ``ADMUNet``'s ``AttnBlock`` splits its q, k and v projections the same
  way. The ch^(−1/4) scaling of q and of k is part of cm's forward pass, not of the weights; here
  ``AttnBlock`` applies the same 1/√d to q·k (by scaling q).
* the network's time input is cm's 1000·0.25·ln(σ + 1e-44) (``sigmas.c_noise = "cm"`` in the
  configs this command starts from); GroupNorm has 32 groups and ε = 1e-5 as cm's ``GroupNorm32``.

The released models ran in float16; the converted parameters are float32 (float16 tensors are cast).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

PyTree = Any

__all__ = [
    "ConvertError",
    "cm_params",
    "convert_cm",
    "convert_diffusers",
    "convert_jcm",
    "diffusers_arch",
    "diffusers_state_dict",
    "jcm_params",
    "read_jcm_state",
    "read_state_dict",
    "run_config",
]

SOURCES = ("cm", "diffusers", "jcm")
CM_CONFIGS = ("imagenet64", "lsun256")
JCM_CONFIGS = ("cifar10",)
PROVENANCE = "converted_from.json"
_CM_GROUPS = 32  # cm's GroupNorm32


class ConvertError(ValueError):
    """A checkpoint that cannot be converted (unreadable, or not the network described), or an output
    that would be overwritten; raised before anything is written."""


# --------------------------------------------------------------------------------------------------
# Reading


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch state dict file (``.pt``/``.pth``) or a ``.safetensors`` file.

    ``.pt`` files are read with ``torch.load(path, map_location="cpu", weights_only=True)``, which
    unpickles nothing but tensors and containers; torch is imported only for them.

    Raises:
      ConvertError: no such file, an unknown extension, torch missing for a ``.pt`` file, a file that
        is truncated or not a checkpoint, or one that holds no flat mapping name -> tensor.
    """
    if not os.path.isfile(path):
        raise ConvertError(f"No checkpoint file {path!r}.")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path))
        except Exception as e:  # noqa: BLE001 -- safetensors' errors name no common class
            raise ConvertError(
                f"{path} is not a readable safetensors file (truncated or not a checkpoint?): {e}"
            ) from None
    if ext not in (".pt", ".pth", ".bin"):
        raise ConvertError(f"{path}: give a PyTorch state dict (.pt, .pth) or a .safetensors file.")
    try:
        import torch
    except ImportError:
        raise ConvertError(
            f"Reading {path} needs PyTorch (pip install torch; CPU is enough), or give "
            "a .safetensors copy of the state dict instead."
        ) from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- pickle, zip and EOF errors alike
        raise ConvertError(
            f"{path} is not a readable PyTorch checkpoint (truncated, or not a state "
            f"dict saved by torch.save?): {str(e).splitlines()[0][:300]}"
        ) from None
    if not isinstance(loaded, Mapping) or not all(torch.is_tensor(v) for v in loaded.values()):
        raise ConvertError(
            f"{path} holds a {type(loaded).__name__}, not a state dict (a mapping name -> tensor)."
        )
    return {
        k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
        for k, v in loaded.items()
    }


# --------------------------------------------------------------------------------------------------
# The cm UNet's names and layouts


def _conv(w: np.ndarray) -> np.ndarray:  # (O, I, H, W) -> (H, W, I, O)
    return w.transpose(2, 3, 1, 0)


def _conv1x1_dense(w: np.ndarray) -> np.ndarray:  # a 1×1 convolution (O, I, 1, 1) -> a dense (I, O)
    return w[:, :, 0, 0].T


def _torch_conv_shape(kernel: tuple) -> tuple:  # inverse of _conv, for error messages
    return (kernel[3], kernel[2], kernel[0], kernel[1])


class _Layout:
    """cm key -> (Flax path, expected PyTorch shape, converter of the tensor) for one network."""

    def __init__(self, abstract: Mapping[str, Any]):
        self.abstract = abstract
        self.entries: dict[str, tuple[tuple[str, ...], tuple, Callable]] = {}
        self.counts: collections.Counter = collections.Counter()
        self.qkv: list[tuple[str, tuple[str, ...]]] = []  # (cm prefix, Flax AttnBlock path)

    def _leaf(self, path):
        node = self.abstract
        for p in path:
            node = node[p]
        return tuple(node.shape)

    def next_name(self, kind: str) -> str:
        name = f"{kind}_{self.counts[kind]}"
        self.counts[kind] += 1
        return name

    def conv(self, key: str, path: tuple[str, ...]) -> None:
        k = self._leaf(path + ("kernel",))
        if len(k) == 4:
            self.entries[f"{key}.weight"] = (path + ("kernel",), _torch_conv_shape(k), _conv)
        else:  # attention's 1×1 convolutions are dense layers here
            self.entries[f"{key}.weight"] = (path + ("kernel",), (k[1], k[0], 1, 1), _conv1x1_dense)
        self.entries[f"{key}.bias"] = (path + ("bias",), self._leaf(path + ("bias",)), lambda b: b)

    def linear(self, key: str, path: tuple[str, ...]) -> None:
        k = self._leaf(path + ("kernel",))
        self.entries[f"{key}.weight"] = (path + ("kernel",), (k[1], k[0]), lambda w: w.T)
        self.entries[f"{key}.bias"] = (path + ("bias",), self._leaf(path + ("bias",)), lambda b: b)

    def norm(self, key: str, path: tuple[str, ...]) -> None:
        self.entries[f"{key}.weight"] = (
            path + ("scale",),
            self._leaf(path + ("scale",)),
            lambda s: s,
        )
        self.entries[f"{key}.bias"] = (path + ("bias",), self._leaf(path + ("bias",)), lambda b: b)

    def resblock(self, key: str) -> None:
        p = (self.next_name("ResBlock"),)
        self.norm(f"{key}.in_layers.0", p + ("GroupNorm_0",))
        self.conv(f"{key}.in_layers.2", p + ("Conv_0",))
        self.linear(f"{key}.emb_layers.1", p + ("Dense_0",))
        self.norm(f"{key}.out_layers.0", p + ("GroupNorm_1",))
        self.conv(f"{key}.out_layers.3", p + ("Conv_1",))
        if "Conv_2" in self.abstract[p[0]]:  # a 1×1 projection where the channels change
            self.conv(f"{key}.skip_connection", p + ("Conv_2",))

    def attention(self, key: str) -> None:
        p = (self.next_name("AttnBlock"),)
        self.norm(f"{key}.norm", p + ("GroupNorm_0",))
        c = self._leaf(p + ("Dense_0", "kernel"))[0]
        # qkv is split into the q, k, v projections (Dense_0, _1, _2) after the shape check.
        self.entries[f"{key}.qkv.weight"] = (p + ("qkv", "kernel"), (3 * c, c, 1, 1), lambda w: w)
        self.entries[f"{key}.qkv.bias"] = (p + ("qkv", "bias"), (3 * c,), lambda b: b)
        self.conv(f"{key}.proj_out", p + ("Dense_3",))


def _cm_layout(kwargs: Mapping[str, Any], image_size: int, abstract: Mapping[str, Any]) -> _Layout:
    """Walks cm's ``UNetModel.__init__`` (input blocks, middle block, output blocks, head) in the
    order ``ADMUNet`` creates the same layers, pairing each cm name with its Flax path."""
    lay = _Layout(abstract)
    mult, attn = tuple(kwargs["channel_mult"]), tuple(kwargs["attention_resolutions"])
    nrb, updown = kwargs["num_res_blocks"], kwargs.get("resblock_updown", True)
    conv_resample = kwargs.get("conv_resample", True)
    lay.linear("time_embed.0", (lay.next_name("Dense"),))
    lay.linear("time_embed.2", (lay.next_name("Dense"),))
    if kwargs.get("num_classes") is not None:
        lay.entries["label_emb.weight"] = (
            ("Embed_0", "embedding"),
            lay._leaf(("Embed_0", "embedding")),
            lambda e: e,
        )
    lay.conv("input_blocks.0.0", (lay.next_name("Conv"),))
    block, res = 1, image_size
    for level in range(len(mult)):
        for _ in range(nrb):
            lay.resblock(f"input_blocks.{block}.0")
            if res in attn:
                lay.attention(f"input_blocks.{block}.1")
            block += 1
        if level != len(mult) - 1:
            if updown:
                lay.resblock(f"input_blocks.{block}.0")
            elif conv_resample:
                lay.conv(f"input_blocks.{block}.0.op", (lay.next_name("Conv"),))
            block, res = block + 1, res // 2
    lay.resblock("middle_block.0")
    lay.attention("middle_block.1")
    lay.resblock("middle_block.2")
    block = 0
    for level in reversed(range(len(mult))):
        for i in range(nrb + 1):
            lay.resblock(f"output_blocks.{block}.0")
            sub = 1
            if res in attn:
                lay.attention(f"output_blocks.{block}.1")
                sub = 2
            if level and i == nrb:
                if updown:
                    lay.resblock(f"output_blocks.{block}.{sub}")
                elif conv_resample:
                    lay.conv(f"output_blocks.{block}.{sub}.conv", (lay.next_name("Conv"),))
                res *= 2
            block += 1
    lay.norm("out.0", (lay.next_name("GroupNorm"),))
    lay.conv("out.2", (lay.next_name("Conv"),))
    return lay


def _listing(names: Sequence[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f", … ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _refuse_mismatch(
    source: str,
    described: str,
    missing: Sequence[str],
    extra: Sequence[str],
    wrong: Sequence[str],
    flags: str,
) -> None:
    """Raises a ConvertError naming the missing, unexpected and mis-shaped tensors, if any."""
    if missing or extra or wrong:
        parts = [
            f"{len(missing)} missing tensor(s): {_listing(missing)}" if missing else "",
            f"{len(extra)} unexpected tensor(s): {_listing(extra)}" if extra else "",
            f"{len(wrong)} of the wrong shape: {_listing(wrong)}" if wrong else "",
        ]
        raise ConvertError(
            f"{source} is not {described}: "
            + "; ".join(p for p in parts if p)
            + f". Check --config and the architecture flags ({flags})."
        )


def _cm_expected(
    model_kwargs: Mapping[str, Any], image_size: int, num_channels: int
) -> tuple[PyTree, _Layout]:
    """The abstract ``ADMUNet(**model_kwargs)`` parameters and the cm names, shapes and converters."""
    from consistency_jax.networks import layers
    from consistency_jax.networks.unet import ADMUNet

    try:
        abstract = layers.abstract_params(ADMUNet(**model_kwargs), image_size, num_channels)
    except (TypeError, ValueError) as e:
        raise ConvertError(
            f"The architecture flags do not describe an ADM UNet for "
            f"{image_size}x{image_size}x{num_channels} images: {e}"
        ) from None
    abstract = _plain(abstract)
    return abstract, _cm_layout(model_kwargs, image_size, abstract)


def cm_params(
    state_dict: Mapping[str, np.ndarray],
    model_kwargs: Mapping[str, Any],
    image_size: int,
    num_channels: int = 3,
    *,
    source: str = "the checkpoint",
) -> PyTree:
    """The ``ADMUNet(**model_kwargs)`` parameters of a cm ``UNetModel`` state dict (float32 NumPy).

    Args:
      state_dict: name -> array, as saved by cm (``read_state_dict``).
      model_kwargs: the ADMUNet arguments (attention resolutions in pixels).
      image_size: the square image side the network runs at.
      num_channels: image channels.
      source: how to name the checkpoint in errors.

    Returns:
      The Flax ``params`` tree (nested dicts of float32 arrays).

    Raises:
      ConvertError: tensors missing, unexpected or of the wrong shape (named, with a hint at the
        architecture flags), or a network the arguments do not describe.
    """
    abstract, lay = _cm_expected(model_kwargs, image_size, num_channels)
    missing = [k for k in lay.entries if k not in state_dict]
    extra = [k for k in state_dict if k not in lay.entries]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} (expected {lay.entries[k][1]})"
        for k in lay.entries
        if k in state_dict and tuple(state_dict[k].shape) != lay.entries[k][1]
    ]
    _refuse_mismatch(
        source,
        f"the ADM UNet described ({_describe(model_kwargs, image_size)})",
        missing,
        extra,
        wrong,
        "--model_channels, --channel_mult, --num_res_blocks, "
        "--attention_resolutions, --num_head_channels, --num_classes, "
        "--use_scale_shift_norm, --resblock_updown, --image_size",
    )
    params: dict = {}
    for key, (path, _, fn) in lay.entries.items():
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        value = np.asarray(state_dict[key])
        if not np.issubdtype(value.dtype, np.floating):
            raise ConvertError(
                f"{source}: tensor {key} has dtype {value.dtype}, not floating point."
            )
        node[path[-1]] = np.ascontiguousarray(fn(value).astype(np.float32))
    for name in [n for n in params if n.startswith("AttnBlock_")]:  # [Q | K | V] -> three denses
        qkv = params[name].pop("qkv")
        w, b = qkv["kernel"][:, :, 0, 0], qkv["bias"]
        c = w.shape[1]
        for i in range(3):
            params[name][f"Dense_{i}"] = {
                "kernel": np.ascontiguousarray(w[i * c : (i + 1) * c].T),
                "bias": b[i * c : (i + 1) * c].copy(),
            }
    _check_tree(params, abstract)
    return params


def _plain(tree: Any) -> Any:
    return {k: _plain(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


def _check_tree(params: PyTree, abstract: PyTree) -> None:
    import jax

    got = {
        jax.tree_util.keystr(p): tuple(a.shape)
        for p, a in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    want = {
        jax.tree_util.keystr(p): tuple(a.shape)
        for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]
    }
    assert got == want, f"conversion bug: {sorted(set(got.items()) ^ set(want.items()))[:5]}"


def _describe(kwargs: Mapping[str, Any], image_size: int) -> str:
    keys = (
        "model_channels",
        "channel_mult",
        "num_res_blocks",
        "attention_resolutions",
        "num_head_channels",
        "num_heads",
        "num_classes",
        "use_scale_shift_norm",
        "resblock_updown",
    )
    return f"image_size={image_size}, " + ", ".join(f"{k}={kwargs[k]}" for k in keys if k in kwargs)


# --------------------------------------------------------------------------------------------------
# jcm: the flax msgpack states of openai/consistency_models_cifar10

JCM_TREES = ("params_ema", "params", "target_params")


def read_jcm_state(path: str) -> dict:
    """The state dict of a jcm checkpoint: ``flax.serialization.msgpack_restore`` of the file (the
    bytes ``flax.serialization.to_bytes`` wrote; nothing is unpickled), nested dicts of arrays.

    Raises:
      ConvertError: no such file, or a file that is truncated or not a flax msgpack state.
    """
    from flax import serialization

    if not os.path.isfile(path):
        raise ConvertError(f"No checkpoint file {path!r}.")
    with open(path, "rb") as f:
        data = f.read()
    try:
        state = serialization.msgpack_restore(data)
    except Exception as e:  # noqa: BLE001 -- msgpack's errors (ExtraData, ValueError, ...) alike
        raise ConvertError(
            f"{path} is not a readable flax msgpack checkpoint (truncated, or not a "
            f"file of jcm's checkpoints.save_checkpoint?): "
            f"{type(e).__name__}: {str(e)[:200]}"
        ) from None
    if not isinstance(state, dict):
        raise ConvertError(f"{path} holds a msgpack {type(state).__name__}, not a flax state.")
    return state


def _jcm_name(path: Sequence[str]) -> str:
    """jcm's name (``/``-joined) of a parameter of this library's NCSN++, module by module: jcm's
    ``ResnetBlockBigGANpp``, ``AttnBlockpp`` (q, k, v, out as ``NIN`` W/b) and the input pyramid's
    ``Downsample/Conv2d`` (weight) are ``ResBlock``, ``AttnBlock`` (Dense kernel/bias) and
    ``FIRConv2d`` (kernel) here, created in the same order and laid out the same way."""
    head, rest = path[0], list(path[1:])
    kind, _, index = head.rpartition("_")
    if kind == "ResBlock":
        head = f"ResnetBlockBigGANpp_{index}"
    elif kind == "AttnBlock":
        head = f"AttnBlockpp_{index}"
        if rest[0].startswith("Dense_"):
            rest = ["NIN_" + rest[0].split("_")[1], {"kernel": "W", "bias": "b"}[rest[1]]]
    elif kind == "FIRConv2d":
        head = f"Downsample_{index}/Conv2d_0"
        rest = [{"kernel": "weight"}.get(r, r) for r in rest]
    return "/".join([head] + rest)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(_flatten(v, name + "/"))
        else:
            flat[name] = v
    return flat


def jcm_params(
    tree: Mapping[str, Any],
    model_kwargs: Mapping[str, Any],
    image_size: int,
    num_channels: int = 3,
    *,
    source: str = "the checkpoint",
) -> PyTree:
    """The ``NCSNpp(**model_kwargs)`` parameters of a jcm NCSN++ parameter tree (float32 NumPy).

    Every tensor keeps its layout (both are flax: HWIO convolutions, (in, out) dense kernels);
    only the module names differ (``_jcm_name``). jcm's network takes c_noise = 0.25·ln σ, the
    ``sigmas.c_noise = "jcm"`` of configs/cifar10.py, and its GroupNorms have min(C/4, 32) groups
    and ε = 1e-6 like ``layers.group_norm``.

    Args:
      tree: one parameter tree of the state (``params_ema``, ``params`` or ``target_params``).
      model_kwargs: the NCSNpp arguments.
      image_size, num_channels, source: as for ``cm_params``.

    Returns:
      The ``NCSNpp`` params tree, float32.

    Raises:
      ConvertError: tensors missing, unexpected or of the wrong shape (named by their jcm paths), or
        a network the arguments do not describe.
    """
    import jax

    from consistency_jax.networks import layers
    from consistency_jax.networks.ncsnpp import NCSNpp

    try:
        abstract = _plain(layers.abstract_params(NCSNpp(**model_kwargs), image_size, num_channels))
    except (TypeError, ValueError) as e:
        raise ConvertError(
            f"The architecture flags do not describe an NCSN++ for "
            f"{image_size}x{image_size}x{num_channels} images: {e}"
        ) from None
    want = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        keys = tuple(p.key for p in path)
        want[_jcm_name(keys)] = (keys, tuple(leaf.shape))
    got = _flatten(tree)
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    wrong = [
        f"{k} {tuple(np.shape(got[k]))} (expected {want[k][1]})"
        for k in want
        if k in got and tuple(np.shape(got[k])) != want[k][1]
    ]
    described = (
        "the NCSN++ described ("
        + ", ".join(
            f"{k}={model_kwargs[k]}"
            for k in ("nf", "ch_mult", "num_res_blocks", "attn_resolutions")
            if k in model_kwargs
        )
        + f", image_size={image_size})"
    )
    _refuse_mismatch(
        source,
        described,
        missing,
        extra,
        wrong,
        "--nf, --ch_mult, --num_res_blocks, --attn_resolutions, --image_size",
    )
    params: dict = {}
    for name, (keys, _) in want.items():
        value = np.asarray(got[name])
        if not np.issubdtype(value.dtype, np.floating):
            raise ConvertError(
                f"{source}: tensor {name} has dtype {value.dtype}, not floating point."
            )
        node = params
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = np.ascontiguousarray(value.astype(np.float32))
    _check_tree(params, abstract)
    return params


# --------------------------------------------------------------------------------------------------
# diffusers: UNet2DModel copies of cm's models (scripts/convert_consistency_to_diffusers.py)

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# config.json fields that must hold these values for the ADM UNet to be the network described.
_DIFFUSERS_FIXED = dict(
    time_embedding_type="positional",
    flip_sin_to_cos=True,
    freq_shift=0,
    center_input_sample=False,
    mid_block_type="UNetMidBlock2D",
    add_attention=True,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=_CM_GROUPS,
    norm_eps=1e-5,
    class_embed_type=None,
    downsample_type="resnet",
    upsample_type="resnet",
)
# Fields read below, and those with no effect on the network's weights or its output.
_DIFFUSERS_READ = (
    "sample_size",
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
    "attention_head_dim",
    "attn_norm_num_groups",
    "resnet_time_scale_shift",
    "num_class_embeds",
    "time_embedding_dim",
)
_DIFFUSERS_IGNORED = ("dropout", "downsample_padding", "num_train_timesteps")
_RESNET = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)
_DEPRECATED_ATTENTION = (
    (".query.", ".to_q."),
    (".key.", ".to_k."),
    (".value.", ".to_v."),
    (".proj_attn.", ".to_out.0."),
)


def diffusers_files(path: str) -> tuple[str, str]:
    """(weights, config.json) of a diffusers UNet: a weights file with ``config.json`` beside it, a
    directory holding both (``save_pretrained``'s), or a pipeline directory with a ``unet/`` one.

    Raises:
      ConvertError: no weights file or no config.json there.
    """
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "unet")):
            path = os.path.join(path, "unet")
        found = [
            os.path.join(path, n)
            for n in DIFFUSERS_WEIGHTS
            if os.path.isfile(os.path.join(path, n))
        ]
        if not found:
            raise ConvertError(
                f"{path} holds no {' or '.join(DIFFUSERS_WEIGHTS)}; give the UNet's "
                "directory (or the pipeline's, with unet/) or its weights file."
            )
        weights = found[0]
    elif os.path.isfile(path):
        weights = path
    else:
        raise ConvertError(f"No checkpoint file or directory {path!r}.")
    config = os.path.join(os.path.dirname(weights), "config.json")
    if not os.path.isfile(config):
        raise ConvertError(
            f"No config.json beside {weights}: a diffusers UNet's architecture is read from it."
        )
    return weights, config


def read_diffusers_config(path: str) -> dict:
    """The ``config.json`` of a ``UNet2DModel``, as a dict.

    Raises:
      ConvertError: unreadable JSON, or not a UNet2DModel's config.
    """
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path} is not a readable JSON file: {e}") from None
    if not isinstance(config, dict) or config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        name = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        raise ConvertError(f"{path} describes a {name}, not a UNet2DModel.")
    return config


def diffusers_arch(config: Mapping[str, Any], source: str = "config.json") -> dict:
    """The ADMUNet arguments (plus ``image_size`` and ``num_channels``) of a ``UNet2DModel`` config.

    The ADM UNet of cm is a UNet2DModel with ResNet up/down-sampling, ``ResnetDownsampleBlock2D`` /
    ``AttnDownBlock2D`` levels mirrored by ``AttnUpBlock2D`` / ``ResnetUpsampleBlock2D`` ones, the
    [cos | sin] timestep embedding with frequencies 10000^(−i/half) and MLP width 4·C₀, GroupNorm32
    (ε = 1e-5) and SiLU; other configs are refused, naming the field.

    Raises:
      ConvertError: a field the ADM UNet cannot represent (named), or an unknown field.
    """

    def refuse(field: str, why: str) -> None:
        raise ConvertError(
            f"{source}: {field}={config.get(field)!r}: {why}; the ADM UNet of "
            "consistency models cannot represent it."
        )

    unknown = [
        k
        for k in config
        if not k.startswith("_")
        and k not in _DIFFUSERS_FIXED
        and k not in _DIFFUSERS_READ
        and k not in _DIFFUSERS_IGNORED
    ]
    if unknown:
        raise ConvertError(
            f"{source}: unknown UNet2DModel field(s) {_listing(unknown)}; the "
            "converter knows diffusers' UNet2DModel fields up to version 0.42."
        )
    for field, value in _DIFFUSERS_FIXED.items():
        if field in config and config[field] != value:
            refuse(field, f"only {value!r} is supported")
    for field in ("downsample_type", "upsample_type"):
        if field not in config:  # UNet2DModel's default is "conv"
            refuse(field, "only 'resnet' is supported")
    size = config.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            refuse("sample_size", "only square images are supported")
        size = size[0]
    if not isinstance(size, int) or size < 1:
        refuse("sample_size", "an image side is needed")
    channels = config.get("in_channels", 3)
    if config.get("out_channels", 3) != channels:
        refuse("out_channels", f"must equal in_channels ({channels})")
    widths = list(config.get("block_out_channels") or ())
    if not widths or any(not isinstance(w, int) or w % widths[0] for w in widths):
        refuse("block_out_channels", "widths must be multiples of the first")
    down = list(config.get("down_block_types") or ())
    up = list(config.get("up_block_types") or ())
    kinds = {"ResnetDownsampleBlock2D": "ResnetUpsampleBlock2D", "AttnDownBlock2D": "AttnUpBlock2D"}
    if len(down) != len(widths) or any(d not in kinds for d in down):
        refuse("down_block_types", f"one of {sorted(kinds)} per entry of block_out_channels")
    if up != [kinds[d] for d in reversed(down)]:
        refuse(
            "up_block_types",
            "must mirror down_block_types (AttnUpBlock2D for AttnDownBlock2D, "
            "ResnetUpsampleBlock2D for ResnetDownsampleBlock2D)",
        )
    if config.get("time_embedding_dim") not in (None, 4 * widths[0]):
        refuse("time_embedding_dim", f"only 4·block_out_channels[0] = {4 * widths[0]} (or null)")
    shift = config.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        refuse("resnet_time_scale_shift", "only 'default' or 'scale_shift' is supported")
    # With scale_shift and no attn_norm_num_groups the middle attention has no GroupNorm.
    if config.get("attn_norm_num_groups") not in (
        (None, _CM_GROUPS) if shift == "default" else (_CM_GROUPS,)
    ):
        refuse("attn_norm_num_groups", f"the attention GroupNorms must have {_CM_GROUPS} groups")
    head_dim = config.get("attention_head_dim")
    if head_dim is not None and (not isinstance(head_dim, int) or head_dim < 1):
        refuse("attention_head_dim", "a positive channel count per head (or null) is needed")
    classes = config.get("num_class_embeds")
    if classes is not None and (not isinstance(classes, int) or classes < 1):
        refuse("num_class_embeds", "a positive class count (or null) is needed")
    layers_per_block = config.get("layers_per_block", 2)
    if not isinstance(layers_per_block, int) or layers_per_block < 1:
        refuse("layers_per_block", "a positive count is needed")
    return dict(
        image_size=size,
        num_channels=channels,
        model_channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=layers_per_block,
        attention_resolutions=tuple(
            size // 2**level for level, d in enumerate(down) if d == "AttnDownBlock2D"
        ),
        num_head_channels=-1 if head_dim is None else head_dim,
        num_heads=1,
        num_classes=classes,
        use_scale_shift_norm=shift == "scale_shift",
        resblock_updown=True,
    )


def _diffusers_modules(kwargs: Mapping[str, Any], image_size: int) -> dict[str, str]:
    """cm module name -> diffusers module name, walking the network as ``_cm_layout`` does
    (the correspondence of diffusers' ``scripts/convert_consistency_to_diffusers.py``); an
    attention's ``qkv`` maps to the attention module (its to_q, to_k, to_v)."""
    m = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "label_emb": "class_embedding",
        "input_blocks.0.0": "conv_in",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
    }

    def resblock(cm: str, d: str) -> None:
        m.update({f"{cm}.{a}": f"{d}.{b}" for a, b in _RESNET})

    def attention(cm: str, d: str) -> None:
        m.update(
            {f"{cm}.norm": f"{d}.group_norm", f"{cm}.qkv": d, f"{cm}.proj_out": f"{d}.to_out.0"}
        )

    mult, attn, nrb = (
        tuple(kwargs["channel_mult"]),
        tuple(kwargs["attention_resolutions"]),
        kwargs["num_res_blocks"],
    )
    block, res = 1, image_size
    for level in range(len(mult)):
        for j in range(nrb):
            resblock(f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}")
            if res in attn:
                attention(f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{j}")
            block += 1
        if level != len(mult) - 1:
            resblock(f"input_blocks.{block}.0", f"down_blocks.{level}.downsamplers.0")
            block, res = block + 1, res // 2
    resblock("middle_block.0", "mid_block.resnets.0")
    attention("middle_block.1", "mid_block.attentions.0")
    resblock("middle_block.2", "mid_block.resnets.1")
    block = 0
    for level in reversed(range(len(mult))):
        i = len(mult) - 1 - level
        for j in range(nrb + 1):
            resblock(f"output_blocks.{block}.0", f"up_blocks.{i}.resnets.{j}")
            sub = 1
            if res in attn:
                attention(f"output_blocks.{block}.1", f"up_blocks.{i}.attentions.{j}")
                sub = 2
            if level and j == nrb:
                resblock(f"output_blocks.{block}.{sub}", f"up_blocks.{i}.upsamplers.0")
                res *= 2
            block += 1
    return m


def diffusers_state_dict(
    state_dict: Mapping[str, np.ndarray],
    model_kwargs: Mapping[str, Any],
    image_size: int,
    num_channels: int = 3,
    *,
    source: str = "the checkpoint",
) -> dict[str, np.ndarray]:
    """The cm state dict (cm's names and layouts, for ``cm_params``) of a diffusers ``UNet2DModel``
    state dict of the network ``model_kwargs`` (``diffusers_arch``).

    Every tensor keeps its values: diffusers' ``to_q``, ``to_k``, ``to_v`` (C, C) are the rows
    [0, C), [C, 2C), [2C, 3C) of cm's ``qkv`` (3C, C, 1, 1) (heads of ``attention_head_dim``
    consecutive channels in both), ``to_out.0`` is ``proj_out`` without its 1×1 dimensions, and the
    others are renamed only. Attention tensors under the names of diffusers' deprecated attention
    block (query, key, value, proj_attn) are read as to_q, to_k, to_v, to_out.0.

    Raises:
      ConvertError: tensors missing, unexpected or of the wrong shape, named as diffusers names them.
    """
    renamed = {}
    for key, value in state_dict.items():
        if ".attentions." in key:
            for old, new in _DEPRECATED_ATTENTION:
                key = key.replace(old, new)
        renamed[key] = value
    _, lay = _cm_expected(model_kwargs, image_size, num_channels)
    modules = _diffusers_modules(model_kwargs, image_size)
    want: dict[str, tuple[str, tuple, int]] = {}  # diffusers key -> (cm key, shape, qkv part or -1)
    for cm_key, (_, shape, _) in lay.entries.items():
        module, leaf = cm_key.rsplit(".", 1)
        if module.endswith(".qkv"):
            c = shape[0] // 3
            part_shape = (c, shape[1]) if leaf == "weight" else (c,)
            for part, name in enumerate(("to_q", "to_k", "to_v")):
                want[f"{modules[module]}.{name}.{leaf}"] = (cm_key, part_shape, part)
        elif module.endswith(".proj_out") and leaf == "weight":
            want[f"{modules[module]}.{leaf}"] = (cm_key, shape[:2], -1)
        else:
            want[f"{modules[module]}.{leaf}"] = (cm_key, shape, -1)
    missing = [k for k in want if k not in renamed]
    extra = [k for k in renamed if k not in want]
    wrong = [
        f"{k} {tuple(np.shape(renamed[k]))} (expected {want[k][1]})"
        for k in want
        if k in renamed and tuple(np.shape(renamed[k])) != want[k][1]
    ]
    _refuse_mismatch(
        source,
        f"the UNet2DModel its config.json describes ({_describe(model_kwargs, image_size)})",
        missing,
        extra,
        wrong,
        "config.json beside it",
    )
    cm: dict[str, Any] = {}
    for key, (cm_key, _, part) in want.items():
        value = np.asarray(renamed[key])
        if part >= 0:
            cm.setdefault(cm_key, [None] * 3)[part] = value
        else:
            cm[cm_key] = value.reshape(lay.entries[cm_key][1])
    for cm_key, parts in cm.items():
        if isinstance(parts, list):
            cm[cm_key] = np.concatenate(parts).reshape(lay.entries[cm_key][1])
    return cm


# --------------------------------------------------------------------------------------------------
# The run


def _config_path(name: str) -> str:
    if name.endswith(".py") or os.sep in name:
        return name
    if name not in CM_CONFIGS + JCM_CONFIGS:
        raise ConvertError(
            f"--config must be one of {CM_CONFIGS + JCM_CONFIGS} or a configs/*.py "
            f"path, got {name!r}."
        )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(root, "configs", f"{name}.py")


def run_config(
    config: str,
    method: str,
    *,
    metric: str = "lpips",
    category: str = "bedroom",
    arch: Mapping[str, Any] | None = None,
):
    """The config of a converted run: ``configs/<config>.py`` with ``method`` (edm, cd or ct; the
    LSUN EDM teachers take the LSUN file's network with the EDM method), the network arguments
    overridden by ``arch`` (ADMUNet arguments, plus ``image_size`` and ``num_channels``), and no
    eval EMAs (the run holds the released weights as θ).

    Raises:
      ConvertError: an unknown config or method.
    """
    from consistency_jax import config as common

    if method not in ("edm", "cd", "ct"):
        raise ConvertError(f"--method must be edm, cd or ct (the released models), got {method!r}.")
    path = _config_path(config)
    args = {"method": method}
    name = os.path.splitext(os.path.basename(path))[0]
    if name == "lsun256":
        args.update(category=category)
    if method == "cd":
        args.update(metric=metric)
    try:
        c = common.load_config(path, ",".join(f"{k}={v}" for k, v in args.items()))
    except ValueError as e:
        raise ConvertError(f"--config={config} --method={method}: {e}") from None
    arch = dict(arch or {})
    image_size = arch.pop("image_size", None)
    num_channels = arch.pop("num_channels", None)
    if image_size:
        c.data.image_size = int(image_size)
    if num_channels:
        c.data.num_channels = int(num_channels)
    kwargs = dict(c.model.kwargs)
    kwargs.update(arch)
    if "num_classes" in arch:
        c.data.use_labels = kwargs["num_classes"] is not None
    c.model.kwargs = kwargs
    c.train.ema_rates = ()
    c.eval.ema_rate = 0.0
    return c


def abstract_params(c) -> PyTree:
    """The parameter shapes (``jax.ShapeDtypeStruct``) of the network of run config ``c``.

    Raises:
      ConvertError: the network cannot take the config's images (bad architecture flags).
    """
    from consistency_jax import networks
    from consistency_jax.networks import layers

    size, channels = int(c.data.image_size), int(c.data.num_channels)
    try:
        return layers.abstract_params(networks.from_config(c.model), size, channels)
    except (TypeError, ValueError) as e:
        raise ConvertError(
            f"The architecture flags do not describe a {c.model.name} network for "
            f"{size}x{size}x{channels} images: {e}"
        ) from None


def _needs_fixed_groups(abstract: PyTree) -> bool:
    """True when ``layers.num_groups`` would not give cm's 32 groups to some GroupNorm."""
    import jax

    from consistency_jax.networks import layers

    widths = {
        a.shape[0]
        for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]
        if "GroupNorm" in jax.tree_util.keystr(p)
    }
    bad = [w for w in widths if w % _CM_GROUPS]
    if bad:
        raise ConvertError(
            f"cm's GroupNorm32 needs channel counts divisible by 32; the architecture "
            f"flags give {sorted(bad)}."
        )
    return any(layers.num_groups(w) != _CM_GROUPS for w in widths)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _prepare_out(out: str, overwrite: bool) -> None:
    from consistency_jax.checkpoint import CHECKPOINT_SUBDIR, CHECKSUM_SUBDIR, UNREADABLE_SUBDIR

    if os.path.exists(out) and not os.path.isdir(out):
        raise ConvertError(f"--out={out} exists and is not a directory.")
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise ConvertError(
                f"--out={out} exists and is not empty; pass --overwrite to replace "
                "the run there, or choose another directory."
            )
        for name in (CHECKPOINT_SUBDIR, CHECKSUM_SUBDIR, UNREADABLE_SUBDIR, PROVENANCE):
            p = os.path.join(out, name)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
    os.makedirs(out, exist_ok=True)


def convert_cm(
    checkpoint: str,
    out: str,
    *,
    config: str = "imagenet64",
    method: str = "cd",
    metric: str = "lpips",
    category: str = "bedroom",
    arch: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict:
    """Converts a released cm checkpoint into the run directory ``out``.

    Everything is read and checked before anything is written: the file, every tensor's name and
    shape against the network of ``config`` (+ ``arch``), and the output directory.

    Args:
      checkpoint: the state dict (``.pt`` or ``.safetensors``).
      out: the run directory to write (must be absent or empty unless ``overwrite``).
      config: "imagenet64", "lsun256" or a configs/*.py path.
      method: "edm" (a teacher), "cd" or "ct".
      metric: CD's metric (l2 or lpips; it fixes the config's 2-step times).
      category: LSUN category (bedroom or cat).
      arch: ADMUNet arguments overriding the config's network, plus image_size / num_channels.
      overwrite: replace a run already in ``out``.

    Returns:
      A summary: out, method, the number of tensors and parameters, the checkpoint's sha256.

    Raises:
      ConvertError: as ``read_state_dict``, ``cm_params`` and ``run_config``, or ``out`` not empty.
    """
    c, out = _adm_run(config, method, metric, category, arch, out, overwrite, "cm")
    state_dict = read_state_dict(checkpoint)
    params = cm_params(
        state_dict,
        c.model.kwargs,
        int(c.data.image_size),
        int(c.data.num_channels),
        source=checkpoint,
    )
    return _write_run(
        c,
        params,
        out,
        overwrite,
        dict(
            source="cm",
            checkpoint=os.path.abspath(checkpoint),
            method=method,
            config=config,
            tensors=len(state_dict),
        ),
    )


def _adm_run(
    config: str,
    method: str,
    metric: str,
    category: str,
    arch: Mapping[str, Any] | None,
    out: str,
    overwrite: bool,
    source: str,
):
    """The run config of a converted ADM UNet (cm's 32 GroupNorm groups where ``layers.num_groups``
    would differ) and the absolute output path, refused before a large file is read if not empty."""
    c = run_config(config, method, metric=metric, category=category, arch=arch)
    if c.model.name != "adm":
        raise ConvertError(
            f"--config={config} does not use the ADM UNet (model.name="
            f"{c.model.name!r}); {source} checkpoints are ADM UNets."
        )
    out = os.path.abspath(out)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        _prepare_out(out, overwrite)  # refuse before reading a large file
    if _needs_fixed_groups(
        abstract_params(c)
    ):  # narrow networks: cm's 32 groups, not num_groups(C)
        c.model.kwargs = dict(c.model.kwargs, norm_groups=_CM_GROUPS)
    return c, out


def _write_run(c, params: PyTree, out: str, overwrite: bool, summary: dict) -> dict:
    """Writes the run directory ``out``: θ = ``params`` (no eval EMA, θ⁻ or optimizer state) at
    step 0 with config ``c``, and ``converted_from.json`` (``summary`` plus the checkpoint's
    sha256, the parameter count and the network). Returns the completed summary."""
    import jax
    import optax

    from consistency_jax.checkpoint import Checkpointer
    from consistency_jax.networks import layers
    from consistency_jax.train_state import TrainState

    _prepare_out(out, overwrite)
    state = TrainState.create(
        jax.tree.map(jax.numpy.asarray, params), optax.identity(), ema_rates=(), use_target=False
    )
    ckpt = Checkpointer(out, every=1, keep=1, async_save=False)
    try:
        ckpt.save(state, step=0, data_state={}, config=c)
    finally:
        ckpt.close()
    summary = dict(
        summary,
        sha256=_sha256(summary["checkpoint"]),
        out=out,
        parameters=layers.count_params(params),
        model=dict(c.model.kwargs),
        image_size=int(c.data.image_size),
        num_channels=int(c.data.num_channels),
    )
    with open(os.path.join(out, PROVENANCE), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    return summary


def convert_diffusers(
    checkpoint: str,
    out: str,
    *,
    config: str = "",
    method: str = "cd",
    metric: str = "lpips",
    category: str = "bedroom",
    overwrite: bool = False,
) -> dict:
    """Converts a diffusers copy of a released cm model (a ``UNet2DModel``) into the run ``out``.

    The network is read from the ``config.json`` beside the weights (``diffusers_arch``); the
    tensors are renamed to cm's (``diffusers_state_dict``) and mapped as ``cm_params`` maps cm's.
    diffusers' ``CMStochasticIterativeScheduler`` feeds the UNet ``sigma_to_t(σ)`` =
    1000·0.25·ln(σ + 1e-44), cm's time input (``sigmas.c_noise = "cm"``), and scales its input by
    c_in(σ) as cm does, so the run's denoiser is the pipeline's. Everything is read and checked
    before anything is written.

    Args:
      checkpoint: ``diffusion_pytorch_model.safetensors`` (config.json beside it), the UNet's
        directory, or a pipeline directory with ``unet/`` (``openai/diffusers-cd_imagenet64_l2``).
      out: the run directory to write (must be absent or empty unless ``overwrite``).
      config: "imagenet64", "lsun256" or a configs/*.py path for everything but the network
        (default: imagenet64 for a class-conditional UNet, lsun256 otherwise).
      method, metric, category, overwrite: as for ``convert_cm``.

    Returns:
      A summary: out, method, the number of tensors and parameters, the checkpoint's sha256.

    Raises:
      ConvertError: as ``diffusers_files``, ``read_diffusers_config``, ``diffusers_arch``,
        ``read_state_dict``, ``diffusers_state_dict`` and ``run_config``, or ``out`` not empty.
    """
    weights, config_json = diffusers_files(checkpoint)
    arch = diffusers_arch(read_diffusers_config(config_json), config_json)
    config = config or ("imagenet64" if arch["num_classes"] else "lsun256")
    c, out = _adm_run(config, method, metric, category, arch, out, overwrite, "diffusers")
    size, channels = int(c.data.image_size), int(c.data.num_channels)
    state_dict = read_state_dict(weights)
    params = cm_params(
        diffusers_state_dict(state_dict, c.model.kwargs, size, channels, source=weights),
        c.model.kwargs,
        size,
        channels,
        source=weights,
    )
    return _write_run(
        c,
        params,
        out,
        overwrite,
        dict(
            source="diffusers",
            checkpoint=os.path.abspath(weights),
            method=method,
            config=config,
            tensors=len(state_dict),
        ),
    )


def convert_jcm(
    checkpoint: str,
    out: str,
    *,
    config: str = "cifar10",
    method: str = "cd",
    metric: str = "lpips",
    tree: str = "params_ema",
    arch: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict:
    """Converts a released jcm checkpoint (CIFAR-10, flax msgpack) into the run directory ``out``.

    The run's θ is the state's ``tree``: ``params_ema`` by default, the weights jcm evaluates and
    distils from (its CD teacher is the EDM state's ``params_ema``). Everything is read and checked
    before anything is written.

    Args:
      checkpoint: the msgpack file (``edm_cifar10_ema``, ``cd-lpips/checkpoints/checkpoint_80``, ...).
      out: the run directory to write (must be absent or empty unless ``overwrite``).
      config: "cifar10" or a configs/*.py path with an NCSN++ network.
      method: "edm" (a teacher), "cd" or "ct".
      metric: the config's distance for CD/CT (lpips, l2 or l1).
      tree: which parameters of the state: params_ema, params or target_params.
      arch: NCSNpp arguments overriding the config's network, plus image_size / num_channels.
      overwrite: replace a run already in ``out``.

    Returns:
      A summary: out, method, the number of tensors and parameters, the checkpoint's sha256.

    Raises:
      ConvertError: as ``read_jcm_state``, ``jcm_params`` and ``run_config``, a state without
        ``tree``, or ``out`` not empty.
    """
    if tree not in JCM_TREES:
        raise ConvertError(f"--jcm_tree must be one of {JCM_TREES}, got {tree!r}.")
    c = run_config(config, method, metric=metric, arch=arch)
    if c.model.name != "ncsnpp":
        raise ConvertError(
            f"--config={config} does not use NCSN++ (model.name={c.model.name!r}); "
            "jcm checkpoints are NCSN++ networks."
        )
    size, channels = int(c.data.image_size), int(c.data.num_channels)
    out = os.path.abspath(out)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        _prepare_out(out, overwrite)  # refuse before reading a large file
    state = read_jcm_state(checkpoint)
    if not isinstance(state.get(tree), Mapping):
        raise ConvertError(
            f"{checkpoint} has no parameter tree {tree!r} (its entries: "
            f"{_listing(list(state))}); is it a jcm checkpoint?"
        )
    params = jcm_params(state[tree], c.model.kwargs, size, channels, source=checkpoint)
    return _write_run(
        c,
        params,
        out,
        overwrite,
        dict(
            source="jcm",
            checkpoint=os.path.abspath(checkpoint),
            tree=tree,
            method=method,
            config=config,
            tensors=len(_flatten(state[tree])),
        ),
    )


# --------------------------------------------------------------------------------------------------
# Command line


def _define_flags():
    from absl import flags

    flags.DEFINE_enum(
        "from",
        "cm",
        list(SOURCES),
        "The source: cm (the PyTorch state dicts of "
        "openai/consistency_models), diffusers (their UNet2DModel copies, "
        "openai/diffusers-*) or jcm (the flax msgpack states of "
        "openai/consistency_models_cifar10).",
    )
    flags.DEFINE_string(
        "checkpoint",
        None,
        "The checkpoint: a .pt state dict or a .safetensors file "
        "(cm); diffusion_pytorch_model.safetensors with config.json beside it, or "
        "the UNet's or pipeline's directory (diffusers); a flax msgpack file (jcm).",
    )
    flags.DEFINE_string(
        "config",
        "",
        "imagenet64 | lsun256 (cm) | cifar10 (jcm) | a configs/*.py "
        "path: the network, data shape and noise configuration of the run (default: "
        "imagenet64 for cm, cifar10 for jcm; for diffusers the network is "
        "config.json's and the default imagenet64 if it has classes, else lsun256).",
    )
    flags.DEFINE_enum(
        "method",
        "cd",
        ["edm", "cd", "ct"],
        "What the checkpoint is: an EDM teacher (edm_*), a CD model (cd_*) or a CT model (ct_*).",
    )
    flags.DEFINE_enum(
        "metric",
        "lpips",
        ["l1", "l2", "lpips"],
        "CD's metric (sets the 2-step times of cm's configs; l1 is jcm's CIFAR-10 ablation).",
    )
    flags.DEFINE_enum(
        "jcm_tree",
        "params_ema",
        list(JCM_TREES),
        "Which parameters of a jcm state "
        "become the run's weights (params_ema: what jcm evaluates and distils from).",
    )
    flags.DEFINE_enum("category", "bedroom", ["bedroom", "cat"], "LSUN category (lsun256).")
    flags.DEFINE_string("out", None, "The run directory to write.")
    flags.DEFINE_bool("overwrite", False, "Replace a run already in --out.")
    flags.DEFINE_integer("image_size", 0, "Image side (0: the config's).")
    flags.DEFINE_integer("num_channels", 0, "Image channels (0: the config's).")
    flags.DEFINE_integer("model_channels", 0, "Base channels (0: the config's).")
    flags.DEFINE_list("channel_mult", [], "Channel multipliers per level, e.g. 1,2,3,4.")
    flags.DEFINE_integer("num_res_blocks", 0, "Residual blocks per level (0: the config's).")
    flags.DEFINE_list(
        "attention_resolutions",
        [],
        "Resolutions in pixels with attention, e.g. 32,16,8 (cm's flag).",
    )
    flags.DEFINE_integer("num_head_channels", 0, "Channels per head (-1: use --num_heads).")
    flags.DEFINE_integer("num_heads", 0, "Heads when num_head_channels is -1.")
    flags.DEFINE_integer("num_classes", -1, "Classes (0: unconditional; -1: the config's).")
    flags.DEFINE_enum("use_scale_shift_norm", "", ["", "true", "false"], "FiLM conditioning.")
    flags.DEFINE_enum("resblock_updown", "", ["", "true", "false"], "Resample with ResBlocks.")
    flags.DEFINE_integer("nf", 0, "NCSN++ base channels (jcm's model.nf; 0: the config's).")
    flags.DEFINE_list("ch_mult", [], "NCSN++ channel multipliers per level, e.g. 2,2,2.")
    flags.DEFINE_list(
        "attn_resolutions", [], "NCSN++ resolutions in pixels with attention, e.g. 16."
    )


def _arch_from_flags(f) -> dict:
    arch: dict[str, Any] = {}
    for name in ("image_size", "num_channels", "model_channels", "num_res_blocks", "num_heads"):
        if f[name].value:
            arch[name] = f[name].value
    if f.num_head_channels:
        arch["num_head_channels"] = f.num_head_channels
    if f.channel_mult:
        arch["channel_mult"] = tuple(float(m) if "." in m else int(m) for m in f.channel_mult)
    if f.attention_resolutions:
        arch["attention_resolutions"] = tuple(int(r) for r in f.attention_resolutions)
    if f.num_classes >= 0:
        arch["num_classes"] = f.num_classes or None
    for name in ("use_scale_shift_norm", "resblock_updown"):
        if f[name].value:
            arch[name] = f[name].value == "true"
    return arch


def _jcm_arch_from_flags(f) -> dict:
    arch: dict[str, Any] = {}
    for name in ("image_size", "num_channels", "nf", "num_res_blocks"):
        if f[name].value:
            arch[name] = f[name].value
    if f.ch_mult:
        arch["ch_mult"] = tuple(int(m) for m in f.ch_mult)
    if f.attn_resolutions:
        arch["attn_resolutions"] = tuple(int(r) for r in f.attn_resolutions)
    return arch


def main(argv) -> None:
    import sys

    from absl import flags, logging

    f = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"Unexpected arguments: {argv[1:]}")
    try:
        if not f.checkpoint or not f.out:
            raise ConvertError("--checkpoint and --out are required.")
        if f["from"].value == "jcm":
            summary = convert_jcm(
                f.checkpoint,
                f.out,
                config=f.config or "cifar10",
                method=f.method,
                metric=f.metric,
                tree=f.jcm_tree,
                arch=_jcm_arch_from_flags(f),
                overwrite=f.overwrite,
            )
        elif f["from"].value == "diffusers":
            summary = convert_diffusers(
                f.checkpoint,
                f.out,
                config=f.config,
                method=f.method,
                metric=f.metric,
                category=f.category,
                overwrite=f.overwrite,
            )
        else:
            summary = convert_cm(
                f.checkpoint,
                f.out,
                config=f.config or "imagenet64",
                method=f.method,
                metric=f.metric,
                category=f.category,
                arch=_arch_from_flags(f),
                overwrite=f.overwrite,
            )
    except ConvertError as e:
        logging.flush()
        print(f"ConvertError: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(
        f"Converted {summary['tensors']} tensors ({summary['parameters'] / 1e6:.2f}M parameters) "
        f"into {summary['out']} (method={summary['method']})."
    )


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
