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
  if mode == "train":
    if not _WORKDIR.value:
      raise app.UsageError("--workdir is required for training")
    maybe_initialize_distributed()
    from meddiff_jax.train import loop

    loop.train_and_evaluate(config, _WORKDIR.value)
  elif mode == "prepare":
    from meddiff_jax.data import prepare

    prepare.run(config)
  else:
    raise app.UsageError(f"config.mode={mode!r}; expected train or prepare")


if __name__ == "__main__":
  app.run(main)
