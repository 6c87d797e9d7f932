"""Fingerprints of short runs of the main job: a SHA-256 of every array of the final checkpoint and
the figures of its evaluation, for each default config. Two checkouts whose fingerprints agree train
bit for bit the same models (the runs are deterministic on one machine), so a refactoring can show
that it left the toy and digits results of bench/RESULTS.md unchanged without rerunning them.

  python bench/state_fingerprint.py --out=/tmp/fp_new                       # this checkout
  python bench/state_fingerprint.py --out=/tmp/fp_old --repo=/tmp/old       # another checkout

Each job runs ``python -m consistency_jax.main`` of the checkout given by ``--repo`` (the command line
is the same for every version), in that checkout, with the interpreter running this script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = (
    "toy:ct",
    "toy:ict",
    "toy:cd",
    "toy:edm",
    "digits:edm",
    "digits:ict",
    "digits:ct",
    "digits:cd",
)


def run_job(repo: str, out: str, job: str, steps: int) -> str:
    config, method = job.split(":")
    workdir = os.path.join(out, f"{config}_{method}")
    flags = [
        f"--config=configs/{config}.py:method={method}",
        f"--workdir={workdir}",
        f"--config.train.num_steps={steps}",
        f"--config.train.log_every={steps}",
        f"--config.train.eval_every={steps}",
        f"--config.checkpoint.every={steps}",
    ]
    if config == "digits":
        flags.append(f"--config.data.data_dir={os.path.join(out, 'tfds')}")
    if method == "cd" and config == "digits":
        flags.append(f"--config.teacher.workdir={os.path.join(out, 'digits_edm')}")
    env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    proc = subprocess.run(
        [sys.executable, "-m", "consistency_jax.main", *flags],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise SystemExit(f"{job} failed:\n{proc.stderr[-3000:]}")
    return workdir


def fingerprint(workdir: str, steps: int) -> dict:
    """SHA-256 over the sorted names and bytes of the checkpoint's arrays, and the last figures."""
    import numpy as np
    import orbax.checkpoint as ocp

    directory = os.path.join(workdir, "checkpoints", str(steps))
    digest = hashlib.sha256()
    count = 0
    for item in ("state", "ema"):
        path = os.path.join(directory, item)
        if not os.path.isdir(path):
            continue
        tree = ocp.PyTreeCheckpointer().restore(path)
        flat = {}

        def walk(prefix, node):
            if isinstance(node, dict):
                for k in node:
                    walk(f"{prefix}/{k}", node[k])
            elif isinstance(node, (list, tuple)):
                for i, v in enumerate(node):
                    walk(f"{prefix}/{i}", v)
            elif node is not None:
                flat[prefix] = np.asarray(node)

        walk(item, tree)
        for name in sorted(flat):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(flat[name]).tobytes())
            count += 1
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        figures = json.loads(f.read().splitlines()[-1])
    return {"sha256": digest.hexdigest()[:16], "arrays": count, "figures": figures}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for the runs")
    p.add_argument("--repo", default=HERE, help="the checkout to run (default: this one)")
    p.add_argument("--jobs", default=",".join(JOBS))
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    results = {}
    for job in args.jobs.split(","):
        fp = fingerprint(run_job(os.path.abspath(args.repo), out, job, args.steps), args.steps)
        results[job] = fp
        figures = " ".join(f"{k}={v:.6g}" for k, v in sorted(fp["figures"].items()) if k != "step")
        print(f"{job:11s} {fp['sha256']} ({fp['arrays']} arrays)  {figures}", flush=True)
    with open(os.path.join(out, "fingerprints.json"), "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
