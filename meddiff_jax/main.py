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
import difflib
import importlib.util
import logging as py_logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import jax
import ml_collections
from absl import app, flags, logging

from meddiff_jax import checkpoint, checks, config_files, pretrained, sections, sharding, storage
from meddiff_jax.data import prepare, volumes
from meddiff_jax.protocols import evaluate
from meddiff_jax.tasks import anomaly, controlled, denoise, synthesis
from meddiff_jax.train import controlnet, dry_run, loop
from meddiff_jax.train.loop import configure_compilation_cache  # shared with api.pretrain / finetune
from meddiff_jax.train.spec import PretrainConfig

Config = ml_collections.ConfigDict

_CONFIG = config_files.define_config_flag(
  "config",
  "A shipped config's name (demo, denoise, pretrain:paper, ...) or a config file's path[:preset].",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (or gs:// / s3:// URL) for logs and checkpoints.")

# Environment variables that mean "this is one process of a multi-process job".
_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES")


def on_cloud_tpu() -> bool:
  """A Cloud TPU VM (any slice size): JAX's own test before it sets a TPU host up (jax._src.cloud_tpu_init,
  private but pinned with jax <0.11): TPU chips on the PCI bus and libtpu installed. JAX_PLATFORMS=cpu opts out."""
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    return False
  try:
    from jax._src import hardware_utils

    chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
  except (ImportError, AttributeError, OSError):
    return False
  return chips > 0 and importlib.util.find_spec("libtpu") is not None


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() on every TPU VM and in every multi-process job, before the backend starts.

  TPU VMs, as maxtext and maxdiffusion do: always, with no arguments (JAX reads the slice from the TPU
  metadata; one process on a single-host slice). It also starts JAX's preemption service, which decides the
  step a preempted run saves (train/loop.PreemptionWatcher). Elsewhere only when the environment describes
  a multi-process job: JAX_COORDINATOR_ADDRESS (host:port) + JAX_NUM_PROCESSES + JAX_PROCESS_ID (the launch/
  scripts set them), a SLURM job with more than one task, or a TPU pod / multi-slice environment.
  """
  if jax.distributed.is_initialized():
    return
  slurm_multi = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  if not (on_cloud_tpu() or slurm_multi or any(os.environ.get(k) for k in _DISTRIBUTED_ENV)):
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


def startup_line(config: PretrainConfig) -> str:
  """Who this process is: index / count, local / global devices, the mesh it will build."""
  mesh = sharding.resolve_mesh_sizes(config.mesh.sizes, jax.device_count())
  return (
    f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local / "
    f"{jax.device_count()} global {jax.devices()[0].platform} devices ({jax.devices()[0].device_kind}); mesh {mesh}"
  )


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
  """A task's run(spec) as a command (the spec: tasks/*.TaskSpec, from checks.task); the task prints its own
  closing summary (tasks/scans.Summary) and writes its sidecar JSON."""

  def run_task(config: Any, workdir: str | None) -> dict:
    del workdir
    result = run(config)
    logging.info("%s: %s", config.mode, result)
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
# a task's input that cannot be used, or a scan it will not process as configured (region, label map on another
# grid: tasks/scans.Refusal, a ConfigError naming the flag)
SCAN_ERRORS = (volumes.VolumeError, sections.ConfigError, FileNotFoundError)
COMMANDS: dict[str, Command] = {
  "train": Command(checks.pretrain, train, workdir=True, distributed=True, user_errors=(checkpoint.UnrestorableError,)),
  "controlnet": Command(
    checks.controlnet, controlnet.finetune, workdir=True, distributed=True, user_errors=(checkpoint.UnrestorableError,)
  ),
  "prepare": Command(checks.prepare, lambda config, workdir: prepare.run(config), user_errors=INPUT_ERRORS),
  "evaluate": Command(checks.evaluate, evaluate.run, workdir=True, user_errors=INPUT_ERRORS),
  "export": Command(checks.export, export),
  "denoise": Command(checks.task, task(denoise.run), user_errors=SCAN_ERRORS),
  "anomaly": Command(checks.task, task(anomaly.run), user_errors=SCAN_ERRORS),
  "synthesis": Command(checks.task, task(synthesis.run), user_errors=SCAN_ERRORS),
  "super_resolution": Command(checks.task, task(controlled.run_super_resolution), user_errors=SCAN_ERRORS),
  "lesion": Command(checks.task, task(controlled.run_lesion), user_errors=SCAN_ERRORS),
}
# What a check may raise: a wrong value, a path that does not exist, a missing gs:// / s3:// extra.
CONFIG_ERRORS = (ValueError, FileNotFoundError, storage.MissingBackendError)


def fail(message: Any) -> NoReturn:
  """The one error path: `error: MESSAGE` (one line) on stderr, exit status 1."""
  sys.exit(f"error: {' '.join(str(message).split())}")


def interrupted(error: KeyboardInterrupt) -> NoReturn:
  """Ctrl-C: one line saying what was left unwritten (a task's own message, tasks/common.Interrupted), exit 130."""
  detail = str(error) or "nothing more was written (a task writes its output only when it is complete)"
  print(f"\ninterrupted: {detail}", file=sys.stderr, flush=True)
  sys.exit(130)


# Cloud client libraries that log their retries with tracebacks (gcsfs: `logger.exception` once out of retries): an
# unreachable gs:// workdir printed a hundred lines before our one-line error, which names the cause. Silent
# unless --verbosity asks for logs.
CLIENT_LOGGERS = (
  "google",
  "google.auth",
  "google.cloud",
  "gcsfs",
  "s3fs",
  "aiobotocore",
  "botocore",
  "urllib3",
  "fsspec",
)


def quiet_client_libraries() -> None:
  for name in CLIENT_LOGGERS:
    py_logging.getLogger(name).setLevel(py_logging.CRITICAL)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # library INFO logs (Orbax, Grain) only when asked: --verbosity=0
    logging.set_verbosity(logging.WARNING)
    quiet_client_libraries()
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
  if command.distributed:
    cache = configure_compilation_cache(config.compilation_cache_dir, workdir)
    # a dry run prints its one JSON line only (for a topology that is not here, the local devices say nothing)
    if not (getattr(config, "dry_run", False) or getattr(config, "dry_run_topology", "")):
      print(startup_line(config) + (f"; compilation cache {cache}" if cache else ""), flush=True)
  try:
    command.run(config, workdir)
  except command.user_errors as e:  # a bad input volume / case / manifest: one line naming the file
    fail(e)
  except KeyboardInterrupt as e:
    if command.distributed:  # training has its own stop (SIGTERM: a final checkpoint); Ctrl-C is Python's there
      raise
    interrupted(e)


def unknown_override(argv: list[str]) -> str | None:
  """For a --config.KEY=VALUE whose KEY the config does not have: 'KEY: no such key in CONFIG; did you mean
  --config.CLOSEST?' (None when every key exists or the config itself does not load)."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return None
  try:
    config = config_files.load(spec)
  except Exception:
    return None
  keys = list(_flat_keys(config.to_dict()))
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    key = arg[len("--config.") :].split("=", 1)[0]
    if key in keys or any(k.startswith(key + ".") for k in keys):
      continue
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)  # the closest valid key
    hint = f"; did you mean --config.{close[0]}?" if close else f"; its keys: {', '.join(keys)}"
    return f"--config.{key}: the {spec} config has no such key{hint}"
  return None


def _flat_keys(tree: dict, prefix: str = ""):
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      yield from _flat_keys(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a flag mistake (an unknown --config name, a bad preset, a misspelt override key: the
  closest valid key is named) on the one error path."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(unknown_override(argv) or e)
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # ml_collections, applying an override
    fail(unknown_override(argv) or f"a --config override could not be applied: {e}")


def run() -> None:
  """The `meddiff` console command ([project.scripts] in pyproject.toml)."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
