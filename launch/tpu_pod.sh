#!/usr/bin/env bash
# One job on every worker of a Cloud TPU VM pod slice at once (multi-controller JAX).
#
#   export TPU=my-v5p-64 ZONE=us-east5-a         # and PROJECT=... unless gcloud has a default
#   bash launch/tpu_pod.sh setup                   # copy this repository, Python 3.11, .venv with jax[tpu]
#   bash launch/tpu_pod.sh run jobs.arnoldi --config=configs/mnist.py:pod --workdir=gs://bucket/mnist
#   bash launch/tpu_pod.sh logs [WORKER]           # follow a worker's log (default: worker 0)
#   bash launch/tpu_pod.sh status                  # is the job running, on each worker
#   bash launch/tpu_pod.sh stop                    # SIGTERM (save, exit 0), then clear TPU locks
#
# setup: packs the committed tree (git archive HEAD: commit what you want to run), copies it to
#   every worker, installs Python 3.11 where the image lacks it (Cloud TPU VM images ship 3.10;
#   deadsnakes PPA), and builds ~/$REMOTE_DIR/.venv with the pinned jax and its TPU build.
# run: starts `python -m <job> --distributed=on <flags>` on all workers, detached (setsid, nohup)
#   with its output in ~/$REMOTE_DIR/logs/<job>-<time>.log, so a dropped ssh connection does not
#   stop it. JAX finds the coordinator, process count and index from the TPU metadata. The workdir
#   must be on gs://: every worker reads and writes the same checkpoints.
# stop: SIGTERM to the job on every worker: it saves at the next step and exits 0 (what a Spot
#   preemption notice does); after $STOP_GRACE_SECS (default 600) whatever is left is killed, the
#   TPU lock file is removed and any process still holding the chips is ended, so the next run
#   can open them.
# A preempted slice: recreate it (README, "Many processes"), then setup and the same run command:
# the job resumes from the checkpoints in the workdir.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM (node) name}"
: "${ZONE:?set ZONE to the TPU zone}"
REMOTE_DIR="${REMOTE_DIR:-influence}"
STOP_GRACE_SECS="${STOP_GRACE_SECS:-600}"
TPU_LOCKFILE="${TPU_LOCKFILE:-/tmp/libtpu_lockfile}"

usage() {
  echo "usage: TPU=... ZONE=... $0 setup | run jobs.<name> --config=... --workdir=gs://... | logs [WORKER] | status | stop" >&2
  exit 2
}

on_workers() {  # on_workers WORKER SCRIPT: run SCRIPT with bash on worker WORKER ("all": every one)
  gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} \
    --worker="$1" --command="$2"
}

# The scripts each worker runs. Values from here are baked in with printf %q (the remote shell
# sees them literally); $-expressions escaped with \ expand on the worker.
remote_setup() {
  cat <<EOF
set -euo pipefail
SUDO=""; [ "\$(id -u)" -eq 0 ] || SUDO=sudo
if ! command -v python3.11 >/dev/null 2>&1; then
  \$SUDO apt-get update -qq
  \$SUDO apt-get install -y -qq software-properties-common
  \$SUDO add-apt-repository -y ppa:deadsnakes/ppa
  \$SUDO apt-get update -qq
  \$SUDO apt-get install -y -qq python3.11 python3.11-venv
fi
mkdir -p ~/$(printf %q "$REMOTE_DIR")
tar -xzf ~/influence.tar.gz -C ~/$(printf %q "$REMOTE_DIR")
cd ~/$(printf %q "$REMOTE_DIR")
PYTHON=python3.11 JAX_EXTRA=tpu bash launch/setup_venv.sh
echo "\$(hostname): ready"
EOF
}

remote_run() {  # remote_run JOB ARG...
  local job=$1; shift
  local args
  args=$(printf ' %q' "$@")
  cat <<EOF
set -euo pipefail
cd ~/$(printf %q "$REMOTE_DIR")
if [ -f run.pid ] && kill -0 "\$(cat run.pid)" 2>/dev/null; then
  echo "error: \$(hostname) is already running a job (pid \$(cat run.pid)): bash launch/tpu_pod.sh stop first" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  echo "error: \$(hostname) has no ~/$(printf %q "$REMOTE_DIR")/.venv: run bash launch/tpu_pod.sh setup first" >&2
  exit 2
fi
mkdir -p logs
log=logs/$(printf %q "$job")-\$(date -u +%Y%m%d-%H%M%S).log
nohup setsid .venv/bin/python -m $(printf %q "$job") --distributed=on$args >"\$log" 2>&1 </dev/null &
echo \$! >run.pid
ln -sfn "\$(basename "\$log")" logs/latest.log
echo "\$(hostname): started $(printf %q "$job") (pid \$!), log ~/$(printf %q "$REMOTE_DIR")/\$log"
EOF
}

remote_status() {
  cat <<EOF
cd ~/$(printf %q "$REMOTE_DIR") 2>/dev/null || { echo "\$(hostname): not set up"; exit 0; }
if [ -f run.pid ] && kill -0 "\$(cat run.pid)" 2>/dev/null; then
  echo "\$(hostname): running (pid \$(cat run.pid)), log \$(readlink logs/latest.log)"
else
  echo "\$(hostname): not running; last lines of \$(readlink logs/latest.log 2>/dev/null || echo 'no log'):"
  tail -n 3 logs/latest.log 2>/dev/null || true
fi
EOF
}

remote_stop() {
  cat <<EOF
SUDO=""; [ "\$(id -u)" -eq 0 ] || SUDO=sudo
if cd ~/$(printf %q "$REMOTE_DIR") 2>/dev/null && [ -f run.pid ]; then
  pid=\$(cat run.pid)
  if kill -0 "\$pid" 2>/dev/null; then
    kill -TERM -- "-\$pid" 2>/dev/null || kill -TERM "\$pid"
    for _ in \$(seq $(printf %q "$STOP_GRACE_SECS")); do
      kill -0 "\$pid" 2>/dev/null || break
      sleep 1
    done
    if kill -0 "\$pid" 2>/dev/null; then
      echo "\$(hostname): still running after $(printf %q "$STOP_GRACE_SECS") s; killing it"
      kill -KILL -- "-\$pid" 2>/dev/null || kill -KILL "\$pid"
    else
      echo "\$(hostname): stopped"
    fi
  fi
  rm -f run.pid
fi
\$SUDO rm -f $(printf %q "$TPU_LOCKFILE")
if command -v lsof >/dev/null 2>&1; then
  holders=\$(\$SUDO lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null || true)
  if [ -n "\$holders" ]; then
    echo "\$(hostname): ending processes still holding the TPU: \$holders"
    # shellcheck disable=SC2086
    \$SUDO kill -KILL \$holders || true
  fi
fi
EOF
}

[ $# -ge 1 ] || usage
command=$1; shift
cd "$(dirname "$0")/.."
case "$command" in
  setup)
    [ $# -eq 0 ] || usage
    if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
      echo "warning: uncommitted changes are not copied (git archive HEAD)" >&2
    fi
    archive="$(mktemp -d)/influence.tar.gz"
    git archive --format=tar.gz -o "$archive" HEAD
    gcloud compute tpus tpu-vm scp "$archive" "$TPU":~/influence.tar.gz --zone="$ZONE" \
      ${PROJECT:+--project="$PROJECT"} --worker=all
    on_workers all "$(remote_setup)"
    ;;
  run)
    [ $# -ge 1 ] || usage
    job=$1; shift
    case "$job" in jobs.*) ;; *) echo "error: the job must be jobs.<name>, got '$job'" >&2; exit 2 ;; esac
    case " $* " in
      *" --workdir=gs://"*) ;;
      *) echo "error: give --workdir=gs://... (every worker reads and writes it)" >&2; exit 2 ;;
    esac
    on_workers all "$(remote_run "$job" "$@")"
    echo "follow it with: bash launch/tpu_pod.sh logs; stop it with: bash launch/tpu_pod.sh stop"
    ;;
  logs)
    [ $# -le 1 ] || usage
    on_workers "${1:-0}" "tail -n 200 -F ~/$(printf %q "$REMOTE_DIR")/logs/latest.log"
    ;;
  status)
    [ $# -eq 0 ] || usage
    on_workers all "$(remote_status)"
    ;;
  stop)
    [ $# -eq 0 ] || usage
    on_workers all "$(remote_stop)"
    ;;
  *) usage ;;
esac
