"""The command ``python -m consistency_jax.convert``: flags, and one conversion per call."""

from __future__ import annotations

from typing import Any

from consistency_jax.convert.cm import convert_cm
from consistency_jax.convert.common import ConvertError
from consistency_jax.convert.diffusers import convert_diffusers
from consistency_jax.convert.jcm import JCM_TREES, convert_jcm

SOURCES = ("cm", "diffusers", "jcm")


def define_flags():
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
