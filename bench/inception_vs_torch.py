"""FID Inception-v3 features/s: ``consistency_jax``'s extractor against torch-fidelity's and
pytorch-fid's, in one process, on the same random weights and the same uint8 images.

  python bench/inception_vs_torch.py --images=400 --batch=100 --image_size=32

Needs, besides this package, torch with a matching torchvision, torch-fidelity and pytorch-fid (a
separate environment: ``pip install torch==2.14.1 torchvision==0.29.1 torch-fidelity pytorch-fid``
then ``pip install -e .``). Nothing is downloaded: pytorch-fid's weight download is replaced by the
random state dict (``tools/make_inception_fixture.py``'s, drawn from the library's table of names and
shapes; the three networks hold the same tensors), and torch-fidelity reads it from a ``.pth``.

Each call maps the uint8 NHWC images to what the tool needs and runs it batch by batch:

* consistency_jax: ``InceptionFeatureExtractor`` (host→device, TF1 bilinear resize to 299, the
  network, pool features and bias-free logits back as NumPy; on CPU compiled with
  ``inception_v3.CPU_COMPILER_OPTIONS``);
* torch-fidelity: ``FeatureExtractorInceptionV3("inception-v3-compat", ["2048",
  "logits_unbiased"])`` on uint8 NCHW tensors (its own TF1 resize), under ``torch.no_grad``;
* pytorch-fid: ``InceptionV3([3])`` (resize_input, normalize_input) on float NCHW in [0, 1]:
  pool features only (its resize is ``F.interpolate``, not TF1's).

torch uses ``--threads`` threads (default: every CPU of this process, as XLA:CPU does). The calls are
timed in round-robin after a warm-up call each (``timing.time_interleaved``); the figure is
images/s, and the ratio is consistency_jax over the faster of the two PyTorch tools (aim ≥ 1.2).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import timing  # noqa: E402
from inception_bench import fixture_tool, random_state_dict  # noqa: E402

from consistency_jax.metrics import inception_v3 as I  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=400, help="images per timed call")
    p.add_argument("--batch", type=int, default=100, help="images per network call (all three)")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the CPUs we may use)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--check", action="store_true", help="also compare the features of the three")
    args = p.parse_args()

    import torch
    import torch_fidelity
    from pytorch_fid import inception as pfid
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)

    state = random_state_dict()
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}

    # consistency_jax
    extractor = I.InceptionFeatureExtractor(I.variables_from_tensors(state), batch_size=args.batch)

    # torch-fidelity: its module names are the library's; buffers it has beyond them stay as built.
    with tempfile.TemporaryDirectory() as tmp:
        template = fixture_tool().fidelity_state_template(tmp, ["2048"])
        full = {k: tensors.get(k, v) for k, v in template.items()}
        missing = sorted(set(state) - set(full))
        if missing:
            raise SystemExit(f"torch-fidelity has no tensors named {missing[:3]} ...")
        path = os.path.join(tmp, "random_inception.pth")
        torch.save(full, path)
        fidelity = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], path
        ).eval()

    # pytorch-fid: its FID network is built from the state dict it would download.
    pfid.load_state_dict_from_url = lambda *a, **k: dict(tensors)
    pytorch_fid = pfid.InceptionV3([pfid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, args.image_size, args.image_size, 3), np.uint8)
    batches = [images[i : i + args.batch] for i in range(0, args.images, args.batch)]

    def run_jax():
        return extractor(images).pool

    def run_fidelity():
        outs = []
        for b in batches:
            pool, _ = fidelity(torch.from_numpy(b).permute(0, 3, 1, 2).contiguous())
            outs.append(pool.numpy())
        return np.concatenate(outs)

    def run_pytorch_fid():
        outs = []
        for b in batches:
            x = torch.from_numpy(b).permute(0, 3, 1, 2).float().div_(255.0)
            outs.append(pytorch_fid(x)[0].flatten(1).numpy())
        return np.concatenate(outs)

    cases = {
        "consistency_jax": run_jax,
        "torch-fidelity": run_fidelity,
        "pytorch-fid": run_pytorch_fid,
    }
    if args.check:
        ours, theirs = run_jax(), run_fidelity()
        scale = np.abs(theirs).max()
        print(
            f"pool features, |jax - torch-fidelity| max {np.abs(ours - theirs).max() / scale:.2e}"
        )
    times, _ = timing.time_interleaved(
        {name: (timing.stateless(fn), None, ()) for name, fn in cases.items()},
        iters=1,
        repeats=args.repeats,
        warmup=1,
    )
    rates = {name: args.images / t for name, t in times.items()}
    print(
        f"{timing.describe_device()}; torch {torch.__version__} ({threads} threads), "
        f"torch-fidelity {torch_fidelity.__version__}, jax {jax.__version__}; "
        f"{args.images} uint8 {args.image_size}x{args.image_size} images, batch {args.batch}"
    )
    print("| tool | s per call | images/s |\n|---|---|---|")
    for name in cases:
        print(f"| {name} | {times[name]:.2f} | {rates[name]:.1f} |")
    best = max(rates["torch-fidelity"], rates["pytorch-fid"])
    print(
        f"consistency_jax / faster PyTorch tool: {rates['consistency_jax'] / best:.2f} (aim >= 1.2)"
    )


if __name__ == "__main__":
    main()
