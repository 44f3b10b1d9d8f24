"""Entry point: `python -m meddiff_jax.main --config=configs/NAME.py[:preset] --workdir=DIR --config.key=value`.

`config.mode` picks the job: train (pretraining), controlnet (fine-tuning), prepare (offline data
conversion), export (a training run as config.json + params.msgpack) or one of the TASKS.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from meddiff_jax import storage

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, optionally :preset.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (or gs:// / s3:// URL) for logs and checkpoints.")

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
  print(f"jax.distributed: process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} global "
        "devices", flush=True)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # library INFO logs (Orbax, Grain) only when asked: --verbosity=0
    logging.set_verbosity(logging.WARNING)
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
      if config.data.source == "prepared":  # a gs:// / s3:// store needs its filesystem extra
        storage.check_backend(config.data.prepared_dir)
    except (ValueError, storage.MissingBackendError) as e:  # a config mistake: one line, no traceback
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
    except (ValueError, FileNotFoundError) as e:  # bad directories / manifest / nothing prepared: one line, exit 1
      sys.exit(f"error: {e}")
  elif mode == "controlnet":
    from meddiff_jax import pretrained

    try:
      pretrained.resolve(config.base_checkpoint)
    except FileNotFoundError:
      raise app.UsageError(f"--config.base_checkpoint={config.base_checkpoint!r} does not exist") from None
    except storage.MissingBackendError as e:
      raise app.UsageError(f"--config.base_checkpoint: {e}") from None
    maybe_initialize_distributed()
    from meddiff_jax.train import controlnet, loop

    config = controlnet.derive_config(config)  # the base's architecture: computed once, here
    try:
      controlnet.validate(config)
      loop.validate(config)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    controlnet.finetune(config, _WORKDIR.value)
  elif mode == "evaluate":  # the paper's evaluation protocols (configs/evaluate.py)
    check_workdir(_WORKDIR.value)
    from meddiff_jax.benchmarking import run as evaluate

    try:
      evaluate.run(config, _WORKDIR.value)
    except (ValueError, FileNotFoundError) as e:  # bad cases / files / plug-ins: one line
      raise app.UsageError(str(e)) from None
  elif mode == "export":
    from meddiff_jax import pretrained

    check_export_config(config)
    print(pretrained.export(config.source, config.output))
  elif mode in TASKS:
    check_task_config(config)
    import importlib

    from meddiff_jax.data import nifti

    try:
      result = importlib.import_module(f"meddiff_jax.tasks.{mode}").run(config)
    except nifti.VolumeError as e:  # a bad input volume: one line naming the file and the problem, exit 1
      sys.exit(f"error: {e}")
    logging.info("%s: %s", mode, result)
    print(result)
  else:
    raise app.UsageError(f"config.mode={mode!r}; expected train, prepare, controlnet, evaluate, export or one of {TASKS}")


def check_workdir(workdir: str | None) -> None:
  """A local directory or a gs:// / s3:// URL, created and proven writable before anything is compiled."""
  if not workdir:
    raise app.UsageError("--workdir=DIR is required")
  try:
    storage.checkpoint_path(storage.join(workdir, "checkpoints"))
    storage.makedirs(workdir)
  except (storage.MissingBackendError, ValueError) as e:
    raise app.UsageError(f"--workdir: {e}") from None
  except OSError as e:
    raise app.UsageError(f"--workdir={workdir!r} cannot be created: {e.strerror or e}") from None
  try:
    storage.check_writable(workdir)
  except OSError as e:
    raise app.UsageError(f"--workdir={workdir!r} is not writable: {e.strerror or e}") from None


def check_export_config(config) -> None:
  from meddiff_jax import pretrained

  try:
    pretrained.resolve(config.source)
  except (FileNotFoundError, storage.MissingBackendError) as e:
    raise app.UsageError(f"--config.source: {e}") from None
  if not config.output:
    raise app.UsageError("--config.output=DIR is required")
  try:
    is_dir, exists = storage.isdir(config.output), storage.exists(config.output)
  except storage.MissingBackendError as e:
    raise app.UsageError(f"--config.output: {e}") from None
  if is_dir and storage.glob(storage.join(config.output, "*")) and not config.overwrite:
    raise app.UsageError(f"--config.output={config.output!r} exists and is not empty; choose a new directory "
                         "or pass --config.overwrite=True")
  if exists and not is_dir:
    raise app.UsageError(f"--config.output={config.output!r} is a file, not a directory")


TASKS = ("denoise", "anomaly", "synthesis", "super_resolution", "lesion")


def check_task_config(config) -> None:
  """One-line errors for what would otherwise fail deep inside a task."""
  from meddiff_jax import pretrained

  if "controlnet" in config:
    if not config.controlnet or not storage.isdir(storage.join(config.controlnet, "checkpoints")):
      raise app.UsageError(f"--config.controlnet={config.controlnet!r} is not a ControlNet fine-tuning workdir "
                           "(configs/controlnet.py)")
  else:
    try:
      pretrained.resolve(config.checkpoint)
    except FileNotFoundError:
      raise app.UsageError(f"--config.checkpoint={config.checkpoint!r} does not exist (a training workdir, an "
                           f"exported directory, or one of {sorted(pretrained.BUILTIN)})") from None
    except storage.MissingBackendError as e:
      raise app.UsageError(f"--config.checkpoint: {e}") from None
  if "mask" in config and not os.path.isfile(config.mask):
    raise app.UsageError(f"--config.mask={config.mask!r} is not a file")
  if "input" in config and not os.path.exists(config.input):
    raise app.UsageError(f"--config.input={config.input!r} is not a file or DICOM series folder (does not exist)")
  if not config.output:
    raise app.UsageError("--config.output=PATH.nii.gz (or DIR/ for a DICOM series) is required")
  out_dir = os.path.dirname(os.path.abspath(config.output))
  os.makedirs(out_dir, exist_ok=True)
  if not os.access(out_dir, os.W_OK):
    raise app.UsageError(f"output directory {out_dir} is not writable")


if __name__ == "__main__":
  app.run(main)
