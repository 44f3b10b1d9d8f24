"""The training commands' typed configs: `PretrainConfig` (configs/pretrain.py) and `ControlNetConfig`
(configs/controlnet.py, once derived from its base checkpoint), each the section specs of its config plus the
checks that span sections; and the specs of the sections only training has (training, eval, checkpoint).

checks.pretrain / checks.controlnet build them once, at the entry point, and add what needs the devices or
the disk (the batch plan against the mesh, the store's filesystem, the base checkpoint); the loop, the step,
the dry run and the ControlNet trainee run on them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from meddiff_jax import checkpoint, pretrained, sections, sharding
from meddiff_jax.data.spec import DataSpec
from meddiff_jax.diffusion.spec import DiffusionSpec
from meddiff_jax.models import conditions
from meddiff_jax.models.unet3d import UNetSpec
from meddiff_jax.train.state import OptimizerSpec

HINTS = {"sr": "lowres", "lesion": "lesion"}  # ControlNet config.task -> the condition volume (config.data.hint)


@dataclasses.dataclass(frozen=True)
class TrainingSpec:
  """config.training (the batch against the mesh is sharding.check_plan's, in checks.py)."""

  batch_size: int
  grad_accum_steps: int | str  # 'auto': a number for the devices, chosen by checks.batch_plan
  num_steps: int
  ema_decay: float
  log_every: int  # 0: off (itstime)
  max_consecutive_nan: int
  profile_steps: int

  def __post_init__(self):
    key = "config.training."
    sections.count(key + "batch_size", self.batch_size)
    sections.keyword_or(key + "grad_accum_steps", self.grad_accum_steps, (sharding.AUTO,), sections.count)
    sections.count(key + "num_steps", self.num_steps)
    sections.fraction(key + "ema_decay", self.ema_decay)
    sections.count(key + "log_every", self.log_every, 0)
    sections.count(key + "max_consecutive_nan", self.max_consecutive_nan)
    sections.count(key + "profile_steps", self.profile_steps, 0)

  @classmethod
  def from_config(cls, section: Any) -> TrainingSpec:
    return sections.from_config(cls, section, "config.training")


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """config.eval (against the diffusion steps: PretrainConfig)."""

  every_steps: int  # 0: off
  num_batches: int
  num_buckets: int
  sample_every_steps: int  # 0: off
  sample_steps: int

  def __post_init__(self):
    key = "config.eval."
    sections.count(key + "every_steps", self.every_steps, 0)
    sections.count(key + "num_batches", self.num_batches)
    sections.count(key + "num_buckets", self.num_buckets)
    sections.count(key + "sample_every_steps", self.sample_every_steps, 0)
    sections.count(key + "sample_steps", self.sample_steps)

  @classmethod
  def from_config(cls, section: Any) -> EvalSpec:
    return sections.from_config(cls, section, "config.eval")


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
  """config.checkpoint."""

  every_steps: int  # 0: off (itstime)
  keep: int
  asynchronous: bool
  on_unrestorable: str  # checkpoint.ON_UNRESTORABLE: fail | start_fresh

  def __post_init__(self):
    key = "config.checkpoint."
    sections.count(key + "every_steps", self.every_steps, 0)
    sections.count(key + "keep", self.keep)
    sections.flag(key + "asynchronous", self.asynchronous)
    sections.choice(key + "on_unrestorable", self.on_unrestorable, checkpoint.ON_UNRESTORABLE)

  @classmethod
  def from_config(cls, section: Any) -> CheckpointSpec:
    return sections.from_config(cls, section, "config.checkpoint")


SECTIONS = {
  "model": UNetSpec.from_config,
  "diffusion": DiffusionSpec.from_config,
  "data": DataSpec.from_config,
  "optimizer": OptimizerSpec.from_config,
  "training": TrainingSpec.from_config,
  "eval": EvalSpec.from_config,
  "checkpoint": CheckpointSpec.from_config,
  "mesh": sharding.MeshSpec.from_config,
  "sharding": sharding.ShardingSpec.from_config,
}


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """configs/pretrain.py, typed: its top-level keys, one spec per section, and the checks across sections
  (patch size vs the UNet depth, structure channels vs the data, preview steps vs the diffusion steps)."""

  MODE: ClassVar[str] = "train"
  mode: str
  preset: str
  seed: int
  dry_run: bool  # compile the train step on synthetic inputs, print its cost, exit (train/dry_run.py)
  dry_run_topology: str  # '' or a TPU slice name (v5p:4x4x4): the dry run compiles for it (train/tpu_compile.py)
  restore: bool  # resume from the newest checkpoint in WORKDIR/checkpoints that restores
  compilation_cache_dir: str  # auto (WORKDIR/compilation_cache on accelerators, off on CPU) | '' (off) | a path
  model: UNetSpec
  diffusion: DiffusionSpec
  data: DataSpec
  optimizer: OptimizerSpec
  training: TrainingSpec
  eval: EvalSpec
  checkpoint: CheckpointSpec
  mesh: sharding.MeshSpec
  sharding: sharding.ShardingSpec

  def __post_init__(self):
    sections.choice("config.mode", self.mode, (self.MODE,))
    sections.text("config.preset", self.preset)
    sections.count("config.seed", self.seed, 0)
    sections.flag("config.dry_run", self.dry_run)
    if not isinstance(self.dry_run_topology, str):
      raise sections.ConfigError(
        f"config.dry_run_topology={self.dry_run_topology!r}; must be '' or a TPU slice name such as 'v5p:4x4x4'"
      )
    sections.flag("config.restore", self.restore)
    sections.text("config.compilation_cache_dir", self.compilation_cache_dir)
    data, model, evaluation, steps = self.data, self.model, self.eval, self.diffusion.num_timesteps
    if evaluation.sample_every_steps and evaluation.sample_steps > steps:
      raise sections.ConfigError(
        f"config.eval.sample_steps={evaluation.sample_steps} exceeds config.diffusion.num_timesteps={steps}; "
        f"choose 1..{steps}"
      )
    if evaluation.every_steps and evaluation.num_buckets > steps:
      raise sections.ConfigError(
        f"config.eval.num_buckets={evaluation.num_buckets} exceeds config.diffusion.num_timesteps={steps}"
      )
    if model.structure_channels != data.structure_channel_count:
      raise sections.ConfigError(
        f"config.model.structure_channels={model.structure_channels} but the data gives "
        f"{data.structure_channel_count} structure channels (data.use_structures={data.use_structures}, "
        f"data.structures={data.structures!r})"
      )
    if data.use_structures and data.structures_as_labels:
      ids = data.structure_lut()[1] + 2  # background, classes, body
      if ids > conditions.MAX_LABEL_IDS:
        raise sections.ConfigError(
          f"data.structures='classes' with {ids - 2} classes: one label-id channel holds at most "
          f"{conditions.MAX_LABEL_IDS - 2} (its high bit is the body mask); use data.structures='grouped'"
        )
      if not model.structure_embed_dim or model.num_structure_ids != ids:
        raise sections.ConfigError(
          f"data.structures='classes' needs model.structure_embed_dim > 0 and model.num_structure_ids={ids} "
          f"(got {model.structure_embed_dim}, {model.num_structure_ids}); use configs/pretrain.py:PRESET+classes"
        )
    factor = 2 ** (len(model.channel_mult) - 1)
    if data.patch_size % factor:
      raise sections.ConfigError(
        f"config.data.patch_size={data.patch_size} must be divisible by {factor} "
        f"(2^(levels-1) for channel_mult={model.channel_mult})"
      )
    if data.source == "prepared" and not data.prepared_dir:
      raise sections.ConfigError(
        "config.data.source='prepared' needs --config.data.prepared_dir=DIR "
        "(make one with configs/prepare.py), or use --config.data.source=phantom"
      )

  @classmethod
  def from_config(cls, config: Any) -> PretrainConfig:
    return sections.from_config(cls, config, "config", nested=SECTIONS)

  def stored(self, spacing: tuple[float, float, float] | None) -> dict[str, Any]:
    """The config saved with every checkpoint (and shown in TensorBoard): this one, with data.spacing the
    spacing training runs at (`DataSpec.training_spacing`; 'source' when unknown), so a task knows the scale
    the network learned (pretrained.read_config reads it back)."""
    config = sections.to_dict(self)
    config["data"]["spacing"] = list(spacing) if spacing else self.data.spacing
    return config


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(PretrainConfig):
  """configs/controlnet.py derived from its base checkpoint (train/controlnet.derive_config: model, diffusion,
  data.patch_size, use_structures, spacing, structures, structure_groups, class_map and pack_structures are the
  base's), typed: a training config plus the branch."""

  MODE: ClassVar[str] = "controlnet"
  task: str  # sr | lesion: which condition volume (HINTS)
  base_checkpoint: str  # a pretrained model (pretrained.resolve; checked in checks.py)
  controlnet: pretrained.ControlNetSpec

  def __post_init__(self):
    super().__post_init__()
    if self.dry_run or self.dry_run_topology:  # it would train instead
      raise sections.ConfigError(
        "config.dry_run / config.dry_run_topology: dry runs compile pretraining only (configs/pretrain.py)"
      )
    sections.choice("config.task", self.task, tuple(HINTS))
    if self.data.hint != HINTS[self.task]:
      raise sections.ConfigError(
        f"config.data.hint={self.data.hint!r} but task {self.task!r} is conditioned on {HINTS[self.task]!r}"
      )
    sections.text("config.base_checkpoint", self.base_checkpoint)

  @classmethod
  def from_config(cls, config: Any) -> ControlNetConfig:
    nested = dict(SECTIONS, controlnet=pretrained.ControlNetSpec.from_config)
    return sections.from_config(cls, config, "config", nested=nested)
