#!/usr/bin/env bash
# Every worker of a Cloud TPU VM slice runs the same command; JAX finds the coordinator itself.
# The workdir must be shared storage (e.g. a gs:// bucket) that every worker can write.
#   bash launch/tpu_pod.sh TPU_NAME ZONE configs/base.py gs://BUCKET/runs/kpu [overrides...]
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [overrides...]}
zone=${2:?}; config=${3:?}; workdir=${4:?}
shift 4
repo_dir=${KIVFM_DIR:-kivfm}   # checkout path on the workers
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd $repo_dir && python -m kivfm.main --config=$config --workdir=$workdir \
    --config.distributed.enabled=True $*"
