"""ControlNet fine-tuning on a pretrained UNet, through the one training loop (train/loop.py).

The params are one tree {'base': pretrained UNet, 'controlnet': branch} (models/controlnet.ControlledUNet).
Which leaves train is config.optimizer.trainable (default: the branch only); the optimizer gives frozen
leaves `set_to_zero` through `optax.partition` (no optimizer state), the step differentiates only the
trainable leaves, and checkpoints leave the frozen base out: on resume it is reloaded from
`base_checkpoint`.
"""

from __future__ import annotations

import ml_collections

from meddiff_jax import pretrained, storage
from meddiff_jax.train import loop
from meddiff_jax.train.spec import ControlNetConfig


def derive_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The fine-tuning config with the architecture, diffusion and data layout of the base model.

  Computed once, at the entry point (checks.controlnet, from main.py, before it types the result as a
  train/spec.ControlNetConfig); returns a new config and leaves the argument as it was.
  """
  base = pretrained.read_config(config.base_checkpoint)
  derived = ml_collections.ConfigDict(config.to_dict())
  derived.model = base.model
  derived.diffusion = base.diffusion
  derived.data.patch_size = base.data.patch_size
  derived.data.use_structures = base.data.use_structures
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
