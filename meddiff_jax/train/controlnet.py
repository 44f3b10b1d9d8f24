"""ControlNet fine-tuning on a pretrained UNet, through the one training loop (train/loop.py).

The params are one tree {'base': pretrained UNet, 'controlnet': branch} (models/controlnet.ControlledUNet).
Which leaves train is config.optimizer.trainable (default: the branch only); the optimizer gives frozen
leaves `set_to_zero` through `optax.partition` (no optimizer state), the step differentiates only the
trainable leaves, and checkpoints leave the frozen base out: on resume it is reloaded from
`base_checkpoint`.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from meddiff_jax import pretrained, sections, storage
from meddiff_jax.data.spec import FROM_SOURCE, DataSpec
from meddiff_jax.train import loop
from meddiff_jax.train.spec import ControlNetConfig

BASE = "base"  # configs/controlnet.py's value of the data keys a branch inherits from its base (INHERITED_DATA)
INHERITED_DATA = ("spacing", "structures", "structure_groups", "class_map", "pack_structures")


def _same(a, b) -> bool:
  """Equal config values; spacings (numbers) to float precision."""
  numbers = lambda v: isinstance(v, tuple) and v and all(isinstance(x, (int, float)) for x in v)
  if numbers(a) and numbers(b):
    return len(a) == len(b) and bool(np.allclose(a, b))
  return a == b


def derive_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The fine-tuning config with the architecture, diffusion and data layout of the base model.

  model, diffusion, data.patch_size and data.use_structures are the base's; the data keys of INHERITED_DATA
  (the grid the base learned and its structure conditions) too where they are 'base' (configs/controlnet.py),
  and a value given for one must equal the base's: a branch on another grid or grouping than its base is refused
  in one line, as is a data source whose own spacing (phantom.spacing, the prepared records') is not the base's.
  Computed once, at the entry point (checks.controlnet, from main.py, before it types the result as a
  train/spec.ControlNetConfig); returns a new config and leaves the argument as it was.
  """
  base = pretrained.read_config(config.base_checkpoint)
  base_data = DataSpec.from_config(base.data)
  derived = ml_collections.ConfigDict(config.to_dict())
  derived.model = base.model
  derived.diffusion = base.diffusion
  derived.data.patch_size = base.data.patch_size
  derived.data.use_structures = base.data.use_structures
  spacing = base_data.training_spacing()
  inherited = {
    "spacing": tuple(spacing) if spacing else base_data.spacing,
    "structures": base_data.structures,
    "structure_groups": base_data.structure_groups,
    "class_map": base_data.class_map,
    "pack_structures": base_data.pack_structures,
  }
  for key in INHERITED_DATA:
    asked, theirs = sections.frozen(config.data[key]), inherited[key]
    if asked == BASE:
      del derived.data[key]  # typed as the keyword's str: set anew with the base's value and type
      derived.data[key] = theirs
    elif not _same(asked, theirs):
      raise sections.ConfigError(
        f"config.data.{key}={asked!r} but the base checkpoint {config.base_checkpoint!r} was trained with "
        f"{theirs!r}: a ControlNet branch trains on its base's grid and structures; leave it at {BASE!r}"
      )
  if spacing:  # what the branch's own data source is at, where that is known
    source = DataSpec.from_config(dict(derived.data.to_dict(), spacing=FROM_SOURCE)).training_spacing()
    if source and not np.allclose(source, spacing):
      where = "config.data.phantom.spacing" if derived.data.source == "phantom" else "the prepared records' spacing"
      raise sections.ConfigError(
        f"{where} is {tuple(source)} mm but the base checkpoint {config.base_checkpoint!r} was trained at "
        f"{tuple(spacing)} mm: a ControlNet branch trains on its base's grid"
      )
  return derived


def trainee(config: ControlNetConfig) -> loop.Trainee:
  pre = pretrained.load(config.base_checkpoint)
  model = pretrained.build_controlled(config.controlnet, pre.spec)
  return loop.Trainee(
    apply_fn=model.apply,
    init_params_fn=pretrained.controlled_init_fn(model, pre.patch_size),
    schedule=pre.schedule,
    init_args=(pre.params,),
    external=("base",),
    metric_prefix="controlnet",
  )


def finetune(config: ControlNetConfig, workdir: str) -> dict[str, float]:
  """Fine-tune (or resume) a ControlNet branch; `config` is the derived one (checks.controlnet)."""
  storage.makedirs(workdir)
  return loop.train_and_evaluate(config, workdir, trainee(config))
