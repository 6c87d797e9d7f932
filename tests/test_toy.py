"""The toy's exact answers: score and denoiser against NumPy / autodiff, the ODE map against a closed form."""

import jax.numpy as jnp
import numpy as np

from consistency_jax import toy


def _np_logpdf(gm, x, t):
    var = gm.std**2 + t * t
    sq = np.sum((x[:, None, :] - gm.means[None]) ** 2, -1)
    comp = np.log(gm.weights)[None] - 0.5 * sq / var - np.log(2 * np.pi * var)
    m = comp.max(1, keepdims=True)
    return (m + np.log(np.exp(comp - m).sum(1, keepdims=True)))[:, 0]


def test_exact_score_is_gradient_of_noised_log_density():
    gm = toy.ring_mixture()
    x = np.random.default_rng(0).standard_normal((6, 2)) * 0.8
    for t in [0.01, 0.3, 2.0]:
        h = 1e-6
        num = np.stack(
            [
                (_np_logpdf(gm, x + h * e, t) - _np_logpdf(gm, x - h * e, t)) / (2 * h)
                for e in np.eye(2)
            ],
            axis=1,
        )
        got = toy.exact_score(gm.as_params(), jnp.asarray(x, jnp.float32), jnp.full((6,), t))
        np.testing.assert_allclose(np.asarray(got), num, rtol=2e-3, atol=2e-3 / t)


def test_exact_denoiser_is_tweedie():
    """D(x, t) = x + t²·∇log p_t(x) (Tweedie), and the NumPy float64 twin agrees."""
    gm = toy.ring_mixture()
    x = np.random.default_rng(1).standard_normal((6, 2))
    t = 0.4
    p = gm.as_params()
    d = toy.exact_denoiser(p, jnp.asarray(x, jnp.float32), jnp.full((6,), t))
    s = toy.exact_score(p, jnp.asarray(x, jnp.float32), jnp.full((6,), t))
    np.testing.assert_allclose(np.asarray(d), x + t * t * np.asarray(s), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(d), toy.exact_denoiser_np(gm, x, t), rtol=1e-4, atol=1e-5)


def test_ode_map_single_gaussian_closed_form():
    gm = toy.GaussianMixture(means=np.array([[0.3, -0.2]]), std=0.5, weights=np.array([1.0]))
    x_T = np.random.default_rng(2).standard_normal((10, 2)) * 80
    got = toy.ode_map(gm, x_T, 80.0, 0.002)
    want = gm.means + (x_T - gm.means) * np.sqrt(0.25 + 0.002**2) / np.sqrt(0.25 + 80.0**2)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-9)


def test_ode_map_transports_noise_to_the_mixture():
    gm = toy.ring_mixture()
    x_T = np.random.default_rng(3).standard_normal((400, 2)) * 80
    x0 = toy.ode_map(gm, x_T, 80.0, 0.002)
    d = np.sqrt(((x0[:, None] - gm.means[None]) ** 2).sum(-1)).min(1)
    assert np.mean(d < 4 * gm.std) > 0.99  # every point lands on a mode
    counts = np.bincount(
        np.sqrt(((x0[:, None] - gm.means[None]) ** 2).sum(-1)).argmin(1), minlength=8
    )
    assert counts.min() > 25  # and the modes are equally populated (50 expected each)
