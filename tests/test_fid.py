"""Tests of the FID Inception-v3 and the FID/KID/IS/precision-recall figures (no torch needed).

tests/fixtures/inception_reference.npz (tools/make_inception_fixture.py) holds what torch-fidelity's
Inception (pytorch-fid's FID blocks, TF1 resize) computes in float64 with random weights, which are
regenerated here by the fixture script's own NumPy generator from the library's table of tensor
names and shapes, and the FID/KID/IS/PR of torch-fidelity and pytorch-fid on random features. The
formulas are also checked against direct NumPy/SciPy computations written here.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.special
from conftest import load_npz, load_tool, subprocess_xla_flags

from consistency_jax import torch_pickle, weights_cache
from consistency_jax.evaluators import inception_metrics as ev
from consistency_jax.metrics import fid as F
from consistency_jax.metrics import inception_v3 as I

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "inception_reference.npz"
BATCH = 4  # images per compiled batch everywhere below: one compilation per image shape


def _offline_empty_cache(monkeypatch, tmp_path):
    """No weights anywhere and no download (the default path would fetch pytorch-fid's file)."""
    monkeypatch.setenv(weights_cache.CACHE_ENV, str(tmp_path / "empty_cache"))
    monkeypatch.setenv(weights_cache.OFFLINE_ENV, "1")


make_fixture = load_tool("make_inception_fixture")
convert = load_tool("convert_inception_weights")


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    return load_npz(FIXTURE)


@pytest.fixture(scope="module")
def state(ref) -> dict[str, np.ndarray]:
    state = make_fixture.random_inception_state_dict(I.inception_tensor_shapes())
    assert len(state) == int(ref["num_tensors"]) == 472
    np.testing.assert_array_equal(
        make_fixture.state_checksums(state),
        ref["state_sums"],
        err_msg="NumPy's random stream changed: rerun tools/make_inception_fixture.py",
    )
    return state


@pytest.fixture(scope="module")
def weights_file(state, tmp_path_factory) -> pathlib.Path:
    """A .safetensors file made by the converter's own functions, from a state_dict that also has
    the batch-norm counters of a real PyTorch file."""
    with_counters = dict(state)
    with_counters["Mixed_5b.branch1x1.bn.num_batches_tracked"] = np.zeros((), np.int64)
    tensors = convert.build_inception_tensors(with_counters, I.inception_tensor_shapes())
    path = tmp_path_factory.mktemp("inception") / "random_inception.safetensors"
    convert.save_inception_safetensors(tensors, path)
    return path


@pytest.fixture(scope="module")
def variables(weights_file):
    return I.load_inception_params(weights_file)


def test_network_matches_torch_fidelity(ref, variables):
    # Both sizes through the batched extractor (the 2 images of 64x64 padded to a batch of 4).
    out = I.InceptionFeatureExtractor(variables, batch_size=BATCH)(
        [ref["images32"], ref["images64"]]
    )
    assert (
        out.pool.shape == (6, 2048)
        and out.logits.shape == (6, 1008)
        and out.pool.dtype == np.float32
    )
    want_pool = np.concatenate([ref["pool32"], ref["pool64"]])
    want_logits = np.concatenate([ref["logits32"], ref["logits64"]])
    # Absolute error ≤ 1e-4 on features of size up to ~12 (float32 here, float64 there; measured ~6e-6).
    assert np.abs(want_pool).max() > 5 and want_pool.std() > 1  # activations are alive and O(1)
    np.testing.assert_allclose(out.pool, want_pool, rtol=0, atol=1e-4)
    np.testing.assert_allclose(out.logits, want_logits, rtol=0, atol=1e-4)
    full = out.logits + np.asarray(variables["params"]["fc"]["bias"])
    np.testing.assert_allclose(
        full, np.concatenate([ref["full_logits32"], ref["full_logits64"]]), atol=1e-4
    )
    # The FID of two halves of these features agrees with the peer's features to 1e-3 relative
    # (on the first 256 feature dimensions: a 2048-d eigendecomposition costs seconds here).
    ours = F.frechet_distance(
        *F.gaussian_stats(out.pool[:3, :256]), *F.gaussian_stats(out.pool[3:, :256])
    )
    theirs = F.frechet_distance(
        *F.gaussian_stats(want_pool[:3, :256]), *F.gaussian_stats(want_pool[3:, :256])
    )
    assert ours == pytest.approx(theirs, rel=1e-3) and theirs > 1.0


def _numpy_tf1_resize(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Written out from TF1's resize_bilinear(align_corners=False): source = k · in/out, float64."""

    def along(x: np.ndarray, axis: int, size: int) -> np.ndarray:
        n_in = x.shape[axis]
        src = np.arange(size) * np.float32(n_in / size).astype(np.float64)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        shape = [1] * x.ndim
        shape[axis] = size
        lam = (src - i0).reshape(shape)
        return np.take(x, i0, axis=axis) * (1 - lam) + np.take(x, i1, axis=axis) * lam

    return along(along(x, 1, out_h), 2, out_w)


@pytest.mark.parametrize("case", ["up", "down"])
def test_tf1_resize_matrices_match_torch_fidelity(ref, case):
    x, want = ref[f"resize_{case}_in"], ref[f"resize_{case}_out"]
    rows = I.tf1_bilinear_matrix(x.shape[1], want.shape[1])
    cols = I.tf1_bilinear_matrix(x.shape[2], want.shape[2])
    got = np.einsum("oh,nhwc->nowc", rows, x)
    got = np.einsum("pw,nowc->nopc", cols, got)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    np.testing.assert_allclose(_numpy_tf1_resize(x, *want.shape[1:3]), want, rtol=0, atol=1e-9)
    np.testing.assert_allclose(rows.sum(axis=1), 1.0)


def test_preprocess_resizes_like_tf1_not_half_pixel(ref):
    x = ref["images32"][:1]
    got = np.asarray(I.preprocess(x)) * 128.0 + 128.0  # back to pixel units
    assert got.shape == (1, 299, 299, 3)
    np.testing.assert_allclose(got[:, ::13], ref["resize_32_to_299_rows13"], rtol=0, atol=2e-3)
    half_pixel = np.asarray(jax.image.resize(x.astype(np.float32), (1, 299, 299, 3), "bilinear"))
    assert np.abs(half_pixel - got).max() > 10  # the conventions differ visibly on these images
    gray = ref["images32"][..., :1]
    np.testing.assert_array_equal(I.preprocess(gray), I.preprocess(np.repeat(gray, 3, axis=-1)))
    square = np.asarray(I.preprocess(np.full((1, 299, 299, 3), 200, np.uint8)))
    np.testing.assert_array_equal(square, np.full_like(square, (200 - 128) / 128))


def test_bad_images_are_refused(variables):
    extractor = I.InceptionFeatureExtractor(variables, batch_size=BATCH)
    with pytest.raises(ValueError, match="uint8"):
        extractor(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        extractor(np.zeros((2, 32, 32, 2), np.uint8))
    with pytest.raises(ValueError, match="No images"):
        extractor([])


@pytest.mark.slow
def test_sharded_extraction_on_two_devices(ref, weights_file):
    """Batch split over 2 CPU devices, a batch of 3 rounded up to 4, a short last batch padded."""
    script = f"""
import numpy as np, jax
from consistency_jax.metrics import inception_v3 as I
assert jax.device_count() == 2
ref = np.load({str(FIXTURE)!r})
ex = I.InceptionFeatureExtractor({str(weights_file)!r}, batch_size=3)
assert ex.batch_size == 4 and ex.num_devices == 2
out = ex(np.concatenate([ref["images32"], ref["images32"][:1]]))
want = np.concatenate([ref["pool32"], ref["pool32"][:1]])
np.testing.assert_allclose(out.pool, want, rtol=0, atol=1e-4)
print("SHARDED-OK")
"""
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT),
        XLA_FLAGS=subprocess_xla_flags("--xla_force_host_platform_device_count=2"),
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and "SHARDED-OK" in out.stdout, (
        out.stdout[-2000:] + out.stderr[-4000:]
    )


def test_weight_file_errors(state, weights_file, tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    monkeypatch.delenv(I.INCEPTION_WEIGHTS_ENV, raising=False)
    _offline_empty_cache(monkeypatch, tmp_path)
    with pytest.raises(ValueError, match="pt_inception-2015-12-05-6726825d.pth") as err:
        I.load_inception_params()
    assert "tools/convert_inception_weights.py" in str(err.value) and "INCEPTION_WEIGHTS" in str(
        err.value
    )
    with pytest.raises(ValueError, match="does not exist.*convert_inception_weights"):
        I.load_inception_params(tmp_path / "nope.safetensors")
    monkeypatch.setenv(I.INCEPTION_WEIGHTS_ENV, str(weights_file))
    assert I.resolve_weights_path() == str(weights_file)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable .safetensors"):
        I.load_inception_params(garbage)
    missing = {k: v for k, v in state.items() if k != "fc.bias"}
    missing["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(
        ValueError,
        match=r"missing tensors \['fc.bias'\].*unexpected tensors \['AuxLogits.fc.weight'\]",
    ):
        I.load_inception_params(tmp_path / "missing.safetensors")
    wrong = dict(state)
    wrong["Mixed_6b.branch7x7_2.conv.weight"] = np.zeros((128, 128, 7, 1), np.float32)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(
        ValueError,
        match=r"Mixed_6b.branch7x7_2.conv.weight \(128, 128, 7, 1\) \(expected \(128, 128, 1, 7\)\)",
    ):
        I.load_inception_params(tmp_path / "wrong.safetensors")


def test_the_pth_is_read_without_torch_and_found_in_the_cache(
    state, variables, tmp_path, monkeypatch
):
    """pytorch-fid's .pth layout (a torch zip state dict with the batch-norm counters, written here
    by ``torch_pickle.write_state_dict``) gives the variables of its .safetensors copy, given as a
    path and, with no path, from the cache (its SHA-256 checked; no download: already cached)."""
    with_counters = dict(state)
    with_counters["Mixed_5b.branch1x1.bn.num_batches_tracked"] = np.zeros((), np.int64)
    cache = tmp_path / "cache"
    cache.mkdir()
    pth = cache / "pt_inception-test.pth"
    torch_pickle.write_state_dict(pth, with_counters)
    remote = weights_cache.RemoteFile(
        pth.name, "http://127.0.0.1:9/unused", weights_cache.file_sha256(str(pth))
    )
    monkeypatch.setattr(weights_cache, "PT_INCEPTION", remote)
    monkeypatch.delenv(I.INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv(weights_cache.CACHE_ENV, str(cache))
    monkeypatch.setenv(weights_cache.OFFLINE_ENV, "1")
    assert I.resolve_weights_path() == str(pth)
    for got in (I.load_inception_params(pth), I.load_inception_params()):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(variables), strict=True):
            assert np.array_equal(a, b)
    pth.write_bytes(pth.read_bytes()[:-5])  # damaged: removed, and offline it cannot come back
    with pytest.raises(ValueError, match="No Inception weights.*forbids downloading"):
        I.load_inception_params()
    assert not pth.exists()


def test_converter_refuses_by_name(state):
    shapes = I.inception_tensor_shapes()
    extra = dict(state, **{"AuxLogits.conv0.conv.weight": np.zeros((128, 768, 1, 1), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected tensors \['AuxLogits.conv0.conv.weight'\]"):
        convert.build_inception_tensors(extra, shapes)
    lacking = {k: v for k, v in state.items() if k != "Mixed_7c.branch_pool.bn.running_var"}
    with pytest.raises(
        ValueError, match=r"missing tensors \['Mixed_7c.branch_pool.bn.running_var'\]"
    ):
        convert.build_inception_tensors(lacking, shapes)
    bad = dict(state, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
    with pytest.raises(
        ValueError, match=r"'fc.weight' has shape \(1000, 2048\), expected \(1008, 2048\)"
    ):
        convert.build_inception_tensors(bad, shapes)
    float64 = {k: v.astype(np.float64) for k, v in state.items()}
    out = convert.build_inception_tensors(float64, shapes)
    assert set(out) == set(shapes) and all(v.dtype == np.float32 for v in out.values())


# ---------------------------------------------------------------------------------------------------
# The formulas, against the peers (fixture) and against direct float64 computations written here.
# ---------------------------------------------------------------------------------------------------


def test_fid_matches_pytorch_fid_torch_fidelity_and_scipy_sqrtm(ref):
    m = make_fixture.metric_inputs()
    fake, real = m["fake"], m["real"]
    got = F.frechet_distance(*F.gaussian_stats(fake), *F.gaussian_stats(real))
    assert got == pytest.approx(float(ref["fid_pytorch_fid"]), rel=1e-9)
    assert got == pytest.approx(float(ref["fid_torch_fidelity"]), rel=1e-9)
    mu1, mu2 = fake.mean(0), real.mean(0)
    s1, s2 = np.cov(fake.T), np.cov(real.T)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert got == pytest.approx(direct, rel=1e-9)
    assert F.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_streaming_statistics_equal_numpy_float64():
    rng = np.random.default_rng(0)
    x = 1e4 + rng.standard_normal((203, 16)) @ rng.standard_normal(
        (16, 16)
    )  # large offset: no cancellation
    stats = F.GaussianStats()
    for start, stop in ((0, 1), (1, 50), (50, 50), (50, 128), (128, 203)):
        stats.update(x[start:stop].astype(np.float32) if start == 0 else x[start:stop])
    x[0] = x[0].astype(np.float32)
    np.testing.assert_allclose(stats.mu, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
    assert stats.count == 203 and stats.allgather() is stats
    halves = F.GaussianStats().update(x[:100]).merge(F.GaussianStats().update(x[100:]))
    np.testing.assert_allclose(halves.sigma, stats.sigma, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="need at least 2"):
        _ = F.GaussianStats().update(x[:1]).sigma


def _direct_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² (Bińkowski et al. 2018) with k(a, b) = (aᵀb/d + 1)³, by explicit pair loops."""
    d = x.shape[1]

    def k(a, b):
        return (a @ b / d + 1.0) ** 3

    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_torch_fidelity_and_direct_sum(ref):
    m = make_fixture.metric_inputs()
    fake, real = m["fake"], m["real"][:160]
    mean, std = F.kernel_inception_distance(fake, real, num_subsets=3)  # every subset is everything
    assert mean == pytest.approx(float(ref["kid_one_subset"]), rel=1e-9) and std == pytest.approx(
        0.0, abs=1e-12
    )
    small_x, small_y = fake[:30], m["real"][100:130]
    assert F.kernel_inception_distance(small_x, small_y, num_subsets=1)[0] == pytest.approx(
        _direct_mmd2(small_x, small_y), rel=1e-9
    )
    # Subsets smaller than the sets: different draws, mean near the full-set value.
    mean_sub, std_sub = F.kernel_inception_distance(
        fake, real, num_subsets=50, subset_size=60, seed=1
    )
    assert std_sub > 0 and abs(mean_sub - mean) < 4 * std_sub / np.sqrt(50) + 0.1 * mean
    # Two halves of one distribution: near 0 (its expectation), far below the fake/real figure.
    same = F.kernel_inception_distance(m["real"][:100], m["real"][100:], num_subsets=1)[0]
    assert abs(same) < 0.1 * mean


def test_inception_score_matches_torch_fidelity_and_entropy_form(ref):
    logits = make_fixture.metric_inputs()["logits"]
    mean, std = F.inception_score(logits, splits=10)
    assert mean == pytest.approx(float(ref["is_mean"]), rel=1e-9)
    assert std == pytest.approx(float(ref["is_std"]), rel=1e-7)
    # exp(H(p(y)) − E H(p(y|x))) per split, computed with SciPy's softmax.
    p = scipy.special.softmax(logits, axis=1)
    scores = []
    for part in np.array_split(p, 10):
        marginal = part.mean(axis=0)
        h_marginal = -np.sum(marginal * np.log(marginal))
        h_cond = -np.mean(np.sum(part * np.log(part), axis=1))
        scores.append(np.exp(h_marginal - h_cond))
    assert mean == pytest.approx(np.mean(scores), rel=1e-9)
    assert F.inception_score(np.zeros((20, 1008)), splits=2) == pytest.approx((1.0, 0.0))
    one_hot = np.where(np.eye(10, 1008, dtype=bool), 50.0, 0.0)
    assert F.inception_score(one_hot, splits=1)[0] == pytest.approx(10.0, rel=1e-6)


def _direct_precision_recall(fake: np.ndarray, real: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        return np.sort(scipy.spatial.distance.cdist(x, x), axis=1)[
            :, k
        ]  # column 0 is the point itself

    precision = np.mean(
        np.any(scipy.spatial.distance.cdist(fake, real) <= radii(real)[None], axis=1)
    )
    recall = np.mean(np.any(scipy.spatial.distance.cdist(real, fake) <= radii(fake)[None], axis=1))
    return precision, recall


def test_precision_recall_matches_torch_fidelity_and_direct(ref):
    m = make_fixture.metric_inputs()
    fake, real = m["fake"], m["real"]
    got = F.precision_recall(fake, real, k=3, batch_size=37)  # padded, uneven row batches
    assert got == pytest.approx((float(ref["precision"]), float(ref["recall"])), abs=1e-7)
    assert got == pytest.approx(_direct_precision_recall(fake, real, 3), abs=1e-12)
    assert 0.0 < got[0] < got[1] < 1.0
    assert F.precision_recall(real, real, k=3) == (1.0, 1.0)
    assert F.precision_recall(fake, real, k=5) == pytest.approx(
        _direct_precision_recall(fake, real, 5)
    )


# ---------------------------------------------------------------------------------------------------
# Reference statistics and the evaluate command, on the bundled digits.
# ---------------------------------------------------------------------------------------------------


REF_SPLIT = "test[:12]"


@pytest.fixture(scope="module")
def digits_ref(variables, tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    cache_dir = os.path.join(data_dir, "inception_cache")
    metrics = ev.InceptionMetrics(variables, batch_size=BATCH)
    mu, sigma, count, features = ev.reference_statistics(
        "sklearn_digits/8",
        REF_SPLIT,
        data_dir,
        metrics=metrics,
        cache_dir=cache_dir,
        keep_features=True,
        batch_size=5,
    )
    return dict(
        data_dir=data_dir, cache_dir=cache_dir, mu=mu, sigma=sigma, count=count, features=features
    )


def test_reference_statistics_of_a_tfds_split(digits_ref, variables, monkeypatch, tmp_path):
    from consistency_jax import data as data_lib

    images = np.concatenate(
        [
            b["image"]
            for b in data_lib.iterate_stored_images(
                "sklearn_digits/8", REF_SPLIT, digits_ref["data_dir"], 100
            )
        ]
    )
    assert images.shape == (12, 8, 8, 1) and images.dtype == np.uint8
    direct = np.asarray(jax.jit(I.inception_outputs)(variables, images).pool, np.float64)
    assert digits_ref["count"] == 12
    np.testing.assert_allclose(digits_ref["features"], direct, rtol=0, atol=1e-4)
    np.testing.assert_allclose(digits_ref["mu"], direct.mean(0), rtol=0, atol=1e-4)
    np.testing.assert_allclose(digits_ref["sigma"], np.cov(direct.T), rtol=0, atol=1e-3)
    # The second call reads the cache: no weights are needed (none are available here).
    monkeypatch.delenv(I.INCEPTION_WEIGHTS_ENV, raising=False)
    _offline_empty_cache(monkeypatch, tmp_path)
    mu, sigma, count, features = ev.reference_statistics(
        "sklearn_digits/8",
        REF_SPLIT,
        digits_ref["data_dir"],
        cache_dir=digits_ref["cache_dir"],
        keep_features=True,
    )
    np.testing.assert_array_equal(mu, digits_ref["mu"])
    np.testing.assert_array_equal(features, digits_ref["features"])
    assert count == 12 and sigma.dtype == np.float64
    # An official-style statistics file and an official-style reference batch of images.
    stats_file = os.path.join(digits_ref["data_dir"], "ref_stats.npz")
    np.savez(stats_file, mu=mu, sigma=sigma)
    assert ev.read_reference(stats_file)[2] == -1
    batch_file = os.path.join(digits_ref["data_dir"], "ref_batch.npz")
    np.savez(batch_file, images)
    mu_b, sigma_b, count_b, _ = ev.read_reference(
        batch_file, ev.InceptionMetrics(variables, batch_size=BATCH)
    )
    np.testing.assert_allclose(mu_b, mu, atol=1e-5)
    assert count_b == 12


def test_evaluate_command_end_to_end(digits_ref, weights_file, variables, tmp_path):
    from absl import flags

    from consistency_jax import evaluate

    rng = np.random.default_rng(3)
    samples = rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
    labels = np.arange(12) % 10
    np.savez(tmp_path / "samples.npz", samples, labels)
    out_json = tmp_path / "results.json"
    argv = [
        "evaluate",
        f"--samples={tmp_path / 'samples.npz'}",
        "--ref=sklearn_digits/8",
        f"--ref_split={REF_SPLIT}",
        f"--data_dir={digits_ref['data_dir']}",
        f"--cache_dir={digits_ref['cache_dir']}",
        f"--inception_weights={weights_file}",
        "--metrics=fid,is,kid,pr",
        f"--out={out_json}",
        f"--batch_size={BATCH}",
        "--kid_subsets=5",
    ]
    import logging

    absl_level = logging.getLogger("absl").level  # parsing absl flags sets the absl logger's level
    flags.FLAGS(argv)
    try:
        evaluate.main(["evaluate"])
    finally:
        flags.FLAGS.unparse_flags()
        logging.getLogger("absl").setLevel(absl_level)
    result = json.loads(out_json.read_text())
    # FID by the small-matrix form of rank-deficient covariances, written here: with centred
    # A₁ (n₁ × D), A₂, Σᵢ = AᵢᵀAᵢ/(nᵢ − 1), the non-zero eigenvalues of Σ₁Σ₂ are those of the
    # n₁ × n₁ PSD matrix A₁A₂ᵀA₂A₁ᵀ/((n₁ − 1)(n₂ − 1)).
    pool = np.asarray(jax.jit(I.inception_outputs)(variables, samples).pool, np.float64)
    ref_pool = digits_ref["features"]
    a1, a2 = pool - pool.mean(0), ref_pool - ref_pool.mean(0)
    small = a1 @ a2.T @ a2 @ a1.T / ((len(a1) - 1) * (len(a2) - 1))
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(small), 0, None)).sum()
    trace1, trace2 = np.sum(a1**2) / (len(a1) - 1), np.sum(a2**2) / (len(a2) - 1)
    want_fid = np.sum((pool.mean(0) - ref_pool.mean(0)) ** 2) + trace1 + trace2 - 2 * tr_sqrt
    assert result["fid"] == pytest.approx(want_fid, rel=1e-3)
    assert result["num_samples"] == 12 and result["num_reference"] == 12
    for key in ("is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall"):
        assert np.isfinite(result[key]), key
    assert result["is_mean"] >= 1.0 and 0 <= result["precision"] <= 1


def test_evaluate_rejects_bad_arguments_before_compiling(
    weights_file, digits_ref, tmp_path, monkeypatch
):
    from consistency_jax import evaluate

    def no_extractor(*args, **kwargs):
        raise AssertionError("the network was built before the arguments were checked")

    monkeypatch.setattr(I, "InceptionFeatureExtractor", no_extractor)
    monkeypatch.delenv(I.INCEPTION_WEIGHTS_ENV, raising=False)
    _offline_empty_cache(monkeypatch, tmp_path)
    good = tmp_path / "good.npz"
    np.savez(good, np.zeros((4, 8, 8, 1), np.uint8))
    floats = tmp_path / "floats.npz"
    np.savez(floats, np.zeros((4, 8, 8, 3), np.float32))
    stats_only = tmp_path / "stats.npz"
    np.savez(stats_only, mu=digits_ref["mu"], sigma=digits_ref["sigma"])
    w = str(weights_file)
    cases = [
        (dict(samples=str(good), ref=str(stats_only)), "No Inception weights.*pt_inception"),
        (
            dict(samples=str(tmp_path / "missing.npz"), ref=str(stats_only), weights=w),
            "does not exist",
        ),
        (dict(samples=str(floats), ref=str(stats_only), weights=w), "uint8 images.*float32"),
        (
            dict(samples=str(good), ref=str(tmp_path / "nope.npz"), weights=w),
            "Reference file .* does not exist",
        ),
        (
            dict(samples=str(good), ref=str(stats_only), weights=w, metrics=["fid", "lpips"]),
            r"unknown \['lpips'\]",
        ),
        (
            dict(samples="no_such_tfds_dataset", ref=str(stats_only), weights=w),
            "no_such_tfds_dataset",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(Exception, match=message):
            evaluate.evaluate(data_dir=digits_ref["data_dir"], **kwargs)
    # Through the command line: a clear one-line error and exit status 2.
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env.pop(I.INCEPTION_WEIGHTS_ENV, None)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "consistency_jax.evaluate",
            f"--samples={good}",
            f"--ref={stats_only}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "error: No Inception weights" in out.stderr, out.stderr[-2000:]


def _cheap_network(precision, batch_sharding):
    """Stands in for the compiled Inception network (its CPU compilation costs two minutes): pool
    features and logits from a fixed random projection of the images, so that FID, IS and the
    wiring around them run on their real code and differ between sample sets. Its pool features
    have 64 dimensions, not 2048: the FID of 2048-d statistics costs seconds of float64
    eigendecompositions per figure, the same code whatever the dimension."""
    del precision, batch_sharding
    pool_dim = 64

    def apply(variables, x):
        flat = np.asarray(x, np.float64).reshape(x.shape[0], -1) / 255.0
        proj = np.random.default_rng(flat.shape[1]).normal(size=(flat.shape[1], pool_dim + 1008))
        out = np.tanh(flat @ proj / np.sqrt(flat.shape[1])).astype(np.float32)
        return I.InceptionOutput(pool=out[:, :pool_dim], logits=out[:, pool_dim:])

    return apply


@pytest.mark.parametrize("network", ["cheap", pytest.param("inception", marks=pytest.mark.slow)])
def test_fid_in_the_training_evaluation_and_evaluate_from_a_run(
    digits_ref, weights_file, tmp_path, monkeypatch, network, capsys
):
    """config.eval.inception_weights makes every evaluation of the main job log FID / IS of its
    samples; ``evaluate(samples="run:DIR")`` generates a run's samples with the sampling command and
    scores them exactly like its .npz. The quick form replaces the compiled network by a cheap
    projection (the network itself: test_network_matches_torch_fidelity)."""
    if network == "cheap":
        monkeypatch.setattr(I, "_compiled_outputs", _cheap_network)
    from conftest import load_config

    from consistency_jax import evaluate, experiment
    from consistency_jax import sample as sample_lib

    ref = tmp_path / "ref.npz"
    from consistency_jax import data as data_lib

    np.savez(
        ref,
        np.concatenate(
            [
                b["image"]
                for b in data_lib.iterate_stored_images(
                    "sklearn_digits/8", REF_SPLIT, digits_ref["data_dir"], 100
                )
            ]
        ),
    )
    c = load_config("digits", "method=ict")
    c.data.data_dir = digits_ref["data_dir"]
    c.data.batch_size = 8
    c.model.kwargs = dict(nf=4, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    c.train.update(num_steps=1, log_every=1, eval_every=1)
    c.eval.update(num_samples=8, inception_weights=str(weights_file), fid_reference=str(ref))
    c.checkpoint.every = 1
    workdir = tmp_path / "run"
    experiment.train_and_evaluate(c, str(workdir))
    line = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("fid_1step", "fid_2step", "is_mean_1step", "is_std_2step", "digits_fd_1step"):
        assert np.isfinite(line[key]) and line[key] >= 0, key
    bad = load_config("digits", "method=ict")
    bad.eval.inception_weights = str(tmp_path / "missing.safetensors")
    from consistency_jax.build import validate

    with pytest.raises(ValueError, match="is not a file"):
        validate(bad)

    common = dict(
        ref=str(ref), weights=str(weights_file), metrics=("fid",), num_samples=6, batch_size=BATCH
    )
    # The default place of generated samples is the cache: here a temporary one; shards of 2.
    monkeypatch.setenv("CONSISTENCY_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(evaluate, "GENERATE_SHARD", 2)
    from consistency_jax import export

    save_npz = export.save_npz

    def killed(*a, **k):  # the process dies after writing every shard, before samples.npz
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "save_npz", killed)
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate(f"run:{workdir}", **common)
    monkeypatch.setattr(export, "save_npz", save_npz)
    (gen,) = (tmp_path / "cache" / "evaluate_samples").iterdir()
    assert not json.loads((gen / sample_lib.PLAN).read_text())["complete"]
    parts = sorted((gen / sample_lib.PARTS).iterdir())
    assert len(parts) == 3  # 6 samples in shards of 2
    parts[-1].unlink()  # as if killed while the last shard was generated
    # Rerun: the finished shards are kept, only the missing one is generated, the figures are
    # those of an uninterrupted generation (the .npz of the sampling command, below).
    summaries, run = [], sample_lib.run
    monkeypatch.setattr(sample_lib, "run", lambda r: summaries.append(run(r)) or summaries[-1])
    on_the_fly = evaluate.evaluate(f"run:{workdir}", **common)
    assert [s["generated"] for s in summaries] == [2]
    assert json.loads((gen / sample_lib.PLAN).read_text())["complete"]
    # A finished generation is reused as it is.
    stamp = (gen / "samples.npz").stat().st_mtime_ns
    assert evaluate.evaluate(f"run:{workdir}", **common)["fid"] == on_the_fly["fid"]
    assert (gen / "samples.npz").stat().st_mtime_ns == stamp and len(summaries) == 1
    # The Inception outputs are kept per shard: a rerun scores only the shards it has no outputs
    # of (killed while scoring: test_inception_outputs_are_kept_per_finished_shard), same figures.
    (features_dir,) = (gen / evaluate.FEATURES).iterdir()
    assert len(list(features_dir.iterdir())) == 3
    from consistency_jax.evaluators import inception_metrics as ev

    scored, features = [], ev.InceptionMetrics.features

    def counting(self, batches):
        images = np.concatenate(list(batches))  # the shard's batches, counted by the progress bar
        scored.append(images.shape[0])
        return features(self, images)

    sorted(features_dir.iterdir())[1].unlink()
    monkeypatch.setattr(ev.InceptionMetrics, "features", counting)
    capsys.readouterr()
    assert evaluate.evaluate(f"run:{workdir}", **common)["fid"] == on_the_fly["fid"]
    assert scored == [2] and len(list(features_dir.iterdir())) == 3
    assert re.search(r"Inception: 100%.*\b6/6 ", capsys.readouterr().err)  # with its ETA
    npz = sample_lib.run(
        sample_lib.SampleRequest(
            workdir=str(workdir),
            out=str(tmp_path / "s"),
            num_samples=6,
            per_device_batch=BATCH,
            grid=False,
        )
    )["npz"]
    assert on_the_fly["fid"] == pytest.approx(evaluate.evaluate(npz, **common)["fid"], rel=1e-9)


def test_inception_outputs_are_kept_per_finished_shard(tmp_path, monkeypatch):
    """evaluate's scoring of generated samples, shard by shard: killed at the second shard, rerun,
    it scores only the shards without outputs and yields what an uninterrupted pass yields; a shard
    whose images changed is scored again; no partial file is left."""
    from consistency_jax import evaluate

    monkeypatch.setattr(evaluate, "GENERATE_SHARD", 3)
    images = np.random.default_rng(0).integers(0, 256, (8, 4, 4, 3), np.uint8)

    class Metric:  # outputs that depend on each image alone, batches of 2
        extractor = type("Extractor", (), {"batch_size": 2})()
        scored: list = []
        die_at = None

        def features(self, batches):
            if len(self.scored) == self.die_at:
                raise KeyboardInterrupt
            x = np.concatenate(list(batches)).reshape(-1, 48).astype(np.float32)
            self.scored.append(x.shape[0])
            return I.InceptionOutput(pool=x * 2.0, logits=x[:, :5])

    def outputs(metric, images):
        pairs = list(evaluate._cached_outputs(metric, images, str(tmp_path / "f")))
        return np.concatenate([p for p, _ in pairs]), np.concatenate([q for _, q in pairs])

    want = images.reshape(8, 48).astype(np.float32)
    metric = Metric()
    metric.die_at = 1
    with pytest.raises(KeyboardInterrupt):
        outputs(metric, images)
    assert metric.scored == [3] and len(list((tmp_path / "f").iterdir())) == 1
    metric.die_at = None
    pool, logits = outputs(metric, images)
    assert metric.scored == [3, 3, 2]  # shards of 3, 3, 2: the first one was kept
    np.testing.assert_array_equal(pool, want * 2.0)
    np.testing.assert_array_equal(logits, want[:, :5])
    changed = images.copy()
    changed[4] = 255 - changed[4]
    pool, _ = outputs(metric, changed)
    assert metric.scored == [3, 3, 2, 3]  # only the shard holding image 4
    np.testing.assert_array_equal(pool, changed.reshape(8, 48).astype(np.float32) * 2.0)
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == [
        "000000000.npz",
        "000000003.npz",
        "000000006.npz",
    ]


def _np_conv_bn_relu(x, v, stride=1, pad=(0, 0)):
    """Conv (HWIO kernel, no bias) + inference BatchNorm (ε = 0.001) + ReLU in float64 NumPy."""
    w = np.asarray(v["params"]["conv"]["kernel"], np.float64)
    kh, kw = w.shape[:2]
    x = np.pad(x, ((0, 0), (pad[0], pad[0]), (pad[1], pad[1]), (0, 0)))
    oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    y = np.zeros(x.shape[:1] + (oh, ow, w.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            window = x[
                :, i : i + stride * (oh - 1) + 1 : stride, j : j + stride * (ow - 1) + 1 : stride
            ]
            y += window @ w[i, j]
    bn, stats = v["params"]["bn"], v["batch_stats"]["bn"]
    y = (y - stats["mean"]) / np.sqrt(np.asarray(stats["var"], np.float64) + 1e-3)
    return np.maximum(y * bn["scale"] + bn["bias"], 0.0)


def _np_pool(x, kind, stride):
    """3x3 pools in float64: "avg" (stride 1, padded, averaging the valid inputs), "max"."""
    pad = 1 if stride == 1 else 0
    n, h, w, c = x.shape
    oh, ow = (h + 2 * pad - 3) // stride + 1, (w + 2 * pad - 3) // stride + 1
    out = np.zeros((n, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            r, s = i * stride - pad, j * stride - pad
            win = x[:, max(r, 0) : r + 3, max(s, 0) : s + 3]
            out[:, i, j] = win.mean(axis=(1, 2)) if kind == "avg" else win.max(axis=(1, 2))
    return out


# Each Mixed block as (branches of (layer name, stride, padding) chains, pool branch), written
# from the TF graph's structure (torchvision's InceptionA-E): the reference the fused blocks
# (one matmul for the 1x1 convolutions sharing an input, the pool after the 1x1) must equal.
_1 = (0, 0)
_MIXED_REFERENCE = {
    "A": (
        [
            [("branch1x1", 1, _1)],
            [("branch5x5_1", 1, _1), ("branch5x5_2", 1, (2, 2))],
            [
                ("branch3x3dbl_1", 1, _1),
                ("branch3x3dbl_2", 1, (1, 1)),
                ("branch3x3dbl_3", 1, (1, 1)),
            ],
        ],
        ("avg", "branch_pool"),
    ),
    "B": (
        [
            [("branch3x3", 2, _1)],
            [("branch3x3dbl_1", 1, _1), ("branch3x3dbl_2", 1, (1, 1)), ("branch3x3dbl_3", 2, _1)],
        ],
        ("max2", None),
    ),
    "C": (
        [
            [("branch1x1", 1, _1)],
            [("branch7x7_1", 1, _1), ("branch7x7_2", 1, (0, 3)), ("branch7x7_3", 1, (3, 0))],
            [("branch7x7dbl_1", 1, _1)]
            + [(f"branch7x7dbl_{i}", 1, (3, 0) if i % 2 == 0 else (0, 3)) for i in range(2, 6)],
        ],
        ("avg", "branch_pool"),
    ),
    "D": (
        [
            [("branch3x3_1", 1, _1), ("branch3x3_2", 2, _1)],
            [
                ("branch7x7x3_1", 1, _1),
                ("branch7x7x3_2", 1, (0, 3)),
                ("branch7x7x3_3", 1, (3, 0)),
                ("branch7x7x3_4", 2, _1),
            ],
        ],
        ("max2", None),
    ),
}


def _np_mixed(kind, variables, x):
    sub = lambda name: {c: variables[c][name] for c in ("params", "batch_stats")}  # noqa: E731
    if kind in ("E_avg", "E_max"):
        b1 = _np_conv_bn_relu(x, sub("branch1x1"))
        b3 = _np_conv_bn_relu(x, sub("branch3x3_1"))
        b3 = [
            _np_conv_bn_relu(b3, sub("branch3x3_2a"), pad=(0, 1)),
            _np_conv_bn_relu(b3, sub("branch3x3_2b"), pad=(1, 0)),
        ]
        bd = _np_conv_bn_relu(x, sub("branch3x3dbl_1"))
        bd = _np_conv_bn_relu(bd, sub("branch3x3dbl_2"), pad=(1, 1))
        bd = [
            _np_conv_bn_relu(bd, sub("branch3x3dbl_3a"), pad=(0, 1)),
            _np_conv_bn_relu(bd, sub("branch3x3dbl_3b"), pad=(1, 0)),
        ]
        pooled = _np_pool(x, kind[2:], 1)
        return np.concatenate([b1, *b3, *bd, _np_conv_bn_relu(pooled, sub("branch_pool"))], -1)
    chains, (pool, pool_conv) = _MIXED_REFERENCE[kind]
    outs = []
    for chain in chains:
        y = x
        for name, stride, pad in chain:
            y = _np_conv_bn_relu(y, sub(name), stride, pad)
        outs.append(y)
    if pool == "avg":
        outs.append(_np_conv_bn_relu(_np_pool(x, "avg", 1), sub(pool_conv)))
    else:
        outs.append(_np_pool(x, "max", 2))
    return np.concatenate(outs, axis=-1)


@pytest.mark.parametrize("cpu_forms", [False, True])
@pytest.mark.parametrize("kind", ["A", "B", "C", "D", "E_avg", "E_max"])
def test_mixed_blocks_equal_their_branches_in_float64(kind, cpu_forms):
    """Each Mixed block as the network runs it (its 1x1 convolutions on one input as one
    convolution, the pool branch's 1x1 before its average pool, batch norm folded into the kernels,
    max pools as strided slices; with ``cpu_forms`` 1x1 convolutions as matmuls and unpadded ones as
    padded ones cut back) against its branches one by one in float64 NumPy, random batch-norm
    statistics."""
    module = {
        "A": I._MixedA(pool_features=8, cpu_forms=cpu_forms),
        "B": I._MixedB(cpu_forms=cpu_forms),
        "C": I._MixedC(channels_7x7=12, cpu_forms=cpu_forms),
        "D": I._MixedD(cpu_forms=cpu_forms),
        "E_avg": I._MixedE(max_pool=False, cpu_forms=cpu_forms),
        "E_max": I._MixedE(max_pool=True, cpu_forms=cpu_forms),
    }[kind]
    rng = np.random.default_rng(len(kind) + ord(kind[0]))
    size = 7 if kind in ("B", "D") else 5
    x = rng.normal(size=(2, size, size + 1, 6)).astype(np.float32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.asarray(x))

    def draw(path, leaf):
        name = path[-1].key
        if name == "var":
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        if name == "scale":
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        if name == "kernel":
            fan_in = np.prod(leaf.shape[:-1])
            return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
        return (0.3 * rng.normal(size=leaf.shape)).astype(np.float32)  # mean, bias

    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    got = np.asarray(module.apply(variables, jnp.asarray(x)))
    want = _np_mixed(kind, variables, x.astype(np.float64))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kernel,stride,padding",
    [((3, 3), 2, (0, 0)), ((3, 3), 1, (0, 0)), ((1, 7), 1, (0, 3)), ((1, 1), 1, (0, 0))],
)
@pytest.mark.parametrize("size", [8, 9])
@pytest.mark.parametrize("cpu_forms", [False, True])
def test_conv_block_folds_batch_norm_into_the_kernel(kernel, stride, padding, size, cpu_forms):
    """A conv block (batch norm folded: kernel·a, + b; with ``cpu_forms`` a 1x1 convolution as a
    matmul, an unpadded one as a padded one cut back) against conv + BN + ReLU in float64."""
    rng = np.random.default_rng(stride + kernel[1])
    x = rng.normal(size=(2, size, size + 1, 3)).astype(np.float32)
    block = I._Conv(5, kernel, stride=stride, padding=padding, cpu_forms=cpu_forms)
    variables = jax.tree.map(np.asarray, block.init(jax.random.key(0), jnp.asarray(x)))
    variables["batch_stats"]["bn"]["mean"] = rng.normal(size=5).astype(np.float32)
    variables["batch_stats"]["bn"]["var"] = rng.uniform(0.5, 2, 5).astype(np.float32)
    variables["params"]["bn"]["scale"] = rng.uniform(0.5, 1.5, 5).astype(np.float32)
    variables["params"]["bn"]["bias"] = rng.normal(size=5).astype(np.float32)
    got = np.asarray(block.apply(variables, jnp.asarray(x)))
    want = _np_conv_bn_relu(x.astype(np.float64), variables, stride, padding)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_average_pool_divides_by_the_valid_inputs():
    """TF's SAME 3x3 average pool (stride 1): each output averages the inputs inside the image,
    against a float64 NumPy loop."""
    x = np.random.default_rng(3).normal(size=(2, 5, 4, 3))
    want = np.zeros_like(x)
    for i in range(5):
        for j in range(4):
            want[:, i, j] = x[:, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2].mean(axis=(1, 2))
    got = np.asarray(I._avg_pool_valid_count(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_cpu_builds_take_the_xla_options_and_fall_back_where_refused():
    """The extractor's executables: on CPU built with CPU_COMPILER_OPTIONS (the network with them
    matches the float64 peer: test_network_matches_torch_fidelity); options this XLA refuses give
    the default build of the fallback function (the network's cpu_forms), same result."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.asarray(jax.local_devices()[:1]), ("batch",))
    sharding = NamedSharding(mesh, PartitionSpec())
    rng = np.random.default_rng(0)
    w, x = rng.normal(size=(16, 8)), rng.normal(size=(4, 16))
    want = np.tanh(x @ w)

    def fn(w, x):
        return jnp.tanh(jnp.dot(x, w, precision="highest"))

    args = (jnp.asarray(w, jnp.float32), jnp.asarray(x, jnp.float32))

    def fallback(w, x):
        return jnp.tanh(x @ w) + 1.0  # tells which one was built

    for options, used in ((I.CPU_COMPILER_OPTIONS, True), ({"xla_cpu_no_such_option": "1"}, False)):
        compiled = I.CompiledOnDevices(fn, sharding, options, fallback)
        shift = 0.0 if used else 1.0
        np.testing.assert_allclose(np.asarray(compiled(*args)), want + shift, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(compiled(*args)), want + shift, rtol=1e-5, atol=1e-6)
        assert list(compiled.used_options.values()) == [used]  # compiled once
    no_options = I.CompiledOnDevices(fn, sharding, {}, fallback)
    np.testing.assert_allclose(np.asarray(no_options(*args)), want, rtol=1e-5, atol=1e-6)


def test_extraction_over_this_process_devices_pads_a_short_last_batch(ref, variables):
    """The quick form of test_sharded_extraction_on_two_devices, in this process: the batch split
    over this process's devices (one), a short last batch padded and cut off again."""
    ex = I.InceptionFeatureExtractor(variables, batch_size=BATCH)
    assert ex.num_devices == jax.device_count() and ex.batch_size % ex.num_devices == 0
    n = BATCH + 1  # one full batch, then a batch of one
    images = np.concatenate([ref["images32"]] * n)[:n]
    want = np.concatenate([ref["pool32"]] * n)[:n]
    out = ex(images)
    assert out.pool.shape == (n, 2048)
    np.testing.assert_allclose(out.pool, want, rtol=0, atol=1e-4)
