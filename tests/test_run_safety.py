"""Never lose a run (issue 17): one writer per workdir (a lease), failures that keep their
checkpoints, Ctrl-C, failed saves, recoverable NaNs with a limit on skipped steps, no duplicate
metric rows after a resume, and clear errors before compiling. One test runs real processes (two
launches on one workdir, then Ctrl-C); the others run in this process on a tiny toy config."""

import errno
import json
import logging
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import dead_pid, load_config

from consistency_jax import checkpoint as C
from consistency_jax import experiment as E
from consistency_jax import workdir_lock as W
from consistency_jax.preemption import PreemptionWatcher
from consistency_jax.writer import MetricWriter

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(num_steps=20, every=10, eval_every=10, log_every=5):
    c = load_config("toy", "method=ct")
    c.model.kwargs = dict(hidden=8, depth=1)
    c.data.batch_size = 16
    c.train.update(num_steps=num_steps, log_every=log_every, eval_every=eval_every)
    c.eval.num_samples = 32
    c.checkpoint.update(every=every, keep=3)
    return c


def _entries(workdir) -> list[str]:
    try:
        return os.listdir(pathlib.Path(workdir) / "checkpoints")
    except FileNotFoundError:
        return []


def _steps(workdir) -> list[int]:
    return sorted(int(n) for n in _entries(workdir) if n.isdigit())


def _tmp(workdir) -> list[str]:
    return [n for n in _entries(workdir) if "orbax-checkpoint-tmp" in n]


def _lease(workdir, **fields) -> dict:
    now = time.time()
    lease = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": now,
        "heartbeat": now,
        "token": "other",
        **fields,
    }
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(workdir) / W.LEASE_NAME).write_text(json.dumps(lease))
    return lease


# ---------------------------------------------------------------- the workdir lease


def test_lease_refuses_a_live_holder_and_takes_over_stale_ones(tmp_path, caplog):
    # A live holder on another host (fresh heartbeat): refused, naming host and pid.
    _lease(tmp_path, host="other-host", pid=4242)
    with pytest.raises(
        W.WorkdirLockedError,
        match=r"in use by another run: host other-host, pid "
        r"4242 .*last heartbeat \d+s ago",
    ):
        W.WorkdirLock(str(tmp_path)).acquire()
    # Another host whose heartbeat is older than the timeout: taken over.
    _lease(tmp_path, host="other-host", pid=4242, heartbeat=time.time() - 3600)
    with caplog.at_level(logging.WARNING):
        lock = W.WorkdirLock(str(tmp_path)).acquire()
    assert any(
        "Taking over the stale lease" in r.getMessage() and "heartbeat is" in r.getMessage()
        for r in caplog.records
    )
    # A second lock object of this process is refused while the first holds the lease.
    with pytest.raises(W.WorkdirLockedError, match=f"pid {os.getpid()}"):
        W.WorkdirLock(str(tmp_path)).acquire()
    lock.release()
    assert not (tmp_path / W.LEASE_NAME).exists()

    # A dead process on this host (fresh heartbeat): taken over at once.
    dead = dead_pid()
    _lease(tmp_path, pid=dead)
    caplog.clear()
    with caplog.at_level(logging.WARNING), W.WorkdirLock(str(tmp_path)) as lock:
        assert json.loads((tmp_path / W.LEASE_NAME).read_text())["pid"] == os.getpid()
    assert any(f"its process {dead} on this host is gone" in r.getMessage() for r in caplog.records)
    # A lease naming this very pid but held by no lock of this process: an earlier incarnation.
    _lease(tmp_path)
    W.WorkdirLock(str(tmp_path)).acquire().release()


def test_lock_objects_of_one_process_racing_for_a_lease_get_one_holder(tmp_path, monkeypatch):
    """Eight threads take the same free lease at once: one holds it (before the reservation of the
    path in the process, a thread could see the new lease before its holder was registered, judge it
    a leftover of an earlier process with this pid, and take it over: two holders). The time between
    creating the lease and holding it is stretched, as a slow store (GCS) stretches it."""
    import threading

    hold = W.WorkdirLock._hold

    def slow_hold(self, lease):
        time.sleep(0.2)
        hold(self, lease)

    monkeypatch.setattr(W.WorkdirLock, "_hold", slow_hold)
    for _ in range(2):
        results, barrier = [], threading.Barrier(8)

        def start():
            lock = W.WorkdirLock(str(tmp_path))
            barrier.wait()
            try:
                results.append(lock.acquire())
            except W.WorkdirLockedError as e:
                results.append(e)

        threads = [threading.Thread(target=start) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        holders = [r for r in results if isinstance(r, W.WorkdirLock)]
        assert len(holders) == 1, results
        holders[0].release()
        assert not (tmp_path / W.LEASE_NAME).exists()


def _eventually(pred, timeout=20.0):
    t0 = time.time()
    while not pred():
        assert time.time() - t0 < timeout
        time.sleep(0.01)


def test_lease_heartbeat_and_losing_it(tmp_path):
    lock = W.WorkdirLock(str(tmp_path), heartbeat_s=0.02, timeout_s=1.0).acquire()
    first = json.loads((tmp_path / W.LEASE_NAME).read_text())["heartbeat"]
    _eventually(lambda: json.loads((tmp_path / W.LEASE_NAME).read_text())["heartbeat"] > first)
    lock.check()
    _lease(tmp_path, host="thief", pid=1)  # another run took it over (it thought ours stale)
    _eventually(lambda: lock.lost is not None)
    with pytest.raises(W.WorkdirLockLostError, match="host thief, pid 1"):
        lock.check()
    lock.release()  # not ours any more: left in place
    assert json.loads((tmp_path / W.LEASE_NAME).read_text())["host"] == "thief"


# ---------------------------------------------------------------- real processes: lease and Ctrl-C

_FLAGS = [
    "--config=configs/toy.py:method=ct",
    "--config.model.kwargs.hidden=8",
    "--config.model.kwargs.depth=1",
    "--config.data.batch_size=16",
    "--config.train.num_steps=1000000",
    "--config.train.log_every=50",
    "--config.train.eval_every=1000000",
    "--config.eval.num_samples=32",
    "--config.checkpoint.every=25",
    "--config.checkpoint.keep=2",
]


def _launch(workdir, *extra, **kwargs):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen(
        [sys.executable, "-m", "consistency_jax.main", *_FLAGS, *extra, f"--workdir={workdir}"],
        cwd=REPO,
        env=env,
        **kwargs,
    )


def _wait_for(pred, proc, log, timeout=180.0):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            pytest.fail(f"the run exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail(f"timed out:\n{log.read_text()[-3000:]}")
        time.sleep(0.01)


@pytest.mark.slow
def test_second_launch_is_refused_ctrl_c_saves_and_the_run_resumes(tmp_path, caplog):
    run, log = tmp_path / "run", tmp_path / "a.log"
    with open(log, "wb") as f:
        a = _launch(run, stdout=f, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: _steps(run), a, log)
        # The second launch on the same workdir is refused, naming the live holder; it neither
        # deletes the first run's temporary checkpoint directories nor writes anything.
        b = _launch(run, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = b.communicate(timeout=180)
        assert b.returncode == 1, err.decode()[-3000:]
        last = err.decode().strip().splitlines()[-1]
        assert re.match(
            rf"WorkdirLockedError: The workdir {re.escape(str(run))} is in use by another "
            rf"run: host {re.escape(socket.gethostname())}, pid {a.pid} ",
            last,
        ), last
        # The first run goes on saving, then Ctrl-C: it finishes the step, saves and exits 130 with
        # one line.
        seen = max(_steps(run))
        _wait_for(lambda: max(_steps(run)) > seen, a, log)
        a.send_signal(signal.SIGINT)
        assert a.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        if a.poll() is None:
            a.kill()
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    last = text.strip().splitlines()[-1]
    stopped = re.fullmatch(
        r"Interrupted by Ctrl-C \(SIGINT\) at step (\d+): checkpoint step \1 saved "
        r"in \S+; run the same command again to resume\.",
        last,
    )
    assert stopped, last
    step = int(stopped.group(1))
    assert max(_steps(run)) == step and _tmp(run) == []
    assert not (run / W.LEASE_NAME).exists()

    # Resume in this process from that step, with rows after it in metrics.jsonl (as a run that
    # evaluated after its last save and then died leaves them): they are dropped, not repeated.
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "x": 1.0}) + "\n" + json.dumps({"step": step + 1, "x": 2.0}) + "\n"
    )
    c = load_config("toy", "method=ct")
    c.model.kwargs.hidden, c.model.kwargs.depth = 8, 1
    c.data.batch_size = 16
    c.train.update(num_steps=step + 5, log_every=50, eval_every=1000000)
    c.eval.num_samples = 32
    c.checkpoint.update(every=25, keep=2)
    with caplog.at_level(
        logging.INFO, logger="absl"
    ):  # absl flags parsed by another test set its level
        state = E.train_and_evaluate(c, str(run))
    assert int(state.step) == step + 5
    assert any(
        f"(step {step})" in r.getMessage() and "Resumed from" in r.getMessage()
        for r in caplog.records
    )
    rows = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, step + 5]


def test_second_ctrl_c_aborts_at_once():
    before = signal.getsignal(
        signal.SIGINT
    )  # default_int_handler; SIG_IGN in a pytest-xdist worker
    watcher = PreemptionWatcher()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert watcher.received == "SIGINT" and watcher.reached(1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)
    finally:
        watcher.close()
    assert signal.getsignal(signal.SIGINT) is before


# ---------------------------------------------------------------- failures keep their checkpoints


class _FailingEvaluator:
    def __call__(self, *args):
        raise RuntimeError("the evaluation failed on purpose")


def test_an_error_after_a_save_started_keeps_that_checkpoint(tmp_path, monkeypatch):
    """conftest's ``tiny_ct_config`` (the session run's train step) evaluating at step 4, where it
    also saves."""
    from conftest import tiny_ct_config

    monkeypatch.setattr(E, "build_evaluator", lambda *a: _FailingEvaluator())
    with pytest.raises(RuntimeError, match="the evaluation failed on purpose"):
        E.train_and_evaluate(tiny_ct_config(eval_every=4), str(tmp_path))
    # The save of step 4 (started just before the evaluation) was committed, nothing is left
    # half-written, the lease is released.
    assert _steps(tmp_path) == [4] and _tmp(tmp_path) == []
    assert not (tmp_path / W.LEASE_NAME).exists()

    # Resuming with num_steps below the saved step is an error, not "finished".
    with pytest.raises(
        C.CheckpointError,
        match=r"config\.train\.num_steps=2 is below the step of "
        r"the newest checkpoint .*\(step 4\)",
    ):
        E.train_and_evaluate(tiny_ct_config(num_steps=2), str(tmp_path))


def test_a_failed_write_stops_the_run_at_once_with_its_cause(tmp_path, monkeypatch):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as J

    async def disk_full(self, x, directory):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(J.JsonCheckpointHandler, "_save_fn", disk_full)
    calls = []
    jit_train_step = E.sharding_lib.jit_train_step

    def counting(*args, **kwargs):
        step = jit_train_step(*args, **kwargs)
        return lambda *a: (calls.append(1), step(*a))[1]

    monkeypatch.setattr(E.sharding_lib, "jit_train_step", counting)
    with pytest.raises(C.CheckpointSaveError) as err:
        E.train_and_evaluate(
            _config(num_steps=300, every=100, eval_every=1000, log_every=100), str(tmp_path)
        )
    assert re.match(
        r"Saving checkpoint step 100 into \S+ failed: No space left on device: \S+\. "
        r"Stopping the run; no checkpoint is complete\.",
        str(err.value),
    ), str(err.value)
    assert 100 <= len(calls) < 200  # stopped long before the next save would have noticed
    assert _steps(tmp_path) == [] and not (tmp_path / W.LEASE_NAME).exists()


# ---------------------------------------------------------------- NaN recovery


def test_nan_recovery_knobs_change_on_resume(toy_nan_run, tmp_path, caplog):
    """conftest's ``toy_nan_run`` (a warm-up to an absurd learning rate) diverged; the error names
    its newest healthy checkpoint and the command resuming it with a lower learning rate, which
    resumes (a copy of the run) with other optimizer knobs."""
    import shutil

    from conftest import tiny_nan_config

    source = pathlib.Path(toy_nan_run.workdir)
    assert isinstance(toy_nan_run.error, E.NonFiniteError)
    newest = max(_steps(source))
    msg = str(toy_nan_run.error)
    assert f"The newest healthy checkpoint is step {newest}; to resume it with a 10x lower" in msg
    assert re.search(
        rf"python -m consistency_jax\.main '--config=<your config file>' "
        rf"--workdir={re.escape(str(source))} --config\.optim\.lr=3e\+06\n",
        msg,
    ), msg

    # A lower learning rate without warm-up, gradient clipping switched on (another layout of the
    # optimizer state than the checkpoint's) and skip_nonfinite: resumes with a note, finishes.
    run = tmp_path / "run"
    shutil.copytree(source, run)
    c = tiny_nan_config()
    c.optim.update(lr=1e-3, warmup_steps=0, grad_clip=1.0)
    c.train.update(num_steps=newest + 10, skip_nonfinite=True)
    with caplog.at_level(logging.WARNING):
        state = E.train_and_evaluate(c, str(run))
    assert int(state.step) == newest + 10
    notes = [
        r.getMessage() for r in caplog.records if "changed training dynamics" in r.getMessage()
    ]
    assert notes and all(
        k in notes[0]
        for k in (
            "optim.lr: 30000000.0 -> 0.001",
            "optim.grad_clip: 0.0 -> 1.0",
            "optim.warmup_steps",
            "train.skip_nonfinite: False -> True",
        )
    ), notes
    assert np.isfinite(float(state.params["Dense_0"]["kernel"].sum()))


def _metrics(*finite):
    return [(i + 1, {"finite": f}) for i, f in enumerate(finite)]


def test_skipped_steps_are_limited():
    counter = E.SkipCounter(0, max_consecutive=3, max_fraction=1.0)
    counter.update(_metrics(1, 0, 0, 1, 0, 0), done=6, final=False)  # never 3 in a row so far
    with pytest.raises(
        E.SkipLimitError,
        match=r"skipped 3 steps in a row \(steps 5\.\.7; "
        r"config\.train\.max_consecutive_skips=3\)",
    ):
        counter.update([(7, {"finite": 0}), (8, {"finite": 0}), (9, {"finite": 0})], 9, False)
    # A fraction: judged from MIN_STEPS_FOR_SKIP_FRACTION steps on, or at the end of the run.
    counter = E.SkipCounter(100, max_consecutive=0, max_fraction=0.25)
    counter.update([(100 + i, {"finite": int(i % 2 == 0)}) for i in range(1, 11)], 110, False)
    with pytest.raises(
        E.SkipLimitError,
        match=r"skipped 10 of the 20 steps this run made \(steps "
        r"101\.\.120\), more than config\.train\."
        r"max_skip_fraction=0\.25",
    ):
        counter.update([(110 + i, {"finite": int(i % 2 == 0)}) for i in range(1, 11)], 120, True)
    counter = E.SkipCounter(0, max_consecutive=0, max_fraction=0.25)
    counter.update([(i, {"finite": 1}) for i in range(1, 101)], 100, False)
    counter.update([(i, {"finite": 0}) for i in range(101, 131)], 130, False)  # 30 of 130: fine


# ---------------------------------------------------------------- metrics.jsonl after a resume


def test_metric_rows_after_the_restored_step_are_dropped(tmp_path):
    rows = [{"step": s, "v": float(s)} for s in (5, 10, 15, 20)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 25, "v"')  # cut short
    MetricWriter(str(tmp_path), True, start_step=10).close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [5, 10]
    MetricWriter(str(tmp_path), False, start_step=0).close()  # not the main process: untouched
    assert len(path.read_text().splitlines()) == 2


# ---------------------------------------------------------------- validation before compiling


@pytest.mark.parametrize(
    "field,value,message",
    [
        (
            "train.max_consecutive_skips",
            -1,
            r"config\.train\.max_consecutive_skips must be an integer >= 0",
        ),
        ("train.max_skip_fraction", 0.0, r"config\.train\.max_skip_fraction must lie in \(0, 1\]"),
        ("eval.two_step_time", 100.0, r"config\.eval\.two_step_time"),
        ("optim.b2", 1.5, r"config\.optim\.b2 must lie in \[0, 1\), got 1\.5"),
        ("optim.eps", -1.0, r"config\.optim\.eps must be positive"),
        ("loss.huber_c", 0.0, r"config\.loss\.huber_c|huber_c must be positive"),
    ],
)
def test_bad_fields_are_named_before_compiling(field, value, message):
    from consistency_jax.build import validate

    c = _config()
    block, name = field.split(".")
    c[block][name] = value
    with pytest.raises(ValueError, match=message):
        validate(c)


def test_unsupported_workdirs_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    """gs:// workdirs work (tests/test_gcs.py); other URL schemes are refused by name, and nothing
    (no ./s3:/b/run) is made."""
    monkeypatch.chdir(tmp_path)
    for url, message in (
        ("s3://b/run", r"s3:// is not supported \(local paths and gs:// are\)"),
        ("gs://", "names no bucket"),
    ):
        with pytest.raises(ValueError, match=message):
            E.train_and_evaluate(_config(), url)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="workdir is empty"):
        E.train_and_evaluate(_config(), "")


# ---------------------------------------------------------------- integrity of saved arrays


def test_a_flipped_bit_is_caught_by_the_checksums_and_the_previous_step_used(tmp_path, caplog):
    import jax
    import jax.numpy as jnp
    import optax

    from consistency_jax.networks import get_network
    from consistency_jax.train_state import TrainState

    module = get_network("mlp", hidden=8, depth=1)
    params = module.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
    state = TrainState.create(params, optax.adam(1e-3), ema_rates=(0.9,), use_target=True)
    config = _config()
    with C.Checkpointer(str(tmp_path), every=1, keep=3) as ckpt:
        for step in (1, 2):
            ckpt.save(
                state.replace(step=jnp.asarray(step, jnp.int32)),
                step=step,
                data_state={"step": step},
                config=config,
            )
    sums = json.loads((tmp_path / C.CHECKSUM_SUBDIR / "2.json").read_text())["arrays"]
    assert "state/params/Dense_0/kernel" in sums and "ema/0.9/Dense_0/kernel" in sums

    # One flipped bit in the largest data file of step 2's state: tried at a few places until it
    # changes a value (a flip in unused bytes changes nothing; one in an index is a read error).
    data = max(
        (
            p
            for p in (tmp_path / "checkpoints" / "2" / "state").rglob("*")
            if p.is_file() and p.parent.name == "d"
        ),
        key=lambda p: p.stat().st_size,
    )
    original = data.read_bytes()
    ckpt = C.Checkpointer(str(tmp_path), every=1, keep=3)
    for offset in range(len(original) // 2, len(original), 97):
        damaged = bytearray(original)
        damaged[offset] ^= 0x10
        data.write_bytes(bytes(damaged))
        try:
            ckpt._restore_step(2, state)
        except C.CheckpointError as e:
            if "does not match its checksum" in str(e):
                message = str(e)
                break
        except Exception:  # noqa: BLE001 -- a read error: try another byte
            pass
        data.write_bytes(original)
    else:
        pytest.fail("no flipped bit changed a value")
    assert re.search(r"Checkpoint step 2: the array \S+ does not match its checksum", message)
    with caplog.at_level(logging.WARNING):
        restored, data_state = ckpt.restore(state)
    ckpt.close()
    assert int(restored.step) == 1 and data_state["step"] == 1
    assert _steps(tmp_path) == [1]  # step 2 moved aside, with its checksums
    moved = list((tmp_path / C.UNREADABLE_SUBDIR).iterdir())
    assert len(moved) == 1 and (moved[0] / "checksums.json").exists()
    assert any("does not match its checksum" in r.getMessage() for r in caplog.records)


def test_a_held_workdir_is_refused_and_ctrl_c_saves_in_process(tmp_path, signal_at_step):
    """The quick form of test_second_launch_is_refused_ctrl_c_saves_and_the_run_resumes, in this
    process: a workdir whose lease a live run holds is refused before anything is written; Ctrl-C
    at step 2 finishes the step, saves it and stops with one line; the same command resumes from
    step 2 and drops the metric rows after it."""
    from conftest import tiny_ct_config

    run = tmp_path / "run"
    _lease(run, host="other-host", pid=4242)
    with pytest.raises(
        W.WorkdirLockedError, match=r"in use by another run: host other-host, pid 4242 "
    ):
        E.train_and_evaluate(tiny_ct_config(), str(run))
    assert os.listdir(run) == [W.LEASE_NAME]
    (run / W.LEASE_NAME).unlink()

    sent = signal_at_step(signal.SIGINT, 2)
    with pytest.raises(E.RunInterrupted) as err:
        E.train_and_evaluate(tiny_ct_config(), str(run))
    assert sent == [2]
    assert re.fullmatch(
        r"Interrupted by Ctrl-C \(SIGINT\) at step 2: checkpoint step 2 saved in \S+; run the "
        r"same command again to resume\.",
        str(err.value),
    ), str(err.value)
    assert _steps(run) == [2] and _tmp(run) == [] and not (run / W.LEASE_NAME).exists()

    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "x": 1.0}) + "\n" + json.dumps({"step": 3, "x": 2.0}) + "\n"
    )
    state = E.train_and_evaluate(tiny_ct_config(), str(run))
    assert int(state.step) == 8
    rows = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 8]
