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

from meddiff_jax.data import multilevel, phantom, preprocess, workers
from meddiff_jax.data.spec import DataSpec


class VolumeStore(Protocol):
  """Random access to preprocessed volumes (PhantomStore, data/store.PreparedStore, SubsetStore)."""

  def __len__(self) -> int: ...

  def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(HU array, label map or None, region id)."""
    ...

  def load_lowres(self, index: int) -> np.ndarray | None:
    """A real low-resolution partner on the image grid, or None (the 'lowres' hint is then simulated)."""
    ...

  def load_whole(self, index: int, size: int) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The precomputed 'whole' level at patch `size` (HU float32, labels), or None when not stored."""
    ...

  @property
  def splits(self) -> list[str | None]:
    """Each volume's recorded split (train / val / test), None where not recorded."""
    ...

  @property
  def records(self) -> list[dict[str, Any]]:
    """Each volume's prepared record (data/store.py: spacing, region, ...); empty for generated volumes."""
    ...


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

  def load_lowres(self, index: int) -> None:
    return None  # the 'lowres' hint of a phantom is simulated from its thin slices

  def load_whole(self, index: int, size: int) -> None:
    return None  # generated volumes are resized on the fly

  @property
  def splits(self) -> list[None]:
    return [None] * self.num_volumes

  @property
  def records(self) -> list[dict[str, Any]]:
    return []


def make_store(data: DataSpec) -> VolumeStore:
  if data.source == "phantom":
    p = data.phantom
    return PhantomStore(p.num_volumes, p.shape, p.spacing, p.seed, p.num_lesions)
  from meddiff_jax.data import store  # local import: only needed for prepared data

  return store.PreparedStore(data.prepared_dir)


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
    return self.base.load_lowres(self.indices[index])

  def load_whole(self, index: int, size: int) -> tuple[np.ndarray, np.ndarray | None] | None:
    return self.base.load_whole(self.indices[index], size)

  @property
  def splits(self) -> list[str | None]:
    base = self.base.splits
    return [base[i] for i in self.indices]

  @property
  def records(self) -> list[dict[str, Any]]:
    base = self.base.records
    return [base[i] for i in self.indices] if base else []


def split_train_val(store: VolumeStore, val_fraction: float) -> tuple[VolumeStore, VolumeStore]:
  """Train / validation stores: the prepared store's recorded patient splits (train trains, val validates,
  test is never read), or, for a store without recorded splits (phantoms), every k-th volume held out
  (k = 1 / val_fraction, config.data.val_fraction)."""
  splits = store.splits
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
  k = max(2, int(round(1.0 / max(val_fraction, 1e-9))))
  val = [i for i in range(n) if i % k == k - 1] or [n - 1]
  train = [i for i in range(n) if i not in set(val)]
  return SubsetStore(store, train), SubsetStore(store, val)


class MultiLevelSample:
  """volume index -> multi-level sample of layout `spec` (a picklable callable for Grain's random_map).

  Whole-volume samples come from the store's precomputed level at the patch size when it has one
  (`load_whole`); the 'lowres' hint from the store's real low-resolution partner when it has one."""

  def __init__(self, store: VolumeStore, spec: multilevel.SampleSpec):
    self.store, self.spec = store, spec
    self._coords: dict[int, np.ndarray] = {}  # lesion voxels per volume, for positive crops

  def __call__(self, index: int, rng: np.random.Generator, *, operation: str | None = None) -> dict[str, np.ndarray]:
    """Sample `index` drawn with `rng` (Grain's per-index generator); `operation` forces one (benchmarks)."""
    index = int(index)
    hu, labels, region = self.store.load(index)
    coords = None
    if self.spec.positive_fraction > 0:
      if index not in self._coords:
        self._coords[index] = multilevel.lesion_coordinates(labels)
      coords = self._coords[index]
    lowres = self.store.load_lowres(index) if self.spec.hint == "lowres" else None
    return multilevel.make_sample(
      hu,
      labels,
      region,
      self.spec,
      rng,
      operation=operation,
      positive_coords=coords,
      lowres=None if lowres is None else np.asarray(lowres),
      whole_level=functools.partial(self.store.load_whole, index, self.spec.patch),
    )


def make_dataset(
  store: VolumeStore,
  data: DataSpec,
  *,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  num_batches: int | None = None,
) -> grain.IterDataset:
  """Iterator dataset of per-process batches of `data`'s samples: infinite, or exactly the first `num_batches`
  (validation, previews: Grain's read-ahead stops there instead of reading -- from a bucket, whole volumes for
  a third of the samples -- batches nobody consumes)."""
  if batch_size % process_count:
    raise ValueError(f"global batch {batch_size} is not divisible by {process_count} processes")
  ds = (
    grain.MapDataset.range(len(store))
    .repeat()
    .shuffle(seed=seed)[process_index::process_count]
    .random_map(MultiLevelSample(store, data.sample_spec()), seed=seed)
    .batch(batch_size // process_count, drop_remainder=True)
  )
  if num_batches is not None:
    ds = ds[:num_batches]
  read = read_plan(data, batch_size // process_count, num_batches)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read.num_threads, prefetch_buffer_size=read.prefetch))
  if read.worker_count > 0:
    _absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=read.worker_count))
  return it_ds


def read_plan(data: DataSpec, per_process_batch: int, num_batches: int | None = None) -> workers.ReadPlan:
  """data's worker processes / read threads / read-ahead, 'auto' resolved for this process (data/workers.py; the
  training loop resolves them once, knowing the processes on its host). A finite dataset (validation, previews:
  `num_batches`) reads in threads of this process, at most one per batch: no worker processes to start for it."""
  read = workers.plan(data, workers.batch_bytes(data.sample_spec(), per_process_batch))
  if num_batches is not None and data.worker_count == workers.AUTO:
    threads = min(max(read.compute_cores, 1), num_batches) if data.num_threads == workers.AUTO else read.num_threads
    prefetch = threads if data.prefetch == workers.AUTO else read.prefetch
    read = dataclasses.replace(read, worker_count=0, num_threads=threads, prefetch=prefetch)
  return read


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
    if not any(k in local for k in multilevel.SHIPPED_HU.values()):
      local.pop(multilevel.OPERATION, None)  # bookkeeping, unless the step decodes by it (data.decode_on_device)
    shard = lambda k: self.sharding[k] if isinstance(self.sharding, dict) else self.sharding
    return {k: jax.make_array_from_process_local_data(shard(k), np.asarray(v)) for k, v in local.items()}

  def get_state(self) -> dict:
    return self.iterator.get_state()

  def set_state(self, state: dict) -> None:
    self.iterator.set_state(state)
