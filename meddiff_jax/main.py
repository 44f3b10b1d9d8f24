"""Entry point: `python -m meddiff_jax.main --config=configs/NAME.py[:preset] --workdir=DIR --config.key=value`.

`config.mode` picks the job: train (pretraining) or prepare (offline data conversion).
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, optionally :preset.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for logs and checkpoints.")

# Environment variables that mean "this is one process of a multi-process job".
_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES")


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() when the environment describes a multi-process job.

  Explicit: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID (launch/ scripts set
  them). Otherwise SLURM (more than one task) and TPU pod environments are auto-detected by JAX.
  """
  import jax

  slurm_multi = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  if not (slurm_multi or any(os.environ.get(k) for k in _DISTRIBUTED_ENV)):
    return
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":  # CPU processes need gloo for cross-process collectives
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if os.environ.get("JAX_COORDINATOR_ADDRESS") and os.environ.get("JAX_NUM_PROCESSES"):
    kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(os.environ["JAX_NUM_PROCESSES"]), process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d global devices", jax.process_index(), jax.process_count(),
               jax.device_count())


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  mode = config.get("mode", "train")
  if mode in ("train", "controlnet"):
    check_workdir(_WORKDIR.value)
  if mode == "train":
    maybe_initialize_distributed()
    from meddiff_jax.train import loop

    try:
      loop.validate(config)
    except ValueError as e:  # a config mistake: one line, no traceback
      raise app.UsageError(str(e)) from None
    if config.get("dry_run", False):  # compile on synthetic inputs, print cost and memory, exit
      from meddiff_jax.train import dry_run

      dry_run.run(config)
      return
    loop.train_and_evaluate(config, _WORKDIR.value)
  elif mode == "prepare":
    from meddiff_jax.data import prepare

    try:
      prepare.run(config)
    except (ValueError, FileNotFoundError) as e:  # bad directories / manifest: one line
      raise app.UsageError(str(e)) from None
  elif mode == "controlnet":
    from meddiff_jax.tasks import common

    if not os.path.exists(common.BUILTIN.get(config.base_checkpoint, config.base_checkpoint)):
      raise app.UsageError(f"--config.base_checkpoint={config.base_checkpoint!r} does not exist")
    maybe_initialize_distributed()
    from meddiff_jax.train import controlnet

    controlnet.finetune(config, _WORKDIR.value)
  elif mode in TASKS:
    check_task_config(config)
    import importlib

    result = importlib.import_module(f"meddiff_jax.tasks.{mode}").run(config)
    logging.info("%s: %s", mode, result)
    print(result)
  else:
    raise app.UsageError(f"config.mode={mode!r}; expected train, prepare, controlnet or one of {TASKS}")


def check_workdir(workdir: str | None) -> None:
  if not workdir:
    raise app.UsageError("--workdir=DIR is required")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise app.UsageError(f"--workdir={workdir!r} cannot be created: {e.strerror}") from None
  if not os.access(workdir, os.W_OK):
    raise app.UsageError(f"--workdir={workdir!r} is not writable")


TASKS = ("denoise", "anomaly", "synthesis", "super_resolution", "lesion")


def check_task_config(config) -> None:
  """One-line errors for what would otherwise fail deep inside a task."""
  from meddiff_jax.tasks import common

  if "controlnet" in config:
    if not config.controlnet or not os.path.isdir(os.path.join(config.controlnet, "checkpoints")):
      raise app.UsageError(f"--config.controlnet={config.controlnet!r} is not a ControlNet fine-tuning workdir "
                           "(configs/controlnet.py)")
  else:
    ckpt = common.BUILTIN.get(config.checkpoint, config.checkpoint)
    if not ckpt or not os.path.exists(ckpt):
      raise app.UsageError(f"--config.checkpoint={config.checkpoint!r} does not exist (a training workdir, an "
                           f"exported directory, or one of {sorted(common.BUILTIN)})")
  if "mask" in config and not os.path.isfile(config.mask):
    raise app.UsageError(f"--config.mask={config.mask!r} is not a file")
  if "input" in config and not os.path.isfile(config.input):
    raise app.UsageError(f"--config.input={config.input!r} is not a file")
  if not config.output:
    raise app.UsageError("--config.output=PATH.nii.gz is required")
  out_dir = os.path.dirname(os.path.abspath(config.output))
  os.makedirs(out_dir, exist_ok=True)
  if not os.access(out_dir, os.W_OK):
    raise app.UsageError(f"output directory {out_dir} is not writable")


if __name__ == "__main__":
  app.run(main)
