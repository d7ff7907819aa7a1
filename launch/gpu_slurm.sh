#!/usr/bin/env bash
# GPU cluster under SLURM: one srun step runs kivfm on every node, either
#   --mode=node  one process per node driving all its GPUs (default), or
#   --mode=gpu   one process per GPU.
# Both modes pass the GPUs each process drives as config.distributed.local_device_ids (see
# launch/README.md for why); JAX reads the coordinator, process count and id from SLURM.
#   sbatch --nodes=4 --gpus-per-node=8 launch/gpu_slurm.sh configs/base.py /shared/runs/kpu
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 launch/gpu_slurm.sh --mode=gpu \
#     configs/base.py /shared/runs/kpu
#   launch/gpu_slurm.sh --nodes=2 --gpus-per-node=4 configs/base.py /shared/runs/kpu  # interactive
#   launch/gpu_slurm.sh --dry-run ...   # print the srun line and its environment, run nothing
#SBATCH --job-name=kivfm
#SBATCH --ntasks-per-node=1
#SBATCH --signal=TERM@120
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/gpu_slurm.sh [options] CONFIG[:ARG] WORKDIR [--config.key=value ...]
  --mode=node|gpu     node: one process per node, all its GPUs (default); gpu: one per GPU
  --nodes=N           nodes (default: $SLURM_JOB_NUM_NODES of the allocation)
  --gpus-per-node=N   GPUs of each node (default: $SLURM_GPUS_ON_NODE, else $SLURM_GPUS_PER_NODE)
  --dry-run           print the environment and the srun line, run nothing
EOF
}

die() {
  echo "gpu_slurm.sh: $*" >&2
  echo "(launch/gpu_slurm.sh --help for the usage)" >&2
  exit 2
}

require_count() {  # NAME VALUE: a positive integer
  [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}

# The kivfm checkout: next to this script, or (sbatch runs a copy of the script from its spool
# directory) the directory sbatch was called from.
find_checkout() {
  local here
  here=$(cd "$(dirname "$0")/.." && pwd)
  if [[ -f $here/kivfm/main.py ]]; then
    echo "$here"
  elif [[ -f $PWD/kivfm/main.py ]]; then
    echo "$PWD"
  else
    die "cannot find the kivfm checkout: run (or sbatch) this script from the checkout"
  fi
}

mode=node
nodes=${SLURM_JOB_NUM_NODES:-}
gpus_per_node=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
gpus_per_node=${gpus_per_node##*:}   # SLURM_GPUS_PER_NODE may read TYPE:COUNT
dry_run=false
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --mode=*) mode=${1#*=} ;;
    --nodes=*) nodes=${1#*=} ;;
    --gpus-per-node=*) gpus_per_node=${1#*=} ;;
    --dry-run) dry_run=true ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1'" ;;
  esac
  shift
done
[[ $# -ge 2 ]] || die "missing CONFIG and WORKDIR (got: $*)"
config=$1
workdir=$2
shift 2
[[ $mode == node || $mode == gpu ]] || die "--mode must be node or gpu, got '$mode'"
[[ -n $nodes ]] || die "--nodes=N is needed outside a SLURM allocation"
require_count --nodes "$nodes"
[[ -n $gpus_per_node ]] || die "--gpus-per-node=N is needed (SLURM_GPUS_ON_NODE is not set)"
require_count --gpus-per-node "$gpus_per_node"
for arg in "$@"; do
  # A repeated tuple override is appended to, not replaced: the script owns this key.
  if [[ $arg == --config.distributed.local_device_ids* ]]; then
    die "'$arg': gpu_slurm.sh sets the local devices itself (--mode); drop this override"
  fi
done

checkout=$(find_checkout)
# shellcheck disable=SC1091  # launch/print_command.sh is checked on its own
source "$checkout/launch/print_command.sh"
xla_flags=${XLA_FLAGS:-}
if [[ $xla_flags != *xla_gpu_enable_latency_hiding_scheduler* ]]; then
  # Overlaps collectives with compute; off by default in XLA (see launch/README.md).
  xla_flags="${xla_flags:+$xla_flags }--xla_gpu_enable_latency_hiding_scheduler=true"
fi

kivfm=(python -m kivfm.main "--config=$config" "--workdir=$workdir"
       --config.distributed.enabled=True "$@")
if [[ $mode == node ]]; then
  tasks_per_node=1
  device_ids=$(seq -s, 0 $((gpus_per_node - 1)))
  command=("${kivfm[@]}" "--config.distributed.local_device_ids=$device_ids")
else
  tasks_per_node=$gpus_per_node
  # SLURM_LOCALID differs per task, so it is read by a shell inside each task.
  # shellcheck disable=SC2016
  command=(bash -c 'exec "$@" --config.distributed.local_device_ids="$SLURM_LOCALID"' bash
           "${kivfm[@]}")
fi
# No --kill-on-bad-exit: a process leaving with 143 after its preemption checkpoint must not end
# the others before they finish theirs.
srun_line=(srun "--nodes=$nodes" "--ntasks-per-node=$tasks_per_node"
           "--gpus-per-node=$gpus_per_node" "${command[@]}")

if $dry_run; then
  print_command cd "$checkout"
  print_command export "XLA_FLAGS=$xla_flags"
  print_command "${srun_line[@]}"
  exit 0
fi
cd "$checkout"
export XLA_FLAGS=$xla_flags
exec "${srun_line[@]}"
