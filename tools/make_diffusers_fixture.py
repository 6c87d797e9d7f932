"""Builds tests/fixtures/diffusers_unet/: a tiny diffusers ``UNet2DModel`` laid out like the consistency
models diffusers holds (openai/diffusers-cd_imagenet64_l2 and the others, made by diffusers'
``scripts/convert_consistency_to_diffusers.py``), with its outputs, for tests/test_convert.py (which
needs neither torch nor diffusers).

The network has the block types of diffusers' ``IMAGENET_64_UNET_CONFIG`` at tiny width: 16×16,
``block_out_channels`` (32, 32) (widths that are multiples of 32, as cm's GroupNorm32 and
diffusers' ``norm_num_groups=32`` both need), one ResNet per level, ``ResnetDownsampleBlock2D`` then
``AttnDownBlock2D`` (mirrored up), resnet up/down-sampling, ``resnet_time_scale_shift="scale_shift"``,
``attn_norm_num_groups=32``, ``attention_head_dim=16`` and 10 classes. Weights are random (seeded;
make_cm_fixture's ``randomize``), non-zero everywhere, rounded to float16 and saved as float16 (the
converter casts to float32); the
reference runs in float64 on the rounded values and the float32 inputs (diffusers computes the
sinusoidal time embedding in float32 in any case), so the comparison measures the converted
network's float32 rounding alone.

Inputs follow ``ConsistencyModelPipeline`` with ``CMStochasticIterativeScheduler``: for noise z and
level σ the network sees ``scale_model_input`` = σ·z / √(σ² + σ_d²) and the timestep
``sigma_to_t(σ)`` = 1000·0.25·ln(σ + 1e-44) (cm's c_noise; passed as a float tensor); the first two
examples sit at σ = T = 80. Files: ``diffusion_pytorch_model.safetensors`` and ``config.json`` (as
``save_pretrained`` writes them) and ``reference.npz`` (z, σ, timesteps, labels, the network input
and output, NHWC float32).

Regenerate (torch, diffusers and safetensors needed here only):

    pip install torch diffusers safetensors
    python tools/make_diffusers_fixture.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_cm_fixture import randomize  # noqa: E402 -- the same weight draws as the cm fixtures

SEED = 0
SIGMA_DATA = 0.5
SIGMAS = (80.0, 80.0, 2.0, 0.02)
LABELS = (0, 3, 7, 9)
OUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "tests",
    "fixtures",
    "diffusers_unet",
)

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    num_class_embeds=10,
    block_out_channels=(32, 32),
    attention_head_dim=16,
    down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"),
    resnet_time_scale_shift="scale_shift",
    attn_norm_num_groups=32,
    upsample_type="resnet",
    downsample_type="resnet",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=OUT, help="fixture directory")
    args = parser.parse_args()
    import torch
    from diffusers import CMStochasticIterativeScheduler, UNet2DModel
    from safetensors.torch import load_file, save_file

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = UNet2DModel(**UNET_CONFIG).eval()
    randomize(model, torch, gen, embedding="class_embedding.weight")
    scheduler = CMStochasticIterativeScheduler(sigma_min=0.002, sigma_max=80.0)
    n, size = len(SIGMAS), UNET_CONFIG["sample_size"]
    z = torch.randn(n, 3, size, size, generator=gen, dtype=torch.float64)
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    x_in = (
        sigma[:, None, None, None] * z / torch.sqrt(sigma[:, None, None, None] ** 2 + SIGMA_DATA**2)
    ).float()
    timesteps = torch.from_numpy(scheduler.sigma_to_t(sigma.numpy())).float()
    labels = torch.tensor(LABELS)
    with (
        torch.no_grad()
    ):  # in float64 on the float32 inputs: the reference carries no float32 rounding
        out = model.double()(x_in.double(), timesteps.double(), class_labels=labels).sample.float()
        model.float()
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        state = {
            k: v.half().contiguous()
            for k, v in load_file(os.path.join(tmp, "diffusion_pytorch_model.safetensors")).items()
        }
        assert all(bool((v != 0).all()) for v in state.values())
        save_file(state, os.path.join(args.out, "diffusion_pytorch_model.safetensors"))
        with (
            open(os.path.join(tmp, "config.json")) as f,
            open(os.path.join(args.out, "config.json"), "w") as g,
        ):
            g.write(f.read())
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
    np.savez(
        os.path.join(args.out, "reference.npz"),
        z=nhwc(z).astype(np.float32),
        sigma=sigma.numpy(),
        timesteps=timesteps.numpy(),
        labels=labels.numpy().astype(np.int32),
        x_in=nhwc(x_in),
        out=nhwc(out),
    )
    print(
        f"{args.out}: {len(state)} tensors, {sum(v.numel() for v in state.values())} parameters; "
        f"output std {out.std():.3f}"
    )


if __name__ == "__main__":
    main()
