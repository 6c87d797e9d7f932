"""Joining the processes of a multi-host job (``jax.distributed.initialize``), for every command."""

from __future__ import annotations

from collections.abc import Mapping

from absl import app


def distributed_args(env) -> dict:
    """Arguments of ``jax.distributed.initialize`` beyond what JAX detects by itself.

    On TPU pods, SLURM, Open MPI and GKE JAX finds the coordinator, the process count and this
    process's index itself. Elsewhere (several GPU nodes started by hand, or several processes on
    one machine) set ``JAX_COORDINATOR_ADDRESS=host:port`` (read by JAX), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` on every process.
    """
    args = {}
    for key, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if env.get(key, "") != "":
            try:
                args[arg] = int(env[key])
            except ValueError:
                raise app.UsageError(f"{key} must be an integer, got {env[key]!r}.") from None
    if ("num_processes" in args) != ("process_id" in args):
        raise app.UsageError("Set both JAX_NUM_PROCESSES and JAX_PROCESS_ID, or neither.")
    if args and not 0 <= args["process_id"] < args["num_processes"]:
        raise app.UsageError(
            f"Need 0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES, got "
            f"{args['process_id']} and {args['num_processes']}."
        )
    return args


def maybe_initialize(env: Mapping[str, str]) -> None:
    """``jax.distributed.initialize`` when ``CONSISTENCY_JAX_DISTRIBUTED=1`` (``launch/run.sh`` sets it
    on pods), with ``distributed_args(env)``."""
    if env.get("CONSISTENCY_JAX_DISTRIBUTED", "") == "1":
        import jax

        jax.distributed.initialize(**distributed_args(env))
