"""Entry point: `meddiff --config=NAME[:preset] --workdir=DIR --config.key=value` (or `python -m meddiff_jax.main`).

--config takes a shipped config's name (`denoise`, `pretrain:paper`) or a config file's path (`configs/denoise.py`,
`my_run.py:arg`): meddiff_jax/config_files.py.

`config.mode` picks the job: train (pretraining), controlnet (fine-tuning), prepare (offline data
conversion), evaluate (the paper's protocols), export (a training run as config.json + params.msgpack) or one
of the tasks: COMMANDS below is the whole table. Each command's config is checked once, first
(meddiff_jax/checks.py), and the command runs on the typed config the check returns; a config or input mistake
is one line `error: ...` on stderr and exit status 1.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import jax
import ml_collections
from absl import app, flags, logging

from meddiff_jax import checks, config_files, pretrained, storage
from meddiff_jax.data import prepare, volumes
from meddiff_jax.protocols import evaluate
from meddiff_jax.tasks import anomaly, controlled, denoise, synthesis
from meddiff_jax.train import controlnet, dry_run, loop
from meddiff_jax.train.spec import PretrainConfig

_CONFIG = config_files.define_config_flag(
  "config",
  "A shipped config's name (demo, denoise, pretrain:paper, ...) or a config file's path[:preset].",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (or gs:// / s3:// URL) for logs and checkpoints.")

# Environment variables that mean "this is one process of a multi-process job".
_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES")


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() when the environment describes a multi-process job.

  Explicit: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID (launch/ scripts set
  them). Otherwise SLURM (more than one task) and TPU pod environments are auto-detected by JAX.
  """
  slurm_multi = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  if not (slurm_multi or any(os.environ.get(k) for k in _DISTRIBUTED_ENV)):
    return
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":  # CPU processes need gloo for cross-process collectives
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if os.environ.get("JAX_COORDINATOR_ADDRESS") and os.environ.get("JAX_NUM_PROCESSES"):
    kwargs = dict(
      coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
      process_id=int(os.environ["JAX_PROCESS_ID"]),
    )
  jax.distributed.initialize(**kwargs)
  print(
    f"jax.distributed: process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} global devices",
    flush=True,
  )


Config = ml_collections.ConfigDict


def train(config: PretrainConfig, workdir: str) -> Any:
  if config.dry_run or config.dry_run_topology:  # compile on synthetic inputs, print cost and memory, exit
    return dry_run.run(config)
  return loop.train_and_evaluate(config, workdir)


def export(config: pretrained.ExportSpec, workdir: str | None) -> str:
  del workdir
  out = pretrained.export(config.source, config.output)
  print(out)
  return out


def task(run: Callable[[Any], dict]) -> Callable[[Any, str | None], dict]:
  """A task's run(spec) as a command (the spec: tasks/*.TaskSpec, from checks.task)."""

  def run_task(config: Any, workdir: str | None) -> dict:
    del workdir
    result = run(config)
    logging.info("%s: %s", config.mode, result)
    print(result)
    return result

  return run_task


@dataclasses.dataclass(frozen=True)
class Command:
  check: Callable[[Config], Any]  # checks.KIND: the typed config the command runs on, or a one-line error
  run: Callable[[Any, str | None], Any]  # (typed config, workdir)
  workdir: bool = False  # needs --workdir
  distributed: bool = False  # may be one process of a multi-process job (initialised before the check:
  # the batch plan is checked against the global device count)
  user_errors: tuple[type[BaseException], ...] = ()  # raised while running and caused by the user's files


INPUT_ERRORS = (ValueError, FileNotFoundError)  # bad cases / manifests / directories found while reading them
COMMANDS: dict[str, Command] = {
  "train": Command(checks.pretrain, train, workdir=True, distributed=True),
  "controlnet": Command(checks.controlnet, controlnet.finetune, workdir=True, distributed=True),
  "prepare": Command(checks.prepare, lambda config, workdir: prepare.run(config), user_errors=INPUT_ERRORS),
  "evaluate": Command(checks.evaluate, evaluate.run, workdir=True, user_errors=INPUT_ERRORS),
  "export": Command(checks.export, export),
  "denoise": Command(checks.task, task(denoise.run), user_errors=(volumes.VolumeError,)),
  "anomaly": Command(checks.task, task(anomaly.run), user_errors=(volumes.VolumeError,)),
  "synthesis": Command(checks.task, task(synthesis.run), user_errors=(volumes.VolumeError,)),
  "super_resolution": Command(checks.task, task(controlled.run_super_resolution), user_errors=(volumes.VolumeError,)),
  "lesion": Command(checks.task, task(controlled.run_lesion), user_errors=(volumes.VolumeError,)),
}
# What a check may raise: a wrong value, a path that does not exist, a missing gs:// / s3:// extra.
CONFIG_ERRORS = (ValueError, FileNotFoundError, storage.MissingBackendError)


def fail(message: Any) -> NoReturn:
  """The one error path: `error: MESSAGE` (one line) on stderr, exit status 1."""
  sys.exit(f"error: {message}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # library INFO logs (Orbax, Grain) only when asked: --verbosity=0
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if config is None:
    fail(f"--config is required, e.g. --config=demo; the shipped configs: {', '.join(config_files.names())}")
  command = COMMANDS.get(config.mode)
  if command is None:
    fail(f"config.mode={config.mode!r}; choose one of {list(COMMANDS)}")
  workdir = _WORKDIR.value
  try:
    if command.workdir:
      checks.workdir(workdir)
    if command.distributed:
      maybe_initialize_distributed()
    config = command.check(config)
  except CONFIG_ERRORS as e:
    fail(e)
  try:
    command.run(config, workdir)
  except command.user_errors as e:  # a bad input volume / case / manifest: one line naming the file
    fail(e)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a flag mistake (an unknown --config name, a bad preset) on the one error path."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(e)


def run() -> None:
  """The `meddiff` console command ([project.scripts] in pyproject.toml)."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
