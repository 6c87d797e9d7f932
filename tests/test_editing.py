"""Zero-shot editing (CM Algorithm 4): orthogonal transforms, the known part after every step, exact
answers with closed-form consistency functions, slerp, the EDM-teacher variants, and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import x64

from consistency_jax import editing, samplers, toy
from consistency_jax import parameterization as P

SIG = P.SigmaConfig()
EPS, T = SIG.sigma_min, SIG.sigma_max
LUMA = np.array([0.299, 0.587, 0.114])


def _gaussian_f(mu, s):
    """The exact consistency function of data N(μ, s²I): f(x, t) = μ + (x − μ)·√(s² + ε²)/√(s² + t²)."""

    def f(apply_fn, params, x, t, sigmas, **kw):
        t = jnp.reshape(t, (-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
        return mu + (x - mu) * np.sqrt(s * s + sigmas.sigma_min**2) / jnp.sqrt(s * s + t * t)

    return f


def _gaussian_denoiser(mu, s):
    """The exact EDM denoiser of data N(μ, s²I): D(x, t) = μ + (x − μ)·s²/(s² + t²)."""
    return lambda x, t: mu + (x - mu) * s * s / (s * s + jnp.reshape(t, (-1, 1, 1, 1)) ** 2)


def _mixing_f():
    """A nonlinear f_θ that mixes channels and pixels, through the library's preconditioning."""
    net = lambda params, x, c, **kw: jnp.tanh(
        3 * x + jnp.roll(x, 1, axis=-1) - jnp.roll(x, 1, axis=1)
    )
    return net, P.consistency_fn


def _dense(fn, shape):
    """The matrix of a linear map on arrays of ``shape`` (one image), by applying it to a basis."""
    n = int(np.prod(shape))
    basis = jnp.eye(n, dtype=jnp.float64).reshape((n,) + tuple(shape))
    return np.asarray(fn(basis)).reshape(n, n).T


def _luma(x):
    return np.asarray(x, np.float64) @ LUMA


def _patch_means(x, p):
    b, h, w, c = x.shape
    return np.asarray(x, np.float64).reshape(b, h // p, p, w // p, p, c).mean(axis=(2, 4))


# ----------------------------------------------------------------------------------------------------
# Transforms


@pytest.mark.parametrize(
    "name, shape",
    [
        ("colorization", (2, 2, 3)),
        ("superres2", (4, 4, 2)),
        ("superres4", (4, 8, 1)),
        ("identity", (2, 2, 3)),
    ],
)
def test_transforms_are_orthogonal_with_exact_inverses(name, shape):
    transform = {
        "colorization": editing.colorization_transform(),
        "superres2": editing.superres_transform(2),
        "superres4": editing.superres_transform(4),
        "identity": editing.identity_transform(),
    }[name]
    with x64():
        a = _dense(transform.forward, shape)
        a_inv = _dense(transform.inverse, shape)
        x = jnp.asarray(np.random.default_rng(0).standard_normal((3,) + shape))
        round_trip = np.asarray(transform.inverse(transform.forward(x)))
    n = a.shape[0]
    np.testing.assert_allclose(a @ a.T, np.eye(n), atol=1e-13)
    np.testing.assert_allclose(a_inv, a.T, atol=1e-13)
    np.testing.assert_allclose(round_trip, np.asarray(x), atol=1e-13)


def test_first_rows_are_luma_and_patch_average():
    q = editing.luma_basis()
    np.testing.assert_allclose(q[0], LUMA / np.linalg.norm(LUMA), rtol=1e-14)
    np.testing.assert_allclose(q @ q.T, np.eye(3), atol=1e-14)
    for p in (1, 2, 8):
        qp = editing.patch_basis(p)
        np.testing.assert_allclose(qp[0], np.full(p * p, 1.0 / p), rtol=1e-14)
        np.testing.assert_allclose(qp @ qp.T, np.eye(p * p), atol=1e-13)
    # Coefficient 0 of a patch is p × its mean, stored at the patch's top-left pixel.
    x = np.random.default_rng(1).standard_normal((2, 4, 6, 3)).astype(np.float32)
    ax = np.asarray(editing.superres_transform(2).forward(jnp.asarray(x)))
    np.testing.assert_allclose(ax[:, ::2, ::2, :], 2 * _patch_means(x, 2), atol=1e-5)


def test_masks_presets_and_shapes():
    for name in editing.INPAINTING_PRESETS:
        m = editing.inpainting_mask(name, 16, 12, seed=3)
        assert m.shape == (16, 12) and m.dtype == bool and 0 < m.sum() < m.size, name
    np.testing.assert_array_equal(
        editing.inpainting_mask("random_strokes", 16, 16, seed=5),
        editing.inpainting_mask("random_strokes", 16, 16, seed=5),
    )
    assert (
        editing.inpainting_mask("random_strokes", 16, 16, seed=5)
        != editing.inpainting_mask("random_strokes", 16, 16, seed=6)
    ).any()
    box = editing.inpainting_mask("center_box", 8, 8)
    assert box[2:6, 2:6].all() and box.sum() == 16
    assert editing.inpainting_mask("left_half", 8, 8)[:, :4].all()
    assert editing.as_mask(np.ones((8, 8, 1)), (2, 8, 8, 3)).shape == (1, 8, 8, 1)
    assert editing.as_mask("center_box", (2, 8, 8, 3)).dtype == jnp.bool_
    sr = editing.superres_mask(4, 4, 2)[0, :, :, 0]
    assert not sr[0, 0] and not sr[2, 2] and sr[0, 1] and sr.sum() == 12


# ----------------------------------------------------------------------------------------------------
# The known part after every step


def _tasks(rng):
    """(name, run(**kw) -> (x, steps), y, known(x) -> the known part as NumPy)."""
    rgb = np.tanh(rng.standard_normal((3, 8, 8, 3))).astype(np.float32)
    gray = np.tanh(rng.standard_normal((2, 8, 8, 1))).astype(np.float32)
    strokes = editing.inpainting_mask("random_strokes", 8, 8, seed=1)
    box = editing.inpainting_mask("center_box", 8, 8)
    ts = (80.0, 5.0, 0.8, 0.1)
    apply_fn, f = _mixing_f()
    kw = dict(consistency_fn=f, clip=1.0, return_steps=True)
    key = jax.random.key(7)
    return [
        (
            "inpaint_rgb",
            lambda: editing.inpaint(apply_fn, None, key, rgb, strokes, ts, SIG, **kw),
            rgb,
            lambda x: np.asarray(x)[:, ~strokes],
        ),
        (
            "inpaint_gray_preset",
            lambda: editing.inpaint(apply_fn, None, key, gray, "center_box", ts, SIG, **kw),
            gray,
            lambda x: np.asarray(x)[:, ~box],
        ),
        ("colorize", lambda: editing.colorize(apply_fn, None, key, rgb, ts, SIG, **kw), rgb, _luma),
        (
            "super_resolve_rgb",
            lambda: editing.super_resolve(
                apply_fn, None, key, _patch_means(rgb, 2), ts, SIG, patch_size=2, **kw
            ),
            rgb,
            lambda x: _patch_means(x, 2),
        ),
        (
            "super_resolve_gray",
            lambda: editing.super_resolve(
                apply_fn, None, key, _patch_means(gray, 4), ts, SIG, patch_size=4, **kw
            ),
            gray,
            lambda x: _patch_means(x, 4),
        ),
        (
            "sdedit_masked",
            lambda: editing.sdedit(apply_fn, None, key, rgb, (2.0, 0.5), SIG, mask=strokes, **kw),
            rgb,
            lambda x: np.asarray(x)[:, ~strokes],
        ),
    ]


def test_known_part_equals_the_input_after_every_step():
    for name, run, y, known in _tasks(np.random.default_rng(0)):
        x, steps = run()
        assert x.shape == y.shape and steps.shape[1:] == y.shape, name
        np.testing.assert_array_equal(np.asarray(steps[-1]), np.asarray(x))
        assert np.abs(np.diff(np.asarray(steps), axis=0)).max() > 1e-3, (
            name
        )  # the steps do change x
        want = known(y)
        for j, step in enumerate(steps):
            got = known(step)
            if name.startswith(("inpaint", "sdedit")):
                np.testing.assert_array_equal(got, want, err_msg=f"{name} step {j}")
            else:
                np.testing.assert_allclose(got, want, atol=2e-6, err_msg=f"{name} step {j}")


def test_jit_traces_once_per_shape():
    traces = []
    f = _gaussian_f(0.1, 0.5)

    @jax.jit
    def run(y, mask, key):
        traces.append(1)
        return editing.inpaint(None, None, key, y, mask, (80.0, 1.0), SIG, consistency_fn=f)

    rng = np.random.default_rng(0)
    for seed in range(3):
        y = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
        mask = editing.inpainting_mask("random_strokes", 8, 8, seed=seed)
        x = run(y, mask, jax.random.key(seed))
        np.testing.assert_array_equal(np.asarray(x)[:, ~mask], y[:, ~mask])
    assert len(traces) == 1


# ----------------------------------------------------------------------------------------------------
# Exact answers


def _replay(y, dense_a, omega, ts, key, mu, s):
    """Algorithm 4 in NumPy float64 with the closed-form f, the same draws as ``editing.edit``."""
    b = y.shape[0]
    flat = lambda v: np.asarray(v, np.float64).reshape(b, -1)
    ay = flat(y) @ dense_a.T
    om = np.broadcast_to(omega, y.shape).reshape(b, -1)
    proj = lambda x: np.where(om, x @ dense_a.T, ay) @ dense_a
    k_init, k_loop = jax.random.split(key)
    keys = jax.random.split(k_loop, len(ts))
    f = lambda x, t: mu + (x - mu) * np.sqrt(s * s + EPS**2) / np.sqrt(s * s + t * t)
    x = np.where(om, 0.0, ay) @ dense_a + ts[0] * flat(
        jax.random.normal(k_init, y.shape, jnp.float64)
    )
    for j, t in enumerate(ts):
        if j:
            x = x + np.sqrt(t * t - EPS**2) * flat(jax.random.normal(keys[j], y.shape, jnp.float32))
        x = proj(f(x, t))
    return x.reshape(y.shape)


@pytest.mark.parametrize(
    "task, ts",
    [
        ("inpaint", (80.0,)),
        ("inpaint", (80.0, 3.0, 0.4)),
        ("colorize", (80.0,)),
        ("super_resolve", (80.0, 1.0)),
    ],
)
def test_algorithm_4_with_the_exact_gaussian_f_matches_a_numpy_replay(task, ts):
    mu, s = 0.2, 0.5
    rng = np.random.default_rng(2)
    key = jax.random.key(3)
    with x64():
        y = np.tanh(rng.standard_normal((2, 4, 4, 3)))
        kw = dict(consistency_fn=_gaussian_f(mu, s))
        if task == "inpaint":
            mask = editing.inpainting_mask("random_strokes", 4, 4, seed=0)
            transform, omega = editing.identity_transform(), mask[None, :, :, None]
            got = editing.inpaint(None, None, key, jnp.asarray(y), mask, ts, SIG, **kw)
        elif task == "colorize":
            transform, omega = editing.colorization_transform(), editing.colorization_mask()
            got = editing.colorize(None, None, key, jnp.asarray(y), ts, SIG, **kw)
        else:
            transform, omega = editing.superres_transform(2), editing.superres_mask(4, 4, 2)
            y = np.repeat(np.repeat(_patch_means(y, 2), 2, axis=1), 2, axis=2)
            got = editing.super_resolve(
                None, None, key, jnp.asarray(_patch_means(y, 2)), ts, SIG, patch_size=2, **kw
            )
        dense_a = _dense(transform.forward, y.shape[1:])
        want = _replay(y, dense_a, omega, ts, key, mu, s)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-12)


def test_inpainting_a_gaussian_prior_samples_the_exact_conditional():
    """Data N(μ, s²I) has independent pixels: given the known ones, the missing ones are N(μ, s²).
    One step from T gives them N(μ(1 − k), (kT)²), k = √(s² + ε²)/√(s² + T²) (closed form); more steps
    keep N(μ, s² + ε²) (each step maps it to itself). Both are within sampling error of N(μ, s²)."""
    mu, s = 0.3, 0.5
    y = np.full((8, 16, 16, 1), -1.0, np.float32)
    mask = editing.inpainting_mask("left_half", 16, 16)
    for ts in [(80.0,), (80.0, 2.0, 0.3)]:
        x = np.asarray(
            editing.inpaint(
                None, None, jax.random.key(0), y, mask, ts, SIG, consistency_fn=_gaussian_f(mu, s)
            )
        )
        gen = x[:, mask].ravel()
        k = np.sqrt(s * s + EPS**2) / np.sqrt(s * s + T * T)
        mean, std = (mu * (1 - k), k * T) if len(ts) == 1 else (mu, np.sqrt(s * s + EPS**2))
        se = std / np.sqrt(gen.size)
        assert abs(gen.mean() - mean) < 4 * se and abs(gen.mean() - mu) < 4 * se + 0.002, ts
        assert abs(gen.std() - std) < 0.04 * std and abs(gen.std() - s) < 0.04 * s, ts
        np.testing.assert_array_equal(x[:, ~mask], y[:, ~mask])


def _toy_f(gm):
    """The toy mixture's exact consistency function f(x, t) = ODE map (t → ε), on (B, 1, 1, 2) images."""

    def host(x, t):
        return toy.ode_map(gm, np.asarray(x).reshape(-1, 2), float(np.asarray(t)[0]), EPS).reshape(
            x.shape
        )

    def f(apply_fn, params, x, t, sigmas, **kw):
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
        return jax.pure_callback(host, jax.ShapeDtypeStruct(x.shape, x.dtype), x, t)

    return f


def test_denoise_and_interpolate_with_the_exact_toy_f_are_the_ode_map():
    gm = toy.ring_mixture()
    rng = np.random.default_rng(0)
    sigma = 0.7
    with x64():
        x0 = gm.sample(rng, 6)
        y = (x0 + sigma * rng.standard_normal(x0.shape)).reshape(6, 1, 1, 2)
        got = editing.denoise(
            None, None, None, jnp.asarray(y), sigma, SIG, consistency_fn=_toy_f(gm)
        )
        np.testing.assert_allclose(
            np.asarray(got).reshape(6, 2), toy.ode_map(gm, y.reshape(6, 2), sigma, EPS), atol=1e-12
        )
        # EDM teacher: Heun from σ with the exact denoiser approximates the same map.
        heun = editing.edm_denoise(
            lambda x, t: toy.exact_denoiser(gm.as_params(), x.reshape(-1, 2), t).reshape(x.shape),
            jnp.asarray(y),
            sigma,
            SIG,
            num_steps=80,
        )
        np.testing.assert_allclose(
            np.asarray(heun).reshape(6, 2), toy.ode_map(gm, y.reshape(6, 2), sigma, 1e-8), atol=2e-3
        )
        z0, z1 = rng.standard_normal((2, 3, 1, 1, 2))
        xs = editing.interpolate(
            None,
            None,
            None,
            jnp.asarray(z0),
            jnp.asarray(z1),
            [0.0, 0.5, 1.0],
            (T,),
            SIG,
            consistency_fn=_toy_f(gm),
        )
        assert xs.shape == (3, 3, 1, 1, 2)
        mid = np.asarray(editing.slerp(jnp.asarray(z0), jnp.asarray(z1), 0.5))
        for got, z in zip(np.asarray(xs), (z0, mid, z1)):
            np.testing.assert_allclose(
                got.reshape(3, 2), toy.ode_map(gm, T * z.reshape(3, 2), T, EPS), atol=1e-12
            )


def test_slerp_against_numpy():
    rng = np.random.default_rng(4)
    with x64():
        z0, z1 = rng.standard_normal((2, 3, 4, 4, 2))
        np.testing.assert_array_equal(np.asarray(editing.slerp(z0, z1, 0.0)), z0)
        np.testing.assert_array_equal(np.asarray(editing.slerp(z0, z1, 1.0)), z1)
        alpha = np.array([0.3, 0.5, 0.9])
        got = np.asarray(editing.slerp(z0, z1, alpha))
        a, b = z0.reshape(3, -1), z1.reshape(3, -1)
        theta = np.arccos(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
        want = (np.sin((1 - alpha) * theta) / np.sin(theta))[:, None] * a + (
            np.sin(alpha * theta) / np.sin(theta)
        )[:, None] * b
        np.testing.assert_allclose(got.reshape(3, -1), want, rtol=1e-12, atol=1e-12)
        # Orthogonal inputs of equal norm stay on the sphere.
        b_orth = b - np.sum(a * b, 1, keepdims=True) / np.sum(a * a, 1, keepdims=True) * a
        b_orth *= (np.linalg.norm(a, axis=1) / np.linalg.norm(b_orth, axis=1))[:, None]
        for al in (0.1, 0.5, 0.77):
            z = np.asarray(editing.slerp(a, b_orth, al))
            np.testing.assert_allclose(
                np.linalg.norm(z, axis=1), np.linalg.norm(a, axis=1), rtol=1e-12
            )
        # (Anti)parallel inputs fall back to the linear interpolation.
        np.testing.assert_allclose(np.asarray(editing.slerp(a, 2 * a, 0.5)), 1.5 * a, rtol=1e-12)


# ----------------------------------------------------------------------------------------------------
# EDM teacher


def test_edm_editing_keeps_the_known_part_and_follows_the_exact_ode():
    mu, s = 0.2, 0.5
    d = _gaussian_denoiser(mu, s)
    rng = np.random.default_rng(5)
    rgb = np.tanh(rng.standard_normal((2, 8, 8, 3))).astype(np.float32)
    strokes = editing.inpainting_mask("random_strokes", 8, 8, seed=2)
    key = jax.random.key(1)
    out = np.asarray(editing.edm_inpaint(d, key, rgb, strokes, SIG, num_steps=18))
    np.testing.assert_array_equal(out[:, ~strokes], rgb[:, ~strokes])
    # Independent pixels: a generated one follows its own PF-ODE from T·z, the Heun sampler's path (and
    # approximately the exact map to 0, μ + (T·z − μ)·s/√(s² + T²)), whatever the known pixels do.
    z = jax.random.normal(key, rgb.shape, jnp.float32)
    alone = np.asarray(samplers.edm_heun_sample(d, key, rgb.shape, SIG, 18, x_init=T * z))
    np.testing.assert_allclose(out[:, strokes], alone[:, strokes], atol=1e-6)
    want = mu + (T * np.asarray(z, np.float64) - mu) * s / np.sqrt(s * s + T * T)
    np.testing.assert_allclose(
        out[:, strokes] - mu, want[:, strokes] - mu, rtol=0.1
    )  # 18 Heun steps
    col = np.asarray(editing.edm_colorize(d, key, rgb, SIG, num_steps=6))
    np.testing.assert_allclose(_luma(col), _luma(rgb), atol=2e-6)
    sr = np.asarray(
        editing.edm_super_resolve(d, key, _patch_means(rgb, 4), SIG, num_steps=6, patch_size=4)
    )
    np.testing.assert_allclose(_patch_means(sr, 4), _patch_means(rgb, 4), atol=2e-6)
    plain = np.asarray(
        editing.edm_edit(
            d,
            key,
            rgb,
            SIG,
            6,
            transform=editing.identity_transform(),
            mask=strokes,
            noise_known=False,
        )
    )
    np.testing.assert_array_equal(plain[:, ~strokes], rgb[:, ~strokes])
    sd = np.asarray(editing.edm_sdedit(d, key, rgb, 1.5, SIG, num_steps=6, mask=strokes))
    np.testing.assert_array_equal(sd[:, ~strokes], rgb[:, ~strokes])
    free = np.asarray(editing.edm_sdedit(d, key, rgb, 1.5, SIG, num_steps=6))
    assert np.isfinite(free).all() and np.abs(free - rgb).max() > 0.1
    xs = editing.edm_interpolate(
        d, jnp.asarray(z[:1]), jnp.asarray(z[1:]), [0.0, 1.0], SIG, num_steps=6
    )
    assert xs.shape == (2, 1, 8, 8, 3)


# ----------------------------------------------------------------------------------------------------
# Errors


def test_errors_name_the_problem():
    f = _gaussian_f(0.0, 0.5)
    gray = np.zeros((2, 8, 8, 1), np.float32)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="Colorization needs RGB"):
        editing.colorize(None, None, key, gray, (80.0,), SIG, consistency_fn=f)
    with pytest.raises(ValueError, match="Colorization needs RGB"):
        editing.edm_colorize(_gaussian_denoiser(0.0, 0.5), key, gray, SIG)
    with pytest.raises(ValueError, match="mask's shape"):
        editing.inpaint(
            None, None, key, gray, np.zeros((8, 7), bool), (80.0,), SIG, consistency_fn=f
        )
    with pytest.raises(ValueError, match="mask's shape"):
        editing.inpaint(
            None, None, key, gray, np.zeros((1, 8, 8, 3), bool), (80.0,), SIG, consistency_fn=f
        )
    with pytest.raises(ValueError, match="strictly decreasing"):
        editing.inpaint(None, None, key, gray, "center_box", (1.0, 5.0), SIG, consistency_fn=f)
    with pytest.raises(ValueError, match="strictly decreasing"):
        editing.denoise(None, None, key, gray, 0.5, SIG, ts=(0.5,), consistency_fn=f)
    with pytest.raises(ValueError, match="multiples of patch_size=3"):
        editing.superres_transform(3).forward(jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match="needs an rng"):
        editing.denoise(None, None, None, gray, 0.5, SIG, ts=(0.1,), consistency_fn=f)
    with pytest.raises(ValueError, match="start_from"):
        editing.edit(
            None,
            None,
            key,
            gray,
            (80.0,),
            SIG,
            transform=editing.identity_transform(),
            mask="center_box",
            start_from="noise",
            consistency_fn=f,
        )
    with pytest.raises(ValueError, match="Unknown inpainting mask"):
        editing.inpainting_mask("circle", 8, 8)
