"""tiny_ct: the CPU-sized prior trained on the real CT in ../shared/data (shipped as meddiff_jax/assets/tiny_ct).

Reproduce (README "Checkpoints"; under two hours on a 2-core CPU):
  meddiff --config=prepare --config.input_dir=../shared/data \
      --config.output_dir=STORE --config.manifest=configs/tiny_ct_manifest.csv --config.spacing="(2.0,2.0,2.0)"
  meddiff --config=tiny_ct --workdir=W --config.data.prepared_dir=STORE
  meddiff --config=export --config.source=W --config.output=meddiff_jax/assets/tiny_ct

Training volumes: example_ct (abdomen part, with its TotalSegmentator labels) and aorta_ct_cropped_lps (chest,
no labels). Validation: pulmonary_ct_cropped_lps, the same patient as the aorta crop and overlapping it, so the
validation loss measures fit, not generalisation. The DICOM series example_ct_dicom/ (another patient) is never
trained on: it is the held-out evaluation scan of benchmarks/task_eval.py.
"""

from __future__ import annotations

import ml_collections

from meddiff_jax.configs import pretrain


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = pretrain.get_config("tiny")
  c.preset = "tiny_ct"
  # One level deeper than tiny with 8x larger windows (32^3 at 2 mm: 64 mm of context): what a 2-core CPU
  # trains in under two hours (base_channels=16 measured 6.4 s/step on one core: too slow to converge here).
  c.model.update(
    base_channels=8,
    channel_mult=(1, 2, 2),
    attention_levels=(2,),
    num_head_channels=8,
    pos_num_freqs=4,
    dtype="float32",
  )
  c.data.update(source="prepared", prepared_dir="", patch_size=32, spacing=(2.0, 2.0, 2.0))
  c.optimizer.update(
    learning_rate=1e-3, schedule="cosine", warmup_steps=100, decay_steps=1000, end_lr_factor=0.05, grad_clip_norm=1.0
  )
  c.training.update(batch_size=2, num_steps=1000, ema_decay=0.99, log_every=100)
  c.eval.update(every_steps=500, num_batches=4, num_buckets=4, sample_every_steps=0, sample_steps=20)
  c.checkpoint.update(every_steps=500, keep=2)
  return c
