"""The run directory a conversion writes: its config (``configs/<name>.py`` with the source's
network), θ at step 0 (no eval EMA, θ⁻ or optimizer state) and ``converted_from.json``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

from consistency_jax.convert.common import CM_GROUPS, ConvertError, PyTree

__all__ = [
    "CM_CONFIGS",
    "JCM_CONFIGS",
    "PROVENANCE",
    "abstract_params",
    "adm_run",
    "config_path",
    "file_sha256",
    "needs_fixed_groups",
    "prepare_out",
    "run_config",
    "write_run",
]

CM_CONFIGS = ("imagenet64", "lsun256")
JCM_CONFIGS = ("cifar10",)
PROVENANCE = "converted_from.json"


def config_path(name: str) -> str:
    if name.endswith(".py") or os.sep in name:
        return name
    if name not in CM_CONFIGS + JCM_CONFIGS:
        raise ConvertError(
            f"--config must be one of {CM_CONFIGS + JCM_CONFIGS} or a configs/*.py "
            f"path, got {name!r}."
        )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
    path = config_path(config)
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


def needs_fixed_groups(abstract: PyTree) -> bool:
    """True when ``layers.num_groups`` would not give cm's 32 groups to some GroupNorm."""
    import jax

    from consistency_jax.networks import layers

    widths = {
        a.shape[0]
        for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]
        if "GroupNorm" in jax.tree_util.keystr(p)
    }
    bad = [w for w in widths if w % CM_GROUPS]
    if bad:
        raise ConvertError(
            f"cm's GroupNorm32 needs channel counts divisible by 32; the architecture "
            f"flags give {sorted(bad)}."
        )
    return any(layers.num_groups(w) != CM_GROUPS for w in widths)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare_out(out: str, overwrite: bool) -> None:
    from consistency_jax.checkpoint import CHECKPOINT_SUBDIR, CHECKSUM_SUBDIR, UNREADABLE_SUBDIR

    if os.path.exists(out) and not os.path.isdir(out):
        raise ConvertError(f"--out={out} exists and is not a directory.")
    parent = os.path.dirname(os.path.abspath(out))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ConvertError(
            f"--out={out} lies below {parent}, which is a file, not a directory; choose another "
            "directory."
        )
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
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ConvertError(f"--out={out} cannot be created: {e.strerror or e}.") from None


def adm_run(
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
        prepare_out(out, overwrite)  # refuse before reading a large file
    if needs_fixed_groups(abstract_params(c)):  # narrow networks: cm's 32 groups, not num_groups(C)
        c.model.kwargs = dict(c.model.kwargs, norm_groups=CM_GROUPS)
    return c, out


def write_run(c, params: PyTree, out: str, overwrite: bool, summary: dict) -> dict:
    """Writes the run directory ``out``: θ = ``params`` (no eval EMA, θ⁻ or optimizer state) at
    step 0 with config ``c``, and ``converted_from.json`` (``summary`` plus the checkpoint's
    sha256, the parameter count and the network). Returns the completed summary."""
    import jax
    import optax

    from consistency_jax.checkpoint import (
        CHECKPOINT_SUBDIR,
        CHECKSUM_SUBDIR,
        UNREADABLE_SUBDIR,
        Checkpointer,
    )
    from consistency_jax.networks import layers
    from consistency_jax.train_state import TrainState

    created = not os.path.exists(out)
    prepare_out(out, overwrite)
    try:
        state = TrainState.create(
            jax.tree.map(jax.numpy.asarray, params),
            optax.identity(),
            ema_rates=(),
            use_target=False,
        )
        ckpt = Checkpointer(out, every=1, keep=1, async_save=False)
        try:
            ckpt.save(state, step=0, data_state={}, config=c)
        finally:
            ckpt.close()
    except BaseException as e:  # leave nothing that would block the rerun
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for name in (CHECKPOINT_SUBDIR, CHECKSUM_SUBDIR, UNREADABLE_SUBDIR):
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        if not isinstance(e, Exception):
            raise
        raise ConvertError(
            f"Writing the run {out} failed ({type(e).__name__}: {str(e)[:300]}); what was "
            "written there is removed."
        ) from e
    summary = dict(
        summary,
        sha256=file_sha256(summary["checkpoint"]),
        out=out,
        parameters=layers.count_params(params),
        model=dict(c.model.kwargs),
        image_size=int(c.data.image_size),
        num_channels=int(c.data.num_channels),
    )
    with open(os.path.join(out, PROVENANCE), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    return summary
