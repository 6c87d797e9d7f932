"""consistency_jax: Consistency Models (CD, CT, iCT) in JAX/Flax.

The public API. The maths follows Song et al., "Consistency Models" (2023), and Song & Dhariwal,
"Improved Techniques for Training Consistency Models" (2023); see the README and docstrings.

Training methods are plug-ins (``consistency_jax.methods``): ``methods.get("ict")`` is the registered
plug-in of a name, and ``ConsistencyTraining``, ``ConsistencyDistillation`` and ``EDMDenoiser`` are the
method objects that ``make_train_step`` takes.

The names below are imported on first use (PEP 562), so that ``import consistency_jax.loading`` or
``consistency_jax.samplers`` does not load the training code.
"""

from __future__ import annotations

import importlib

_API = {
    "consistency_jax.editing": (
        "Transform",
        "as_mask",
        "colorization_mask",
        "colorization_transform",
        "colorize",
        "denoise",
        "edit",
        "edm_colorize",
        "edm_denoise",
        "edm_edit",
        "edm_inpaint",
        "edm_interpolate",
        "edm_sdedit",
        "edm_super_resolve",
        "identity_transform",
        "inpaint",
        "inpainting_mask",
        "interpolate",
        "luma_basis",
        "patch_average",
        "patch_basis",
        "project",
        "sdedit",
        "slerp",
        "super_resolve",
        "superres_mask",
        "superres_transform",
        "upsample_nearest",
    ),
    "consistency_jax.losses": (
        "LossConfig",
        "consistency_loss",
        "default_huber_c",
        "l1_distance",
        "l2_distance",
        "make_distance",
        "pseudo_huber_distance",
        "sample_index",
        "weighting",
    ),
    "consistency_jax.methods": ("Frozen", "Method", "MethodSpec"),
    "consistency_jax.methods.cd": ("ConsistencyDistillation",),
    "consistency_jax.methods.ct": ("ConsistencyTraining",),
    "consistency_jax.methods.edm": ("EDMDenoiser",),
    "consistency_jax.networks": ("get_network", "make_apply_fn"),
    "consistency_jax.parameterization": (
        "SigmaConfig",
        "c_noise",
        "consistency_fn",
        "consistency_scalings",
        "denoiser_fn",
        "denoiser_to_score",
        "edm_scalings",
        "network_teacher",
    ),
    "consistency_jax.samplers": (
        "edm_heun_sample",
        "make_sampler",
        "multistep_sample",
        "onestep_sample",
        "times_from_indices",
    ),
    "consistency_jax.schedules": (
        "Curriculum",
        "cm_num_scales",
        "cm_target_mu",
        "ict_num_scales",
        "karras_sigmas",
        "karras_time",
    ),
    "consistency_jax.solvers": ("euler_step", "heun_step"),
    "consistency_jax.train": ("make_multi_step", "make_train_step"),
    "consistency_jax.train_state": ("TrainState", "ema_update"),
}
_WHERE = {name: module for module, names in _API.items() for name in names}
__all__ = sorted(_WHERE) + ["methods"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    if name == "methods":
        return importlib.import_module("consistency_jax.methods")
    raise AttributeError(f"module 'consistency_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
