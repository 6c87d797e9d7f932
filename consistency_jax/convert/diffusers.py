"""diffusers: the ``UNet2DModel`` copies of cm's models (diffusers'
``scripts/convert_consistency_to_diffusers.py``), renamed to cm's names and mapped as cm's."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from consistency_jax.convert.cm import cm_expected, cm_params, read_state_dict
from consistency_jax.convert.common import (
    CM_GROUPS,
    ConvertError,
    describe_adm,
    listing,
    refuse_mismatch,
)
from consistency_jax.convert.run import adm_run, write_run

__all__ = [
    "DIFFUSERS_WEIGHTS",
    "convert_diffusers",
    "diffusers_arch",
    "diffusers_files",
    "diffusers_state_dict",
    "read_diffusers_config",
]

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
    norm_num_groups=CM_GROUPS,
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
            f"{source}: unknown UNet2DModel field(s) {listing(unknown)}; the "
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
        (None, CM_GROUPS) if shift == "default" else (CM_GROUPS,)
    ):
        refuse("attn_norm_num_groups", f"the attention GroupNorms must have {CM_GROUPS} groups")
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
    _, lay = cm_expected(model_kwargs, image_size, num_channels)
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
    refuse_mismatch(
        source,
        f"the UNet2DModel its config.json describes ({describe_adm(model_kwargs, image_size)})",
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
    c, out = adm_run(config, method, metric, category, arch, out, overwrite, "diffusers")
    size, channels = int(c.data.image_size), int(c.data.num_channels)
    state_dict = read_state_dict(weights)
    params = cm_params(
        diffusers_state_dict(state_dict, c.model.kwargs, size, channels, source=weights),
        c.model.kwargs,
        size,
        channels,
        source=weights,
    )
    return write_run(
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
