"""Builds tests/fixtures/cm_unet_{cond,uncond}.{safetensors,npz}: outputs of the official PyTorch ADM
UNet (openai/consistency_models ``cm.unet.UNetModel``) for tests/test_convert.py, which needs no torch.

Two tiny networks with random (seeded) weights, non-zero everywhere, including the layers cm
zero-initialises (each ResBlock's last convolution, every attention ``proj_out``, the output conv):

* ``cond``: class-conditional (10 classes), 16×16, model_channels 32, channel_mult (1, 1), one
  ResBlock per level, attention at 16 and 8 pixels with 16 channels per head, ``resblock_updown``
  and ``use_scale_shift_norm``: the layout of the released ImageNet 64 models.
* ``uncond``: unconditional, 16×16, the same widths, attention at 8 pixels with ``num_heads=2``,
  convolutional resampling (``resblock_updown=False``) and additive conditioning (no scale-shift):
  the other branches of the same class (the released LSUN 256 models use resblock_updown with
  additive conditioning).

The weights are rounded to float16 and saved as float16 (the fixtures stay small; the converter
casts to float32, as it does for half-precision checkpoints); the reference runs in float32 on
those rounded values. Inputs follow cm's denoiser: for noise z and level σ the network sees
c_in(σ)·σ·z and the timestep 1000·0.25·ln(σ + 1e-44) (CM Eq. 5 with EDM's c_in = 1/√(σ² + σ_d²),
σ_d = 0.5); the first two examples sit at σ = T = 80,
the level of one-step sampling (CM Algorithm 1). The ``.npz`` holds z (NHWC), σ, the timesteps,
the labels, the network input and the output (both NHWC, float32).

The released models run attention through FlashAttention (CUDA only): ``AttentionBlock`` builds
``QKVFlashAttention``, which reads the qkv channels as ``(three h d)``. Here it is replaced by cm's
own ``QKVAttention``, which splits ``[Q | K | V]`` into heads the same way and computes the same
softmax(q·k/√d)·v in float32 (checked below against an explicit (three h d) attention).

Regenerate (torch and safetensors needed here only, never by the library or its tests):

    git clone https://github.com/openai/consistency_models /tmp/cm-official
    python tools/make_cm_fixture.py /tmp/cm-official

Only ``cm/unet.py``, ``cm/nn.py`` and ``cm/fp16_util.py`` are read from the checkout; they are
copied into a temporary directory and imported from there (``cm/logger.py``, imported by
``fp16_util``, is replaced by a stub).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import shutil
import sys
import tempfile

import numpy as np

SEED = 0
SIGMA_DATA = 0.5
SIGMAS = (80.0, 80.0, 2.0, 0.02)
LABELS = (0, 3, 7, 9)
FIXTURES = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures"
)

# The architectures, as cm's UNetModel arguments (attention_resolutions as down-sampling rates, the
# way cm's script_util.create_model passes them: image_size // pixels).
VARIANTS = {
    "cond": dict(
        image_size=16,
        in_channels=3,
        model_channels=32,
        out_channels=3,
        num_res_blocks=1,
        attention_resolutions=(1, 2),
        channel_mult=(1, 1),
        num_classes=10,
        num_head_channels=16,
        resblock_updown=True,
        use_scale_shift_norm=True,
    ),
    "uncond": dict(
        image_size=16,
        in_channels=3,
        model_channels=32,
        out_channels=3,
        num_res_blocks=1,
        attention_resolutions=(2,),
        channel_mult=(1, 1),
        num_classes=None,
        num_heads=2,
        num_head_channels=-1,
        resblock_updown=False,
        conv_resample=True,
        use_scale_shift_norm=False,
    ),
}


def import_official(checkout: str, tmp: str):
    """cm.unet from the checkout's three files, copied into ``tmp`` (FlashAttention replaced)."""
    pkg = os.path.join(tmp, "cm")
    os.makedirs(pkg)
    for name in ("unet.py", "nn.py", "fp16_util.py"):
        shutil.copy(os.path.join(checkout, "cm", name), pkg)
    with open(os.path.join(pkg, "__init__.py"), "w"):
        pass
    with open(os.path.join(pkg, "logger.py"), "w") as f:  # fp16_util's logging, unused here
        f.write("def log(*args, **kwargs):\n    pass\n")
    sys.path.insert(0, tmp)
    unet = importlib.import_module("cm.unet")
    unet.QKVFlashAttention = lambda embed_dim, num_heads, **kw: unet.QKVAttention(num_heads)
    return unet


def check_attention_layout(unet, torch) -> None:
    """cm's QKVAttention == attention over qkv read as (three h d), FlashAttention's layout."""
    b, heads, d, s = 2, 3, 4, 5
    qkv = torch.randn(b, 3 * heads * d, s, dtype=torch.float64)
    q, k, v = qkv.reshape(b, 3, heads, d, s).unbind(1)
    w = torch.softmax(torch.einsum("bhdt,bhds->bhts", q, k) / math.sqrt(d), dim=-1)
    want = torch.einsum("bhts,bhds->bhdt", w, v).reshape(b, heads * d, s)
    got = unet.QKVAttention(heads)(qkv)
    assert torch.allclose(got, want, atol=1e-12), "QKVAttention does not read qkv as (three h d)"


def randomize(model, torch, gen, embedding: str = "label_emb.weight") -> dict:
    """Random float16-representable weights, non-zero everywhere (``embedding``: the class
    embedding's name, drawn with unit variance); returns the float16 state dict."""
    state = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                value = 0.1 * torch.randn(p.shape, generator=gen)
            elif p.ndim == 1:  # GroupNorm scale
                value = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            elif name == embedding:
                value = torch.randn(p.shape, generator=gen)
            else:
                fan_in = p[0].numel()
                value = torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
            half = value.half()
            half[half == 0] = 1e-3  # no exact zeros (float16 rounds the tiniest draws to 0)
            p.copy_(half.float())
            state[name] = half.contiguous()
    assert all(bool((v != 0).all()) for v in state.values())
    return state


def make(unet, torch, name: str, kwargs: dict) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(SEED + len(name))
    model = unet.UNetModel(**kwargs).eval()
    state = randomize(model, torch, gen)
    n, size = len(SIGMAS), kwargs["image_size"]
    z = torch.randn(n, kwargs["in_channels"], size, size, generator=gen, dtype=torch.float64)
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    c_in = 1.0 / torch.sqrt(sigma**2 + SIGMA_DATA**2)
    x_in = (c_in[:, None, None, None] * sigma[:, None, None, None] * z).float()
    timesteps = (1000 * 0.25 * torch.log(sigma + 1e-44)).float()
    labels = torch.tensor(LABELS) if kwargs.get("num_classes") else None
    with torch.no_grad():
        out = model(x_in, timesteps, labels)
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
    arrays = dict(
        z=nhwc(z).astype(np.float32),
        sigma=sigma.numpy(),
        timesteps=timesteps.numpy(),
        x_in=nhwc(x_in),
        out=nhwc(out),
    )
    if labels is not None:
        arrays["labels"] = labels.numpy().astype(np.int32)
    return state, arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="a checkout of github.com/openai/consistency_models")
    parser.add_argument("--out", default=FIXTURES, help="fixture directory")
    args = parser.parse_args()
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory() as tmp:
        unet = import_official(os.path.abspath(args.checkout), tmp)
        check_attention_layout(unet, torch)
        for name, kwargs in VARIANTS.items():
            state, arrays = make(unet, torch, name, kwargs)
            path = os.path.join(args.out, f"cm_unet_{name}")
            save_file(state, path + ".safetensors")
            np.savez(path + ".npz", **arrays)
            print(
                f"{path}.safetensors: {len(state)} tensors, "
                f"{sum(v.numel() for v in state.values())} parameters; output std "
                f"{arrays['out'].std():.3f}"
            )


if __name__ == "__main__":
    main()
