"""Training methods as plug-ins: one module per method, one registry.

  edm      an EDM diffusion model, the teacher of CD            (``methods/edm.py``)
  cd       consistency distillation, CM Algorithm 2             (``methods/cd.py``)
  ct, ict  consistency training: CM Algorithm 3 and iCT         (``methods/ct.py``)
  cm_continuous_cd, cm_continuous_ct  CM's continuous-time CD/CT (``methods/cm_continuous.py``)
  ect      easy consistency tuning (Geng et al. 2024)            (``methods/ect.py``)

  sct, scd  sCM in TrigFlow (Lu & Song 2024)                    (``methods/scm.py``)

Every module of this package is imported here, and each registers its ``MethodSpec``; a new method is
one new file (see ``methods/base.py`` for the contract and docs/adding_a_method.md for an example). The
registry is what configs (``config.method``, ``apply_preset``), the config validation, the training
loop, evaluation and loading consult.

The run-config schema is ``config.base_config()`` (the blocks every run has) with the config block of
every registered method (``schema``): a run's config carries every method's fields, so that the config
stored with any run, old or new, compares field by field with any other (``default_values``).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Mapping
from typing import Any

import ml_collections

from consistency_jax import config as config_lib
from consistency_jax.methods.base import (
    FAMILIES,
    FROZEN_TREES,
    BuildContext,
    Frozen,
    Method,
    MethodSpec,
    NetworkAddition,
    TeacherSource,
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


def add_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Declares every registered method's config block on ``c`` (fields it lacks get their schema
    defaults; fields it has keep their values)."""
    for name in names():
        registered()[name].fields(c)
    return c


def schema() -> ml_collections.ConfigDict:
    """Every field of a run config with its schema default: ``config.base_config()`` and every
    registered method's block."""
    return add_fields(config_lib.base_config())


def default_values() -> dict[str, Any]:
    """``schema()`` as a JSON dict (the form a checkpoint stores a config in), for comparing the
    config of a checkpoint written before a field existed (``checkpoint.config_differences``)."""
    return json.loads(schema().to_json_best_effort(sort_keys=True))


def apply_preset(
    c: ml_collections.ConfigDict,
    method: str,
    dataset: str | None = None,
    args: Mapping[str, Any] | None = None,
    *,
    required: bool = False,
) -> ml_collections.ConfigDict:
    """Makes ``c`` a run of ``method``: declares every method's block, sets ``c.method``, the method's
    paper defaults, and its hyperparameters for ``dataset`` (``MethodSpec.presets``; a method without
    settings for ``dataset`` runs with its defaults, unless ``required``).

    Args:
      c: a config with its data, network and budget set (``config.base_config()`` and a data set's).
      method: a registered method.
      dataset: the data set key of the method's presets ("toy", "digits", "cifar10", ...).
      args: the config file's arguments (``config.parse_arg``), passed to the preset.
      required: refuse a method without settings for ``dataset`` (the paper configs, whose
        schedule, lr and EMA rates are the method's).

    Raises:
      ValueError: an unknown method, or (``required``) a method without settings for ``dataset``
        (naming the methods that have some).
    """
    spec = get(method)
    if required and dataset not in spec.presets:
        have = tuple(n for n in names() if dataset in registered()[n].presets)
        raise ValueError(
            f"method={method!r} has no settings for the data set {dataset!r}; methods with "
            f"{dataset} settings: {', '.join(have)}."
        )
    add_fields(c)
    spec.defaults(c)
    c.method = method
    if dataset in spec.presets:
        spec.presets[dataset](c, dict(args or {}))
    return c


def network(config) -> Any:
    """The network module of a run: ``config.model``'s network with what the run's method adds
    beside it (``MethodSpec.network_addition``, switched on by its ``config.model`` flag)."""
    from consistency_jax import networks

    module = networks.from_config(config.model)
    addition = get(config.method).network_addition
    if addition is not None and config.model.get(addition.field, False):
        module = addition.wrap(module)
    return module


__all__ = [
    "FAMILIES",
    "FROZEN_TREES",
    "BuildContext",
    "Frozen",
    "Method",
    "MethodSpec",
    "NetworkAddition",
    "TeacherSource",
    "add_fields",
    "apply_preset",
    "default_values",
    "frozen_inputs",
    "get",
    "names",
    "network",
    "register",
    "registered",
    "schema",
]
