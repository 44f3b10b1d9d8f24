"""ControlNet fine-tuning on the frozen pretrained backbone.

meddiff --config=controlnet:sr --workdir=runs/sr \
    --config.base_checkpoint=runs/pretrain        # or an exported dir / 'tiny_phantom'
Presets: sr (condition: the x5 thick-slice volume, RPLHR-CT style), lesion (condition: a lesion mask;
phantom lesions by default). model.*, diffusion.*, data.patch_size and data.use_structures come from the
base checkpoint, and so do data.spacing, structures, structure_groups, class_map and pack_structures ('base'; a
value given must be the base's): main.py derives them once (train/controlnet.derive_config).
"""

import ml_collections

from meddiff_jax import sections
from meddiff_jax.configs import pretrain


def get_config(arg=None):
  task = arg or "sr"
  if task not in ("sr", "lesion"):
    raise ValueError(f"unknown ControlNet preset {task!r}; choose sr or lesion")
  c = pretrain.get_config("tiny")
  c.mode = "controlnet"
  c.task = task
  c.base_checkpoint = "tiny_phantom"
  c.controlnet = ml_collections.ConfigDict(dict(hint_hidden=(16, 16, 32), conditioning_scale=1.0))
  c.data.update(hint="lowres" if task == "sr" else "lesion", sr_factor=5)
  # base: the base checkpoint's grid and structure conditions (train/controlnet.derive_config); a value given for
  # one of these must equal the base's
  c.data.spacing = sections.keyword("base")
  c.data.structures = sections.keyword("base")
  c.data.structure_groups = sections.keyword("base")
  c.data.class_map = sections.keyword("base")
  c.data.pack_structures = sections.keyword("base")
  c.data.phantom.update(
    num_volumes=12, shape=(96, 96, 96), spacing=(3.0, 3.0, 3.0), num_lesions=3 if task == "lesion" else 0
  )
  # crops centred on a lesion voxel with this probability (MONAI RandCropByPosNegLabeld pos=1, neg=1)
  c.data.positive_fraction = 0.5 if task == "lesion" else 0.0
  c.optimizer.update(learning_rate=1e-4, warmup_steps=100, schedule="constant")
  # one param tree {base, controlnet}: the branch trains, the base is frozen (no optimizer state, not
  # checkpointed again). Add e.g. "base/decoder/.*" to also tune the base decoder, or use (".*",).
  c.optimizer.trainable = ("controlnet/.*",)
  c.training.update(batch_size=4, num_steps=10_000, ema_decay=0.999, log_every=50)  # paper: ~10k steps per task
  c.eval.update(every_steps=500, num_batches=2, sample_every_steps=500)  # val loss / previews with the hint
  c.checkpoint.update(every_steps=500)
  return c
