"""cm: the PyTorch state dicts of openai/consistency_models (ADM UNets), mapped onto
``networks.unet.ADMUNet`` (the mapping is described in ``consistency_jax.convert``'s docstring)."""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from consistency_jax.convert.common import (
    ConvertError,
    PyTree,
    check_finite,
    check_tree,
    describe_adm,
    plain,
    refuse_mismatch,
    strip_ddp_prefix,
)
from consistency_jax.convert.run import adm_run, write_run

__all__ = ["CmLayout", "cm_expected", "cm_params", "convert_cm", "read_state_dict"]


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch state dict file (``.pt``/``.pth``/``.bin``) or a ``.safetensors`` file.

    ``.pt`` files are read by ``consistency_jax.torch_pickle`` (NumPy only, no PyTorch; nothing but
    tensors and containers is unpickled); bfloat16 tensors are widened to float32 (exactly).

    Raises:
      ConvertError: no such file, an unknown extension, a file that is truncated or not a
        checkpoint (or names a global other than a tensor's), or one that holds no flat mapping
        name -> tensor.
    """
    from consistency_jax import torch_pickle

    if not os.path.isfile(path):
        raise ConvertError(f"No checkpoint file {path!r}.")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".pt", ".pth", ".bin", ".safetensors"):
        raise ConvertError(f"{path}: give a PyTorch state dict (.pt, .pth) or a .safetensors file.")
    try:
        state = torch_pickle.read_state_dict(path)
    except torch_pickle.TorchPickleError as e:
        raise ConvertError(str(e)) from None
    return {
        k: v.astype(np.float32) if v.dtype == torch_pickle.STORAGE_DTYPES["BFloat16Storage"] else v
        for k, v in state.items()
    }


def _conv(w: np.ndarray) -> np.ndarray:  # (O, I, H, W) -> (H, W, I, O)
    return w.transpose(2, 3, 1, 0)


def _conv1x1_dense(w: np.ndarray) -> np.ndarray:  # a 1×1 convolution (O, I, 1, 1) -> a dense (I, O)
    return w[:, :, 0, 0].T


def _torch_conv_shape(kernel: tuple) -> tuple:  # inverse of _conv, for error messages
    return (kernel[3], kernel[2], kernel[0], kernel[1])


class CmLayout:
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


def _cm_layout(kwargs: Mapping[str, Any], image_size: int, abstract: Mapping[str, Any]) -> CmLayout:
    """Walks cm's ``UNetModel.__init__`` (input blocks, middle block, output blocks, head) in the
    order ``ADMUNet`` creates the same layers, pairing each cm name with its Flax path."""
    lay = CmLayout(abstract)
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


def cm_expected(
    model_kwargs: Mapping[str, Any], image_size: int, num_channels: int
) -> tuple[PyTree, CmLayout]:
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
    abstract = plain(abstract)
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
    abstract, lay = cm_expected(model_kwargs, image_size, num_channels)
    state_dict = strip_ddp_prefix(state_dict, source)
    missing = [k for k in lay.entries if k not in state_dict]
    extra = [k for k in state_dict if k not in lay.entries]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} (expected {lay.entries[k][1]})"
        for k in lay.entries
        if k in state_dict and tuple(state_dict[k].shape) != lay.entries[k][1]
    ]
    refuse_mismatch(
        source,
        f"the ADM UNet described ({describe_adm(model_kwargs, image_size)})",
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
        check_finite(value, source, key)
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
    check_tree(params, abstract)
    return params


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
    c, out = adm_run(config, method, metric, category, arch, out, overwrite, "cm")
    state_dict = read_state_dict(checkpoint)
    params = cm_params(
        state_dict,
        c.model.kwargs,
        int(c.data.image_size),
        int(c.data.num_channels),
        source=checkpoint,
    )
    return write_run(
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
