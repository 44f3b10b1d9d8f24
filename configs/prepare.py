"""Offline data preparation (see meddiff_jax/data/prepare.py).

python -m meddiff_jax.main --config=configs/prepare.py --config.input_dir=IN --config.output_dir=OUT \
    [--config.manifest=manifest.csv] [--config.mask_dir=MASKS] [--config.workers=4]
Then train with --config.data.source=prepared --config.data.prepared_dir=OUT.
"""

from __future__ import annotations

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.mode = "prepare"
  c.input_dir = ""
  c.output_dir = ""
  c.manifest = ""  # CSV/JSON: image, region[, mask][, parent]
  c.mask_dir = ""  # masks with the same file names as the images
  c.exclude = ("*seg*", "*mask*", "*label*")  # file-name patterns that are masks, not images
  c.default_region = "unknown"  # head_neck | chest | abdomen | unknown
  c.spacing = (1.0, 1.0, 1.0)  # mm, the paper's isotropic 1 mm
  c.workers = 2
  c.overwrite = False
  # zarr: chunked + compressed (~4x smaller), windows stream from local disk or gs:// / s3:// (pods);
  # npy: memory-mapped, faster on one host's local disk (benchmarks/RESULTS.md "#12 store")
  c.store_format = "zarr"
  return c
