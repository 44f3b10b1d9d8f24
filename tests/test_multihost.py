"""Two JAX processes on localhost (CPU, gloo): train with a shared checkpoint dir, then resume."""

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO

ARGS = [
  "--config=configs/pretrain.py:tiny",
  "--config.training.log_every=1",
  "--config.data.patch_size=8",
  "--config.data.phantom.shape=(24,24,24)",
  "--config.data.phantom.num_volumes=4",
  "--config.eval.every_steps=0",
  "--config.eval.sample_every_steps=0",
  "--config.checkpoint.every_steps=3",
  "--config.checkpoint.preemption_check_every=1",
]


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two(workdir, steps):
  port = free_port()
  procs, logs = [], []
  for pid in range(2):
    env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
      JAX_NUM_PROCESSES="2",
      JAX_PROCESS_ID=str(pid),
    )
    env.pop("XLA_FLAGS", None)
    logs.append(workdir.parent / f"{workdir.name}.{steps}.{pid}.log")
    with open(logs[-1], "w") as f:  # a log file, not a PIPE: a full pipe would block the process
      procs.append(
        subprocess.Popen(
          [
            sys.executable,
            "-m",
            "meddiff_jax.main",
            *ARGS,
            f"--workdir={workdir}",
            f"--config.training.num_steps={steps}",
          ],
          cwd=REPO,
          env=env,
          stdout=f,
          stderr=subprocess.STDOUT,
        )
      )
  for p in procs:
    try:
      p.wait(timeout=600)
    finally:
      if p.poll() is None:
        p.kill()
  errs = [log.read_text() for log in logs]
  assert all(p.returncode == 0 for p in procs), "\n----\n".join(e[-3000:] for e in errs)
  return errs


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(tmp_path):
  errs = run_two(tmp_path, 3)
  assert "process 1 of 2" in errs[1] or "process 1 of 2" in errs[0]
  assert (tmp_path / "checkpoints" / "3").is_dir()
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # only process 0 writes logs
  errs = run_two(tmp_path, 5)
  assert any("resumed from step 3" in e for e in errs)
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]
