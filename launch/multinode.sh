#!/usr/bin/env bash
# Plain multi-node launch without a scheduler: run this on every node.
#   launch/multinode.sh COORDINATOR_HOST:PORT NUM_PROCESSES PROCESS_ID -- --config=... --workdir=...
#   DRY_RUN=1 launch/multinode.sh ...   prints the command instead of running it
# Training replaces this shell (exec), so a SIGTERM to it (a preemption notice) reaches JAX's preemption
# service: every process saves the same step and exits 0; run the same command again to resume.
set -euo pipefail
if [ "$#" -lt 4 ] || [ "$4" != "--" ]; then
  echo "usage: $0 COORDINATOR_HOST:PORT NUM_PROCESSES PROCESS_ID -- MAIN_FLAGS..." >&2
  exit 2
fi
export JAX_COORDINATOR_ADDRESS="$1" JAX_NUM_PROCESSES="$2" JAX_PROCESS_ID="$3"
shift 4
cmd=(python -m meddiff_jax.main "$@")
if [ "${DRY_RUN:-0}" = "1" ]; then
  echo "JAX_COORDINATOR_ADDRESS=$JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES=$JAX_NUM_PROCESSES JAX_PROCESS_ID=$JAX_PROCESS_ID ${cmd[*]}"
  exit 0
fi
exec "${cmd[@]}"
