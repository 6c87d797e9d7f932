"""Each paper config against the paper's table (CM Appendix C and the official launch scripts,
transcribed here independently)."""

import pytest
from conftest import load_config

from consistency_jax.build import validate

# (config file, arg) -> expected key numbers, from the papers' tables.
PAPER = {
    ("cifar10", "method=cd,metric=lpips"): dict(
        network="ncsnpp",
        distance="lpips",
        N=18,
        mu=0.0,
        batch=512,
        opt="radam",
        lr=4e-4,
        steps=800_000,
        warmup=10_000_000 // 512,
        emas=(0.9999,),
        dropout=0.0,
    ),
    ("cifar10", "method=cd,metric=l1"): dict(distance="l1", lr=2e-4),
    ("cifar10", "method=cd,metric=l2"): dict(distance="l2", lr=4e-4),
    ("cifar10", "method=ct"): dict(
        network="ncsnpp",
        distance="lpips",
        s0=2,
        s1=150,
        mu=0.9,
        batch=512,
        opt="radam",
        lr=4e-4,
        steps=800_000,
        emas=(0.9999,),
        dropout=0.0,
    ),
    ("cifar10", "method=ict"): dict(
        distance="pseudo_huber",
        s0=10,
        s1=1280,
        kind="ict",
        mu=0.0,
        emas=(0.99993,),
        dropout=0.3,
        sampling="lognormal",
        weighting="ict",
    ),
    ("imagenet64", "method=cd"): dict(
        network="adm",
        distance="lpips",
        N=40,
        mu=0.95,
        batch=2048,
        opt="adam",
        lr=8e-6,
        steps=600_000,
        dropout=0.0,
        emas=(0.999, 0.9999, 0.9999432189950708),
        ts=(0, 22, 39),
    ),
    ("imagenet64", "method=ct"): dict(
        distance="lpips",
        s0=2,
        s1=200,
        mu=0.95,
        batch=2048,
        opt="adam",
        lr=1e-4,
        steps=800_000,
        ts=(0, 106, 200),
    ),
    ("imagenet64", "method=edm"): dict(lr=1e-4, batch=4096, dropout=0.1),
    ("lsun256", "method=cd,metric=lpips"): dict(
        network="adm",
        N=40,
        mu=0.95,
        batch=256,
        opt="adam",
        lr=1e-5,
        steps=600_000,
        ts=(0, 17, 39),
        emas=(0.9999, 0.99994, 0.9999432189950708),
    ),
    ("lsun256", "method=cd,metric=l2"): dict(distance="l2", ts=(0, 18, 39)),
    ("lsun256", "method=ct,category=bedroom"): dict(
        s0=2, s1=150, mu=0.95, lr=5e-5, steps=1_000_000, ts=(0, 67, 150), distance="lpips"
    ),
    ("lsun256", "method=ct,category=cat"): dict(ts=(0, 62, 150), data="lsun/cat"),
}


def _get(name, arg):
    return load_config(name, arg)


@pytest.fixture
def lpips_file(tmp_path):
    """Validation checks that the LPIPS weight file exists (it is read only when the run is built)."""
    path = tmp_path / "lpips_vgg.safetensors"
    path.write_bytes(b"")
    return str(path)


@pytest.mark.parametrize("key", sorted(PAPER))
def test_paper_config_numbers(key, lpips_file):
    c = _get(*key)
    want = PAPER[key]
    got = dict(
        network=c.model.name,
        distance=c.loss.distance,
        N=c.curriculum.num_scales,
        mu=c.curriculum.mu0,
        batch=c.data.batch_size,
        opt=c.optim.name,
        lr=c.optim.lr,
        steps=c.train.num_steps,
        warmup=c.optim.warmup_steps,
        emas=tuple(c.train.ema_rates),
        dropout=c.model.kwargs.get("dropout", 0.0),
        s0=c.curriculum.s0,
        s1=c.curriculum.s1,
        kind=c.curriculum.kind,
        ts=tuple(c.eval.two_step_indices),
        data=c.data.name,
        sampling=c.loss.index_sampling,
        weighting=c.loss.weighting,
    )
    for k, v in want.items():
        assert got[k] == pytest.approx(v), (key, k, got[k], v)
    if c.method != "cd":  # CD configs need a teacher directory before they validate
        if c.loss.distance == "lpips":
            with pytest.raises(ValueError, match=r"needs config\.loss\.lpips_weights"):
                validate(c)
            c.loss.lpips_weights = lpips_file
        validate(c)


def test_ct_configs_use_the_adaptive_curriculum_and_cd_a_constant_one(lpips_file):
    assert _get("cifar10", "method=ct").curriculum.kind == "cm"
    assert _get("imagenet64", "method=cd").curriculum.kind == "constant"
    c = _get("cifar10", "method=cd")
    c.loss.lpips_weights = lpips_file
    c.teacher.workdir = "/nonexistent/teacher"
    with pytest.raises(
        ValueError, match="holds no checkpoints"
    ):  # checked before anything compiles
        validate(c)


def test_unknown_config_arguments_are_named():
    with pytest.raises(ValueError, match="Unknown config argument"):
        _get("cifar10", "methd=cd")
    with pytest.raises(ValueError, match="Unknown method"):
        _get("toy", "method=sctx")
