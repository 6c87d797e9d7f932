"""sCM in TrigFlow (Lu & Song 2024): the parameterisation and its EDM form, the exact conversion of an
EDM teacher, the tangent against a closed-form time derivative and central differences, the loss and
its gradient against NumPy float64, the weighting head, the config checks, and the main loop."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config, x64

from consistency_jax import parameterization as P
from consistency_jax import toy
from consistency_jax import trigflow as TF
from consistency_jax.methods import scm as S
from consistency_jax.networks import get_network, make_apply_fn

SIG = P.SigmaConfig()
SD = SIG.sigma_data


def _poly_net(params, y, s, **_):
    """F(y, s) = A·y·s + B·s² (elementwise): a network whose time derivative is known in closed form."""
    s = s.reshape(s.shape + (1,) * (y.ndim - 1))
    return params["A"] * y * s + params["B"] * s * s


def _poly_params(rng, dim):
    return {"A": jnp.asarray(rng.standard_normal(dim)), "B": jnp.asarray(rng.standard_normal(dim))}


def _mlp_params(module, seed):
    """Random parameters of a toy MLP's shapes (conftest's ``random_params``; nothing compiled)."""
    from conftest import random_params

    init = lambda: module.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
    return random_params(jax.eval_shape(init), seed)


def _path(rng, b, dim):
    x0 = rng.standard_normal((b, dim))
    z = SD * rng.standard_normal((b, dim))
    t = np.array([0.05, 0.4, 0.9, 1.3, 1.55])[:b]
    x_t = np.cos(t)[:, None] * x0 + np.sin(t)[:, None] * z
    v = -np.sin(t)[:, None] * x0 + np.cos(t)[:, None] * z
    return x0, z, t, x_t, v


def _poly_f_and_dfdt(A, B, x_t, v, t):
    """f(t) = cos t·x_t − sin t·σ_d·F(x_t/σ_d, t) for the polynomial network and its total time
    derivative along dx_t/dt = v, differentiated by hand (NumPy float64)."""
    c, s = np.cos(t)[:, None], np.sin(t)[:, None]
    tt = t[:, None]
    F = A * (x_t / SD) * tt + B * tt**2
    dF = A * (v / SD) * tt + A * (x_t / SD) + 2 * B * tt
    f = c * x_t - s * SD * F
    dfdt = -s * x_t + c * v - c * SD * F - s * SD * dF
    return F, f, dfdt


def test_boundary_is_exact_whatever_the_network_returns():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2)), jnp.float32)
    nan_net = lambda p, y, s, **_: jnp.full_like(y, jnp.nan)
    t = jnp.asarray([0.0, 0.0, 0.7])
    out = TF.consistency_fn(nan_net, None, x, t, SIG)
    assert np.array_equal(np.asarray(out[:2]), np.asarray(x[:2]))
    assert np.all(np.isnan(np.asarray(out[2])))
    out_sigma = TF.consistency_fn_sigma(nan_net, None, x, jnp.zeros(3), SIG)
    assert np.array_equal(np.asarray(out_sigma), np.asarray(x))


def test_sigma_form_is_the_edm_preconditioning_with_the_angle_as_time_input():
    """f(x_σ, σ) = f_trig(cos t·x_σ, t) = σ_d²/(σ²+σ_d²)·x − σσ_d/√(σ²+σ_d²)·F(x/√(σ²+σ_d²), t)."""
    with x64():
        rng = np.random.default_rng(1)
        params = _poly_params(rng, 3)
        x = rng.standard_normal((4, 3))
        sigma = np.array([0.002, 0.3, 2.0, 80.0])
        got = np.asarray(
            TF.consistency_fn_sigma(_poly_net, params, jnp.asarray(x), jnp.asarray(sigma), SIG)
        )
        A, B = np.asarray(params["A"]), np.asarray(params["B"])
        s, d = sigma[:, None], np.sqrt(sigma[:, None] ** 2 + SD**2)
        ang = np.arctan(sigma / SD)[:, None]
        want = SD**2 / d**2 * x - s * SD / d * (A * (x / d) * ang + B * ang**2)
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)
        # the ADM convention feeds 1000·t to the network
        cm = P.SigmaConfig(c_noise="cm")
        seen = []
        TF.raw_output(
            lambda p, y, c, **_: seen.append(c) or y,
            None,
            jnp.asarray(x),
            jnp.asarray(ang[:, 0]),
            cm,
        )
        np.testing.assert_allclose(np.asarray(seen[0]), 1000 * ang[:, 0], rtol=1e-15)


def test_converted_edm_teacher_is_the_same_model_in_float64():
    """The exact denoiser of the toy, converted to TrigFlow: its clean estimate equals the EDM
    denoiser, and integrating its TrigFlow PF-ODE reproduces the exact EDM PF-ODE map."""
    gm = toy.ring_mixture()
    with x64():
        phi = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), gm.as_params())
        velocity = TF.edm_velocity(toy.exact_denoiser, SD)
        rng = np.random.default_rng(2)
        x_sigma = jnp.asarray(rng.standard_normal((6, 2)) * 1.5)
        sigma = jnp.asarray([0.01, 0.1, 0.5, 1.0, 5.0, 40.0])
        t = TF.t_from_sigma(sigma, SD)
        x_t = jnp.cos(t)[:, None] * x_sigma
        v = velocity(phi, x_t, t)
        x0 = TF.denoised_from_velocity(x_t, t, v)
        np.testing.assert_allclose(
            np.asarray(x0),
            np.asarray(toy.exact_denoiser(phi, x_sigma, sigma)),
            rtol=1e-12,
            atol=1e-13,
        )

        # TrigFlow ODE from σ = 2 to σ = 0.05 (RK4 in t) against the exact EDM ODE map.
        s0, s1 = 2.0, 0.05
        t0, t1 = float(np.arctan(s0 / SD)), float(np.arctan(s1 / SD))
        start = rng.standard_normal((5, 2)) * np.sqrt(s0**2 + 0.5)
        n = 400
        h = (t1 - t0) / n
        f = jax.jit(lambda x, tt: velocity(phi, x, jnp.full((x.shape[0],), tt)))
        x = jnp.asarray(np.cos(t0) * start)
        tt = t0
        for _ in range(n):
            k1 = f(x, tt)
            k2 = f(x + 0.5 * h * k1, tt + 0.5 * h)
            k3 = f(x + 0.5 * h * k2, tt + 0.5 * h)
            k4 = f(x + h * k3, tt + h)
            x, tt = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), tt + h
        want = toy.ode_map(gm, start, s0, s1)
        np.testing.assert_allclose(np.asarray(x) / np.cos(t1), want, rtol=0, atol=2e-6)


def test_an_edm_network_is_the_same_model_in_trigflow_float64():
    """sigmas.trigflow_time="edm": σ_d·F_θ(x_t/σ_d, t) of an EDM network's parameters is the converted
    EDM teacher's velocity, and the TrigFlow consistency function at (x_σ, σ) is the EDM denoiser D_θ
    (sCD's student starts as its teacher); the network sees 0.25·ln(σ_d·tan t)."""
    with x64():
        module = get_network("mlp", hidden=16, depth=2)
        apply_fn = make_apply_fn(module)
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), _mlp_params(module, 5))
        edm = P.SigmaConfig(trigflow_time="edm")
        rng = np.random.default_rng(6)
        x_sigma = jnp.asarray(rng.standard_normal((6, 2)))
        sigma = jnp.asarray([0.002, 0.05, 0.5, 1.0, 7.0, 80.0])
        t = TF.t_from_sigma(sigma, SD)
        x_t = jnp.cos(t)[:, None] * x_sigma
        teacher_v = TF.edm_velocity(P.network_teacher(apply_fn, SIG), SD)(params, x_t, t)
        got = SD * TF.raw_output(apply_fn, params, x_t, t, edm)
        np.testing.assert_allclose(np.asarray(got), np.asarray(teacher_v), rtol=1e-10, atol=1e-12)
        f = TF.consistency_fn_sigma(apply_fn, params, x_sigma, sigma, edm)
        np.testing.assert_allclose(
            np.asarray(f),
            np.asarray(P.denoiser_fn(apply_fn, params, x_sigma, sigma, SIG)),
            rtol=1e-12,
            atol=1e-14,
        )
        # the angle network is another function of the same parameters
        other = TF.consistency_fn_sigma(apply_fn, params, x_sigma, sigma, SIG)
        assert np.max(np.abs(np.asarray(other) - np.asarray(f))) > 1e-3
        seen = []
        TF.raw_output(lambda p, y, c, **_: seen.append(c) or y, None, x_t, t, edm)
        np.testing.assert_allclose(
            np.asarray(seen[0]), 0.25 * np.log(np.asarray(sigma)), rtol=1e-12, atol=1e-15
        )
        assert np.isfinite(np.asarray(TF.network_time(jnp.zeros(2), edm))).all()


def test_scd_starts_as_its_edm_teacher_from_config_init(tmp_path):
    """sCD with config.init.workdir = an EDM run and sigmas.trigflow_time=edm: θ is the source's EMA
    (the weighting head starts fresh, w ≡ 0), so the student's consistency function is the source's EDM
    denoiser; it trains. Without trigflow_time=edm the init is refused, naming the field."""
    from conftest import tiny_toy_config, write_run

    from consistency_jax import build, experiment, loading
    from consistency_jax.build import validate

    source = tmp_path / "edm"
    write_run(source, tiny_toy_config("edm"), step=3)  # its eval EMA differs from θ
    src_cfg, src_ema, _ = loading.load_eval_params(str(source))
    c = tiny_toy_config("scd")
    c.loss.tangent_warmup = 2
    c.init.workdir = str(source)
    with pytest.raises(ValueError, match=r"--config\.sigmas\.trigflow_time=edm"):
        validate(c)
    c.sigmas.trigflow_time = "edm"
    setup = validate(c)
    _, apply_fn, init = build.build_network(c, (2,))
    start = build.load_init_params(c, init, setup.mesh)
    assert set(start) == {"net", "logvar_hidden", "logvar_out"}
    for a, b in zip(jax.tree.leaves(start["net"]), jax.tree.leaves(src_ema)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.any(np.asarray(start["logvar_out"]["kernel"]))
    x = jnp.asarray(np.random.default_rng(7).standard_normal((5, 2)), jnp.float32)
    sigma = jnp.asarray([0.01, 0.3, 1.0, 5.0, 80.0], jnp.float32)
    student = jax.jit(TF.consistency_fn_sigma, static_argnums=(0, 4))(
        apply_fn, start, x, sigma, setup.sigmas
    )
    src_apply = build.build_network(src_cfg, (2,))[1]
    teacher = jax.jit(P.denoiser_fn, static_argnums=(0, 4))(
        src_apply, src_ema, x, sigma, setup.sigmas
    )
    np.testing.assert_allclose(np.asarray(student), np.asarray(teacher), rtol=1e-5, atol=1e-5)
    state = experiment.train_and_evaluate(c, str(tmp_path / "scd"))
    assert int(state.step) == 4
    row = json.loads((tmp_path / "scd" / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(row["map_error"])


def test_scd_tangent_vanishes_at_the_exact_consistency_function():
    """The toy's exact TrigFlow consistency function (its PF-ODE integrated to t ≈ 0 by RK4 inside the
    network, so the jvp goes through the solver) is the fixed point of sCD: with the converted exact
    teacher's velocity the tangent g = cos t·df/dt vanishes, while CT's one-sample velocity does not
    give zero."""
    gm = toy.ring_mixture()
    with x64():
        phi = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), gm.as_params())
        velocity = TF.edm_velocity(toy.exact_denoiser, SD)
        t_end = float(np.arctan(1e-5 / SD))

        def exact_net(params, y, t, **_):
            x_t = y * SD
            h = (t_end - t) / 60

            def rk4(_, carry):
                x, s = carry
                hb = h[:, None]
                k1 = velocity(phi, x, s)
                k2 = velocity(phi, x + 0.5 * hb * k1, s + 0.5 * h)
                k3 = velocity(phi, x + 0.5 * hb * k2, s + 0.5 * h)
                k4 = velocity(phi, x + hb * k3, s + h)
                return x + hb / 6 * (k1 + 2 * k2 + 2 * k3 + k4), s + h

            x0 = jax.lax.fori_loop(0, 60, rk4, (x_t, t))[0] / np.cos(t_end)
            return (jnp.cos(t)[:, None] * x_t - x0) / (SD * jnp.sin(t)[:, None])

        rng = np.random.default_rng(7)
        x0 = jnp.asarray(gm.sample(rng, 5))
        z = SD * jnp.asarray(rng.standard_normal((5, 2)))
        t = jnp.asarray([0.1, 0.5, 0.9, 1.3, 1.55])
        x_t = jnp.cos(t)[:, None] * x0 + jnp.sin(t)[:, None] * z
        _, g_cd = S.tangent(exact_net, SIG, None, x_t, t, velocity(phi, x_t, t), 1.0)
        _, g_ct = S.tangent(
            exact_net, SIG, None, x_t, t, jnp.cos(t)[:, None] * z - jnp.sin(t)[:, None] * x0, 1.0
        )
        assert np.max(np.abs(np.asarray(g_cd))) < 1e-6
        assert np.max(np.abs(np.asarray(g_ct))) > 1e-2


@pytest.mark.parametrize("r", [1.0, 0.3])
def test_tangent_is_the_closed_form_time_derivative(r):
    """g = cos t·df⁻/dt at r = 1 (sCM §4.2, from one jvp with the rearranged tangents); the warm-up
    scales only the terms of dF/dt and x_t: g(r) = −cos²t·(σ_d F − v) − r·cos t·sin t·(x_t + σ_d dF/dt)."""
    with x64():
        rng = np.random.default_rng(3)
        params = _poly_params(rng, 3)
        x0, z, t, x_t, v = _path(rng, 5, 3)
        F_got, g = S.tangent(
            _poly_net, SIG, params, jnp.asarray(x_t), jnp.asarray(t), jnp.asarray(v), jnp.float64(r)
        )
        A, B = np.asarray(params["A"]), np.asarray(params["B"])
        F, f, dfdt = _poly_f_and_dfdt(A, B, x_t, v, t)
        c, s = np.cos(t)[:, None], np.sin(t)[:, None]
        np.testing.assert_allclose(np.asarray(F_got), F, rtol=1e-13)
        if r == 1.0:
            np.testing.assert_allclose(np.asarray(g), c * dfdt, rtol=1e-12, atol=1e-14)
        dF = A * (v / SD) * t[:, None] + A * (x_t / SD) + 2 * B * t[:, None]
        want = -c * c * (SD * F - v) - r * c * s * (x_t + SD * dF)
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-12, atol=1e-14)


def test_tangent_through_the_toy_mlp_equals_central_differences(sig=SIG):
    """cos t·df⁻/dt along the TrigFlow path through the library's MLP (float32) against central
    differences of f(x_{t±h}, t ± h)."""
    module = get_network("mlp", hidden=32, depth=2)
    apply_fn = make_apply_fn(module)
    params = jax.tree.map(jnp.asarray, _mlp_params(module, 0))
    rng = np.random.default_rng(4)
    x0, z, t, x_t, v = _path(rng, 5, 2)
    _, g = S.tangent(
        apply_fn,
        sig,
        params,
        jnp.asarray(x_t, jnp.float32),
        jnp.asarray(t, jnp.float32),
        jnp.asarray(v, jnp.float32),
        1.0,
    )
    h = 1e-3

    def f_at(dt):
        tt = t + dt
        xt = np.cos(tt)[:, None] * x0 + np.sin(tt)[:, None] * z
        return np.asarray(
            TF.consistency_fn(
                apply_fn, params, jnp.asarray(xt, jnp.float32), jnp.asarray(tt, jnp.float32), sig
            ),
            np.float64,
        )

    fd = np.cos(t)[:, None] * (f_at(h) - f_at(-h)) / (2 * h)
    assert np.max(np.abs(fd)) > 1e-2
    np.testing.assert_allclose(np.asarray(g), fd, rtol=0, atol=3e-3 * np.max(np.abs(fd)))


def test_tangent_of_an_edm_network_equals_central_differences_float64():
    """The tangent for an EDM network (sigmas.trigflow_time=edm: time input s = 0.25·ln(σ_d·tan t),
    whose t-derivative grows like 1/(sin t·cos t) at both ends) against central differences of f in
    float64, through the polynomial network (exact in float64; the MLP computes in float32)."""
    sig = P.SigmaConfig(trigflow_time="edm")
    with x64():
        rng = np.random.default_rng(4)
        params = _poly_params(rng, 2)
        x0, z, t, x_t, v = _path(rng, 5, 2)
        _, g = S.tangent(
            _poly_net, sig, params, jnp.asarray(x_t), jnp.asarray(t), jnp.asarray(v), 1.0
        )
        h = 1e-6

        def f_at(dt):
            tt = t + dt
            xt = np.cos(tt)[:, None] * x0 + np.sin(tt)[:, None] * z
            return np.asarray(
                TF.consistency_fn(_poly_net, params, jnp.asarray(xt), jnp.asarray(tt), sig)
            )

        fd = np.cos(t)[:, None] * (f_at(h) - f_at(-h)) / (2 * h)
        assert np.max(np.abs(fd)) > 1e-2
        np.testing.assert_allclose(np.asarray(g), fd, rtol=0, atol=1e-7 * np.max(np.abs(fd)))
        # the angle network's tangent is another one
        _, g_angle = S.tangent(
            _poly_net, SIG, params, jnp.asarray(x_t), jnp.asarray(t), jnp.asarray(v), 1.0
        )
        assert np.max(np.abs(np.asarray(g_angle) - fd)) > 1e-2 * np.max(np.abs(fd))


def test_loss_and_its_gradient_match_numpy_float64():
    """The objective e^w/D·‖F − F⁻ − g/(‖g‖ + c)‖² − w against NumPy, and its gradient: only F_θ and
    w_φ are differentiated (F⁻ and g are under stop-gradient)."""
    with x64():
        rng = np.random.default_rng(5)
        dim, c_const, r = 3, 0.1, 0.7
        params = {**_poly_params(rng, dim), "alpha": jnp.float64(0.4)}
        logvar_fn = lambda p, c: p["alpha"] * c + 0.2
        x0, z, t, x_t, v = _path(rng, 5, dim)
        loss_fn = lambda p: S.scm_loss(
            _poly_net,
            logvar_fn,
            SIG,
            p,
            p,
            jnp.asarray(x_t),
            jnp.asarray(t),
            jnp.asarray(v),
            jnp.float64(r),
            tangent_c=c_const,
        )
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)

        A, B, alpha = (np.asarray(params[k]) for k in ("A", "B", "alpha"))
        F, _, _ = _poly_f_and_dfdt(A, B, x_t, v, t)
        c, s = np.cos(t)[:, None], np.sin(t)[:, None]
        dF = A * (v / SD) * t[:, None] + A * (x_t / SD) + 2 * B * t[:, None]
        g = -c * c * (SD * F - v) - r * c * s * (x_t + SD * dF)
        gn = np.linalg.norm(g, axis=1, keepdims=True)
        g = g / (gn + c_const)
        w = alpha * t + 0.2
        resid = F - F - g  # F⁻ = F numerically (θ⁻ = θ)
        sq = np.sum(resid**2, axis=1)
        want = np.mean(np.exp(w) / dim * sq - w)
        assert float(loss) == pytest.approx(want, rel=1e-12)
        assert float(aux["tangent_norm"]) == pytest.approx(np.mean(gn), rel=1e-12)
        # d/dA of e^w/D·Σ(F − const)²: e^w/D·2·(F − const)·∂F/∂A with ∂F/∂A = (x_t/σ_d)·t
        coef = (np.exp(w) / dim)[:, None] * 2 * resid
        np.testing.assert_allclose(
            np.asarray(grads["A"]), np.mean(coef * (x_t / SD) * t[:, None], axis=0), rtol=1e-11
        )
        np.testing.assert_allclose(
            np.asarray(grads["B"]), np.mean(coef * t[:, None] ** 2, axis=0), rtol=1e-11
        )
        want_alpha = np.mean((np.exp(w) / dim * sq - 1.0) * t)
        assert float(grads["alpha"]) == pytest.approx(want_alpha, rel=1e-11)


def test_logvar_head_wraps_the_network_without_changing_it():
    from consistency_jax.networks.logvar import WithLogVar, make_logvar_fn

    net = get_network("mlp", hidden=16, depth=1)
    wrapped = WithLogVar(net=net, features=8)
    x, c = jnp.ones((3, 2)), jnp.asarray([0.1, 0.7, 1.5])
    params = wrapped.init(jax.random.key(1), x, c)["params"]
    assert set(params) == {"net", "logvar_hidden", "logvar_out"}
    bare = net.apply({"params": params["net"]}, x, c)
    np.testing.assert_array_equal(
        np.asarray(make_apply_fn(wrapped)(params, x, c)), np.asarray(bare)
    )
    logvar_fn = make_logvar_fn(wrapped)
    np.testing.assert_array_equal(np.asarray(logvar_fn(params, c)), np.zeros(3))  # zero-initialised
    # trainable: the gradient of Σ w reaches the output layer
    grad = jax.grad(lambda p: jnp.sum(logvar_fn(p, c)))(params)
    assert float(jnp.abs(grad["logvar_out"]["kernel"]).sum()) > 0


def test_normalized_scale_shift_keeps_the_parameters_and_normalises():
    from consistency_jax.networks.layers import _pixel_norm

    v = jnp.asarray(np.random.default_rng(6).standard_normal((2, 1, 1, 16)) * 3.0, jnp.float32)
    rms = np.sqrt(np.mean(np.asarray(_pixel_norm(v)) ** 2, axis=-1))
    np.testing.assert_allclose(rms, 1.0, rtol=1e-4)
    kw = dict(
        model_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_classes=None,
        num_head_channels=8,
    )
    shapes = lambda m: jax.tree.map(
        lambda a: a.shape,
        jax.eval_shape(
            lambda r: m.init(r, jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))["params"],
            jax.random.key(0),
        ),
    )
    plain, normed = get_network("adm", **kw), get_network("adm", normalize_scale_shift=True, **kw)
    assert shapes(plain) == shapes(normed)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("loss.tangent_c", 0.0, "config.loss.tangent_c"),
        ("loss.tangent_warmup", -1, "config.loss.tangent_warmup"),
        ("loss.p_std", 0.0, "config.loss.p_std"),
        ("model.logvar_head", False, "config.model.logvar_head"),
        ("sigmas.trigflow_time", "sigma", "trigflow_time"),
    ],
)
def test_config_errors_name_the_field(field, value, match):
    from consistency_jax import build

    c = load_config("toy", "method=sct")
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        build.validate(c)


@pytest.mark.slow
def test_scd_through_the_main_loop_with_the_exact_teacher(tmp_path):
    """sCD from the toy's exact EDM denoiser (converted to TrigFlow) trains, checkpoints the weighting
    head with the network, evaluates with the TrigFlow sampler and the exact-map error, and resumes."""
    from consistency_jax import experiment

    c = load_config("toy", "method=scd")
    c.train.update(num_steps=60, log_every=30, eval_every=60)
    c.checkpoint.every = 30
    c.eval.num_samples = 200
    c.loss.tangent_warmup = 20
    state = experiment.train_and_evaluate(c, str(tmp_path))
    assert set(state.params) == {"net", "logvar_hidden", "logvar_out"}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    eval_row = [r for r in rows if "map_error" in r][-1]
    assert np.isfinite(eval_row["map_error"]) and eval_row["step"] == 60
    c.train.num_steps = 90  # resume from step 60 and go on
    c.train.eval_every = 90
    state2 = experiment.train_and_evaluate(c, str(tmp_path))
    assert int(state2.step) == 90
