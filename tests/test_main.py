"""Smoke runs of the main job on tiny configs: the digits (real images through TFDS) and the toy."""
import json
import os

import numpy as np

from consistency_jax import experiment


def _digits_config(tmp_path, method):
    from configs import digits

    c = digits.get_config(f"method={method}")
    c.data.data_dir = str(tmp_path / "tfds")
    c.data.batch_size = 8
    c.model.kwargs = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    c.train.update(num_steps=4, log_every=2, eval_every=4)
    c.eval.num_samples = 16
    c.checkpoint.every = 4
    return c


def test_digits_job_trains_evaluates_and_writes_outputs(tmp_path):
    c = _digits_config(tmp_path, "ict")
    workdir = tmp_path / "run"
    state = experiment.train_and_evaluate(c, str(workdir))
    assert int(state.step) == 4
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 4
    for key in ("digits_fd_1step", "digits_fd_2step", "confident_1step", "class_entropy_2step"):
        assert np.isfinite(lines[-1][key]), key
    assert (workdir / "samples_00000004.png").exists()
    assert any(f.startswith("events") for f in os.listdir(workdir / "tensorboard"))


def test_toy_edm_job_samples_with_heun(tmp_path):
    from configs import toy

    c = toy.get_config("method=edm")
    c.model.kwargs = dict(hidden=16, depth=1)
    c.train.update(num_steps=3, log_every=3, eval_every=3)
    c.eval.update(num_samples=64, edm_steps=4)
    workdir = tmp_path / "edm"
    experiment.train_and_evaluate(c, str(workdir))
    line = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(line["sw2_heun_7nfe"]) and line["sw2_floor"] > 0
