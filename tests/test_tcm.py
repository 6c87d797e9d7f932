"""TCM's stage-2 mathematics against independent computations in float64: the combined model, the
loss reading the frozen stage-1 model below t′ with no gradient reaching it, the boundary fraction
and weight, and the truncated Student-t proposal against SciPy's distribution."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import x64
from scipy import stats

from consistency_jax.methods import tcm


def _f(params, x, sigma):
    """A float64 'consistency function': x·a + tanh(σ)·b (per-parameter-set a, b)."""
    return x * params["a"] + jnp.tanh(sigma)[:, None] * params["b"]


def _params(seed):
    rng = np.random.default_rng(seed)
    return {"a": jnp.asarray(rng.normal(size=3)), "b": jnp.asarray(rng.normal(size=3))}


def test_combined_model_is_stage1_below_t_prime_and_student_from_it_on():
    with x64():
        s, one = _params(0), _params(1)
        x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 3)))
        sigma = jnp.asarray([0.5, 0.999, 1.0, 1.5, 80.0])
        out = np.asarray(tcm.combined_consistency_fn(_f, 1.0)((s, one), x, sigma))
        np.testing.assert_array_equal(out[:2], np.asarray(_f(one, x, sigma))[:2])
        np.testing.assert_array_equal(out[2:], np.asarray(_f(s, x, sigma))[2:])


def _setup(r):
    rng = np.random.default_rng(3)
    x0 = jnp.asarray(rng.normal(size=(4, 3)))
    z = jnp.asarray(rng.normal(size=(4, 3)))
    t = jnp.asarray([1.0, 2.0, 5.0, 40.0])
    boundary = jnp.asarray([True, False, False, False])
    return x0, z, t, jnp.asarray(r), boundary


def _numpy_loss(s, s_target, one, x0, z, t, r, boundary, t_prime, w_b):
    f = lambda p, x, sg: (
        np.asarray(x) * np.asarray(p["a"]) + np.tanh(sg)[:, None] * np.asarray(p["b"])
    )
    x0, z, t, r, boundary = map(np.asarray, (x0, z, t, r, boundary))
    online = f(s, x0 + t[:, None] * z, t)
    x_r = x0 + r[:, None] * z
    target = np.where((r >= t_prime)[:, None], f(s_target, x_r, r), f(one, x_r, r))
    target = np.where((r >= 0.002)[:, None], target, x0)
    per = np.linalg.norm(online - target, axis=-1) / (t - r)
    return per[~boundary].mean() + w_b * per[boundary].mean()


def test_loss_reads_the_frozen_model_below_t_prime_with_its_weight_and_no_gradient_reaches_it():
    with x64():
        s, one = _params(4), _params(5)
        x0, z, t, r, boundary = _setup([0.6, 1.2, 0.9, 30.0])
        kw = dict(t_prime=1.0, boundary_weight=0.1, huber_c=0.0)
        loss, aux = tcm.tcm_loss(_f, s, s, one, x0, z, t, r, boundary, **kw)
        expect = _numpy_loss(s, s, one, x0, z, t, r, boundary, 1.0, 0.1)
        np.testing.assert_allclose(float(loss), expect, rtol=1e-12)
        # Another boundary weight changes exactly the boundary term.
        loss2, aux2 = tcm.tcm_loss(
            _f, s, s, one, x0, z, t, r, boundary, **dict(kw, boundary_weight=0.3)
        )
        np.testing.assert_allclose(
            float(loss2 - loss), 0.2 * float(aux["boundary_loss"]), rtol=1e-10
        )
        # The frozen stage-1 model is read (rows with r < t′) ...
        moved = jax.tree.map(lambda a: a + 0.5, one)
        assert (
            abs(float(tcm.tcm_loss(_f, s, s, moved, x0, z, t, r, boundary, **kw)[0]) - float(loss))
            > 1e-3
        )
        # ... and only there: with every r ≥ t′ it is not.
        r_hi, t_hi, none = jnp.asarray([1.0, 1.2, 3.0, 30.0]), t.at[0].set(1.5), jnp.zeros(4, bool)
        a = tcm.tcm_loss(_f, s, s, one, x0, z, t_hi, r_hi, none, **kw)[0]
        b = tcm.tcm_loss(_f, s, s, moved, x0, z, t_hi, r_hi, none, **kw)[0]
        assert float(a) == float(b)
        # No gradient reaches f_1 (nor the target θ⁻); θ_s gets one.
        g1 = jax.grad(lambda p: tcm.tcm_loss(_f, s, s, p, x0, z, t, r, boundary, **kw)[0])(one)
        gt = jax.grad(lambda p: tcm.tcm_loss(_f, s, p, one, x0, z, t, r, boundary, **kw)[0])(s)
        gs = jax.grad(lambda p: tcm.tcm_loss(_f, p, s, one, x0, z, t, r, boundary, **kw)[0])(s)
        assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves((g1, gt)))
        assert max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(gs)) > 1e-3


def test_boundary_fraction():
    for batch, fraction in ((16, 0.25), (10, 0.25), (8, 0.0), (8, 1.0)):
        m = np.asarray(tcm.boundary_mask(batch, fraction))
        assert m.sum() == round(batch * fraction) and m.shape == (batch,)


def test_truncated_student_t_proposal_matches_scipy():
    loc, scale, df, lo, hi = 0.0, 0.2, 0.01, 0.0, float(np.log(80.0))
    table = tcm.truncated_student_t_table(loc, scale, df, lo, hi)
    assert table[0] == lo and table[-1] == hi and np.all(np.diff(table) >= 0)
    x = np.sort(np.asarray(tcm.sample_from_table(jax.random.key(0), 20000, table)))
    assert x.min() >= lo and x.max() <= hi
    a, b = stats.t.cdf((lo - loc) / scale, df), stats.t.cdf((hi - loc) / scale, df)
    exact = (stats.t.cdf((x - loc) / scale, df) - a) / (b - a)
    empirical = np.arange(1, x.size + 1) / x.size
    assert np.abs(exact - empirical).max() < 0.015  # Kolmogorov–Smirnov distance
    # A plain (untruncated-scale) normal of the same location would not pass.
    wrong = (stats.norm.cdf(x, loc, 1.0) - stats.norm.cdf(lo, loc, 1.0)) / (
        stats.norm.cdf(hi, loc, 1.0) - stats.norm.cdf(lo, loc, 1.0)
    )
    assert np.abs(wrong - empirical).max() > 0.05
