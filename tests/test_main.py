"""End-to-end: `python -m meddiff_jax.main` as a user runs it."""

import json

import pytest
from conftest import REPO, run_main


@pytest.mark.slow
def test_three_step_pretraining_run_writes_loss_log(tmp_path):
  proc = run_main(
    "--config=configs/pretrain.py:tiny",
    f"--workdir={tmp_path}",
    "--config.training.num_steps=3",
    "--config.training.log_every=1",
    "--config.data.patch_size=8",
    "--config.data.phantom.shape=(24,24,24)",
    "--config.data.phantom.num_volumes=3",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train = [l for l in lines if "loss" in l]
  assert [l["step"] for l in train] == [1, 2, 3]
  assert all(l["nan_skips"] == 0 and l["loss"] > 0 for l in train)
  assert all(0.0 <= l["data_wait_fraction"] <= 1.0 for l in train)  # the share of each interval spent on input
  assert "input pipeline:" in proc.stdout and "samples/s expected" in proc.stdout  # 'auto' sized, said once
  val = [l for l in lines if "val/loss" in l]
  assert val and val[-1]["step"] == 3 and len([k for k in val[-1] if k.startswith("val/loss_t")]) == 4
  assert (tmp_path / "samples" / "step_00000003.png").exists()
  assert (tmp_path / "checkpoints" / "3").is_dir()
  assert list(tmp_path.glob("events.out.tfevents.*"))


def test_unknown_override_key_fails_clearly(tmp_path):
  proc = run_main("--config=configs/pretrain.py:tiny", f"--workdir={tmp_path}", "--config.training.num_stepz=3")
  assert proc.returncode != 0
  assert "num_stepz" in proc.stderr


def test_unknown_preset_fails_clearly(tmp_path):
  proc = run_main("--config=configs/pretrain.py:huge", f"--workdir={tmp_path}")
  assert proc.returncode != 0
  assert "unknown preset 'huge'" in proc.stderr


@pytest.mark.slow
def test_config_mistakes_fail_with_one_line_messages(tmp_path):
  proc = run_main("--config=configs/pretrain.py:tiny", f"--workdir={tmp_path}", "--config.data.patch_size=7")
  assert proc.returncode != 0 and "patch_size=7 must be divisible by 2" in proc.stderr
  assert "Traceback" not in proc.stderr
  proc = run_main("--config=configs/pretrain.py:tiny", "--workdir=/proc/forbidden/run")
  assert proc.returncode != 0 and "cannot be created" in proc.stderr and "Traceback" not in proc.stderr
  proc = run_main("--config=configs/pretrain.py:tiny")
  assert proc.returncode != 0 and "--workdir=DIR is required" in proc.stderr
  proc = run_main(
    "--config=configs/prepare.py", f"--config.input_dir={tmp_path / 'none'}", f"--config.output_dir={tmp_path / 'out'}"
  )
  assert proc.returncode != 0 and "is not a directory" in proc.stderr and "Traceback" not in proc.stderr
  proc = run_main("--config=configs/controlnet.py:sr", f"--workdir={tmp_path}", "--config.base_checkpoint=/nope")
  assert proc.returncode != 0 and "base_checkpoint='/nope' does not exist" in proc.stderr


def test_every_config_file_names_a_command_with_its_check():
  """main.COMMANDS is the whole dispatch: each shipped config's mode has an entry, and task configs are
  checked by the task check (chosen by mode, not by which keys exist)."""
  import importlib

  from meddiff_jax import checks, main

  names = [
    p.stem for p in (REPO / "configs").glob("*.py") if p.stem not in ("__init__", "input_options", "task_options")
  ]
  modes = {importlib.import_module(f"meddiff_jax.configs.{n}").get_config().mode for n in names}
  assert modes <= set(main.COMMANDS) and set(checks.TASKS) <= modes
  assert all(main.COMMANDS[t].check is checks.task for t in checks.TASKS)
