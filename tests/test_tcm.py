"""TCM's stage-2 mathematics against independent computations in float64: the combined model, the
loss reading the frozen stage-1 model below t′ with no gradient reaching it, the boundary fraction
and weight, and the truncated Student-t proposal against SciPy's distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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


# ---------------------------------------------------------------------------------------------------
# method=tcm: the pairs, the combined model of a run, the loop, the sampling command, the refusals.


def test_pairs_follow_ect_gaps_from_the_start_stage_with_the_ratio_cap():
    """tcm_pairs against NumPy float64: the first quarter of the batch at t = t′, the rest in
    [t′, T]; r = t − t·max(q^{−(s+1)}, 1 − ratio_limit)·(1 + k·sigmoid(−b·t)) at stage
    s = start_stage + ⌊step / stage_steps⌋, and 0 below σ_min."""
    table = tcm.truncated_student_t_table(0.0, 0.2, 0.01, 0.0, float(np.log(80.0)))
    kw = dict(table=table, t_prime=1.0, q=2.0, k=8.0, b=1.0, stage_steps=10, ratio_limit=0.999)
    kw.update(boundary_fraction=0.25, sigma_min=0.002)
    for step, start, scale in ((0, 0, 0.5), (25, 1, 2.0**-4), (5, 12, 1e-3)):  # the cap binds last
        t, r, boundary = tcm.tcm_pairs(jax.random.key(step), 64, step, start_stage=start, **kw)
        t, r, boundary = (np.asarray(a, np.float64) for a in (t, r, boundary))
        assert boundary[:16].all() and not boundary[16:].any()
        assert np.all(t[:16] == 1.0) and np.all((t >= 1.0 - 1e-6) & (t <= 80.0 + 1e-4))
        want = t - t * scale * (1.0 + 8.0 / (1.0 + np.exp(t)))
        want = np.where(want < 0.002, 0.0, want)
        np.testing.assert_allclose(r, want, rtol=1e-5, atol=1e-5)
        assert np.all((r >= 0) & (r < t))


def _mlp():
    from conftest import random_params

    from consistency_jax.networks import get_network, make_apply_fn

    module = get_network("mlp", hidden=16, depth=2)
    init = lambda: module.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
    shapes = jax.eval_shape(init)
    params = lambda seed: jax.tree.map(jnp.asarray, random_params(shapes, seed))
    return make_apply_fn(module), params


def test_model_consistency_function_is_the_student_from_t_prime_on_and_stage_one_below():
    """The combined model of a TCM run (``model_params``, ``model_consistency_fn``) against CM's f_θ
    of each parameter set, computed separately: whole calls above or below t′ and a mixed one."""
    from ml_collections import ConfigDict

    from consistency_jax import parameterization as P
    from consistency_jax.methods.tcm import model_consistency_fn, model_params

    apply_fn, params = _mlp()
    student, stage1 = params(1), params(2)
    sig = P.SigmaConfig()
    combined = model_params(ConfigDict({"tcm": {"t_prime": 1.0}}), student, stage1)
    fn = jax.jit(lambda p, x, s: model_consistency_fn(apply_fn, p, x, s, sig))
    f = jax.jit(lambda p, x, s: P.consistency_fn(apply_fn, p, x, s, sig))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 2)), jnp.float32)
    for sigma in ([80.0] * 6, [0.5] * 6, [0.01, 0.999, 1.0, 1.01, 5.0, 80.0]):
        s = jnp.asarray(sigma, jnp.float32)
        got = np.asarray(fn(combined, x, s))
        above = np.asarray(s) >= 1.0
        want = np.where(above[:, None], np.asarray(f(student, x, s)), np.asarray(f(stage1, x, s)))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        assert np.abs(np.asarray(f(student, x, s)) - np.asarray(f(stage1, x, s))).max() > 1e-2


def _stage_one(tmp_path, method="ect", seed=1):
    from conftest import tiny_toy_config, write_run

    return write_run(tmp_path / f"stage1_{method}_{seed}", tiny_toy_config(method), seed=seed)


def _tcm_config(stage1, **tcm_fields):
    from conftest import tiny_toy_config

    c = tiny_toy_config("tcm")
    c.init.workdir = stage1
    c.tcm.update(**{**dict(stage_steps=1, start_stage=0), **tcm_fields})
    return c


def test_stage_two_trains_from_its_stage_one_run_which_it_never_writes(tmp_path):
    """Through the real loop on the toy: θ_s starts from the stage-1 run's EMA, f_1 is that EMA
    frozen (bit for bit, unchanged by training), the run's checkpoints hold the student's arrays
    only, and the model evaluated and read back is the combined one."""
    import json

    from consistency_jax import experiment, loading

    stage1 = _stage_one(tmp_path)
    _, ema1, _ = loading.load_eval_params(stage1)
    before = sorted(p.name for p in (tmp_path / "stage1_ect_1" / "checkpoints").iterdir())
    c = _tcm_config(stage1)
    state = experiment.train_and_evaluate(c, str(tmp_path / "tcm"))
    assert int(state.step) == 4 and state.target_params is None
    for a, b in zip(jax.tree.leaves(state.teacher_params), jax.tree.leaves(ema1)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ema1))
    )
    assert moved > 1e-6  # θ_s trained away from its start
    assert sorted(p.name for p in (tmp_path / "stage1_ect_1" / "checkpoints").iterdir()) == before
    arrays = loading.read_arrays(str(tmp_path / "tcm"))
    n = len(jax.tree.leaves(ema1))
    assert not any("teacher" in k for k in arrays)
    # θ_s, its eval EMA, Adam's two moments: the stage-1 tree is not among them.
    assert sum(a.size for a in arrays.values()) < 4 * sum(x.size for x in jax.tree.leaves(ema1)) + 8
    assert len([k for k in arrays if "opt" not in k]) >= n
    row = json.loads((tmp_path / "tcm" / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(row["sw2_1step"]) and np.isfinite(row["sw2_2step"])
    assert np.isfinite(row["map_error"])
    _, model, step = loading.load_model_params(str(tmp_path / "tcm"))
    assert step == 4 and float(model["t_prime"]) == 1.0
    for a, b in zip(jax.tree.leaves(model["stage1"]), jax.tree.leaves(ema1)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, own, _ = loading.load_eval_params(str(tmp_path / "tcm"))
    for a, b in zip(jax.tree.leaves(model["student"]), jax.tree.leaves(own)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Stage 1 is read on every start: resuming with another stage-1 run is refused (config.init
    # is otherwise free to change on resume), before anything is built.
    from consistency_jax.checkpoint import CheckpointError

    other = _tcm_config(_stage_one(tmp_path, seed=2))
    other.train.num_steps = 8
    with pytest.raises(
        CheckpointError, match=r"init\.workdir: '.*stage1_ect_1' -> '.*stage1_ect_2'"
    ):
        experiment.train_and_evaluate(other, str(tmp_path / "tcm"))


def test_stage_one_runs_and_fields_are_checked_before_anything_is_built(tmp_path):
    from consistency_jax.build import validate
    from consistency_jax.checkpoint import CheckpointError

    stage1 = _stage_one(tmp_path)
    validate(_tcm_config(stage1))  # accepted
    c = _tcm_config("")
    with pytest.raises(ValueError, match=r"set config\.init\.workdir to the stage-1 run"):
        validate(c)
    c = _tcm_config(stage1)
    c.teacher.workdir = stage1
    with pytest.raises(
        ValueError, match=r"config\.teacher\.workdir=.* is not read by method='tcm'"
    ):
        validate(c)
    with pytest.raises(ValueError, match=r"config\.tcm\.t_prime=100\.0 must lie inside"):
        validate(_tcm_config(stage1, t_prime=100.0))
    with pytest.raises(ValueError, match=r"config\.tcm\.boundary_fraction must be in \[0, 1\)"):
        validate(_tcm_config(stage1, boundary_fraction=1.0))
    with pytest.raises(ValueError, match=r"config\.tcm\.start_stage must be an integer >= 0"):
        validate(_tcm_config(stage1, start_stage=-1))
    edm = _stage_one(tmp_path, "edm")
    with pytest.raises(CheckpointError, match=r"method='edm' run, .*not a denoiser"):
        validate(_tcm_config(edm))
    with pytest.raises(CheckpointError, match=r"holds no checkpoint"):
        validate(_tcm_config(str(tmp_path / "nowhere")))


def test_a_trigflow_stage_one_is_refused_naming_why(tmp_path):
    from consistency_jax.build import validate
    from consistency_jax.checkpoint import CheckpointError

    sct = _stage_one(tmp_path, "sct")
    c = _tcm_config(sct)  # refused before its network (with a weighting head) is compared
    with pytest.raises(CheckpointError, match=r"method='sct' run, .*another consistency function"):
        validate(c)


def _digits_config(method, data_dir):
    from conftest import load_config

    c = load_config("digits", f"method={method}")
    c.data.data_dir = data_dir
    c.data.batch_size = 8
    c.model.kwargs = dict(nf=4, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    return c


def test_sampling_command_samples_the_combined_model(digits_data_dir, tmp_path):
    """Digits runs written directly: TCM runs whose student θ_s equals a plain ECT run's θ (same
    random weights), over a stage-1 run equal to θ_s or not. Through the sampling command, with the
    same seed: one step and two steps whose second time is ≥ t′ read only θ_s (the ECT run's samples);
    a second time < t′ reads the stage-1 model (the ECT run's samples only when it equals θ_s; the
    stage-1 run equal to θ_s is sampled only there, where it is read)."""
    from conftest import write_run

    from consistency_jax import sample as sample_lib

    def run(method, name, seed, stage1=None):
        c = _digits_config(method, digits_data_dir)
        if stage1:
            c.init.workdir = stage1
        return write_run(tmp_path / name, c, seed=seed)

    plain = run("ect", "plain", 1)
    same = run("tcm", "tcm_same", 1, stage1=run("ect", "stage1_same", 1))
    other = run("tcm", "tcm_other", 1, stage1=run("ect", "stage1_other", 2))

    def samples(workdir, name, **kw):
        request = sample_lib.SampleRequest(
            workdir=workdir,
            out=str(tmp_path / "out" / name),
            num_samples=8,
            examples_per_shard=8,
            per_device_batch=8,
            seed=3,
            clip=0.0,
            **kw,
        )
        with np.load(sample_lib.run(request)["npz"]) as z:
            return z["arr_0"].astype(np.int64)

    for label, kw in (
        ("one", {}),
        ("two_high", dict(sampler="multistep", ts=(80.0, 2.0))),
        ("two_low", dict(sampler="multistep", ts=(80.0, 0.5))),
    ):
        want = samples(plain, f"plain_{label}", **kw)
        assert want.std() > 1  # random weights give images, not a constant
        got = samples(other, f"other_{label}", **kw)
        if label == "two_low":
            assert np.abs(got - want).max() > 8  # the stage-1 model answered below t′
            # ... and it is the stage-1 run's model, sampled as θ_s is: equal to θ_s, same images
            np.testing.assert_array_equal(samples(same, f"same_{label}", **kw), want)
        else:
            np.testing.assert_array_equal(got, want)
