"""Every config kind checked once, at the entry point, before anything is read, compiled or written.

One function per kind, chosen by `config.mode` (main.py's command table): `pretrain`, `controlnet`,
`prepare`, `evaluate`, `export` and `task`. Each returns the typed config the command runs on (for
`controlnet`, the one derived from its base checkpoint) or raises a one-line error naming the key:
ConfigError (a ValueError), FileNotFoundError for paths that do not exist, storage.MissingBackendError for
a missing object-store extra. main.py prints them as `error: ...` and exits 1.

The typed configs are frozen dataclasses of section specs (meddiff_jax/sections.py has the helper): unknown
or missing keys, choices and ranges, and the checks across sections, in their `__post_init__`:
  configs/pretrain.py    train/spec.PretrainConfig: model models/unet3d.UNetSpec, diffusion diffusion/spec.
                         DiffusionSpec, data data/spec.DataSpec, optimizer train/state.OptimizerSpec, training /
                         eval / checkpoint train/spec.*Spec, mesh / sharding sharding.MeshSpec / ShardingSpec
  configs/controlnet.py  train/spec.ControlNetConfig (+ controlnet pretrained.ControlNetSpec)
  a task                 tasks/*.TaskSpec subclasses (TASK_SPECS; input overrides, limits: data/volumes.ReadOptions)
  configs/evaluate.py    protocols/spec.EvaluateSpec        configs/export.py   pretrained.ExportSpec
The specs have no defaults (configs/*.py hold every one). What needs the devices present (the batch against the
mesh) or the disk (paths, checkpoints, writable outputs, object-store extras) is checked here. configs/prepare.py
is checked here and runs on its ConfigDict (data/prepare.py). Library callers that build a config in code
(tests, notebooks) call the same function and pass what it returns to `loop.train_and_evaluate` & co.
This module sits just below main.py: it may import every layer.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections

from meddiff_jax import pretrained, sections, sharding, storage
from meddiff_jax.data import preprocess, regions, volumes
from meddiff_jax.data import store as store_lib
from meddiff_jax.protocols import adapters, paper
from meddiff_jax.protocols.spec import EvaluateSpec
from meddiff_jax.tasks import common, scans
from meddiff_jax.train import controlnet as controlnet_lib
from meddiff_jax.train import tpu_compile
from meddiff_jax.train.spec import ControlNetConfig, PretrainConfig

Config = ml_collections.ConfigDict
ConfigError = sections.ConfigError  # a ValueError: a config mistake, said in one line that names the key


# ------------------------------------------------------------------------------------------------- training


def pretrain(config: Config, num_devices: int | None = None) -> PretrainConfig:
  """configs/pretrain.py, typed; the batch plan is checked against `num_devices` (default: the devices
  present), a gs:// / s3:// prepared store against the installed filesystem extras."""
  return _trainable(PretrainConfig.from_config(config), num_devices)


def _trainable(typed: PretrainConfig, num_devices: int | None) -> PretrainConfig:
  """What a training config needs of this machine: the batch plan for the devices present, its 'auto' values
  chosen (fails here, not after a compile; a dry run for a TPU topology: for that slice's devices) and the
  prepared store's filesystem."""
  if typed.dry_run_topology:
    num_devices = len(tpu_compile.topology_devices(typed.dry_run_topology))
  typed = batch_plan(typed, num_devices or jax.device_count())
  if typed.data.source == "prepared":
    storage.check_backend(typed.data.prepared_dir)  # a gs:// / s3:// store needs its filesystem extra
  if typed.compilation_cache_dir not in ("", "auto"):
    storage.check_backend(typed.compilation_cache_dir)  # a gs:// cache needs its filesystem extra
  return typed


def batch_plan(typed: PretrainConfig | ControlNetConfig, num_devices: int) -> PretrainConfig | ControlNetConfig:
  """`typed` (a PretrainConfig or ControlNetConfig) with the 'auto' mesh.data / grad_accum_steps chosen for
  `num_devices` (sharding.resolve_plan) and the batch plan checked against that mesh: what the run uses."""
  rules = typed.sharding.logical_rules
  accum, sizes = sharding.resolve_plan(
    typed.training.batch_size, typed.training.grad_accum_steps, typed.mesh.sizes, num_devices, rules
  )
  sharding.check_plan(
    typed.training.batch_size, accum, typed.data.patch_size, len(typed.model.channel_mult), sizes, rules
  )
  return dataclasses.replace(
    typed,
    training=dataclasses.replace(typed.training, grad_accum_steps=accum),
    mesh=sharding.MeshSpec(**sizes),
  )


def _pretrained_exists(key: str, path: str) -> None:
  """--config.KEY names a pretrained model: a training workdir, an exported directory or a builtin name."""
  try:
    pretrained.resolve(path)
  except FileNotFoundError:
    raise FileNotFoundError(
      f"--config.{key}={path!r} does not exist (a training workdir, an exported directory, "
      f"or one of {sorted(pretrained.BUILTIN)})"
    ) from None


def _is_controlnet_workdir(path: str) -> bool:
  """A configs/controlnet.py workdir (local or an object-store URL): it has checkpoints/."""
  return bool(path) and storage.isdir(storage.join(path, "checkpoints"))


def controlnet(config: Config, num_devices: int | None = None) -> ControlNetConfig:
  """configs/controlnet.py: the base checkpoint, then the config derived from it (its architecture, diffusion
  and data layout: `train.controlnet.derive_config`, computed here, once), typed and checked like a pretraining
  config."""
  _pretrained_exists("base_checkpoint", config.base_checkpoint)
  return _trainable(ControlNetConfig.from_config(controlnet_lib.derive_config(config)), num_devices)


# ------------------------------------------------------------------------------------------ data, evaluation


def prepare(config: Config) -> Config:
  """configs/prepare.py (the output folder's contents are checked when preparation starts); data/prepare.py
  runs on the ConfigDict."""
  if not config.input_dir or not config.output_dir:
    raise ConfigError("prepare needs --config.input_dir=DIR and --config.output_dir=DIR")
  if not os.path.isdir(config.input_dir):
    raise FileNotFoundError(f"config.input_dir={config.input_dir!r} is not a directory")
  storage.check_backend(config.output_dir)  # a gs:// / s3:// output needs its filesystem extra
  if storage.exists(config.output_dir) and not storage.isdir(config.output_dir):
    raise ConfigError(f"config.output_dir={config.output_dir!r} is a file, not a folder; give a new or empty folder")
  if config.store_format not in ("auto", *store_lib.FORMATS):
    raise ConfigError(f"config.store_format={config.store_format!r}; choose auto or one of {store_lib.FORMATS}")
  if config.store_codec not in store_lib.CODECS:
    raise ConfigError(f"config.store_codec={config.store_codec!r}; choose one of {tuple(store_lib.CODECS)}")
  if any(not isinstance(size, int) or size < 2 for size in config.whole_sizes):
    raise ConfigError(
      f"config.whole_sizes={tuple(config.whole_sizes)!r}; give training patch sizes (integers >= 2), e.g. (128,)"
    )
  if config.default_region not in preprocess.REGIONS + regions.AUTO:
    raise ConfigError(f"config.default_region={config.default_region!r}; choose auto or one of {preprocess.REGIONS}")
  volumes.ReadOptions.from_section(config)
  return config


CONTROLNET_PROTOCOLS = ("super_resolution", "lesion", "inpainting")


def evaluate(config: Config) -> EvaluateSpec:
  """configs/evaluate.py, typed (the cases themselves are read and checked by protocols/datasets.py)."""
  typed = EvaluateSpec.from_config(config)
  if typed.protocol not in paper.PROTOCOLS:
    raise ConfigError(f"--config.protocol={typed.protocol!r}; choose from {sorted(paper.PROTOCOLS)}")
  if typed.protocol in CONTROLNET_PROTOCOLS and not typed.skip_model and not _is_controlnet_workdir(typed.controlnet):
    raise FileNotFoundError(
      f"--config.controlnet={typed.controlnet!r} is not a ControlNet fine-tuning workdir "
      f"(configs/controlnet.py); the {typed.protocol} protocol needs one (or skip_model=True "
      "for the reference rows only)"
    )
  if not typed.skip_model:  # the task config each case runs with: shared options and --config.task typed now
    task_name = adapters.TASK[typed.protocol]
    TASK_SPECS[task_name].from_config(adapters.task_config(typed.protocol, typed))
  return typed


def export(config: Config) -> pretrained.ExportSpec:
  """configs/export.py, typed."""
  typed = pretrained.ExportSpec.from_config(config)
  try:
    pretrained.resolve(typed.source)
  except (FileNotFoundError, storage.MissingBackendError) as e:
    raise FileNotFoundError(f"--config.source: {e}") from None
  if not typed.output:
    raise ConfigError("--config.output=DIR is required")
  try:
    is_dir, exists = storage.isdir(typed.output), storage.exists(typed.output)
  except storage.MissingBackendError as e:
    raise storage.MissingBackendError(f"--config.output: {e}") from None
  if is_dir and storage.glob(storage.join(typed.output, "*")) and not typed.overwrite:
    raise ConfigError(
      f"--config.output={typed.output!r} exists and is not empty; choose a new directory "
      "or pass --config.overwrite=True"
    )
  if exists and not is_dir:
    raise ConfigError(f"--config.output={typed.output!r} is a file, not a directory")
  return typed


# ------------------------------------------------------------------------------------------------- tasks

ZERO_SHOT_TASKS = ("denoise", "anomaly", "synthesis")  # a pretrained model: --config.checkpoint
CONTROLNET_TASKS = ("super_resolution", "lesion")  # a fine-tuning workdir: --config.controlnet
TASKS = ZERO_SHOT_TASKS + CONTROLNET_TASKS
TASK_SPECS = adapters.TASK_SPECS  # task name -> its typed config (tasks/*.py)


def task(config: Config, memory: common.InMemory | None = None) -> common.TaskSpec:
  """configs/{denoise,anomaly,synthesis,super_resolution,lesion}.py: the task's spec (keys, choices, ranges),
  then the paths (the model, the input, the output). Returns the spec. `memory` (meddiff_jax/api.py): what is
  given in memory instead of a path (the CT, the labels) is not looked for on disk, and the output is optional
  (the result is kept in memory)."""
  mode = config.mode
  if mode not in TASKS:
    raise ConfigError(f"config.mode={mode!r} is not a task; choose one of {TASKS}")
  typed = TASK_SPECS[mode].from_config(config)
  if mode in CONTROLNET_TASKS:
    if not _is_controlnet_workdir(typed.controlnet):
      raise FileNotFoundError(
        f"--config.controlnet={typed.controlnet!r} is not a ControlNet fine-tuning workdir (configs/controlnet.py)"
      )
  else:
    _pretrained_exists("checkpoint", typed.checkpoint)
  if mode == "anomaly":  # timesteps of the model's schedule (read from its stored config)
    _within_timesteps("noise_t", typed.noise_t, typed.checkpoint)
  if mode == "lesion":
    _within_timesteps("jump_timesteps", typed.jump_timesteps, typed.controlnet)
  ct_given, labels_given = (memory.ct is not None, memory.labels is not None) if memory else (False, False)
  if mode != "synthesis" and not ct_given and not os.path.exists(typed.input):
    raise FileNotFoundError(f"--config.input={typed.input!r} is not a file or DICOM series folder (does not exist)")
  if mode == "lesion" and not os.path.isfile(typed.mask):
    raise FileNotFoundError(f"--config.mask={typed.mask!r} is not a file")
  if typed.labels and not labels_given and not os.path.exists(typed.labels):
    raise FileNotFoundError(f"--config.labels={typed.labels!r} does not exist")
  if not typed.output and memory is not None:  # the result is kept in memory (meddiff_jax/api.py)
    return typed
  reference = getattr(typed, "reference", "")
  if reference and not os.path.isfile(reference):
    raise FileNotFoundError(f"--config.reference={reference!r} is not a file")
  reads = {"input": getattr(typed, "input", ""), "labels": typed.labels, "mask": getattr(typed, "mask", "")}
  scans.check_output(
    typed.output,
    {**reads, "reference": reference},
    overwrite=typed.overwrite,
    dicom_input=bool(reads["input"]) and scans.is_dicom_input(reads["input"]),
    folder_ok=mode in ("denoise", "anomaly", "lesion"),  # results on the input series' own grid
  )
  return typed


def _within_timesteps(key: str, value: int, model: str) -> None:
  steps = pretrained.read_config(model).diffusion.num_timesteps
  if not 0 < value < steps:
    raise ConfigError(f"--config.{key}={value}; {model!r} has {steps} timesteps: choose 1..{steps - 1}")


def workdir(path: str | None) -> str:
  """--workdir: a local directory or a gs:// / s3:// URL, created and proven writable before anything is compiled."""
  if not path:
    raise ConfigError("--workdir=DIR is required")
  try:
    storage.checkpoint_path(storage.join(path, "checkpoints"))
    storage.makedirs(path)
  except (storage.MissingBackendError, ValueError) as e:
    raise ConfigError(f"--workdir: {e}") from None
  except OSError as e:
    raise ConfigError(f"--workdir={path!r} cannot be created: {e.strerror or e}") from None
  try:
    storage.check_writable(path)
  except OSError as e:
    raise ConfigError(f"--workdir={path!r} is not writable: {e.strerror or e}") from None
  return path
