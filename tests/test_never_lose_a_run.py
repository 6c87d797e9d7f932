"""Never lose a run, part 3 (issue 30; docs/never_lose_a_run.md): an evaluation is part of its step,
a diverging run never checkpoints garbage nor rotates out its last healthy checkpoint, every read of a
run is verified, a failed save stops the run in seconds with one error, and the smaller failures end
in clear errors. Each check runs quickly in this process; the ``slow`` tests do the same to real
processes (``python -m consistency_jax.main`` / ``.sample``), killed, diverging, on a broken disk."""

import errno
import json
import logging
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_config

from consistency_jax import checkpoint as C
from consistency_jax import experiment as E
from consistency_jax import export, loading, periodic
from consistency_jax import workdir_lock as W
from consistency_jax.networks import get_network
from consistency_jax.preemption import PreemptionWatcher
from consistency_jax.train_state import TrainState

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(num_steps=10, every=5, eval_every=5, log_every=5):
    c = load_config("toy", "method=ct")
    c.model.kwargs = dict(hidden=8, depth=1)
    c.data.batch_size = 16
    c.train.update(num_steps=num_steps, log_every=log_every, eval_every=eval_every)
    c.eval.num_samples = 32
    c.checkpoint.update(every=every, keep=3)
    return c


def _steps(workdir) -> list[int]:
    d = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if d.exists() else []


def _rows(workdir) -> list[dict]:
    return [
        json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    ]


def _tiny_state(rates=(0.9,)):
    module = get_network("mlp", hidden=8, depth=1)
    params = module.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
    return TrainState.create(params, optax.adam(1e-3), ema_rates=rates, use_target=True)


def _save_steps(workdir, state, steps, clean=True, keep=5):
    with C.Checkpointer(str(workdir), every=1, keep=keep) as ckpt:
        for s in steps:
            ckpt.save(
                state.replace(step=jnp.asarray(s, jnp.int32)),
                step=s,
                data_state={"step": s},
                config=_config(),
                clean=clean,
            )


def _flip_a_bit(item_dir: pathlib.Path, still_reads) -> None:
    """Flips one bit in the largest data file under ``item_dir``, at the first place where the files
    still read (a flip in an index is a read error, one in unused bytes changes nothing) but the
    value changed (``still_reads()`` raises CheckpointDamagedError)."""
    data = max(
        (p for p in item_dir.rglob("*") if p.is_file() and p.parent.name == "d"),
        key=lambda p: p.stat().st_size,
    )
    original = data.read_bytes()
    for offset in range(len(original) // 2, len(original), 97):
        damaged = bytearray(original)
        damaged[offset] ^= 0x10
        data.write_bytes(bytes(damaged))
        try:
            still_reads()
        except C.CheckpointDamagedError:
            return
        except Exception:  # noqa: BLE001 -- a read error: another byte
            pass
        data.write_bytes(original)
    pytest.fail("no flipped bit changed a value")


# ---------------------------------------------------------------- a. an evaluation is part of its step


def test_a_checkpointed_step_whose_evaluation_is_missing_is_evaluated_on_resume(tmp_path):
    E.train_and_evaluate(_config(), str(tmp_path))
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [5, 10]
    # As a run killed after committing step 10 but before its final evaluation leaves it.
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (tmp_path / "samples_00000010.png").unlink()
    E.train_and_evaluate(_config(), str(tmp_path))
    again = _rows(tmp_path)
    assert again == rows  # the same figures: the same state and evaluation key
    assert (tmp_path / "samples_00000010.png").exists()
    # Only the picture missing: made again, no second row.
    (tmp_path / "samples_00000010.png").unlink()
    E.train_and_evaluate(_config(), str(tmp_path))
    assert _rows(tmp_path) == rows and (tmp_path / "samples_00000010.png").exists()


# ---------------------------------------------------------------- b. diverging runs


def test_a_norm_jump_stops_the_run_naming_the_step_and_a_finite_resume():
    advice = "The newest healthy checkpoint is step 30"
    watch = periodic.NormWatch(100.0, start_norm=7.0, advice=lambda: advice)
    ok = [(k, {"param_norm": 7.0 + 0.01 * k, "update_norm": 0.1, "finite": 1}) for k in range(20)]
    watch.update(ok)
    # A skipped step (finite = 0) is not judged: its norms are of an update never applied.
    watch.update([(20, {"param_norm": np.inf, "update_norm": np.inf, "finite": 0})])
    with pytest.raises(periodic.UnhealthyStateError) as err:
        watch.update([(21, {"param_norm": 3.5e5, "update_norm": 3.5e5, "finite": 1})])
    text = str(err.value)
    assert text.startswith("Step 21: the parameter norm 3.5e+05 (running average 7.")
    assert "update norm 3.5e+05 (running average 0.1)" in text and advice in text
    assert (
        periodic.NormWatch(0.0, 1.0).update([(0, {"param_norm": 1e9, "update_norm": 1e9})]) is None
    )
    assert E._lower_lr(1e6) == "100000" and E._lower_lr(float("inf")) == "1e-4"


def test_the_newest_healthy_checkpoint_survives_rotation_and_is_resumed(tmp_path):
    state = _tiny_state()
    _save_steps(tmp_path, state, [10, 20], clean=True, keep=2)
    # Saved while steps were skipped: keep=2 would rotate 10 and 20 out; 20 (the newest healthy
    # one) stays.
    _save_steps(tmp_path, state, [30, 40, 50], clean=False, keep=2)
    assert _steps(tmp_path) == [20, 40, 50]
    ckpt = C.Checkpointer(str(tmp_path), every=1, keep=2)  # the mark is read back from disk
    assert ckpt.newest_healthy_step == 20
    assert ckpt.set_aside_unhealthy() == (20, [40, 50])
    ckpt.close()
    assert _steps(tmp_path) == [20]
    assert sorted(p.name.split("-")[0] for p in (tmp_path / C.UNHEALTHY_SUBDIR).iterdir()) == [
        "40",
        "50",
    ]


# ---------------------------------------------------------------- c. every read is verified


def test_every_read_of_a_run_verifies_checksums_and_falls_back_or_refuses(tmp_path, caplog):
    state = _tiny_state()
    _save_steps(tmp_path, state, [1, 2])
    _flip_a_bit(
        tmp_path / "checkpoints" / "2" / "ema",
        lambda: loading.load_eval_params(str(tmp_path), step=2),
    )
    with caplog.at_level(logging.WARNING):
        _, params, step = loading.load_eval_params(str(tmp_path))
    assert step == 1
    assert any("set aside" in r.getMessage() and "step 2" in r.getMessage() for r in caplog.records)
    want = jax.tree.leaves(state.ema_params[next(iter(state.ema_params))])
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), want))
    # What sample, evaluate and config.init read first names the intact step too.
    assert loading.eval_params_metadata(str(tmp_path))[1] == 1
    assert set(loading.read_arrays(str(tmp_path))) >= {"ema/0.9/Dense_0/kernel"}
    with pytest.raises(C.CheckpointDamagedError, match=r"step 2: the array ema/0\.9/\S+ does not"):
        loading.load_eval_params(str(tmp_path), step=2)
    assert _steps(tmp_path) == [1, 2]  # a reader moves nothing


# ---------------------------------------------------------------- d. a failed save


def _make_immutable(path: pathlib.Path) -> None:
    if os.geteuid() == 0:  # root ignores permissions: the immutable attribute
        subprocess.run(["chattr", "+i", str(path)], check=True)
    else:
        path.chmod(0o555)


def _make_mutable(path: pathlib.Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-R", "-i", str(path)], check=False)
    else:
        path.chmod(0o755)


def test_a_failed_save_stops_the_run_in_seconds_with_one_error(tmp_path, monkeypatch):
    save = C.Checkpointer.save
    broken = {}

    def breaking_save(self, state, *, step, **kw):
        if step == 10:
            self.wait()  # step 5 committed
            _make_immutable(tmp_path / "checkpoints")
            broken["at"] = time.time()
        return save(self, state, step=step, **kw)

    monkeypatch.setattr(C.Checkpointer, "save", breaking_save)
    try:
        with pytest.raises(C.CheckpointSaveError) as err:
            E.train_and_evaluate(_config(num_steps=40, eval_every=1000), str(tmp_path))
        took = time.time() - broken["at"]
    finally:
        _make_mutable(tmp_path / "checkpoints")
    assert took < 20, took  # was five 60 s joins and Orbax's 300 s timeout
    assert re.fullmatch(
        r"Saving checkpoint step 10 into \S+ failed: (Operation not permitted|Permission denied)"
        r"\S*: \S+\. Stopping the run; the newest complete checkpoint is step 5\.",
        str(err.value),
    ), str(err.value)
    assert not (tmp_path / W.LEASE_NAME).exists()


# ---------------------------------------------------------------- e. the smaller failures


def test_a_second_ctrl_c_while_a_save_is_prepared_is_held_a_third_aborts():
    watcher = PreemptionWatcher()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert watcher.received == "SIGINT"
        with watcher.saving(7):
            os.kill(os.getpid(), signal.SIGINT)  # held: the save goes on
            time.sleep(0.05)
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1.0)
    finally:
        watcher.close()


def test_a_heartbeat_on_a_full_disk_leaves_no_temporary_file(tmp_path, monkeypatch):
    store = W._LocalStore(str(tmp_path / W.LEASE_NAME))

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        store.replace("{}")
    assert os.listdir(tmp_path) == []


def test_a_workdir_that_is_a_file_and_a_failed_export_write_are_clear_errors(tmp_path):
    (tmp_path / "f").write_text("")
    for workdir in (tmp_path / "f", tmp_path / "f" / "run"):
        with pytest.raises(E.WorkdirError, match=rf"{tmp_path / 'f'} is a file, not a directory"):
            E.check_workdir(str(workdir))
    with pytest.raises(export.ExportError, match=r"Writing \S+/f/x\.npz failed: Not a directory"):
        export.save_npz(str(tmp_path / "f" / "x.npz"), np.zeros((1, 2, 2, 1), np.uint8))


# ---------------------------------------------------------------- the same to real processes

_FLAGS = [
    "--config=configs/toy.py:method=ct",
    "--config.model.kwargs.hidden=8",
    "--config.model.kwargs.depth=1",
    "--config.data.batch_size=16",
    "--config.eval.num_samples=32",
    "--config.checkpoint.keep=2",
]


def _launch(workdir, *flags, **kwargs):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen(
        [sys.executable, "-m", "consistency_jax.main", *_FLAGS, *flags, f"--workdir={workdir}"],
        cwd=REPO,
        env=env,
        **kwargs,
    )


def _wait_for(pred, proc, timeout=300.0):
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, f"the run exited with {proc.returncode}"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.01)


@pytest.mark.slow
def test_a_run_diverging_with_skipped_steps_keeps_and_names_its_healthy_checkpoint(tmp_path):
    run = tmp_path / "run"
    common = ["--config.train.log_every=5", "--config.checkpoint.every=5"]
    first = _launch(run, *common, "--config.train.num_steps=10", "--config.train.eval_every=1000")
    assert first.wait(timeout=600) == 0
    p = _launch(
        run,
        *common,
        "--config.train.num_steps=200",
        "--config.train.eval_every=1000",
        "--config.optim.lr=1e30",
        "--config.train.skip_nonfinite=True",
        "--config.train.max_consecutive_skips=12",
        "--config.train.max_norm_jump=0",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, err = p.communicate(timeout=600)
    err = err.decode()
    assert p.returncode == 1, err[-3000:]
    assert "SkipLimitError" in err and "The newest healthy checkpoint is step 10" in err, err[
        -3000:
    ]
    assert "--config.optim.lr=1e+29" in err and "inf" not in err.split("SkipLimitError")[-1]
    assert _steps(run) == [10]  # the steps saved while skipping were set aside, not resumed
    assert (run / C.UNHEALTHY_SUBDIR).exists()


@pytest.mark.slow
def test_a_run_killed_during_its_final_evaluation_evaluates_it_when_started_again(tmp_path):
    """SIGKILL between the commit of the final checkpoint and the end of its evaluation (quick form:
    test_a_checkpointed_step_whose_evaluation_is_missing_is_evaluated_on_resume). The kill lands
    in the window by watching the checkpoint directory; an attempt whose evaluation finished first
    is started again in a fresh directory (at most three)."""
    flags = [
        "--config.train.num_steps=20",
        "--config.train.log_every=10",
        "--config.train.eval_every=1000",
        "--config.checkpoint.every=10",
        "--config.eval.num_samples=4000",  # an evaluation of a few seconds (energy distance: n^2)
    ]
    for attempt in range(3):
        run = tmp_path / f"run{attempt}"
        a = _launch(run, *flags, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(lambda: 20 in _steps(run), a)
        a.kill()
        a.wait()
        if not (run / "samples_00000020.png").exists():
            break
    assert not (run / "samples_00000020.png").exists(), "every kill came after the evaluation"
    rows = _rows(run) if (run / "metrics.jsonl").exists() else []
    assert 20 not in [r["step"] for r in rows]
    b = _launch(run, *flags, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = b.communicate(timeout=900)[0].decode()
    assert b.returncode == 0, out[-3000:]
    assert "checkpointed but not evaluated" in out
    assert [r["step"] for r in _rows(run)] == [20] and (run / "samples_00000020.png").exists()


@pytest.mark.slow
def test_a_failed_save_of_a_real_process_stops_in_seconds_and_prints_one_error(tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "log"
    with open(log, "wb") as f:
        p = _launch(
            run,
            "--config.train.num_steps=1000000",
            "--config.train.log_every=50",
            "--config.train.eval_every=1000000",
            "--config.checkpoint.every=25",
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for(lambda: _steps(run), p)
        _make_immutable(run / "checkpoints")
        t0 = time.time()
        rc = p.wait(timeout=600)
        took = time.time() - t0
    finally:
        if p.poll() is None:
            p.kill()
        _make_mutable(run / "checkpoints")
    text = log.read_text()
    assert rc == 1 and took < 30, (rc, took, text[-3000:])
    last = text.strip().splitlines()[-1]
    assert re.fullmatch(
        r"CheckpointSaveError: Saving checkpoint step (\d+) into \S+ failed: .+\. Stopping the "
        r"run; the newest complete checkpoint is step 25\.",
        last,
    ), last
    # One error, no secondary traceback (before: 238 "Task exception was never retrieved"
    # tracebacks, ~1900 lines; then up to ~60 "Event loop is closed" errors of the abandoned save's
    # write callbacks, which arrive after Orbax closed its loop, as unraisable exceptions).
    assert "never retrieved" not in text and "Event loop is closed" not in text, text[-6000:]
    assert text.count("Traceback") == 0, text[-6000:]
    assert not (run / W.LEASE_NAME).exists()


@pytest.mark.slow
def test_a_full_disk_stops_a_real_process_at_the_failed_save(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)])
    assert mounted.returncode == 0, "this test mounts a 3 MB tmpfs: it runs as root (CI does)"
    try:
        run, log = mnt / "run", tmp_path / "log"
        with open(log, "wb") as f:
            p = _launch(
                run,
                "--config.train.num_steps=1000000",
                "--config.train.log_every=50",
                "--config.train.eval_every=1000000",
                "--config.checkpoint.every=25",
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        _wait_for(lambda: _steps(run), p)
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        (mnt / "filler").write_bytes(b"\0" * max(free - 20_000, 0))
        rc = p.wait(timeout=600)
        text = log.read_text()
        last = text.strip().splitlines()[-1]
        assert rc == 1, text[-3000:]
        assert re.fullmatch(
            r"CheckpointSaveError: Saving checkpoint step \d+ into \S+ failed: No space left on "
            r"device.*\. Stopping the run; the newest complete checkpoint is step 25\.",
            last,
        ), last
        # One error, no secondary traceback (see the test above).
        assert "never retrieved" not in text and "Event loop is closed" not in text, text[-3000:]
        assert text.count("Traceback") == 0, text[-3000:]
        assert [n for n in os.listdir(run) if n.endswith(".tmp")] == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


@pytest.mark.slow
def test_sample_falls_back_from_a_damaged_newest_step_and_refuses_it_by_number(tmp_path):
    """The sampling command, a real process, on a run whose newest EMA has one flipped bit that
    still reads (small arrays are inlined in OCDBT's checksummed b-tree nodes, where every flip is a
    read error, also set aside). Quick forms: the in-process readers above."""
    c = load_config("digits", "method=ict")
    c.data.data_dir = str(tmp_path / "tfds")
    c.data.batch_size = 8
    # nf=16: 3x3x16x16 kernels (9 KiB) are stored out of line, where a flipped bit still reads.
    c.model.kwargs = dict(nf=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    c.train.update(num_steps=2, log_every=1, eval_every=1000)
    c.checkpoint.update(every=1, keep=3)
    run = tmp_path / "run"
    E.train_and_evaluate(c, str(run))
    _flip_a_bit(
        run / "checkpoints" / "2" / "ema", lambda: loading.load_eval_params(str(run), step=2)
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "consistency_jax.sample", f"--workdir={run}", "--num_samples=4"]
    ok = subprocess.run([*cmd, f"--out={tmp_path / 'a'}"], cwd=REPO, env=env, capture_output=True)
    err = ok.stderr.decode()
    assert ok.returncode == 0, err[-3000:]
    assert re.search(r"Checkpoint step 2 in \S+ is set aside: Checkpoint step 2: the array", err)
    assert json.loads(ok.stdout.decode())["step"] == 1
    bad = subprocess.run(
        [*cmd, "--step=2", f"--out={tmp_path / 'b'}"], cwd=REPO, env=env, capture_output=True
    )
    assert bad.returncode == 1
    assert bad.stderr.decode().strip().splitlines()[-1].startswith("CheckpointDamagedError:")
