"""Builds tests/fixtures/inception_reference.npz: the FID Inception-v3 and the FID/KID/IS/PR
formulas computed by independent PyTorch implementations, for tests/test_fid.py (which needs no torch).

The real weights (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``) cannot be downloaded
here, so the network's weights are random but reproducible: ``random_inception_state_dict(shapes)``
draws them in NumPy (He-normal convolutions, batch-norm statistics near (0, 1), from
``np.random.default_rng(0)``), and the test regenerates the identical arrays with the same function
from the *library's* table of names and shapes; the checksums stored here catch a change of NumPy's
random stream. References, all in float64 on the CPU:

* torch-fidelity's ``FeatureExtractorInceptionV3`` (pytorch-fid's FID blocks, TF1-style bilinear
  resize, (x − 128)/128) with ``feature_extractor_internal_dtype="float64"``, loaded from a ``.pth``
  of those weights: the pool_3 features (read by a forward hook before its float32 cast) and the
  bias-free and full 1008-way logits of 4 uint8 images of 32x32 and 2 of 64x64;
* its ``interpolate_bilinear_2d_like_tensorflow1x`` on small arrays (up and down) and on a 32x32
  image to 299x299 (every 13th row stored);
* on random features (``metric_inputs``): pytorch-fid's ``calculate_frechet_distance`` (SciPy
  ``sqrtm``) and torch-fidelity's FID (eigenvalues), KID (one subset holding every sample, so its
  random subset draw does not matter), Inception Score (10 splits, no shuffle) and
  precision/recall (k = 3).

torchvision is not needed: both peers import it at module level only for code not used here, so
a stand-in module is installed for the import.

Run (not part of the test suite; torch==2.13.0 CPU, torch-fidelity 0.4.0, pytorch-fid 0.3.0):

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.13.0 numpy scipy pillow tqdm
    /tmp/torchenv/bin/pip install --no-deps torch-fidelity==0.4.0 pytorch-fid==0.3.0
    /tmp/torchenv/bin/python tools/make_inception_fixture.py
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import tempfile
import types
from collections.abc import Mapping

import numpy as np

SEED = 0
FIXTURE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "tests",
    "fixtures",
    "inception_reference.npz",
)


def random_inception_state_dict(
    shapes: Mapping[str, tuple[int, ...]], seed: int = SEED
) -> dict[str, np.ndarray]:
    """Deterministic stand-in for the FID Inception-v3 weights, keeping activations O(1).

    Tensors are drawn in sorted name order from ``np.random.default_rng(seed)`` in float64 and
    rounded to float32: convolution and fc weights He-normal (std √(2 / fan_in); fc √(1 / fan_in)),
    BN weight U(0.8, 1.2), BN bias and fc bias N(0, 0.1²), running mean N(0, 0.1²), running
    variance U(0.5, 1.5).

    Args:
        shapes: {PyTorch name: shape} of the network (``inception_tensor_shapes()`` in the library,
            the peer's ``state_dict()`` here).
        seed: the generator seed.

    Returns:
        {name: float32 array}.
    """
    rng = np.random.default_rng(seed)
    state = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        if name.endswith("conv.weight"):
            value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif name == "fc.weight":
            value = rng.standard_normal(shape) * np.sqrt(1.0 / shape[1])
        elif name.endswith("bn.weight"):
            value = rng.uniform(0.8, 1.2, shape)
        elif name.endswith("bn.running_var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith(("bn.bias", "bn.running_mean", "fc.bias")):
            value = rng.standard_normal(shape) * 0.1
        else:
            raise ValueError(f"No rule to draw tensor {name!r}.")
        state[name] = value.astype(np.float32)
    return state


def state_checksums(state: Mapping[str, np.ndarray]) -> np.ndarray:
    """float64 sum of every tensor, in sorted name order."""
    return np.asarray([state[name].astype(np.float64).sum() for name in sorted(state)])


def fixture_images(seed: int = 1234) -> dict[str, np.ndarray]:
    """uint8 RGB images: 4 of 32x32 and 2 of 64x64, smooth colour fields with texture."""
    rng = np.random.default_rng(seed)

    def images(n: int, size: int) -> np.ndarray:
        coarse = rng.uniform(0.0, 255.0, (n, 4, 4, 3))
        smooth = np.kron(coarse, np.ones((1, size // 4, size // 4, 1)))
        smooth = (smooth + np.roll(smooth, 1, axis=1) + np.roll(smooth, 1, axis=2)) / 3.0
        return np.clip(
            np.round(0.8 * smooth + 40.0 * rng.standard_normal((n, size, size, 3))), 0, 255
        )

    return {"images32": images(4, 32).astype(np.uint8), "images64": images(2, 64).astype(np.uint8)}


def metric_inputs(seed: int = 5678) -> dict[str, np.ndarray]:
    """Random float64 features and logits for the metric formulas.

    ``real`` (200, 32) ~ N(0, A Aᵀ), ``fake`` (160, 32) ~ N(0.3, 1.3² B Bᵀ) with random A, B;
    ``logits`` (120, 1008) = 3 · N(0, 1) with the first 10 classes boosted by 4 in a pattern.
    """
    rng = np.random.default_rng(seed)
    dim = 32
    a = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    b = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    real = rng.standard_normal((200, dim)) @ a.T
    fake = 0.3 + 1.3 * rng.standard_normal((160, dim)) @ b.T
    logits = 3.0 * rng.standard_normal((120, 1008))
    logits[np.arange(120), np.arange(120) % 10] += 4.0
    return {"real": real, "fake": fake, "logits": logits}


class _Meta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Meta(name, (), {})


class _StubModule(types.ModuleType):
    """Any attribute is a class (subclassable, with any attribute itself)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _Meta(name, (), {})
        setattr(self, name, value)
        return value


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import torchvision…`` succeed with stand-ins (nothing of it is run here)."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def fidelity_state_template(tmp: str, features) -> dict:
    """The state dict of torch-fidelity's ``FeatureExtractorInceptionV3`` as built, loading no
    weights (its names and shapes; ``tmp``: a directory for the empty file it insists on reading)."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty = os.path.join(tmp, "empty.pth")
    torch.save({}, empty)
    original = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, state, strict=True: None
    try:
        probe = FeatureExtractorInceptionV3("inception-v3-compat", list(features), empty)
    finally:
        FeatureExtractorInceptionV3.load_state_dict = original
    return probe.state_dict()


def main() -> None:
    import torch

    sys.meta_path.insert(0, _TorchvisionStub())
    from pytorch_fid.fid_score import calculate_frechet_distance
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x,
    )
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    torch.set_grad_enabled(False)
    out: dict[str, np.ndarray] = {}
    features = ["2048", "logits_unbiased", "logits"]
    with tempfile.TemporaryDirectory() as tmp:
        full_state = fidelity_state_template(tmp, features)
        shapes = {
            k: tuple(v.shape)
            for k, v in full_state.items()
            if not k.endswith("num_batches_tracked")
        }
        state = random_inception_state_dict(shapes)
        path = os.path.join(tmp, "random_inception.pth")
        torch.save(
            {
                k: torch.from_numpy(state[k]) if k in state else torch.zeros_like(v)
                for k, v in full_state.items()
            },
            path,
        )
        model = FeatureExtractorInceptionV3(
            "inception-v3-compat", features, path, feature_extractor_internal_dtype="float64"
        )
    out["state_sums"] = state_checksums(state)
    out["num_tensors"] = np.asarray(len(state))

    pooled = []
    model.AvgPool.register_forward_hook(
        lambda module, inputs, output: pooled.append(output.flatten(1))
    )
    images = fixture_images()
    out.update(images)
    weight = model.fc.weight  # float64 (1008, 2048)
    for key in ("images32", "images64"):
        pooled.clear()
        x = torch.from_numpy(images[key]).permute(0, 3, 1, 2).contiguous()
        model(x)
        pool = pooled[0]
        out[f"pool{key[6:]}"] = pool.numpy()
        out[f"logits{key[6:]}"] = (
            pool @ weight.T
        ).numpy()  # the peer's logits_unbiased, in float64
        out[f"full_logits{key[6:]}"] = (pool @ weight.T + model.fc.bias).numpy()
        print(key, "pool mean/std", pool.mean().item(), pool.std().item())

    # The TF1 resize alone.
    rng = np.random.default_rng(99)
    for name, (h, w, oh, ow) in {"up": (7, 5, 13, 11), "down": (13, 17, 5, 6)}.items():
        x = rng.uniform(0, 255, (2, 3, h, w))
        y = interpolate_bilinear_2d_like_tensorflow1x(
            torch.from_numpy(x), size=(oh, ow), align_corners=False
        )
        out[f"resize_{name}_in"] = x.transpose(0, 2, 3, 1)
        out[f"resize_{name}_out"] = y.numpy().transpose(0, 2, 3, 1)
    x299 = torch.from_numpy(images["images32"][:1].astype(np.float64)).permute(0, 3, 1, 2)
    y299 = interpolate_bilinear_2d_like_tensorflow1x(x299, size=(299, 299), align_corners=False)
    out["resize_32_to_299_rows13"] = y299.numpy().transpose(0, 2, 3, 1)[:, ::13]

    # Metric formulas on random features.
    m = metric_inputs()
    real, fake = m["real"], m["fake"]
    mu_r, sigma_r = real.mean(0), np.cov(real, rowvar=False)
    mu_f, sigma_f = fake.mean(0), np.cov(fake, rowvar=False)
    out["fid_pytorch_fid"] = np.asarray(calculate_frechet_distance(mu_f, sigma_f, mu_r, sigma_r))
    out["fid_torch_fidelity"] = np.asarray(
        fid_statistics_to_metric(
            {"mu": mu_f, "sigma": sigma_f}, {"mu": mu_r, "sigma": sigma_r}, False
        )["frechet_inception_distance"]
    )
    n = fake.shape[0]
    kid = kid_features_to_metric(
        torch.from_numpy(fake),
        torch.from_numpy(real[:n]),
        kid_subsets=1,
        kid_subset_size=n,
        verbose=False,
    )
    out["kid_one_subset"] = np.asarray(kid["kernel_inception_distance_mean"])
    isc = isc_features_to_metric(torch.from_numpy(m["logits"]), splits=10, shuffle=False)
    out["is_mean"] = np.asarray(isc["inception_score_mean"])
    out["is_std"] = np.asarray(isc["inception_score_std"])
    precision, recall = calculate_precision_recall_full(
        torch.from_numpy(fake), torch.from_numpy(real), neighborhood=3
    )
    out["precision"] = np.asarray(precision)
    out["recall"] = np.asarray(recall)

    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    np.savez_compressed(FIXTURE, **out)
    for name in (
        "fid_pytorch_fid",
        "fid_torch_fidelity",
        "kid_one_subset",
        "is_mean",
        "is_std",
        "precision",
        "recall",
    ):
        print(name, out[name])
    print(f"wrote {FIXTURE} ({os.path.getsize(FIXTURE)} bytes)")


if __name__ == "__main__":
    main()
