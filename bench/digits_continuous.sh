#!/usr/bin/env bash
# Continuous-time methods on the digits (issue 13, bench/RESULTS.md §6): sCT, sCD and CM's continuous
# CD/CT, ECT, TCM (stage 2 of the ECT run: list ect before tcm) and MeanFlow, with the default
# configs/digits.py (3000 steps × 64), next to the discrete rows of §2.
# The distilled / tuned ones read the EDM teacher run of bench/digits_quality.sh (EDM_DIR).
# Usage: bench/digits_continuous.sh EDM_DIR [OUTDIR] [METHOD ...]
set -euo pipefail
edm=$(cd "$1" && pwd); out=${2:-/tmp/digits_continuous}; shift $(( $# >= 2 ? 2 : 1 ))
methods=${*:-sct scd ect cm_continuous_ct cm_continuous_cd}
mkdir -p "$out"
for method in $methods; do
  extra=()
  case $method in
    scd) extra=(--config.teacher.workdir="$edm" --config.init.workdir="$edm") ;;  # starts as the teacher
    cm_continuous_cd) extra=(--config.teacher.workdir="$edm") ;;
    ect) extra=(--config.init.workdir="$edm") ;;
    tcm) extra=(--config.init.workdir="$out/ect") ;;  # stage 2 of this script's ECT run
  esac
  python -m consistency_jax.main --config=configs/digits.py:method=$method --workdir="$out/$method" \
      "${extra[@]}" > "$out/$method.log" 2>&1
  echo "== $method: $(grep 'finished' "$out/$method.log" | sed 's/.*finished/finished/')"
  tail -n 1 "$out/$method/metrics.jsonl"
done
