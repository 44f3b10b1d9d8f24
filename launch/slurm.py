"""Launch meddiff_jax on a SLURM GPU cluster: one process per node, all GPUs of a node per process.

  python launch/slurm.py --nodes=4 --gpus_per_node=8 --partition=gpu --time=72:00:00 \
      --config=configs/pretrain.py:paper --workdir=/shared/runs/paper -- --config.mesh.fsdp=8
  (--dry-run prints the sbatch script instead of submitting it)

The script sets JAX_COORDINATOR_ADDRESS (first node), JAX_NUM_PROCESSES and JAX_PROCESS_ID for
`jax.distributed.initialize` (meddiff_jax/main.py), and forwards SIGTERM ahead of the time limit
(`--signal`) so the run saves a final checkpoint; requeued jobs resume from WORKDIR automatically.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile

TEMPLATE = """#!/bin/bash
#SBATCH --job-name={name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus_per_node}
{cpus_line}
#SBATCH --time={time}
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output={log_dir}/%x-%j.out
{partition_line}
set -euo pipefail
export JAX_COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):{port}"
export JAX_NUM_PROCESSES="$SLURM_NTASKS"
srun --kill-on-bad-exit=1{srun_cpus} \\
  bash -c 'export JAX_PROCESS_ID=$SLURM_PROCID; exec python -m meddiff_jax.main {args}'
"""


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--name", default="meddiff")
  p.add_argument("--nodes", type=int, default=1)
  p.add_argument("--gpus_per_node", type=int, default=8)
  # 0: the whole node (--exclusive): the input pipeline sizes its workers from the cores it is given
  # (data.worker_count=auto, data/workers.py); one 8-GPU node wants ~20-40 of them (benchmarks/RESULTS.md #24)
  p.add_argument("--cpus_per_task", type=int, default=0)
  p.add_argument("--partition", default="")
  p.add_argument("--time", default="24:00:00")
  p.add_argument("--port", type=int, default=12355)
  p.add_argument("--log_dir", default=".")
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--dry-run", action="store_true")
  p.add_argument("overrides", nargs="*")
  return p.parse_args(argv)


def render(a) -> str:
  args = " ".join(shlex.quote(x) for x in [f"--config={a.config}", f"--workdir={a.workdir}", *a.overrides])
  return TEMPLATE.format(
    name=a.name,
    nodes=a.nodes,
    gpus_per_node=a.gpus_per_node,
    cpus_line=f"#SBATCH --cpus-per-task={a.cpus_per_task}" if a.cpus_per_task else "#SBATCH --exclusive",
    srun_cpus="" if a.cpus_per_task else ' --cpus-per-task="$SLURM_CPUS_ON_NODE"',
    time=a.time,
    log_dir=a.log_dir,
    port=a.port,
    args=args.replace("'", "'\\''"),
    partition_line=f"#SBATCH --partition={a.partition}" if a.partition else "",
  )


def main(argv=None) -> int:
  a = parse(argv)
  script = render(a)
  if a.dry_run:
    print(script)
    return 0
  with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as f:
    f.write(script)
  print(f"+ sbatch {f.name}")
  return subprocess.run(["sbatch", f.name]).returncode


if __name__ == "__main__":
  sys.exit(main())
