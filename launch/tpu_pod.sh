#!/usr/bin/env bash
# A Cloud TPU VM slice as a queued resource: create it, install kivfm on every worker, run the
# same command on all workers (JAX finds the coordinator itself), follow worker 0's log, keep the
# run alive through preemptions, delete the slice. WORKDIR must be storage every worker shares
# (a gs:// bucket): kivfm resumes from WORKDIR/checkpoints by itself.
#   launch/tpu_pod.sh create  --name=kpu --zone=us-central2-b --accelerator-type=v4-32 \
#                             --runtime-version=tpu-ubuntu2204-base [--spot]
#   launch/tpu_pod.sh install --name=kpu --zone=us-central2-b [--git=URL --branch=BRANCH]
#   launch/tpu_pod.sh run     --name=kpu --zone=us-central2-b configs/base.py gs://BUCKET/kpu
#   launch/tpu_pod.sh watch   (create's and install's options) configs/base.py gs://BUCKET/kpu
#   launch/tpu_pod.sh logs|status|delete --name=kpu --zone=us-central2-b
# Every command takes --dry-run: print the gcloud commands instead of running them.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh COMMAND --name=NAME --zone=ZONE [options] [CONFIG[:ARG] WORKDIR [overrides...]]
commands:
  create   request the slice as a queued resource, wait until it is ACTIVE
  install  put kivfm, its requirements and jax[tpu] (requirements.txt's version) on every worker
  run      start CONFIG WORKDIR on every worker in the background, then follow worker 0's log
  watch    keep CONFIG WORKDIR running: create the slice if absent; when it is preempted
           (SUSPENDED / FAILED / gone) delete it, recreate it, reinstall and relaunch; relaunch
           a run stopped by SIGTERM (exit 143); stop when the run ends otherwise
  logs     follow a worker's log (--worker=N, default 0) until its run ends
  status   print the queued resource's state
  delete   delete the queued resource and its TPU VMs
options:
  --name=NAME              TPU VM name; the queued resource is NAME-qr        (all commands)
  --zone=ZONE              zone                                               (all commands)
  --project=PROJECT        project (default: gcloud's configured project)
  --dry-run                print the gcloud commands, run nothing
  --accelerator-type=TYPE  e.g. v4-32, v5litepod-16                           (create, watch)
  --runtime-version=VER    TPU software version, e.g. tpu-ubuntu2204-base     (create, watch)
  --spot                   Spot VMs: cheaper, preemptible                     (create, watch)
  --git=URL                clone URL on the workers instead of copying this checkout (install, watch)
  --branch=BRANCH          branch or tag of --git (default: main)
  --python=BIN             Python >= 3.11 on the workers for the venv (default: python3)
  --worker=N               worker whose log `logs` follows (default: 0)
  --poll=SECONDS           state polling interval of create and watch (default: 60)
  --max-restarts=N         recreations + relaunches before watch gives up (default: 20)
EOF
}

die() {
  echo "tpu_pod.sh: $*" >&2
  echo "(launch/tpu_pod.sh --help for the usage)" >&2
  exit 2
}

note() {
  echo "[tpu_pod.sh $(date +%H:%M:%S)] $*" >&2
}

# Runs a command, or with --dry-run prints it.
run() {
  if $dry_run; then
    print_command "$@"
  else
    "$@"
  fi
}

# ---------------------------------------------------------------- arguments
command=${1:-}
[[ -n $command ]] || { usage >&2; exit 2; }
shift
case $command in
  create|install|run|watch|logs|status|delete) ;;
  -h|--help) usage; exit 0 ;;
  -*) die "unknown command '$command' (the command comes first: create, install, run, ...)" ;;
  *) die "unknown command '$command'" ;;
esac

name='' zone='' project='' accelerator_type='' runtime_version='' spot=false git_url=''
branch=main python_bin=python3 worker=0 poll=60 max_restarts=20 dry_run=false
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --accelerator-type=*) accelerator_type=${1#*=} ;;
    --runtime-version=*) runtime_version=${1#*=} ;;
    --spot) spot=true ;;
    --git=*) git_url=${1#*=} ;;
    --branch=*) branch=${1#*=} ;;
    --python=*) python_bin=${1#*=} ;;
    --worker=*) worker=${1#*=} ;;
    --poll=*) poll=${1#*=} ;;
    --max-restarts=*) max_restarts=${1#*=} ;;
    --dry-run) dry_run=true ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1'" ;;
  esac
  shift
done
[[ -n $name ]] || die "missing --name=NAME"
[[ -n $zone ]] || die "missing --zone=ZONE"
[[ $worker =~ ^[0-9]+$ ]] || die "--worker must be a worker number, got '$worker'"
[[ $poll =~ ^[0-9]+$ ]] || die "--poll must be a number of seconds, got '$poll'"
[[ $max_restarts =~ ^[0-9]+$ ]] || die "--max-restarts must be a number, got '$max_restarts'"
if [[ $command == create || $command == watch ]]; then
  [[ -n $accelerator_type ]] || die "$command needs --accelerator-type=TYPE"
  [[ -n $runtime_version ]] || die "$command needs --runtime-version=VERSION"
fi
kivfm_args=()
if [[ $command == run || $command == watch ]]; then
  [[ $# -ge 2 ]] || die "$command needs CONFIG and WORKDIR (got: $*)"
  [[ $2 == *://* ]] || note "warning: WORKDIR '$2' is not a bucket; every worker must see it"
  kivfm_args=("--config=$1" "--workdir=$2" --config.distributed.enabled=True "${@:3}")
elif [[ $# -gt 0 ]]; then
  die "unexpected argument '$1' ($command takes options only)"
fi

qr="$name-qr"
location=("--zone=$zone")
[[ -z $project ]] || location+=("--project=$project")
checkout=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck disable=SC1091  # launch/print_command.sh is checked on its own
source "$checkout/launch/print_command.sh"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# Paths on the workers, expanded by their shell.
# shellcheck disable=SC2016
remote_src='"$HOME/kivfm"' remote_venv='"$HOME/kivfm-venv"' remote_run='"$HOME/kivfm_run"'

# ---------------------------------------------------------------- queued resource
qr_create() {
  local flags=("--node-id=$name" "--accelerator-type=$accelerator_type"
               "--runtime-version=$runtime_version" "${location[@]}")
  if $spot; then
    flags+=(--spot)
  fi
  run gcloud compute tpus queued-resources create "$qr" "${flags[@]}"
}

qr_delete() {
  run gcloud compute tpus queued-resources delete "$qr" "${location[@]}" --force --quiet
}

describe_command=(gcloud compute tpus queued-resources describe "$qr" "${location[@]}"
                  --format='value(state.state)')

# Prints the queued resource's state (ACTIVE, SUSPENDED, ...), ABSENT, or UNKNOWN when gcloud
# failed for another reason (the caller polls again).
qr_state() {
  local out
  if out=$("${describe_command[@]}" 2>"$scratch/describe.err"); then
    echo "$out"
  elif grep -qi 'not[ _]found' "$scratch/describe.err"; then
    echo ABSENT
  else
    note "describe failed: $(cat "$scratch/describe.err")"
    echo UNKNOWN
  fi
}

wait_active() {
  if $dry_run; then
    echo "# every ${poll}s until the state is ACTIVE:"
    print_command "${describe_command[@]}"
    return
  fi
  local state
  while true; do
    state=$(qr_state)
    case $state in
      ACTIVE) return ;;
      FAILED|SUSPENDING|SUSPENDED|ABSENT) die "queued resource $qr is $state" ;;
      *) note "$qr: $state"; sleep "$poll" ;;
    esac
  done
}

# ---------------------------------------------------------------- workers
ssh_workers() {  # WORKER COMMAND
  run gcloud compute tpus tpu-vm ssh "$name" "${location[@]}" "--worker=$1" "--command=$2"
}

install() {
  local jax_version pip=$remote_venv/bin/pip steps=()
  jax_version=$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' "$checkout/requirements.txt")
  [[ -n $jax_version ]] || die "no 'jax==VERSION' line in $checkout/requirements.txt"
  if [[ -n $git_url ]]; then
    steps+=("rm -rf $remote_src"
            "git clone --depth=1 --branch=$(shell_quote "$branch") $(shell_quote "$git_url") $remote_src")
  else
    local tarball=$scratch/kivfm-src.tgz
    run tar -czf "$tarball" --exclude=./.git --exclude=./runs --exclude=./workdirs \
      --exclude=./.venv --exclude=__pycache__ -C "$checkout" . || return
    run gcloud compute tpus tpu-vm scp "$tarball" "$name:" "${location[@]}" --worker=all || return
    steps+=("rm -rf $remote_src" "mkdir -p $remote_src"
            "tar -xzf \"\$HOME/kivfm-src.tgz\" -C $remote_src" "rm \"\$HOME/kivfm-src.tgz\"")
  fi
  local requirements="-r requirements.txt"
  if [[ -f $checkout/requirements-cloud.txt ]]; then
    requirements+=" -r requirements-cloud.txt"   # gs:// workdirs
  fi
  steps+=("cd $remote_src"
          "$(shell_quote "$python_bin") -c 'import sys; assert sys.version_info >= (3, 11), \"kivfm needs Python >= 3.11 (--python=BIN)\"'"
          "$(shell_quote "$python_bin") -m venv $remote_venv"
          "$pip install $requirements \"jax[tpu]==$jax_version\""
          "$pip install --no-deps -r requirements-assets.txt")
  local script joined=''
  for script in "${steps[@]}"; do
    joined+="${joined:+ && }$script"
  done
  ssh_workers all "$joined"
}

# Starts kivfm on every worker, detached: log in ~/kivfm_run/train.log, exit code written to
# ~/kivfm_run/exit_code when it ends, refused while a run is alive.
launch() {
  local arg args='' pid=$remote_run/pid exit_code=$remote_run/exit_code
  for arg in "${kivfm_args[@]}"; do
    args+=" $(shell_quote "$arg")"
  done
  local inner="$remote_venv/bin/python -m kivfm.main$args; echo \$? > $exit_code"
  local guard="if [ -f $pid ] && [ ! -f $exit_code ] && kill -0 \"\$(cat $pid)\" 2>/dev/null; then echo 'kivfm is already running here' >&2; exit 1; fi"
  local start
  start="nohup bash -c $(shell_quote "$inner") > $remote_run/train.log 2>&1 < /dev/null & echo \$! > $pid"
  ssh_workers all "$guard; mkdir -p $remote_run && rm -f $exit_code && cd $remote_src && { $start; }"
}

follow_log() {  # WORKER: prints its log until the run there ends
  local pid=$remote_run/pid
  ssh_workers "$1" "tail -n +1 --pid=\"\$(cat $pid)\" -F $remote_run/train.log"
}

probe_command="if [ -f $remote_run/exit_code ]; then echo \"exit \$(cat $remote_run/exit_code)\"; elif [ -f $remote_run/pid ] && kill -0 \"\$(cat $remote_run/pid)\" 2>/dev/null; then echo running; else echo idle; fi"

# Prints worker 0's run state: running, idle (nothing started), "exit CODE", or unknown.
run_state() {
  local out
  out=$(ssh_workers 0 "$probe_command" 2>"$scratch/probe.err") || true
  out=$(grep -E '^(running|idle|exit [0-9]+)$' <<<"$out" | tail -n 1) || true
  echo "${out:-unknown}"
}

# ---------------------------------------------------------------- watch
watch() {
  if $dry_run; then
    echo "# every ${poll}s, the queued resource's state:"
    print_command "${describe_command[@]}"
    echo "# SUSPENDED or FAILED: delete it; then (also when absent) recreate it:"
    qr_delete
    qr_create
    echo "# ACTIVE after a (re)creation: install"
    install
    echo "# ACTIVE: worker 0's run state (running, idle, exit CODE):"
    ssh_workers 0 "$probe_command"
    echo "# idle, or exit 143 (SIGTERM): launch; exit 0: done; other exit codes: stop"
    launch
    return
  fi
  # fresh: the slice was (re)created here, so it needs an install; launched: a run was started
  # at least once, so a later creation or launch is a restart.
  local restarts=0 fresh=false launched=false state last='' status
  while true; do
    state=$(qr_state)
    [[ $state == "$last" ]] || note "$qr: $state"
    last=$state
    case $state in
      ACTIVE)
        if $fresh; then
          if install; then
            fresh=false
          else
            note "install failed; retrying"
            sleep "$poll"
            continue
          fi
        fi
        status=$(run_state)
        case $status in
          idle|'exit 143')
            if $launched; then
              restarts=$((restarts + 1))
              ((restarts <= max_restarts)) || die "gave up after $max_restarts restarts"
            fi
            note "launching (worker 0: $status; restarts: $restarts)"
            if launch; then launched=true; else note "launch failed; retrying"; fi ;;
          'exit 0') note "run finished"; return 0 ;;
          exit*) note "run failed ($status): see 'launch/tpu_pod.sh logs'"; return "${status#exit }" ;;
        esac ;;
      SUSPENDED|FAILED|ABSENT)
        [[ $state == ABSENT ]] || qr_delete
        note "creating $qr"
        qr_create
        fresh=true ;;
    esac
    sleep "$poll"
  done
}

# ---------------------------------------------------------------- commands
case $command in
  create) qr_create; wait_active ;;
  install) install ;;
  run) launch; follow_log 0 ;;
  watch) watch ;;
  logs) follow_log "$worker" ;;
  status)
    if $dry_run; then print_command "${describe_command[@]}"; else qr_state; fi ;;
  delete) qr_delete ;;
esac
