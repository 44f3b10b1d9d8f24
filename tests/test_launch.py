"""Launchers in dry-run mode print the exact commands they would run."""

import os
import subprocess
import sys

from conftest import REPO


def run(*args, env=None):
  return subprocess.run(
    list(args), cwd=REPO, capture_output=True, text=True, timeout=60, env=dict(os.environ, **(env or {}))
  )


def test_tpu_vm_dry_run():
  proc = run(
    sys.executable,
    "launch/tpu_vm.py",
    "--name=md",
    "--zone=us-east5-a",
    "--project=p",
    "--accelerator=v5p-64",
    "--create",
    "--config=configs/pretrain.py:paper",
    "--workdir=gs://b/run",
    "--dry-run",
    "--",
    "--config.mesh.fsdp=8",
  )
  assert proc.returncode == 0, proc.stderr
  lines = [l for l in proc.stdout.splitlines() if l.startswith("+ ")]
  assert "queued-resources create md --node-id md --accelerator-type v5p-64" in lines[0]
  assert lines[1].startswith("+ WAIT_ACTIVE md")
  assert any("tpu-vm scp" in l and "--worker=all" in l for l in lines)
  assert "pip install -q -e ." in lines[-2] and "--worker=all" in lines[-2]
  assert (
    "python -m meddiff_jax.main --config=configs/pretrain.py:paper --workdir=gs://b/run --config.mesh.fsdp=8"
    in lines[-1]
    and "--worker=all" in lines[-1]
  )


def test_slurm_dry_run():
  proc = run(
    sys.executable,
    "launch/slurm.py",
    "--nodes=4",
    "--gpus_per_node=8",
    "--partition=gpu",
    "--config=configs/pretrain.py:paper",
    "--workdir=/shared/run",
    "--dry-run",
    "--",
    "--config.mesh.fsdp=8",
  )
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert "#SBATCH --nodes=4" in out and "#SBATCH --gpus-per-node=8" in out and "#SBATCH --partition=gpu" in out
  assert "#SBATCH --signal=TERM@300" in out and 'JAX_NUM_PROCESSES="$SLURM_NTASKS"' in out
  assert "JAX_PROCESS_ID=$SLURM_PROCID" in out
  # the whole node's cores, which the input pipeline sizes itself from (data.worker_count=auto)
  assert "#SBATCH --exclusive" in out and 'srun --kill-on-bad-exit=1 --cpus-per-task="$SLURM_CPUS_ON_NODE"' in out
  assert (
    "python -m meddiff_jax.main --config=configs/pretrain.py:paper --workdir=/shared/run --config.mesh.fsdp=8" in out
  )
  bash = subprocess.run(["bash", "-n"], input=out, capture_output=True, text=True)
  assert bash.returncode == 0, bash.stderr  # the script parses


def test_multinode_dry_run():
  proc = run(
    "bash",
    "launch/multinode.sh",
    "10.0.0.1:1234",
    "2",
    "1",
    "--",
    "--config=configs/demo.py",
    "--workdir=/tmp/x",
    env={"DRY_RUN": "1"},
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == (
    "JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 "
    "python -m meddiff_jax.main --config=configs/demo.py --workdir=/tmp/x"
  )
  bad = run("bash", "launch/multinode.sh", "x")
  assert bad.returncode == 2 and "usage" in bad.stderr
