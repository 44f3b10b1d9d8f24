"""Every config kind checked once, at the entry point, before anything is read, compiled or written.

One function per kind, chosen by `config.mode` (main.py's command table): `pretrain`, `controlnet`,
`prepare`, `evaluate`, `export` and `task`. Each returns the config the command runs with (for
`controlnet`, the one derived from its base checkpoint) or raises a one-line error naming the key:
ConfigError (a ValueError), FileNotFoundError for paths that do not exist, storage.MissingBackendError for
a missing object-store extra. main.py prints them as `error: ...` and exits 1.

Each config section is typed by a frozen dataclass beside the module that consumes it, built here once
per command: unknown or missing keys, choices and ranges (meddiff_jax/sections.py has the helper):
  model        models/unet3d.UNetSpec            diffusion   diffusion/spec.DiffusionSpec
  data         data/pipeline.DataSpec            optimizer   train/state.OptimizerSpec
  training / eval / checkpoint   train/loop.TrainingSpec / EvalSpec / CheckpointSpec
  mesh / sharding                sharding.MeshSpec / ShardingSpec
  controlnet   pretrained.ControlNetSpec         a task      tasks/*.TaskSpec subclasses (TASK_SPECS)
  limits and input overrides     data/volumes.ReadOptions.from_section (tasks and prepare)
The specs have no defaults (configs/*.py hold every one). What involves two sections (patch size vs UNet
depth, structure channels vs the data, the batch against the mesh of the devices present, preview steps vs
the diffusion steps) and what touches the disk (paths, checkpoints, writable outputs) is checked here.
The consumers keep reading the ConfigDict. Library callers that build a config in code (tests, notebooks)
call the same function before `loop.train_and_evaluate` & co., which do not check again.
This module sits just below main.py: it may import every layer.
"""

from __future__ import annotations

import os

import jax
import ml_collections

from meddiff_jax import pretrained, sections, sharding, storage
from meddiff_jax.data import pipeline, preprocess, regions, volumes
from meddiff_jax.data import store as store_lib
from meddiff_jax.diffusion import spec as diffusion_spec
from meddiff_jax.models import unet3d
from meddiff_jax.protocols import adapters, paper
from meddiff_jax.tasks import anomaly, controlled, denoise, synthesis
from meddiff_jax.train import controlnet as controlnet_lib
from meddiff_jax.train import loop
from meddiff_jax.train import state as state_lib

Config = ml_collections.ConfigDict
ConfigError = sections.ConfigError  # a ValueError: a config mistake, said in one line that names the key


# ------------------------------------------------------------------------------------------------- training


def pretrain(config: Config, num_devices: int | None = None) -> Config:
  """configs/pretrain.py (and the training part of a derived ControlNet config). The batch plan is checked
  against `num_devices` (default: the devices present)."""
  data, model, train = config.data, config.model, config.training
  try:
    unet3d.UNetSpec.from_config(model, data.patch_size)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  diffusion = diffusion_spec.DiffusionSpec.from_config(config.diffusion)
  pipeline.DataSpec.from_config(data)
  state_lib.OptimizerSpec.from_config(config.optimizer)
  loop.TrainingSpec.from_config(train)
  evaluation = loop.EvalSpec.from_config(config.eval)
  loop.CheckpointSpec.from_config(config.checkpoint)
  sharding.MeshSpec.from_config(config.mesh)
  sharding.ShardingSpec.from_config(config.sharding)
  sections.count("config.seed", config.seed, 0)
  sections.flag("config.dry_run", config.dry_run)
  sections.flag("config.restore", config.restore)
  sections.text("config.compilation_cache_dir", config.compilation_cache_dir)
  if config.compilation_cache_dir not in ("", "auto"):
    storage.check_backend(config.compilation_cache_dir)  # a gs:// cache needs its filesystem extra
  # across sections
  if evaluation.sample_every_steps and evaluation.sample_steps > diffusion.num_timesteps:
    raise ConfigError(
      f"config.eval.sample_steps={evaluation.sample_steps} exceeds config.diffusion.num_timesteps="
      f"{diffusion.num_timesteps}; choose 1..{diffusion.num_timesteps}"
    )
  if evaluation.every_steps and evaluation.num_buckets > diffusion.num_timesteps:
    raise ConfigError(
      f"config.eval.num_buckets={evaluation.num_buckets} exceeds config.diffusion.num_timesteps="
      f"{diffusion.num_timesteps}"
    )
  expected = pipeline.structure_channel_count(data)
  if model.structure_channels != expected:
    raise ConfigError(
      f"config.model.structure_channels={model.structure_channels} but the data gives {expected} "
      f"structure channels (data.use_structures={data.use_structures}, "
      f"data.structures={data.structures!r})"
    )
  if data.use_structures and pipeline.structures_as_labels(data):
    ids = pipeline.structure_lut(data)[1] + 2  # background, classes, body
    if not model.structure_embed_dim or model.num_structure_ids != ids:
      raise ConfigError(
        f"data.structures='classes' needs model.structure_embed_dim > 0 and model.num_structure_ids="
        f"{ids} (got {model.structure_embed_dim}, {model.num_structure_ids}); "
        "use configs/pretrain.py:PRESET+classes"
      )
  factor = 2 ** (len(model.channel_mult) - 1)
  if data.patch_size % factor:
    raise ConfigError(
      f"config.data.patch_size={data.patch_size} must be divisible by {factor} "
      f"(2^(levels-1) for channel_mult={tuple(model.channel_mult)})"
    )
  # The batch plan against the mesh of the devices present: fails here, not after a compile.
  sharding.check_plan(
    train.batch_size,
    train.grad_accum_steps,
    data.patch_size,
    len(model.channel_mult),
    sharding.resolve_mesh_sizes(dict(config.mesh), num_devices or jax.device_count()),
    sharding.rules_from_config(config.sharding.rules),
  )
  if data.source == "prepared":
    if not data.prepared_dir:
      raise ConfigError(
        "config.data.source='prepared' needs --config.data.prepared_dir=DIR "
        "(make one with configs/prepare.py), or use --config.data.source=phantom"
      )
    storage.check_backend(data.prepared_dir)  # a gs:// / s3:// store needs its filesystem extra
  return config


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


def controlnet(config: Config, num_devices: int | None = None) -> Config:
  """configs/controlnet.py: the user's choices, then the config derived from the base checkpoint (its
  architecture, diffusion and data layout: `train.controlnet.derive_config`, computed here, once),
  checked like a pretraining config. Returns the derived config."""
  _pretrained_exists("base_checkpoint", config.base_checkpoint)
  if config.task not in controlnet_lib.HINTS:
    raise ConfigError(f"config.task={config.task!r}; choose one of {tuple(controlnet_lib.HINTS)}")
  if config.data.hint != controlnet_lib.HINTS[config.task]:
    raise ConfigError(
      f"config.data.hint={config.data.hint!r} but task {config.task!r} is conditioned on "
      f"{controlnet_lib.HINTS[config.task]!r}"
    )
  pretrained.ControlNetSpec.from_config(config.controlnet)
  return pretrain(controlnet_lib.derive_config(config), num_devices)


# ------------------------------------------------------------------------------------------ data, evaluation


def prepare(config: Config) -> Config:
  """configs/prepare.py (the output folder's contents are checked when preparation starts)."""
  if not config.input_dir or not config.output_dir:
    raise ConfigError("prepare needs --config.input_dir=DIR and --config.output_dir=DIR")
  if not os.path.isdir(config.input_dir):
    raise FileNotFoundError(f"config.input_dir={config.input_dir!r} is not a directory")
  storage.check_backend(config.output_dir)  # a gs:// / s3:// output needs its filesystem extra
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


def evaluate(config: Config) -> Config:
  """configs/evaluate.py (the cases themselves are read and checked by protocols/datasets.py)."""
  if config.protocol not in paper.PROTOCOLS:
    raise ConfigError(f"--config.protocol={config.protocol!r}; choose from {sorted(paper.PROTOCOLS)}")
  if (
    config.protocol in CONTROLNET_PROTOCOLS and not config.skip_model and not _is_controlnet_workdir(config.controlnet)
  ):
    raise FileNotFoundError(
      f"--config.controlnet={config.controlnet!r} is not a ControlNet fine-tuning workdir "
      f"(configs/controlnet.py); the {config.protocol} protocol needs one (or skip_model=True "
      "for the reference rows only)"
    )
  if not config.skip_model:  # the task config each case runs with: shared options and --config.task typed now
    task_name = adapters.TASK[config.protocol]
    TASK_SPECS[task_name].from_config(adapters.task_config(config.protocol, config))
  return config


def export(config: Config) -> Config:
  """configs/export.py."""
  try:
    pretrained.resolve(config.source)
  except (FileNotFoundError, storage.MissingBackendError) as e:
    raise FileNotFoundError(f"--config.source: {e}") from None
  if not config.output:
    raise ConfigError("--config.output=DIR is required")
  try:
    is_dir, exists = storage.isdir(config.output), storage.exists(config.output)
  except storage.MissingBackendError as e:
    raise storage.MissingBackendError(f"--config.output: {e}") from None
  if is_dir and storage.glob(storage.join(config.output, "*")) and not config.overwrite:
    raise ConfigError(
      f"--config.output={config.output!r} exists and is not empty; choose a new directory "
      "or pass --config.overwrite=True"
    )
  if exists and not is_dir:
    raise ConfigError(f"--config.output={config.output!r} is a file, not a directory")
  return config


# ------------------------------------------------------------------------------------------------- tasks

ZERO_SHOT_TASKS = ("denoise", "anomaly", "synthesis")  # a pretrained model: --config.checkpoint
CONTROLNET_TASKS = ("super_resolution", "lesion")  # a fine-tuning workdir: --config.controlnet
TASKS = ZERO_SHOT_TASKS + CONTROLNET_TASKS
TASK_SPECS = {
  "denoise": denoise.DenoiseSpec,
  "anomaly": anomaly.AnomalySpec,
  "synthesis": synthesis.SynthesisSpec,
  "super_resolution": controlled.SuperResolutionSpec,
  "lesion": controlled.LesionSpec,
}


def task(config: Config) -> Config:
  """configs/{denoise,anomaly,synthesis,super_resolution,lesion}.py: the task's spec (keys, choices, ranges),
  then the paths (the model, the input, the output)."""
  mode = config.mode
  if mode not in TASKS:
    raise ConfigError(f"config.mode={mode!r} is not a task; choose one of {TASKS}")
  TASK_SPECS[mode].from_config(config)
  if mode in CONTROLNET_TASKS:
    if not _is_controlnet_workdir(config.controlnet):
      raise FileNotFoundError(
        f"--config.controlnet={config.controlnet!r} is not a ControlNet fine-tuning workdir (configs/controlnet.py)"
      )
  else:
    _pretrained_exists("checkpoint", config.checkpoint)
  if mode != "synthesis" and not os.path.exists(config.input):
    raise FileNotFoundError(f"--config.input={config.input!r} is not a file or DICOM series folder (does not exist)")
  if mode == "lesion" and not os.path.isfile(config.mask):
    raise FileNotFoundError(f"--config.mask={config.mask!r} is not a file")
  if config.labels and not os.path.exists(config.labels):
    raise FileNotFoundError(f"--config.labels={config.labels!r} does not exist")
  if not config.output:
    raise ConfigError("--config.output=PATH.nii.gz (or DIR/ for a DICOM series) is required")
  out_dir = os.path.dirname(os.path.abspath(config.output))
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"output directory {out_dir} cannot be created: {e.strerror or e}") from None
  if not os.access(out_dir, os.W_OK):
    raise ConfigError(f"output directory {out_dir} is not writable")
  return config


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
