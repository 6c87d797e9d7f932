"""Builds tests/fixtures/lpips_reference.npz: LPIPS distances computed by the real PyTorch
implementations, for tests/test_lpips.py (which needs no torch).

The pretrained torchvision backbones cannot be downloaded here, so the backbone weights are
random but reproducible: ``random_backbone_state_dict(net)`` draws them in NumPy (He-normal from
``np.random.default_rng(0)``) and the test regenerates the identical arrays with the same function.
The linear heads are the real v0.1 weights shipped inside the ``lpips`` package; they go into the
fixture. References, all in float64 on the CPU:

* ``lpips.LPIPS(net=..., pretrained=True, pnet_rand=True)`` (``pretrained`` loads the package's
  linear heads, ``pnet_rand=True`` builds the torchvision trunk without downloading it; the random
  trunk is then overwritten by ours) on 4 pairs of 32x32 and of 64x64 RGB images, for VGG16 and
  AlexNet;
* the same after ``F.interpolate(x, size=224, mode="bilinear")`` of the first two 32x32 pairs
  (the cm code path for images smaller than 256);
* the gradient of Σ d(a, b) in a for two 16x16 pairs (VGG16 at 16x16, AlexNet through the
  resize to 224), from torch's autograd;
* piq's ``LPIPS(replace_pooling=True, reduction="none")`` on ``(up(x) + 1) / 2`` exactly as
  openai/consistency_models ``cm/karras_diffusion.py`` calls it (VGG16 with average pooling); piq's
  torchvision constructor is replaced by one returning our trunk and its head file is planted in
  a temporary torch hub directory, so nothing is downloaded.

Run (needs torch, torchvision, lpips and piq; not part of the test suite):

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.14.1 torchvision==0.29.1 lpips piq numpy
    /tmp/torchenv/bin/python tools/make_lpips_fixture.py
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

SEED = 0
FIXTURE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "tests",
    "fixtures",
    "lpips_reference.npz",
)

# Conv layers of torchvision's vgg16().features / alexnet().features: (index, in, out, kernel).
# Written out here independently of consistency_jax (checked against torchvision in main()).
BACKBONE_CONVS: dict[str, tuple[tuple[int, int, int, int], ...]] = {
    "vgg": (
        (0, 3, 64, 3),
        (2, 64, 64, 3),
        (5, 64, 128, 3),
        (7, 128, 128, 3),
        (10, 128, 256, 3),
        (12, 256, 256, 3),
        (14, 256, 256, 3),
        (17, 256, 512, 3),
        (19, 512, 512, 3),
        (21, 512, 512, 3),
        (24, 512, 512, 3),
        (26, 512, 512, 3),
        (28, 512, 512, 3),
    ),
    "alex": (
        (0, 3, 64, 11),
        (3, 64, 192, 5),
        (6, 192, 384, 3),
        (8, 384, 256, 3),
        (10, 256, 256, 3),
    ),
}


def random_backbone_state_dict(net: str, seed: int = SEED) -> dict[str, np.ndarray]:
    """Deterministic stand-in for torchvision's pretrained ``features`` weights.

    Weights are He-normal (std √(2 / fan_in)), biases N(0, 0.05²), drawn layer by layer in index
    order from ``np.random.default_rng(seed)`` in float64 and rounded to float32.

    Args:
        net: "vgg" or "alex".
        seed: the generator seed.

    Returns:
        {"features.{i}.weight": (out, in, k, k), "features.{i}.bias": (out,)} float32 arrays.
    """
    rng = np.random.default_rng(seed)
    state = {}
    for index, c_in, c_out, k in BACKBONE_CONVS[net]:
        std = np.sqrt(2.0 / (c_in * k * k))
        weight = rng.standard_normal((c_out, c_in, k, k)) * std
        state[f"features.{index}.weight"] = weight.astype(np.float32)
        state[f"features.{index}.bias"] = (rng.standard_normal(c_out) * 0.05).astype(np.float32)
    return state


def backbone_checksums(state: dict[str, np.ndarray], net: str) -> np.ndarray:
    """float64 sum of every backbone tensor, in layer order (weight, bias, weight, ...)."""
    sums = []
    for index, *_ in BACKBONE_CONVS[net]:
        sums.append(state[f"features.{index}.weight"].astype(np.float64).sum())
        sums.append(state[f"features.{index}.bias"].astype(np.float64).sum())
    return np.asarray(sums)


def _image_pairs(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """n pairs of NHWC images in [-1, 1]: smooth colour fields with texture; the first half of
    the pairs are small perturbations of each other, the rest unrelated images."""

    def images() -> np.ndarray:
        coarse = rng.uniform(-1.0, 1.0, (n, 4, 4, 3))
        smooth = np.kron(coarse, np.ones((1, size // 4, size // 4, 1)))
        smooth = (smooth + np.roll(smooth, 1, axis=1) + np.roll(smooth, 1, axis=2)) / 3.0
        return np.clip(0.8 * smooth + 0.2 * rng.standard_normal((n, size, size, 3)), -1.0, 1.0)

    a = images()
    b = images()
    close = n // 2
    b[:close] = np.clip(a[:close] + 0.1 * rng.standard_normal(a[:close].shape), -1.0, 1.0)
    return a.astype(np.float32), b.astype(np.float32)


def main() -> None:
    import lpips
    import piq
    import piq.perceptual
    import torch
    import torch.nn.functional as F
    import torchvision

    torch.set_grad_enabled(False)
    rng = np.random.default_rng(1234)
    x32_a, x32_b = _image_pairs(rng, 4, 32)
    x64_a, x64_b = _image_pairs(rng, 4, 64)
    out: dict[str, np.ndarray] = {"x32_a": x32_a, "x32_b": x32_b, "x64_a": x64_a, "x64_b": x64_b}

    def nchw(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2).contiguous()

    def up224(x: np.ndarray) -> torch.Tensor:  # cm/karras_diffusion.py, images smaller than 256
        return F.interpolate(nchw(x), size=224, mode="bilinear")

    trunks = {"vgg": torchvision.models.vgg16, "alex": torchvision.models.alexnet}
    for net in ("vgg", "alex"):
        state = random_backbone_state_dict(net)
        tv_features = trunks[net]().features.state_dict()
        tv_shapes = {f"features.{k}": tuple(v.shape) for k, v in tv_features.items()}
        assert tv_shapes == {k: v.shape for k, v in state.items()}, (
            f"BACKBONE_CONVS[{net!r}] != torchvision"
        )

        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        # model.net.slice{k}.{i} are torchvision's features[i].
        trunk_state = model.net.state_dict()
        for name in trunk_state:
            slice_name, index, kind = name.split(".")
            trunk_state[name] = torch.from_numpy(state[f"features.{index}.{kind}"])
        model.net.load_state_dict(trunk_state)
        model = model.double().eval()

        lin_path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", f"{net}.pth")
        lin = torch.load(lin_path, map_location="cpu", weights_only=True)
        for layer in range(5):
            out[f"{net}_lin{layer}"] = lin[f"lin{layer}.model.1.weight"].numpy()
        out[f"{net}_backbone_sums"] = backbone_checksums(state, net)
        out[f"{net}_d32"] = model(nchw(x32_a), nchw(x32_b)).flatten().numpy()
        out[f"{net}_d64"] = model(nchw(x64_a), nchw(x64_b)).flatten().numpy()
        out[f"{net}_d32_up224"] = model(up224(x32_a[:2]), up224(x32_b[:2])).flatten().numpy()
        # Gradient of Σ d(a, b) in a (NHWC): 16x16 crops of the first two 32x32 pairs, VGG16 as
        # is, AlexNet through the resize to 224 (finite differences are useless here: the
        # ReLU and max-pool kinks are too dense for float32 steps).
        crop_a = (
            torch.from_numpy(x32_a[:2, :16, :16].astype(np.float64))
            .permute(0, 3, 1, 2)
            .contiguous()
        )
        crop_b = (
            torch.from_numpy(x32_b[:2, :16, :16].astype(np.float64))
            .permute(0, 3, 1, 2)
            .contiguous()
        )
        with torch.enable_grad():
            crop_a.requires_grad_(True)
            if net == "vgg":
                total = model(crop_a, crop_b).sum()
            else:
                total = model(
                    F.interpolate(crop_a, size=224, mode="bilinear"),
                    F.interpolate(crop_b, size=224, mode="bilinear"),
                ).sum()
            total.backward()
        out[f"{net}_grad16"] = crop_a.grad.permute(0, 2, 3, 1).numpy()

        if net == "vgg":
            # piq, as called by the cm code: LPIPS(replace_pooling=True) on (x + 1) / 2.
            with tempfile.TemporaryDirectory() as hub:
                torch.hub.set_dir(hub)
                os.makedirs(os.path.join(hub, "checkpoints"))
                heads = [lin[f"lin{layer}.model.1.weight"] for layer in range(5)]
                torch.save(heads, os.path.join(hub, "checkpoints", "lpips_weights.pt"))
                tv_vgg = torchvision.models.vgg16()
                tv_vgg.features.load_state_dict(
                    {k.removeprefix("features."): torch.from_numpy(v) for k, v in state.items()}
                )
                original = piq.perceptual.vgg16
                piq.perceptual.vgg16 = lambda pretrained, progress: tv_vgg
                try:
                    piq_lpips = piq.LPIPS(replace_pooling=True, reduction="none")
                finally:
                    piq.perceptual.vgg16 = original
                up_a, up_b = up224(x32_a[:2]), up224(x32_b[:2])
                d = piq_lpips((up_a + 1) / 2.0, (up_b + 1) / 2.0)
                out["vgg_avgpool_d32_up224"] = d.flatten().numpy()

    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    np.savez_compressed(FIXTURE, **out)
    for name, value in out.items():
        if name.startswith(("vgg_d", "alex_d", "vgg_avg")):
            print(name, value)
    print(f"wrote {FIXTURE} ({os.path.getsize(FIXTURE)} bytes)")


if __name__ == "__main__":
    main()
