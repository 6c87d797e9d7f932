#!/usr/bin/env bash
# The GPU measurements of the scale-out issue, for the CIFAR-10 NCSN++, in one command:
#   bash bench/gpu_suite.sh OUT_DIR
# Writes OUT_DIR/{step,memory,sampling}_*.{json,log}. Needs the package importable ($PYTHON or python3).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: bash bench/gpu_suite.sh OUT_DIR}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
# Overridable for a smoke run on CPU, e.g.
#   NET="--network=ncsnpp --image_size=8 --nf=8 --ch_mult=1 --num_res_blocks=1" BATCHES="16 8" \
#   LIMIT_GB=0.2 JAX_PLATFORMS=cpu bash bench/gpu_suite.sh /tmp/smoke
read -r -a NET <<< "${NET:---network=ncsnpp --image_size=32 --nf=128 --ch_mult=2,2,2 --num_res_blocks=4 --attn=16}"
read -r -a BATCHES <<< "${BATCHES:-512 128}"
LIMIT=()
if [[ -n "${LIMIT_GB:-}" ]]; then LIMIT=(--limit_gb="$LIMIT_GB"); fi
"$PY" -c "import jax; print(jax.devices())" | tee "$OUT/devices.log"
for dt in bfloat16 float32; do
  for b in "${BATCHES[@]}"; do
    "$PY" bench/train_step_bench.py "${NET[@]}" --dtype=$dt --batch=$b --method=all --loop \
      --steps_per_call=4 --json="$OUT/step_${dt}_${b}.json" 2>&1 | tee "$OUT/step_${dt}_${b}.log"
  done
  "$PY" bench/memory_bench.py "${NET[@]}" --dtype=$dt --batches="$(IFS=,; echo "${BATCHES[*]}")" \
    --method=all --find_max "${LIMIT[@]}" \
    --json="$OUT/memory_${dt}.json" 2>&1 | tee "$OUT/memory_${dt}.log"
  "$PY" bench/sampling_bench.py "${NET[@]}" --dtype=$dt --batch="${BATCHES[0]}" \
    --json="$OUT/sampling_${dt}.json" 2>&1 | tee "$OUT/sampling_${dt}.log"
done
# Issue 18: the network passes with and without the fast layers, and, where the official code is at
# hand (JCM_DIR: a checkout of openai/consistency_models_cifar10; JCM_PYTHON: an interpreter with its
# dependencies, dm-haiku and ml_collections included), the side-by-side comparison with its NCSN++.
"$PY" bench/layers_before_after.py --network=ncsnpp --nf=128 --batch="${BATCHES[-1]}" 2>&1 \
  | tee "$OUT/layers_ncsnpp.log"
"$PY" bench/layers_before_after.py --network=adm --nf=192 --batch="${BATCHES[-1]}" 2>&1 \
  | tee "$OUT/layers_adm.log"
if [[ -n "${JCM_DIR:-}" ]]; then
  for b in "${BATCHES[@]}"; do
    for dt in float32 bfloat16; do
      "$PY" bench/network_vs_jcm.py --jcm="$JCM_DIR" --jcm_python="${JCM_PYTHON:-$PY}" --nf=128 \
        --batch="$b" --dtype=$dt --rounds=2 --json="$OUT/vs_jcm_${dt}_${b}.json" 2>&1 \
        | tee "$OUT/vs_jcm_${dt}_${b}.log"
    done
  done
fi
