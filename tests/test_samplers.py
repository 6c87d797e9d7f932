"""Samplers: determinism per key, Algorithm 1's noise schedule, the EDM Heun sampler on a closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consistency_jax import parameterization as P
from consistency_jax import samplers
from consistency_jax.networks import get_network, make_apply_fn

SIG = P.SigmaConfig()


def _mlp():
    net = get_network("mlp", hidden=16, depth=1)
    return make_apply_fn(net), net.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))[
        "params"
    ]


def test_samplers_are_deterministic_per_key():
    apply_fn, params = _mlp()
    sample = samplers.make_sampler(apply_fn, SIG, (80.0, 0.5), (16, 2))
    a, b = sample(params, jax.random.key(1)), sample(params, jax.random.key(1))
    c = sample(params, jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


def test_multistep_follows_algorithm_1():
    """With F ≡ 0 the model is f(x, t) = c_skip(t)·x; replay Algorithm 1 with the same draws in NumPy."""
    zero = lambda params, x, c, **kw: jnp.zeros_like(x)
    ts = (80.0, 2.0, 0.3)
    rng = jax.random.key(4)
    got = samplers.multistep_sample(zero, None, rng, (5, 3), ts, SIG)
    keys = jax.random.split(rng, 3)
    cskip = lambda t: 0.25 / ((t - 0.002) ** 2 + 0.25)
    x = 80.0 * np.asarray(jax.random.normal(keys[0], (5, 3)), np.float64) * cskip(80.0)
    for j, t in enumerate(ts[1:], start=1):
        x = x + np.sqrt(t * t - 0.002**2) * np.asarray(
            jax.random.normal(keys[j], (5, 3)), np.float64
        )
        x = cskip(t) * x
    np.testing.assert_allclose(np.asarray(got), x, rtol=1e-5, atol=1e-6)


def test_trailing_epsilon_is_the_identity_and_bad_times_are_named():
    apply_fn, params = _mlp()
    a = samplers.multistep_sample(apply_fn, params, jax.random.key(0), (4, 2), (80.0, 1.0), SIG)
    b = samplers.multistep_sample(
        apply_fn, params, jax.random.key(0), (4, 2), (80.0, 1.0, 0.002), SIG
    )
    np.testing.assert_array_equal(np.asarray(a)[:, :], np.asarray(b)[:, :])
    with pytest.raises(ValueError, match="strictly decreasing"):
        samplers.multistep_sample(apply_fn, params, jax.random.key(0), (4, 2), (1.0, 80.0), SIG)
    with pytest.raises(ValueError, match="sigma_min, sigma_max"):
        samplers.multistep_sample(apply_fn, params, jax.random.key(0), (4, 2), (100.0,), SIG)


def test_times_from_indices_counts_from_T():
    ts = samplers.times_from_indices((0, 22, 39), 40, SIG)
    grid = (0.002 ** (1 / 7) + np.arange(40) / 39 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    np.testing.assert_allclose(ts, [80.0, grid[39 - 22], 0.002], rtol=1e-5)
    with pytest.raises(ValueError):
        samplers.times_from_indices((0, 40), 40, SIG)


def _np_edm_heun(x, s, n):
    """EDM Algorithm 1 in NumPy float64 for data N(0, s²I): Heun steps on the Karras grid, Euler into 0."""
    i = np.arange(n)
    grid = (0.002 ** (1 / 7) + i / (n - 1) * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    ts = np.concatenate([grid[::-1], [0.0]])
    D = lambda x, t: s * s / (s * s + t * t) * x
    for a, b in zip(ts[:-1], ts[1:]):
        d = (x - D(x, a)) / a
        x_next = x + (b - a) * d
        if b > 0:
            x_next = x + (b - a) * 0.5 * (d + (x_next - D(x_next, b)) / b)
        x = x_next
    return x


def test_edm_heun_sampler_on_gaussian_data_closed_form():
    """Data N(0, s²I): matches a NumPy re-implementation of EDM Algorithm 1, and converges to the
    exact PF-ODE map x_T·s/√(s² + T²) as the number of steps grows."""
    s = 0.5

    def denoise(x, t):
        return (s**2 / (s**2 + t**2))[:, None] * x

    x_T = 80.0 * jax.random.normal(jax.random.key(0), (64, 2))
    exact = np.asarray(x_T, np.float64) * s / np.sqrt(s**2 + 80.0**2)
    errs = []
    for n in (18, 72):
        out = samplers.edm_heun_sample(denoise, jax.random.key(0), (64, 2), SIG, n, x_init=x_T)
        np.testing.assert_allclose(
            np.asarray(out), _np_edm_heun(np.asarray(x_T, np.float64), s, n), rtol=1e-4, atol=1e-5
        )
        errs.append(np.abs(np.asarray(out) - exact).max())
    assert errs[1] < errs[0] / 4, (
        errs
    )  # second order: 4× the steps cut the error by far more than 4
    # count network evaluations by tracing the loop body once per branch: 18 steps -> 35 NFE
    nfe = []
    fake = lambda x, t: (nfe.append(1), x)[1]
    jax.make_jaxpr(lambda r: samplers.edm_heun_sample(fake, r, (1, 2), SIG, 18))(jax.random.key(0))
    assert (
        len(nfe) == 2
    )  # one in the predictor, one in the corrector branch (skipped at the last step)
