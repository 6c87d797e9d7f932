"""Solvers, distances, weightings and the CD/CT/EDM losses against NumPy float64 re-computations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from consistency_jax import losses as L
from consistency_jax import parameterization as P
from consistency_jax import schedules as S
from consistency_jax import solvers, toy
from consistency_jax.methods import Frozen
from consistency_jax.methods.cd import ConsistencyDistillation
from consistency_jax.methods.ct import ConsistencyTraining
from consistency_jax.methods.edm import EDMDenoiser

SIG = P.SigmaConfig()


# ---------------------------------------------------------------- ODE steps
def _gauss_denoiser(s):
    # Data N(0, s²I): D(x, t) = s²/(s² + t²)·x, PF-ODE solution x(t) = x0·√((s² + t²)/(s² + t0²)).
    return lambda x, t: (s**2 / (s**2 + t**2))[:, None] * x


def _exact(x, t0, t1, s):
    return x * np.sqrt((s**2 + t1**2) / (s**2 + t0**2))


@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2)])
def test_ode_steps_converge_at_their_order(name, order):
    s, t0 = 0.5, 2.0
    x = np.array([[1.0, -2.0, 0.5]], np.float64)
    step = solvers.get_solver(name)
    errs = []
    for h in [0.2, 0.1, 0.05]:
        xj = jnp.asarray(x, jnp.float32)
        got = np.asarray(
            step(_gauss_denoiser(s), xj, jnp.array([t0]), jnp.array([t0 - h])), np.float64
        )
        errs.append(np.abs(got - _exact(x, t0, t0 - h, s)).max())
    # local error O(h^{order+1}): halving h divides it by about 2^{order+1}
    for a, b in zip(errs, errs[1:]):
        assert 0.6 * 2 ** (order + 1) < a / b < 1.6 * 2 ** (order + 1), errs


def test_heun_step_formula():
    s = 0.7
    x = np.array([[0.3, -1.2]], np.float64)
    tc, tn = 3.0, 1.5
    D = lambda x, t: s**2 / (s**2 + t**2) * x
    d = (x - D(x, tc)) / tc
    xe = x + (tn - tc) * d
    want = x + (tn - tc) * 0.5 * (d + (xe - D(xe, tn)) / tn)
    got = solvers.heun_step(
        _gauss_denoiser(s), jnp.asarray(x, jnp.float32), jnp.array([tc]), jnp.array([tn])
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_ct_target_is_euler_step_with_clean_sample_as_denoiser():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((6, 4)).astype(np.float32)
    z = rng.standard_normal((6, 4)).astype(np.float32)
    t_hi = np.array([0.01, 0.1, 1.0, 5.0, 40.0, 80.0], np.float32)
    t_lo = t_hi * 0.7
    x_hi = x0 + t_hi[:, None] * z
    got = solvers.euler_step(
        lambda x, t: jnp.asarray(x0), jnp.asarray(x_hi), jnp.asarray(t_hi), jnp.asarray(t_lo)
    )
    np.testing.assert_allclose(np.asarray(got), x0 + t_lo[:, None] * z, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- distances and weightings
def test_distances_match_numpy():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 4, 4, 2))
    b = rng.standard_normal((3, 4, 4, 2))
    fa, fb = (jnp.asarray(v, jnp.float32) for v in (a, b))
    diff = (a - b).reshape(3, -1)
    np.testing.assert_allclose(L.l2_distance(fa, fb), np.mean(diff**2, 1), rtol=1e-5)
    np.testing.assert_allclose(L.l1_distance(fa, fb), np.mean(np.abs(diff), 1), rtol=1e-5)
    c = L.default_huber_c(32)
    assert c == pytest.approx(0.00054 * math.sqrt(32))
    np.testing.assert_allclose(
        L.make_distance("pseudo_huber", (4, 4, 2))(fa, fb),
        np.sqrt(np.sum(diff**2, 1) + c * c) - c,
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="lpips_weights"):
        L.make_distance("lpips", (4, 4, 2))
    with pytest.raises(ValueError, match="Unknown distance"):
        L.make_distance("l3", (2,))


def test_weightings():
    lo, hi = np.array([0.002, 1.0]), np.array([0.01, 1.5])
    jl, jh = jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)
    np.testing.assert_allclose(L.weighting("uniform", jl, jh), [1, 1])
    np.testing.assert_allclose(L.weighting("ict", jl, jh), 1 / (hi - lo), rtol=1e-5)
    np.testing.assert_allclose(L.weighting("snr", jl, jh), 1 / lo**2, rtol=1e-5)
    np.testing.assert_allclose(
        L.weighting("truncated_snr", jl, jh), np.maximum(1 / lo**2, 1), rtol=1e-5
    )


def test_lognormal_index_distribution():
    n = 41
    t = np.asarray(S.karras_sigmas(n, SIG), np.float64)
    cdf = erf((np.log(t) + 1.1) / (math.sqrt(2) * 2.0))
    p = np.diff(cdf)
    p /= p.sum()
    logits = L.lognormal_index_logits(jnp.int32(n), 1281, SIG)
    got = np.exp(np.asarray(logits, np.float64))
    assert np.all(got[n - 1 :] == 0)
    np.testing.assert_allclose(got[: n - 1] / got.sum(), p, rtol=1e-4, atol=1e-7)
    draws = np.asarray(
        L.sample_index(jax.random.key(0), 20000, jnp.int32(n), 1281, "lognormal", SIG)
    )
    assert draws.min() >= 0 and draws.max() <= n - 2
    freq = np.bincount(draws, minlength=n - 1) / draws.size
    assert np.abs(freq - p).max() < 0.01


# ---------------------------------------------------------------- the losses, recomputed in NumPy
def _linear_net(params, x, c_noise, **kw):
    return x @ params["w"] + c_noise[:, None] * params["b"]


def _np_linear_net(params, x, c_noise):
    return x @ np.asarray(params["w"], np.float64) + c_noise[:, None] * np.asarray(
        params["b"], np.float64
    )


def _np_f(params, x, t, eps=0.002, sd=0.5):
    cs = sd**2 / ((t - eps) ** 2 + sd**2)
    co = sd * (t - eps) / np.sqrt(sd**2 + t**2)
    ci = 1 / np.sqrt(sd**2 + t**2)
    f = cs[:, None] * x + co[:, None] * _np_linear_net(params, ci[:, None] * x, 0.25 * np.log(t))
    return np.where((t <= eps)[:, None], x, f)


def _method(method, cfg, apply_fn, cur, distance, teacher=None):
    parts = dict(apply_fn=apply_fn, sigmas=SIG, curriculum=cur, loss_cfg=cfg, distance=distance)
    if method == "cd":
        return ConsistencyDistillation(**parts, teacher=teacher)
    return ConsistencyTraining(**parts)


def _draws(rng, b, n, dim, kind="uniform"):
    rng_n, rng_z, _ = jax.random.split(rng, 3)
    i = np.asarray(L.sample_index(rng_n, b, jnp.int32(n), n, kind, SIG))
    z = np.asarray(jax.random.normal(rng_z, (b, dim), jnp.float32), np.float64)
    return i, z


@pytest.mark.parametrize(
    "method,solver,distance,weight",
    [
        ("ct", "heun", "l2", "uniform"),
        ("ct", "heun", "pseudo_huber", "ict"),
        ("cd", "euler", "l1", "uniform"),
        ("cd", "heun", "l2", "snr"),
    ],
)
def test_consistency_loss_matches_numpy(method, solver, distance, weight):
    dim, b, n = 2, 16, 10
    k = jax.random.split(jax.random.key(3), 3)
    params = {"w": 0.3 * jax.random.normal(k[0], (dim, dim)), "b": 0.1 * jnp.ones((dim,))}
    target = {"w": 0.3 * jax.random.normal(k[1], (dim, dim)), "b": -0.2 * jnp.ones((dim,))}
    gm = toy.ring_mixture()
    x0 = np.asarray(gm.sample(np.random.default_rng(0), b), np.float32)
    cfg = L.LossConfig(solver=solver, distance=distance, weighting=weight)
    cur = S.Curriculum(kind="constant", num_scales=n)
    m = _method(
        method, cfg, _linear_net, cur, L.make_distance(distance, (dim,)), toy.exact_denoiser
    )
    rng = jax.random.key(7)
    loss, _ = m.loss(
        params,
        Frozen(target=target, teacher=gm.as_params()),
        {"image": jnp.asarray(x0)},
        rng,
        jnp.int32(0),
    )

    # NumPy float64 re-computation with the same random draws
    i, z = _draws(rng, b, n, dim)
    grid = (0.002 ** (1 / 7) + np.arange(n) / (n - 1) * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    t_lo, t_hi = grid[i], grid[i + 1]
    x0d = x0.astype(np.float64)
    x_hi = x0d + t_hi[:, None] * z
    if method == "ct":
        x_lo = x0d + t_lo[:, None] * z
    else:
        D = lambda x, t: np.stack(
            [toy.exact_denoiser_np(gm, x[j : j + 1], t[j])[0] for j in range(b)]
        )
        d = (x_hi - D(x_hi, t_hi)) / t_hi[:, None]
        x_lo = x_hi + (t_lo - t_hi)[:, None] * d
        if solver == "heun":
            d2 = (x_lo - D(x_lo, t_lo)) / t_lo[:, None]
            x_lo = x_hi + (t_lo - t_hi)[:, None] * 0.5 * (d + d2)
    diff = _np_f(params, x_hi, t_hi) - _np_f(target, x_lo, t_lo)
    dist = {
        "l2": np.mean(diff**2, 1),
        "l1": np.mean(np.abs(diff), 1),
        "pseudo_huber": np.sqrt(np.sum(diff**2, 1) + (0.00054 * math.sqrt(dim)) ** 2)
        - 0.00054 * math.sqrt(dim),
    }[distance]
    lam = {"uniform": np.ones(b), "ict": 1 / (t_hi - t_lo), "snr": 1 / t_lo**2}[weight]
    np.testing.assert_allclose(float(loss), np.mean(lam * dist), rtol=2e-4)


def test_edm_loss_matches_numpy():
    dim, b = 2, 8
    params = {"w": 0.2 * jnp.eye(dim), "b": jnp.ones((dim,))}
    x0 = np.random.default_rng(2).standard_normal((b, dim)).astype(np.float32) * 0.5
    rng = jax.random.key(11)
    loss, _ = EDMDenoiser(apply_fn=_linear_net, sigmas=SIG).loss(
        params, Frozen(), {"image": jnp.asarray(x0)}, rng, jnp.int32(0)
    )
    rng_s, rng_z, _ = jax.random.split(rng, 3)
    sigma = np.exp(-1.2 + 1.2 * np.asarray(jax.random.normal(rng_s, (b,)), np.float64))
    z = np.asarray(jax.random.normal(rng_z, (b, dim)), np.float64)
    xn = x0 + sigma[:, None] * z
    sd = 0.5
    cs, co, ci = (
        sd**2 / (sigma**2 + sd**2),
        sigma * sd / np.sqrt(sd**2 + sigma**2),
        1 / np.sqrt(sd**2 + sigma**2),
    )
    D = cs[:, None] * xn + co[:, None] * _np_linear_net(
        params, ci[:, None] * xn, 0.25 * np.log(sigma)
    )
    lam = (sigma**2 + sd**2) / (sigma * sd) ** 2
    np.testing.assert_allclose(float(loss), np.mean(lam * np.mean((D - x0) ** 2, 1)), rtol=1e-4)


def test_cd_without_teacher_is_an_error():
    with pytest.raises(ValueError, match="teacher"):
        _method("cd", L.LossConfig(), _linear_net, S.Curriculum(), L.l2_distance)


def test_theorem2_cd_approaches_ct_as_n_grows():
    """CM Theorem 2: with the exact teacher, L_CD^N − L_CT^N = o(Δt): the gap shrinks faster than 1/N."""
    from consistency_jax.networks import get_network, make_apply_fn

    net = get_network("mlp", hidden=32, depth=2)
    params = net.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
    apply_fn = make_apply_fn(net)
    gm = toy.ring_mixture()
    x0 = jnp.asarray(gm.sample(np.random.default_rng(0), 2048), jnp.float32)
    ns = [8, 16, 32, 64]
    frozen = Frozen(target=params, teacher=gm.as_params())
    gaps = []
    for n in ns:
        cur = S.Curriculum(kind="constant", num_scales=n)
        vals = {
            m: float(
                jax.jit(
                    _method(
                        m,
                        L.LossConfig(solver="heun"),
                        apply_fn,
                        cur,
                        L.l2_distance,
                        toy.exact_denoiser,
                    ).loss
                )(params, frozen, {"image": x0}, jax.random.key(1), jnp.int32(0))[0]
            )
            for m in ("cd", "ct")
        }
        gaps.append(abs(vals["cd"] - vals["ct"]))
    scaled = [g * n for g, n in zip(gaps, ns)]  # gap / Δt
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
    assert all(a > b for a, b in zip(scaled, scaled[1:])), scaled
