"""Grain pipeline: shuffled volumes -> multi-level samples -> per-process batches -> global jax.Arrays.

Deterministic given the seed (Grain's per-index RNG for `random_map`), shuffled across volumes and
epochs, sharded per JAX process by striding the index space, checkpointable through the iterator's
get_state/set_state (orbax: grain.checkpoint.CheckpointSave/Restore).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any, Protocol

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from meddiff_jax import sections
from meddiff_jax.data import multilevel, phantom, preprocess

STRUCTURE_MODES = ("grouped", "classes")  # config.data.structures
SOURCES = ("phantom", "prepared")  # config.data.source


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
  """config.data, typed (make_store / make_dataset keep reading the ConfigDict). Checks that involve other
  sections (patch size vs the UNet depth, structure channels vs the model) stay in checks.py."""

  source: str
  prepared_dir: str
  class_map: str
  patch_size: int
  spacing: tuple[float, ...]
  use_structures: bool
  structures: str
  structure_groups: tuple[tuple[str, tuple[str, ...]], ...]
  operation_probs: tuple[float, float, float]
  num_threads: int
  prefetch: int
  worker_count: int
  val_fraction: float
  hint: str
  sr_factor: int
  positive_fraction: float
  pack_structures: bool  # grouped structures ship as one uint8 channel, expanded on the accelerator
  phantom: PhantomSpec

  def __post_init__(self):
    key = "config.data."
    sections.choice(key + "source", self.source, SOURCES)
    sections.text(key + "prepared_dir", self.prepared_dir)
    sections.text(key + "class_map", self.class_map)
    sections.count(key + "patch_size", self.patch_size)
    sections.sizes(key + "spacing", self.spacing, allow_empty=True)
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
    sections.count(key + "num_threads", self.num_threads, 0)
    sections.count(key + "prefetch", self.prefetch, 0)
    sections.count(key + "worker_count", self.worker_count, 0)
    sections.fraction(key + "val_fraction", self.val_fraction)
    sections.choice(key + "hint", self.hint, ("",) + multilevel.HINTS)
    sections.count(key + "sr_factor", self.sr_factor)
    sections.fraction(key + "positive_fraction", self.positive_fraction)
    sections.flag(key + "pack_structures", self.pack_structures)

  @classmethod
  def from_config(cls, section: Any) -> DataSpec:
    return sections.from_config(cls, section, "config.data", nested={"phantom": PhantomSpec.from_config})


class VolumeStore(Protocol):
  """Random access to preprocessed volumes: HU array, optional label map, region id."""

  def __len__(self) -> int: ...

  def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None, int]: ...


class PhantomStore:
  """Phantom volumes generated on first use in each process (cheap to pickle into Grain workers)."""

  def __init__(
    self,
    num_volumes: int,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    seed: int = 0,
    num_lesions: int = 0,
  ):
    """num_lesions > 0: lesions are written into the label map with `multilevel.with_lesions` (organs kept)."""
    self.num_volumes, self.shape, self.spacing = num_volumes, tuple(shape), tuple(spacing)
    self.seed, self.num_lesions = seed, num_lesions

  def __len__(self) -> int:
    return self.num_volumes

  def __repr__(self) -> str:  # stable: Grain compares reprs when restoring checkpoints
    return f"PhantomStore({self.num_volumes}, {self.shape}, {self.spacing}, seed={self.seed})"

  @functools.lru_cache(maxsize=64)  # noqa: B019  (a few stores per process, cached volumes wanted)
  def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None, int]:
    region = preprocess.REGIONS[index % 3]
    p = phantom.make_phantom(self.shape, self.spacing, region, self.seed + index, self.num_lesions)
    labels = multilevel.with_lesions(p.labels, p.lesions) if self.num_lesions else p.labels
    return p.hu, labels, preprocess.region_id(region)


def make_store(data_config: Any) -> VolumeStore:
  if data_config.source == "phantom":
    return PhantomStore(
      data_config.phantom.num_volumes,
      tuple(data_config.phantom.shape),
      tuple(data_config.phantom.spacing),
      data_config.phantom.seed,
      data_config.phantom.num_lesions,
    )
  if data_config.source == "prepared":
    from meddiff_jax.data import store  # local import: only needed for prepared data

    return store.PreparedStore(data_config.prepared_dir)
  raise ValueError(f"config.data.source={data_config.source!r}; choose 'phantom' or 'prepared'")


class SubsetStore:
  """A view of some volumes of another store (train / validation split)."""

  def __init__(self, base: VolumeStore, indices: list[int]):
    self.base, self.indices = base, list(indices)

  def __len__(self) -> int:
    return len(self.indices)

  def __repr__(self) -> str:
    return f"SubsetStore({self.base!r}, n={len(self.indices)}, first={self.indices[:1]})"

  def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None, int]:
    return self.base.load(self.indices[index])

  def load_lowres(self, index: int) -> np.ndarray | None:
    fn = getattr(self.base, "load_lowres", None)
    return fn(self.indices[index]) if fn else None

  def load_whole(self, index: int, size: int) -> tuple[np.ndarray, np.ndarray | None] | None:
    fn = getattr(self.base, "load_whole", None)
    return fn(self.indices[index], size) if fn else None


def split_train_val(store: VolumeStore, data_config: Any) -> tuple[VolumeStore, VolumeStore]:
  """Train / validation stores: the prepared store's recorded patient splits (train trains, val validates,
  test is never read), or, for a store without recorded splits (phantoms), every k-th volume held out."""
  splits = getattr(store, "splits", None)
  if splits and all(splits):
    train = [i for i, s in enumerate(splits) if s == "train"]
    val = [i for i, s in enumerate(splits) if s == "val"]
    if not train or not val:
      raise ValueError(
        f"{store!r}: the recorded splits have {len(train)} train and {len(val)} val volumes; both "
        "need one (a small store: prepare it with --config.split_fractions giving val a larger share)"
      )
    return SubsetStore(store, train), SubsetStore(store, val)
  n = len(store)
  if n < 2:
    raise ValueError(f"need at least 2 volumes for a train/validation split, found {n}")
  k = max(2, int(round(1.0 / max(data_config.val_fraction, 1e-9))))
  val = [i for i in range(n) if i % k == k - 1] or [n - 1]
  train = [i for i in range(n) if i not in set(val)]
  return SubsetStore(store, train), SubsetStore(store, val)


class MultiLevelSample:
  """volume index -> multi-level sample (a picklable callable for Grain's random_map)."""

  def __init__(
    self,
    store: VolumeStore,
    patch_size: int,
    lut: np.ndarray | None,
    num_groups: int,
    operation_probs: tuple[float, float, float],
    hint: str = "",
    sr_factor: int = 5,
    structure_labels: bool = False,
    positive_fraction: float = 0.0,
    pack_structures: bool = False,
  ):
    """pack_structures: grouped structures ship as one uint8 channel (expanded on the accelerator). Whole-volume
    samples come from the store's precomputed level at patch_size when it has one (`load_whole`)."""
    self.store, self.patch_size, self.lut, self.num_groups = store, patch_size, lut, num_groups
    self.operation_probs, self.hint, self.sr_factor = tuple(operation_probs), hint, sr_factor
    self.structure_labels, self.pack_structures = structure_labels, pack_structures
    self.positive_fraction = positive_fraction
    self._coords: dict[int, np.ndarray] = {}  # lesion voxels per volume, for positive crops

  def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    hu, labels, region = self.store.load(int(index))
    coords = None
    if self.positive_fraction > 0:
      if int(index) not in self._coords:
        self._coords[int(index)] = multilevel.lesion_coordinates(labels)
      coords = self._coords[int(index)]
    lowres = None
    if self.hint == "lowres" and hasattr(self.store, "load_lowres"):
      lowres = self.store.load_lowres(int(index))  # a real partner when the manifest had one
    load_whole = getattr(self.store, "load_whole", None)
    whole = functools.partial(load_whole, int(index), self.patch_size) if load_whole else None
    return multilevel.make_sample(
      hu,
      labels,
      region,
      self.patch_size,
      rng,
      lut=self.lut,
      num_groups=self.num_groups,
      operation_probs=self.operation_probs,
      hint=self.hint,
      sr_factor=self.sr_factor,
      structure_labels=self.structure_labels,
      positive_fraction=self.positive_fraction,
      positive_coords=coords,
      lowres=None if lowres is None else np.asarray(lowres),
      pack_structures=self.pack_structures,
      whole_level=whole,
    )


def training_spacing(data_config: Any, store: Any = None) -> tuple[float, float, float] | None:
  """The voxel size (mm) a model is trained at: data.spacing if set, else the phantom spacing, else the
  one spacing of the prepared records (None when unknown or mixed). Training writes it into data.spacing,
  so checkpoints carry it and tasks run the network at that scale."""
  if data_config.spacing:
    return tuple(float(s) for s in data_config.spacing)
  if data_config.source == "phantom":
    return tuple(float(s) for s in data_config.phantom.spacing)
  records = getattr(store, "records", None)
  if records is None and data_config.prepared_dir:
    import os

    from meddiff_jax.data import store as store_lib

    records = store_lib.read_records(data_config.prepared_dir) if os.path.isdir(data_config.prepared_dir) else []
  spacings = {tuple(round(float(s), 4) for s in r["spacing"]) for r in records or [] if "spacing" in r}
  return spacings.pop() if len(spacings) == 1 else None


def structure_lut(data_config: Any) -> tuple[np.ndarray | None, int]:
  """(label -> group LUT, number of groups) or (None, 0) when structures are off."""
  if not data_config.use_structures:
    return None, 0
  if structures_as_labels(data_config):  # every class is its own id (learned embedding in the model)
    cmap = class_map_for(data_config)
    return preprocess.class_lookup(cmap), max(cmap)
  groups = dict(data_config.structure_groups)
  return preprocess.group_lookup(class_map_for(data_config), groups), len(groups)


def structures_as_labels(data_config: Any) -> bool:
  """data.structures: 'grouped' (one-hot group channels + body) or 'classes' (one label-id channel)."""
  if data_config.structures not in STRUCTURE_MODES:
    raise ValueError(f"config.data.structures={data_config.structures!r}; choose 'grouped' or 'classes'")
  return data_config.structures == "classes"


def structure_channel_count(data_config: Any) -> int:
  """Structure channels the data gives: groups + body, 1 (label ids) for 'classes', 0 when off."""
  if not data_config.use_structures:
    return 0
  return 1 if structures_as_labels(data_config) else structure_lut(data_config)[1] + 1


def packs_structures(data_config: Any) -> bool:
  """Whether batches carry grouped structures packed in one uint8 channel (data.pack_structures), which the
  train / eval step and the model expand to structure_channel_count channels on the accelerator."""
  return bool(data_config.use_structures and data_config.pack_structures and not structures_as_labels(data_config))


def shipped_structure_channels(data_config: Any) -> int:
  """Structure channels a batch carries from the host: 1 when packed, else structure_channel_count."""
  return 1 if packs_structures(data_config) else structure_channel_count(data_config)


def class_map_for(data_config: Any) -> dict[int, str]:
  if data_config.class_map:
    return preprocess.load_class_map(data_config.class_map)
  from meddiff_jax.data import class_map  # the embedded TotalSegmentator map

  return class_map.TOTAL


def make_dataset(
  store: VolumeStore,
  data_config: Any,
  *,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  num_batches: int | None = None,
) -> grain.IterDataset:
  """Iterator dataset of per-process batches: infinite, or exactly the first `num_batches` (validation,
  previews: Grain's read-ahead stops there instead of reading -- from a bucket, whole volumes for a third
  of the samples -- batches nobody consumes)."""
  if batch_size % process_count:
    raise ValueError(f"global batch {batch_size} is not divisible by {process_count} processes")
  lut, num_groups = structure_lut(data_config)
  ds = (
    grain.MapDataset.range(len(store))
    .repeat()
    .shuffle(seed=seed)[process_index::process_count]
    .random_map(
      MultiLevelSample(
        store,
        data_config.patch_size,
        lut,
        num_groups,
        tuple(data_config.operation_probs),
        data_config.hint,
        data_config.sr_factor,
        lut is not None and structures_as_labels(data_config),
        data_config.positive_fraction,
        packs_structures(data_config),
      ),
      seed=seed,
    )
    .batch(batch_size // process_count, drop_remainder=True)
  )
  if num_batches is not None:
    ds = ds[:num_batches]
  it_ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=data_config.num_threads, prefetch_buffer_size=data_config.prefetch)
  )
  if data_config.worker_count > 0:
    _absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.worker_count))
  return it_ds


def _absl_flags_parsed() -> None:
  """Grain 0.2.18 workers read an absl flag and crash if flags were never parsed (grain#1355)."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class GlobalBatches:
  """Wraps a per-process Grain iterator; yields dicts of global, mesh-sharded jax.Arrays.

  `sharding` is one NamedSharding for every key, or a dict of them by key (volumes split along depth too).
  """

  def __init__(self, dataset: grain.IterDataset, sharding: NamedSharding | dict[str, NamedSharding]):
    self.iterator = iter(dataset)
    self.sharding = sharding

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    local = next(self.iterator)
    local.pop("operation", None)  # host-side bookkeeping only
    shard = lambda k: self.sharding[k] if isinstance(self.sharding, dict) else self.sharding
    return {k: jax.make_array_from_process_local_data(shard(k), np.asarray(v)) for k, v in local.items()}

  def get_state(self) -> dict:
    return self.iterator.get_state()

  def set_state(self, state: dict) -> None:
    self.iterator.set_state(state)
