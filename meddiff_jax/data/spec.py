"""config.data, typed, and what follows from it: the structure conditions (class map, label -> group lookup,
channel counts, packing), the training spacing and the multi-level sample layout.

The Grain pipeline (data/pipeline.py), the jitted train step, the tasks (through a checkpoint's stored
config) and checks.py all read these from a DataSpec; nothing else decides them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from meddiff_jax import sections
from meddiff_jax.data import multilevel, preprocess

STRUCTURE_MODES = ("grouped", "classes")  # config.data.structures
SOURCES = ("phantom", "prepared")  # config.data.source
FROM_SOURCE = "source"  # config.data.spacing: the one spacing of the source's volumes (phantom or records)


@dataclasses.dataclass(frozen=True)
class PhantomSpec:
  """config.data.phantom: the synthetic volumes of data.source='phantom' (PhantomStore's arguments)."""

  num_volumes: int
  shape: tuple[int, int, int]
  spacing: tuple[float, float, float]
  seed: int
  num_lesions: int

  def __post_init__(self):
    key = "config.data.phantom."
    sections.count(key + "num_volumes", self.num_volumes)
    sections.sizes(key + "shape", self.shape, integer=True)
    sections.sizes(key + "spacing", self.spacing)
    sections.count(key + "seed", self.seed, 0)
    sections.count(key + "num_lesions", self.num_lesions, 0)

  @classmethod
  def from_config(cls, section: Any) -> PhantomSpec:
    return sections.from_config(cls, section, "config.data.phantom")


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """config.data, typed. Checks that involve other sections (patch size vs the UNet depth, structure channels
  vs the model) are the whole training config's (train/spec.PretrainConfig)."""

  source: str
  prepared_dir: str
  class_map: str  # a class_map json; '' (none given): the embedded TotalSegmentator map
  patch_size: int
  spacing: tuple[float, float, float] | str  # mm, or 'source' (`training_spacing`)
  use_structures: bool
  structures: str
  structure_groups: tuple[tuple[str, tuple[str, ...]], ...]
  operation_probs: tuple[float, float, float]
  num_threads: int | str  # 'auto': data/workers.py
  prefetch: int | str
  worker_count: int | str
  numpy_huge_pages: bool  # numpy's transparent huge pages in the processes that make batches (data/workers.py)
  val_fraction: float
  hint: str
  sr_factor: int
  positive_fraction: float
  pack_structures: bool  # grouped structures ship as one uint8 channel, expanded on the accelerator
  decode_on_device: bool  # samples ship HU and label codes; the accelerator windows, groups, packs (data/decode.py)
  resize_on_device: bool  # and zoom2's 2P^3 window ships as read, resized on the accelerator
  phantom: PhantomSpec

  def __post_init__(self):
    key = "config.data."
    sections.choice(key + "source", self.source, SOURCES)
    sections.text(key + "prepared_dir", self.prepared_dir)
    sections.text(key + "class_map", self.class_map)
    sections.count(key + "patch_size", self.patch_size)
    sections.keyword_or(key + "spacing", self.spacing, (FROM_SOURCE,), sections.sizes)
    sections.flag(key + "use_structures", self.use_structures)
    sections.choice(key + "structures", self.structures, STRUCTURE_MODES)
    if not all(
      isinstance(g, tuple)
      and len(g) == 2
      and isinstance(g[0], str)
      and isinstance(g[1], tuple)
      and all(isinstance(p, str) for p in g[1])
      for g in self.structure_groups
    ):
      raise sections.ConfigError(
        f"{key}structure_groups={self.structure_groups!r}; must be ((channel name, (class-name patterns, ...)), ...)"
      )
    probs = self.operation_probs
    if not (len(probs) == 3 and all(isinstance(p, (int, float)) and p >= 0 for p in probs) and sum(probs) > 0):
      raise sections.ConfigError(
        f"{key}operation_probs={probs!r}; must be 3 weights >= 0 (whole, zoom2, patch), not all 0"
      )
    for name in ("num_threads", "prefetch", "worker_count"):
      sections.keyword_or(key + name, getattr(self, name), ("auto",), sections.count, 0)
    sections.flag(key + "numpy_huge_pages", self.numpy_huge_pages)
    sections.fraction(key + "val_fraction", self.val_fraction)
    sections.choice(key + "hint", self.hint, ("",) + multilevel.HINTS)
    sections.count(key + "sr_factor", self.sr_factor)
    sections.fraction(key + "positive_fraction", self.positive_fraction)
    sections.flag(key + "pack_structures", self.pack_structures)
    sections.flag(key + "decode_on_device", self.decode_on_device)
    sections.flag(key + "resize_on_device", self.resize_on_device)
    if self.resize_on_device and not self.decode_on_device:
      raise sections.ConfigError(f"{key}resize_on_device=True needs {key}decode_on_device=True")

  @classmethod
  def from_config(cls, section: Any) -> DataSpec:
    return sections.from_config(cls, section, "config.data", nested={"phantom": PhantomSpec.from_config})

  # ---------------------------------------------------------------------------------------- structures

  def class_names(self) -> dict[int, str]:
    """Label id -> class name of the label maps: `class_map`'s json, or the embedded TotalSegmentator map."""
    if self.class_map:
      return preprocess.load_class_map(self.class_map)
    from meddiff_jax.data import class_map  # the embedded TotalSegmentator map

    return class_map.TOTAL

  @property
  def structures_as_labels(self) -> bool:
    """data.structures: 'grouped' (one-hot group channels + body) or 'classes' (one label-id channel)."""
    return self.structures == "classes"

  def structure_lut(self) -> tuple[np.ndarray | None, int]:
    """(label -> group LUT, number of groups) or (None, 0) when structures are off; 'classes': every class is
    its own id (learned embedding in the model), the number of groups the largest class id."""
    if not self.use_structures:
      return None, 0
    if self.structures_as_labels:
      names = self.class_names()
      return preprocess.class_lookup(names), max(names)
    groups = dict(self.structure_groups)
    return preprocess.group_lookup(self.class_names(), groups), len(groups)

  @property
  def structure_channel_count(self) -> int:
    """Structure channels the data gives the model: groups + body, 1 (label ids) for 'classes', 0 when off."""
    if not self.use_structures:
      return 0
    return 1 if self.structures_as_labels else len(dict(self.structure_groups)) + 1

  @property
  def packs_structures(self) -> bool:
    """Whether batches carry grouped structures packed in one uint8 channel (data.pack_structures), which the
    train / eval step and the model expand to `structure_channel_count` channels on the accelerator."""
    return self.use_structures and self.pack_structures and not self.structures_as_labels

  @property
  def shipped_structure_channels(self) -> int:
    """Structure channels a batch carries from the host: 1 when packed, else structure_channel_count."""
    return 1 if self.packs_structures else self.structure_channel_count

  # ---------------------------------------------------------------------------------------- samples, spacing

  def sample_spec(self) -> multilevel.SampleSpec:
    """The multi-level sample layout of this data (the LUT computed once, here)."""
    lut, num_groups = self.structure_lut()
    return multilevel.SampleSpec(
      patch=self.patch_size,
      lut=lut,
      num_groups=num_groups,
      operation_probs=tuple(self.operation_probs),
      hint=self.hint,
      sr_factor=self.sr_factor,
      structure_labels=lut is not None and self.structures_as_labels,
      positive_fraction=self.positive_fraction,
      pack_structures=self.packs_structures,
      decode_on_device=self.decode_on_device,
      resize_on_device=self.resize_on_device,
      hu_dtype=self.hu_dtype,
    )

  @property
  def hu_dtype(self) -> str:
    """The dtype of the source's HU volumes, in which samples ship them (decode_on_device): int16 in a prepared
    store (data/store.write_record), float32 in generated phantoms."""
    return "float32" if self.source == "phantom" else "int16"

  def training_spacing(self, records: list[dict] | None = None) -> tuple[float, float, float] | None:
    """The voxel size (mm) a model is trained at: data.spacing when given, else ('source') the phantom spacing,
    or the one spacing of the prepared records (`records`, default: read from prepared_dir when it is a local
    directory); None when unknown or mixed. Training saves it as data.spacing with every checkpoint, so tasks
    run the network at that scale."""
    if self.spacing != FROM_SOURCE:
      return tuple(float(s) for s in self.spacing)
    if self.source == "phantom":
      return tuple(float(s) for s in self.phantom.spacing)
    if records is None:
      from meddiff_jax.data import store as store_lib

      records = store_lib.read_records(self.prepared_dir) if os.path.isdir(self.prepared_dir) else []
    spacings = {tuple(round(float(s), 4) for s in r["spacing"]) for r in records if "spacing" in r}
    return spacings.pop() if len(spacings) == 1 else None
