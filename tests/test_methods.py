"""Training methods as plug-ins: the registry, the contract the train step relies on, and a method
added in one file (the README's example) trained by the main loop."""

import pathlib

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_config

from consistency_jax import losses as L
from consistency_jax import methods, toy
from consistency_jax import parameterization as P
from consistency_jax import schedules as S
from consistency_jax.methods import Frozen
from consistency_jax.methods.cd import ConsistencyDistillation
from consistency_jax.methods.ct import ConsistencyTraining
from consistency_jax.methods.edm import EDMDenoiser
from consistency_jax.train import make_train_step
from consistency_jax.train_state import TrainState

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
METHODS_DIR = pathlib.Path(methods.__file__).parent
SIG = P.SigmaConfig()


def _linear(params, x, c_noise, **_):
    return x @ params["w"] + c_noise[:, None] * params["b"]


def test_every_method_module_registers_and_the_registry_is_the_one_list():
    # Every module of the package except the shared ones registers at least one method.
    modules = sorted(
        p.stem
        for p in METHODS_DIR.glob("*.py")
        if p.stem not in ("__init__", "base", "discrete", "fields")
    )
    owners = sorted(
        {spec.build.__module__.rsplit(".", 1)[-1] for spec in methods.registered().values()}
    )
    assert owners == modules
    assert set(methods.names()) >= {"cd", "ct", "edm", "ict"}
    assert methods.get("edm").family == "denoiser" and methods.get("cd").needs_teacher
    assert all(methods.get(n).family == "consistency" for n in ("cd", "ct", "ict"))
    assert (
        methods.get("sct").consistency_fn is not methods.get("ict").consistency_fn
    )  # TrigFlow's f
    with pytest.raises(
        ValueError, match=r"Unknown method 'sctx' \(config\.method\); choose one of"
    ):
        methods.get("sctx")
    # The configs, the validation and the loading of teachers all read this registry.
    for name in methods.names():
        assert load_config("toy", f"method={name}").method == name


def test_frozen_trees_and_targets_are_the_methods_declarations():
    cur_cm = S.Curriculum(kind="cm", s0=2, s1=20, mu0=0.9, total_steps=100)
    cur_ict = S.Curriculum(kind="ict", s0=10, s1=80, total_steps=100)
    parts = dict(apply_fn=_linear, sigmas=SIG, loss_cfg=L.LossConfig(), distance=L.l2_distance)
    ct = ConsistencyTraining(curriculum=cur_cm, **parts)
    ict = ConsistencyTraining(curriculum=cur_ict, **parts)
    cd = ConsistencyDistillation(curriculum=S.Curriculum(), teacher=toy.exact_denoiser, **parts)
    assert ct.frozen_trees == ("target",) and ct.keeps_target
    assert not ict.keeps_target  # θ⁻ = stopgrad θ: no copy in the state
    assert cd.frozen_trees == ("target", "teacher")
    assert EDMDenoiser(apply_fn=_linear, sigmas=SIG).frozen_trees == ()

    class Weighted(flax.struct.PyTreeNode):
        w: jax.Array

        def __call__(self, a, b):
            return jnp.mean(self.w * (a - b) ** 2, axis=-1)

    weighted = ConsistencyTraining(
        curriculum=cur_cm, **{**parts, "distance": Weighted(jnp.ones(2))}
    )
    assert weighted.frozen_trees == ("target", "distance")
    # The train step hands each method exactly what it declared, under stop-gradient.
    params, target = {"w": jnp.eye(2)}, {"w": 2 * jnp.eye(2)}
    got = methods.frozen_inputs(ict, params, None, {"phi": 1}, None)
    chex.assert_trees_all_equal(got.target, params)  # no copy kept: θ⁻ = stopgrad θ
    assert got.teacher is None and got.distance is None
    got = methods.frozen_inputs(cd, params, target, {"phi": jnp.ones(1)}, None)
    chex.assert_trees_all_equal(got.target, target)
    chex.assert_trees_all_equal(got.teacher, {"phi": jnp.ones(1)})
    assert (
        methods.frozen_inputs(
            EDMDenoiser(apply_fn=_linear, sigmas=SIG), params, target, {"phi": 1}, None
        )
        == Frozen()
    )
    # μ(k) of the target update and the logged schedule come from the method's curriculum.
    n, mu = cur_cm(37)
    np.testing.assert_allclose(float(ct.target_rate(jnp.int32(37))), float(mu))
    sched = ct.schedule(jnp.int32(37))
    assert int(sched["num_scales"]) == int(n) and float(sched["mu"]) == float(mu)


def test_the_train_step_takes_methods_only():
    with pytest.raises(
        TypeError, match=r"needs a method with a loss\(params, frozen, batch, rng, step\)"
    ):
        make_train_step(lambda *a: 0.0, optax.sgd(0.1))


def test_a_method_with_its_own_schedule_and_target_rule():
    """A method that is not a discrete CM: a step-driven warm-up (as sCM's tangent warm-up) in its
    loss and its own θ⁻ rule; the generic step follows both (checked against NumPy)."""

    class WarmupMethod(methods.Method):
        name = "warmup"
        frozen_trees = ("target",)
        keeps_target = True

        def loss(self, params, frozen, batch, rng, step):
            r = jnp.minimum(1.0, step / 10.0)
            pred = batch["image"] @ params["w"]
            return r * jnp.mean((pred - batch["image"] @ frozen.target["w"]) ** 2 + pred**2), {
                "r": r
            }

        def update_target(self, target, params, step):
            return jax.tree.map(lambda t, p: 0.5 * (t + p), target, params)

        def schedule(self, step):
            return {"warmup": jnp.minimum(1.0, step / 10.0)}

    params = {"w": jnp.array([[1.0, 0.5], [-0.3, 2.0]])}
    tx = optax.sgd(0.1)
    state = TrainState.create(params, tx, use_target=True).replace(step=jnp.int32(4))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 2)), jnp.float32)
    new, m = jax.jit(make_train_step(WarmupMethod(), tx))(state, {"image": x}, jax.random.key(0))
    xd, w = np.asarray(x, np.float64), np.asarray(params["w"], np.float64)
    # d/dw of r·mean((x w − x w⁻)² + (x w)²) at w⁻ = w (θ⁻ starts as θ) is r·2·xᵀ(x w)/(B·D)
    grad = 0.4 * 2 * xd.T @ (xd @ w) / (8 * 2)
    want = w - 0.1 * grad
    np.testing.assert_allclose(np.asarray(new.params["w"]), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new.target_params["w"]), 0.5 * (w + want), rtol=1e-5)
    assert float(m["warmup"]) == pytest.approx(0.4) and float(m["r"]) == pytest.approx(0.4)
