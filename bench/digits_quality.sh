#!/usr/bin/env bash
# Sample quality on the digits (issue 3, bench/RESULTS.md §2): trains the EDM teacher, distils CD from
# it, trains CT and iCT, all with the default configs/digits.py, and prints each run's last evaluation
# (digits-FD of 1-step / 2-step samples, or of the teacher's 35-NFE Heun samples).
# Usage: bench/digits_quality.sh [OUTDIR]   (about 25 minutes on 2 idle CPU cores)
set -euo pipefail
out=${1:-/tmp/digits_quality}
mkdir -p "$out"
run() {
  local method=$1; shift
  python -m consistency_jax.main --config=configs/digits.py:method=$method --workdir="$out/$method" "$@" \
      > "$out/$method.log" 2>&1
  echo "== $method: $(grep 'finished' "$out/$method.log" | sed 's/.*finished/finished/')"
  tail -n 1 "$out/$method/metrics.jsonl"
}
run edm
run cd --config.teacher.workdir="$out/edm"
run ct
run ict
