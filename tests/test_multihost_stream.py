"""Several JAX processes on localhost (CPU, gloo, fake devices per process): 1 process x 4 devices and 2 processes
x 2 devices train the same steps (same loss and grad norm at every step, same validation loss and preview) for
meshes that split samples across processes, and a run saved with one process count resumes with the other on the
same stream. Each run is a real `python -m meddiff_jax.main` job of a one-level UNet; a 4-step run takes 1-2 minutes
on 2 idle cores, most of it compiling.
The slicing logic itself is tested fast, on simulated processes, in tests/test_stream.py; the launch behaviour
(preemption, agreed restore) in tests/test_multihost.py."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, free_port
from PIL import Image

ARGS = [
  "--config=configs/pretrain.py:tiny",
  "--config.training.num_steps=4",
  "--config.training.log_every=1",
  "--config.training.batch_size=4",
  "--config.data.patch_size=8",
  "--config.data.phantom.shape=(24,24,24)",
  "--config.data.phantom.num_volumes=4",
  "--config.eval.every_steps=0",
  "--config.eval.sample_every_steps=0",
  "--config.checkpoint.every_steps=2",
  # one level, no attention: every run compiles its own mesh, and XLA:CPU compiles spatially split convs slowly
  "--config.model.channel_mult=(1,)",
  "--config.model.attention_levels=()",
  "--config.model.mid_attention=False",
]
# data x spatial: a sample split along depth across the two processes; rows and depth split; rows only
MESHES = {"data1_spatial4": (1, 4), "data2_spatial2": (2, 2), "data4": (4, 1)}
LAYOUTS = {"1x4": (1, 4), "2x2": (2, 2)}  # processes x devices per process
# validation and a preview at the last step, on the mesh whose samples are split across processes
WITH_EVAL = [
  "--config.eval.every_steps=4",
  "--config.eval.sample_every_steps=4",
  "--config.eval.sample_steps=1",
  "--config.eval.num_buckets=1",
]


def run_job(workdir: pathlib.Path, layout: str, args: list[str], cache: pathlib.Path) -> list[str]:
  """`python -m meddiff_jax.main ARGS --workdir=WORKDIR` as `layout` (processes x fake CPU devices each); the
  processes' logs. `cache`: JAX's persistent compilation cache (a resumed run reuses its layout's executables)."""
  num_processes, num_devices = LAYOUTS[layout]
  port = free_port()
  procs, logs = [], []
  for pid in range(num_processes):
    env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
      JAX_COMPILATION_CACHE_DIR=str(cache),
    )
    if num_processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes))
      env.update(JAX_PROCESS_ID=str(pid))
    logs.append(workdir.parent / f"{workdir.name}.{layout}.{len(list(workdir.parent.glob('*.log')))}.{pid}.log")
    with open(logs[-1], "w") as f:  # a log file, not a PIPE: a full pipe would block the process
      procs.append(
        subprocess.Popen(
          [sys.executable, "-m", "meddiff_jax.main", *args, f"--workdir={workdir}"],
          cwd=REPO,
          env=env,
          stdout=f,
          stderr=subprocess.STDOUT,
        )
      )
  for p in procs:
    try:
      p.wait(timeout=900)
    finally:
      if p.poll() is None:
        p.kill()
  texts = [log.read_text() for log in logs]
  assert all(p.returncode == 0 for p in procs), "\n----\n".join(t[-3000:] for t in texts)
  return texts


def metrics(workdir: pathlib.Path) -> dict[int, dict]:
  """step -> its logged scalars (the last line for a step wins: a resume appends re-run steps)."""
  out: dict[int, dict] = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    out.setdefault(row["step"], {}).update(row)
  return out


def mesh_args(mesh: str) -> list[str]:
  data, spatial = MESHES[mesh]
  return [f"--config.mesh.data={data}", f"--config.mesh.spatial={spatial}"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("compilation_cache")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
  """(mesh, layout) -> the workdir of its uninterrupted 4-step run (run once, on first use)."""
  done: dict[tuple[str, str], pathlib.Path] = {}

  def get(mesh: str, layout: str) -> pathlib.Path:
    if (mesh, layout) not in done:
      workdir = tmp_path_factory.mktemp(f"{mesh}_{layout}")
      args = ARGS + mesh_args(mesh) + (WITH_EVAL if mesh == "data1_spatial4" else [])
      logs = run_job(workdir, layout, args, cache)
      if layout == "2x2":
        assert any("process 1 of 2" in log for log in logs)
      done[mesh, layout] = workdir
    return done[mesh, layout]

  return get


def assert_same_steps(a: dict[int, dict], b: dict[int, dict], steps, keys=("loss", "grad_norm")):
  for step in steps:
    for key in keys:
      np.testing.assert_allclose(a[step][key], b[step][key], rtol=2e-5, err_msg=f"step {step} {key}")


@pytest.mark.slow
@pytest.mark.parametrize("mesh", list(MESHES))
def test_one_and_two_processes_train_the_same_steps(runs, mesh):
  one, two = metrics(runs(mesh, "1x4")), metrics(runs(mesh, "2x2"))
  rows = [json.loads(line) for line in (runs(mesh, "2x2") / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # only process 0 writes logs
  assert_same_steps(one, two, range(1, 5))
  if mesh == "data1_spatial4":  # validation batches and the preview: the same samples, split the same way
    assert_same_steps(one, two, [4], keys=("val/loss",))
    images = [np.asarray(Image.open(runs(mesh, layout) / "samples" / "step_00000004.png")) for layout in LAYOUTS]
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("saved,resumed", [("2x2", "1x4"), ("1x4", "2x2")])
def test_a_run_saved_with_one_process_count_resumes_with_the_other_on_the_same_stream(
  runs, cache, tmp_path, saved, resumed
):
  """The step-2 checkpoint of a run (its step-4 one removed) resumed with the other process count: steps 3 and 4
  are the uninterrupted run's (a different stream position or per-process draw would change their losses)."""
  mesh = "data2_spatial2"
  reference = metrics(runs(mesh, resumed))
  workdir = tmp_path / "run"
  shutil.copytree(runs(mesh, saved), workdir)
  shutil.rmtree(workdir / "checkpoints" / "4")
  rows = (workdir / "metrics.jsonl").read_text().splitlines()
  (workdir / "metrics.jsonl").write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= 2))
  logs = run_job(workdir, resumed, ARGS + mesh_args(mesh), cache)
  assert any("resumed from step 2" in log for log in logs)
  resumed_metrics = metrics(workdir)
  assert sorted(s for s in resumed_metrics if "loss" in resumed_metrics[s]) == [1, 2, 3, 4]
  assert_same_steps(resumed_metrics, reference, [3, 4])
