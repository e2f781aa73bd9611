#!/usr/bin/env bash
# One job on every worker of a Cloud TPU VM pod slice (or of several slices) at once.
#
#   export TPU=my-v5p-64 ZONE=us-east5-a             # and PROJECT=... unless gcloud has a default
#   bash launch/tpu_pod.sh setup                       # this tree, Python 3.11, .venv with jax[tpu]
#   bash launch/tpu_pod.sh preflight --workdir=gs://bucket/mnist     # same code, devices, workdir
#   bash launch/tpu_pod.sh run jobs.fit --config=configs/mnist.py:pod --workdir=gs://bucket/mnist
#   bash launch/tpu_pod.sh logs [WORKER]               # follow a worker's log (default: worker 0)
#   bash launch/tpu_pod.sh status                      # running, or the exit code, on each worker
#   bash launch/tpu_pod.sh stop                        # SIGTERM: save, exit 75; clear TPU locks
#   bash launch/tpu_pod.sh watch jobs.fit --config=... --workdir=gs://...   # run to the end
#   bash launch/tpu_pod.sh create | delete             # the queued resource $QR (watch uses them)
#   bash launch/tpu_pod.sh --dry-run <command> ...     # (or DRY_RUN=1) print the gcloud commands
#
# setup: packs the committed tree (git archive HEAD: commit what you want to run), copies it to
#   every worker, installs Python 3.11 where the image lacks it (deadsnakes PPA; apt waits while a
#   fresh VM's unattended-upgrades holds the dpkg lock), replaces the previous tree and builds
#   ~/$REMOTE_DIR/.venv. Its last step writes the commit into ~/$REMOTE_DIR/code.version: run and
#   preflight refuse a worker whose marker is missing (a setup that stopped half-way) or names
#   another commit than this tree's HEAD.
# preflight: python -m jobs.preflight on every worker: every process runs the same code, a sum over
#   all devices is right, the workdir is writable and shared.
# run: starts the job on all workers, detached (setsid, nohup), so a dropped ssh connection does
#   not stop it. Output: ~/$REMOTE_DIR/logs/<job>-<time>.log, copied every $LOG_COPY_SECS
#   (default 60) and at the end to <workdir>/logs/<job>-<time>-worker<N>.log; exit code:
#   ~/$REMOTE_DIR/run.rc (0 finished, 75 preempted with its state saved, 2 bad input, 1 failed).
#   XLA_FLAGS, LIBTPU_INIT_ARGS and the variables named in PASS_ENV are passed on to the job. The
#   workdir must be on gs://: every worker reads and writes the same checkpoints.
# stop: SIGTERM to the job on every worker: it saves at the next step and exits 75 (what a Spot
#   preemption notice does); after $STOP_GRACE_SECS (default 600) whatever is left is killed, the
#   TPU lock file is removed and any process still holding the chips is ended.
# watch: create the queued resource $QR (default $TPU-qr) if needed (ACCELERATOR_TYPE,
#   RUNTIME_VERSION; SPOT=0 for no --spot, CREATE_FLAGS for more), setup, preflight (PREFLIGHT=0
#   skips it), run, then poll every $POLL_SECS (default 60). A job that exits 75, a slice that is
#   preempted, suspended or gone, a worker that lost its job (a maintenance reboot): delete and
#   recreate the slice, setup and run the same command, which resumes from the checkpoints, at
#   most $MAX_RESTARTS times (default 10). It ends with the job's code on success (0), bad input
#   (2) or any other failure; with 75 after `stop` or the last restart.
# SLICES=N (default 1): N slices of one queued resource (multi-slice over DCN): every command goes
#   to every node (--node=all; logs: node $NODE, default 0) and the job gets
#   --config.mesh.num_slices=N.
set -euo pipefail
# What the user sees: dry-run output goes here, also from inside $(...). Commands run with it
# closed (3>&-): a job a worker detaches must not hold the caller's output open.
exec 3>&1

DRY_RUN="${DRY_RUN:-0}"
if [ "${1:-}" = --dry-run ]; then
  DRY_RUN=1
  shift
fi
export DRY_RUN  # watch runs this script again for each step
: "${TPU:?set TPU to the TPU VM (node) name; the node prefix with SLICES>1}"
: "${ZONE:?set ZONE to the TPU zone}"
REMOTE_DIR="${REMOTE_DIR:-influence}"
STOP_GRACE_SECS="${STOP_GRACE_SECS:-600}"
TPU_LOCKFILE="${TPU_LOCKFILE:-/tmp/libtpu_lockfile}"
SLICES="${SLICES:-1}"
QR="${QR:-$TPU-qr}"
MAX_RESTARTS="${MAX_RESTARTS:-10}"
POLL_SECS="${POLL_SECS:-60}"
LOG_COPY_SECS="${LOG_COPY_SECS:-60}"
APT_TRIES="${APT_TRIES:-30}"
APT_RETRY_SECS="${APT_RETRY_SECS:-10}"
PREFLIGHT="${PREFLIGHT:-1}"
SCRIPT="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
LOCATION=(--zone="$ZONE")
[ -z "${PROJECT:-}" ] || LOCATION+=(--project="$PROJECT")

usage() {
  echo "usage: TPU=... ZONE=... $0 [--dry-run] setup | preflight --workdir=gs://... |" \
    "run|watch jobs.<name> --config=... --workdir=gs://... | logs [WORKER] | status | stop |" \
    "create | delete" >&2
  exit 2
}

fail() {  # fail CODE MESSAGE: one line on stderr
  echo "error: $2" >&2
  exit "$1"
}

q() { printf %q "$1"; }  # a value baked into a remote script, read there literally
quote_args() { [ $# -eq 0 ] || printf ' %q' "$@"; }  # " ARG ARG..." shell-quoted; none: nothing

case "$SLICES" in '' | *[!0-9]* | 0) fail 2 "SLICES=$SLICES: give the number of slices (1 or more)" ;; esac

# --- Local commands, or their text (dry run) ---------------------------------------------------

show() {  # show CMD ARG...: the command as a shell would read it
  { printf '%q' "$1"; shift; quote_args "$@"; printf '\n'; } >&3
}

act() {  # act CMD ARG...: run it, or only show it (dry run)
  if [ "$DRY_RUN" = 1 ]; then show "$@"; else "$@" 3>&-; fi
}

on_workers() {  # on_workers WORKER SCRIPT: run SCRIPT with bash on worker WORKER ("all": every one)
  local where
  if [ "$SLICES" -gt 1 ]; then
    local node="${NODE:-0}"
    [ "$1" != all ] || node=all
    where=(compute tpus queued-resources ssh "$QR" --node="$node")
  else
    where=(compute tpus tpu-vm ssh "$TPU")
  fi
  if [ "$DRY_RUN" = 1 ]; then
    { printf 'gcloud'; quote_args "${where[@]}" "${LOCATION[@]}" --worker="$1"
      printf " --command=\"\$(cat <<'SCRIPT'\n%s\nSCRIPT\n)\"\n" "$2"; } >&3
    return 0
  fi
  gcloud "${where[@]}" "${LOCATION[@]}" --worker="$1" --command="$2" 3>&-
}

copy_to_workers() {  # copy_to_workers FILE: to ~/influence.tar.gz on every worker
  if [ "$SLICES" -gt 1 ]; then
    act gcloud compute tpus queued-resources scp "$1" "$QR":~/influence.tar.gz "${LOCATION[@]}" \
      --worker=all --node=all
  else
    act gcloud compute tpus tpu-vm scp "$1" "$TPU":~/influence.tar.gz "${LOCATION[@]}" --worker=all
  fi
}

code_version() {  # the commit setup copies (git archive HEAD)
  git rev-parse HEAD 2>/dev/null ||
    fail 2 "$PWD is not a git checkout: setup copies the committed tree (git archive HEAD)"
}

workdir_of() {  # workdir_of ARG...: the value of --workdir=, checked to be on gs://
  local arg
  for arg in "$@"; do
    case "$arg" in --workdir=gs://?*) echo "${arg#--workdir=}"; return 0 ;; esac
  done
  fail 2 "give --workdir=gs://... (every worker reads and writes it)"
}

check_job() {  # check_job JOB: only the project's job binaries
  case "$1" in jobs.*) ;; *) fail 2 "the job must be jobs.<name>, got '$1'" ;; esac
}

# --- The scripts each worker runs ---------------------------------------------------------------
# Values from here are baked in with printf %q (the remote shell sees them literally);
# $-expressions escaped with \ expand on the worker.

remote_lib() {  # what the other remote scripts use
  cat <<'EOF'
worker_id() {  # this worker's index in its slice (TPU VM metadata), else the host name
  curl -sf -m 5 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
    2>/dev/null || hostname
}
# run.rc is the runner's last write: a pid without it may be a process that just exited (or,
# after a reboot, another process with the same number).
job_running() { [ ! -f run.rc ] && [ -f run.pid ] && kill -0 "$(cat run.pid)" 2>/dev/null; }
EOF
}

remote_env() {  # export lines for XLA_FLAGS, LIBTPU_INIT_ARGS and $PASS_ENV, where set here
  local name
  for name in XLA_FLAGS LIBTPU_INIT_ARGS ${PASS_ENV:-}; do
    [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || fail 2 "PASS_ENV: '$name' is not a variable name"
    [ -z "${!name+set}" ] || echo "export $name=$(q "${!name}")"
  done
}
remote_env >/dev/null  # a bad name stops here, not inside a $(...) that builds a script

remote_setup() {  # remote_setup VERSION
  remote_lib
  cat <<EOF
set -euo pipefail
SUDO=""; [ "\$(id -u)" -eq 0 ] || SUDO=sudo
mkdir -p ~/$(q "$REMOTE_DIR")
cd ~/$(q "$REMOTE_DIR")
if job_running; then
  echo "error: \$(hostname) is running a job (pid \$(cat run.pid)): bash launch/tpu_pod.sh stop first" >&2
  exit 2
fi
rm -f code.version  # written back last: a setup that stops half-way leaves none
# A fresh VM runs unattended-upgrades for minutes after boot, holding the dpkg lock: apt-get waits
# for it (DPkg::Lock::Timeout), and a command that still fails on a lock (add-apt-repository,
# an apt-get update of older apt) is tried again.
locked_retry() {
  local try out
  for try in \$(seq $(q "$APT_TRIES")); do
    if out=\$("\$@" 2>&1); then
      return 0
    fi
    case "\$out" in
      *"Could not get lock"* | *"Unable to acquire the dpkg"* | *"Unable to lock"*) ;;
      *) printf '%s\n' "\$out" >&2; return 1 ;;
    esac
    echo "\$(hostname): the dpkg lock is held (try \$try of $(q "$APT_TRIES")); again in $(q "$APT_RETRY_SECS") s" >&2
    sleep $(q "$APT_RETRY_SECS")
  done
  printf '%s\n' "\$out" >&2
  return 1
}
apt_get() { locked_retry \$SUDO apt-get -o DPkg::Lock::Timeout=300 -y -qq "\$@"; }
if ! command -v python3.11 >/dev/null 2>&1; then
  apt_get update
  apt_get install software-properties-common
  locked_retry \$SUDO add-apt-repository -y ppa:deadsnakes/ppa
  apt_get update
  apt_get install python3.11 python3.11-venv
fi
# The new tree replaces the old one (a file deleted since is gone); .venv, logs and run.* stay.
find . -mindepth 1 -maxdepth 1 ! -name .venv ! -name logs ! -name 'run.*' -exec rm -rf {} +
tar -xzf ~/influence.tar.gz
PYTHON=python3.11 JAX_EXTRA=tpu bash launch/setup_venv.sh
echo $(q "$1") >code.version
echo "\$(hostname): ready (code $(q "$1"))"
EOF
}

remote_versions() {  # one line per worker: code-version WORKER HOST VERSION|none
  remote_lib
  cat <<EOF
echo "code-version \$(worker_id) \$(hostname) \$(cat ~/$(q "$REMOTE_DIR")/code.version 2>/dev/null || echo none)"
EOF
}

remote_ready() {  # the checks before a job or preflight starts on a worker
  remote_lib
  cat <<EOF
set -euo pipefail
cd ~/$(q "$REMOTE_DIR")
if job_running; then
  echo "error: \$(hostname) is already running a job (pid \$(cat run.pid)): bash launch/tpu_pod.sh stop first" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  echo "error: \$(hostname) has no ~/$(q "$REMOTE_DIR")/.venv: run bash launch/tpu_pod.sh setup first" >&2
  exit 2
fi
EOF
}

remote_preflight() {  # remote_preflight ARG...: jobs.preflight in the foreground
  remote_ready
  remote_env
  echo ".venv/bin/python -m jobs.preflight --distributed=on$(quote_args "$@")"
}

runner() {  # runner LOGDEST JOB ARG...: run.sh, the job's parent on a worker (run.sh LOG WORKER)
  local dest=$1 job=$2
  shift 2
  local host=""
  # shellcheck disable=SC2016  # the worker's host name, on the worker
  [ "$SLICES" -eq 1 ] || host='-$(hostname)'  # worker numbers repeat across slices
  cat <<EOF
# The job, its log copied to the workdir while it runs and at its end, its exit code in run.rc
# (what status and watch read).
log=\$1
dest=$(q "$dest")-worker"\$2"$host.log
$(remote_env)
copy_log() {
  case "\$dest" in
    gs://*) timeout 300 gcloud storage cp --quiet "\$log" "\$dest" >/dev/null 2>&1 ;;
    *) mkdir -p "\$(dirname "\$dest")" && cp "\$log" "\$dest" ;;
  esac || echo "warning: could not copy \$log to \$dest" >&2
}
copy_every() {  # until TERM, which also ends the sleep
  local sleeper
  trap 'kill "\$sleeper" 2>/dev/null; exit 0' TERM
  while :; do
    sleep $(q "$LOG_COPY_SECS") &
    sleeper=\$!
    wait "\$sleeper"
    copy_log
  done
}
copy_every &
copier=\$!
# SIGTERM (stop, a preemption notice) reaches the whole process group: the job saves and exits
# 75; this runner only waits for it to record the code.
trap ':' TERM INT
.venv/bin/python -m $(q "$job") --distributed=on$(quote_args "$@") </dev/null
rc=\$?
kill "\$copier" 2>/dev/null
wait "\$copier" 2>/dev/null
copy_log
echo "\$rc" >run.rc.tmp && mv run.rc.tmp run.rc
exit "\$rc"
EOF
}

remote_run() {  # remote_run STAMP JOB ARG...
  local stamp=$1 job=$2 workdir
  shift 2
  workdir=$(workdir_of "$@")
  remote_ready
  cat <<EOF
mkdir -p logs
log=logs/$(q "$job")-$(q "$stamp").log
cat >run.sh <<'RUNNER'
$(runner "${workdir%/}/logs/$job-$stamp" "$job" "$@")
RUNNER
rm -f run.rc run.stopped
nohup setsid bash run.sh "\$log" "\$(worker_id)" >"\$log" 2>&1 </dev/null &
echo \$! >run.pid
ln -sfn "\$(basename "\$log")" logs/latest.log
echo "\$(hostname): started $(q "$job") (pid \$!), log ~/$(q "$REMOTE_DIR")/\$log"
EOF
}

remote_status() {  # one line per worker: "worker N (HOST): STATE", then the log's last lines
  remote_lib
  cat <<EOF
id=\$(worker_id)
cd ~/$(q "$REMOTE_DIR") 2>/dev/null || { echo "worker \$id (\$(hostname)): not set up"; exit 0; }
log=\$(readlink logs/latest.log 2>/dev/null || echo 'no log')
if job_running; then
  echo "worker \$id (\$(hostname)): running (pid \$(cat run.pid)), log \$log"
  exit 0
elif [ -f run.rc ]; then
  state="exited \$(cat run.rc)"
  [ "\$(cat run.rc)" != 75 ] || state="\$state (preempted, state saved: run the same command to resume)"
  [ ! -f run.stopped ] || state="\$state, stopped by launch/tpu_pod.sh stop"
elif [ -f run.pid ]; then
  state="ended without an exit code (killed, or the VM restarted)"
else
  state="not started"
fi
echo "worker \$id (\$(hostname)): \$state; last lines of \$log:"
tail -n 3 logs/latest.log 2>/dev/null | sed 's/^/  | /' || true
EOF
}

remote_stop() {
  remote_lib
  cat <<EOF
SUDO=""; [ "\$(id -u)" -eq 0 ] || SUDO=sudo
if cd ~/$(q "$REMOTE_DIR") 2>/dev/null && [ -f run.pid ]; then
  pid=\$(cat run.pid)
  if job_running; then
    touch run.stopped  # watch: a stop, not a preemption to recover from
    kill -TERM -- "-\$pid" 2>/dev/null || kill -TERM "\$pid"
    for _ in \$(seq $(q "$STOP_GRACE_SECS")); do
      job_running || break
      sleep 1
    done
    if job_running; then
      echo "\$(hostname): still running after $(q "$STOP_GRACE_SECS") s; killing it"
      kill -KILL -- "-\$pid" 2>/dev/null || kill -KILL "\$pid"
    else
      echo "\$(hostname): stopped (exit \$(cat run.rc 2>/dev/null || echo '?'))"
    fi
  fi
  rm -f run.pid
fi
\$SUDO rm -f $(q "$TPU_LOCKFILE")
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

# --- Steps --------------------------------------------------------------------------------------

require_same_code() {  # every worker finished setup of this tree's commit, or one line, exit 2
  local version lines tag worker host theirs answered=0
  version=$(code_version)
  lines=$(on_workers all "$(remote_versions)")
  [ "$DRY_RUN" = 0 ] || return 0
  while read -r tag worker host theirs; do
    [ "$tag" = code-version ] || continue
    answered=1
    if [ "$theirs" != "$version" ]; then
      [ "$theirs" != none ] || theirs="none (setup did not finish)"
      fail 2 "worker $worker ($host) has code $theirs, this tree $version: run setup (bash launch/tpu_pod.sh setup)"
    fi
  done <<<"$lines"
  [ "$answered" = 1 ] || fail 1 "no worker answered the code version check"
}

setup() {
  local version archive
  version=$(code_version)
  if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    echo "warning: uncommitted changes are not copied (git archive HEAD)" >&2
  fi
  archive="$(mktemp -d)/influence.tar.gz"
  act git archive --format=tar.gz -o "$archive" HEAD
  copy_to_workers "$archive"
  rm -rf "$(dirname "$archive")"
  on_workers all "$(remote_setup "$version")"
}

run_job() {  # run_job JOB ARG...
  local job=$1
  shift
  if [ "$SLICES" -gt 1 ] && [[ " $* " != *" --config.mesh.num_slices="* ]]; then
    set -- "$@" --config.mesh.num_slices="$SLICES"
  fi
  require_same_code
  on_workers all "$(remote_run "$(date -u +%Y%m%d-%H%M%S)" "$job" "$@")"
}

# --- The slice, as a queued resource (watch, create, delete) ------------------------------------

slice_state() {  # ACTIVE when a job can run, GONE when there is no slice, UNKNOWN, else its state
  local state err
  if [ "$DRY_RUN" = 1 ]; then
    show gcloud compute tpus queued-resources describe "$QR" "${LOCATION[@]}" \
      --format='value(state.state)'
    echo GONE
    return 0
  fi
  err=$(mktemp)
  if ! state=$(gcloud compute tpus queued-resources describe "$QR" "${LOCATION[@]}" \
    --format='value(state.state)' 2>"$err" 3>&-); then
    # Only a resource that is not there is gone: a failed call (network, auth) says nothing.
    if grep -q NOT_FOUND "$err"; then echo GONE; else echo UNKNOWN; fi
    rm -f "$err"
    return 0
  fi
  if [ "$state" = ACTIVE ] && [ "$SLICES" -eq 1 ]; then  # a node can be PREEMPTED under it
    if ! state=$(gcloud compute tpus tpu-vm describe "$TPU" "${LOCATION[@]}" \
      --format='value(state)' 2>"$err" 3>&-); then
      if grep -q NOT_FOUND "$err"; then state=GONE; else state=UNKNOWN; fi
    fi
    [ "$state" != READY ] || state=ACTIVE
  fi
  rm -f "$err"
  echo "${state:-UNKNOWN}"
}

require_create_settings() {
  if [ -z "${ACCELERATOR_TYPE:-}" ] || [ -z "${RUNTIME_VERSION:-}" ]; then
    fail 2 "set ACCELERATOR_TYPE (e.g. v5p-64) and RUNTIME_VERSION (e.g. v2-alpha-tpuv5) to create the slice"
  fi
}

create_slice() {
  require_create_settings
  local nodes=(--node-id="$TPU") spot=() extra=()
  [ "$SLICES" -eq 1 ] || nodes=(--node-count="$SLICES" --node-prefix="$TPU")
  [ "${SPOT:-1}" = 0 ] || spot=(--spot)
  read -r -a extra <<<"${CREATE_FLAGS:-}"
  act gcloud compute tpus queued-resources create "$QR" "${LOCATION[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
    "${nodes[@]}" ${spot[@]+"${spot[@]}"} ${extra[@]+"${extra[@]}"}  # empty: bash 3.2, set -u
}

delete_slice() {  # --force: its nodes too
  act gcloud compute tpus queued-resources delete "$QR" "${LOCATION[@]}" --force --quiet || true
}

provision() {  # a slice ready for a job: created if missing; fails if it turns bad while waiting
  local state
  state=$(slice_state)
  case "$state" in
    GONE) create_slice ;;
    SUSPENDING | SUSPENDED | FAILED | PREEMPTED | TERMINATED | STOPPED) delete_slice; create_slice ;;
  esac
  [ "$DRY_RUN" = 0 ] || return 0
  while :; do
    state=$(slice_state)
    case "$state" in
      ACTIVE) return 0 ;;
      GONE | SUSPENDING | SUSPENDED | FAILED | PREEMPTED | TERMINATED | STOPPED | DELETING)
        echo "watch: the slice is $state" >&2
        return 1 ;;
    esac
    echo "watch: waiting for the slice ($state)" >&3
    sleep "$POLL_SECS"
  done
}

job_outcome() {  # running, 0, 75, stopped, lost (a worker's job vanished), unreachable, or a code
  local out line state rc re='^worker [^ ]+ \([^)]*\): (.*)$'
  local running=0 stopped=0 lost=0 preempted=0 finished=0 code=""
  if ! out=$(on_workers all "$(remote_status)" 2>/dev/null); then
    echo unreachable
    return 0
  fi
  [ "$DRY_RUN" = 0 ] || out="worker 0 (dry-run): exited 0"
  while IFS= read -r line; do
    [[ "$line" =~ $re ]] || continue
    state=${BASH_REMATCH[1]}
    [[ "$state" != *"stopped by"* ]] || stopped=1
    case "$state" in
      running*) running=1 ;;
      exited\ [0-9]*)
        rc=${state#exited }
        rc=${rc%%[!0-9]*}
        case "$rc" in
          0) finished=1 ;;
          75) preempted=1 ;;
          *) code=${code:-$rc} ;;
        esac ;;
      *) lost=1 ;;
    esac
  done <<<"$out"
  # A process that failed while others still run: they stop within the heartbeat timeout.
  if [ "$running" = 1 ]; then echo running
  elif [ "$stopped" = 1 ]; then echo stopped
  elif [ "$code" = 2 ]; then echo 2
  elif [ "$lost" = 1 ]; then echo lost  # the others then fail with "another process died"
  elif [ -n "$code" ]; then echo "$code"
  elif [ "$preempted" = 1 ]; then echo 75
  elif [ "$finished" = 1 ]; then echo 0
  else echo unreachable
  fi
}

wait_for_job() {  # the job's outcome once it has ended (job_outcome), or the slice's bad state
  local outcome state misses=0
  while :; do
    outcome=$(job_outcome)
    case "$outcome" in
      running) misses=0 ;;
      unreachable)
        state=$(slice_state)
        case "$state" in
          ACTIVE | UNKNOWN)  # a dropped connection: ask again, but not forever
            misses=$((misses + 1))
            if [ "$misses" -ge 10 ]; then echo lost; return 0; fi ;;
          *) echo "slice $state"; return 0 ;;
        esac ;;
      *) echo "$outcome"; return 0 ;;
    esac
    sleep "$POLL_SECS"
  done
}

watch_job() {  # watch_job JOB ARG...: run to the end through preemptions (see the header)
  local workdir restarts=0 reason="" outcome rc state
  workdir=$(workdir_of "$@")
  require_create_settings  # now, not when the slice is first gone
  while :; do
    if [ -n "$reason" ]; then
      restarts=$((restarts + 1))
      if [ "$restarts" -gt "$MAX_RESTARTS" ]; then
        echo "error: $reason after $MAX_RESTARTS restarts (MAX_RESTARTS); not restarting:" \
          "run the same watch command to resume from the saved state" >&2
        exit 75
      fi
      echo "watch: $reason: recreating the slice (restart $restarts of at most $MAX_RESTARTS)" >&3
      delete_slice
    fi
    reason="the slice did not come up"
    provision || continue
    rc=0
    bash "$SCRIPT" setup || rc=$?
    if [ "$rc" = 0 ] && [ "$PREFLIGHT" != 0 ]; then
      bash "$SCRIPT" preflight --workdir="$workdir" || rc=$?
    fi
    [ "$rc" != 0 ] || bash "$SCRIPT" run "$@" || rc=$?
    if [ "$rc" != 0 ]; then
      state=$(slice_state)
      if [ "$state" = ACTIVE ] || [ "$state" = UNKNOWN ]; then
        echo "error: starting the job failed (exit $rc) on a working slice: not restarting" >&2
        exit "$rc"
      fi
      reason="the slice is $state"
      continue
    fi
    outcome=$(wait_for_job)
    case "$outcome" in
      0) echo "watch: the job finished (exit 0)" >&3; exit 0 ;;
      2) fail 2 "the job stopped on bad input (exit 2): fix it, then run watch again" ;;
      stopped) echo "watch: the job was stopped (launch/tpu_pod.sh stop); not restarting" >&3; exit 75 ;;
      75) reason="the job was preempted (exit 75, state saved)" ;;
      lost) reason="a worker's job ended without an exit code (its VM restarted?)" ;;
      "slice "*) reason="the ${outcome}" ;;
      *)
        state=$(slice_state)
        [ "$state" = ACTIVE ] || [ "$state" = UNKNOWN ] ||
          { reason="the slice is $state (the job exited $outcome)"; continue; }
        fail "$outcome" "the job failed (exit $outcome): not restarting; see bash launch/tpu_pod.sh status and <workdir>/logs/" ;;
    esac
  done
}

# --- Commands -----------------------------------------------------------------------------------

[ $# -ge 1 ] || usage
command=$1
shift
cd "$(dirname "$0")/.."
case "$command" in
  setup)
    [ $# -eq 0 ] || usage
    setup
    ;;
  preflight)
    workdir_of "$@" >/dev/null
    require_same_code
    on_workers all "$(remote_preflight "$@")"
    ;;
  run)
    [ $# -ge 1 ] || usage
    check_job "$1"
    workdir_of "$@" >/dev/null
    run_job "$@"
    echo "follow it with: bash launch/tpu_pod.sh logs; stop it with: bash launch/tpu_pod.sh stop"
    ;;
  watch)
    [ $# -ge 1 ] || usage
    check_job "$1"
    watch_job "$@"
    ;;
  logs)
    [ $# -le 1 ] || usage
    on_workers "${1:-0}" "tail -n 200 -F ~/$(q "$REMOTE_DIR")/logs/latest.log"
    ;;
  status)
    [ $# -eq 0 ] || usage
    on_workers all "$(remote_status)"
    ;;
  stop)
    [ $# -eq 0 ] || usage
    on_workers all "$(remote_stop)"
    ;;
  create)
    [ $# -eq 0 ] || usage
    require_create_settings
    provision
    ;;
  delete)
    [ $# -eq 0 ] || usage
    delete_slice
    ;;
  *) usage ;;
esac
