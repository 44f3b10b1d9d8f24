"""Launch meddiff_jax on a SLURM GPU cluster: one process per node, all GPUs of a node per process.

  python launch/slurm.py --nodes=2 --gpus_per_node=8 --partition=gpu --time=24:00:00 \
      --config=configs/pretrain.py:paper --workdir=/shared/runs/paper -- --config.data.prepared_dir=/shared/prepared
  (--dry-run prints the sbatch script instead of submitting it)

The job script sets JAX_COORDINATOR_ADDRESS (the first node), JAX_NUM_PROCESSES and JAX_PROCESS_ID for
`jax.distributed.initialize` (meddiff_jax/main.py). It comes back by itself:
  - time limit: SLURM signals the batch shell --signal_lead_s before the limit (`--signal=B:USR1@...`); the
    handler sends SIGTERM to the training tasks (srun passes it on), JAX's preemption service picks one step
    on which every process saves a checkpoint and exits 0, and the handler requeues the job (`scontrol
    requeue`);
  - preemption: SLURM sends SIGTERM to the tasks and the batch shell (SIGKILL after the partition's
    GraceTime); the tasks save and exit, and SLURM requeues the job itself (#SBATCH --requeue, on clusters
    with PreemptMode=REQUEUE). A scancel ends the same way and is not undone.
The requeued job resumes from WORKDIR/checkpoints. A run that ends without a signal (finished, or failed) is
not requeued. Logs: WORKDIR/logs/NAME-JOBID.out, appended across requeues.
CPUs: --cpus_per_gpu x GPUs per task, and that many minus --reserved_cpus input-pipeline workers
(config.data.worker_count; docs/scaling.md: an 8 x H100 host needs ~15-22 busy cores at 40% MFU, ~75-110
with a 5x margin), unless the overrides set data.worker_count.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEMPLATE = """#!/bin/bash
#SBATCH --job-name={name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus_per_node}
#SBATCH --cpus-per-task={cpus_per_task}
#SBATCH --time={time}
#SBATCH --signal=B:USR1@{signal_lead_s}
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={log_dir}/%x-%j.out
#SBATCH --chdir={repo}
{partition_line}
set -uo pipefail
echo "job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, restart ${{SLURM_RESTART_COUNT:-0}}, $(date)"
export JAX_COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):{port}"
export JAX_NUM_PROCESSES="$SLURM_NTASKS"
requeue=0
srun --kill-on-bad-exit=1 bash -c 'export JAX_PROCESS_ID=$SLURM_PROCID; exec {python} -m meddiff_jax.main {args}' &
tasks=$!
# USR1: the time limit is --signal_lead_s away; TERM: preemption (SLURM requeues a preempted --requeue job
# itself) or scancel (not undone). Either way srun passes TERM on: every task saves one step and exits.
on_signal() {{
  echo "$1 received at $(date): the training tasks save a checkpoint and stop"
  [ "$1" = USR1 ] && requeue=1
  kill -TERM "$tasks" 2>/dev/null
}}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
while true; do  # wait returns early when a trapped signal arrives: wait again until srun is gone
  wait "$tasks"
  rc=$?
  kill -0 "$tasks" 2>/dev/null || break
done
echo "training tasks exited with status $rc"
if [ "$requeue" = 1 ] && [ "$rc" = 0 ]; then
  echo "requeueing job $SLURM_JOB_ID: it resumes from the checkpoint just saved"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
"""


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--name", default="meddiff")
  p.add_argument("--nodes", type=int, default=1)
  p.add_argument("--gpus_per_node", type=int, default=8)
  p.add_argument("--cpus_per_gpu", type=int, default=12, help="--cpus-per-task = this x gpus_per_node")
  p.add_argument("--reserved_cpus", type=int, default=8, help="CPUs per task kept for the training process")
  p.add_argument("--partition", default="")
  p.add_argument("--time", default="24:00:00")
  p.add_argument("--signal_lead_s", type=int, default=300, help="seconds before the time limit to save")
  p.add_argument("--port", type=int, default=12355)
  p.add_argument("--python", default="python", help="the interpreter with meddiff_jax installed, on every node")
  p.add_argument("--log_dir", default="", help="default: WORKDIR/logs (created before submitting)")
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--dry-run", action="store_true")
  p.add_argument("overrides", nargs="*")
  return p.parse_args(argv)


def render(a) -> str:
  cpus = a.cpus_per_gpu * a.gpus_per_node
  overrides = list(a.overrides)
  if not any(o.startswith("--config.data.worker_count=") for o in overrides):
    overrides.append(f"--config.data.worker_count={max(cpus - a.reserved_cpus, 0)}")
  args = " ".join(shlex.quote(x) for x in [f"--config={a.config}", f"--workdir={a.workdir}", *overrides])
  return TEMPLATE.format(
    name=a.name,
    nodes=a.nodes,
    gpus_per_node=a.gpus_per_node,
    cpus_per_task=cpus,
    time=a.time,
    signal_lead_s=a.signal_lead_s,
    log_dir=a.log_dir or os.path.join(a.workdir, "logs"),
    repo=REPO,
    port=a.port,
    python=shlex.quote(a.python).replace("'", "'\\''"),
    args=args.replace("'", "'\\''"),
    partition_line=f"#SBATCH --partition={a.partition}" if a.partition else "",
  )


def main(argv=None) -> int:
  a = parse(argv)
  script = render(a)
  if a.dry_run:
    print(script)
    return 0
  if "://" in a.workdir and not a.log_dir:
    raise SystemExit(f"--workdir={a.workdir}: SLURM writes its log to a file system path; give --log_dir")
  log_dir = a.log_dir or os.path.join(a.workdir, "logs")
  os.makedirs(log_dir, exist_ok=True)  # SLURM does not create it
  path = os.path.join(log_dir, f"{a.name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch")  # kept beside its logs
  with open(path, "w") as f:
    f.write(script)
  print(f"+ sbatch {path}", flush=True)
  return subprocess.run(["sbatch", path]).returncode


if __name__ == "__main__":
  sys.exit(main())
