"""docs/adding_a_method.md: its example method, extracted from the guide and run as the file it shows
(registered as dropping it into consistency_jax/methods/ would), has its loss, its config block, its
toy preset and its check, trains through the main loop and samples."""

import json
import pathlib
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from consistency_jax import methods, samplers
from consistency_jax import parameterization as P
from consistency_jax.methods import Frozen, base

GUIDE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "adding_a_method.md"
NAME = "pair_ct"


@pytest.fixture
def pair_ct():
    """The guide's method, registered for one test and removed afterwards."""
    (code,) = [
        b
        for b in re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
        if "consistency_jax/methods/pair_ct.py" in b
    ]
    module = types.ModuleType(f"consistency_jax.methods.{NAME}")
    exec(compile(code, str(GUIDE), "exec"), module.__dict__)  # noqa: S102 - our own guide
    try:
        yield module
    finally:
        base._REGISTRY.pop(NAME, None)
        sys.modules.pop(f"consistency_jax.methods.{NAME}", None)


def test_its_config_block_preset_and_check(pair_ct):
    from consistency_jax import build

    assert NAME in methods.names()
    c = load_config("toy", f"method={NAME}")
    assert c.pair_ct.to_dict() == {"ratio": 0.95, "p_mean": -1.1, "p_std": 2.0}  # the toy preset
    assert c.eval.two_step_time == 0.5
    assert load_config("digits", f"method={NAME}").pair_ct.ratio == 0.9  # no digits preset
    assert "pair_ct" in methods.schema()  # the block is part of every run's schema
    c.pair_ct.ratio = 1.0
    with pytest.raises(ValueError, match=r"config\.pair_ct\.ratio must lie in \(0, 1\)"):
        build.validate(c)
    with pytest.raises(ValueError, match="has no settings for the data set 'cifar10'"):
        load_config("cifar10", f"method={NAME}")


def test_its_loss_against_numpy(pair_ct):
    """The loss of a linear network F(x, c) = x·W + c·b against the same draws in NumPy float64."""
    sig = P.SigmaConfig()
    w = jnp.array([[0.7, -0.2], [0.1, 1.3]])
    bias = jnp.array([0.3, -0.5])
    apply_fn = lambda p, x, c, **_: x @ p["w"] + c[:, None] * p["b"]
    params = {"w": w, "b": bias}
    method = pair_ct.PairCT(apply_fn, sig, ratio=0.9)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((16, 2)), jnp.float32)
    rng = jax.random.key(3)
    loss, aux = method.loss(params, Frozen(target=params), {"image": x}, rng, jnp.int32(0))

    rng_t, rng_z = jax.random.split(rng)
    t = np.exp(-1.1 + 2.0 * np.asarray(jax.random.normal(rng_t, (16,)), np.float64))
    t = np.clip(t, sig.sigma_min / 0.9, sig.sigma_max)
    r = 0.9 * t
    z = np.asarray(jax.random.normal(rng_z, (16, 2)), np.float64)
    xd, wd, bd = (np.asarray(a, np.float64) for a in (x, w, bias))
    sd, eps = sig.sigma_data, sig.sigma_min

    def f(xs, s):  # CM Eq. 5–6 with jcm's c_noise = 0.25·ln σ
        c_skip = sd**2 / ((s - eps) ** 2 + sd**2)
        c_out = (s - eps) * sd / np.sqrt(s**2 + sd**2)
        c_in = 1.0 / np.sqrt(s**2 + sd**2)
        out = (c_in[:, None] * xs) @ wd + (0.25 * np.log(s))[:, None] * bd
        return c_skip[:, None] * xs + c_out[:, None] * out

    d = np.mean((f(xd + t[:, None] * z, t) - f(xd + r[:, None] * z, r)) ** 2, axis=-1)
    np.testing.assert_allclose(float(loss), np.mean(d / (t - r)), rtol=2e-4)
    np.testing.assert_allclose(float(aux["mean_t"]), t.mean(), rtol=1e-5)


def test_it_trains_on_the_toy_and_samples(pair_ct, tmp_path):
    from consistency_jax import build, experiment

    c = load_config("toy", f"method={NAME}")
    c.model.kwargs = dict(hidden=32, depth=2)
    c.data.batch_size = 64
    c.train.update(num_steps=40, log_every=20, eval_every=40, ema_rates=(0.9,))
    c.optim.update(warmup_steps=0, decay="constant", lr=3e-3)
    c.eval.num_samples = 128
    c.checkpoint.every = 40
    state = experiment.train_and_evaluate(c, str(tmp_path))
    assert int(state.step) == 40 and state.target_params is None  # θ⁻ = stopgrad θ, no copy
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    figures = json.loads(line)
    assert np.isfinite(figures["sw2_1step"]) and np.isfinite(figures["sw2_2step"])
    # Sampling the trained model in two steps (CM Algorithm 1) with its consistency function.
    spec = methods.get(NAME)
    setup = build.validate(c)
    _, apply_fn, _ = build.build_network(c, (2,))
    sample = samplers.make_sampler(
        apply_fn,
        setup.sigmas,
        (setup.sigmas.sigma_max, c.eval.two_step_time),
        (32, 2),
        consistency_fn=spec.consistency_fn,
    )
    x = np.asarray(sample(state.eval_params(0.9), jax.random.key(0), None))
    assert x.shape == (32, 2) and np.all(np.isfinite(x)) and x.std() > 0
