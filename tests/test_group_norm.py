"""``layers.GroupNorm``'s statistics where |mean| ≫ std (near-constant activations, issue 29).

The reference is GroupNorm in float64 NumPy on the same float32 inputs. The one-pass variance
E[x²] − μ² that the layer used before loses every digit there in float32 (checked below, so the
inputs are a real test); the shifted one-pass statistics keep the output to ~1e-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consistency_jax.networks import layers as L


def _reference(x, scale, bias, groups, eps):
    x = np.asarray(x, np.float64)
    b, c = x.shape[0], x.shape[-1]
    g = x.reshape(b, -1, groups, c // groups)
    g = (g - g.mean((1, 3), keepdims=True)) / np.sqrt(g.var((1, 3), keepdims=True) + eps)
    return g.reshape(x.shape) * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)


def _one_pass_float32(x, scale, bias, groups, eps):
    """The formula the layer used before: E[x²] − μ² and the folded affine y = x·a + (β − μ·a)."""
    x = np.asarray(x, np.float32)
    b, c = x.shape[0], x.shape[-1]
    g = x.reshape(b, -1, groups, c // groups)
    mean = g.mean((1, 3), dtype=np.float32, keepdims=True)
    var = np.maximum((g * g).mean((1, 3), dtype=np.float32, keepdims=True) - mean * mean, 0)
    a = (1 / np.sqrt(var + np.float32(eps))) * scale.reshape(groups, c // groups)
    return (g * a + (bias.reshape(groups, c // groups) - mean * a)).reshape(x.shape)


@pytest.mark.parametrize("loc, std", [(1e3, 1e-2), (-250.0, 1e-3), (40.0, 1.0), (0.0, 1.0)])
def test_group_norm_is_accurate_where_the_mean_dwarfs_the_spread(loc, std):
    rng = np.random.default_rng(0)
    shape, groups, eps = (2, 8, 8, 64), 8, 1e-6
    # Each group its own offset around loc, as channels of a near-constant activation.
    offsets = rng.normal(size=(1, 1, 1, 64)) * std * 5
    x = (loc + offsets + std * rng.normal(size=shape)).astype(np.float32)
    scale = (1 + 0.1 * rng.normal(size=64)).astype(np.float32)
    bias = (0.1 * rng.normal(size=64)).astype(np.float32)
    gn = L.GroupNorm(num_groups=groups, epsilon=eps)
    y = np.asarray(gn.apply({"params": {"scale": scale, "bias": bias}}, jnp.asarray(x)))
    ref = _reference(x, scale, bias, groups, eps)
    rel = np.abs(y - ref).max() / np.abs(ref).max()
    assert rel <= 1e-5, rel
    if loc / std >= 1e5:  # the old formula fails on these inputs
        old = _one_pass_float32(x, scale, bias, groups, eps)
        assert np.abs(old - ref).max() / np.abs(ref).max() > 1e-2


def test_group_norm_gradient_is_exact_where_the_mean_dwarfs_the_spread():
    """d/dx of Σ y·w, against the float64 closed form (a·(w − mean(w) − x̂·mean(w·x̂)) per group,
    with x̂ the normalised input and a = γ/σ folded into w)."""
    rng = np.random.default_rng(1)
    shape, groups, eps = (1, 4, 4, 8), 2, 1e-6
    x = (1e3 + 1e-2 * rng.normal(size=shape)).astype(np.float32)
    w = rng.normal(size=shape).astype(np.float32)
    scale = np.ones(8, np.float32)
    gn = L.GroupNorm(num_groups=groups, epsilon=eps)
    params = {"scale": scale, "bias": np.zeros(8, np.float32)}
    grad = np.asarray(jax.grad(lambda z: (gn.apply({"params": params}, z) * w).sum())(x))
    x64 = np.asarray(x, np.float64).reshape(1, -1, groups, 4)
    w64 = np.asarray(w, np.float64).reshape(1, -1, groups, 4)
    mu = x64.mean((1, 3), keepdims=True)
    sd = np.sqrt(x64.var((1, 3), keepdims=True) + eps)
    xh = (x64 - mu) / sd
    ref = (w64 - w64.mean((1, 3), keepdims=True) - xh * (w64 * xh).mean((1, 3), keepdims=True)) / sd
    ref = ref.reshape(shape)
    assert np.abs(grad - ref).max() / np.abs(ref).max() <= 1e-4


def _random_group_norm_inputs(rng, shape, loc, std):
    c = shape[-1]
    x = (loc + std * rng.normal(size=shape)).astype(np.float32)
    scale = (1 + 0.2 * rng.normal(size=c)).astype(np.float32)
    bias = (0.2 * rng.normal(size=c)).astype(np.float32)
    return x, scale, bias


@pytest.mark.parametrize("loc, std", [(0.0, 1.0), (1e3, 1e-2)])
def test_group_norm_jvp_matches_float64_finite_differences(loc, std):
    """Forward mode (the sCM losses' ``jax.jvp`` through the network) in every input at once:
    tangents of x, γ and β against float64 central differences of the NumPy GroupNorm."""
    rng = np.random.default_rng(2)
    shape, groups, eps = (2, 4, 4, 8), 2, 1e-6
    x, scale, bias = _random_group_norm_inputs(rng, shape, loc, std)
    tx = (std * rng.normal(size=shape)).astype(np.float32)
    ts, tb = rng.normal(size=(2, 8)).astype(np.float32)
    gn = L.GroupNorm(num_groups=groups, epsilon=eps)
    f = lambda z, s, b: gn.apply({"params": {"scale": s, "bias": b}}, z)
    y, ty = jax.jvp(f, (x, scale, bias), (tx, ts, tb))
    h = 1e-6
    x64, s64, b64 = (np.asarray(v, np.float64) for v in (x, scale, bias))
    plus = _reference(x64 + h * tx, s64 + h * ts, b64 + h * tb, groups, eps)
    minus = _reference(x64 - h * tx, s64 - h * ts, b64 - h * tb, groups, eps)
    ref = (plus - minus) / (2 * h)
    assert np.abs(np.asarray(ty) - ref).max() / np.abs(ref).max() <= 1e-4
    ref_y = _reference(x64, s64, b64, groups, eps)
    assert np.abs(np.asarray(y) - ref_y).max() / np.abs(ref_y).max() <= 1e-5


def test_group_norm_gradient_of_its_jvp_matches_float64_finite_differences():
    """Reverse over forward mode (the sCM and MeanFlow losses differentiate a loss that holds a
    ``jax.jvp``): d/dx of Σ w·(∂y/∂x·t)², against float64 central differences, in x, of the same
    quantity computed with float64 central differences for the inner derivative."""
    rng = np.random.default_rng(3)
    shape, groups, eps = (1, 2, 2, 4), 2, 1e-6
    x, scale, bias = _random_group_norm_inputs(rng, shape, 0.5, 1.0)
    t = rng.normal(size=shape).astype(np.float32)
    w = rng.normal(size=shape).astype(np.float32)
    gn = L.GroupNorm(num_groups=groups, epsilon=eps)
    params = {"params": {"scale": scale, "bias": bias}}

    def objective(z):
        _, tz = jax.jvp(lambda v: gn.apply(params, v), (z,), (jnp.asarray(t),))
        return jnp.sum(w * tz**2)

    grad = np.asarray(jax.grad(objective)(jnp.asarray(x)))
    s64, b64, t64 = (np.asarray(v, np.float64) for v in (scale, bias, t))

    def objective64(z, h=1e-6):
        tz = _reference(z + h * t64, s64, b64, groups, eps) - _reference(
            z - h * t64, s64, b64, groups, eps
        )
        return np.sum(w * (tz / (2 * h)) ** 2)

    x64, ref, h = np.asarray(x, np.float64), np.zeros(shape), 1e-4
    for i in np.ndindex(shape):
        e = np.zeros(shape)
        e[i] = h
        ref[i] = (objective64(x64 + e) - objective64(x64 - e)) / (2 * h)
    assert np.abs(grad - ref).max() / np.abs(ref).max() <= 1e-3
