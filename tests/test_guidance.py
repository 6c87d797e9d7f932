"""Classifier-free guidance of a teacher and label dropout, against hand-written computations."""

import jax
import jax.numpy as jnp
import numpy as np

from consistency_jax import guidance


def _teacher(params, x, sigma, labels):
    """A hand-written class-conditional 'denoiser': x/(1 + σ²) + w[label]."""
    return x / (1.0 + sigma[:, None] ** 2) + params["w"][labels]


def test_guided_teacher_is_the_cfg_combination_and_omega_one_is_the_teacher_itself():
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    }  # 3 classes + the null label 3
    x = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    sigma = jnp.asarray(rng.uniform(0.1, 5.0, 5), jnp.float32)
    labels = jnp.asarray([0, 1, 2, 1, 0])
    assert guidance.guided_denoiser(_teacher, 1.0, 3) is _teacher
    for omega in (0.0, 2.0, 3.5):
        out = np.asarray(guidance.guided_denoiser(_teacher, omega, 3)(params, x, sigma, labels))
        w = np.asarray(params["w"], np.float64)
        base = np.asarray(x, np.float64) / (1 + np.asarray(sigma, np.float64)[:, None] ** 2)
        expect = omega * (base + w[np.asarray(labels)]) + (1 - omega) * (base + w[3])
        np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)


def test_label_dropout_rate_and_null_label():
    labels = jnp.asarray(np.arange(20000) % 10)
    out = np.asarray(guidance.drop_labels(jax.random.key(0), labels, 0.1, 10))
    dropped = out == 10
    assert abs(dropped.mean() - 0.1) < 0.01
    np.testing.assert_array_equal(out[~dropped], np.asarray(labels)[~dropped])
    assert guidance.drop_labels(jax.random.key(0), labels, 0.0, 10) is labels
