"""The train step: θ⁻ / EMA arithmetic, one compile per shape, non-finite handling, a short run."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from consistency_jax import losses as L
from consistency_jax import parameterization as P
from consistency_jax import samplers, toy
from consistency_jax import schedules as S
from consistency_jax.methods import Frozen
from consistency_jax.methods.cd import ConsistencyDistillation
from consistency_jax.methods.ct import ConsistencyTraining
from consistency_jax.methods.edm import EDMDenoiser
from consistency_jax.metrics import sliced_wasserstein2
from consistency_jax.networks import get_network, make_apply_fn
from consistency_jax.train import make_train_step
from consistency_jax.train_state import TrainState, ema_update

SIG = P.SigmaConfig()


def _mlp(hidden=32):
    net = get_network("mlp", hidden=hidden, depth=2)
    params = net.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
    return make_apply_fn(net), params


_LOSS_CFG = L.LossConfig()


def _ct(apply_fn, cur, distance=L.l2_distance, cfg=_LOSS_CFG):
    return ConsistencyTraining(
        apply_fn=apply_fn, sigmas=SIG, curriculum=cur, loss_cfg=cfg, distance=distance
    )


def _batch(seed, n=64):
    return {
        "image": jnp.asarray(toy.ring_mixture().sample(np.random.default_rng(seed), n), jnp.float32)
    }


def test_ema_update_arithmetic():
    a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
    b = {"w": jnp.array([5.0, -2.0]), "b": jnp.array(1.0)}
    out = ema_update(a, b, 0.9)
    np.testing.assert_allclose(
        out["w"], 0.9 * np.array([1, 2]) + 0.1 * np.array([5, -2]), rtol=1e-6
    )
    np.testing.assert_allclose(out["b"], 0.9 * 3 + 0.1 * 1, rtol=1e-6)


def test_train_step_updates_params_target_and_emas():
    """θ by the optimizer (plain SGD here), then θ⁻ ← μθ⁻ + (1−μ)θ and each EMA likewise (NumPy)."""
    apply_fn, params = _mlp()
    lr = 0.1
    tx = optax.sgd(lr)
    cur = S.Curriculum(kind="cm", s0=2, s1=20, mu0=0.9, total_steps=100)
    loss_fn = _ct(apply_fn, cur, L.l2_distance)
    state = TrainState.create(params, tx, ema_rates=(0.99, 0.5), use_target=True)
    # make θ⁻ and the EMAs differ from θ so that the arithmetic is visible
    state = state.replace(
        target_params=jax.tree.map(lambda x: x * 0.5, params),
        ema_params={k: jax.tree.map(lambda x: x - 0.1, params) for k in state.ema_params},
    )
    state = state.replace(step=jnp.int32(37))
    batch, rng = _batch(0), jax.random.key(5)
    step = jax.jit(make_train_step(loss_fn, tx))
    new, metrics = step(state, batch, rng)

    n, mu = cur(37)
    grads = jax.grad(
        lambda p: loss_fn.loss(
            p, Frozen(target=state.target_params), batch, jax.random.fold_in(rng, 37), jnp.int32(37)
        )[0]
    )(params)
    flat = lambda t: np.concatenate(
        [np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)]
    )
    want_p = flat(params) - lr * flat(grads)
    np.testing.assert_allclose(flat(new.params), want_p, rtol=1e-5, atol=1e-6)
    mu = float(mu)
    assert abs(mu - np.exp(2 * np.log(0.9) / (int(n) - 1))) < 1e-6
    np.testing.assert_allclose(
        flat(new.target_params),
        mu * flat(state.target_params) + (1 - mu) * want_p,
        rtol=1e-5,
        atol=1e-6,
    )
    for key, rate in (("0.99", 0.99), ("0.5", 0.5)):
        np.testing.assert_allclose(
            flat(new.ema_params[key]),
            rate * flat(state.ema_params[key]) + (1 - rate) * want_p,
            rtol=1e-5,
            atol=1e-6,
        )
    assert int(new.step) == 38 and int(metrics["num_scales"]) == int(n)
    np.testing.assert_allclose(float(metrics["grad_norm"]), np.linalg.norm(flat(grads)), rtol=1e-4)


def test_mu_zero_keeps_no_target_copy():
    apply_fn, params = _mlp()
    cur = S.Curriculum(kind="ict", s0=10, s1=80, total_steps=100)
    assert not cur.uses_target_ema
    state = TrainState.create(params, optax.adam(1e-3), use_target=cur.uses_target_ema)
    assert state.target_params is None


def test_train_step_compiles_once_for_a_fixed_shape():
    apply_fn, params = _mlp()
    traces = []

    def counting_apply(*a, **k):
        traces.append(1)
        return apply_fn(*a, **k)

    cur = S.Curriculum(kind="cm", s0=2, s1=150, mu0=0.9, total_steps=20)
    loss_fn = _ct(counting_apply, cur, L.l2_distance)
    tx = optax.adam(1e-3)
    step = jax.jit(make_train_step(loss_fn, tx), donate_argnums=0)
    state = TrainState.create(params, tx, ema_rates=(0.9,), use_target=True)
    ns = set()
    for k in range(6):  # N(k) changes with k: it must not retrace
        state, m = step(state, _batch(k), jax.random.key(0))
        ns.add(int(m["num_scales"]))
    assert len(ns) > 1
    assert len(traces) == 2  # one trace of the step = two network calls (online + target)
    assert step._cache_size() == 1


def test_nonfinite_steps_are_reported_or_skipped():
    apply_fn, params = _mlp()
    cur = S.Curriculum(kind="constant", num_scales=10)
    loss_fn = _ct(apply_fn, cur, L.l2_distance)
    tx = optax.adam(1e-3)
    state = TrainState.create(params, tx, ema_rates=(0.9,), use_target=False)
    bad = {"image": jnp.full((8, 2), jnp.nan)}
    _, m = jax.jit(make_train_step(loss_fn, tx))(state, bad, jax.random.key(0))
    assert int(m["finite"]) == 0
    new, m = jax.jit(make_train_step(loss_fn, tx, skip_nonfinite=True))(
        state, bad, jax.random.key(0)
    )
    assert int(m["finite"]) == 0 and int(new.step) == 1
    for a, b in zip(
        jax.tree.leaves((new.params, new.ema_params, new.opt_state)),
        jax.tree.leaves((state.params, state.ema_params, state.opt_state)),
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("method", ["ct", "cd"])
def test_short_toy_training_lowers_distance_to_data(method):
    apply_fn, params = _mlp(hidden=64)
    gm = toy.ring_mixture()
    if method == "ct":
        cur = S.Curriculum(kind="ict", s0=10, s1=160, total_steps=1500)
        cfg = L.LossConfig(distance="pseudo_huber", weighting="ict", index_sampling="lognormal")
        loss_fn = _ct(apply_fn, cur, L.make_distance(cfg.distance, (2,)), cfg)
    else:
        cur = S.Curriculum(kind="constant", num_scales=18)
        cfg = L.LossConfig(solver="heun")
        loss_fn = ConsistencyDistillation(
            apply_fn=apply_fn,
            sigmas=SIG,
            curriculum=cur,
            loss_cfg=cfg,
            distance=L.l2_distance,
            teacher=toy.exact_denoiser,
        )
    tx = optax.adam(optax.warmup_cosine_decay_schedule(0, 2e-3, 100, 1500, 2e-5))
    state = TrainState.create(params, tx, use_target=False, teacher_params=gm.as_params())
    train_step = make_train_step(loss_fn, tx)

    # 100 steps per call (lax.scan; the MLP has no convolution to slow it on XLA:CPU, and
    # test_multi_step_scan_equals_the_steps_one_by_one checks the scan against single steps).
    @functools.partial(jax.jit, donate_argnums=0)
    def steps(state, images):
        body = lambda st, x: (train_step(st, {"image": x}, jax.random.key(1))[0], None)
        return jax.lax.scan(body, state, images)[0]

    data = gm.sample(np.random.default_rng(99), 1000)

    def dist(p):
        x = samplers.onestep_sample(apply_fn, p, jax.random.key(3), (1000, 2), SIG)
        return sliced_wasserstein2(np.asarray(x), data)

    before = dist(params)
    rng = np.random.default_rng(0)
    for _ in range(15):
        batches = np.stack([gm.sample(rng, 128) for _ in range(100)]).astype(np.float32)
        state = steps(state, batches)
    assert int(state.step) == 1500
    after = dist(state.params)
    floor = sliced_wasserstein2(gm.sample(np.random.default_rng(7), 1000), data)
    assert after < 0.4 * before, (before, after)
    if method == "ct":  # iCT's pseudo-Huber / 1/Δt recipe converges fastest on this budget
        assert after < 6 * floor, (after, floor)


def test_a_weighted_distance_travels_in_the_state_not_as_compiled_constants():
    """A distance with weights (LPIPS-like) in TrainState.distance gives the same step as the same
    distance closed over, but its weights are inputs of the compiled step rather than constants."""
    import flax

    class WeightedL2(flax.struct.PyTreeNode):
        w: jax.Array

        def __call__(self, a, b):
            return jnp.mean(((a - b) * self.w) ** 2, axis=-1)

    apply_fn, params = _mlp()
    dist = WeightedL2(w=jnp.array([[0.5, 1.5]]))
    cur = S.Curriculum(kind="constant", num_scales=10)
    loss_fn = _ct(apply_fn, cur, dist)
    tx = optax.sgd(0.1)
    closed = TrainState.create(params, tx, use_target=False)
    carried = TrainState.create(params, tx, use_target=False, distance=dist)
    step = make_train_step(loss_fn, tx)
    batch, rng = _batch(3), jax.random.key(2)
    a, ma = jax.jit(step)(closed, batch, rng)
    b, mb = jax.jit(step)(carried, batch, rng)
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-6)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
    # the weights are an argument of the step, not a constant of its program
    jaxpr = jax.make_jaxpr(step)(carried, batch, rng)
    assert not any(getattr(c, "shape", None) == dist.w.shape for c in jaxpr.consts)
    jaxpr_closed = jax.make_jaxpr(step)(closed, batch, rng)
    assert any(getattr(c, "shape", None) == dist.w.shape for c in jaxpr_closed.consts)


def test_multi_step_scan_equals_the_steps_one_by_one():
    """make_multi_step(k): one call = k calls of the step (same keys, curriculum, EMAs), metrics
    stacked; across a change of N(k) (s0=2 → more scales within the 6 steps)."""
    from consistency_jax.train import make_multi_step

    apply_fn, params = _mlp()
    tx = optax.adam(1e-3)
    cur = S.Curriculum(kind="cm", s0=2, s1=150, mu0=0.9, total_steps=12)
    loss_fn = _ct(apply_fn, cur, L.l2_distance)
    step = make_train_step(loss_fn, tx)
    batches = [_batch(s, 32) for s in range(6)]
    rng = jax.random.key(4)
    state = TrainState.create(params, tx, ema_rates=(0.9,), use_target=True)
    one, per_step = state, []
    jitted = jax.jit(step)
    for b in batches:
        one, m = jitted(one, b, rng)
        per_step.append(m)
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *batches)
    many, metrics = jax.jit(make_multi_step(step, 6))(state, stacked, rng)
    assert int(many.step) == 6 and metrics["loss"].shape == (6,)
    assert len({int(m["num_scales"]) for m in per_step}) > 1  # the curriculum moved inside the scan
    for a, b in zip(jax.tree.leaves(many), jax.tree.leaves(one)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
    for key in ("loss", "grad_norm", "num_scales", "mu"):
        np.testing.assert_allclose(metrics[key], [m[key] for m in per_step], rtol=2e-5)
    assert make_multi_step(step, 1) is step
    with pytest.raises(ValueError, match="steps_per_call must be a positive integer"):
        make_multi_step(step, 0)
    with pytest.raises(ValueError, match="stacked on a leading axis of 6"):
        make_multi_step(step, 6)(state, jax.tree.map(lambda x: x[:5], stacked), rng)


def test_split_microbatches_is_strided():
    from consistency_jax.train import split_microbatches

    x = np.arange(24).reshape(12, 2)
    got = np.asarray(split_microbatches(jnp.asarray(x), 3))
    np.testing.assert_array_equal(got, np.stack([x[i::3] for i in range(3)]))
    with pytest.raises(ValueError, match="12 rows does not split into 5"):
        split_microbatches(jnp.asarray(x), 5)


@pytest.mark.parametrize("method", ["ct", "edm"])
def test_microbatched_step_equals_mean_of_microbatch_gradients(method):
    """microbatches=4: θ moves by the mean of the 4 microbatch gradients (each with its own key),
    recomputed here one microbatch at a time; loss and metrics are their means."""
    apply_fn, params = _mlp()
    lr, m = 0.1, 4
    tx = optax.sgd(lr)
    cur = S.Curriculum(kind="cm", s0=2, s1=20, mu0=0.9, total_steps=100)
    if method == "ct":
        loss_fn = _ct(apply_fn, cur, L.l2_distance)
    else:
        loss_fn = EDMDenoiser(apply_fn=apply_fn, sigmas=SIG)
    state = TrainState.create(params, tx, ema_rates=(0.5,), use_target=method == "ct")
    state = state.replace(step=jnp.int32(11))
    batch, rng = _batch(1, 32), jax.random.key(9)
    new, metrics = jax.jit(make_train_step(loss_fn, tx, microbatches=m))(state, batch, rng)

    key = jax.random.fold_in(rng, 11)
    x = np.asarray(batch["image"])
    grads, losses = [], []
    for i in range(m):
        chunk = {"image": jnp.asarray(x[i::m])}  # rows i, i + m, ...
        target = state.params if state.target_params is None else state.target_params
        f = lambda p: loss_fn.loss(
            p, Frozen(target=target), chunk, jax.random.fold_in(key, i), jnp.int32(11)
        )[0]
        value, g = jax.value_and_grad(f)(params)
        grads.append(g)
        losses.append(float(value))
    flat = lambda t: np.concatenate(
        [np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(t)]
    )
    mean_grad = np.mean([flat(g) for g in grads], axis=0)
    np.testing.assert_allclose(
        flat(new.params), flat(params) - lr * mean_grad, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]), np.linalg.norm(mean_grad), rtol=1e-4)
    # A different split gives a different (equally valid) step: the test can tell them apart.
    other, _ = jax.jit(make_train_step(loss_fn, tx, microbatches=2))(state, batch, rng)
    assert np.max(np.abs(flat(other.params) - flat(new.params))) > 1e-6
    with pytest.raises(ValueError, match="microbatches must be a positive integer"):
        make_train_step(loss_fn, tx, microbatches=0)
