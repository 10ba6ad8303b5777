#!/usr/bin/env bash
# Launch tada-train on this node through torchrun; run it once per node.
#
#   launch/torchrun.sh CONFIG [key=value ...]
#
# The node's place in the job comes from the environment:
#   NNODES          nodes in the job (default 1)
#   NODE_RANK       this node's index, 0..NNODES-1 (default 0; static rendezvous only)
#   NPROC_PER_NODE  processes on this node, usually one per GPU (default 1)
#   RDZV_ENDPOINT   host:port of a c10d rendezvous (any node); nodes may then join in any order and a
#                   restart re-forms the group across nodes. RDZV_ID names the job (default tada-dist);
#                   RDZV_CONF passes rendezvous settings, e.g. is_host=1 on the node that must host
#                   the endpoint when torchrun cannot tell from the host name.
#   MASTER_ADDR, MASTER_PORT
#                   without RDZV_ENDPOINT: static rendezvous hosted by node 0 (port default 29500)
#   LOCAL_ADDR      this node's address as the other nodes reach it (default: its host name); set it
#                   when the host name resolves to an interface the other nodes cannot reach
#   MAX_RESTARTS    how often torchrun restarts the whole group after a worker fails (default 3);
#                   each restart resumes from the latest checkpoint
#   PYTHON          interpreter (default: the project's .venv, else python3 on PATH)
#
# With NNODES=1 and neither RDZV_ENDPOINT nor MASTER_ADDR set, the node runs standalone.
# A mistake that no restart can fix (config, data, a checkpoint of another run) stops the job at once
# with exit 2 instead of being restarted MAX_RESTARTS times. SIGTERM and the first Ctrl-C make every
# worker finish its step and save a checkpoint; a second Ctrl-C kills the job at once.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'
    exit $(( $# < 1 ? 2 : 0 ))
fi
config=$1
shift
if [[ ! -f "$config" ]]; then
    echo "launch/torchrun.sh: error: config file '$config' does not exist (expected a YAML file such as configs/default.yaml)" >&2
    exit 2
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-}
if [[ -z "$python" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi

nnodes=${NNODES:-1}
nproc=${NPROC_PER_NODE:-1}
for name in nnodes nproc; do
    if ! [[ "${!name}" =~ ^[1-9][0-9]*$ ]]; then
        echo "launch/torchrun.sh: error: ${name^^} must be a positive integer, got '${!name}'" >&2
        exit 2
    fi
done

rendezvous=()
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    rendezvous=(--rdzv_backend=c10d "--rdzv_endpoint=$RDZV_ENDPOINT" "--rdzv_id=${RDZV_ID:-tada-dist}"
                ${RDZV_CONF:+"--rdzv_conf=$RDZV_CONF"})
elif [[ -n "${MASTER_ADDR:-}" ]]; then
    node_rank=${NODE_RANK:-0}
    if ! [[ "$node_rank" =~ ^[0-9]+$ ]] || (( node_rank >= nnodes )); then
        echo "launch/torchrun.sh: error: NODE_RANK must be in 0..$((nnodes - 1)), got '$node_rank'" >&2
        exit 2
    fi
    rendezvous=("--node_rank=$node_rank" "--master_addr=$MASTER_ADDR" "--master_port=${MASTER_PORT:-29500}")
elif (( nnodes == 1 )); then
    rendezvous=(--standalone)
else
    echo "launch/torchrun.sh: error: NNODES=$nnodes needs RDZV_ENDPOINT (c10d) or MASTER_ADDR (static rendezvous)" >&2
    exit 2
fi

# Workers write a final error here and exit 0 instead of failing, so that torchrun does not restart them.
error_file=$(mktemp "${TMPDIR:-/tmp}/tada-dist-error.XXXXXX")
trap 'rm -f "$error_file"' EXIT
export TADA_DIST_ERROR_FILE=$error_file

# torchrun runs in a session of its own, so that Ctrl-C reaches only this script: it asks for a
# graceful stop (SIGTERM, which torchrun passes to every worker) and, the second time, kills the job.
set -x
setsid "$python" -m torch.distributed.run \
    "--nnodes=$nnodes" "--nproc_per_node=$nproc" "${rendezvous[@]}" \
    "--max_restarts=${MAX_RESTARTS:-3}" ${LOCAL_ADDR:+"--local_addr=$LOCAL_ADDR"} \
    -m tada_dist.train --config "$config" "$@" &
{ set +x; } 2>/dev/null
job=$!
interrupts=0
on_interrupt() {
    interrupts=$((interrupts + 1))
    if (( interrupts == 1 )); then
        echo "launch/torchrun.sh: stopping: every worker finishes its step and saves (Ctrl-C again to kill)" >&2
        kill -TERM "$job" 2>/dev/null || true
    else
        kill -KILL -- "-$job" 2>/dev/null || true
    fi
}
trap on_interrupt INT
trap 'kill -TERM "$job" 2>/dev/null || true' TERM
# `wait` returns early when a trapped signal arrives; wait again until torchrun has really ended.
while true; do
    wait "$job" && status=0 || status=$?
    kill -0 "$job" 2>/dev/null || break
done
if [[ -s "$error_file" ]]; then
    exit 2  # the workers already printed the error
fi
exit "$status"
