"""Reading a state dict of cm's ImageNet-64 ADM UNet's shapes: ``torch_pickle`` against ``torch.load``.

  python bench/torch_reader_bench.py [--dtype=float32] [--repeats=3] [--legacy]

The state dict is random, with the names and shapes of cm's ``UNetModel`` for ImageNet 64
(``config.adm_imagenet64``: 192 channels, multipliers 1,2,3,4, 3 blocks, attention at 32,
16, 8, 1000 classes), written once by ``torch.save`` into a temporary directory. Times are the median
wall-clock of reading it back to NumPy arrays (torch: ``torch.load(weights_only=True)`` then
``.numpy()`` on each tensor, which shares memory), file in the page cache (one read before timing).
Needs torch (the library does not).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from consistency_jax import torch_pickle  # noqa: E402
from consistency_jax.convert.cm import cm_expected  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--legacy", action="store_true", help="the pre-1.6 format instead of zip")
    args = p.parse_args(argv)
    import torch

    kwargs = dict(  # config.adm_imagenet64: cm's class-conditional ImageNet-64 UNet
        model_channels=192,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        attention_resolutions=(32, 16, 8),
        num_head_channels=64,
        resblock_updown=True,
        use_scale_shift_norm=True,
        dropout=0.0,
        num_classes=1000,
    )
    _, lay = cm_expected(kwargs, 64, 3)
    rng = np.random.default_rng(0)
    state = {
        k: torch.from_numpy(rng.standard_normal(shape, dtype=np.float32).astype(args.dtype))
        for k, (_, shape, _) in lay.entries.items()
    }
    n = sum(t.numel() for t in state.values())
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "cd_imagenet64.pt")
        torch.save(state, path, _use_new_zipfile_serialization=not args.legacy)
        size = os.path.getsize(path)
        del state
        readers = {
            "torch_pickle.read_state_dict": lambda: torch_pickle.read_state_dict(path),
            "torch.load(weights_only=True)": lambda: {
                k: v.numpy() for k, v in torch.load(path, weights_only=True).items()
            },
        }
        for fn in readers.values():
            fn()  # page cache, imports
        times = {k: [] for k in readers}
        for _ in range(args.repeats):
            for k, fn in readers.items():
                t0 = time.perf_counter()
                out = fn()
                times[k].append(time.perf_counter() - t0)
                del out
    print(
        f"# {len(lay.entries)} tensors, {n / 1e6:.1f}M parameters, {args.dtype}, "
        f"{'legacy' if args.legacy else 'zip'} format, {size / 2**30:.2f} GiB; torch "
        f"{torch.__version__}, {os.cpu_count()} CPUs"
    )
    for k, v in times.items():
        t = float(np.median(v))
        print(f"{k:32s} {t:7.2f} s   {size / 2**30 / t:6.2f} GiB/s")


if __name__ == "__main__":
    main()
