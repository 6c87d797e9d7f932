#!/usr/bin/env bash
# Quality of the continuous-time methods on the toy (issue 13, bench/RESULTS.md §6): trains each with
# the default configs/toy.py and prints its last evaluation (sliced-W2 / energy distance against the
# noise floor; for the distilled ones the one-step map error against the exact PF-ODE map).
# Usage: bench/toy_continuous.sh [OUTDIR] [METHOD ...]   (2-5 minutes per method on 2 idle CPU cores)
set -euo pipefail
out=${1:-/tmp/toy_continuous}; shift $(( $# >= 1 ? 1 : 0 ))
methods=${*:-sct scd ect cm_continuous_ct cm_continuous_cd}
mkdir -p "$out"
for method in $methods; do
  python -m consistency_jax.main --config=configs/toy.py:method=$method --workdir="$out/$method" \
      > "$out/$method.log" 2>&1
  echo "== $method: $(grep 'finished' "$out/$method.log" | sed 's/.*finished/finished/')"
  tail -n 1 "$out/$method/metrics.jsonl"
done
