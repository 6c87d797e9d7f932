"""Classifier-free guidance (Ho & Salimans 2022) for class-conditional runs: the label dropout that
trains the unconditional model D(x|∅) inside the conditional one, and the guided teacher of
distillation.

A network of a class-conditional run with guidance has one label more than the data: the last index,
``null_label``, means "no class" (∅). Training drops each example's label to ∅ with a probability
(``drop_labels``); a guided teacher denoiser is then (CFG Eq. 6 in denoiser form)

    D_ω(x, σ | c) = ω·D(x, σ | c) + (1 − ω)·D(x, σ | ∅),

so ω = 1 is the conditional teacher itself and ω = 0 the unconditional one. Consistency distillation
from D_ω learns the guided model (CM §6, "guided distillation"; sCM §5 distils with a guided teacher
too); in TrigFlow the guided velocity is the same combination of the two velocities, since the
velocity is affine in D. MeanFlow's guidance in training (its own velocities, one network evaluation
at sampling) is ``methods.meanflow.guided_velocity``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
# D(φ, x_σ, σ, labels) -> the denoised estimate (the teacher convention of ``parameterization``).
Denoiser = Callable[[Any, Array, Array, Array | None], Array]


def drop_labels(rng: Array, labels: Array, probability: float, null_label: int) -> Array:
    """Each label replaced by ``null_label`` with ``probability`` (independently per example)."""
    if probability <= 0.0:
        return labels
    drop = jax.random.uniform(rng, labels.shape) < probability
    return jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)


def guided_denoiser(denoiser: Denoiser, omega: float, null_label: int) -> Denoiser:
    """D_ω = ω·D(·|c) + (1 − ω)·D(·|∅) (module docstring); ω = 1 returns ``denoiser`` itself, so an
    unguided run computes exactly what it computed before guidance existed."""
    if omega == 1.0:
        return denoiser

    def guided(params, x, sigma, labels):
        if labels is None:
            raise ValueError("A guided teacher needs class labels (data.use_labels).")
        null = jnp.full_like(labels, null_label)
        cond = denoiser(params, x, sigma, labels)
        uncond = denoiser(params, x, sigma, null)
        return omega * cond + (1.0 - omega) * uncond

    return guided
