"""CM's continuous-time CD/CT (CM Appendix B): the jvp against finite differences in float64, the
pseudo-objective's gradient as the limit of the discrete gradient over Δt (CM Thm. 6), and a run
through the main loop."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config, x64

from consistency_jax import parameterization as P
from consistency_jax import toy
from consistency_jax.methods import Frozen
from consistency_jax.methods import cm_continuous as CC
from consistency_jax.networks import get_network, make_apply_fn

SIG = P.SigmaConfig()


def _tanh_net(params, x, c_noise, **_):
    """A float64 two-layer network of x and the noise level (the library's networks keep float32
    embeddings and statistics by design, which would blur a float64 comparison)."""
    h = jnp.tanh(x @ params["w1"] + c_noise[:, None] * params["wt"] + params["b1"])
    return h @ params["w2"]


def _tanh_params(seed=0, dim=2, hidden=32):
    r = np.random.default_rng(seed)
    return {
        "w1": jnp.asarray(r.standard_normal((dim, hidden))),
        "wt": jnp.asarray(r.standard_normal(hidden)),
        "b1": jnp.asarray(0.1 * r.standard_normal(hidden)),
        "w2": jnp.asarray(r.standard_normal((hidden, dim)) / np.sqrt(hidden)),
    }


def _central_difference(apply_fn, params, x, t, v, rel):
    """(f(x, t), the central difference of f along (v, 1)), from one compiled f(x + s·v, t + s)."""
    h = rel * jnp.minimum(t, 1.0)  # per-example steps well inside (ε, T)
    hb = h.reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    f = jax.jit(lambda s, hs: P.consistency_fn(apply_fn, params, x + s * v, t + hs, SIG))
    return f(0 * hb, 0 * h), (f(hb, h) - f(-hb, -h)) / (2 * hb)


def _check_jvp(apply_fn, params, shape, rel, rtol):
    rng = np.random.default_rng(0)
    b = 3
    dtype = jax.tree.leaves(params)[0].dtype
    x = jnp.asarray(rng.standard_normal((b,) + shape), dtype)
    t = jnp.asarray([0.05, 1.3, 20.0], dtype)
    v = jnp.asarray(rng.standard_normal((b,) + shape), dtype)
    f_t, dfdt = jax.jit(lambda p: CC.time_derivative(apply_fn, SIG, p, x, t, v))(params)
    f_0, fd = _central_difference(apply_fn, params, x, t, v, rel)
    np.testing.assert_allclose(np.asarray(f_t), np.asarray(f_0), rtol=1e-6, atol=1e-6)
    scale = float(jnp.max(jnp.abs(dfdt)))
    assert scale > 1e-3  # the derivative is not trivially zero
    np.testing.assert_allclose(np.asarray(dfdt), np.asarray(fd), rtol=rtol, atol=rtol * scale)
    return dfdt


def test_jvp_tangent_equals_central_differences_in_float64():
    with x64():
        dfdt = _check_jvp(_tanh_net, _tanh_params(), (2,), rel=1e-5, rtol=1e-8)
        assert dfdt.dtype == jnp.float64


def test_jvp_tangent_through_a_tiny_ncsnpp():
    """The same through NCSN++ (float32: central differences with a step balancing truncation and
    rounding; the jvp itself is exact): one level of residual blocks with attention."""
    module = get_network("ncsnpp", nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,))
    # Random weights of the network's shapes (tracing init is enough; NCSN++ would zero-initialise its
    # last convolutions, which would make F vanish).
    shapes = jax.eval_shape(
        lambda r: module.init(r, jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,))), jax.random.key(0)
    )["params"]
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype), shapes
    )
    _check_jvp(make_apply_fn(module), params, (8, 8, 1), rel=3e-3, rtol=3e-3)


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("method,distance", [("ct", "l2"), ("cd", "l2"), ("cd", "pseudo_huber")])
def test_pseudo_objective_gradient_is_the_limit_of_the_discrete_gradient_over_dt(method, distance):
    """CM Thm. 6 on the toy with the exact teacher: ∇θ L_Δ / Δt → ∇θ L_continuous, first order in Δt,
    where L_Δ = mean d(f_θ(x_t, t), sg f_θ(x_t − Δt·dx/dt, t − Δt)) (one Euler step of the exact
    PF-ODE for CD; x0 + (t − Δt)·z for CT). For pseudo-Huber, the continuous side uses the metric's
    Hessian-vector product (forward-over-reverse), as for LPIPS."""
    from consistency_jax import losses as L

    with x64():
        apply_fn, params = _tanh_net, _tanh_params(1)
        gm = toy.ring_mixture()
        rng = np.random.default_rng(1)
        b = 16
        x0 = jnp.asarray(gm.sample(rng, b))
        z = jnp.asarray(rng.standard_normal((b, 2)))
        t = jnp.asarray(np.exp(rng.uniform(np.log(0.1), np.log(10.0), b)))
        x_t = x0 + t[:, None] * z
        phi = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), gm.as_params())
        dist = L.make_distance(distance, (2,), huber_c=1.0) if distance != "l2" else None
        m = CC.ContinuousConsistency(
            apply_fn=apply_fn,
            sigmas=SIG,
            stopgrad=True,
            teacher=toy.exact_denoiser if method == "cd" else None,
            distance=dist,
        )
        v = m.velocity(Frozen(teacher=phi), x0, z, x_t, t, None)
        cont = jax.grad(
            lambda p: CC.continuous_loss(apply_fn, SIG, p, x_t, t, v, stopgrad=True, distance=dist)[
                0
            ]
        )(params)
        d = dist if dist is not None else L.l2_distance

        def discrete(p, dt):
            target = jax.lax.stop_gradient(P.consistency_fn(apply_fn, p, x_t - dt * v, t - dt, SIG))
            online = P.consistency_fn(apply_fn, p, x_t, t, SIG)
            return jnp.mean(d(online, target)) / dt

        errors = []
        for dt in (1e-2, 5e-3, 2.5e-3, 1.25e-3):
            g = jax.grad(discrete)(params, dt)
            errors.append(np.linalg.norm(_flat(g) - _flat(cont)) / np.linalg.norm(_flat(cont)))
        assert errors[-1] < 2e-2, errors
        rates = [a / b_ for a, b_ in zip(errors, errors[1:])]
        assert all(1.8 < r < 2.2 for r in rates), (errors, rates)  # first order: halves with Δt


def test_metric_hvp_of_l2_is_the_closed_form():
    from consistency_jax import losses as L

    with x64():
        rng = np.random.default_rng(3)
        a, v = (jnp.asarray(rng.standard_normal((4, 3, 2))) for _ in range(2))
        np.testing.assert_allclose(
            np.asarray(CC.metric_hvp(L.l2_distance, a, v)), 2.0 / 6 * np.asarray(v), rtol=1e-13
        )


def test_true_objective_is_the_norm_of_the_time_derivative():
    with x64():
        apply_fn, params = _tanh_net, _tanh_params(2, hidden=16)
        rng = np.random.default_rng(2)
        x0, z = (jnp.asarray(rng.standard_normal((4, 2))) for _ in range(2))
        t = jnp.asarray([0.01, 0.5, 3.0, 70.0])
        x_t = x0 + t[:, None] * z
        loss, aux = CC.continuous_loss(apply_fn, SIG, params, x_t, t, z, stopgrad=False)
        _, dfdt = CC.time_derivative(apply_fn, SIG, params, x_t, t, z)
        want = np.mean(np.linalg.norm(np.asarray(dfdt), axis=-1))
        assert float(loss) == pytest.approx(want, rel=1e-12)
        assert float(aux["dfdt_norm"]) == pytest.approx(want, rel=1e-12)
        # and it is differentiated through the jvp (a true objective): a nonzero gradient
        g = jax.grad(lambda p: CC.continuous_loss(apply_fn, SIG, p, x_t, t, z, stopgrad=False)[0])(
            params
        )
        assert np.linalg.norm(_flat(g)) > 0


def test_time_proposal_is_uniform_in_t_to_the_one_over_rho():
    t = np.asarray(CC.sample_time(jax.random.key(0), 200_000, SIG))
    u = t ** (1 / SIG.rho)
    lo, hi = SIG.sigma_min ** (1 / SIG.rho), SIG.sigma_max ** (1 / SIG.rho)
    assert lo <= u.min() and u.max() <= hi
    hist, _ = np.histogram(u, bins=10, range=(lo, hi))
    np.testing.assert_allclose(hist / len(u), 0.1, atol=0.004)


@pytest.mark.parametrize("method", ["cm_continuous_cd", "cm_continuous_ct"])
def test_continuous_methods_train_through_the_main_loop(tmp_path, method):
    from consistency_jax import experiment

    c = load_config("toy", f"method={method}")
    c.model.kwargs = dict(hidden=32, depth=2)
    c.data.batch_size = 64
    c.train.update(num_steps=8, log_every=4, eval_every=8, ema_rates=(0.9,))
    c.eval.num_samples = 64
    c.checkpoint.every = 8
    state = experiment.train_and_evaluate(c, str(tmp_path))
    assert int(state.step) == 8 and state.target_params is None
    assert (state.teacher_params is not None) == (method == "cm_continuous_cd")
    figures = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(figures["sw2_1step"]) and np.isfinite(figures["sw2_2step"])
    assert ("map_error" in figures) == (method == "cm_continuous_cd")
