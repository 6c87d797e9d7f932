#!/usr/bin/env bash
# Quality of the default toy configs (issue 2): trains CT, iCT and CD with the default configs and
# prints the last evaluation of each (sliced-W2 / energy distance vs the noise floor; CD map error).
# Usage: bench/toy_quality.sh [OUTDIR]   (about 2-4 minutes per method on 2 idle CPU cores)
set -euo pipefail
out=${1:-/tmp/toy_quality}
mkdir -p "$out"
for method in ct ict cd; do
  python -m consistency_jax.main --config=configs/toy.py:method=$method --workdir="$out/$method" \
      > "$out/$method.log" 2>&1
  echo "== $method: $(grep 'finished' "$out/$method.log" | sed 's/.*finished/finished/')"
  tail -n 1 "$out/$method/metrics.jsonl"
done
