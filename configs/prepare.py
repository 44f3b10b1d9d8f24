"""Offline data preparation: NIfTI / DICOM series / NRRD / MHA under input_dir -> a prepared store.

meddiff --config=prepare --config.input_dir=IN --config.output_dir=OUT \
    [--config.dataset=NAME] [--config.manifest=manifest.csv] [--config.mask_dir=MASKS] [--config.workers=4]
Then train with --config.data.source=prepared --config.data.prepared_dir=OUT.
NAME (a public dataset as published, docs/datasets.md): totalsegmentator autopet abdomenct1k amos22 btcv chaos
word segthor ct_rate structseg instance2022 hanseg segrap2023, or folder (your scans + TotalSegmentator outputs).
"""

from __future__ import annotations

import ml_collections

from meddiff_jax.configs import input_options


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.mode = "prepare"
  c.input_dir = ""
  c.output_dir = ""
  c.dataset = ""  # a recipe in data/recipes.py builds the manifest from the dataset's layout (OUT/manifest_NAME.csv)
  c.manifest = (
    ""  # CSV/JSON: image, region[, mask][, parent][, lesion][, patient][, split]; paths relative to input_dir
  )
  c.allow_outside_paths = False  # manifest paths outside input_dir are refused unless this is set
  c.mask_dir = ""  # TotalSegmentator outputs: NAME.nii.gz label maps (or, with a dataset recipe, NAME/ folders)
  c.class_map = ""  # class_map json for the masks; default: the embedded TotalSegmentator `total` map
  c.exclude = ("*seg*", "*mask*", "*label*")  # file-name patterns that are masks, not images
  # auto: cut into head_neck / chest / abdomen at TotalSegmentator landmarks (data/regions.py); a scan with
  # neither a region nor a mask is refused (an unlabelled volume must never train the guidance null class).
  c.default_region = "auto"  # auto | head_neck | chest | abdomen
  c.regions = ml_collections.ConfigDict(
    dict(  # landmark margins, data/regions.py SplitConfig
      chest_margin_mm=20.0,
      abdomen_top_margin_mm=20.0,
      abdomen_bottom_margin_mm=10.0,
      head_neck_below_apex_mm=30.0,
      head_top_margin_mm=10.0,
      min_extent_mm=ml_collections.ConfigDict(dict(head_neck=100.0, chest=120.0, abdomen=120.0)),
      min_voxels_per_slice=5,
    )
  )
  c.split_fractions = (0.9, 0.05, 0.05)  # train / val / test by a hash of dataset/patient (the paper's 90/5/5)
  c.split_seed = 0
  c.max_volumes = 0  # >0: a stable hashed subset (ct_rate: the paper used 1,000)
  c.spacing = (1.0, 1.0, 1.0)  # mm, the paper's isotropic 1 mm
  c.workers = 2
  c.overwrite = False
  # zarr: chunked + compressed (~4x smaller), windows stream from local disk or gs:// / s3:// (pods);
  # npy: memory-mapped, 1.3-3.4x more patches/s on one host's local disk (benchmarks/RESULTS.md "#12 store");
  # auto: npy for a local output_dir, zarr for an object-store URL
  c.store_format = "auto"
  # zarr arrays' compression (data/store.py CODECS): blosc_lz4hc reads a zoom2 / patch window with ~40-60% less
  # CPU than zstd (the stores written before, still read) at ~6% more bytes
  # (benchmarks/RESULTS.md "#12 pipeline margin", store codec table)
  c.store_codec = "blosc_lz4hc"  # blosc_lz4hc | blosc_lz4 | blosc_zstd | blosc_zstd1 | zstd | zstd1 | none
  # patch sizes (e.g. (128,)) whose 'whole' multi-level sample is stored per volume (HU resized to float32 + labels
  # resized, as training computes it): whole-volume samples then read 128^3 instead of the whole volume and
  # resize nothing (benchmarks/RESULTS.md "#12 pipeline margin"); training falls back for other patch sizes
  c.whole_sizes = ()
  return input_options.add_input_options(c)
