"""Declaring a method's config fields, and the blocks several methods share.

A method declares its config block with ``declare(c, "block", field=default, ...)`` in its
``MethodSpec.fields``; the run-config schema (``methods.schema``) is ``config.base_config()`` with every
registered method's block. A field several methods use (the distance of the discrete methods, the
lognormal proposal of iCT and sCM) is declared by one helper here that those methods call, so that it
has one schema default.
"""

from __future__ import annotations

from typing import Any

import ml_collections


def declare(c: ml_collections.ConfigDict, block: str, **fields: Any) -> None:
    """Adds ``c.<block>.<field> = default`` for each field that ``c`` does not have yet (a field
    already there keeps its value: declarations are idempotent). A ``FieldReference`` default is
    copied, so that configs never share one."""
    node = c
    for part in block.split("."):
        if part not in node:
            node[part] = ml_collections.ConfigDict()
        node = node[part]
    for name, default in fields.items():
        if name in node:
            continue
        if isinstance(default, ml_collections.FieldReference):
            default = ml_collections.FieldReference(default.get(), field_type=default.get_type())
        node[name] = default


def distance_fields(c: ml_collections.ConfigDict) -> None:
    """``config.loss``'s distance d(a, b) of a consistency loss (CM Eq. 7; pseudo-Huber: iCT §3.3;
    LPIPS with its weights file and net)."""
    declare(
        c,
        "loss",
        distance="l2",
        huber_c=ml_collections.FieldReference(None, field_type=float),
        lpips_weights="",  # .safetensors file for distance = lpips
        lpips_net="vgg",
    )


def lognormal_fields(c: ml_collections.ConfigDict) -> None:
    """``config.loss``'s lognormal proposal ln σ ~ N(p_mean, p_std²): iCT's choice of n (§3.5) and
    sCM's proposal of the noise level (sCM §4.3)."""
    declare(c, "loss", p_mean=-1.1, p_std=2.0)
