"""jcm: the flax msgpack states of openai/consistency_models_cifar10 (NCSN++), onto
``networks.ncsnpp.NCSNpp``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from consistency_jax.convert.common import (
    ConvertError,
    PyTree,
    check_finite,
    check_tree,
    listing,
    plain,
    refuse_mismatch,
)
from consistency_jax.convert.run import prepare_out, run_config, write_run

__all__ = ["JCM_TREES", "convert_jcm", "jcm_params", "read_jcm_state"]

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
        abstract = plain(layers.abstract_params(NCSNpp(**model_kwargs), image_size, num_channels))
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
    refuse_mismatch(
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
        check_finite(value, source, name)
        node = params
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = np.ascontiguousarray(value.astype(np.float32))
    check_tree(params, abstract)
    return params


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
        prepare_out(out, overwrite)  # refuse before reading a large file
    state = read_jcm_state(checkpoint)
    if not isinstance(state.get(tree), Mapping):
        raise ConvertError(
            f"{checkpoint} has no parameter tree {tree!r} (its entries: "
            f"{listing(list(state))}); is it a jcm checkpoint?"
        )
    params = jcm_params(state[tree], c.model.kwargs, size, channels, source=checkpoint)
    return write_run(
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
