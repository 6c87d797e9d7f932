"""Training methods as plug-ins: one module per method, one registry.

  edm      an EDM diffusion model, the teacher of CD            (``methods/edm.py``)
  cd       consistency distillation, CM Algorithm 2             (``methods/cd.py``)
  ct, ict  consistency training: CM Algorithm 3 and iCT         (``methods/ct.py``)
  cm_continuous_cd, cm_continuous_ct  CM's continuous-time CD/CT (``methods/cm_continuous.py``)
  ect      easy consistency tuning (Geng et al. 2024)            (``methods/ect.py``)

Every module of this package is imported here, and each registers its ``MethodSpec``; a new method is
one new file (see ``methods/base.py`` for the contract and the README for an example). The registry is
what configs (``config.method``), the config validation, the training loop, evaluation and loading
consult.
"""

from __future__ import annotations

import importlib
import pkgutil

from consistency_jax.methods.base import (
    FAMILIES,
    FROZEN_TREES,
    BuildContext,
    Frozen,
    Method,
    MethodSpec,
    frozen_inputs,
    register,
    registered,
)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")


def names() -> tuple[str, ...]:
    """The registered method names."""
    return tuple(sorted(registered()))


def get(name: str) -> MethodSpec:
    """The plug-in of ``name``.

    Raises:
      ValueError: naming the known methods when ``name`` is not one.
    """
    specs = registered()
    if name not in specs:
        raise ValueError(f"Unknown method {name!r} (config.method); choose one of {names()}.")
    return specs[name]


__all__ = [
    "FAMILIES",
    "FROZEN_TREES",
    "BuildContext",
    "Frozen",
    "Method",
    "MethodSpec",
    "frozen_inputs",
    "get",
    "names",
    "register",
    "registered",
]
