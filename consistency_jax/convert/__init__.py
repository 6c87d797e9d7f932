"""Converting the released PyTorch consistency models into runs of this library.

    python -m consistency_jax.convert --from=cm --checkpoint=cd_imagenet64_lpips.pt \\
        --config=imagenet64 --method=cd --out=runs/cd_imagenet64_lpips

The reference PyTorch code of Consistency Models (Song et al. 2023; openai/consistency_models,
"cm") released its EDM teachers and its CD and CT models for ImageNet 64 (class-conditional) and
LSUN 256 (unconditional) as state dicts of the ADM UNet (Dhariwal & Nichol 2021). This command reads
one (``torch.load(weights_only=True)``, or a ``.safetensors`` copy of it: nothing is unpickled), maps
every tensor onto ``networks.unet.ADMUNet`` and writes a run directory that the sampling command
(whose samples the evaluation command scores), CD (``--config.teacher.workdir=``, for an EDM run)
and ``--config.init.workdir=`` read like any trained run. The run holds the released weights as θ, with
no eval EMA, θ⁻ or optimizer state of its own (it cannot be resumed as a training run).

Tensor mapping (PyTorch -> Flax):

* convolutions OIHW -> HWIO; linear layers (out, in) -> (in, out); GroupNorm weight -> scale;
  ``label_emb.weight`` -> ``Embed_0.embedding``; ``time_embed.{0,2}`` -> the two dense layers of the
  timestep MLP (the sinusoidal embedding [cos | sin] with frequencies 10000^(−i/half) has no weights).
* attention ``qkv`` (a 1×1 convolution to 3C channels) is read as ``(three h d)``: rows [0, C) are
  Q, [C, 2C) K and [2C, 3C) V, each split into heads of ``num_head_channels`` consecutive channels.
  That is the layout of the FlashAttention path the released models ran (``QKVFlashAttention``) and
  of cm's ``QKVAttention``; ``ADMUNet``'s ``AttnBlock`` splits its q, k and v projections the same
  way. The ch^(−1/4) scaling of q and of k is part of cm's forward pass, not of the weights; here
  ``AttnBlock`` applies the same 1/√d to q·k (by scaling q).
* the network's time input is cm's 1000·0.25·ln(σ + 1e-44) (``sigmas.c_noise = "cm"`` in the
  configs this command starts from); GroupNorm has 32 groups and ε = 1e-5 as cm's ``GroupNorm32``.

The released models ran in float16; the converted parameters are float32 (float16 tensors are cast).

The package holds one module per source format (``cm``, ``jcm``, ``diffusers``), the run-directory
writer (``run``), what they share (``common``) and the command (``command``, run by ``__main__``).
PyTorch ``.pt`` files are read by ``consistency_jax.torch_pickle`` (no PyTorch, nothing unpickled
but tensors).
"""

from consistency_jax.convert.cm import cm_params, convert_cm, read_state_dict
from consistency_jax.convert.common import ConvertError
from consistency_jax.convert.diffusers import (
    DIFFUSERS_WEIGHTS,
    convert_diffusers,
    diffusers_arch,
    diffusers_files,
    diffusers_state_dict,
    read_diffusers_config,
)
from consistency_jax.convert.jcm import JCM_TREES, convert_jcm, jcm_params, read_jcm_state
from consistency_jax.convert.run import (
    CM_CONFIGS,
    JCM_CONFIGS,
    PROVENANCE,
    abstract_params,
    needs_fixed_groups,
    run_config,
)

__all__ = [
    "CM_CONFIGS",
    "DIFFUSERS_WEIGHTS",
    "JCM_CONFIGS",
    "JCM_TREES",
    "PROVENANCE",
    "ConvertError",
    "abstract_params",
    "cm_params",
    "convert_cm",
    "convert_diffusers",
    "convert_jcm",
    "diffusers_arch",
    "diffusers_files",
    "diffusers_state_dict",
    "jcm_params",
    "needs_fixed_groups",
    "read_diffusers_config",
    "read_jcm_state",
    "read_state_dict",
    "run_config",
]
