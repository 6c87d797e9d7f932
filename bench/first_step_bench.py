"""Time to first step: how long the main job takes before its first training step and in all, and
what JAX spends tracing, lowering and compiling its programs (train step, samplers, evaluation).

  python bench/first_step_bench.py                                  # this checkout
  python bench/first_step_bench.py --repo=/tmp/old --repo=/tmp/new  # two checkouts, alternately

Each job is ``python -m consistency_jax.main`` of the checkout, in a fresh process, with a fresh
work directory, no persistent compilation cache and XLA's default flags (what a user's first run
pays), two training steps and one evaluation. JAX's compile log (``JAX_LOG_COMPILES``) gives the
seconds per stage; "trace" counts only the outermost programs' traces (a nested jit's trace is part
of its caller's). Rounds alternate between checkouts so that both see the same machine load.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import subprocess
import sys
import tempfile

STEPS = [
    "--config.train.num_steps=2",
    "--config.train.log_every=1",
    "--config.train.eval_every=2",
    "--config.checkpoint.every=2",
    "--config.eval.num_samples=64",
]
STAGE = re.compile(
    r"Finished (tracing (\S+) for jit|jaxpr to MLIR module conversion jit\((\S+)\)|"
    r"XLA compilation of jit\((\S+)\)) in ([0-9.]+) sec"
)
STAMP = re.compile(r"^[IWE](\d{4}) (\d\d:\d\d:\d\d\.\d+)")


def stamp(line: str) -> float | None:
    m = STAMP.match(line)
    if not m:
        return None
    t = datetime.datetime.strptime(m.group(2), "%H:%M:%S.%f")
    return t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6


def run_job(repo: str, job: str, tfds_dir: str) -> dict:
    config, method = job.split(":")
    with tempfile.TemporaryDirectory() as workdir:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")
        }
        env.update(JAX_PLATFORMS="cpu", JAX_LOG_COMPILES="1", TFDS_DATA_DIR=tfds_dir)
        argv = [
            sys.executable,
            "-m",
            "consistency_jax.main",
            f"--config=configs/{config}.py:method={method}",
            f"--workdir={workdir}/run",
            *STEPS,
        ]
        start = datetime.datetime.now()
        start_s = start.hour * 3600 + start.minute * 60 + start.second + start.microsecond / 1e6
        done = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True)
        wall = (datetime.datetime.now() - start).total_seconds()
    if done.returncode:
        raise SystemExit(f"{job} in {repo} failed:\n{done.stderr[-3000:]}")
    out = {"wall": wall, "trace": 0.0, "lower": 0.0, "compile": 0.0, "first_step": None}
    # A nested jit logs its trace before its caller's, and only the outermost program is lowered:
    # of the traces logged since the previous lowering, the last one is the outermost.
    last_trace = 0.0
    for line in done.stderr.splitlines():
        m = STAGE.search(line)
        if m:
            seconds = float(m.group(5))
            if m.group(2):
                last_trace = seconds
            elif m.group(3):
                out["lower"] += seconds
                out["trace"] += last_trace
                last_trace = 0.0
            else:
                out["compile"] += seconds
        if out["first_step"] is None and re.search(r"\] step 1/", line):
            t = stamp(line)
            out["first_step"] = (t - start_s) % 86400 if t is not None else None
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", action="append", help="checkout(s) to run (default: this one)")
    p.add_argument("--jobs", default="digits:ict,digits:sct,digits:meanflow")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    repos = args.repo or [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    tfds = tempfile.TemporaryDirectory(prefix="first_step_tfds_")  # the digits, built once
    tfds_dir = tfds.name
    rows = {}
    for r in range(args.rounds):
        for job in args.jobs.split(","):
            for repo in repos:
                got = run_job(repo, job, tfds_dir)
                rows.setdefault((job, repo), []).append(got)
                print(
                    f"round {r} {job:16s} {repo:24s} wall {got['wall']:6.1f} s  first step "
                    f"{got['first_step'] or float('nan'):6.1f} s  trace {got['trace']:5.1f}  "
                    f"lower {got['lower']:5.1f}  compile {got['compile']:5.1f}",
                    flush=True,
                )
    print("\nmedian over rounds (s):")
    for (job, repo), runs in rows.items():
        med = {k: statistics.median(x[k] or 0.0 for x in runs) for k in runs[0]}
        print(
            f"{job:16s} {repo:24s} wall {med['wall']:6.1f}  first step {med['first_step']:6.1f}  "
            f"trace {med['trace']:5.1f}  lower {med['lower']:5.1f}  compile {med['compile']:5.1f}"
        )


if __name__ == "__main__":
    main()
