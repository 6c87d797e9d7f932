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


# ----------------------------------------------------------------------------------------------------
# The method in the library: config, train step, evaluation, sampling.


def _tiny(**meanflow):
    from conftest import tiny_toy_config

    c = tiny_toy_config("meanflow")
    c.model.kwargs = dict(hidden=8, depth=1, second_time=True)
    c.meanflow.update(**meanflow)
    return c


def test_meanflow_trains_evaluates_and_samples_on_the_toy(tmp_path):
    import json

    from consistency_jax import experiment, methods

    c = _tiny()
    assert methods.get("meanflow").family == "consistency"
    final = experiment.train_and_evaluate(c, str(tmp_path / "run"))
    assert int(final.step) == 4 and final.target_params is None
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 4 and np.isfinite(row["sw2_1step"]) and np.isfinite(row["sw2_2step"])
    assert np.isfinite(row["loss"]) if "loss" in row else True


def test_meanflow_consistency_function_is_the_flow_map_of_the_network():
    """The EDM-unit consistency function the samplers use: f(x_σ, σ) = z_t − t·u(z_t, 0, t) with
    t = σ/(1 + σ), z_t = (1 − t)·x_σ, computed here by hand from the raw network; exact at σ_min."""
    import jax

    from consistency_jax import networks
    from consistency_jax.parameterization import SigmaConfig

    module = networks.get_network("mlp", hidden=16, depth=1, second_time=True)
    params = module.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
    params = jax.tree.map(lambda a: a + 0.1, params)  # zero-initialised layers moved
    apply_fn = networks.make_apply_fn(module)
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)
    sigma = jnp.asarray([0.002, 0.01, 0.5, 2.0, 10.0, 80.0], jnp.float32)
    f = mf.model_consistency_fn(apply_fn, params, x, sigma, SigmaConfig())
    t = np.asarray(sigma, np.float64) / (1 + np.asarray(sigma, np.float64))
    z = (1 - t)[:, None] * np.asarray(x, np.float64)
    u = np.asarray(
        apply_fn(
            params,
            jnp.asarray(z, jnp.float32),
            jnp.asarray(t, jnp.float32),
            c_noise_2=jnp.asarray(t, jnp.float32),
        )
    )
    expect = z - t[:, None] * u
    np.testing.assert_array_equal(np.asarray(f)[0], np.asarray(x)[0])  # the boundary, exactly
    np.testing.assert_allclose(np.asarray(f)[1:], expect[1:], rtol=1e-5, atol=1e-5)


def test_guidance_in_training_uses_the_models_own_velocities():
    """With ω ≠ 1 the regression velocity is ω·v + (1 − ω)·u_θ⁻(z, t, t | ∅) for kept labels and v for
    dropped ones: the loss equals the loss at that velocity, computed by hand; ω = 1 with no dropout is
    the unguided loss bit for bit."""
    import jax

    from consistency_jax import networks
    from consistency_jax.methods.base import Frozen

    module = networks.get_network("mlp", hidden=16, depth=1, second_time=True, num_classes=4)
    params = module.init(
        jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)), jnp.zeros((1,), int)
    )
    params = jax.tree.map(lambda a: a + 0.05, params["params"])
    apply_fn = networks.make_apply_fn(module)
    batch = {
        "image": jnp.asarray(np.random.default_rng(9).normal(size=(8, 2)), jnp.float32),
        "label": jnp.asarray([0, 1, 2, 0, 1, 2, 0, 1]),
    }
    rng, step = jax.random.key(4), jnp.int32(0)
    plain = mf.MeanFlow(apply_fn=apply_fn, null_label=3)
    unguided = mf.MeanFlow(apply_fn=apply_fn, null_label=3, omega=1.0, class_dropout=0.0)
    assert not unguided.guided and unguided.frozen_trees == ()
    a = plain.loss(params, Frozen(), batch, rng, step)[0]
    b = unguided.loss(params, Frozen(), batch, rng, step)[0]
    assert float(a) == float(b)
    guided = mf.MeanFlow(apply_fn=apply_fn, null_label=3, omega=2.0, class_dropout=0.5)
    loss, _ = guided.loss(params, Frozen(target=params), batch, rng, step)
    # By hand, with the method's own draws.
    rng_t, rng_e, rng_drop, rng_cls = jax.random.split(rng, 4)
    x0, labels = batch["image"], batch["label"]
    t, r = mf.sample_times(rng_t, 8, -0.4, 1.0, 0.25)
    z, v = mf.flow_point(x0, jax.random.normal(rng_e, x0.shape), t)
    v_null = apply_fn(params, z, t, labels=jnp.full_like(labels, 3), c_noise_2=t - t)
    drop = jax.random.uniform(rng_cls, labels.shape) < 0.5
    assert 0 < int(drop.sum()) < 8  # both kinds of example are in the batch
    v_tilde = jnp.where(drop[:, None], v, 2.0 * v - 1.0 * v_null)
    y = jnp.where(drop, 3, labels)
    u = mf.average_velocity(apply_fn, params, labels=y, train=True, rng=rng_drop)
    expect, _ = mf.meanflow_loss(u, z, r, t, v_tilde)
    np.testing.assert_allclose(float(loss), float(expect), rtol=1e-6)
    assert abs(float(loss) - float(a)) > 1e-6


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("p_std", 0.0, r"config\.meanflow\.p_std must be > 0"),
        ("fraction_distinct", 1.5, r"config\.meanflow\.fraction_distinct must be in \[0, 1\]"),
        ("omega", 2.0, r"class-conditional run"),
    ],
)
def test_meanflow_config_errors_name_the_field(field, value, match):
    from consistency_jax.build import validate

    with pytest.raises(ValueError, match=match):
        validate(_tiny(**{field: value}))
    c = _tiny()
    c.model.kwargs = dict(hidden=8, depth=1)
    with pytest.raises(ValueError, match=r"second_time=True"):
        validate(c)
