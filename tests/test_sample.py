"""The sampling command: deterministic per-example samples, the .npz and TFDS exports read back by
every reader, the same dataset on any mesh, a crashed export completed exactly, refusals."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consistency_jax import export, samplers
from consistency_jax import parameterization as param_lib
from consistency_jax import sample as sample_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 22  # samples: 3 shards of 8, 8, 6


def _tiny_digits_config(method, data_dir, **model):
    """configs/digits.py with ``method`` on a tiny DDPM++ (nf 4, one level, no attention)."""
    from conftest import load_config

    c = load_config("digits", f"method={method}")
    c.data.data_dir = data_dir
    c.data.batch_size = 8
    c.model.kwargs = dict(
        nf=4, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0, **model
    )
    return c


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_data_dir):
    """A tiny class-conditional digits iCT run, its checkpoint written directly (random weights: the
    sampler does not care how good it is, nor how the checkpoint was trained)."""
    from conftest import write_run

    c = _tiny_digits_config("ict", digits_data_dir, num_classes=10)
    c.data.use_labels = True
    return write_run(tmp_path_factory.mktemp("sample_run") / "run", c)


def _request(run_dir, out, **kw):
    base = dict(
        workdir=run_dir,
        out=str(out),
        num_samples=N,
        examples_per_shard=8,
        per_device_batch=4,
        seed=3,
    )
    base.update(kw)
    return sample_lib.SampleRequest(**base)


@pytest.fixture(scope="module")
def reference(run_dir, tmp_path_factory):
    """One uninterrupted export on this process's single device: the reference of the other tests."""
    root = tmp_path_factory.mktemp("sample_ref")
    request = _request(
        run_dir,
        root / "out",
        export_tfds="ref_samples",
        data_dir=str(root / "tfds"),
        keep_parts=True,
    )
    summary = sample_lib.run(request)
    with np.load(summary["npz"], allow_pickle=False) as z:
        return dict(
            root=root, request=request, summary=summary, images=z["arr_0"], labels=z["arr_1"]
        )


def _read_data_source(name, data_dir):
    import tensorflow_datasets as tfds

    ds = tfds.data_source(name, data_dir=data_dir, split="train")
    rows = [ds[i] for i in range(len(ds))]
    return np.stack([r["image"] for r in rows]), np.array([r["label"] for r in rows])


def test_samples_are_a_function_of_seed_and_index_alone():
    """Rows 5..9 of a batch of indices 0..15 equal a batch of indices 5..9 and the formula of CM
    Algorithm 1 with the draws fold_in(fold_in(key, i), j), recomputed here row by row."""
    sigmas = param_lib.SigmaConfig()
    apply_fn = lambda params, x, c, **kw: jnp.tanh(params["w"] * x) + 0.1 * c[:, None, None, None]
    params = {"w": jnp.float32(0.7)}
    key = jax.random.key(11)
    ts = (sigmas.sigma_max, 0.8)
    big = samplers.indexed_sample(
        apply_fn, params, key, jnp.arange(16), (4, 4, 1), ts, sigmas, clip=1.0
    )
    small = samplers.indexed_sample(
        apply_fn, params, key, jnp.arange(5, 10), (4, 4, 1), ts, sigmas, clip=1.0
    )
    np.testing.assert_array_equal(np.asarray(big[5:10]), np.asarray(small))
    f = lambda x, t: param_lib.consistency_fn(apply_fn, params, x, jnp.full((1,), t), sigmas)
    for i in (0, 7, 15):
        k = jax.random.fold_in(key, i)
        z0 = jax.random.normal(jax.random.fold_in(k, 0), (1, 4, 4, 1))
        z1 = jax.random.normal(jax.random.fold_in(k, 1), (1, 4, 4, 1))
        x = jnp.clip(f(ts[0] * z0, ts[0]), -1, 1)
        x = jnp.clip(f(x + np.sqrt(0.8**2 - sigmas.sigma_min**2) * z1, 0.8), -1, 1)
        np.testing.assert_allclose(np.asarray(big[i]), np.asarray(x[0]), rtol=1e-6, atol=1e-6)
    labels = samplers.example_labels(samplers.example_keys(key, jnp.arange(2000)), 10)
    counts = np.bincount(np.asarray(labels), minlength=10)
    assert counts.min() > 150 and counts.max() < 250, counts  # uniform over the 10 classes


def test_export_reads_back_with_every_reader(reference, tmp_path):
    import tensorflow_datasets as tfds

    images, labels = reference["images"], reference["labels"]
    assert images.dtype == np.uint8 and images.shape == (N, 8, 8, 1) and labels.shape == (N,)
    assert len(set(labels.tolist())) > 3  # uniform labels, not all one class
    data_dir = str(reference["root"] / "tfds")
    got_images, got_labels = _read_data_source("ref_samples", data_dir)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    builder = tfds.builder_from_directory(os.path.join(data_dir, "ref_samples", "1.0.0"))
    assert builder.info.splits["train"].num_examples == N
    assert builder.info.features["label"].num_classes == 10
    rows = list(tfds.as_numpy(tfds.load("ref_samples", data_dir=data_dir, split="train")))
    np.testing.assert_array_equal(np.stack([r["image"] for r in rows]), images)
    np.testing.assert_array_equal(np.array([r["label"] for r in rows]), labels)
    # The project's training pipeline reads the dataset by name (a teacher's samples as a data set).
    from consistency_jax import data as data_lib

    cfg = data_lib.ImageDataConfig(
        name="ref_samples",
        data_dir=data_dir,
        image_size=8,
        num_channels=1,
        use_labels=True,
        random_flip=False,
    )
    arrays = data_lib.load_image_arrays(cfg)
    np.testing.assert_allclose(arrays["image"], images.astype(np.float64) / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(arrays["label"], labels)
    it = data_lib.make_image_iterator(cfg, global_batch_size=8, seed=0)
    assert it.reader == "data_source" and next(it)["image"].shape == (8, 8, 8, 1)
    # The grid and the plan.
    out = reference["root"] / "out"
    assert (out / "grid.png").exists()
    assert json.loads((out / "plan.json").read_text())["complete"] is True


_WITHOUT_TF = r"""
import importlib.util, site, sys
site.addsitedir(sys.argv[1])
assert importlib.util.find_spec("tensorflow") is None
import numpy as np, tensorflow_datasets as tfds
ds = tfds.data_source(sys.argv[3], data_dir=sys.argv[2], split="train")
np.savez(sys.argv[4], images=np.stack([ds[i]["image"] for i in range(len(ds))]),
         labels=np.array([ds[i]["label"] for i in range(len(ds))]))
assert not any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)
"""


@pytest.mark.slow
def test_export_reads_back_in_a_fresh_python_without_tensorflow(reference, tmp_path):
    from conftest import site_without_tensorflow

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    result = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            _WITHOUT_TF,
            site_without_tensorflow(tmp_path),
            str(reference["root"] / "tfds"),
            "ref_samples",
            str(tmp_path / "got.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(tmp_path / "got.npz") as z:
        np.testing.assert_array_equal(z["images"], reference["images"])
        np.testing.assert_array_equal(z["labels"], reference["labels"])


def _cli(run_dir, out, data_dir, name, extra_env=None, extra_flags=()):
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
    env.update(extra_env or {})
    return [
        sys.executable,
        "-m",
        "consistency_jax.sample",
        f"--workdir={run_dir}",
        f"--out={out}",
        f"--num_samples={N}",
        "--examples_per_shard=8",
        "--per_device_batch=4",
        "--seed=3",
        f"--export_tfds={name}",
        f"--data_dir={data_dir}",
        *extra_flags,
    ], env


@pytest.mark.slow
def test_same_dataset_on_four_devices_and_on_two_processes(run_dir, reference, tmp_path):
    """1 device (the reference), 4 devices of one process and 2 processes of 2 devices each write the
    same images and labels."""
    from conftest import SLOW_CPU_COLLECTIVES, subprocess_xla_flags
    from test_multihost import _free_port

    data_dir = str(tmp_path / "tfds")
    cmd, env = _cli(run_dir, tmp_path / "four", data_dir, "four_devices")
    env["XLA_FLAGS"] = subprocess_xla_flags("--xla_force_host_platform_device_count=4")
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ]
    coordinator = f"localhost:{_free_port()}"
    for i in range(2):
        cmd, env = _cli(
            run_dir,
            tmp_path / "hosts",
            data_dir,
            "two_hosts",
            extra_env=dict(
                CONSISTENCY_JAX_DISTRIBUTED="1",
                JAX_COORDINATOR_ADDRESS=coordinator,
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
                XLA_FLAGS=subprocess_xla_flags(
                    "--xla_force_host_platform_device_count=2", SLOW_CPU_COLLECTIVES
                ),
            ),
        )
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[-3000:] for o in outs)
    for name in ("four_devices", "two_hosts"):
        images, labels = _read_data_source(name, data_dir)
        np.testing.assert_array_equal(images, reference["images"], err_msg=name)
        np.testing.assert_array_equal(labels, reference["labels"], err_msg=name)
    # Each host wrote its own shards: shard s by host s mod 2 (the summary counts what it generated).
    generated = sorted(json.loads(o[o.index("{") :])["generated"] for o in outs[1:])
    assert generated == [8, 14]


def test_an_export_that_crashed_is_completed_without_a_missing_or_duplicated_example(
    run_dir, reference, tmp_path, monkeypatch
):
    """The ArrayRecord writer dies half-way through the second shard file it writes (a partial file in
    .incomplete/): no reader sees an incomplete dataset, and the rerun completes the same dataset."""
    import tensorflow_datasets as tfds

    real = export.write_array_record
    calls = []

    def dying_writer(path, records):
        calls.append(path)
        if len(calls) == 2:
            real(path, records[: len(records) // 2])
            raise OSError("simulated crash while writing a shard")
        real(path, records)

    monkeypatch.setattr(export, "WRITERS", dict(export.WRITERS, array_record=dying_writer))
    request = _request(
        run_dir, tmp_path / "out", export_tfds="crashed", data_dir=str(tmp_path / "tfds")
    )
    with pytest.raises((OSError, export.ExportError), match="simulated crash"):
        sample_lib.run(request)
    ds_dir = tmp_path / "tfds" / "crashed" / "1.0.0"
    assert not (ds_dir / "dataset_info.json").exists()
    # The failed write left no half-written file behind (export.writing removes it on failure).
    assert not any("00001-of-" in f for f in os.listdir(ds_dir / ".incomplete"))
    assert not list(ds_dir.glob("*00001-of-*"))
    with pytest.raises(Exception):  # noqa: B017 (TFDS raises one of several types)
        tfds.data_source("crashed", data_dir=str(tmp_path / "tfds"), split="train")
    monkeypatch.setattr(export, "WRITERS", dict(export.WRITERS, array_record=real))
    summary = sample_lib.run(request)
    assert summary["generated"] == N - 8  # the first shard was kept, the rest generated again
    images, labels = _read_data_source("crashed", str(tmp_path / "tfds"))
    np.testing.assert_array_equal(images, reference["images"])
    np.testing.assert_array_equal(labels, reference["labels"])
    assert not (ds_dir / ".incomplete").exists()


def test_refusals_before_anything_is_computed(run_dir, reference, tmp_path):
    # A finished output and an existing dataset are never overwritten without --overwrite.
    with pytest.raises(sample_lib.SampleError, match="finished sampling run"):
        sample_lib.run(reference["request"])
    other = _request(
        run_dir,
        tmp_path / "new",
        export_tfds="ref_samples",
        data_dir=str(reference["root"] / "tfds"),
    )
    with pytest.raises(sample_lib.SampleError, match="already exists"):
        sample_lib.run(other)
    # An unfinished output of a different request.
    (tmp_path / "half").mkdir()
    plan = sample_lib.plan_of(
        _request(run_dir, tmp_path / "half"),
        sample_lib.describe_run(_request(run_dir, tmp_path / "half")),
    )
    plan["complete"] = False
    (tmp_path / "half" / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(sample_lib.SampleError, match=r"differs in \['seed'\]"):
        sample_lib.run(_request(run_dir, tmp_path / "half", seed=4))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(sample_lib.SampleError, match="not a sampling output"):
        sample_lib.run(_request(run_dir, tmp_path / "junk"))
    # Flags that do not fit the run.
    for kw, message in (
        (dict(sampler="heun"), "is for EDM teachers"),
        (dict(labels="12"), "not a class of this run"),
        (dict(sampler="multistep"), "needs the times"),
        (dict(sampler="multistep", ts=(80.0, 100.0)), "strictly decreasing"),
        (dict(sampler="multistep", ts_indices=(0, 500)), "Indices must lie"),
        (dict(num_samples=0), "positive integer"),
        (dict(export_tfds="Bad-Name"), "lower_snake_case"),
    ):
        with pytest.raises(sample_lib.SampleError, match=message):
            sample_lib.run(_request(run_dir, tmp_path / "x", **kw))
    assert not (tmp_path / "x").exists()
    # --overwrite replaces the finished output.
    summary = sample_lib.run(_request(run_dir, tmp_path / "o2", num_samples=4, grid=False))
    summary = sample_lib.run(
        _request(run_dir, tmp_path / "o2", num_samples=4, grid=False, seed=5, overwrite=True)
    )
    assert summary["generated"] == 4


def test_multistep_indices_and_fixed_labels(run_dir, reference, tmp_path):
    """--ts_indices on the run's grid equals --ts with those times; --labels=K gives class K."""
    from consistency_jax import methods

    model = sample_lib.describe_run(_request(run_dir, tmp_path / "a"))
    grid_n = methods.get(model.config.method).grid_size(model.config)
    times = samplers.times_from_indices((0, grid_n // 2), grid_n, model.sigmas)
    a = sample_lib.run(
        _request(
            run_dir,
            tmp_path / "a",
            sampler="multistep",
            ts_indices=(0, grid_n // 2),
            labels="3",
            num_samples=6,
        )
    )
    b = sample_lib.run(
        _request(run_dir, tmp_path / "b", sampler="multistep", ts=times, labels="3", num_samples=6)
    )
    with np.load(a["npz"]) as za, np.load(b["npz"]) as zb:
        np.testing.assert_array_equal(za["arr_0"], zb["arr_0"])
        assert (za["arr_1"] == 3).all()
        assert not np.array_equal(za["arr_0"], reference["images"][:6])  # 2 steps differ from 1


# ---------------------------------------------------------------------------------------------------
# τ search (CM §6)


def test_ternary_and_greedy_search_find_the_brute_force_optimum():
    from consistency_jax.sample import tau_search

    grid = np.geomspace(80.0, 0.002, 40)
    targets = (3.0, 0.4)  # the best τ_1 and τ_2 of a separable unimodal score in log-time

    def score(ts):
        return sum((np.log(t) - np.log(targets[j])) ** 2 for j, t in enumerate(ts[1:]))

    for method in ("ternary", "exhaustive"):
        got = tau_search.greedy_search(score, grid, 3, method=method)
        # Brute force, independently: stage 1 over all indices, then stage 2 below the first.
        i1 = min(range(1, 39), key=lambda i: (np.log(grid[i]) - np.log(3.0)) ** 2)
        i2 = min(range(i1 + 1, 39), key=lambda i: (np.log(grid[i]) - np.log(0.4)) ** 2)
        assert got["indices"] == [0, i1, i2], method
        assert got["score"] == pytest.approx(score(tuple(grid[[0, i1, i2]])))
        assert all(
            e["score"] >= got["score"] - 1e-12 for e in got["evaluations"] if len(e["indices"]) == 3
        )
    ternary = tau_search.greedy_search(score, grid, 2, method="ternary")
    exhaustive = tau_search.greedy_search(score, grid, 2, method="exhaustive")
    assert ternary["indices"] == exhaustive["indices"]
    assert len(ternary["evaluations"]) < len(exhaustive["evaluations"]) == 38
    with pytest.raises(ValueError, match="strictly decreasing"):
        tau_search.greedy_search(score, grid[::-1], 2)
    # A NaN score never wins.
    nan_at_best = lambda ts: (
        float("nan") if len(ts) > 1 and abs(ts[1] - grid[i1]) < 1e-12 else score(ts)
    )
    assert tau_search.greedy_search(nan_at_best, grid, 2, method="exhaustive")["indices"][1] != i1


def test_tau_search_command_scores_the_sampling_commands_samples(run_dir, reference, tmp_path):
    """The scorer's samples at (T,) are the sampling command's (same seed, same i); the command
    writes the search with every score, the chosen times scoring lowest among the candidates."""
    from consistency_jax import loading, methods, networks
    from consistency_jax.sample import tau_search

    model = sample_lib.describe_run(_request(run_dir, tmp_path / "t"))
    _, params, _ = loading.load_eval_params(run_dir)
    apply_fn = networks.make_apply_fn(methods.network(model.config))
    seen = []
    score = tau_search.make_scorer(
        apply_fn,
        params,
        model.sigmas,
        model.example_shape,
        N,
        lambda x: seen.append(x) or 0.0,
        seed=3,
        num_classes=10,
        consistency_fn=model.consistency_fn,
        batch=8,
    )
    score((model.sigmas.sigma_max,))
    np.testing.assert_array_equal(
        np.round((seen[0] + 1) * 127.5).astype(np.uint8), reference["images"]
    )

    summary = sample_lib.run_tau_search(
        _request(
            run_dir,
            tmp_path / "t",
            tau_search=True,
            num_samples=24,
            search="exhaustive",
            search_stride=2,
            num_scales=8,
        )
    )
    result = json.loads((tmp_path / "t" / "tau_search.json").read_text())
    assert result["metric"] == "digits_fd" and len(result["evaluations"]) == 3  # indices 1, 3, 5
    assert result["score"] == min(e["score"] for e in result["evaluations"])
    assert summary["times"][0] == model.sigmas.sigma_max and len(summary["times"]) == 2
    # The recorded score is the digits-FD of those samples, recomputed here.
    from consistency_jax.evaluators import digits as digits_lib

    check = tau_search.make_scorer(
        apply_fn,
        params,
        model.sigmas,
        model.example_shape,
        24,
        lambda x: digits_lib.digits_fd(x, data_dir=model.config.data.data_dir),
        seed=3,
        num_classes=10,
        consistency_fn=model.consistency_fn,
        batch=24,  # the command's batch (min(500, num_samples)): its compiled sampler is reused
    )
    assert check(tuple(result["times"])) == pytest.approx(result["score"], rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# Zero-shot editing through the command


def test_editing_modes_of_the_command_keep_the_known_part(run_dir, tmp_path):
    model = sample_lib.describe_run(_request(run_dir, tmp_path / "x"))
    # One step each (the multistep loops are tested in test_editing.py): one short compilation per mode.
    common = dict(
        num_samples=6,
        inputs="tfds:sklearn_digits/8:test",
        data_dir=model.config.data.data_dir,
        ts=(80.0,),
    )
    out = sample_lib.run_edit(
        _request(run_dir, tmp_path / "inpaint", edit="inpaint", mask="left_half", **common)
    )
    with np.load(out["npz"]) as z:
        result, inputs = z["arr_0"], z["inputs"]
    assert result.shape == (6, 8, 8, 1) and (tmp_path / "inpaint" / "edit.png").exists()
    np.testing.assert_array_equal(
        result[:, :, 4:], inputs[:, :, 4:]
    )  # the right half is the input's
    out = sample_lib.run_edit(
        _request(run_dir, tmp_path / "sr", edit="superres", patch_size=2, **common)
    )
    with np.load(out["npz"]) as z:
        mean = lambda a: a.astype(np.float64).reshape(6, 4, 2, 4, 2).mean(axis=(2, 4))
        # The 2×2 patch means of the (unquantised) result are the input's.
        np.testing.assert_allclose(mean(z["float"]), mean(z["inputs"] / 127.5 - 1.0), atol=1e-5)
    for edit, extra in (
        ("denoise", dict(edit_sigma=0.5, noise_inputs=True)),
        ("sdedit", dict(edit_sigma=5.0, ts=(5.0,))),
        ("interpolate", dict(num_alphas=3)),
    ):
        out = sample_lib.run_edit(
            _request(run_dir, tmp_path / edit, edit=edit, **{**common, **extra})
        )
        with np.load(out["npz"]) as z:
            assert z["arr_0"].shape == (
                (3, 6, 8, 8, 1) if edit == "interpolate" else (6, 8, 8, 1)
            ), edit
    with pytest.raises(sample_lib.SampleError, match="needs an RGB run"):
        sample_lib.run_edit(_request(run_dir, tmp_path / "c", edit="colorize", **common))
    with pytest.raises(sample_lib.SampleError, match="needs --edit_sigma"):
        _request(run_dir, tmp_path / "d", edit="denoise", **common)
    with pytest.raises(sample_lib.SampleError, match="neither a preset"):
        sample_lib.run_edit(
            _request(run_dir, tmp_path / "m", edit="inpaint", mask="nowhere", **common)
        )


@pytest.mark.slow
def test_export_killed_by_sigkill_is_completed_exactly_by_a_rerun(run_dir, tmp_path):
    """A real SIGKILL while shards are being written; the rerun (same flags) completes the dataset:
    every example present once, equal to a direct computation of samples 0..N−1."""
    import signal
    import time

    import tensorflow_datasets as tfds

    from consistency_jax import loading, methods, networks

    n, per_shard = 800, 8  # 100 shards: still running when the third part appears
    data_dir, out = str(tmp_path / "tfds"), tmp_path / "out"
    cmd, env = _cli(run_dir, out, data_dir, "killed")
    cmd = [a for a in cmd if not a.startswith(("--num_samples", "--examples_per_shard"))]
    cmd += [f"--num_samples={n}", f"--examples_per_shard={per_shard}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    parts = out / "parts"
    t0 = time.time()
    while not (parts.exists() and len(os.listdir(parts)) >= 3):
        assert proc.poll() is None, "the export ended before it could be killed"
        assert time.time() - t0 < 300, "no shard written in time"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "tfds" / "killed" / "1.0.0" / "dataset_info.json").exists()
    request = _request(
        run_dir,
        out,
        num_samples=n,
        examples_per_shard=per_shard,
        export_tfds="killed",
        data_dir=data_dir,
    )
    summary = sample_lib.run(request)
    assert 0 < summary["generated"] < n  # what the killed process finished was kept
    images, labels = _read_data_source("killed", data_dir)
    info = tfds.builder_from_directory(str(tmp_path / "tfds" / "killed" / "1.0.0")).info
    assert info.splits["train"].shard_lengths == [per_shard] * (n // per_shard)
    model = sample_lib.describe_run(request)
    _, params, _ = loading.load_eval_params(run_dir)
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))
    generate = sample_lib.make_generator(
        request, model, networks.make_apply_fn(methods.network(model.config)), mesh
    )
    # In the command's batches: XLA:CPU may round a convolution's last bit differently at another
    # batch size, which flips the odd uint8 (1 pixel in 51200 in one run with all 800 at once).
    batch = request.per_device_batch * len(jax.local_devices())
    want = [generate(params, np.arange(i, i + batch, dtype=np.int32)) for i in range(0, n, batch)]
    np.testing.assert_array_equal(images, np.concatenate([np.asarray(w[0]) for w in want]))
    np.testing.assert_array_equal(labels, np.concatenate([np.asarray(w[1]) for w in want]))


@pytest.fixture(scope="module")
def edm_run_dir(run_dir, digits_data_dir):
    """A tiny unconditional digits EDM run (written directly), beside the iCT run."""
    from conftest import write_run

    c = _tiny_digits_config("edm", digits_data_dir)
    return write_run(os.path.join(os.path.dirname(run_dir), "edm"), c, seed=1)


def test_edm_teacher_runs_sample_with_heun_and_edit(edm_run_dir, tmp_path):
    """An EDM run is sampled with EDM's Heun sampler from the per-example noise (recomputed here with
    ``edm_heun_sample``), refuses consistency samplers, and edits with the teacher."""
    from consistency_jax import loading, methods, networks

    summary = sample_lib.run(_request(edm_run_dir, tmp_path / "s", num_samples=5, heun_steps=3))
    model = sample_lib.describe_run(_request(edm_run_dir, tmp_path / "s2"))
    _, params, _ = loading.load_eval_params(edm_run_dir)
    apply_fn = networks.make_apply_fn(methods.network(model.config))
    keys = samplers.example_keys(jax.random.key(3), jnp.arange(5))
    x_init = model.sigmas.sigma_max * samplers.example_noise(keys, 0, model.example_shape)
    denoise = lambda x, t: param_lib.denoiser_fn(apply_fn, params, x, t, model.sigmas)
    x = jnp.clip(
        samplers.edm_heun_sample(
            denoise, jax.random.key(0), x_init.shape, model.sigmas, 3, x_init=x_init
        ),
        -1,
        1,
    )
    want = np.clip(np.round((np.asarray(x) + 1) * 127.5), 0, 255).astype(np.uint8)
    with np.load(summary["npz"]) as z:
        assert "arr_1" not in z.files  # unconditional: no labels
        np.testing.assert_array_equal(z["arr_0"], want)
    with pytest.raises(sample_lib.SampleError, match="with --sampler=heun"):
        sample_lib.run(_request(edm_run_dir, tmp_path / "x", sampler="onestep"))
    out = sample_lib.run_edit(
        _request(
            edm_run_dir,
            tmp_path / "e",
            edit="inpaint",
            mask="top_half",
            num_samples=4,
            heun_steps=3,
            inputs="tfds:sklearn_digits/8:test",
            data_dir=model.config.data.data_dir,
        )
    )
    with np.load(out["npz"]) as z:
        np.testing.assert_array_equal(
            z["arr_0"][:, 4:], z["inputs"][:, 4:]
        )  # the bottom half is kept


def test_trigflow_runs_sample_in_their_own_parameterisation(digits_data_dir, tmp_path):
    """An sCT run is sampled through TrigFlow's consistency function: x_σ = T·z is the TrigFlow
    point cos s·x_σ at the angle s = arctan(T/σ_d), and f = cos s·x_s − sin s·σ_d·F_θ(x_s/σ_d, s)
    (sCM Eq. 6), recomputed here from the raw network."""
    from conftest import write_run

    from consistency_jax import loading, methods, networks, trigflow

    c = _tiny_digits_config("sct", digits_data_dir)
    workdir = write_run(tmp_path / "sct", c, seed=2)
    summary = sample_lib.run(_request(workdir, tmp_path / "s", num_samples=4, clip=0.0))
    model = sample_lib.describe_run(_request(workdir, tmp_path / "s2"))
    assert model.consistency_fn is trigflow.consistency_fn_sigma
    _, params, _ = loading.load_eval_params(workdir)
    apply_fn = networks.make_apply_fn(methods.network(model.config))
    sd, big_t = model.sigmas.sigma_data, model.sigmas.sigma_max
    keys = samplers.example_keys(jax.random.key(3), jnp.arange(4))
    x_sigma = big_t * np.asarray(samplers.example_noise(keys, 0, model.example_shape), np.float64)
    s = np.arctan(big_t / sd)
    x_s = np.cos(s) * x_sigma
    raw = np.asarray(
        apply_fn(
            params,
            jnp.asarray(x_s / sd, jnp.float32),
            trigflow.time_input(jnp.full((4,), s, jnp.float32), model.sigmas.c_noise),
        ),
        np.float64,
    )
    f = np.cos(s) * x_s - np.sin(s) * sd * raw
    want = np.clip(np.round((f + 1) * 127.5), 0, 255)
    with np.load(summary["npz"]) as z:
        # uint8 levels: equal up to a float32 rounding at a level boundary
        assert np.abs(z["arr_0"].astype(np.float64) - want).max() <= 1
        assert np.mean(z["arr_0"] == want) > 0.99


def test_same_dataset_whatever_the_batch_and_the_shards(run_dir, reference, tmp_path):
    """The quick form of test_same_dataset_on_four_devices_and_on_two_processes, in this process: a
    sample is a function of the seed and its index alone, so another batch per device and another
    shard size (which is what other meshes and hosts change) write the same images and labels.
    (The quick forms of the other subprocess tests: test_export_reads_back_with_every_reader reads
    the export through the data_source reader; test_an_export_that_crashed_is_completed_without_a_-
    missing_or_duplicated_example completes an interrupted export.)"""
    summary = sample_lib.run(
        _request(
            run_dir,
            tmp_path / "out",
            per_device_batch=3,
            examples_per_shard=5,
            export_tfds="other_layout",
            data_dir=str(tmp_path / "tfds"),
        )
    )
    assert summary["generated"] == N
    images, labels = _read_data_source("other_layout", str(tmp_path / "tfds"))
    np.testing.assert_array_equal(images, reference["images"])
    np.testing.assert_array_equal(labels, reference["labels"])
