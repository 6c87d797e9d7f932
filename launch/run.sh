#!/usr/bin/env bash
# Runs the training job `python -m consistency_jax.main ARGS` on one host or on every worker of a
# Cloud TPU pod (big_vision-style). Everything after `--` goes to consistency_jax.main unchanged.
#
#   Local (one host: CPU, or all GPUs of the machine):
#     launch/run.sh -- --config=configs/toy.py:method=ct --workdir=/tmp/toy_ct
#     launch/run.sh --setup -- --config=...      # first create ./.venv (pip install -e .[gpu] if
#                                                #  nvidia-smi works, else pip install -e .)
#
#   TPU pod (every worker runs the same program; JAX joins them with jax.distributed.initialize()):
#     launch/run.sh --tpu=my-v4-32 --zone=us-central2-b -- \
#         --config=configs/cifar10.py:method=ct --workdir=gs://my-bucket/cifar10_ct
#
# Options:
#   --tpu=NAME         run on every worker of this TPU VM (gcloud compute tpus tpu-vm ssh --worker=all)
#   --zone=ZONE        its zone (required with --tpu)
#   --project=PROJECT  its project (default: gcloud's)
#   --remote_dir=DIR   where the code lives on the workers (default: ~/consistency_jax)
#   --no_sync          do not copy this checkout to the workers (the code is already there)
#   --setup            local only: create ./.venv with the package installed if it is missing
#   --dry_run          print the commands instead of running them
#
# On the workers, the code is copied to --remote_dir (every file git tracks or would track, so local
# edits are included), a virtualenv is created there on first use (`pip install -e ".[tpu]"`), and the
# job runs with CONSISTENCY_JAX_DISTRIBUTED=1 so that main.py calls jax.distributed.initialize().
# Locally the interpreter is $PYTHON if set, else ./.venv/bin/python if it exists, else python3.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TPU="" ZONE="" PROJECT="" REMOTE_DIR="~/consistency_jax" SYNC=1 SETUP=0 DRY=0

usage() { sed -n '2,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "launch/run.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) TPU="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --remote_dir=*) REMOTE_DIR="${1#*=}" ;;
    --no_sync) SYNC=0 ;;
    --setup) SETUP=1 ;;
    --dry_run) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (the job's own flags go after '--'; see --help)" ;;
  esac
  shift
done
[[ $# -gt 0 ]] || die "no job arguments: put --config=... --workdir=... after '--' (see --help)"

run() {  # prints the command (dry run) or runs it
  if [[ $DRY == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# ------------------------------------------------------------------------------------------------
# Local: one host, whatever devices JAX finds there.
if [[ -z "$TPU" ]]; then
  [[ -z "$ZONE" && -z "$PROJECT" ]] || die "--zone/--project need --tpu=NAME"
  cd "$REPO"
  if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
  elif [[ -x "$REPO/.venv/bin/python" ]]; then
    PY="$REPO/.venv/bin/python"
  else
    PY="python3"
  fi
  if [[ $SETUP == 1 && ! -x "$REPO/.venv/bin/python" && -z "${PYTHON:-}" ]]; then
    EXTRA=""
    if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi > /dev/null 2>&1; then EXTRA="[gpu]"; fi
    run python3 -m venv "$REPO/.venv"
    run "$REPO/.venv/bin/pip" install -q --upgrade pip
    run "$REPO/.venv/bin/pip" install -q -e "$REPO$EXTRA"
    PY="$REPO/.venv/bin/python"
  fi
  if [[ $DRY == 0 ]] && ! "$PY" -c "import consistency_jax" > /dev/null 2>&1; then
    die "$PY cannot import consistency_jax: run with --setup, or set PYTHON to an interpreter " \
        "where 'pip install -e .' was done"
  fi
  run "$PY" -m consistency_jax.main "$@"
  exit $?
fi

# ------------------------------------------------------------------------------------------------
# TPU pod: copy the code, set up the environment where it is missing, run on all workers at once.
[[ -n "$ZONE" ]] || die "--tpu needs --zone=ZONE"
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=("--zone=$ZONE")
[[ -z "$PROJECT" ]] || WHERE+=("--project=$PROJECT")

if [[ $SYNC == 1 ]]; then
  TMP="$(mktemp -d)"
  trap 'rm -rf "$TMP"' EXIT
  TARBALL="$TMP/consistency_jax.tar.gz"
  if git -C "$REPO" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
      tar --null -czf "$TARBALL" -T -)
  else
    tar -C "$REPO" --exclude=.venv --exclude=.git -czf "$TARBALL" .
  fi
  run "${GCLOUD[@]}" scp "$TARBALL" "$TPU:/tmp/consistency_jax.tar.gz" --worker=all "${WHERE[@]}"
  UNPACK="mkdir -p $REMOTE_DIR && tar -xzf /tmp/consistency_jax.tar.gz -C $REMOTE_DIR && "
else
  UNPACK=""
fi

JOB_ARGS="$(printf '%q ' "$@")"
REMOTE="set -e; ${UNPACK}cd $REMOTE_DIR; \
if [ ! -x .venv/bin/python ]; then \
  python3 -m venv .venv || { sudo apt-get update -qq && \
    sudo apt-get install -y -qq python3-venv && python3 -m venv .venv; }; \
  .venv/bin/pip install -q --upgrade pip && \
  .venv/bin/pip install -q -e '.[tpu]'; \
fi; \
CONSISTENCY_JAX_DISTRIBUTED=1 .venv/bin/python -m consistency_jax.main $JOB_ARGS"

run "${GCLOUD[@]}" ssh "$TPU" --worker=all "${WHERE[@]}" --command="$REMOTE"
