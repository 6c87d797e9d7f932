"""MeanFlow's mathematics against independent computations in float64: the target against central
finite differences, the exact average velocity of Gaussian data (closed form) against the MeanFlow
identity and the one-step sampler, flow matching at r = t, the blocked adaptive weight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import x64

from consistency_jax.methods import meanflow as mf


def _net(seed=0, dim=3, hidden=16):
    """A small float64 network u_θ(z, r, t) = W2·tanh(W1·z + a·t + b·(t − r) + c)."""
    rng = np.random.default_rng(seed)
    p = {
        "w1": rng.normal(size=(dim, hidden)) / np.sqrt(dim),
        "a": rng.normal(size=hidden),
        "b": rng.normal(size=hidden),
        "c": rng.normal(size=hidden),
        "w2": rng.normal(size=(hidden, dim)) / np.sqrt(hidden),
    }
    p = jax.tree.map(jnp.asarray, p)

    def u(params, z, r, t):
        h = jnp.tanh(
            z @ params["w1"]
            + t[:, None] * params["a"]
            + (t - r)[:, None] * params["b"]
            + params["c"]
        )
        return h @ params["w2"]

    return p, u


def test_target_is_v_minus_gap_times_central_differences_of_u():
    with x64():
        params, u = _net()
        rng = np.random.default_rng(1)
        z = jnp.asarray(rng.normal(size=(5, 3)))
        v = jnp.asarray(rng.normal(size=(5, 3)))
        t = jnp.asarray(rng.uniform(0.3, 0.9, 5))
        r = t * jnp.asarray(rng.uniform(0, 1, 5))
        fn = lambda z_, r_, t_: u(params, z_, r_, t_)
        pred, target = mf.meanflow_target(fn, z, r, t, v)
        h = 1e-5
        fd = (fn(z + h * v, r, t + h) - fn(z - h * v, r, t - h)) / (2 * h)
        expect = np.asarray(v) - np.asarray(t - r)[:, None] * np.asarray(fd)
        np.testing.assert_allclose(np.asarray(target), expect, rtol=1e-8, atol=1e-9)
        np.testing.assert_array_equal(np.asarray(pred), np.asarray(fn(z, r, t)))
        # The jvp is not the partial derivative in t alone, nor the one in z alone.
        fd_t = (fn(z, r, t + h) - fn(z, r, t - h)) / (2 * h)
        assert (
            np.abs(np.asarray(target) - (np.asarray(v) - np.asarray(t - r)[:, None] * fd_t)).max()
            > 1e-3
        )


def _gaussian(mu, s):
    """Exact flow of x ~ N(mu, s²) on z_t = (1 − t)x + tε: z_t = m_t + σ_t·ξ, m_t = (1 − t)μ,
    σ_t² = (1 − t)²s² + t², so the map from t to r is affine and u, v have closed forms."""
    m = lambda t: (1 - t)[:, None] * mu
    sd = lambda t: jnp.sqrt((1 - t) ** 2 * s**2 + t**2)[:, None]
    dsd = lambda t: (((t - 1) * s**2 + t) / jnp.sqrt((1 - t) ** 2 * s**2 + t**2))[:, None]

    def flow(z, t, r):  # the ODE map from time t to time r
        return m(r) + sd(r) * (z - m(t)) / sd(t)

    def u(z, r, t):
        gap = (t - r)[:, None]
        # r = t: the instantaneous velocity v(z, t) = m'_t + σ'_t·(z − m_t)/σ_t.
        v = -mu + dsd(t) * (z - m(t)) / sd(t)
        return jnp.where(gap > 0, (z - flow(z, t, r)) / jnp.where(gap > 0, gap, 1.0), v)

    return flow, u


def test_exact_average_velocity_of_gaussian_data_satisfies_the_identity_and_samples_exactly():
    with x64():
        mu = jnp.asarray([0.7, -1.3, 2.0])
        s = 0.35
        flow, u = _gaussian(mu, s)
        rng = np.random.default_rng(2)
        z = jnp.asarray(rng.normal(size=(6, 3)))
        t = jnp.asarray(rng.uniform(0.2, 1.0, 6))
        r = t * jnp.asarray(rng.uniform(0.0, 0.9, 6))
        v = u(z, t, t)  # the marginal velocity at (z, t)
        pred, target = mf.meanflow_target(u, z, r, t, v)
        np.testing.assert_allclose(np.asarray(target), np.asarray(pred), rtol=1e-10, atol=1e-12)
        # A wrong u (scaled) does not satisfy it.
        wrong = lambda z_, r_, t_: 1.1 * u(z_, r_, t_)
        p2, t2 = mf.meanflow_target(wrong, z, r, t, 1.1 * v)
        assert np.abs(np.asarray(p2 - t2)).max() > 1e-3
        # One step from ε at t = 1 is the exact ODE map of the data distribution: x = μ + s·ε.
        eps = jnp.asarray(rng.normal(size=(1000, 3)))
        x1 = mf.sample(u, eps, (1.0, 0.0))
        np.testing.assert_allclose(np.asarray(x1), np.asarray(mu + s * eps), rtol=1e-12, atol=1e-12)
        x2 = mf.sample(u, eps, (1.0, 0.5, 0.0))
        np.testing.assert_allclose(np.asarray(x2), np.asarray(x1), rtol=1e-12, atol=1e-12)
        # In EDM units: the consistency function maps x_σ = x + σ·ε to x along the same ODE.
        sigma = jnp.full((1000,), 3.0)
        t_sigma = mf.sigma_to_time(sigma)
        x_sigma = flow(eps, jnp.ones(1000), t_sigma) / (1 - t_sigma)[:, None]
        np.testing.assert_allclose(
            np.asarray(mf.consistency_fn_sigma(u, x_sigma, sigma)),
            np.asarray(mu + s * eps),
            rtol=1e-10,
            atol=1e-10,
        )


def test_r_equal_t_is_flow_matching():
    with x64():
        params, u = _net(3)
        rng = np.random.default_rng(4)
        x0 = jnp.asarray(rng.normal(size=(8, 3)))
        eps = jnp.asarray(rng.normal(size=(8, 3)))
        t = jnp.asarray(rng.uniform(0.0, 1.0, 8))
        z, v = mf.flow_point(x0, eps, t)
        np.testing.assert_allclose(
            np.asarray(z), np.asarray((1 - t)[:, None] * x0 + t[:, None] * eps)
        )
        fn = lambda z_, r_, t_: u(params, z_, r_, t_)
        loss, _ = mf.meanflow_loss(fn, z, t, t, v, p=0.0)
        fm = np.mean(np.sum((np.asarray(fn(z, t, t)) - np.asarray(eps - x0)) ** 2, axis=-1))
        np.testing.assert_allclose(float(loss), fm, rtol=1e-12)


def test_adaptive_weight_is_blocked_from_the_gradient():
    with x64():
        params, u = _net(5)
        rng = np.random.default_rng(6)
        z = jnp.asarray(rng.normal(size=(4, 3)))
        v = jnp.asarray(rng.normal(size=(4, 3)))
        t = jnp.asarray([0.9, 0.8, 0.5, 0.3])
        r = jnp.asarray([0.1, 0.8, 0.2, 0.0])

        def loss(p_):
            return mf.meanflow_loss(lambda *a: u(p_, *a), z, r, t, v, p=1.0, c=1e-3)[0]

        _, target = mf.meanflow_target(lambda *a: u(params, *a), z, r, t, v)
        sq = np.sum((np.asarray(u(params, z, r, t)) - np.asarray(target)) ** 2, axis=-1)
        w = 1.0 / (sq + 1e-3)  # constants: the weight and the target held fixed

        def fixed(p_):
            return jnp.mean(w * jnp.sum((u(p_, z, r, t) - target) ** 2, axis=-1))

        np.testing.assert_allclose(float(loss(params)), float(fixed(params)), rtol=1e-12)
        g, g_fixed = jax.grad(loss)(params), jax.grad(fixed)(params)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_fixed)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-14)

        # Differentiating through the weight would give another gradient.
        def unblocked(p_):
            d = jnp.sum((u(p_, z, r, t) - target) ** 2, axis=-1)
            return jnp.mean(d / (d + 1e-3))

        assert (
            max(
                np.abs(np.asarray(a) - np.asarray(b)).max()
                for a, b in zip(jax.tree.leaves(jax.grad(unblocked)(params)), jax.tree.leaves(g))
            )
            > 1e-3
        )


@pytest.mark.parametrize("fraction", [0.0, 0.25, 1.0])
def test_time_proposal_orders_t_and_r_and_keeps_the_fraction(fraction):
    t, r = mf.sample_times(jax.random.key(0), 64, -0.4, 1.0, fraction)
    t, r = np.asarray(t), np.asarray(r)
    assert np.all((0 < r) & (r <= t) & (t < 1))
    assert np.sum(r < t) == round(64 * fraction)
    # logit(t) is the larger of two N(-0.4, 1) draws: mean -0.4 + 1/√π, std √(1 − 1/π); logit(r)
    # the smaller (a loose moment check on a large draw).
    big_t, big_r = mf.sample_times(jax.random.key(1), 20000, -0.4, 1.0, 1.0)
    for x, sign in ((big_t, 1), (big_r, -1)):
        logit = np.log(np.asarray(x)) - np.log1p(-np.asarray(x))
        assert abs(logit.mean() - (-0.4 + sign / np.sqrt(np.pi))) < 0.03
        assert abs(logit.std() - np.sqrt(1 - 1 / np.pi)) < 0.03


def test_guidance_with_omega_one_is_the_unguided_velocity_bit_for_bit():
    rng = np.random.default_rng(7)
    v, vu, vc = (jnp.asarray(rng.normal(size=(4, 3)), jnp.float32) for _ in range(3))
    assert mf.guided_velocity(v, vu, vc, 1.0, 0.0) is v
    g = mf.guided_velocity(v, vu, vc, 2.0, 0.5)
    np.testing.assert_allclose(np.asarray(g), np.asarray(2.0 * v + 0.5 * vc - 1.5 * vu), rtol=1e-6)
