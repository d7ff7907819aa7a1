#!/usr/bin/env bash
# SLURM: one process per node, each driving all GPUs of its node. JAX reads the coordinator,
# process count and id from the SLURM environment.
#   sbatch --nodes=4 --gpus-per-node=8 launch/gpu_slurm.sh configs/base.py /shared/runs/kpu
#SBATCH --job-name=kivfm
#SBATCH --ntasks-per-node=1
#SBATCH --signal=TERM@120
set -euo pipefail
config=${1:?usage: sbatch launch/gpu_slurm.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?}
shift 2
srun python -m kivfm.main --config="$config" --workdir="$workdir" \
  --config.distributed.enabled=True "$@"
