"""Denoiser networks F_θ.

Every network is a Flax linen module called as

    module.apply({"params": params}, x, c_noise, y=None, train=False, rngs={"dropout": key})

with ``x`` of shape (B, ...) (NHWC for images, (B, D) for vectors), ``c_noise`` of shape (B,)
(the preconditioned noise level, see ``consistency_jax.parameterization``), optional integer class
labels ``y`` of shape (B,), and it returns an array of the same shape as ``x``. Networks never read
a config: they take plain constructor arguments. ``get_network(name, **kwargs)`` builds one by name.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

# name -> (module path, class name). Imported lazily so that importing the package stays cheap.
_REGISTRY: dict[str, tuple[str, str]] = {
    "mlp": ("consistency_jax.networks.mlp", "MLP"),
    "ncsnpp": ("consistency_jax.networks.ncsnpp", "NCSNpp"),
    "ddpmpp": ("consistency_jax.networks.ncsnpp", "DDPMpp"),
    "adm": ("consistency_jax.networks.unet", "ADMUNet"),
}


def make_apply_fn(module):
    """Adapts a Flax module to the library's raw-network convention

        apply_fn(params, x, c_noise, *, labels=None, train=False, rng=None) -> array like x,

    which ``parameterization.consistency_fn``, the losses and the samplers call. ``rng`` is the dropout
    key (needed only when ``train`` is True and the module has dropout); ``c_noise_2`` the second time
    input of a network built with ``second_time=True`` (MeanFlow).

    The call is a nested ``jax.jit`` with the module as its static argument (modules compare and hash
    by their fields): every program of a process that calls equal networks on inputs of the same
    shapes (a train step's two or three calls, the EMA's, each sampler and evaluation, in any run of
    that network) reuses one trace of the network and its derivatives instead of tracing it again.
    XLA inlines the nested call, so the compiled programs, and their results, are those of the
    network traced in place.
    """
    try:
        hash(module)
        call = _shared_apply()
    except TypeError:  # a module with an unhashable field: traced in place at every call
        call = _apply_module

    def apply_fn(params, x, c_noise, *, labels=None, train=False, rng=None, c_noise_2=None):
        rng = rng if train else None  # unused unless training: one program with or without it
        return call(
            module, params, x, c_noise, labels=labels, train=train, rng=rng, c_noise_2=c_noise_2
        )

    return apply_fn


def _apply_module(
    module, params, x, c_noise, *, labels=None, train=False, rng=None, c_noise_2=None
):
    rngs = {"dropout": rng} if (train and rng is not None) else {}
    extra = {} if c_noise_2 is None else {"c_noise_2": c_noise_2}
    return module.apply({"params": params}, x, c_noise, labels, train=train, rngs=rngs, **extra)


@functools.cache
def _shared_apply():
    """``_apply_module`` jitted with the module and ``train`` static (built on first use, so that
    importing this package does not import JAX)."""
    import jax

    return jax.jit(_apply_module, static_argnums=0, static_argnames="train")


def init_params(module, rng, example_shape: tuple[int, ...], *, labels: bool = False):
    """θ of ``module`` (float32), initialised for inputs of shape ``(1, *example_shape)``, noise
    levels (1,) and, if ``labels``, int32 class labels (1,); ``rng`` seeds both the "params" and
    the "dropout" streams. Like ``make_apply_fn``'s call, a nested jit keyed by the module's value:
    a process traces an equal network's initialiser once per input shape, however many programs
    (the train state's creation, its shape evaluation, a second run) contain it."""
    try:
        hash(module)
        call = _shared_init()
    except TypeError:  # an unhashable field: traced in place
        call = _init_module
    return call(module, rng, tuple(example_shape), labels)


def _init_module(module, rng, example_shape, labels):
    import jax.numpy as jnp

    x = jnp.zeros((1, *example_shape), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if labels else None
    return module.init({"params": rng, "dropout": rng}, x, jnp.zeros((1,)), y)["params"]


@functools.cache
def _shared_init():
    """``_init_module`` jitted with the module, the shape and ``labels`` static."""
    import jax

    return jax.jit(_init_module, static_argnums=(0, 2, 3))


def network_names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_network(name: str, **kwargs: Any):
    """Builds the network ``name`` with constructor arguments ``kwargs``."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown network {name!r}; known networks: {', '.join(network_names())}.")
    module_path, cls_name = _REGISTRY[name]
    cls = getattr(importlib.import_module(module_path), cls_name)
    return cls(**kwargs)


def from_config(model_config):
    """The network of a run's ``config.model`` (name, kwargs, compute dtype). What a method adds beside
    it (sCM's log-variance head) is the method's: ``methods.network(config)`` builds a run's whole
    module."""
    kwargs = dict(model_config.kwargs)
    if model_config.dtype != "float32":
        import jax.numpy as jnp

        kwargs["dtype"] = jnp.dtype(model_config.dtype)
    return get_network(model_config.name, **kwargs)
