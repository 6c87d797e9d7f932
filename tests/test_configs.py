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


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_dataset_configs_hold_no_method_branches():
    """configs/ keep data, network and budget: a method's settings are its presets."""
    import re

    for path in sorted((ROOT / "configs").glob("*.py")):
        text = path.read_text()
        assert not re.search(r"method\s*(==|!=|in\s*\()", text), path.name
        assert "apply_preset(" in text, path.name


def test_config_module_imports_nothing_of_the_package():
    import ast

    tree = ast.parse((ROOT / "consistency_jax" / "config.py").read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names] + [
        n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
    ]
    assert not [m for m in imported if m.startswith("consistency_jax")], imported


def test_methods_sharing_a_field_declare_one_schema_default():
    """A field two methods declare (the distance, the lognormal proposal) has one schema default."""
    import ml_collections

    from consistency_jax import config as config_lib
    from consistency_jax import methods

    seen = {}
    for name in methods.names():
        c = ml_collections.ConfigDict()
        methods.get(name).fields(c)
        flat = {
            p: c[p.split(".")[0]][p.split(".", 1)[1]] if "." in p else c[p]
            for p in config_lib.field_paths(c)
            if not isinstance(
                c[p.split(".")[0]] if "." not in p else c[p.split(".")[0]][p.split(".", 1)[1]],
                ml_collections.ConfigDict,
            )
        }
        for path, value in flat.items():
            assert seen.setdefault(path, (name, value))[1] == value, (path, name, seen[path])
    base = config_lib.field_paths(config_lib.base_config())
    assert not set(seen) & set(base)  # base_config lists none of a method's fields


@pytest.mark.parametrize(
    "method,grid,kind",
    [
        ("cd", 18, "an EDM network"),
        ("ict", 1281, "an EDM network"),  # iCT Eq. 7 ends at s1 = 1280 intervals, 1281 points
        ("ct", 151, "an EDM network"),  # CM's adaptive N(K) = s1 + 1 points
        ("edm", None, "an EDM network"),
        ("ect", None, "an EDM network"),
        ("cm_continuous_ct", None, "an EDM network"),
        ("sct", None, "a TrigFlow network seeing the angle t (sigmas.trigflow_time=angle)"),
        ("scd", None, "a TrigFlow network seeing the angle t (sigmas.trigflow_time=angle)"),
    ],
)
def test_each_method_says_its_grid_and_network_kind(method, grid, kind):
    from consistency_jax import methods

    c = load_config("toy", f"method={method}")
    spec = methods.get(method)
    assert spec.grid_size(c) == grid
    assert spec.network_kind(c) == kind
    c.sigmas.trigflow_time = "edm"
    if spec.network_addition is not None:  # sCM: an EDM network, the head beside it
        assert spec.network_kind(c) == "an EDM network"
        assert c.model[spec.network_addition.field] is True
