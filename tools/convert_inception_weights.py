"""Converts the FID Inception-v3 weights (PyTorch) into the ``.safetensors`` file that
``consistency_jax.metrics.inception_v3.load_inception_params`` reads.

Input: pytorch-fid's conversion of TensorFlow's 2015-12-05 Inception graph, a plain state_dict read
by ``consistency_jax.torch_pickle`` (NumPy only: no PyTorch, nothing unpickled but tensors). The
library fetches and checks it by itself on first use (``consistency_jax.weights_cache``) and reads
the ``.pth`` directly; this tool makes a ``.safetensors`` copy for those who prefer one:

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
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from consistency_jax.metrics.inception_v3 import (  # noqa: E402, F401 -- re-exported for the tests
    build_inception_tensors,
    save_inception_safetensors,
)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pth", required=True, help="pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    args = parser.parse_args(argv)

    from consistency_jax import torch_pickle
    from consistency_jax.metrics.inception_v3 import inception_tensor_shapes

    tensors = build_inception_tensors(
        torch_pickle.read_state_dict(args.pth), inception_tensor_shapes()
    )
    save_inception_safetensors(tensors, args.out)
    print(f"wrote {len(tensors)} tensors to {args.out}")


if __name__ == "__main__":
    main()
