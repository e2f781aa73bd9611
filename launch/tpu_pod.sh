#!/usr/bin/env bash
# Run one job on every worker of a Cloud TPU VM pod slice at once (multi-controller JAX).
#
#   TPU=my-v5p-64 ZONE=us-east5-a bash launch/tpu_pod.sh jobs.arnoldi \
#       --config=configs/mnist.py:pod --workdir=gs://my-bucket/influence/mnist
#
# 1. packs the committed tree (git archive HEAD) and copies it to every worker;
# 2. on every worker: unpacks it into ~/$REMOTE_DIR and sets up .venv with jax[tpu] (once);
# 3. runs `python -m <job> --distributed=on <flags>` on all workers together. JAX finds the
#    coordinator, process count and index from the TPU metadata; process 0 writes logs and metrics.
# The workdir must be on gs:// (every worker reads and writes the same checkpoints). A preempted
# slice is resumed by running the same command again.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
REMOTE_DIR="${REMOTE_DIR:-influence}"
[ $# -ge 1 ] || { echo "usage: TPU=... ZONE=... $0 jobs.<name> --config=... --workdir=gs://..." >&2; exit 2; }
JOB="$1"; shift
case " $* " in *" --workdir=gs://"*) ;; *) echo "error: give --workdir=gs://... (shared by all workers)" >&2; exit 2 ;; esac

cd "$(dirname "$0")/.."
archive="$(mktemp -d)/influence.tar.gz"
git archive --format=tar.gz -o "$archive" HEAD
gcloud compute tpus tpu-vm scp "$archive" "$TPU":~/influence.tar.gz --zone="$ZONE" --worker=all
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  set -e
  mkdir -p ~/$REMOTE_DIR && tar -xzf ~/influence.tar.gz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR
  PYTHON=\${PYTHON:-python3.11} JAX_EXTRA=tpu bash launch/setup_venv.sh
  .venv/bin/python -m $JOB --distributed=on$args
"
