#!/usr/bin/env bash
# One node, N processes (default: one per GPU, else 2), restarted on failure like a cluster job.
#
#   launch/local.sh CONFIG [key=value ...]
#   NPROC_PER_NODE=4 launch/local.sh configs/digits/mnist_to_mnistm.yaml data.root=/data/digits
set -euo pipefail

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
    export NPROC_PER_NODE=$(( gpus > 0 ? gpus : 2 ))
fi
unset RDZV_ENDPOINT MASTER_ADDR NODE_RANK
NNODES=1 exec "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh" "$@"
