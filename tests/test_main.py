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
  """One line naming the key and the closest valid one (ml_collections raised a 55-line traceback)."""
  proc = run_main("--config=configs/pretrain.py:tiny", f"--workdir={tmp_path}", "--config.training.num_stepz=3")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
    "error: --config.training.num_stepz: the configs/pretrain.py:tiny config has no such key; "
    "did you mean --config.training.num_steps?"
  ]


@pytest.mark.slow
def test_an_unreachable_bucket_is_one_line_without_the_client_retry_logs(tmp_path, monkeypatch):
  """gcsfs logs each exhausted retry with its traceback (~100 lines before our error); quiet unless --verbosity."""
  pytest.importorskip("gcsfs")
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # nothing listens there: connection refused
  proc = run_main("--config=pretrain:tiny", "--workdir=gs://meddiff-test-nobucket/run", timeout=600)
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: --workdir='gs://meddiff-test-nobucket/run'"), lines[:5]


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
  (tmp_path / "in").mkdir()
  (tmp_path / "a_file").write_text("the user's")
  proc = run_main(
    "--config=prepare", f"--config.input_dir={tmp_path / 'in'}", f"--config.output_dir={tmp_path / 'a_file'}"
  )
  assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
    f"error: config.output_dir={str(tmp_path / 'a_file')!r} is a file, not a folder; give a new or empty folder"
  ]
  assert (tmp_path / "a_file").read_text() == "the user's"
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


# ------------------------------------------------------------------------------------------ start-up


def test_every_tpu_vm_initialises_the_distributed_runtime(monkeypatch):
  """A Cloud TPU VM (TPU chips on the PCI bus + libtpu) calls jax.distributed.initialize() with no arguments
  (JAX reads the slice from the TPU metadata), whatever the environment says; JAX_PLATFORMS=cpu opts out; a
  plain host with no multi-process variables does not initialise; nor does a second call."""
  import importlib.util

  import jax
  from jax._src import hardware_utils

  from meddiff_jax import main

  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  for key in ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS"):
    monkeypatch.delenv(key, raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "")
  main.maybe_initialize_distributed()
  assert calls == [] and not main.on_cloud_tpu()  # this machine: no TPU
  monkeypatch.setattr(
    hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (4, hardware_utils.TpuVersion.v5p)
  )
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "libtpu" else find_spec(name))
  assert main.on_cloud_tpu()
  main.maybe_initialize_distributed()
  assert calls == [{}]
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert not main.on_cloud_tpu()
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  monkeypatch.setenv("JAX_PLATFORMS", "")
  main.maybe_initialize_distributed()
  assert calls == [{}]


def test_compilation_cache_is_on_for_accelerators_and_where_asked(monkeypatch, tmp_path):
  import jax

  from meddiff_jax import main

  updates = {}
  monkeypatch.setattr(jax.config, "update", lambda key, value: updates.__setitem__(key, value))
  assert main.configure_compilation_cache("auto", str(tmp_path)) is None and updates == {}  # CPU: off
  assert main.configure_compilation_cache("", str(tmp_path)) is None and updates == {}
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert main.configure_compilation_cache("auto", "gs://b/run") == "gs://b/run/compilation_cache"
  assert updates == {
    "jax_compilation_cache_dir": "gs://b/run/compilation_cache",
    "jax_persistent_cache_min_compile_time_secs": 1.0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
  }
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert main.configure_compilation_cache(str(tmp_path / "c"), None) == str(tmp_path / "c")  # CPU when asked
