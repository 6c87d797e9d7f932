"""Converts the FID Inception-v3 weights (PyTorch) into the ``.safetensors`` file that
``consistency_jax.metrics.inception_v3.load_inception_params`` reads.

Input: pytorch-fid's conversion of TensorFlow's 2015-12-05 Inception graph, a plain state_dict read
with ``torch.load(weights_only=True)`` (nothing is unpickled). You download it yourself (nothing in
the library or the tests downloads anything):

    pip install torch            # for this conversion only, beside consistency_jax's requirements
    curl -LO https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
    python tools/convert_inception_weights.py --pth pt_inception-2015-12-05-6726825d.pth \\
        --out pt_inception-2015-12-05.safetensors

(torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` holds the same tensors under the
same names and converts the same way.) Then, in JAX:

    export INCEPTION_WEIGHTS=$PWD/pt_inception-2015-12-05.safetensors
    python -m consistency_jax.evaluate --samples=samples.npz --ref=cifar10 ...

The file keeps PyTorch's names and layouts (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.
running_mean``, ``fc.weight``, ...; see ``inception_tensor_shapes()``), in float32, with metadata
``format``. Batch-norm ``num_batches_tracked`` counters are dropped (they are not weights); any
other tensor that is missing, extra or of another shape stops the conversion, by name.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np

_FORMAT = "fid-inception-v3-2015-12-05"


def build_inception_tensors(
    state: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """Checks and selects the tensors of one Inception weight file.

    Args:
        state: the PyTorch state_dict as NumPy arrays.
        shapes: the required {name: shape}, from ``inception_tensor_shapes()``.

    Returns:
        {name: float32 array} holding exactly the names of ``shapes``.

    Raises:
        ValueError: tensors missing, unexpected (other than ``*.num_batches_tracked``) or of another
            shape, all named.
    """
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

    save_file(dict(tensors), os.fspath(path), metadata={"format": _FORMAT})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pth", required=True, help="pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    args = parser.parse_args(argv)

    from convert_lpips_weights import _torch_state_dict  # the same weights_only reader

    from consistency_jax.metrics.inception_v3 import inception_tensor_shapes

    tensors = build_inception_tensors(_torch_state_dict(args.pth), inception_tensor_shapes())
    save_inception_safetensors(tensors, args.out)
    print(f"wrote {len(tensors)} tensors to {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
