"""Every bad config or workdir fails with a clear ValueError naming the problem, before anything is
compiled or written."""

import gc
import pathlib
import re

import jax
import pytest
from conftest import load_config

from consistency_jax import build
from consistency_jax import checkpoint as C
from consistency_jax import experiment as E
from consistency_jax.build import validate
from consistency_jax.methods import default_values
from consistency_jax.train_state import TrainState


def _config(method="ct"):
    c = load_config("toy", f"method={method}")
    c.model.kwargs = dict(hidden=8, depth=1)
    c.data.batch_size = 16
    c.train.update(num_steps=10, log_every=5, eval_every=10)
    c.eval.num_samples = 32
    c.checkpoint.every = 5
    return c


def _set(c, dotted, value):
    *parents, leaf = dotted.split(".")
    node = c
    for p in parents:
        node = node[p]
    node[leaf] = value
    return c


@pytest.mark.parametrize(
    "changes,message",
    [
        (
            {"curriculum.kind": "constant", "curriculum.num_scales": 1},
            r"config\.curriculum: num_scales \(N\) must be at least 2, got 1",
        ),
        (
            {"curriculum.kind": "cm", "curriculum.s0": 1, "curriculum.mu0": 0.0},
            r"config\.curriculum: .*s0 >= 2 for kind='cm'",
        ),
        (
            {"sigmas.sigma_min": 80.0, "sigmas.sigma_max": 80.0},
            r"config\.sigmas: Need 0 < sigma_min < sigma_max, got sigma_min=80\.0, sigma_max=80\.0",
        ),
        (
            {"sigmas.sigma_min": 5.0, "sigmas.sigma_max": 1.0},
            r"config\.sigmas: .*sigma_min < sigma_max",
        ),
        (
            {"train.ema_rates": (-0.1,)},
            r"config\.train\.ema_rates\) must lie in \[0, 1\), got -0\.1",
        ),
        (
            {"train.ema_rates": (0.999, 1.5)},
            r"config\.train\.ema_rates\) must lie in \[0, 1\), got 1\.5",
        ),
        (
            {"curriculum.mu0": 1.2},
            r"config\.curriculum: The target EMA rate mu0 must be in \[0, 1\)",
        ),
        ({"teacher.ema_rate": -0.5}, r"config\.teacher\.ema_rate must lie in \[0, 1\)"),
        ({"eval.ema_rate": 0.5}, r"config\.eval\.ema_rate=0\.5 is not one of the EMA rates"),
        ({"method": "sctx"}, r"Unknown method 'sctx'"),
        ({"loss.distance": "l3"}, r"config\.loss: Unknown distance 'l3'"),
        ({"loss.weighting": "snr2"}, r"config\.loss: Unknown weighting 'snr2'"),
        ({"model.name": "resnet"}, r"Unknown network 'resnet' \(config\.model\.name\)"),
        (
            {"data.name": "not_a_dataset_xyz"},
            r"Unknown data set 'not_a_dataset_xyz' \(config\.data\.name\)",
        ),
        (
            {"model.kwargs": {"hidden": 8, "width": 3}},
            r"The network 'mlp' \(config\.model\) cannot take 2-D toy points: .*width",
        ),
        ({"optim.decay": "linear"}, r"Unknown lr decay 'linear' \(config\.optim\.decay\)"),
        ({"checkpoint.keep": 0}, r"config\.checkpoint\.keep must be an integer >= 1, got 0"),
        ({"checkpoint.every": 0}, r"config\.checkpoint\.every must be an integer >= 1, got 0"),
        ({"checkpoint.keep_every": -2}, r"config\.checkpoint\.keep_every must be an integer >= 0"),
        ({"train.microbatches": 0}, r"config\.train\.microbatches must be an integer >= 1, got 0"),
        ({"train.steps_per_call": True}, r"config\.train\.steps_per_call must be an integer >= 1"),
        ({"mesh.fsdp_min_size": -1}, r"config\.mesh\.fsdp_min_size must be an integer >= 0"),
        ({"loss.p_std": 0.0}, r"config\.loss: The lognormal p_std must be positive"),
        (
            {"loss.huber_c": -1.0},
            r"config\.loss: The pseudo-Huber constant huber_c must be positive",
        ),
        (
            {"eval.two_step_time": 0.001},
            r"config\.eval\.two_step_time / two_step_indices: .*\[sigma_min, sigma_max\]",
        ),
        (
            {"eval.two_step_indices": (0, 200)},
            r"config\.eval\.two_step_time / two_step_indices: Indices must lie in \[0, 150\]",
        ),
        ({"method": "edm", "loss.edm_p_std": 0.0}, r"config\.loss\.edm_p_std must be positive"),
        ({"eval.num_samples": 0}, r"config\.eval\.num_samples must be an integer >= 1"),
        ({"optim.b2": 1.0}, r"config\.optim\.b2 must lie in \[0, 1\), got 1\.0"),
        ({"optim.eps": 0.0}, r"config\.optim\.eps must be positive"),
        ({"data.shuffle_buffer": -1}, r"config\.data\.shuffle_buffer must be an integer >= 0"),
        (
            {"loss.distance": "lpips"},
            r"config\.loss\.distance='lpips' needs config\.loss\.lpips_weights",
        ),
        (
            {"loss.distance": "lpips", "loss.lpips_weights": "/nonexistent/lpips.safetensors"},
            r"lpips_weights.*got '/nonexistent/lpips\.safetensors' \(no such file\)",
        ),
        (
            {"loss.distance": "lpips", "loss.lpips_net": "resnet"},
            r"config\.loss\.lpips_net must be 'vgg' or 'alex'",
        ),
        (
            {"train.microbatches": 3},
            r"config\.data\.batch_size=16 does not split into config\.train\.microbatches=3",
        ),
        (
            {"data.reader": "tf"},
            r"config\.data\.reader must be one of \('auto', 'data_source', 'tfds_load'\), got 'tf'",
        ),
        (
            {"optim.lr": float("inf")},
            r"config\.optim\.lr must be a finite positive number, got inf",
        ),
        (
            {"optim.lr": float("nan")},
            r"config\.optim\.lr must be a finite positive number, got nan",
        ),
        ({"optim.lr": -1e-3}, r"config\.optim\.lr must be a finite positive number"),
        # Checked with or without Inception weights (the metrics a run computes once they are set).
        ({"eval.fid_metrics": ("bogus",)}, r"config\.eval\.fid_metrics=\('bogus',\): choose from"),
        ({"eval.fid_metrics": ()}, r"config\.eval\.fid_metrics=\(\): choose from"),
        (
            {"train.max_skip_fraction": 0.0},
            r"config\.train\.max_skip_fraction must lie in \(0, 1\]",
        ),
        ({"model.logvar_head": True}, r"config\.model\.logvar_head=True is what method='scd' adds"),
        (
            {"method": "ect", "eval.two_step_indices": (0, 5)},
            r"two_step_indices=\(0, 5\) are indices on a discrete time grid, and method='ect'",
        ),
    ],
)
def test_bad_values_are_named(changes, message):
    c = _config()
    for k, v in changes.items():
        _set(c, k, v)
    with pytest.raises(ValueError, match=message):
        validate(c)


def _image_config(model, kwargs, image_size, dataset="cifar10", channels=3):
    c = _config()
    c.data.update(name=dataset, image_size=image_size, num_channels=channels)
    c.model.name, c.model.kwargs = model, kwargs
    return c


def test_image_size_the_network_cannot_take():
    small = dict(nf=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,))
    validate(_image_config("ncsnpp", small, 32))  # 32 -> 16 -> 8: fine
    with pytest.raises(
        ValueError,
        match=r"'ncsnpp' \(config\.model\) cannot take 30x30x3 images"
        r".*not divisible by .* 4",
    ):
        validate(_image_config("ncsnpp", small, 30))
    with pytest.raises(ValueError, match=r"'ncsnpp' .* cannot take 2-D toy points"):
        c = _config()
        c.model.name, c.model.kwargs = "ncsnpp", small
        validate(c)
    with pytest.raises(ValueError, match=r"'mlp' .* cannot take 8x8x1 images.*MLP expects inputs"):
        validate(_image_config("mlp", dict(hidden=8), 8, "sklearn_digits/8", 1))


def test_cd_teacher_errors(tmp_path):
    c = _config("cd")
    c.teacher.workdir = ""
    with pytest.raises(ValueError, match=r"method='cd' needs a teacher: set config\.teacher\."):
        validate(c)
    c.teacher.workdir = str(tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"holds no checkpoints .*train an EDM teacher"):
        validate(c)
    # A teacher directory holding a CT run is not an EDM teacher.
    ct_dir = tmp_path / "ct"
    state = _initial_state(_config("ct"))
    with C.Checkpointer(str(ct_dir), every=1, keep=1) as ckpt:
        ckpt.save(state, step=0, data_state={"step": 0}, config=_config("ct"))
    c.teacher.workdir = str(ct_dir)
    with pytest.raises(ValueError, match=r"method='ct' run; consistency distillation needs an EDM"):
        validate(c)
    c = _config("cd")
    c.data.name, c.teacher.workdir = "cifar10", "exact"
    with pytest.raises(ValueError, match=r"'exact' exists only for the toy"):
        validate(c)


# ---------------------------------------------------------------- workdirs


def _initial_state(config):
    setup = validate(config)
    tx, _ = build.make_optimizer(config)
    _, apply_fn, init = build.build_network(config, (2,))
    method = build.build_method(config, setup.spec, apply_fn, setup.sigmas, (2,), None, None)
    return TrainState.create(
        init(jax.random.key(0)), tx, ema_rates=setup.ema_rates, use_target=method.keeps_target
    )


def _snapshot(d):
    return sorted(
        (str(p.relative_to(d)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in pathlib.Path(d).rglob("*")
    )


def _workdir_with_checkpoint(tmp_path, config):
    with C.Checkpointer(str(tmp_path), every=5, keep=3) as ckpt:
        ckpt.save(_initial_state(config), step=0, data_state={"step": 0}, config=config)
    return _snapshot(tmp_path)


def test_workdir_of_a_different_config_is_refused(tmp_path):
    before = _workdir_with_checkpoint(tmp_path, _config())
    other = _config()
    other.optim.b1 = 0.8  # (optim.lr may change on resume: tests/test_run_safety.py)
    other.model.kwargs = dict(hidden=16, depth=1)
    other.train.num_steps = 50  # allowed: extends the run
    other.train.log_every = 7  # allowed: logging cadence
    with pytest.raises(C.CheckpointError) as err:
        E.train_and_evaluate(other, str(tmp_path))
    msg = str(err.value)
    assert "of a different config" in msg and str(tmp_path / "checkpoints") in msg
    diffs = re.findall(r"([\w.]+): \S+ -> \S+", msg.split("(saved -> now): ")[1])
    assert sorted(diffs) == ["model.kwargs.hidden", "optim.b1"]
    assert "override_config=True" in msg
    assert _snapshot(tmp_path) == before  # nothing overwritten


def test_resumable_differences_and_override_are_accepted(tmp_path, caplog):
    _workdir_with_checkpoint(tmp_path, _config())
    longer = _config()
    longer.train.update(num_steps=99, log_every=3, eval_every=33)
    longer.checkpoint.update(every=11, keep=5, keep_every=22)
    longer.eval.num_samples = 64
    C.Checkpointer.from_config(str(tmp_path), longer).close()
    forced = _config()
    forced.optim.b1 = 0.5
    forced.checkpoint.override_config = True
    C.Checkpointer.from_config(str(tmp_path), forced).close()
    assert any(
        "override_config=True" in r.getMessage() and "optim.b1" in r.getMessage()
        for r in caplog.records
    )


def test_checkpoint_of_a_config_without_the_newer_fields_still_resumes(tmp_path):
    """A checkpoint written before config fields existed (loss.p_mean/p_std, loss.edm_p_mean/edm_p_std,
    and fsdp_min_size = 0) resumes: an absent field counts as its default, the value every earlier run
    had. A field absent there whose *current* value differs from the default is refused, named.
    (conftest's ``tiny_ct_config``: the session run's compiled train step.)"""
    from conftest import tiny_ct_config

    old = tiny_ct_config()
    for field in ("p_mean", "p_std", "edm_p_mean", "edm_p_std"):
        del old.loss[field]
    old.mesh.fsdp_min_size = 0
    with C.Checkpointer(str(tmp_path), every=5, keep=3) as ckpt:  # the state is the same as then
        ckpt.save(_initial_state(tiny_ct_config()), step=0, data_state={"step": 0}, config=old)
    saved = C.Checkpointer(str(tmp_path), every=1, keep=1, read_only=True)
    assert "p_mean" not in saved.saved_config()[1]["loss"]  # the stored config really lacks them
    saved.close()
    state = E.train_and_evaluate(tiny_ct_config(), str(tmp_path))  # resumes from step 0, runs to 8
    assert int(state.step) == 8
    changed = tiny_ct_config()
    changed.loss.p_mean = -0.5
    with pytest.raises(
        C.CheckpointError, match=r"fields \(saved -> now\): loss\.p_mean: -1\.1 -> -0\.5\. "
    ):
        C.Checkpointer.from_config(str(tmp_path), changed, defaults=default_values())


def test_config_differences_lists_keys():
    a = {"optim": {"lr": 1.0, "b1": 0.9}, "train": {"num_steps": 5}, "x": [1, 2]}
    b = {"optim": {"lr": 2.0, "b1": 0.9}, "train": {"num_steps": 9}, "x": [1, 3], "y": 1}
    assert C.config_differences(a, b) == [
        "optim.lr: 1.0 -> 2.0",
        "x: [1, 2] -> [1, 3]",
        "y: '<absent>' -> 1",
    ]
    assert "train.num_steps: 5 -> 9" in C.config_differences(a, b, ignore_resumable=False)
    # An absent field takes the given default: equal to it is no difference, another value is.
    assert C.config_differences(a, b, defaults={"y": 1}) == [
        "optim.lr: 1.0 -> 2.0",
        "x: [1, 2] -> [1, 3]",
    ]
    assert "y: 0 -> 1" in C.config_differences(a, b, defaults={"y": 0})
    nested = C.config_differences(
        {"loss": {"q": 1}}, {"loss": {"q": 1, "p": 2}}, defaults={"loss": {"q": 0, "p": 2}}
    )
    assert nested == []


def test_source_runs_are_stored_absolute_and_old_relative_ones_still_resume(tmp_path, monkeypatch):
    """config.teacher.workdir / config.init.workdir given relative are made absolute at the
    working directory ("", "exact" and URLs stay); a checkpoint saved before (relative) compares
    equal to that absolute path, and only to it."""
    from consistency_jax import config as config_lib

    monkeypatch.chdir(tmp_path)
    c = load_config("toy", "method=cd")
    c.init.workdir = "runs/../runs/edm"
    absolute = config_lib.with_absolute_sources(c)
    assert absolute.init.workdir == str(tmp_path / "runs" / "edm")
    assert absolute.teacher.workdir == "exact" and c.init.workdir == "runs/../runs/edm"
    for value in ("", "exact", "gs://bucket/run", "/abs/run"):
        c.teacher.workdir = value
        assert config_lib.with_absolute_sources(c).teacher.workdir == value
    saved = {"teacher": {"workdir": "runs/edm"}, "init": {"workdir": "s"}}
    now = {"teacher": {"workdir": str(tmp_path / "runs" / "edm")}, "init": {"workdir": "s"}}
    assert C.config_differences(saved, now) == []
    now["teacher"]["workdir"] = str(tmp_path / "elsewhere" / "edm")
    assert C.config_differences(saved, now) == [
        f"teacher.workdir: 'runs/edm' -> '{tmp_path / 'elsewhere' / 'edm'}'"
    ]
    # config.init is resumable (read only when a run starts) unless the method reads it on every
    # start (pinned: TCM's frozen stage 1); the same rule holds there.
    now = {"teacher": {"workdir": "runs/edm"}, "init": {"workdir": str(tmp_path / "s")}}
    assert C.config_differences(saved, now, pinned=("init.workdir",)) == []
    now["init"]["workdir"] = "/other"
    assert C.config_differences(saved, now) == []
    assert C.config_differences(saved, now, pinned=("init.workdir",)) == [
        "init.workdir: 's' -> '/other'"
    ]
    # Other fields holding paths keep comparing as text.
    assert C.config_differences(
        {"data": {"name": "d"}}, {"data": {"name": str(tmp_path / "d")}}
    ) == [f"data.name: 'd' -> '{tmp_path / 'd'}'"]


def test_config_file_arguments_take_the_type_of_their_default():
    from consistency_jax.config import parse_arg

    assert parse_arg("flag=False,n=3,x=0.5,s=a", flag=True, n=1, x=1.0, s="") == dict(
        flag=False, n=3, x=0.5, s="a"
    )
    assert parse_arg("flag=false", flag=True)["flag"] is False  # bool("False") would be True
    assert parse_arg("flag=TRUE", flag=False)["flag"] is True
    assert parse_arg("flag=0", flag=True)["flag"] is False
    with pytest.raises(ValueError, match=r"flag='maybe' is not a boolean"):
        parse_arg("flag=maybe", flag=True)
    with pytest.raises(ValueError, match=r"n='x' is not a int"):
        parse_arg("n=x", n=1)
    with pytest.raises(ValueError, match="Unknown config argument 'm'"):
        parse_arg("m=1", n=1)
    with pytest.raises(ValueError, match="key=value pairs"):
        parse_arg("n", n=1)
    assert load_config("digits", "method=edm,size=16").data.image_size == 16


def test_unreadable_checkpoint_is_refused_before_anything_is_written(tmp_path):
    _workdir_with_checkpoint(tmp_path, _config())
    (tmp_path / "checkpoints" / "0" / "config" / "metadata").write_text("{not json")
    before = _snapshot(tmp_path)
    with pytest.raises(
        C.CheckpointError,
        match=r"No readable checkpoint in .*checkpoints: step 0 "
        r"\(.*checkpoints/0\)",
    ):
        E.train_and_evaluate(_config(), str(tmp_path))
    assert _snapshot(tmp_path) == before


# Orbax leaves un-awaited TensorStore futures behind a failed read (see test_checkpoint.py);
# collected before the test ends.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_unreadable_arrays_are_refused_and_nothing_moved(tmp_path):
    _workdir_with_checkpoint(tmp_path, _config())
    for p in (tmp_path / "checkpoints" / "0").rglob("*"):
        if p.is_file() and p.parent.name == "d":
            p.write_bytes(b"")
    before = _snapshot(tmp_path / "checkpoints")
    with pytest.raises(
        C.CheckpointError,
        match=r"None of the checkpoints in .* can be restored: "
        r"step 0 \(.*checkpoints/0\)",
    ):
        E.train_and_evaluate(_config(), str(tmp_path))
    assert _snapshot(tmp_path / "checkpoints") == before
    gc.collect()


def test_advice_for_the_learning_rate_never_suggests_inf():
    c = _set(_config(), "optim.lr", float("inf"))
    with pytest.raises(ValueError) as e:
        validate(c)
    assert "inf" not in str(e.value).replace("got inf", "")


def test_schema_defaults_are_the_ones_validate_reads():
    """No fallback disagrees with the schema: validate reads every field it checks from the config
    (a config without a field fails naming it rather than taking a default of its own)."""
    from consistency_jax import methods

    schema = methods.schema()
    assert schema.train.max_skip_fraction == 0.25
    c = _config()
    del c.train["max_skip_fraction"]
    with pytest.raises(ValueError, match=r"lacks the fields config\.train\.max_skip_fraction"):
        validate(c)


@pytest.mark.parametrize(
    "path,message",
    [
        ("train.bogus", r"config\.train has no field 'bogus' \(config\.train has: ema_rates, "),
        ("bogus_field", r"the config has no field 'bogus_field' \(the config has: checkpoint, "),
        ("train.num_stepz", r"did you mean config\.train\.num_steps\?"),
        ("trian.num_steps", r"Unknown config field config\.trian: .*did you mean config\.train\?"),
        ("ect.qq", r"config\.ect has no field 'qq'; did you mean config\.ect\.q\?"),
    ],
)
def test_unknown_fields_are_named_with_the_nearest_known(path, message):
    from consistency_jax import config as config_lib

    c = _config()
    assert config_lib.unknown_field(c, "train.num_steps") is None
    assert config_lib.unknown_field(c, "model.kwargs.hidden") is None
    assert re.search(message, config_lib.unknown_field(c, path))


def test_an_unknown_override_on_the_command_line_names_the_field(tmp_path):
    """ml_collections' config flags raise a bare AttributeError for an unknown field; main's flag
    parser names it (in-process: the parser's message function on the same argv)."""
    from consistency_jax import main as main_lib

    config = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "toy.py")
    argv = ["main", f"--config={config}:method=ict", "--config.train.num_steps=5"]
    assert main_lib.unknown_override(argv) is None
    argv += ["--config.train.bogus=1"]
    assert "Unknown config field config.train.bogus" in main_lib.unknown_override(argv)
