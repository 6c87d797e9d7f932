"""Smoke runs of the main job on tiny configs: the digits (real images through TFDS) and the toy."""

import json
import os
import pathlib

import numpy as np
import pytest

from consistency_jax import experiment, loading
from consistency_jax.build import validate


def _digits_config(tmp_path, method):
    from conftest import load_config

    c = load_config("digits", f"method={method}")
    c.data.data_dir = str(tmp_path / "tfds")
    c.data.batch_size = 8
    c.model.kwargs = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    c.train.update(num_steps=4, log_every=2, eval_every=4)
    c.eval.num_samples = 16
    c.checkpoint.every = 4
    return c


@pytest.mark.slow
def test_digits_job_trains_evaluates_and_writes_outputs(tmp_path):
    """The main job on the digits prepared as tfrecord and read through tf.data (reader='tfds_load';
    the array_record / data_source path is the default of every other digits run in the tests):
    trains, checkpoints the stream's position, evaluates (the held-out digits are read through the
    same reader) and writes its outputs."""
    from consistency_jax import checkpoint as ckpt_lib
    from consistency_jax import data as data_lib

    c = _digits_config(tmp_path, "ict")
    c.data.reader = "tfds_load"
    workdir = tmp_path / "run"
    state = experiment.train_and_evaluate(c, str(workdir))
    assert int(state.step) == 4
    assert data_lib.tensorflow_available()
    builder = data_lib.ensure_digits_dataset(c.data.data_dir, 8)  # prepared by the job, as tfrecord
    assert builder.info.file_format.value == "tfrecord"
    checkpointer = ckpt_lib.Checkpointer.from_config(str(workdir), c)
    saved = checkpointer.read_json(4, ckpt_lib.DATA_ITEM)
    checkpointer.close()
    assert saved["reader"] == "tfds_load" and saved["step"] == 4
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 4
    for key in ("digits_fd_1step", "digits_fd_2step", "confident_1step", "class_entropy_2step"):
        assert np.isfinite(lines[-1][key]), key
    assert (workdir / "samples_00000004.png").exists()
    assert any(f.startswith("events") for f in os.listdir(workdir / "tensorboard"))


def test_toy_edm_job_samples_with_heun(tmp_path):
    from conftest import load_config

    c = load_config("toy", "method=edm")
    c.model.kwargs = dict(hidden=16, depth=1)
    c.train.update(num_steps=3, log_every=3, eval_every=3)
    c.eval.update(num_samples=64, edm_steps=4)
    workdir = tmp_path / "edm"
    experiment.train_and_evaluate(c, str(workdir))
    line = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(line["sw2_heun_7nfe"]) and line["sw2_floor"] > 0


def _toy_ct(num_steps, steps_per_call, every):
    from conftest import load_config

    c = load_config("toy", "method=ct")
    c.model.kwargs = dict(hidden=16, depth=1)
    c.data.batch_size = 32
    c.train.update(
        num_steps=num_steps, log_every=every, eval_every=20, steps_per_call=steps_per_call
    )
    c.curriculum.total_steps = 22  # the same N(k), μ(k) for a run stopped early at 6,
    c.optim.decay = "constant"  # and the same learning rates
    c.eval.num_samples = 32
    # Checkpoints at 20 and at the end only (each save costs a second on CPU); a run always saves
    # its last step, so the run stopped at 6 resumes from 6.
    c.checkpoint.every = 20
    return c


@pytest.mark.slow
def test_steps_per_call_scan_gives_the_same_run(tmp_path):
    """train.steps_per_call=4 (a lax.scan of 4 steps per call), also resumed at a step that is not a
    multiple of 4 and ending on a partial call, reproduces the one-step-per-call run; likewise with
    gradient accumulation (train.microbatches=2) inside the scanned steps."""
    import pytest

    experiment.train_and_evaluate(_toy_ct(22, 1, 2), str(tmp_path / "one"))
    experiment.train_and_evaluate(_toy_ct(22, 4, 4), str(tmp_path / "scan"))
    experiment.train_and_evaluate(_toy_ct(6, 1, 2), str(tmp_path / "resumed"))  # stops at 6
    experiment.train_and_evaluate(
        _toy_ct(22, 4, 4), str(tmp_path / "resumed")
    )  # 6,7 then 8..19 by 4
    want = loading.read_arrays(str(tmp_path / "one"), 22)
    for run in ("scan", "resumed"):
        got = loading.read_arrays(str(tmp_path / run), 22)
        assert sorted(got) == sorted(want)
        for key in want:
            np.testing.assert_allclose(
                got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=f"{run} {key}"
            )
    # Gradient accumulation inside the scan: microbatches=2 with 4 steps per call = with 1 per call.
    for run, per_call in (("micro", 1), ("micro_scan", 4)):
        c = _toy_ct(22, per_call, 4)
        c.train.microbatches = 2
        experiment.train_and_evaluate(c, str(tmp_path / run))
    micro = loading.read_arrays(str(tmp_path / "micro"), 22)
    micro_scan = loading.read_arrays(str(tmp_path / "micro_scan"), 22)
    for key in micro:
        np.testing.assert_allclose(micro_scan[key], micro[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert not np.allclose(
        micro["state/params/Dense_0/kernel"], want["state/params/Dense_0/kernel"]
    )
    evals = {
        run: [json.loads(ln) for ln in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("one", "scan")
    }
    assert [e["step"] for e in evals["scan"]] == [e["step"] for e in evals["one"]] == [20, 22]
    for a, b in zip(evals["scan"], evals["one"]):
        assert sorted(a) == sorted(b)
        np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=1e-4)
    with pytest.raises(
        ValueError,
        match=r"config\.checkpoint\.every=6 is not a multiple of "
        r"config\.train\.steps_per_call=4",
    ):
        bad = _toy_ct(22, 4, 4)
        bad.checkpoint.every = 6
        validate(bad)


def test_steps_per_call_scan_gives_the_same_run_quick(tmp_path, toy_ct_run, signal_at_step):
    """The quick form of test_steps_per_call_scan_gives_the_same_run: train.steps_per_call=4 on the
    session's 8-step toy run (conftest's ``toy_ct_run``, one step per call), and the same resumed
    from step 2 (stopped there by SIGTERM, one step per call): 2, 3 one by one, then 4..7 in one
    call; both end where the reference ends."""
    import signal

    from conftest import tiny_ct_config

    experiment.train_and_evaluate(
        tiny_ct_config(steps_per_call=4, log_every=4), str(tmp_path / "scan")
    )
    sent = signal_at_step(signal.SIGTERM, 2)
    experiment.train_and_evaluate(tiny_ct_config(), str(tmp_path / "resumed"))
    assert sent == [2] and loading.read_arrays(str(tmp_path / "resumed"), 2)
    experiment.train_and_evaluate(
        tiny_ct_config(steps_per_call=4, log_every=4), str(tmp_path / "resumed")
    )
    want = toy_ct_run.arrays
    for run in ("scan", "resumed"):
        got = loading.read_arrays(str(tmp_path / run), 8)
        assert sorted(got) == sorted(want)
        for key in want:
            np.testing.assert_allclose(
                got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=f"{run} {key}"
            )
    rows = [json.loads(x) for x in (tmp_path / "scan" / "metrics.jsonl").read_text().splitlines()]
    ref = [
        json.loads(x)
        for x in (pathlib.Path(toy_ct_run.workdir) / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == [8]
    np.testing.assert_allclose(
        [rows[0][k] for k in sorted(ref[0])], [ref[0][k] for k in sorted(ref[0])], rtol=1e-4
    )


def test_digits_job_trains_evaluates_and_writes_outputs_quick(tmp_path, digits_data_dir):
    """The quick form of test_digits_job_trains_evaluates_and_writes_outputs: the smallest digits
    network (test_sample's run), one step on the session's digits through the default data_source
    reader (the tfds_load reader's stream and its resumption: tests/test_data_readers.py), the
    stream's position checkpointed, the held-out digits evaluated, the outputs written."""
    from conftest import load_config

    from consistency_jax import checkpoint as ckpt_lib

    c = load_config("digits", "method=ict")
    c.data.data_dir = digits_data_dir
    c.data.batch_size = 8
    c.data.use_labels = True
    c.model.kwargs = dict(
        nf=4, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_classes=10
    )
    c.train.update(num_steps=1, log_every=1, eval_every=1000)
    c.eval.num_samples = 16
    c.checkpoint.every = 1
    workdir = tmp_path / "run"
    state = experiment.train_and_evaluate(c, str(workdir))
    assert int(state.step) == 1
    checkpointer = ckpt_lib.Checkpointer.from_config(str(workdir), c)
    saved = checkpointer.read_json(1, ckpt_lib.DATA_ITEM)
    checkpointer.close()
    assert saved["reader"] == "data_source" and saved["step"] == 1
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 1
    for key in ("digits_fd_1step", "digits_fd_2step", "confident_1step", "class_entropy_2step"):
        assert np.isfinite(lines[-1][key]), key
    assert (workdir / "samples_00000001.png").exists()
    assert any(f.startswith("events") for f in os.listdir(workdir / "tensorboard"))
