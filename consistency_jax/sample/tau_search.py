"""Choosing the intermediate times of multistep consistency sampling (CM §6 and Appendix C).

CM Algorithm 1 samples with K times T = τ_0 > τ_1 > … > τ_{K−1}; the paper picks τ_1, τ_2, … greedily,
one at a time, each by a ternary search over the Karras grid minimising FID, with the earlier ones
fixed. ``greedy_search`` does that for any score (digits-FD on the digits, FID with the Inception
weights), over grid indices counted from T (the cm/jcm convention of ``samplers.times_from_indices``),
by ternary search (assumes the score is unimodal in the index, as the paper does) or exhaustively
(every ``stride``-th index: the whole curve, for plots). Every score computed is recorded.

``make_scorer`` builds the score of a run: samples from fixed noise (the same ``(seed, i)`` draws for
every candidate, so differences between candidates are not sampling noise), with the times as a traced
array (one compilation for all candidates of a stage).

``run_tau_search`` is the command's ``--tau_search`` mode: the search for a run, scored by digits-FD
on the digits and by FID otherwise, written to ``tau_search.json``.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
from absl import logging

from consistency_jax import fs
from consistency_jax.sample.request import SampledRun, SampleError, SampleRequest, describe_run

Score = Callable[[tuple[float, ...]], float]


def ternary_argmin(f: Callable[[int], float], lo: int, hi: int) -> int:
    """argmin of f over the integers lo..hi (inclusive), f unimodal; ~2·log_{3/2}(hi − lo) calls of f
    (memoise f)."""
    if lo > hi:
        raise ValueError(f"Empty search range [{lo}, {hi}].")
    while hi - lo > 2:
        m1 = lo + (hi - lo) // 3
        m2 = hi - (hi - lo) // 3
        a, b = f(m1), f(m2)
        if a < b:
            hi = m2 - 1
        elif a > b:
            lo = m1 + 1
        else:
            lo, hi = m1, m2
    return min(range(lo, hi + 1), key=f)


def greedy_search(
    score: Score,
    grid: Sequence[float],
    num_steps: int = 2,
    *,
    method: str = "ternary",
    stride: int = 1,
    first: int = 0,
) -> dict:
    """Greedy choice of the times of ``num_steps``-step sampling on a grid (CM §6).

    Args:
      score: ts -> figure to minimise (e.g. FID of samples drawn with CM Algorithm 1 at times ts).
      grid: the candidate times, strictly decreasing; ``grid[first]`` is τ_0 (usually T). The last
        entry (ε, where f is the identity) is never chosen.
      num_steps: K, the number of times (1 needs no search).
      method: "ternary" (the paper's) or "exhaustive" (every ``stride``-th index).
      stride: index step of the exhaustive search.
      first: the index of τ_0.

    Returns:
      {"indices": chosen grid indices, "times": the times, "score": the score of the chosen times,
       "evaluations": [{"indices", "times", "score"}, ...] in the order computed}.
    """
    grid = [float(t) for t in grid]
    if any(b >= a for a, b in zip(grid, grid[1:])):
        raise ValueError("The grid of a τ search must be strictly decreasing (from T towards ε).")
    if method not in ("ternary", "exhaustive"):
        raise ValueError(f"method must be 'ternary' or 'exhaustive', got {method!r}.")
    if num_steps < 1 or num_steps > len(grid) - 1 - first:
        raise ValueError(
            f"num_steps must be in [1, {len(grid) - 1 - first}] on a grid of {len(grid)}, "
            f"got {num_steps}."
        )
    evaluations: list[dict] = []
    cache: dict[tuple[int, ...], float] = {}

    def evaluate(indices: tuple[int, ...]) -> float:
        if indices not in cache:
            times = tuple(grid[i] for i in indices)
            cache[indices] = float(score(times))
            evaluations.append(
                {"indices": list(indices), "times": list(times), "score": cache[indices]}
            )
            logging.info(
                "τ search: indices %s times %s -> %.4f",
                list(indices),
                [round(t, 4) for t in times],
                cache[indices],
            )
        return cache[indices]

    chosen = (first,)
    for _ in range(num_steps - 1):
        lo, hi = chosen[-1] + 1, len(grid) - 2  # below the previous time, above ε

        def f(i, chosen=chosen):
            value = evaluate(chosen + (i,))
            return value if math.isfinite(value) else math.inf  # a NaN score never wins

        if method == "ternary":
            best = ternary_argmin(f, lo, hi)
        else:
            candidates = list(range(lo, hi + 1, max(1, int(stride))))
            best = min(candidates, key=f)
        chosen = chosen + (best,)
    final = evaluate(chosen)
    return {
        "indices": list(chosen),
        "times": [grid[i] for i in chosen],
        "score": final,
        "evaluations": evaluations,
    }


def make_scorer(
    apply_fn,
    params,
    sigmas,
    example_shape: Sequence[int],
    num_samples: int,
    metric,
    *,
    seed: int = 0,
    num_classes: int | None = None,
    clip: float | None = 1.0,
    consistency_fn=None,
    batch: int = 500,
) -> Score:
    """The score of a run's samples at times ts: ``metric(uint8-quantised samples in [−1, 1])``.

    Sample i uses the draws of ``samplers.indexed_sample`` (example i from (seed, i); uniform labels
    from the same key for a class-conditional run), whatever ts, and the times enter the compiled
    sampler as an array: one compilation per number of times.
    """
    import jax
    import jax.numpy as jnp

    from consistency_jax import parameterization as param_lib
    from consistency_jax import samplers

    consistency_fn = consistency_fn or param_lib.consistency_fn
    key = jax.random.key(seed)

    @jax.jit
    def draw(params, ts, indices):
        keys = samplers.example_keys(key, indices)
        labels = samplers.example_labels(keys, num_classes) if num_classes else None
        f = functools.partial(
            consistency_fn, apply_fn, params, sigmas=sigmas, labels=labels, train=False, rng=None
        )
        x = ts[0] * samplers.example_noise(keys, 0, example_shape)
        for j in range(ts.shape[0]):
            if j > 0:
                x = x + jnp.sqrt(ts[j] ** 2 - sigmas.sigma_min**2) * samplers.example_noise(
                    keys, j, example_shape
                )
            x = f(x=x, t=jnp.full(x.shape[:1], ts[j], jnp.float32))
            if clip:
                x = jnp.clip(x, -clip, clip)
        return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    def score(ts: tuple[float, ...]) -> float:
        samplers.check_times(ts, sigmas)
        out = []
        for lo in range(0, num_samples, batch):
            idx = np.arange(lo, lo + batch, dtype=np.int32)
            out.append(
                np.asarray(draw(params, jnp.asarray(ts, jnp.float32), idx))[: num_samples - lo]
            )
        images = np.concatenate(out).astype(np.float32) / 127.5 - 1.0
        return float(metric(images))

    return score


def search_grid(request: SampleRequest, model: SampledRun) -> np.ndarray:
    """The candidate times: the Karras grid of --num_scales points (default: the run's final grid, 40
    for a continuous-time run), from T down to ε."""
    from consistency_jax import schedules

    n = request.num_scales
    if not n:
        from consistency_jax import methods

        n = methods.get(model.config.method).grid_size(model.config) or 40
    return np.asarray(schedules.karras_sigmas(int(n), model.sigmas), np.float64)[::-1]


def run_tau_search(request: SampleRequest) -> dict:
    """Greedy τ search (``greedy_search``) for a run, scored by digits-FD on the digits, by
    FID (``--inception_weights``, ``--ref``) otherwise, on ``--num_samples`` samples from fixed noise;
    writes ``tau_search.json`` (the choice and every score computed).

    Raises:
      SampleError: an EDM run, a metric that cannot be computed, an existing result.
    """
    import jax

    from consistency_jax import export, loading, methods, networks
    from consistency_jax.evaluators.images import is_digits

    model = describe_run(request)
    if model.family != "consistency":
        raise SampleError(
            f"--tau_search is for consistency models; {request.workdir} is an "
            f"{model.config.method} run."
        )
    path = os.path.join(request.out, "tau_search.json")
    if os.path.exists(path) and not request.overwrite:
        raise SampleError(f"{path} exists; use --overwrite or another --out.")
    data_dir = model.config.data.data_dir or None
    if is_digits(model.config.data.name):
        from consistency_jax.evaluators import digits as digits_lib

        digits_lib.get_digits_extractor(model.example_shape[0], data_dir)
        metric_name = "digits_fd"
        metric = lambda x: digits_lib.digits_fd(x, data_dir=data_dir)
    elif request.inception_weights and request.ref:
        from consistency_jax.evaluators import inception_metrics as inception_eval

        metrics = inception_eval.InceptionMetrics(request.inception_weights)
        if request.ref.endswith(".npz"):
            mu, sigma, _, _ = inception_eval.read_reference(request.ref, metrics)
        else:
            mu, sigma, _, _ = inception_eval.reference_statistics(
                request.ref, data_dir=request.data_dir or None, metrics=metrics
            )
        ref_stats = (mu, sigma)
        metric_name = "fid"
        metric = lambda x: metrics.score(
            metrics.statistics(np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8))[0],
            ref_stats,
        )["fid"]
    else:
        raise SampleError(
            "--tau_search scores samples by digits-FD (digits runs) or by FID: give "
            "--inception_weights=FILE and --ref=TFDS_NAME|stats.npz."
        )
    grid = search_grid(request, model)
    _, params, step = loading.load_model_params(request.workdir, request.ema_rate, step=model.step)
    apply_fn = networks.make_apply_fn(methods.network(model.config))
    score = make_scorer(
        apply_fn,
        params,
        model.sigmas,
        model.example_shape,
        request.num_samples,
        metric,
        seed=request.seed,
        num_classes=model.num_classes,
        clip=request.clip or None,
        consistency_fn=model.consistency_fn,
        batch=min(500, request.num_samples),
    )
    start = time.time()
    result = greedy_search(
        score, grid, request.search_steps, method=request.search, stride=request.search_stride
    )
    result.update(
        metric=metric_name,
        workdir=fs.resolve(request.workdir),
        step=step,
        method=model.config.method,
        num_samples=request.num_samples,
        seed=request.seed,
        grid_size=len(grid),
        one_step_score=score((float(grid[0]),)),
        seconds=round(time.time() - start, 1),
        devices=jax.local_device_count(),
    )
    os.makedirs(request.out, exist_ok=True)
    export.write_json_atomic(path, result)
    return {k: result[k] for k in ("indices", "times", "score", "one_step_score", "metric")} | {
        "json": path,
        "evaluations": len(result["evaluations"]),
    }
