"""Scalings and f_θ (CM Eq. 5–6 and Appendix C; EDM Table 1) against the formulas computed
independently in NumPy float64, and the dtype rule of the core maths (float64 under x64, else float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import x64 as x64_context

from consistency_jax import parameterization as P
from consistency_jax import solvers

SIG = P.SigmaConfig()


def _np_scalings(t, eps, sd):
    t = np.asarray(t, np.float64)
    return (
        sd**2 / ((t - eps) ** 2 + sd**2),
        sd * (t - eps) / np.sqrt(sd**2 + t**2),
        1 / np.sqrt(sd**2 + t**2),
    )


def test_consistency_scalings_match_formulas():
    t = np.array([0.002, 0.01, 0.5, 1.0, 10.0, 80.0])
    got = P.consistency_scalings(jnp.asarray(t, jnp.float32), SIG.sigma_min, SIG.sigma_data)
    for g, w in zip(got, _np_scalings(t, SIG.sigma_min, SIG.sigma_data)):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6, atol=1e-7)


def test_edm_scalings_are_unshifted():
    t = np.array([0.002, 0.3, 80.0])
    got = P.edm_scalings(jnp.asarray(t, jnp.float32), SIG.sigma_data)
    for g, w in zip(got, _np_scalings(t, 0.0, SIG.sigma_data)):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6)


def test_c_noise_kinds():
    t = jnp.array([0.002, 1.0, 80.0])
    np.testing.assert_allclose(P.c_noise(t, "jcm"), 0.25 * np.log([0.002, 1.0, 80.0]), rtol=1e-6)
    np.testing.assert_allclose(P.c_noise(t, "cm"), 250 * np.log([0.002, 1.0, 80.0]), rtol=1e-5)


@pytest.mark.parametrize("out_value", [0.0, 1e6, -3.5, np.inf, np.nan])
def test_boundary_condition_exact_for_any_network_output(out_value):
    x = jax.random.normal(jax.random.key(0), (5, 3, 4, 2)) * 7.0
    apply_fn = lambda params, xin, cn, **kw: jnp.full_like(xin, out_value)
    f = P.consistency_fn(apply_fn, None, x, jnp.full((5,), SIG.sigma_min), SIG)
    np.testing.assert_array_equal(np.asarray(f), np.asarray(x))


def test_consistency_fn_composes_scalings_and_network():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    t = np.array([0.002, 0.1, 3.0, 80.0], np.float32)
    w = rng.standard_normal((3, 3)).astype(np.float32)
    apply_fn = lambda params, xin, cn, **kw: xin @ params + cn[:, None]
    got = P.consistency_fn(apply_fn, jnp.asarray(w), jnp.asarray(x), jnp.asarray(t), SIG)
    cs, co, ci = _np_scalings(t, SIG.sigma_min, SIG.sigma_data)
    want = cs[:, None] * x + co[:, None] * ((ci[:, None] * x) @ w + 0.25 * np.log(t)[:, None])
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)
    d = P.denoiser_fn(apply_fn, jnp.asarray(w), jnp.asarray(x), jnp.asarray(t), SIG)
    cs, co, ci = _np_scalings(t, 0.0, SIG.sigma_data)
    want = cs[:, None] * x + co[:, None] * ((ci[:, None] * x) @ w + 0.25 * np.log(t)[:, None])
    np.testing.assert_allclose(np.asarray(d), want, rtol=2e-5, atol=2e-6)


def test_bfloat16_network_output_keeps_float32_skip_and_exact_boundary():
    x = jax.random.normal(jax.random.key(1), (3, 8)) * 40
    apply_fn = lambda params, xin, cn, **kw: (xin * 0.5).astype(jnp.bfloat16)
    f = P.consistency_fn(apply_fn, None, x, jnp.array([SIG.sigma_min, 1.0, 80.0]), SIG)
    assert f.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(f[0]), np.asarray(x[0]))


def test_bad_configs_and_shapes_are_named():
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        P.SigmaConfig(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="c_noise"):
        P.SigmaConfig(c_noise="nope")
    apply_fn = lambda params, xin, cn, **kw: xin[:, :1]
    with pytest.raises(ValueError, match="returned shape"):
        P.consistency_fn(apply_fn, None, jnp.ones((2, 3)), jnp.ones((2,)), SIG)
    with pytest.raises(ValueError, match="Times must be"):
        P.consistency_fn(lambda p, x, c, **k: x, None, jnp.ones((2, 3)), jnp.ones((3,)), SIG)


def test_f_theta_is_forward_differentiable_in_x_and_t_for_continuous_time_losses():
    """Continuous-time CD/CT (CM Appendix B) needs jax.jvp through f_θ in (x, t): check it against a
    central finite difference in float64-free form (small network, smooth in both arguments)."""
    from consistency_jax.networks import get_network, make_apply_fn

    net = get_network("mlp", hidden=16, depth=1)
    params = net.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
    apply_fn = make_apply_fn(net)
    f = lambda x, t: P.consistency_fn(apply_fn, params, x, t, SIG)
    x = jnp.array([[0.3, -0.4], [1.0, 2.0]])
    t = jnp.array([0.5, 3.0])
    v = jnp.array([[1.0, 0.5], [-0.2, 0.3]])
    _, tangent = jax.jvp(f, (x, t), (v, -jnp.ones_like(t)))
    h = 1e-3
    fd = (f(x + h * v, t - h) - f(x - h * v, t + h)) / (2 * h)
    np.testing.assert_allclose(np.asarray(tangent), np.asarray(fd), rtol=2e-2, atol=2e-3)


# ---------------------------------------------------------------- dtypes: float64 under x64, else float32


def _linear_net(params, xin, cn, **kw):
    return xin @ params + cn[:, None]


def _np_f(x, t, w, eps):
    cs, co, ci = _np_scalings(t, eps, SIG.sigma_data)
    return cs[:, None] * x + co[:, None] * ((ci[:, None] * x) @ w + 0.25 * np.log(t)[:, None])


@pytest.mark.parametrize("x64", [False, True])
def test_consistency_and_denoiser_follow_the_input_dtype(x64):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 3)) * 10
    t = np.array([0.002, 0.0021, 0.1, 3.0, 80.0])
    w = rng.standard_normal((3, 3))
    want_dtype = np.float64 if x64 else np.float32
    with x64_context(x64):
        xj, tj, wj = jnp.asarray(x), jnp.asarray(t), jnp.asarray(w)
        f = P.consistency_fn(_linear_net, wj, xj, tj, SIG)
        d = P.denoiser_fn(_linear_net, wj, xj, tj, SIG)
        fj = jax.jit(lambda w, x, t: P.consistency_fn(_linear_net, w, x, t, SIG))(wj, xj, tj)
        score = P.denoiser_to_score(d, xj, tj)
        for a in (f, d, fj, score):
            assert a.dtype == want_dtype
        f, d, fj, score, x_in = (np.asarray(a) for a in (f, d, fj, score, xj))
    rtol, atol = (1e-12, 1e-12) if x64 else (2e-5, 2e-5)
    np.testing.assert_allclose(f, _np_f(x, t, w, SIG.sigma_min), rtol=rtol, atol=atol)
    np.testing.assert_allclose(fj, _np_f(x, t, w, SIG.sigma_min), rtol=rtol, atol=atol)
    d_want = _np_f(x, t, w, 0.0)
    np.testing.assert_allclose(d, d_want, rtol=rtol, atol=atol)
    np.testing.assert_allclose(
        score,
        (d_want - x) / t[:, None] ** 2,
        rtol=1e-9 if x64 else 1e-3,
        atol=1e-9 if x64 else 1e-3,
    )
    # The boundary condition f(x, ε) = x holds exactly in both precisions.
    np.testing.assert_array_equal(f[0], x_in[0])
    np.testing.assert_array_equal(fj[0], x_in[0])


@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.int32])
def test_low_precision_and_integer_inputs_compute_in_float32(dtype, x64):
    with x64_context(x64):
        x = (jnp.arange(12).reshape(4, 3) - 5).astype(dtype)
        t = jnp.array([SIG.sigma_min, 0.5, 2.0, 80.0], jnp.float32)
        net = lambda params, xin, cn, **kw: xin * 0.5
        f = P.consistency_fn(net, None, x, t, SIG)
        d = P.denoiser_fn(net, None, x, t, SIG)
        assert f.dtype == jnp.float32 and d.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(f[0]), np.asarray(x[0], np.float32))
        # A Python-float time does not widen float32 inputs, also under x64.
        f = P.consistency_fn(net, None, x.astype(jnp.float32), 0.5, SIG)
        assert f.dtype == jnp.float32


def test_mlp_network_under_x64_gives_float64():
    from consistency_jax.networks import get_network, make_apply_fn

    net = get_network("mlp", hidden=16, depth=1)
    params = net.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
    x = np.array([[0.3, -0.4], [1.0, 2.0], [-5.0, 7.0]])
    t = np.array([SIG.sigma_min, 0.5, 3.0])
    f32 = P.consistency_fn(make_apply_fn(net), params, jnp.asarray(x), jnp.asarray(t), SIG)
    assert f32.dtype == jnp.float32
    with x64_context():
        f64 = P.consistency_fn(make_apply_fn(net), params, jnp.asarray(x), jnp.asarray(t), SIG)
        assert f64.dtype == jnp.float64
        f64 = np.asarray(f64)
    np.testing.assert_array_equal(f64[0], x[0])
    np.testing.assert_allclose(f64, np.asarray(f32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x64", [False, True])
def test_solvers_do_not_downcast(x64):
    s = 0.7
    x = np.array([[0.3, -1.2], [2.0, 0.1]])
    tc, tn = np.array([3.0, 0.5]), np.array([1.5, 0.002])
    D = lambda x, t: s**2 / (s**2 + t[:, None] ** 2) * x
    d = (x - D(x, tc)) / tc[:, None]
    h = (tn - tc)[:, None]
    euler = x + h * d
    xe = x + h * d
    heun = x + h * 0.5 * (d + (xe - D(xe, tn)) / tn[:, None])
    with x64_context(x64):
        Dj = lambda x, t: s**2 / (s**2 + t[:, None] ** 2) * x
        args = (jnp.asarray(x), jnp.asarray(tc), jnp.asarray(tn))
        got_e, got_h = solvers.euler_step(Dj, *args), solvers.heun_step(Dj, *args)
        for a in (got_e, got_h):
            assert a.dtype == (jnp.float64 if x64 else jnp.float32)
        got_e, got_h = np.asarray(got_e), np.asarray(got_h)
    rtol = 1e-12 if x64 else 1e-5
    np.testing.assert_allclose(got_e, euler, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(got_h, heun, rtol=rtol, atol=rtol)
