"""Converts LPIPS weights (PyTorch) into the one ``.safetensors`` file that
``consistency_jax.metrics.lpips.load_lpips_params`` reads.

Two inputs, both plain state_dicts read by ``consistency_jax.torch_pickle`` (NumPy only: no
PyTorch, nothing unpickled but tensors; the library also fetches, checks and reads them by itself on
first use, ``consistency_jax.weights_cache``):

* the backbone: torchvision's ImageNet weights, which you download yourself (nothing in the
  library or the tests downloads anything). The lpips package uses the IMAGENET1K_V1 weights:
  ``vgg16-397923af.pth`` for ``--net vgg`` and ``alexnet-owt-7be5be79.pth`` for ``--net alex``,
  both published under https://download.pytorch.org/models/ .
* the linear heads: ``lpips/weights/v0.1/{vgg,alex}.pth`` shipped inside the ``lpips`` PyPI package
  (found automatically when ``--lin`` is left out and the package is installed).

Commands (the lpips package is needed only to find its weights when --lin is left out):

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
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from consistency_jax.metrics.lpips import (  # noqa: E402, F401 -- re-exported for the tests
    build_lpips_tensors,
    save_lpips_safetensors,
)


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

    from consistency_jax import torch_pickle
    from consistency_jax.metrics.lpips import lpips_tensor_shapes

    lin_path = args.lin or _default_lin_path(args.net)
    tensors = build_lpips_tensors(
        torch_pickle.read_state_dict(args.backbone),
        torch_pickle.read_state_dict(lin_path),
        lpips_tensor_shapes(args.net),
    )
    save_lpips_safetensors(tensors, args.out, args.net)
    print(f"wrote {len(tensors)} tensors for net={args.net} to {args.out}")


if __name__ == "__main__":
    main()
