"""Evaluate samples like the papers: FID, IS, KID, precision/recall on the FID Inception-v3.

    python -m consistency_jax.evaluate --samples=samples.npz --ref=cifar10 \\
        --inception_weights=pt_inception-2015-12-05.safetensors [--metrics=fid,is,kid,pr] [--out=results.json]

``--samples``: an ``.npz`` with uint8 NHWC images under ``arr_0`` (labels, optional, under
``arr_1``: the layout of the official evaluation scripts), the name of a prepared TFDS data set
(feature ``image`` uint8, e.g. samples written as a data set by the sampling command), read from
``--data_dir``, or ``run:WORKDIR``: ``--num_samples`` (default 50 000) samples generated now from a
run's eval EMA by the sampling command (one step, or Heun for an EDM teacher; seed 0), with its
progress bar and ETA, into ``--samples_dir`` (default: a directory of the cache named by the run, its
step and the number of samples). That generation is resumable: a killed command, rerun, keeps the
finished shards and generates the rest; a finished one is reused as it is. The Inception outputs of
those samples are kept beside them, shard by shard, per weight file: a rerun scores only the shards
it has not scored.
``--ref``: a TFDS name (statistics of its ``--ref_split``, all of it, computed once and cached), or
an ``.npz`` with ``mu``/``sigma`` or with reference images under ``arr_0``.
``--inception_weights``: a ``.safetensors`` file, else ``$INCEPTION_WEIGHTS``, else pytorch-fid's
file in the cache (``$CONSISTENCY_JAX_CACHE``), downloaded and its SHA-256 checked on first use.

Every argument is checked before anything is compiled. Prints the figures and writes them as JSON.
FIDs are comparable with the papers only with the real weights and 50 000 samples.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

_SAMPLES = flags.DEFINE_string(
    "samples",
    None,
    "An .npz (uint8 NHWC under arr_0), a TFDS data set name, "
    "or run:WORKDIR (generated now by the sampling command).",
)
_SAMPLES_SPLIT = flags.DEFINE_string(
    "samples_split", "train", "Split of a TFDS --samples data set."
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory (samples and reference).")
_REF = flags.DEFINE_string(
    "ref", None, "A TFDS data set name, or an .npz with mu/sigma or images under arr_0."
)
_REF_SPLIT = flags.DEFINE_string(
    "ref_split", "train", "Split of a TFDS --ref (papers: all of train)."
)
_WEIGHTS = flags.DEFINE_string(
    "inception_weights",
    None,
    "FID Inception-v3 weights (default: $INCEPTION_WEIGHTS, else pytorch-fid's file in the cache, "
    "fetched and verified on first use).",
)
_SAMPLES_DIR = flags.DEFINE_string(
    "samples_dir",
    None,
    "Where --samples=run:DIR generates its samples, resumably (default: in the cache, named by the "
    "run, its step and --num_samples).",
)
_METRICS = flags.DEFINE_list("metrics", ["fid", "is"], "Any of fid, is, kid, pr.")
_OUT = flags.DEFINE_string("out", None, "Write the figures to this JSON file.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 0, "Use the first N samples (0: all).")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 200, "Images per compiled batch (over all local devices)."
)
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir",
    None,
    "Where TFDS reference statistics are cached "
    "(default: $data_dir/inception_stats/<weights file name>).",
)
_KID_SUBSETS = flags.DEFINE_integer("kid_subsets", 100, "KID subsets.")
_KID_SUBSET_SIZE = flags.DEFINE_integer(
    "kid_subset_size", 1000, "KID subset size (smaller with fewer samples)."
)


# Samples per shard of --samples=run:DIR's generation (what a killed command keeps: 10 shards of 50k);
# the Inception outputs of generated samples are cached per shard of the same size.
GENERATE_SHARD = 5000
FEATURES = "inception_features"


def _is_file_argument(value: str) -> bool:
    return value.endswith(".npz") or os.path.sep in value and os.path.exists(value)


def _first_rows(batches, n: int):
    """The batches cut after their first ``n`` rows in all."""
    for batch in batches:
        if n <= 0:
            return
        yield batch[:n]
        n -= batch.shape[0]


def _generate(workdir: str, num_samples: int, batch_size: int, samples_dir: str | None) -> str:
    """Samples of a run, generated now by the sampling command (its default sampler: one step for a
    consistency model, Heun for an EDM teacher; seed 0) into ``samples_dir``, resumably: the
    finished shards of an interrupted call are kept, a finished output is reused. The .npz path."""
    import hashlib

    import jax
    from absl import logging

    from consistency_jax import checkpoint, fs, loading, weights_cache
    from consistency_jax import sample as sample_lib

    where = f"--samples=run:{workdir}"
    try:
        _, step, _ = loading.eval_params_metadata(workdir)
    except checkpoint.CheckpointError as e:
        raise ValueError(f"{where}: {e}") from None
    if samples_dir is None:
        key = f"{fs.resolve(workdir)}|step {step}|{num_samples} samples"
        name = hashlib.sha256(key.encode()).hexdigest()[:16]
        samples_dir = os.path.join(weights_cache.cache_dir(), "evaluate_samples", name)
    npz = os.path.join(samples_dir, "samples.npz")
    plan = os.path.join(samples_dir, sample_lib.PLAN)
    if os.path.isfile(plan) and os.path.isfile(npz):
        with open(plan) as f:
            saved = json.load(f)
        if saved.get("complete") and saved.get("num_samples") == num_samples:
            logging.info("Reusing the %d finished samples in %s.", num_samples, samples_dir)
            return npz
    request = sample_lib.SampleRequest(
        workdir=workdir,
        out=samples_dir,
        num_samples=num_samples,
        step=step,
        examples_per_shard=GENERATE_SHARD,
        grid=False,
        per_device_batch=max(1, batch_size // jax.local_device_count()),
    )
    try:
        return sample_lib.run(request)["npz"]
    except sample_lib.SampleError as e:
        raise ValueError(f"{where}: {e}") from None


def _cached_outputs(metric, images, features_dir: str):
    """Yields the Inception ``(pool, logits)`` of ``images`` shard by shard (``GENERATE_SHARD``
    images each; a progress bar with its ETA on stderr): read from ``features_dir`` when a file
    there holds that shard's outputs (checked by the SHA-256 of the shard's images), else computed
    and written whole (an interrupted command keeps the shards it finished)."""
    import hashlib
    import io

    import numpy as np
    from absl import logging
    from tqdm import tqdm

    from consistency_jax import fs

    os.makedirs(features_dir, exist_ok=True)
    batch = metric.extractor.batch_size

    def counted(shard, progress):  # the shard's batches; each counted once it has been scored
        for i in range(0, shard.shape[0], batch):
            yield shard[i : i + batch]
            progress.update(min(batch, shard.shape[0] - i))

    reused = 0
    progress = tqdm(
        total=images.shape[0], unit="img", file=sys.stderr, smoothing=0.1, desc="Inception"
    )
    try:
        for start in range(0, images.shape[0], GENERATE_SHARD):
            shard = np.ascontiguousarray(images[start : start + GENERATE_SHARD])
            digest = hashlib.sha256(shard.tobytes()).hexdigest()
            path = os.path.join(features_dir, f"{start:09d}.npz")
            if os.path.isfile(path):
                with np.load(path, allow_pickle=False) as saved:
                    if str(saved["images_sha256"]) == digest:
                        reused += shard.shape[0]
                        progress.update(shard.shape[0])
                        yield saved["pool"], saved["logits"]
                        continue
            out = metric.features(counted(shard, progress))
            buffer = io.BytesIO()
            np.savez(buffer, pool=out.pool, logits=out.logits, images_sha256=np.array(digest))
            fs.write_bytes(path, buffer.getvalue())
            yield out.pool, out.logits
    finally:
        progress.close()
    if reused:
        logging.info("Reused the Inception outputs of %d samples from %s.", reused, features_dir)


def evaluate(
    samples: str,
    ref: str,
    *,
    weights: str | None = None,
    metrics=("fid", "is"),
    data_dir: str | None = None,
    samples_split: str = "train",
    ref_split: str = "train",
    num_samples: int = 0,
    batch_size: int = 200,
    cache_dir: str | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    samples_dir: str | None = None,
) -> dict:
    """The figures of ``samples`` against ``ref`` (see the module docstring); returns a dict.

    Raises:
        ValueError: a bad argument (missing file, wrong dtype or shape, no weights, unknown
            metric), before anything is compiled.
    """
    import itertools

    import jax

    from consistency_jax import data as data_lib
    from consistency_jax import weights_cache
    from consistency_jax.evaluators import inception_metrics as ev
    from consistency_jax.metrics import inception_v3 as inception_lib

    metrics = tuple(m.strip().lower() for m in metrics if m.strip())
    unknown = sorted(set(metrics) - set(ev.METRICS))
    if not metrics or unknown:
        raise ValueError(f"--metrics must list some of {list(ev.METRICS)}; got unknown {unknown}.")
    if num_samples < 0 or batch_size <= 0:
        raise ValueError(
            f"Need --num_samples >= 0 and --batch_size > 0, got {num_samples} and {batch_size}."
        )
    weights = inception_lib.resolve_weights_path(weights)
    need_ref_features = bool(set(metrics) & {"kid", "pr"})

    # Samples: read (an .npz) or opened (TFDS) before anything compiles; "run:DIR" generates them,
    # and keeps their Inception outputs shard by shard beside them.
    features_dir = None
    if samples.startswith("run:"):
        samples = _generate(samples[len("run:") :], num_samples or 50000, batch_size, samples_dir)
        features_dir = os.path.join(
            os.path.dirname(samples), FEATURES, weights_cache.file_sha256(weights)[:16]
        )
    if _is_file_argument(samples):
        images = ev.read_npz_images(samples)
        if num_samples:
            images = images[:num_samples]
        sample_batches = (images[i : i + batch_size] for i in range(0, images.shape[0], batch_size))
    else:
        stream = data_lib.iterate_stored_images(samples, samples_split, data_dir, batch_size)
        first = next(stream)["image"]
        ev.check_uint8_images(first, f"Images of TFDS data set {samples!r}")
        sample_batches = itertools.chain([first], (b["image"] for b in stream))
        if num_samples:
            sample_batches = _first_rows(sample_batches, num_samples)
    if _is_file_argument(ref):
        if not os.path.isfile(ref):
            raise ValueError(f"Reference file {ref!r} does not exist.")
    else:
        # Opens the data set now (an unprepared one fails here, not after the samples' features).
        next(data_lib.iterate_stored_images(ref, ref_split, data_dir, 1))

    metric = ev.InceptionMetrics(weights, batch_size=batch_size)  # checks the weight file
    if _is_file_argument(ref):
        mu, sigma, ref_count, ref_features = ev.read_reference(
            ref, metric, keep_features=need_ref_features
        )
        if need_ref_features and ref_features is None:
            raise ValueError(
                f"--metrics {sorted(set(metrics) & {'kid', 'pr'})} need reference images; "
                f"{ref!r} holds only mu/sigma."
            )
    else:
        if cache_dir is None:
            base = data_dir or os.path.expanduser("~/.cache/consistency_jax")
            cache_dir = os.path.join(
                base, "inception_stats", os.path.splitext(os.path.basename(weights))[0]
            )
        mu, sigma, ref_count, ref_features = ev.reference_statistics(
            ref,
            ref_split,
            data_dir,
            metrics=metric,
            cache_dir=cache_dir,
            keep_features=need_ref_features,
        )

    needs_outputs = set(metrics) != {"fid"}
    if features_dir is not None and jax.process_count() == 1:
        pairs = _cached_outputs(metric, images, features_dir)
        stats, outputs = metric.accumulate(pairs, keep=needs_outputs)
    else:
        stats, outputs = metric.statistics(sample_batches, keep=needs_outputs)
    figures = metric.score(
        outputs if needs_outputs else stats,
        (mu, sigma),
        ref_features=ref_features,
        metrics=metrics,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
    )
    return {
        **figures,
        "num_samples": int(stats.count),
        "num_reference": int(ref_count),
        "samples": samples,
        "reference": ref if _is_file_argument(ref) else f"{ref}:{ref_split}",
        "inception_weights": os.path.abspath(weights),
        "note": (
            "Comparable with published numbers only with the real pt_inception-2015-12-05 weights, "
            "50000 samples and the full training-set statistics."
        ),
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _SAMPLES.value or not _REF.value:
        raise app.UsageError("--samples and --ref are required.")
    try:
        result = evaluate(
            _SAMPLES.value,
            _REF.value,
            weights=_WEIGHTS.value,
            metrics=_METRICS.value,
            data_dir=_DATA_DIR.value,
            samples_split=_SAMPLES_SPLIT.value,
            ref_split=_REF_SPLIT.value,
            num_samples=_NUM_SAMPLES.value,
            batch_size=_BATCH_SIZE.value,
            cache_dir=_CACHE_DIR.value,
            kid_subsets=_KID_SUBSETS.value,
            kid_subset_size=_KID_SUBSET_SIZE.value,
            samples_dir=_SAMPLES_DIR.value,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if _OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        with open(_OUT.value, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
