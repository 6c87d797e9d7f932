"""Converts LPIPS weights (PyTorch) into the one ``.safetensors`` file that
``consistency_jax.metrics.lpips.load_lpips_params`` reads.

Two inputs, both plain state_dicts read with ``torch.load(weights_only=True)`` (no pickle code):

* the backbone: torchvision's ImageNet weights, which you download yourself (nothing in the
  library or the tests downloads anything). The lpips package uses the IMAGENET1K_V1 weights:
  ``vgg16-397923af.pth`` for ``--net vgg`` and ``alexnet-owt-7be5be79.pth`` for ``--net alex``,
  both published under https://download.pytorch.org/models/ .
* the linear heads: ``lpips/weights/v0.1/{vgg,alex}.pth`` shipped inside the ``lpips`` PyPI package
  (found automatically when ``--lin`` is left out and the package is installed).

Commands (torch, torchvision and lpips are needed only for this conversion; the environment must
also have consistency_jax's requirements, jax and safetensors, because the tensor layout is taken
from the library):

    pip install torch torchvision lpips
    curl -LO https://download.pytorch.org/models/vgg16-397923af.pth
    python tools/convert_lpips_weights.py --net vgg --backbone vgg16-397923af.pth \\
        --out lpips_vgg.safetensors
    curl -LO https://download.pytorch.org/models/alexnet-owt-7be5be79.pth
    python tools/convert_lpips_weights.py --net alex --backbone alexnet-owt-7be5be79.pth \\
        --out lpips_alex.safetensors

(``python -c "import torchvision; torchvision.models.vgg16(weights='IMAGENET1K_V1')"`` fetches the
same file into ``~/.cache/torch/hub/checkpoints/`` instead of curl.) Then, in JAX:

    params = load_lpips_params("lpips_vgg.safetensors", net="vgg")
    d = make_lpips_distance(params, net="vgg")

The file keeps PyTorch names and layouts: ``features.{i}.weight`` / ``features.{i}.bias`` (the
backbone's conv layers, torchvision indices; the classifier is dropped) and ``lin{l}.weight``
(renamed from the lpips package's ``lin{l}.model.1.weight``), with metadata ``net`` and ``format``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np

_FORMAT = "lpips-v0.1"


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

    save_file(dict(tensors), os.fspath(path), metadata={"net": net, "format": _FORMAT})


def _torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a PyTorch state_dict without unpickling code (``weights_only=True``)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path!r} does not hold a state_dict (got {type(state).__name__}).")
    return {
        name: value.detach().cpu().numpy()
        for name, value in state.items()
        if hasattr(value, "detach")
    }


def _default_lin_path(net: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        raise ValueError(
            "The lpips package is not installed; pass --lin PATH to its weights/v0.1/NET.pth."
        )
    return os.path.join(os.path.dirname(spec.origin), "weights", "v0.1", f"{net}.pth")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--net", choices=("vgg", "alex"), required=True)
    parser.add_argument("--backbone", required=True, help="torchvision state_dict (.pth)")
    parser.add_argument(
        "--lin", default=None, help="lpips weights/v0.1/NET.pth (default: from the lpips package)"
    )
    parser.add_argument("--out", required=True, help="output .safetensors file")
    args = parser.parse_args(argv)

    from consistency_jax.metrics.lpips import lpips_tensor_shapes

    lin_path = args.lin or _default_lin_path(args.net)
    tensors = build_lpips_tensors(
        _torch_state_dict(args.backbone), _torch_state_dict(lin_path), lpips_tensor_shapes(args.net)
    )
    save_lpips_safetensors(tensors, args.out, args.net)
    print(f"wrote {len(tensors)} tensors for net={args.net} to {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
