"""ECT (Geng et al. 2024): the (t, r) pairs and their stages against NumPy formulas, the loss against a
float64 NumPy re-implementation (same z, same dropout key, gradient only through f_θ(x_t, t)), the
config checks, and the start from another run's EMA (config.init) through the main loop."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config, tiny_toy_config, write_toy_edm_run, x64

from consistency_jax import build, loading
from consistency_jax import experiment as E
from consistency_jax import parameterization as P
from consistency_jax.build import validate
from consistency_jax.methods import ect as ECT

SIG = P.SigmaConfig()


def _np_r(t, s, q, k, b):
    """ECT's r = max(0, t·(1 − q^{−(s+1)}·(1 + k·sigmoid(−b·t)))), written out in NumPy."""
    sig = 1.0 / (1.0 + np.exp(b * t))
    return np.maximum(0.0, t * (1.0 - q ** (-(s + 1.0)) * (1.0 + k * sig)))


def test_r_mapping_and_stages_against_numpy():
    t = np.geomspace(0.002, 80.0, 41)
    with x64():
        for q in (2.0, 4.0):
            gaps = []
            for s in range(6):
                r = np.asarray(ECT.ect_r(jnp.asarray(t), jnp.int32(s), q=q, k=8.0, b=1.0))
                np.testing.assert_allclose(r, _np_r(t, s, q, 8.0, 1.0), rtol=1e-13, atol=1e-15)
                assert (r >= 0).all() and (r < t).all()
                gap = np.asarray(ECT.ect_gap(jnp.asarray(t), jnp.int32(s), q=q, k=8.0, b=1.0))
                gaps.append(gap)
            for a, b_ in zip(gaps, gaps[1:]):  # Δt is divided by q exactly at every stage
                np.testing.assert_array_equal(b_ * q, a)
        # Stage 0, q = 2: 1 − ½(1 + 8·sigmoid(−t)) < 0 for small t, so r = 0 (a denoising pair)...
        r0 = np.asarray(ECT.ect_r(jnp.asarray(t), jnp.int32(0), q=2.0, k=8.0, b=1.0))
        assert (r0[t < 1.0] == 0).all() and (r0[t > 5.0] > 0).all()
        # ... and by stage 3 most pairs have r > 0.
        r3 = np.asarray(ECT.ect_r(jnp.asarray(t), jnp.int32(3), q=2.0, k=8.0, b=1.0))
        assert (r3[t > 0.01] > 0).all()
    steps = jnp.asarray([0, 1, 24_999, 25_000, 49_999, 50_000, 400_000])
    np.testing.assert_array_equal(ECT.ect_stage(steps, 25_000), [0, 0, 0, 1, 1, 2, 16])
    m = ECT.EasyConsistencyTuning(apply_fn=None, sigmas=SIG, q=2.0, stage_steps=10)
    sched = m.schedule(jnp.int32(35))
    assert int(sched["stage"]) == 3 and float(sched["dt_scale"]) == 2.0**-4


def test_pairs_follow_the_lognormal_and_the_stage_of_the_step():
    kw = dict(sigmas=SIG, q=2.0, k=8.0, b=1.0, stage_steps=100, p_mean=-1.1, p_std=2.0)
    with x64():
        key = jax.random.key(3)
        t, r = (
            np.asarray(a)
            for a in ECT.ect_pairs(key, 20_000, jnp.int32(50), dtype=jnp.float64, **kw)
        )
        t2, r2 = (
            np.asarray(a)
            for a in ECT.ect_pairs(key, 20_000, jnp.int32(250), dtype=jnp.float64, **kw)
        )
        raw = np.exp(-1.1 + 2.0 * np.asarray(jax.random.normal(key, (20_000,), jnp.float64)))
        np.testing.assert_allclose(t, np.clip(raw, 0.002, 80.0), rtol=1e-14)
        want = _np_r(t, 0, 2.0, 8.0, 1.0)  # step 50 -> stage 0
        np.testing.assert_allclose(r, np.where(want < 0.002, 0.0, want), rtol=1e-13, atol=1e-15)
    assert (r >= 0).all() and (r < t).all() and ((r == 0) | (r >= 0.002)).all()
    assert abs(np.median(np.log(t)) + 1.1) < 0.05  # clipping leaves the median of ln t alone
    # Stage 0: r = 0 exactly when sigmoid(−t) > 1/8, i.e. t < ln 7: P(ln t < ln ln 7) ≈ 0.81.
    assert 0.78 < np.mean(r == 0) < 0.84 and (r[t > 2.5] > 0).all()
    np.testing.assert_array_equal(t2, t)  # the same t at stage 2: ...
    assert np.mean(r2 == 0) < 0.03  # ... r = 0 only below ε (1 − 5/8 > 0)


def _noisy_linear(params, x, c_noise, *, labels=None, train=False, rng=None):
    """F(x) = x·W + c_noise·v, plus N(0, 0.1²) "dropout" noise drawn from the key in train mode."""
    out = x @ params["w"] + c_noise[:, None] * params["v"]
    return out + 0.1 * jax.random.normal(rng, x.shape, x.dtype) if train else out


def _np_f(params, x, t, noise):
    """f_θ(x, t) of CM Eq. 5–6 in NumPy (ε = 0.002, σ_d = 0.5, c_noise = ¼ ln t), exact at t = ε."""
    eps, sd = 0.002, 0.5
    tb = t[:, None]
    c_skip = sd**2 / ((tb - eps) ** 2 + sd**2)
    c_out = sd * (tb - eps) / np.sqrt(sd**2 + tb**2)
    c_in = 1.0 / np.sqrt(sd**2 + tb**2)
    out = (c_in * x) @ params["w"] + 0.25 * np.log(tb) * params["v"] + 0.1 * noise
    return np.where(tb <= eps, x, c_skip * x + c_out * out)


def _problem():
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 3)) * 0.5, "v": rng.standard_normal(3)}
    x0, z = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    t = np.array([0.5, 3.0, 0.01, 20.0, 0.002])
    r = np.array([0.2, 0.0, 0.001, 19.0, 0.0])  # r = 0, r < ε (counts as 0), r > 0; t = ε
    return params, x0, z, t, r


def _np_loss(params, x0, z, t, r, noise, c):
    r = np.where(r < 0.002, 0.0, r)
    online = _np_f(params, x0 + t[:, None] * z, t, noise)
    target = np.where(
        r[:, None] > 0,
        _np_f(params, x0 + np.maximum(r, 1e-300)[:, None] * z, np.maximum(r, 1e-300), noise),
        x0,
    )
    d = np.sqrt(np.sum((online - target) ** 2, axis=-1) + c * c) - c
    return np.mean(d / (t - r)), d, target


@pytest.mark.parametrize("c", [0.0, 0.3])
def test_loss_matches_float64_numpy_with_one_dropout_key(c):
    params, x0, z, t, r = _problem()
    key = jax.random.key(7)
    with x64():
        noise = np.asarray(jax.random.normal(key, x0.shape, jnp.float64))  # what the key draws
        jp = jax.tree.map(jnp.asarray, params)
        loss, aux = ECT.ect_loss(
            _noisy_linear,
            SIG,
            jp,
            jp,
            jnp.asarray(x0),
            jnp.asarray(z),
            jnp.asarray(t),
            jnp.asarray(r),
            huber_c=c,
            rng=key,
        )
        assert loss.dtype == jnp.float64
    want, d, _ = _np_loss(params, x0, z, t, r, noise, c)
    assert float(loss) == pytest.approx(want, rel=1e-12)
    assert float(aux["distance"]) == pytest.approx(np.mean(d), rel=1e-12)
    assert float(aux["frac_r0"]) == pytest.approx(0.6)
    # Another key for the target pass would give another value.
    other = np.asarray(jax.random.normal(jax.random.key(8), x0.shape))
    r_eff = np.where(r < 0.002, 0.0, r)
    online = _np_f(params, x0 + t[:, None] * z, t, noise)
    mixed_target = _np_f(params, x0 + r_eff[:, None] * z, np.maximum(r_eff, 0.002), other)
    mixed = (
        np.sqrt(np.sum((online - np.where(r_eff[:, None] > 0, mixed_target, x0)) ** 2, -1) + c * c)
        - c
    )
    assert abs(np.mean(mixed / (t - r_eff)) - want) > 1e-6


def test_gradient_flows_only_through_the_online_pass():
    params, x0, z, t, r = _problem()
    key = jax.random.key(7)
    with x64():
        noise = np.asarray(jax.random.normal(key, x0.shape, jnp.float64))
        _, _, target = _np_loss(params, x0, z, t, r, noise, 0.0)
        jp = jax.tree.map(jnp.asarray, params)
        args = (jnp.asarray(x0), jnp.asarray(z), jnp.asarray(t), jnp.asarray(r))
        # ECT passes θ itself as θ⁻ (Frozen.target = stopgrad θ); differentiate both arguments.
        g = jax.grad(
            lambda p: ECT.ect_loss(_noisy_linear, SIG, p, p, *args, huber_c=0.0, rng=key)[0]
        )(jp)
        r_eff = np.where(r < 0.002, 0.0, r)

        def online_only(p):  # the target as a constant computed in NumPy
            f = P.consistency_fn(
                _noisy_linear,
                p,
                args[0] + args[2][:, None] * args[1],
                args[2],
                SIG,
                train=True,
                rng=key,
            )
            d = jnp.sqrt(jnp.sum((f - jnp.asarray(target)) ** 2, axis=-1))
            return jnp.mean(d / jnp.asarray(t - r_eff))

        def through_both(p):  # what a missing stop-gradient would give
            tgt = P.consistency_fn(
                _noisy_linear,
                p,
                args[0] + jnp.asarray(r_eff)[:, None] * args[1],
                jnp.maximum(jnp.asarray(r_eff), 0.002),
                SIG,
                train=True,
                rng=key,
            )
            tgt = jnp.where(jnp.asarray(r_eff)[:, None] > 0, tgt, args[0])
            f = P.consistency_fn(
                _noisy_linear,
                p,
                args[0] + args[2][:, None] * args[1],
                args[2],
                SIG,
                train=True,
                rng=key,
            )
            return jnp.mean(jnp.sqrt(jnp.sum((f - tgt) ** 2, axis=-1)) / jnp.asarray(t - r_eff))

        want, wrong = jax.grad(online_only)(jp), jax.grad(through_both)(jp)
    for name in ("w", "v"):
        np.testing.assert_allclose(
            np.asarray(g[name]), np.asarray(want[name]), rtol=1e-11, atol=1e-14
        )
        assert np.abs(np.asarray(g[name]) - np.asarray(wrong[name])).max() > 1e-4


_toy = tiny_toy_config


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("ect.q", 1.0, r"config\.ect\.q must be > 1"),
        ("ect.k", -1.0, r"config\.ect\.k must be >= 0"),
        ("ect.p_std", 0.0, r"config\.ect\.p_std must be > 0"),
        ("ect.huber_c", -0.1, r"config\.ect\.huber_c must be >= 0"),
        ("ect.stage_steps", 0, r"config\.ect\.stage_steps must be an integer >= 1"),
        (
            "init.ema_rate",
            0.9,
            r"config\.init\.ema_rate=0\.9 is set but config\.init\.workdir is empty",
        ),
        ("init.ema_rate", 1.0, r"config\.init\.ema_rate must lie in \[0, 1\)"),
    ],
)
def test_config_checks_name_the_field(field, value, message):
    c = _toy("ect")
    block, name = field.split(".")
    c[block][name] = value
    with pytest.raises(ValueError, match=message):
        validate(c)


def test_ect_starts_from_another_runs_ema_trains_and_resumes(tmp_path, caplog, monkeypatch):
    """An ECT run with config.init.workdir (a toy EDM run) starts with θ and its eval EMA equal to the
    source's EMA, trains through two stages and writes metrics; resuming does not read the source; a
    source with another network is refused before anything is built."""
    source = tmp_path / "edm"
    write_toy_edm_run(source)
    src = loading.read_arrays(str(source))
    src_ema = {k.split("/", 2)[2]: v for k, v in src.items() if k.startswith("ema/0.9/")}
    assert src_ema and not any(
        np.array_equal(v, src[f"state/params/{k}"]) for k, v in src_ema.items()
    )

    c = _toy("ect")
    c.ect.stage_steps = 2
    c.init.workdir = str(source)
    setup = validate(c)
    # The train state as the loop builds it: θ and the eval EMA are the source's EMA, exactly.
    tx, _ = build.make_optimizer(c)
    _, apply_fn, init = build.build_network(c, (2,))
    method = build.build_method(c, setup.spec, apply_fn, setup.sigmas, (2,), None, None)
    start = build.load_init_params(c, init, setup.mesh)
    state, _ = build.init_state(
        init, tx, method, setup.ema_rates, jax.random.key(0), setup.mesh, params=start
    )
    flat = lambda tree: {
        jax.tree_util.keystr(p).replace("['", "").replace("']", "/").rstrip("/"): v
        for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    for tree in (state.params, state.ema_params["0.9"]):
        got = flat(tree)
        assert sorted(got) == sorted(src_ema)
        for k, v in src_ema.items():
            np.testing.assert_array_equal(np.asarray(got[k]), v)

    run = tmp_path / "ect"
    # The source given relative to the working directory is stored absolute, so that the run can
    # be resumed (and sampled) from anywhere.
    monkeypatch.chdir(tmp_path)
    c.init.workdir = "edm"
    with caplog.at_level(
        logging.INFO, logger="absl"
    ):  # absl flags parsed by another test set its level
        final = E.train_and_evaluate(c, str(run))
    assert loading.eval_params_metadata(str(run))[0].init.workdir == str(source)
    assert c.init.workdir == "edm"  # the caller's config is not changed
    monkeypatch.chdir(run)
    c.init.workdir = str(source)
    assert (
        "config.init: θ, θ⁻ (if kept) and the eval EMAs start from the slowest EMA" in caplog.text
    )
    assert int(final.step) == 4 and final.target_params is None
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["step"] == 4 and np.isfinite(line["sw2_1step"]) and np.isfinite(line["sw2_2step"])

    # Resuming reads this run's checkpoint, never the source (the run is complete: no step left).
    def refuse(*a, **k):
        raise AssertionError("config.init read on resume")

    monkeypatch.setattr(build, "load_init_params", refuse)
    resumed = E.train_and_evaluate(c, str(run))
    assert int(resumed.step) == 4
    np.testing.assert_array_equal(
        np.asarray(jax.tree.leaves(resumed.params)[0]), np.asarray(jax.tree.leaves(final.params)[0])
    )

    # Another network: refused by the validation, naming the fields, before anything is written.
    other = _toy("ect")
    other.model.kwargs = dict(hidden=16, depth=1)
    other.init.workdir = str(source)
    with pytest.raises(
        ValueError,
        match=r"another network than this run; differing fields "
        r"\(source -> this run\): model\.kwargs\.hidden: 8 -> 16\.",
    ):
        E.train_and_evaluate(other, str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()
    other.init.workdir = str(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"config\.init\.workdir='.*missing'.*No checkpoint"):
        validate(other)


@pytest.mark.parametrize(
    "name,want",
    [
        (
            "cifar10",
            dict(
                q=2.0,
                k=8.0,
                b=1.0,
                stage_steps=25_000,
                huber_c=0.0,
                batch=128,
                opt="radam",
                lr=1e-4,
                dropout=0.2,
                emas=(0.9999,),
            ),
        ),
        ("imagenet64", dict(q=4.0)),
        ("digits", dict(q=2.0, stage_steps=500)),
    ],
)
def test_ect_paper_configs(name, want):
    """ECT's CIFAR-10 settings (REFERENCE §5c / ECT §4), q = 4 on ImageNet 64, several digits stages."""
    c = load_config(name, "method=ect")
    got = dict(
        c.ect.to_dict(),
        batch=c.data.batch_size,
        opt=c.optim.name,
        lr=c.optim.lr,
        dropout=c.model.kwargs.get("dropout"),
        emas=tuple(c.train.ema_rates),
    )
    assert c.method == "ect" and c.init.workdir == ""  # the EDM run is given on the command line
    assert {k: got[k] for k in want} == want
    assert c.train.num_steps // c.ect.stage_steps >= 4  # the run goes through several stages
