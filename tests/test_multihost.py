"""Two JAX processes on localhost (CPU, gloo): train with a shared checkpoint dir, then resume; a preemption
notice on one process stops both at one step; a step that restores on one process only is restored by none.

The training runs share a persistent compilation cache (config.compilation_cache_dir): the first run compiles
the step, the later ones load it (and so test the cache across restarts)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO, free_port

ARGS = [
  "--config=configs/pretrain.py:tiny",
  "--config.training.log_every=1",
  "--config.data.patch_size=8",
  "--config.data.phantom.shape=(24,24,24)",
  "--config.data.phantom.num_volumes=4",
  "--config.eval.every_steps=0",
  "--config.eval.sample_every_steps=0",
]


def two_process_env(port, pid):
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
    JAX_NUM_PROCESSES="2",
    JAX_PROCESS_ID=str(pid),
    PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
  )
  env.pop("XLA_FLAGS", None)
  return env


def start_two(command, logs_prefix):
  """`command` (argv) as processes 0 and 1 of one job; their output goes to log files (a full PIPE would
  block a process)."""
  port = free_port()
  procs, logs = [], []
  for pid in range(2):
    logs.append(logs_prefix.parent / f"{logs_prefix.name}.{pid}.log")
    with open(logs[-1], "w") as f:
      procs.append(
        subprocess.Popen(command, cwd=REPO, env=two_process_env(port, pid), stdout=f, stderr=subprocess.STDOUT)
      )
  return procs, logs


def finish(procs, logs, timeout=900, expect_rc=0):
  for p in procs:
    try:
      p.wait(timeout=timeout)
    finally:
      if p.poll() is None:
        p.kill()
  texts = [log.read_text() for log in logs]
  assert all(p.returncode == expect_rc for p in procs), "\n----\n".join(t[-3000:] for t in texts)
  return texts


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("compilation_cache")


def train_two(workdir, steps, cache_dir, *extra):
  return start_two(
    [
      sys.executable,
      "-m",
      "meddiff_jax.main",
      *ARGS,
      f"--workdir={workdir}",
      f"--config.training.num_steps={steps}",
      f"--config.compilation_cache_dir={cache_dir}",
      *extra,
    ],
    workdir.parent / f"{workdir.name}.{steps}.{time.time_ns()}",
  )


def metric_steps(workdir):
  path = workdir / "metrics.jsonl"
  rows = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
  return [r["step"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(tmp_path, cache_dir):
  errs = finish(*train_two(tmp_path, 3, cache_dir, "--config.checkpoint.every_steps=3"))
  for pid in range(2):  # the start-up line of each process: index / count, devices, mesh
    assert f"process {pid} of 2: 1 local / 2 global cpu devices" in errs[pid]
    assert "mesh {'data': 2, 'fsdp': 1, 'spatial': 1, 'tensor': 1}" in errs[pid]
  assert (tmp_path / "checkpoints" / "3").is_dir()
  assert metric_steps(tmp_path) == [1, 2, 3]  # only process 0 writes logs
  assert any(cache_dir.iterdir())  # process 0 wrote the compiled step to the persistent cache
  errs = finish(*train_two(tmp_path, 5, cache_dir, "--config.checkpoint.every_steps=3"))
  assert any("resumed from step 3" in e for e in errs)
  assert metric_steps(tmp_path) == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_a_preemption_notice_on_one_process_stops_both_at_one_step(tmp_path, cache_dir):
  """SIGTERM to process 1 only: JAX's preemption service tells process 0, both save the same step and exit 0."""
  procs, logs = train_two(tmp_path, 200, cache_dir, "--config.checkpoint.every_steps=1000")
  t0 = time.time()
  while max(metric_steps(tmp_path), default=0) < 2:
    assert time.time() - t0 < 900 and all(p.poll() is None for p in procs), [l.read_text()[-2000:] for l in logs]
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)
  texts = finish(procs, logs)
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert len(saved) == 1 and 2 <= saved[0] < 200, saved
  for text in texts:
    assert f"preemption notice: every process saves step {saved[0]} and exits" in text, text[-2000:]
  assert max(metric_steps(tmp_path)) == saved[0]


AGREEMENT_SCRIPT = textwrap.dedent(
  """
  import sys
  import jax, ml_collections, numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from meddiff_jax import checkpoint, main
  main.maybe_initialize_distributed()
  sharding = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("x",)), P("x"))
  noise = np.random.default_rng(0).random((4, 65536), np.float32)  # incompressible: real data files per process
  config = ml_collections.ConfigDict({"model": {"base_channels": 8}})
  ck = checkpoint.Checkpointer(sys.argv[2])
  if sys.argv[1] == "save":
    for step in (1, 2):
      w = jax.make_array_from_callback(noise.shape, sharding, lambda i: (noise + step)[i])
      ck.save(step, {"w": w}, None, config)
    ck.close()
  else:
    target = {"w": jax.ShapeDtypeStruct(noise.shape, np.float32, sharding=sharding)}
    restored = ck.restore_latest(target, config)
    shard = restored.state["w"].addressable_shards[0]
    exact = np.array_equal(np.asarray(shard.data), noise[shard.index] + restored.step)
    print(f"restored step {restored.step} exact {exact}", flush=True)
  """
)


@pytest.mark.slow
def test_a_step_that_restores_on_one_process_only_is_restored_by_none(tmp_path):
  """Process 1's shard files of the newest step truncated: process 0 reads its own shard fine, process 1
  cannot; they agree on the previous step (without the agreement process 0 would take step 2)."""
  ckdir = tmp_path / "checkpoints"
  command = [sys.executable, "-c", AGREEMENT_SCRIPT]
  finish(*start_two([*command, "save", str(ckdir)], tmp_path / "save"), timeout=300)
  for f in (ckdir / "2" / "state" / "ocdbt.process_1" / "d").iterdir():
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
  texts = finish(*start_two([*command, "restore", str(ckdir)], tmp_path / "restore"), timeout=300)
  for text in texts:
    assert "restored step 1 exact True" in text, text[-3000:]
    assert "newest step 2 does not restore" in text
  assert "restored here but not on every process" in texts[0]
  assert "does not restore into this run's state" in texts[1]
  assert [p.name for p in tmp_path.glob("checkpoints.set_aside.*/*")] == ["2"]  # moved, not deleted
