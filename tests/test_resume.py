"""Exact resume: a run SIGKILLed at any moment (also in the middle of writing a checkpoint) or stopped
by SIGTERM, and restarted, ends bitwise identical to an uninterrupted run; plus NaN handling of the
loop. Real ``python -m consistency_jax.main`` processes on a tiny toy config."""

import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from consistency_jax import experiment as E
from consistency_jax import loading

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 200
EVERY = 20
FLAGS = [
    "--config=configs/toy.py:method=ct",
    "--config.model.kwargs.hidden=16",
    "--config.model.kwargs.depth=2",
    "--config.data.batch_size=32",
    f"--config.train.num_steps={NUM_STEPS}",
    "--config.train.log_every=50",
    "--config.train.eval_every=100000",
    "--config.eval.num_samples=64",
    f"--config.checkpoint.every={EVERY}",
    "--config.checkpoint.keep=2",
]


def _launch(workdir: pathlib.Path, log: pathlib.Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "consistency_jax.main", *FLAGS, *extra, f"--workdir={workdir}"],
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def _entries(workdir: pathlib.Path) -> list[str]:
    try:
        return os.listdir(workdir / "checkpoints")
    except FileNotFoundError:
        return []


def _steps(workdir) -> list[int]:
    return sorted(int(n) for n in _entries(workdir) if n.isdigit())


def _tmp_steps(workdir) -> list[int]:
    return sorted(int(n.split(".")[0]) for n in _entries(workdir) if "orbax-checkpoint-tmp" in n)


def _wait_for(pred, proc, log, timeout=120.0):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            pytest.fail(
                f"the run exited with {proc.returncode} too early:\n{log.read_text()[-3000:]}"
            )
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail(f"timed out:\n{log.read_text()[-3000:]}")
        time.sleep(0.001)


@pytest.mark.slow
def test_killed_anywhere_resumes_bitwise(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_log, log = tmp_path / "ref.log", tmp_path / "run.log"
    # The uninterrupted run, alongside; it saves only at the end (the checkpoint cadence is not
    # part of the trajectory, so the configs still match).
    ref = _launch(ref_dir, ref_log, f"--config.checkpoint.every={NUM_STEPS}")

    # 1. SIGKILL while checkpoint >= 40 is being written (its temporary directory exists).
    p = _launch(run_dir, log)
    _wait_for(lambda: any(s >= 2 * EVERY for s in _tmp_steps(run_dir)), p, log)
    p.kill()
    p.wait()
    assert _tmp_steps(run_dir), "the kill should have interrupted a save"
    interrupted = max(_tmp_steps(run_dir))
    assert interrupted not in _steps(run_dir)

    # 2. Restart: the half-written step is cleaned up; SIGKILL at a random moment past step 80.
    p = _launch(run_dir, log)
    _wait_for(lambda: max(_steps(run_dir), default=0) >= 4 * EVERY, p, log)
    time.sleep(random.Random(1234).uniform(0.0, 0.05))
    p.kill()
    p.wait()

    # 3. Restart, then SIGTERM once it has saved a new step: finish the step, save, exit 0.
    p = _launch(run_dir, log)
    last = max(_steps(run_dir))
    _wait_for(lambda: max(_steps(run_dir), default=0) > last, p, log)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 0, log.read_text()[-3000:]
    stopped = re.findall(r"Stopped by SIGTERM after step (\d+): checkpoint saved", log.read_text())
    assert len(stopped) == 1
    stopped = int(stopped[0])
    assert max(_steps(run_dir)) == stopped and stopped < NUM_STEPS

    # 4. Restart and finish.
    p = _launch(run_dir, log)
    assert p.wait(timeout=120) == 0, log.read_text()[-3000:]
    resumed = f"Resumed from {run_dir / 'checkpoints' / str(stopped)} (step {stopped})"
    assert resumed in log.read_text()
    assert ref.wait(timeout=120) == 0, ref_log.read_text()[-3000:]
    assert _tmp_steps(run_dir) == [] and _tmp_steps(ref_dir) == []
    assert "Resumed" not in ref_log.read_text()

    want = loading.read_arrays(str(ref_dir), NUM_STEPS)
    got = loading.read_arrays(str(run_dir), NUM_STEPS)
    assert sorted(got) == sorted(want)
    assert any(k.startswith("state/target_params/") for k in got)  # θ⁻ is compared too
    assert any(k.startswith("ema/") for k in got)
    assert any(k.startswith("state/opt_state/") for k in got)
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
    # The runs did move away from their initialisation (a weak but independent sanity check).
    assert not np.array_equal(
        got["state/params/Dense_0/kernel"], got["state/target_params/Dense_0/kernel"]
    )


def test_nan_stops_the_run_and_only_finite_steps_are_checkpointed(toy_nan_run):
    """conftest's ``toy_nan_run`` (a warm-up to an absurd learning rate, a checkpoint every 5 steps,
    all kept): the error names the step, and every checkpoint written is finite."""
    msg = str(toy_nan_run.error)
    # Either the pending metrics (loss / grad_norm of step k) or the state itself (step k) is named.
    found = re.search(r"Non-finite (?:loss|grad_norm) \(\S+\) at step (\d+)", msg) or re.search(
        r"Refusing to checkpoint step (\d+): non-finite values in \w+", msg
    )
    assert found, msg
    bad_step = int(found.group(1))
    workdir = pathlib.Path(toy_nan_run.workdir)
    steps = _steps(workdir)
    assert steps and _tmp_steps(workdir) == []  # the last good save was committed
    assert all(s <= bad_step for s in steps) and bad_step < 200
    for s in steps:  # an independent check of every array written
        for name, a in loading.read_arrays(str(workdir), s).items():
            assert np.all(np.isfinite(a)), (s, name)


def test_preempted_in_process_resumes_bitwise(tmp_path, toy_ct_run, signal_at_step, caplog):
    """The quick form of test_killed_anywhere_resumes_bitwise, in this process: SIGTERM at step 2
    (finish the step, save, stop), what a kill in the middle of a save leaves (a temporary
    checkpoint directory), then the same command again: it cleans up, resumes from step 2 and ends
    bitwise equal to the uninterrupted session run (conftest's ``toy_ct_run``)."""
    import logging

    from conftest import tiny_ct_config

    run = tmp_path / "run"
    sent = signal_at_step(signal.SIGTERM, 2)
    with caplog.at_level(logging.INFO, logger="absl"):
        state = E.train_and_evaluate(tiny_ct_config(), str(run))
    assert sent == [2] and int(state.step) == 2 and _steps(run) == [2]
    assert any("Stopped by SIGTERM after step 2" in r.getMessage() for r in caplog.records)
    half = run / "checkpoints" / "4.orbax-checkpoint-tmp-1234"
    half.mkdir()
    (half / "partial").write_bytes(b"\0" * 10)
    assert _tmp_steps(run) == [4]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="absl"):
        state = E.train_and_evaluate(tiny_ct_config(), str(run))
    assert int(state.step) == 8 and _tmp_steps(run) == []
    assert any(
        "Resumed from" in r.getMessage() and "(step 2)" in r.getMessage() for r in caplog.records
    )
    got, want = loading.read_arrays(str(run), 8), toy_ct_run.arrays
    assert sorted(got) == sorted(want)
    assert any(k.startswith("state/target_params/") for k in got)  # θ⁻ is compared too
    assert any(k.startswith("ema/") for k in got) and any(
        k.startswith("state/opt_state/") for k in got
    )
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
    assert not np.array_equal(
        got["state/params/Dense_0/kernel"], got["state/target_params/Dense_0/kernel"]
    )
