"""Shared helpers of the benchmarks: honest timing, XLA FLOP counts, accelerator peaks, the networks.

Timing: compile and warm-up calls are excluded; each repeat runs ``iters`` calls back to back (async
dispatch keeps the device busy, as in a training loop) and blocks on the last result; the reported
time is the median over repeats of the per-call time, and the functions of one comparison are timed
in round-robin.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

# Dense peak FLOP/s per chip, (bfloat16, float32) — float32 matmuls run as TF32 on NVIDIA GPUs and as
# bfloat16 passes on TPUs under JAX's default precision. Matched against ``device.device_kind``.
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),  # SXM; the PCIe card is ~25% lower
    "A100": (312e12, 156e12),
    "L4": (121e12, 60e12),
    "TPU v6 lite": (918e12, 918e12),
    "TPU v5p": (459e12, 459e12),
    "TPU v5 lite": (197e12, 197e12),
    "TPU v5e": (197e12, 197e12),
    "TPU v4": (275e12, 275e12),
    "TPU v5": (459e12, 459e12),  # v5p reports "TPU v5" (after the "v5 lite" entries on purpose)
}


def peak_flops(dtype: str, override_tflops: float = 0.0) -> float | None:
    """The device's dense peak for ``dtype`` (None when unknown, e.g. on CPU)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, (bf16, f32) in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return bf16 if dtype == "bfloat16" else f32
    return None


def block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def time_interleaved(
    cases: dict[str, tuple[Callable, Any, Sequence[Any]]],
    *,
    iters: int = 10,
    repeats: int = 5,
    warmup: int = 2,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Median seconds per call of several ``state, aux = step(state, *args)`` functions, timed in
    round-robin (A B C A B C ...) so that a machine whose load drifts affects them alike; ratios of
    the results are then more trustworthy than from back-to-back runs.

    Args:
      cases: name -> (step, initial state, extra args); states are donated and threaded through.

    Returns:
      ({name: median seconds per call}, {name: final state}).
    """
    states = {k: v[1] for k, v in cases.items()}
    for name, (step, _, args) in cases.items():
        for _ in range(warmup):
            states[name], _ = step(states[name], *args)
        block(states[name])
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, (step, _, args) in cases.items():
            state = states[name]
            t0 = time.perf_counter()
            for _ in range(iters):
                state, aux = step(state, *args)
            block((state, aux))
            samples[name].append((time.perf_counter() - t0) / iters)
            states[name] = state
    return {k: statistics.median(v) for k, v in samples.items()}, states


def stateless(fn: Callable) -> Callable:
    """Adapts ``out = fn(*args)`` to the ``(state, aux)`` convention of the timers."""
    return lambda state, *args: (state, fn(*args))


def xla_flops(jitted, *args) -> float | None:
    """FLOPs of one call according to XLA's cost analysis of the compiled program (None if absent)."""
    try:
        cost = jitted.lower(*args).compile().cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def build_network(
    name: str,
    image_size: int,
    dtype: str,
    *,
    nf: int = 32,
    ch_mult: Sequence[int] = (1, 2),
    num_res_blocks: int = 1,
    attn: Sequence[int] = (),
    hidden: int = 256,
    depth: int = 4,
):
    """(module, example_shape): a small NCSN++ on image_size² RGB images, or the MLP on 2-D data."""
    from consistency_jax.networks import get_network

    kw = {} if dtype == "float32" else {"dtype": jnp.dtype(dtype)}
    if name == "mlp":
        return get_network("mlp", hidden=hidden, depth=depth, **kw), (2,)
    try:
        module = get_network(
            name,
            nf=nf,
            ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks,
            attn_resolutions=tuple(attn),
            **kw,
        )
    except (ImportError, ModuleNotFoundError) as e:
        raise SystemExit(f"Network {name!r} is not available ({e}); use --network=mlp.") from e
    return module, (image_size, image_size, 3)


def describe_device() -> str:
    d = jax.devices()[0]
    return f"{jax.device_count()} × {d.platform} ({d.device_kind}), JAX {jax.__version__}"


def add_network_args(p, *, batch: int) -> None:
    """The network flags shared by the benchmark scripts (``build_network``'s arguments)."""
    p.add_argument("--network", default="ncsnpp", choices=["ncsnpp", "ddpmpp", "mlp"])
    p.add_argument("--batch", type=int, default=batch, help="global batch")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--image_size", type=int, default=16)
    p.add_argument("--nf", type=int, default=32)
    p.add_argument("--ch_mult", default="1,2")
    p.add_argument("--num_res_blocks", type=int, default=1)
    p.add_argument("--attn", default="", help="attention resolutions, e.g. 16")
    p.add_argument("--hidden", type=int, default=256, help="MLP width")


def write_json(path: str, args, rows, *, device: bool = True) -> None:
    """Writes a benchmark's arguments, device and result rows to ``path`` (no-op when empty)."""
    if not path:
        return
    import json

    record = {"args": vars(args), "results": rows}
    if device:
        record["device"] = describe_device()
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
