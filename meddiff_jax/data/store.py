"""The prepared-data store: per volume, chunked compressed arrays (zarr v3 through TensorStore) for the HU
volume and label map, plus a small JSON record; on local disk or object storage (gs://, s3://).

Why zarr through TensorStore: a training sample reads a 128^3 window of a ~100M-voxel volume. With
64^3 chunks (CHUNK; one object each, compressed with prepare's `store_codec`, blosc lz4hc + byte shuffle by
default), a window reads only the chunks it touches (<= 27), locally or from a bucket, so a pod's workers stream
windows without a shared disk (benchmarks/RESULTS.md, "#12 store": patches/s and bytes read per window). TensorStore
is already installed with Orbax and has native gcs / s3 drivers. Stores written before (one .npy per array, memory-
mapped) are still read.

Whole levels (prepare's `whole_sizes`): per volume and patch size P, the 'whole' multi-level sample's inputs
precomputed -- the HU volume resized to P^3 float32 and the label map resized to P^3, exactly as
data/multilevel.make_sample does -- so a whole-volume sample reads P^3 instead of the whole volume (from a bucket,
in a pod) and resizes nothing. Recorded under record["whole"][str(P)]; readers fall back when absent.

A volume counts as prepared once its JSON record exists (written last; local: tmp + rename, object
stores commit an object whole), which makes preparation resumable.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorstore as ts

from meddiff_jax import storage
from meddiff_jax.data import multilevel, regions, volume_io

RECORD_SUFFIX = ".json"
CHUNK = 64  # voxels per chunk edge (one object each): a 128^3 window at a random offset reads <= 3^3 chunks
FORMATS = ("zarr", "npy")
# zarr v3 codecs after the little-endian `bytes` codec, by prepare's `store_codec` name. Readers need no name:
# TensorStore reads the codec chain from each array's metadata, so stores written with any of these stay readable.
# Per-codec CPU and bytes: benchmarks/store_codecs.py, benchmarks/RESULTS.md "#12 pipeline margin", store codec.
CODECS: dict[str, list[dict[str, Any]]] = {
  "zstd": [{"name": "zstd", "configuration": {"level": 3}}],  # the stores written before store_codec existed
  "zstd1": [{"name": "zstd", "configuration": {"level": 1}}],
  "blosc_lz4": [{"name": "blosc", "configuration": {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"}}],
  "blosc_lz4hc": [{"name": "blosc", "configuration": {"cname": "lz4hc", "clevel": 5, "shuffle": "shuffle"}}],
  "blosc_zstd": [{"name": "blosc", "configuration": {"cname": "zstd", "clevel": 3, "shuffle": "shuffle"}}],
  "blosc_zstd1": [{"name": "blosc", "configuration": {"cname": "zstd", "clevel": 1, "shuffle": "shuffle"}}],
  "none": [],  # uncompressed: the CPU bound (and the bucket-size worst case)
}
# Requests in flight per opened array from a bucket: a 2P^3 zoom2 window at P=128 touches up to 5^3 chunks.
REQUESTS_PER_ARRAY = 128
MAX_GATHER_BOXES = 8  # strided box reads per gather (ChunkedVolume.oindex_async); more: one oindex read
DEFAULT_CODEC = "blosc_lz4hc"  # ~40-60% less CPU per window read than zstd at +6% bytes (RESULTS.md)


def _stem(path: str) -> str:
  name = os.path.basename(path.rstrip(os.sep))
  for ext in volume_io.IMAGE_EXTENSIONS:
    if name.lower().endswith(ext):
      return name[: -len(ext)]
  return os.path.splitext(name)[0]


def volume_id(path: str, input_dir: str, extra: str = "") -> str:
  """Readable and unique: the file stem plus a short hash of its path relative to the input dir."""
  rel = os.path.relpath(path, input_dir) + extra
  return f"{_stem(path)}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"


def record_path(output_dir: str, volume_id: str) -> str:
  return storage.join(output_dir, volume_id + RECORD_SUFFIX)


def _kvstore(path: str) -> Any:
  """TensorStore kvstore for a local path or a gs:// / s3:// URL (directory: trailing slash)."""
  if storage.is_local(path):
    return {"driver": "file", "path": os.path.abspath(path.removeprefix("file://")) + "/"}
  if storage.scheme(path) in ("gs", "s3"):
    return path.rstrip("/") + "/"
  raise ValueError(f"{path}: prepared stores live on local disk, gs:// or s3:// (TensorStore drivers)")


def _zarr_spec(
  path: str,
  shape: tuple[int, ...] | None = None,
  dtype: np.dtype | None = None,
  chunk: int | None = None,
  codec: str = DEFAULT_CODEC,
) -> dict[str, Any]:
  spec: dict[str, Any] = {"driver": "zarr3", "kvstore": _kvstore(path)}
  resource = {"gs": "gcs_request_concurrency", "s3": "s3_request_concurrency"}.get(storage.scheme(path))
  if resource:  # every chunk of a window requested at once: one round trip per read
    spec["context"] = {resource: {"limit": REQUESTS_PER_ARRAY}}
  if shape is not None:
    spec["metadata"] = {
      "shape": list(shape),
      "data_type": np.dtype(dtype).name,
      "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [min(chunk or CHUNK, s) for s in shape]}},
      "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, *CODECS[codec]],
    }
  return spec


def write_array(
  path: str, array: np.ndarray, fmt: str = "zarr", chunk: int | None = None, codec: str = DEFAULT_CODEC
) -> None:
  if fmt == "npy":
    if not storage.is_local(path):
      raise ValueError(f"{path}: the .npy store is local only; use the zarr format for object storage")
    np.save(path, array)
    return
  # a re-prepared volume replaces the old array; deleted through the path layer, not TensorStore's
  # delete_existing (a prefix range delete that some GCS stand-ins widen to the whole bucket)
  storage.remove_tree(path)
  arr = ts.open(_zarr_spec(path, array.shape, array.dtype, chunk, codec), create=True).result()
  arr.write(array).result()


def write_record(
  output_dir: str,
  volume_id: str,
  hu: np.ndarray,
  labels: np.ndarray | None,
  meta: dict[str, Any],
  lowres: np.ndarray | None = None,
  fmt: str = "zarr",
  whole_sizes: tuple[int, ...] = (),
  codec: str = DEFAULT_CODEC,
) -> dict[str, Any]:
  """Write the arrays (and the whole levels at `whole_sizes`) then the JSON record (a crash never leaves a
  record without data). `codec`: a CODECS name, for zarr arrays."""
  if fmt not in FORMATS:
    raise ValueError(f"store format {fmt!r}; choose from {FORMATS}")
  suffix = ".zarr" if fmt == "zarr" else ".npy"
  storage.makedirs(output_dir)
  record = dict(meta, id=volume_id, image=volume_id + ".image" + suffix, shape=list(hu.shape))
  hu = hu.astype(np.int16, copy=False)  # (a scan read as int16 is written as it is)
  write_array(storage.join(output_dir, record["image"]), hu, fmt, codec=codec)
  if labels is not None:
    record["labels"] = volume_id + ".labels" + suffix
    labels = labels.astype(np.uint8 if labels.max() < 256 else np.int16)
    write_array(storage.join(output_dir, record["labels"]), labels, fmt, codec=codec)
  if lowres is not None:  # a real low-resolution partner on the same grid (SR fine-tuning)
    record["lowres"] = volume_id + ".lowres" + suffix
    write_array(storage.join(output_dir, record["lowres"]), lowres.astype(np.int16), fmt, codec=codec)
  write_whole_levels(output_dir, record, hu, labels, whole_sizes, fmt, codec)
  storage.write_text(record_path(output_dir, volume_id), json.dumps(record, indent=1))
  return record


def write_whole_levels(
  output_dir: str,
  record: dict[str, Any],
  hu: np.ndarray,
  labels: np.ndarray | None,
  sizes: tuple[int, ...],
  fmt: str,
  codec: str = DEFAULT_CODEC,
) -> None:
  """Write the whole levels of `sizes` missing from `record` (updated in place, not saved). `hu` / `labels`:
  the arrays as stored (int16 HU, uint8 / int16 labels), so the level equals what make_sample computes."""
  suffix = ".zarr" if fmt == "zarr" else ".npy"
  levels = dict(record.get("whole") or {})
  for size in sorted({int(s) for s in sizes} - {int(k) for k in levels}):
    target = (size,) * 3
    entry = {"image": f"{record['id']}.whole{size}.image{suffix}"}
    write_array(
      storage.join(output_dir, entry["image"]),
      multilevel.resize(hu, target, order=1, dtype=np.float32),
      fmt,
      codec=codec,
    )
    if labels is not None:
      entry["labels"] = f"{record['id']}.whole{size}.labels{suffix}"
      write_array(
        storage.join(output_dir, entry["labels"]), multilevel.resize(labels, target, order=0), fmt, codec=codec
      )
    levels[str(size)] = entry
  if levels:
    record["whole"] = levels


def add_whole_levels(output_dir: str, sizes: tuple[int, ...], codec: str = DEFAULT_CODEC) -> int:
  """Give every volume of a prepared store its whole levels at `sizes` (an existing store, or volumes prepared
  before); returns how many records were updated. Each record is rewritten after its arrays."""
  updated = 0
  for record in read_records(output_dir):
    if not {str(int(s)) for s in sizes} - set(record.get("whole") or {}):
      continue
    hu = np.asarray(open_array(storage.join(output_dir, record["image"])))
    labels = np.asarray(open_array(storage.join(output_dir, record["labels"]))) if record.get("labels") else None
    write_whole_levels(
      output_dir, record, hu, labels, sizes, "npy" if record["image"].endswith(".npy") else "zarr", codec
    )
    storage.write_text(record_path(output_dir, record["id"]), json.dumps(record, indent=1))
    updated += 1
  return updated


def read_records(output_dir: str) -> list[dict[str, Any]]:
  paths = [p for p in storage.glob(storage.join(output_dir, "*" + RECORD_SUFFIX)) if not p.endswith("report.json")]
  return [json.loads(storage.read_text(p)) for p in paths]


class ChunkedVolume:
  """A lazily read zarr array that slices like numpy: `vol[a:b, c:d, e:f]` reads only the chunks it
  touches and returns an np.ndarray (what multilevel.crop_padded needs); np.asarray reads it all."""

  def __init__(self, array: ts.TensorStore, strided_gathers: bool = False):
    self._array = array
    self.shape = tuple(int(s) for s in array.shape)
    self.dtype = np.dtype(array.dtype.numpy_dtype)
    self.ndim = len(self.shape)
    self.strided_gathers = strided_gathers  # oindex as a few strided box reads where the index allows (local disk)

  def __getitem__(self, index: Any) -> np.ndarray:
    return self.read_async(index)()

  def oindex(self, index: list[np.ndarray]) -> np.ndarray:
    """vol[np.ix_(*index)] (one integer index array per axis), gathered by TensorStore from the chunks they touch."""
    return self.oindex_async(index)()

  def read_async(self, index: Any, out: np.ndarray | None = None) -> Callable[[], np.ndarray]:
    """Start reading vol[index]; the returned call waits for it. Reads started together overlap (a sample's HU
    and labels from a bucket: one round of requests, not two). `out`: an array (or a writable view: a padded
    crop's inside) of the read's shape and dtype to read into, memory the caller reuses, instead of a new one."""
    return _start_read(self._array[index], out)

  def oindex_async(self, index: list[np.ndarray], out: np.ndarray | None = None) -> Callable[[], np.ndarray]:
    """oindex, begun. With strided_gathers, an index that is a few arithmetic runs per axis (zoom2's nearest
    2P -> P gather: two runs of step 2) is read as one strided box per combination of runs, each into its block of
    the output: TensorStore then copies (and fills absent chunks for) only the voxels kept, ~3x less CPU than its
    oindex on a 256^3 label window (benchmarks/RESULTS.md "#24"). Not from a bucket: boxes that share a chunk
    request it again, and a window's requests would no longer fit in one round. `out`: as read_async's."""
    index = [np.asarray(i) for i in index]
    runs = [_arithmetic_runs(i) for i in index] if self.strided_gathers else None
    if runs is None or any(r is None for r in runs) or np.prod([len(r) for r in runs]) > MAX_GATHER_BOXES:
      return _start_read(self._array.oindex[tuple(index)], out)
    shape = tuple(len(i) for i in index)
    if out is None:
      out = np.empty(shape, self.dtype)
    _check_out(out, shape, self.dtype)
    done = [
      ts.array(out[tuple(slice(o, o + n) for o, _, _, n in box)], copy=False, write=True).write(
        self._array[tuple(slice(a, a + (n - 1) * step + 1, step) for _, a, step, n in box)].translate_to[0]
      )
      for box in itertools.product(*runs)
    ]

    def wait() -> np.ndarray:
      for d in done:
        d.result()
      return out

    return wait

  def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
    out = self._array.read().result()
    return out if dtype is None else out.astype(dtype)


def _arithmetic_runs(index: np.ndarray) -> list[tuple[int, int, int, int]] | None:
  """An index array as maximal runs (output offset, first value, step >= 1, length) of constant step, or None when
  it steps backwards or repeats a value (not a strided slice)."""
  runs, j, n = [], 0, len(index)
  while j < n:
    if j + 1 == n:
      runs.append((j, int(index[j]), 1, 1))
      break
    step = int(index[j + 1] - index[j])
    if step < 1:
      return None
    last = j + 1
    while last + 1 < n and index[last + 1] - index[last] == step:
      last += 1
    runs.append((j, int(index[j]), step, last - j + 1))
    j = last + 1
  return runs


def _start_read(view: ts.TensorStore, out: np.ndarray | None = None) -> Callable[[], np.ndarray]:
  """Start reading a TensorStore view into an array numpy allocates, or into `out` (TensorStore's own `read()` result
  costs ~2x the CPU for windows over ~32 MB, a 2P^3 int16 zoom2 window at P=128: benchmarks/RESULTS.md "#24"; the
  same below)."""
  dtype = view.dtype.numpy_dtype
  if out is None:
    out = np.empty(view.shape, dtype)
  _check_out(out, tuple(view.shape), dtype)
  done = ts.array(out, copy=False, write=True).write(view.translate_to[0])

  def wait() -> np.ndarray:
    done.result()
    return out

  return wait


def _check_out(out: np.ndarray, shape: tuple[int, ...], dtype: Any) -> None:
  if out.shape != shape or out.dtype != dtype or not out.flags.writeable:
    raise ValueError(f"read into a {out.shape} {out.dtype} array: the read is {shape} {np.dtype(dtype)}")


def _read_all(array: Any) -> Callable[[], np.ndarray]:
  if hasattr(array, "read_async"):  # a lazy volume (ChunkedVolume, or one wrapping it)
    return array.read_async(...)
  return lambda: np.asarray(array)


def open_array(path: str) -> np.ndarray | ChunkedVolume:
  if path.endswith(".npy"):
    return np.load(path, mmap_mode="r")
  return ChunkedVolume(ts.open(_zarr_spec(path), open=True, read=True).result(), strided_gathers=storage.is_local(path))


class PreparedStore:
  """VolumeStore over a prepared directory or bucket prefix.

  zarr volumes are read window by window (TensorStore); .npy volumes are memory-mapped (Grain workers
  share the page cache). Arrays are opened lazily once per process (TensorStore handles do not pickle
  into Grain workers; the records do).
  """

  def __init__(self, directory: str):
    self.directory = directory
    self.records = read_records(directory)
    if not self.records:
      raise FileNotFoundError(f"{directory}: no prepared volumes (*.json records); run configs/prepare.py first")
    for rec in self.records:  # an 'unknown' region is the guidance null class: refuse, never train it
      regions.training_region_id(rec.get("region", "unknown"), storage.join(directory, rec["id"] + RECORD_SUFFIX))
    self._open: dict[str, Any] = {}

  @property
  def splits(self) -> list[str | None]:
    """Each volume's recorded split (train / val / test by patient, data/recipes.py), None if not recorded."""
    return [rec.get("split") for rec in self.records]

  def __len__(self) -> int:
    return len(self.records)

  def __repr__(self) -> str:  # stable: Grain compares reprs when restoring checkpoints
    return f"PreparedStore({self.directory!r}, n={len(self.records)})"

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_open": {}}

  def _array(self, name: str) -> Any:
    if name not in self._open:
      self._open[name] = open_array(storage.join(self.directory, name))
    return self._open[name]

  def load(self, index: int) -> tuple[Any, Any | None, int]:
    """(HU volume, label map or None, region id); the arrays are lazy (numpy-style slicing)."""
    rec = self.records[index]
    labels = self._array(rec["labels"]) if rec.get("labels") else None
    return self._array(rec["image"]), labels, regions.training_region_id(rec.get("region", "unknown"), rec["id"])

  def load_whole(self, index: int, size: int) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The whole level at patch `size` (HU resized to float32, labels resized), read whole (both arrays at once);
    None if not stored."""
    rec = self.records[index]
    entry = (rec.get("whole") or {}).get(str(int(size)))
    if entry is None:
      return None
    reads = [_read_all(self._array(entry[k])) for k in ("image", "labels") if entry.get(k)]
    image, labels = reads[0](), (reads[1]() if len(reads) > 1 else None)
    return image, labels

  def load_lowres(self, index: int) -> Any | None:
    """The real low-resolution partner on the image grid, or None (the SR hint is then simulated)."""
    rec = self.records[index]
    return self._array(rec["lowres"]) if rec.get("lowres") else None
