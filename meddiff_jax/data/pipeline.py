"""Grain pipeline: volumes -> multi-level samples -> this process's part of each global batch -> global jax.Arrays.

The stream is a function of (seed, global sample index) alone (`volume_order`, `sample_rng`): the global batch at
step k is the same whatever the number of processes, the mesh or the slice size. Each process loads exactly the
part of it that its devices hold (`local_part`, read off the batch sharding: rows over data/fsdp, depth slabs over
spatial, replicated over tensor) and the global arrays are assembled with their global shapes given
(`GlobalBatches`). A checkpoint saves the stream's position (`GlobalBatches.state`), which any process layout
resumes from.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import grain
import jax
import numpy as np

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
  """(volume index, the sample's generator) -> multi-level sample of layout `spec` (picklable: Grain workers).

  Whole-volume samples come from the store's precomputed level at the patch size when it has one
  (`load_whole`); the 'lowres' hint from the store's real low-resolution partner when it has one."""

  def __init__(self, store: VolumeStore, spec: multilevel.SampleSpec):
    self.store, self.spec = store, spec
    self._coords: dict[int, np.ndarray] = {}  # lesion voxels per volume, for positive crops
    self._scratch = multilevel.Scratch()  # each read thread's zoom2 window

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
      scratch=self._scratch,
    )


# ------------------------------------------------------------------------------------------------- the stream
#
# The data stream is a function of (seed, global sample index) alone: sample g is volume `volume_order(n, seed)[g]`
# drawn with `sample_rng(seed, g)`, and row r of the global batch k of a stream that starts at sample s0 holds sample
# s0 + k * batch_size + r. Which process loads which part of a batch is read off the batch's sharding
# (`local_part`): nothing about the stream depends on the number of processes, the mesh or the slice size.


def volume_order(num_volumes: int, seed: int) -> grain.MapDataset:
  """Global sample index -> volume index: every volume once per epoch, each epoch in its own shuffled order."""
  return grain.MapDataset.range(num_volumes).shuffle(seed=seed).repeat()


def sample_rng(seed: int, index: int) -> np.random.Generator:
  """The generator of global sample `index` (its crop, operation, ...): keyed by (seed, index) only."""
  return np.random.default_rng([int(seed), int(index)])


@dataclasses.dataclass(frozen=True)
class LocalPart:
  """What one process loads of each global batch: `rows`, the global batch rows its devices hold (sorted), and
  per key the [start, stop) its devices hold along every axis after the batch axis (`boxes`: the depth slabs
  of volumes split over `spatial`, whole axes otherwise). Processes that share a sample (spatial or tensor
  across processes) load the same sample and keep their slabs."""

  batch_size: int
  rows: tuple[int, ...]
  boxes: dict[str, tuple[tuple[int, int], ...]]


def local_part(batch: dict[str, jax.ShapeDtypeStruct], devices: Iterable[jax.Device] | None = None) -> LocalPart:
  """The part of the global batch `batch` (global shapes, each with its sharding) that `devices` hold (default:
  this process's addressable devices), from each sharding's `devices_indices_map` of the global shape."""
  sizes = {x.shape[0] for x in batch.values()}
  if len(sizes) != 1:
    raise ValueError(f"batch keys disagree on the batch size: { {k: x.shape for k, x in batch.items()} }")
  (batch_size,) = sizes
  rows: set[int] = set()
  boxes = {}
  for key, x in batch.items():
    index_map = x.sharding.devices_indices_map(tuple(x.shape))
    held = [index_map[d] for d in (x.sharding.addressable_devices if devices is None else devices)]
    if not held:
      raise ValueError(f"batch key {key!r}: none of the devices {devices} holds part of it")
    for index in held:
      rows.update(range(*index[0].indices(batch_size)))
    bounds = [[index[a].indices(x.shape[a])[:2] for index in held] for a in range(1, len(x.shape))]
    boxes[key] = tuple((min(b[0] for b in axis), max(b[1] for b in axis)) for axis in bounds)
  return LocalPart(batch_size, tuple(sorted(rows)), boxes)


def whole_batch(batch_size: int) -> LocalPart:
  """Every row, every voxel: one process that loads the whole batch (no layout needed)."""
  return LocalPart(batch_size, tuple(range(batch_size)), {})


def crop(sample: dict[str, np.ndarray], boxes: dict[str, tuple[tuple[int, int], ...]]) -> dict[str, np.ndarray]:
  """A sample cut to the boxes of a `LocalPart` (axis a of a box: axis a of the sample, the batch axis left out)."""
  out = dict(sample)
  for key, box in boxes.items():
    if key in out and box:
      out[key] = np.asarray(out[key])[tuple(slice(lo, hi) for lo, hi in box)]
  return out


class _PartSample:
  """Element j of a process's dataset -> the sample it loads: batch j // U, the u = j % U-th of the U distinct global
  samples its rows hold (`positions`: offsets into the batch's `per_batch` samples), cut to its boxes."""

  def __init__(
    self,
    store: VolumeStore,
    spec: multilevel.SampleSpec,
    seed: int,
    first: int,
    per_batch: int,
    positions: tuple[int, ...],
    boxes: dict,
  ):
    self.order, self.sample = volume_order(len(store), seed), MultiLevelSample(store, spec)
    self.seed, self.first, self.per_batch, self.positions, self.boxes = seed, first, per_batch, positions, boxes

  def __call__(self, j: int) -> dict[str, np.ndarray]:
    k, u = divmod(int(j), len(self.positions))
    g = self.first + k * self.per_batch + self.positions[u]
    return crop(self.sample(self.order[g], sample_rng(self.seed, g)), self.boxes)


def sample_positions(part: LocalPart, repeat: int) -> tuple[int, ...]:
  """The distinct samples (offsets within a batch) that `part`'s rows hold when each sample fills `repeat` rows."""
  return tuple(sorted({r // repeat for r in part.rows}))


def row_to_sample(part: LocalPart, repeat: int) -> np.ndarray:
  """Global batch row -> index of its sample among `sample_positions(part, repeat)`; -1 for rows `part` lacks."""
  positions = sample_positions(part, repeat)
  out = np.full(part.batch_size, -1, np.int64)
  out[list(part.rows)] = [positions.index(r // repeat) for r in part.rows]
  return out


def make_dataset(
  store: VolumeStore,
  data: DataSpec,
  *,
  batch_size: int,
  seed: int,
  part: LocalPart | None = None,
  first_sample: int = 0,
  repeat: int = 1,
  num_batches: int | None = None,
) -> grain.IterDataset:
  """Iterator dataset of `part` (default: all) of each global batch of `data`'s samples, as numpy dicts whose
  leading axis holds the part's distinct samples (`sample_positions`) cut to its boxes.

  Row r of global batch k holds sample first_sample + k * (batch_size / repeat) + r // repeat (repeat > 1: each
  sample fills `repeat` rows; previews). Infinite, or exactly the first `num_batches` (validation, previews:
  Grain's read-ahead stops there instead of reading -- from a bucket, whole volumes for a third of the samples --
  batches nobody consumes)."""
  part = part or whole_batch(batch_size)
  if part.batch_size != batch_size or batch_size % repeat:
    raise ValueError(f"global batch {batch_size}: a part of a batch of {part.batch_size}, {repeat} rows per sample")
  positions = sample_positions(part, repeat)
  length = sys.maxsize if num_batches is None else num_batches * len(positions)
  ds = (
    grain.MapDataset.range(length)
    .map(_PartSample(store, data.sample_spec(), seed, first_sample, batch_size // repeat, positions, part.boxes))
    .batch(len(positions), drop_remainder=True)
  )
  read = read_plan(data, len(positions), num_batches)  # (this process's distinct samples per batch)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read.num_threads, prefetch_buffer_size=read.prefetch))
  workers.numpy_huge_pages(data.numpy_huge_pages)  # this process stacks batches (threads) or receives them
  if read.worker_count > 0:
    _absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=read.worker_count),
      worker_init_fn=functools.partial(workers.init_worker, data.numpy_huge_pages),
    )
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
  """A stream's global batches as dicts of jax.Arrays laid out as `batch` says (global shapes and dtypes, each with
  its sharding: nothing is inferred from what a process loads); this process loads only its `local_part`.

  `state()` is the stream's position, the same on every process: a checkpoint saves it, and a run on any number
  of processes resumes from it (`first_sample`)."""

  def __init__(
    self,
    store: VolumeStore,
    data: DataSpec,
    batch: dict[str, jax.ShapeDtypeStruct],
    *,
    seed: int,
    first_sample: int = 0,
    repeat: int = 1,
    num_batches: int | None = None,
  ):
    self.batch = batch
    self.part = local_part(batch)
    self.per_batch = self.part.batch_size // repeat
    self.next_sample = first_sample
    self.sample_of_row = row_to_sample(self.part, repeat)
    dataset = make_dataset(
      store,
      data,
      batch_size=self.part.batch_size,
      seed=seed,
      part=self.part,
      first_sample=first_sample,
      repeat=repeat,
      num_batches=num_batches,
    )
    self.iterator = iter(dataset)

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    local = next(self.iterator)
    self.next_sample += self.per_batch
    return assemble(local, self.part, self.sample_of_row, self.batch)

  def state(self) -> dict[str, int]:
    """The position of the next batch in the stream: `first_sample` of a stream that continues this one."""
    return {"next_sample": int(self.next_sample)}


def assemble(
  local: dict[str, np.ndarray], part: LocalPart, sample_of_row: np.ndarray, batch: dict[str, jax.ShapeDtypeStruct]
) -> dict[str, jax.Array]:
  """Global arrays of shapes, dtypes and shardings `batch` from what this process loaded of them (`make_dataset`
  of `part`: its distinct samples, cut to its boxes); `sample_of_row`: global row -> index of its local sample."""
  # 'operation': host bookkeeping, unless the step decodes by it (data.resize_on_device: it is in the layout then)
  local = {k: np.asarray(v) for k, v in local.items() if k != multilevel.OPERATION or k in batch}
  if set(local) != set(batch):
    raise ValueError(f"samples carry {sorted(local)}, the batch layout expects {sorted(batch)}")
  out = {}
  for key, x in batch.items():
    arr, box = local[key], part.boxes.get(key) or tuple((0, n) for n in x.shape[1:])
    expected = (int(sample_of_row.max()) + 1, *(hi - lo for lo, hi in box))
    if arr.shape != expected or arr.dtype != x.dtype:
      raise ValueError(f"batch key {key!r}: loaded {arr.shape} {arr.dtype}, the layout's part is {expected} {x.dtype}")
    piece = functools.partial(device_piece, arr, box, sample_of_row, tuple(x.shape))
    out[key] = jax.make_array_from_callback(tuple(x.shape), x.sharding, piece, dtype=x.dtype)
  return out


def device_piece(
  local: np.ndarray,
  box: tuple[tuple[int, int], ...],
  sample_of_row: np.ndarray,
  shape: tuple[int, ...],
  index: tuple[slice, ...],
) -> np.ndarray:
  """global_array[index] (one device's piece, `index` from the sharding's index map) from `local`: this process's
  samples of one key, cut to `box` along the axes after the batch axis."""
  samples = sample_of_row[index[0]]
  if samples.size and samples.min() < 0:
    raise ValueError(f"a device of this process holds batch rows {index[0]} that the process did not load")
  rest = []
  for s, n, (lo, hi) in zip(index[1:], shape[1:], box):
    start, stop, _ = s.indices(n)
    if start < lo or stop > hi:
      raise ValueError(f"a device of this process holds [{start}, {stop}) of an axis it loaded [{lo}, {hi}) of")
    rest.append(slice(start - lo, stop - lo))
  return local[(samples, *rest)]
