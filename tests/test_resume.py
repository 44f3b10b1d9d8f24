"""Exact resume after SIGTERM / SIGKILL, corrupt-checkpoint fallback, restore onto another mesh."""

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, mesh_of, override, tiny, tiny_config

from meddiff_jax import checkpoint, sharding
from meddiff_jax.train import loop

ARGS = [
  "--config=configs/pretrain.py:tiny",
  "--config.training.num_steps=24",
  "--config.training.log_every=1",
  "--config.data.patch_size=8",
  "--config.data.phantom.shape=(24,24,24)",
  "--config.data.phantom.num_volumes=4",
  "--config.eval.every_steps=0",
  "--config.eval.sample_every_steps=0",
  "--config.checkpoint.every_steps=4",
]


class Run:
  """A training subprocess whose log goes to a file (a PIPE would fill up and block it)."""

  def __init__(self, workdir):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    self.log = pathlib.Path(workdir).parent / f"{pathlib.Path(workdir).name}.{time.time_ns()}.log"
    with open(self.log, "w") as f:
      self.proc = subprocess.Popen(
        [sys.executable, "-m", "meddiff_jax.main", *ARGS, f"--workdir={workdir}"],
        cwd=REPO,
        env=env,
        stdout=f,
        stderr=subprocess.STDOUT,
      )

  def tail(self):
    return self.log.read_text()[-3000:]

  def wait(self, timeout):
    return self.proc.wait(timeout=timeout)


def start(workdir):
  return Run(workdir)


def losses(workdir):
  """step -> loss, the last line for a step winning (re-run steps after a resume are appended)."""
  out = {}
  path = pathlib.Path(workdir) / "metrics.jsonl"
  for line in path.read_text().splitlines() if path.exists() else []:
    row = json.loads(line)
    if "loss" in row:
      out[row["step"]] = row["loss"]
  return out


def wait_for_step(workdir, step, proc, timeout=300):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if max(losses(workdir), default=0) >= step:
      return
    if proc.proc.poll() is not None:
      raise AssertionError(f"run ended early: {proc.tail()}")
    time.sleep(0.05)
  raise AssertionError("timed out waiting for training progress")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  proc = start(workdir)
  assert proc.wait(timeout=600) == 0, proc.tail()
  ref = losses(workdir)
  assert sorted(ref) == list(range(1, 25))
  return ref


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_resumes_to_the_same_losses_bitwise(tmp_path, reference, sig):
  proc = start(tmp_path)
  wait_for_step(tmp_path, 6, proc)
  proc.proc.send_signal(sig)
  rc = proc.wait(timeout=300)
  stopped_at = max(losses(tmp_path))
  assert stopped_at < 24, "the run finished before the signal arrived; nothing was tested"
  if sig == signal.SIGTERM:
    assert rc == 0, proc.tail()  # clean exit after a final checkpoint
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == stopped_at
  else:
    assert rc == -signal.SIGKILL
  proc = start(tmp_path)
  assert proc.wait(timeout=600) == 0, proc.tail()
  resumed = losses(tmp_path)
  assert sorted(resumed) == list(range(1, 25))
  assert [resumed[s] for s in range(1, 25)] == [reference[s] for s in range(1, 25)]  # bitwise (float repr)


def small_state(mesh_sizes, seed=0):
  overrides = dict(seed=seed, **{"sharding.min_shard_size": 0})
  typed = tiny(**overrides)
  st, shardings, _, _ = loop.init_state(typed, loop.pretraining(typed), mesh_of(mesh_sizes), sharding.DEFAULT_RULES)
  return tiny_config(**overrides), st, shardings  # the config as a checkpoint stores it


def abstract_of(st, shardings):
  return checkpoint.abstract_target(st, shardings)


def resume(ck, abstract, config):
  """checkpoint.resume as the loop calls it, for the stored ConfigDict `config`."""
  return checkpoint.resume(
    ck, abstract, config, restore=config.restore, on_unrestorable=config.checkpoint.on_unrestorable
  )


@pytest.mark.slow
def test_restore_onto_a_different_mesh(tmp_path):
  config, st8, _ = small_state({"data": 1, "fsdp": 8})
  ck = checkpoint.Checkpointer(str(tmp_path), asynchronous=True)
  ck.save(7, st8, None, config)
  ck.wait()
  for mesh_sizes in ({"data": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
    _, other, shardings = small_state(mesh_sizes, seed=1)  # different values: restore must overwrite them
    restored = checkpoint.Checkpointer(str(tmp_path)).restore_latest(abstract_of(other, shardings))
    assert restored.step == 7 and restored.config["training"]["batch_size"] == config.training.batch_size
    jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored.state, st8
    )
    leaf = restored.state.params["encoder"]["down1_res0"]["conv1"]["kernel"]
    assert leaf.sharding == shardings.params["encoder"]["down1_res0"]["conv1"]["kernel"]


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
  """The newest step does not restore: the previous one is used, with a warning; the corrupt step is moved
  aside, not deleted, and the resumed run can save that step number again."""
  config, st, shardings = small_state({"data": 1})
  ckdir = tmp_path / "checkpoints"
  ck = checkpoint.Checkpointer(str(ckdir), keep=3)
  ck.save(1, st, None, config)
  ck.save(2, st.replace(step=st.step + 5), None, config)
  ck.wait()
  for f in (ckdir / "2" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
  corrupt = {p.relative_to(ckdir / "2"): p.read_bytes() for p in (ckdir / "2").rglob("*") if p.is_file()}
  ck = checkpoint.Checkpointer(str(ckdir))
  with caplog.at_level(logging.WARNING):
    restored = resume(ck, abstract_of(st, shardings), config)
  assert restored is not None and restored.step == 1 and int(restored.state.step) == 0
  assert any("newest step 2 does not restore" in r.getMessage() for r in caplog.records)
  (aside,) = tmp_path.glob("checkpoints.set_aside.*")
  assert {p.relative_to(aside / "2"): p.read_bytes() for p in (aside / "2").rglob("*") if p.is_file()} == corrupt
  assert ck.all_steps() == [1]
  ck.save(2, st, None, config)  # the step number is free again
  ck.wait()
  assert ck.all_steps() == [1, 2]


def _tree(path):
  return {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_refused_key_by_key_and_kept(tmp_path):
  """Steps saved with other architecture keys: one line naming the newest step and each key, nothing
  touched; model.norm_groups changes no array shape (a restore would succeed and train another model)."""
  config, st, shardings = small_state({"data": 1})
  ckdir = tmp_path / "checkpoints"
  ck = checkpoint.Checkpointer(str(ckdir))
  ck.save(3, st, None, config)
  ck.save(6, st, None, config)
  ck.close()
  before = _tree(ckdir)
  for changes, named in (
    ({"model.base_channels": 16}, "model.base_channels 8 -> 16"),
    ({"model.norm_groups": 4}, "model.norm_groups 8 -> 4"),
    ({"model.base_channels": 16, "model.pos_num_freqs": 3}, "model.base_channels 8 -> 16; model.pos_num_freqs 2 -> 3"),
  ):
    other = tiny_config(**{"sharding.min_shard_size": 0, **changes})
    typed = tiny(**{"sharding.min_shard_size": 0, **changes})
    st2, shardings2, _, _ = loop.init_state(
      typed, loop.pretraining(typed), mesh_of({"data": 1}), sharding.DEFAULT_RULES
    )
    with pytest.raises(checkpoint.UnrestorableError) as e:
      resume(checkpoint.Checkpointer(str(ckdir)), abstract_of(st2, shardings2), other)
    message = str(e.value)
    assert "\n" not in message and "the newest, step 6, was saved with another model: " + named in message, message
    assert "on_unrestorable=start_fresh" in message
    assert _tree(ckdir) == before  # nothing deleted, moved or written
  # the same model with other compute-only / training keys restores
  same = tiny_config(**{"sharding.min_shard_size": 0, "model.remat": "full", "training.num_steps": 99})
  restored = checkpoint.Checkpointer(str(ckdir)).restore_latest(abstract_of(st, shardings), same)
  assert restored.step == 6


@pytest.mark.slow
def test_start_fresh_moves_the_old_run_aside(tmp_path):
  """on_unrestorable=start_fresh (and restore=False, which otherwise is refused): the steps go to a
  set-aside directory byte for byte, the run starts at step 0, and its saves cannot touch them."""
  config, st, shardings = small_state({"data": 1})
  ckdir = tmp_path / "checkpoints"
  ck = checkpoint.Checkpointer(str(ckdir))
  ck.save(4, st, None, config)
  ck.close()
  before = _tree(ckdir)
  with pytest.raises(checkpoint.UnrestorableError, match=r"config.restore=False, and it holds the steps \[4\]"):
    resume(checkpoint.Checkpointer(str(ckdir)), abstract_of(st, shardings), override(config, restore=False))
  assert _tree(ckdir) == before
  fresh = override(config, restore=False, **{"checkpoint.on_unrestorable": "start_fresh"})
  ck = checkpoint.Checkpointer(str(ckdir))
  assert resume(ck, abstract_of(st, shardings), fresh) is None
  (aside,) = tmp_path.glob("checkpoints.set_aside.*")
  assert _tree(aside) == before and ck.all_steps() == []
  ck.save(1, st, None, config)
  ck.close()
  assert _tree(aside) == before


@pytest.mark.slow
def test_main_refuses_a_workdir_of_another_model_in_one_line(tmp_path):
  """What a user sees resuming with a changed architecture: `error: ...` naming the step and the key, exit 1,
  the checkpoints untouched (before anything is compiled)."""
  from conftest import run_main

  config, st, _ = small_state({"data": 1})
  ck = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
  ck.save(5, st, None, config)
  ck.close()
  before = _tree(tmp_path / "checkpoints")
  proc = run_main("--config=configs/pretrain.py:tiny", f"--workdir={tmp_path}", "--config.model.base_channels=16")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert (
    last.startswith("error: ")
    and "the newest, step 5, was saved with another model: model.base_channels 8 -> 16" in last
  )
  assert "compiled the train step" not in proc.stdout
  assert _tree(tmp_path / "checkpoints") == before
