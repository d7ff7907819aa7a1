#!/usr/bin/env bash
# One machine, all local devices (CPU, GPUs or a single TPU VM host).
#   bash launch/local.sh configs/base.py:smoke runs/smoke [--config.key=value ...]
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG[:ARG] WORKDIR [overrides...]}
workdir=${2:?usage: launch/local.sh CONFIG[:ARG] WORKDIR [overrides...]}
shift 2
cd "$(dirname "$0")/.."
exec python -m kivfm.main --config="$config" --workdir="$workdir" "$@"
