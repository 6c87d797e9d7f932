"""Classifier-free guidance of a teacher and label dropout, against hand-written computations."""

import jax
import jax.numpy as jnp
import numpy as np

from consistency_jax import guidance


def _teacher(params, x, sigma, labels):
    """A hand-written class-conditional 'denoiser': x/(1 + σ²) + w[label]."""
    return x / (1.0 + sigma[:, None] ** 2) + params["w"][labels]


def test_guided_teacher_is_the_cfg_combination_and_omega_one_is_the_teacher_itself():
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    }  # 3 classes + the null label 3
    x = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    sigma = jnp.asarray(rng.uniform(0.1, 5.0, 5), jnp.float32)
    labels = jnp.asarray([0, 1, 2, 1, 0])
    assert guidance.guided_denoiser(_teacher, 1.0, 3) is _teacher
    for omega in (0.0, 2.0, 3.5):
        out = np.asarray(guidance.guided_denoiser(_teacher, omega, 3)(params, x, sigma, labels))
        w = np.asarray(params["w"], np.float64)
        base = np.asarray(x, np.float64) / (1 + np.asarray(sigma, np.float64)[:, None] ** 2)
        expect = omega * (base + w[np.asarray(labels)]) + (1 - omega) * (base + w[3])
        np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)


def test_label_dropout_rate_and_null_label():
    labels = jnp.asarray(np.arange(20000) % 10)
    out = np.asarray(guidance.drop_labels(jax.random.key(0), labels, 0.1, 10))
    dropped = out == 10
    assert abs(dropped.mean() - 0.1) < 0.01
    np.testing.assert_array_equal(out[~dropped], np.asarray(labels)[~dropped])
    assert guidance.drop_labels(jax.random.key(0), labels, 0.0, 10) is labels


# ---------------------------------------------------------------------------------------------------
# The wiring: an EDM teacher trained with label dropout, a distillation run with teacher.guidance.


def _echo_apply(params, x, c_noise, *, labels=None, train=False, rng=None):
    """A 'network' whose output depends on the label only (and θ): w[label]."""
    return jnp.zeros_like(x) + params["w"][labels][:, None, None, :]


def test_edm_label_dropout_trains_the_null_label_and_zero_changes_nothing():
    from consistency_jax.methods.edm import EDMDenoiser
    from consistency_jax.parameterization import SigmaConfig

    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 1)), jnp.float32)}
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, size=(64, 2, 2, 1)), jnp.float32)
    labels = jnp.asarray(np.arange(64) % 3)
    rng, sig = jax.random.key(2), SigmaConfig()
    plain = EDMDenoiser(apply_fn=_echo_apply, sigmas=sig)
    loss = lambda m, y: float(m.loss(params, None, {"image": x, "label": y}, rng, 0)[0])
    base = loss(plain, labels)
    # Dropout 0 (with a null label declared) is the method as it was, bit for bit.
    assert loss(EDMDenoiser(apply_fn=_echo_apply, sigmas=sig, null_label=3), labels) == base
    # Dropout ~1: every label is the null one, exactly the loss of a batch of null labels.
    almost = EDMDenoiser(apply_fn=_echo_apply, sigmas=sig, class_dropout=0.999999, null_label=3)
    nulls = jnp.full_like(labels, 3)
    assert loss(almost, labels) == loss(plain, nulls) != base
    # Dropout 0.5: about half the rows see the null label (the loss lies between the two).
    half = loss(
        EDMDenoiser(apply_fn=_echo_apply, sigmas=sig, class_dropout=0.5, null_label=3), labels
    )
    assert min(base, loss(plain, nulls)) < half < max(base, loss(plain, nulls))


def _digits(method, data_dir, **kw):
    from conftest import load_config

    c = load_config("digits", f"method={method}")
    c.data.update(data_dir=data_dir, batch_size=8, use_labels=True)
    c.model.kwargs = dict(
        nf=4, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_classes=11
    )
    for k, v in kw.items():
        node, *path = k.split(".")
        target = c[node]
        for p in path[:-1]:
            target = target[p]
        target[path[-1]] = v
    return c


def test_distillation_reads_the_guided_teacher(digits_data_dir, tmp_path):
    """build.build_teacher with teacher.guidance = ω on a written class-conditional EDM run (label
    dropout 0.1): ω·D(x|c) + (1 − ω)·D(x|∅) of the unguided teacher, ∅ its last label; ω = 1 is the
    unguided teacher itself. Refusals name the field."""
    import pytest
    from conftest import write_run

    from consistency_jax import build, loading, methods
    from consistency_jax.build import validate

    teacher = write_run(
        tmp_path / "edm", _digits("edm", digits_data_dir, **{"loss.edm_class_dropout": 0.1})
    )
    unguided, phi = loading.load_teacher(teacher)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32)
    sigma = jnp.asarray([0.1, 0.7, 2.0, 20.0], jnp.float32)
    labels = jnp.asarray([0, 3, 9, 5])
    cond = np.asarray(jax.jit(unguided)(phi, x, sigma, labels), np.float64)
    uncond = np.asarray(jax.jit(unguided)(phi, x, sigma, jnp.full_like(labels, 10)), np.float64)
    assert np.abs(cond - uncond).max() > 1e-3  # the labels matter to this teacher
    for method in ("cd", "scd"):
        c = _digits(method, digits_data_dir, **{"teacher.workdir": teacher})
        c.init.workdir = ""
        c.teacher.guidance = 2.5
        setup = validate(c)
        denoise, params = build.build_teacher(c, methods.get(method), setup.mesh)
        got = np.asarray(jax.jit(denoise)(params, x, sigma, labels), np.float64)
        np.testing.assert_allclose(got, 2.5 * cond - 1.5 * uncond, rtol=1e-4, atol=1e-4)
    c.teacher.guidance = 1.0
    setup = validate(c)
    denoise, params = build.build_teacher(c, methods.get("scd"), setup.mesh)
    np.testing.assert_array_equal(np.asarray(jax.jit(denoise)(params, x, sigma, labels)), cond)

    no_dropout = write_run(tmp_path / "edm0", _digits("edm", digits_data_dir))
    for bad, match in (
        ({"teacher.workdir": no_dropout}, r"trained without label dropout"),
        (
            {"model.kwargs.num_classes": 12},
            r"num_classes=12 \(data\.use_labels=True\), the teacher 11",
        ),
    ):
        c = _digits("cd", digits_data_dir, **{"teacher.workdir": teacher, **bad})
        c.teacher.guidance = 2.0
        with pytest.raises(ValueError, match=match):
            validate(c)
    c = _digits("ict", digits_data_dir)
    c.teacher.guidance = 2.0
    with pytest.raises(ValueError, match=r"method='ict' reads none"):
        validate(c)
    unlabelled = {"data.use_labels": False, "model.kwargs.num_classes": None}
    c = _digits("edm", digits_data_dir, **{"loss.edm_class_dropout": 0.1, **unlabelled})
    with pytest.raises(ValueError, match=r"edm_class_dropout > 0 trains the unconditional model"):
        validate(c)
