"""The Karras grid (EDM Eq. 5) and the N(k), μ(k) curricula (CM Appendix C / Table 3 and the official
code's ``get_ema_scales_fn``; iCT §3.4 Eq. 7) against NumPy float64 or exact integer computations."""

import math

import jax
import numpy as np
import pytest
from conftest import x64 as x64_context

from consistency_jax import parameterization as P
from consistency_jax import schedules as S

SIG = P.SigmaConfig()


def _np_grid(n, eps=0.002, T=80.0, rho=7.0):
    i = np.arange(n, dtype=np.float64)
    return (eps ** (1 / rho) + i / (n - 1) * (T ** (1 / rho) - eps ** (1 / rho))) ** rho


@pytest.mark.parametrize("n", [2, 3, 18, 40, 151, 1281])
def test_karras_grid(n):
    g = np.asarray(S.karras_sigmas(n, SIG))
    assert g.shape == (n,)
    assert g[0] == np.float32(0.002) and g[-1] == np.float32(80.0)  # exact end points
    assert np.all(np.diff(g) > 0)
    np.testing.assert_allclose(g, _np_grid(n), rtol=2e-5)


def test_karras_time_with_traced_n_matches_static_grid():
    f = jax.jit(lambda i, n: S.karras_time(i, n, SIG))
    np.testing.assert_allclose(
        np.asarray(f(np.arange(18), 18)), np.asarray(S.karras_sigmas(18, SIG)), rtol=1e-6
    )


def test_grid_needs_two_points():
    with pytest.raises(ValueError, match="at least 2"):
        S.karras_sigmas(1, SIG)


@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("n", [2, 18, 151, 1281])
def test_karras_grid_follows_the_default_float_dtype(n, x64):
    """Integer inputs: the grid is in the default float dtype (float64 under x64, else float32)."""
    with x64_context(x64):
        want_dtype = np.float64 if x64 else np.float32
        g = S.karras_sigmas(n, SIG)
        t = jax.jit(lambda i, m: S.karras_time(i, m, SIG))(np.arange(n), n)
        assert g.dtype == want_dtype and t.dtype == want_dtype
        g, t = np.asarray(g), np.asarray(t)
    assert g[0] == want_dtype(0.002) and g[-1] == want_dtype(80.0)  # exact end points in both
    np.testing.assert_allclose(g, _np_grid(n), rtol=1e-12 if x64 else 2e-5)
    np.testing.assert_allclose(t, _np_grid(n), rtol=1e-12 if x64 else 2e-5)


def _exact_cm_n(k, K, s0, s1):
    """N(k) = ⌈√a⌉ with a = k·D/K + s0², D = (s1 + 1)² − s0², in exact integer arithmetic.

    (⌈√a − 1⌉ + 1 = ⌈√a⌉, and for an integer j: j ≥ √a ⟺ j² ≥ ⌈a⌉, so N = ⌈√⌈a⌉⌉.)
    """
    k = np.asarray(k, np.int64)
    D = (s1 + 1) ** 2 - s0**2
    m = -((-(k * D + s0 * s0 * K)) // K)  # ⌈a⌉, exact in int64 here (k·D < 2^63)
    r = np.array([math.isqrt(int(v)) for v in m.ravel()], np.int64).reshape(m.shape)
    return r + (r * r < m)


def test_exact_reference_against_python_integers():
    # The reference itself, against a plain scalar Python-integer evaluation.
    for K, s0, s1 in [(800_000, 2, 150), (3000, 2, 40), (7, 3, 11)]:
        D = (s1 + 1) ** 2 - s0**2
        for k in [0, 1, K // 3, K // 2, K - 1, K]:
            j = s0
            while k * D > (j * j - s0 * s0) * K:  # the smallest j with k·D ≤ (j² − s0²)·K
                j += 1
            assert int(_exact_cm_n(k, K, s0, s1)) == j


def test_cm_curriculum_worked_values():
    # CM's CT curriculum, K = 800k, s0 = 2, s1 = 150: N(0) = 2, N(400k) = 107, N(800k) = 151; and
    # k = 202553, where the official code's float32 evaluation gives 76 instead of 77.
    for k, want in [(0, 2), (400_000, 107), (800_000, 151), (202_553, 77)]:
        assert int(_exact_cm_n(k, 800_000, 2, 150)) == want
        assert int(S.cm_num_scales(k, 800_000, 2, 150)) == want
    cur = S.Curriculum(kind="cm", s0=2, s1=150, mu0=0.9, total_steps=800_000)
    n, mu = cur(0)
    assert int(n) == 2 and abs(float(mu) - 0.81) < 1e-6  # the official code's μ(0)
    n, mu = S.Curriculum(kind="cm", s0=2, s1=150, mu0=0.9, total_steps=800_000, mu_form="paper")(0)
    assert abs(float(mu) - 0.9) < 1e-6


def test_cm_curriculum_is_exact_at_every_step_of_the_cifar10_schedule():
    K, s0, s1 = 800_000, 2, 150
    ks = np.arange(0, K + 1)
    got = np.asarray(jax.jit(lambda k: S.cm_num_scales(k, K, s0, s1))(ks))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, _exact_cm_n(ks, K, s0, s1))


@pytest.mark.parametrize(
    "K,s0,s1",
    [
        (40_000, 2, 150),
        (3000, 2, 40),
        (800_000, 2, 200),
        (1_000_000, 2, 150),
        (1, 2, 150),
        (997, 3, 17),
        (12_345, 5, 5),
    ],
)
def test_cm_curriculum_is_exact_for_other_schedules(K, s0, s1):
    if K > 100_000:  # every 7th step and a window around each change of N
        D = (s1 + 1) ** 2 - s0**2
        edges = np.array([(j * j - s0 * s0) * K // D for j in range(s0, s1 + 2)])
        ks = np.unique(
            np.concatenate([np.arange(0, K + 1, 7), (edges[:, None] + np.arange(-2, 3)).ravel()])
        )
        ks = ks[(ks >= 0) & (ks <= K)]
    else:
        ks = np.arange(0, K + 1)
    got = np.asarray(S.cm_num_scales(ks, K, s0, s1))
    np.testing.assert_array_equal(got, _exact_cm_n(ks, K, s0, s1))
    assert got[0] == s0 and got[-1] == s1 + 1
    assert np.all(np.diff(got) >= 0)


def test_cm_curriculum_traced_step_and_static_bound():
    K, s0, s1 = 800_000, 2, 150
    cur = S.Curriculum(kind="cm", s0=s0, s1=s1, mu0=0.9, total_steps=K)
    f = jax.jit(lambda k: cur(k))
    for k in [0, 1, 202_553, 400_000, K - 1, K, K + 1, 10 * K, 2**31 - 1]:
        n, mu = f(np.int32(k))
        assert n.dtype == np.int32 and mu.dtype == np.float32
        assert int(n) == min(int(_exact_cm_n(min(k, K), K, s0, s1)), cur.max_scales)
        assert int(n) <= cur.max_scales == s1 + 1
        assert abs(float(mu) - math.exp(s0 * math.log(0.9) / (int(n) - 1))) < 1e-6


def test_cm_target_mu_forms():
    for n in [2, 3, 77, 151]:
        mu = float(S.cm_target_mu(n, 2, 0.9, "code"))
        assert abs(mu - math.exp(2 * math.log(0.9) / (n - 1))) < 1e-6
        mu = float(S.cm_target_mu(n, 2, 0.9, "paper"))
        assert abs(mu - math.exp(2 * math.log(0.9) / n)) < 1e-6


def _np_ict_k_prime(K, s0, s1):
    # iCT §3.4: K' = ⌊K / (log2⌊s1/s0⌋ + 1)⌋ (the floor is inside the logarithm).
    return max(int(np.floor(K / (np.log2(np.floor(s1 / s0)) + 1.0))), 1)


@pytest.mark.parametrize(
    "K,s0,s1,kp",
    [
        (400_000, 10, 1280, 50_000),  # s1/s0 = 128: K/8, both readings agree
        (3000, 10, 320, 500),  # digits iCT: s1/s0 = 32
        (800_000, 2, 150, 110_668),  # s1/s0 = 75: K/(log2 75 + 1) = 110668.2, not K/7 = 114285
        (100_000, 3, 100, 16_544),  # ⌊100/3⌋ = 33: K/(log2 33 + 1) = 16544.3, not K/6 = 16666
        (1000, 10, 10, 1000),  # s1 = s0: log2 1 = 0
        (5, 1, 1024, 1),  # K' < 1 is guarded to 1
    ],
)
def test_ict_k_prime_against_numpy(K, s0, s1, kp):
    assert _np_ict_k_prime(K, s0, s1) == kp
    # N(k) doubles exactly at the multiples of K': N(mK' − 1) = min(s0·2^(m−1), s1) + 1 and
    # N(mK') = min(s0·2^m, s1) + 1.
    f = jax.jit(lambda k: S.ict_num_scales(k, K, s0, s1))
    for m in range(0, 12):
        for k in [m * kp - 1, m * kp, m * kp + 1]:
            if k < 0:
                continue
            want = min(s0 * 2 ** (k // kp), s1) + 1
            assert int(S.ict_num_scales(k, K, s0, s1)) == want, (k, m)
            assert int(f(np.int32(k))) == want
    n, mu = S.Curriculum(kind="ict", s0=s0, s1=s1, total_steps=K)(kp)
    assert int(n) == min(2 * s0, s1) + 1 and float(mu) == 0.0


def test_ict_curriculum():
    K, s0, s1 = 400_000, 10, 1280
    kp = _np_ict_k_prime(K, s0, s1)
    assert kp == 50_000
    for k in [0, kp - 1, kp, 3 * kp + 5, 7 * kp, 8 * kp, K, 10 * K, 2**31 - 1]:
        want = min(s0 * 2 ** (k // kp), s1) + 1
        assert int(S.ict_num_scales(k, K, s0, s1)) == want
    # The doubling values s0 + 1, 2·s0 + 1, 4·s0 + 1, …, s1 + 1, each for K' steps.
    ns = np.asarray(S.ict_num_scales(np.arange(0, 9 * kp, kp // 2), K, s0, s1))
    np.testing.assert_array_equal(ns[::2], [11, 21, 41, 81, 161, 321, 641, 1281, 1281])
    n, mu = S.Curriculum(kind="ict", s0=10, s1=1280, total_steps=K)(kp)
    assert int(n) == 21 and float(mu) == 0.0
    assert S.Curriculum(kind="ict", s0=10, s1=1280, total_steps=K).max_scales == 1281


def test_constant_curriculum_and_errors():
    n, mu = S.Curriculum(kind="constant", num_scales=18, mu0=0.95)(12345)
    assert int(n) == 18 and abs(float(mu) - 0.95) < 1e-7
    with pytest.raises(ValueError, match="at least 2"):
        S.Curriculum(kind="constant", num_scales=1)
    with pytest.raises(ValueError, match="mu0"):
        S.Curriculum(mu0=1.5)
    with pytest.raises(ValueError, match="mu0"):
        S.Curriculum(mu0=-0.1)
    with pytest.raises(ValueError, match="Unknown curriculum"):
        S.Curriculum(kind="linear")
