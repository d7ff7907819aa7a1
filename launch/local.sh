#!/usr/bin/env bash
# One machine: one process driving all local devices (CPU, GPUs or a single TPU VM host), or
# several processes on loopback that form one JAX cluster (how multi-host code is tried on a
# laptop, and how one process per GPU is run without SLURM).
#   bash launch/local.sh configs/base.py:smoke runs/smoke [--config.key=value ...]
#   bash launch/local.sh --processes=2 --cpu-devices=4 configs/base.py:smoke runs/smoke2
#   bash launch/local.sh --processes=8 --gpus-per-process=1 configs/base.py runs/kpu
# SIGTERM / SIGINT go to every process: they write one checkpoint at the same step and exit 143.
set -euo pipefail
# shellcheck disable=SC1091  # launch/print_command.sh is checked on its own
source "$(dirname "$0")/print_command.sh"

usage() {
  cat <<'EOF'
usage: launch/local.sh [options] CONFIG[:ARG] WORKDIR [--config.key=value ...]
  --processes=N         processes on this machine (default 1); N > 1 forms a loopback cluster
  --cpu-devices=K       K CPU devices per process (added to XLA_FLAGS; to try sharding on CPU)
  --gpus-per-process=G  process i drives GPUs i*G .. i*G+G-1 (config.distributed.local_device_ids)
  --port=P              coordinator port on 127.0.0.1 (default 12355)
  --dry-run             print the environment and the commands, run nothing
EOF
}

die() {
  echo "local.sh: $*" >&2
  echo "(launch/local.sh --help for the usage)" >&2
  exit 2
}

require_count() {  # NAME VALUE: a positive integer
  [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}

processes=1
cpu_devices=''
gpus_per_process=''
port=12355
dry_run=false
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --processes=*) processes=${1#*=} ;;
    --cpu-devices=*) cpu_devices=${1#*=} ;;
    --gpus-per-process=*) gpus_per_process=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    --dry-run) dry_run=true ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1'" ;;
  esac
  shift
done
[[ $# -ge 2 ]] || { usage >&2; exit 2; }
config=$1
workdir=$2
shift 2
require_count --processes "$processes"
require_count --port "$port"
[[ -z $cpu_devices ]] || require_count --cpu-devices "$cpu_devices"
[[ -z $gpus_per_process ]] || require_count --gpus-per-process "$gpus_per_process"
[[ -z $cpu_devices || -z $gpus_per_process ]] || die "--cpu-devices and --gpus-per-process exclude each other"
cd "$(dirname "$0")/.."

env_vars=()
if [[ -n $cpu_devices ]]; then  # the user's XLA_FLAGS stay, but for their device count
  xla_flags=$(sed -E 's/ *--xla_force_host_platform_device_count=[^ ]*//g' <<<"${XLA_FLAGS:-}")
  xla_flags="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=$cpu_devices"
  env_vars=(JAX_PLATFORMS=cpu "XLA_FLAGS=${xla_flags# }")
fi

command_of() {  # PROCESS_ID OVERRIDES...: that process's kivfm.main command, NUL-separated
  local id=$1 cmd=(python -m kivfm.main "--config=$config" "--workdir=$workdir")
  shift
  if ((processes > 1)); then
    cmd+=(--config.distributed.enabled=True
          "--config.distributed.coordinator_address=127.0.0.1:$port"
          "--config.distributed.num_processes=$processes"
          "--config.distributed.process_id=$id")
  fi
  if [[ -n $gpus_per_process ]]; then
    local first=$((id * gpus_per_process)) ids
    ids=$(seq -s, "$first" $((first + gpus_per_process - 1)))
    cmd+=("--config.distributed.local_device_ids=$ids")
  fi
  cmd+=("$@")
  printf '%s\0' "${cmd[@]}"
}

if $dry_run; then
  for var in "${env_vars[@]}"; do print_command export "$var"; done
  for ((i = 0; i < processes; i++)); do
    mapfile -d '' cmd < <(command_of "$i" "$@")
    line=$(print_command "${cmd[@]}")
    if ((processes > 1)); then echo "$line &"; else echo "$line"; fi
  done
  exit 0
fi

for var in "${env_vars[@]}"; do export "${var?}"; done
if ((processes == 1)); then
  mapfile -d '' cmd < <(command_of 0 "$@")
  exec "${cmd[@]}"
fi

((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 501)) || die "--processes needs bash >= 5.1"
pids=()
stop_all() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap stop_all TERM INT
for ((i = 0; i < processes; i++)); do
  mapfile -d '' cmd < <(command_of "$i" "$@")
  "${cmd[@]}" &
  pids+=($!)
done
# Wait for all; the first to fail stops the others (they would wait for it in a collective), and
# its exit status is ours.
status=0
while ((${#pids[@]} > 0)); do
  finished=''
  rc=0
  wait -n -p finished "${pids[@]}" || rc=$?
  [[ -n $finished ]] || continue   # woken by a trapped signal: keep waiting
  for i in "${!pids[@]}"; do [[ ${pids[i]} != "$finished" ]] || unset 'pids[i]'; done
  if ((rc != 0 && status == 0)); then
    status=$rc
    stop_all
  fi
done
exit "$status"
