"""The Karras grid and the N(k), μ(k) curricula against hand-computed values (REFERENCE §1, §4)."""
import math

import numpy as np
import pytest

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
    import jax
    f = jax.jit(lambda i, n: S.karras_time(i, n, SIG))
    np.testing.assert_allclose(np.asarray(f(np.arange(18), 18)), np.asarray(S.karras_sigmas(18, SIG)),
                               rtol=1e-6)


def test_grid_needs_two_points():
    with pytest.raises(ValueError, match="at least 2"):
        S.karras_sigmas(1, SIG)


def _np_cm_n(k, K, s0, s1):
    return math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def test_cm_curriculum_worked_values():
    # REFERENCE §4: K = 800k, s0 = 2, s1 = 150: N(0) = 2, N(400k) = 107, N(800k) = 151.
    for k, want in [(0, 2), (400_000, 107), (800_000, 151)]:
        assert int(S.cm_num_scales(k, 800_000, 2, 150)) == want
    cur = S.Curriculum(kind="cm", s0=2, s1=150, mu0=0.9, total_steps=800_000)
    n, mu = cur(0)
    assert int(n) == 2 and abs(float(mu) - 0.81) < 1e-6  # the official code's μ(0)
    n, mu = S.Curriculum(kind="cm", s0=2, s1=150, mu0=0.9, total_steps=800_000, mu_form="paper")(0)
    assert abs(float(mu) - 0.9) < 1e-6


def test_cm_curriculum_matches_float64_sweep():
    ks = np.random.default_rng(0).integers(0, 800_001, size=200)
    for K, s0, s1 in [(800_000, 2, 150), (800_000, 2, 200), (1_000_000, 2, 150)]:
        got = [int(S.cm_num_scales(int(k), K, s0, s1)) for k in ks]
        want = [_np_cm_n(int(k), K, s0, s1) for k in ks]
        assert got == want
        for k, n in zip(ks[:20], want[:20]):
            mu = float(S.cm_target_mu(n, s0, 0.9, "code"))
            assert abs(mu - math.exp(s0 * math.log(0.9) / (n - 1))) < 1e-6


def test_ict_curriculum():
    K, s0, s1 = 400_000, 10, 1280
    kp = K // (math.floor(math.log2(s1 / s0)) + 1)  # = 50000
    assert kp == 50_000
    for k in [0, kp - 1, kp, 3 * kp + 5, 7 * kp, 8 * kp, K, 10 * K]:
        want = min(s0 * 2 ** (k // kp), s1) + 1
        assert int(S.ict_num_scales(k, K, s0, s1)) == want
    n, mu = S.Curriculum(kind="ict", s0=10, s1=1280, total_steps=K)(kp)
    assert int(n) == 21 and float(mu) == 0.0


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
