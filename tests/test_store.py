"""The prepared store: zarr (TensorStore) volumes that stream windows, locally and from gs:// (emulator),
old .npy stores still read, and each process reading only its own samples."""

import json
import pathlib

import numpy as np
import pytest
from conftest import sample_spec

from meddiff_jax.data import multilevel, pipeline, store
from meddiff_jax.data.spec import DataSpec


def volume(shape=(150, 140, 90), seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(-1024, 2000, size=shape).astype(np.int16)


def test_zarr_round_trip_and_windows_equal_numpy(tmp_path):
  hu = volume()
  labels = (hu > 500).astype(np.uint8)
  rec = store.write_record(str(tmp_path), "v", hu, labels, {"region": "chest"})
  assert rec["image"] == "v.image.zarr" and json.loads((tmp_path / "v.json").read_text())["shape"] == [150, 140, 90]
  got_hu, got_labels, region = store.PreparedStore(str(tmp_path)).load(0)
  assert got_hu.shape == hu.shape and got_hu.dtype == np.int16 and got_labels.dtype == np.uint8 and region == 1
  np.testing.assert_array_equal(np.asarray(got_hu), hu)
  np.testing.assert_array_equal(got_labels[3:67, 70:134, 20:84], labels[3:67, 70:134, 20:84])
  # the training sample is the same whether the volume is in memory or streamed window by window
  for op in multilevel.OPERATIONS:
    spec = sample_spec(32, lut=np.arange(256) % 3, num_groups=3)
    a = multilevel.make_sample(hu, labels, 1, spec, np.random.default_rng(5), operation=op)
    b = multilevel.make_sample(got_hu, got_labels, 1, spec, np.random.default_rng(5), operation=op)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def _bytes_read() -> int:
  """Bytes this process read through read()/pread() so far (Linux; TensorStore's file driver uses pread)."""
  with open("/proc/self/io") as f:
    return int(next(l for l in f if l.startswith("rchar")).split()[1])


@pytest.mark.skipif(not pathlib.Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_a_window_reads_only_the_chunks_it_touches(tmp_path):
  rng = np.random.default_rng(0)
  hu = rng.integers(-1024, 2000, size=(256, 256, 128)).astype(np.int16)  # incompressible-ish: bytes ~ voxels
  store.write_record(str(tmp_path), "v", hu, None, {"region": "chest"})
  total = sum(p.stat().st_size for p in (tmp_path / "v.image.zarr").rglob("*") if p.is_file())
  vol, _, _ = store.PreparedStore(str(tmp_path)).load(0)
  c = store.CHUNK
  before = _bytes_read()
  window = vol[c : 2 * c, 2 * c : 3 * c, 0:c]  # exactly one chunk
  one_chunk = _bytes_read() - before
  np.testing.assert_array_equal(window, hu[c : 2 * c, 2 * c : 3 * c, 0:c])
  assert one_chunk < 1.2 * window.nbytes + 4096 and one_chunk < total / 20, (one_chunk, total)
  before = _bytes_read()
  window = vol[5 : 5 + 2 * c, 40 : 40 + 2 * c, 10 : 10 + c]  # unaligned: touches 3 x 3 x 2 chunks
  unaligned = _bytes_read() - before
  np.testing.assert_array_equal(window, hu[5 : 5 + 2 * c, 40 : 40 + 2 * c, 10 : 10 + c])
  assert 0.95 * 18 * one_chunk < unaligned < 1.05 * 18 * one_chunk + 4096, (unaligned, one_chunk)


def test_old_npy_stores_still_read(tmp_path):
  hu = volume((20, 21, 22))
  rec = store.write_record(str(tmp_path), "old", hu, None, {"region": "abdomen"}, fmt="npy")
  assert rec["image"] == "old.image.npy"
  got, labels, _ = store.PreparedStore(str(tmp_path)).load(0)
  assert isinstance(got, np.memmap) and labels is None
  np.testing.assert_array_equal(got, hu)


def test_store_on_gcs_streams_windows(gcs):  # noqa: F811
  hu = volume((100, 90, 70), seed=3)
  store.write_record("gs://bucket/store", "a", hu, (hu > 0).astype(np.uint8), {"region": "head_neck"})
  ps = store.PreparedStore("gs://bucket/store")
  got, labels, region = ps.load(0)
  assert region == 0 and gcs.exists("bucket/store/a.image.zarr/zarr.json")
  np.testing.assert_array_equal(got[10:74, 5:69, 3:67], hu[10:74, 5:69, 3:67])
  np.testing.assert_array_equal(np.asarray(labels), hu > 0)


class RecordingStore(pipeline.SubsetStore):
  """Wraps a store; records which volume indices were loaded in this process."""

  def __init__(self, base):
    super().__init__(base, list(range(len(base))))
    self.loaded = []

  def __repr__(self):
    return f"Recording({self.base!r})"

  def load(self, index):
    self.loaded.append(index)
    return super().load(index)


def test_each_process_reads_only_its_part_of_the_global_batch(tmp_path):
  for i in range(8):
    store.write_record(str(tmp_path), f"v{i}", volume((24, 24, 24), seed=i), None, {"region": "abdomen"})
  from meddiff_jax.configs import pretrain

  cfg = pretrain.get_config("tiny").data  # every data key, with its visible default
  cfg.update(
    patch_size=8,
    use_structures=False,
    operation_probs=(0, 0, 1),
    num_threads=0,
    prefetch=0,
    worker_count=0,
    class_map="",
    decode_on_device=False,
  )
  cfg = DataSpec.from_config(cfg)
  loaded = []
  for p in range(2):
    rec = RecordingStore(store.PreparedStore(str(tmp_path)))
    part = pipeline.LocalPart(4, (2 * p, 2 * p + 1), {})  # a process whose devices hold rows 2p, 2p + 1
    it = iter(pipeline.make_dataset(rec, cfg, batch_size=4, seed=1, part=part))
    batch = next(it)
    assert batch["image"].shape[0] == 2 and len(rec.loaded) == 2  # half the global batch, read by this process
    loaded.append(rec.loaded)
  everything = RecordingStore(store.PreparedStore(str(tmp_path)))
  next(iter(pipeline.make_dataset(everything, cfg, batch_size=4, seed=1)))
  assert sorted(loaded[0] + loaded[1]) == sorted(everything.loaded) and not set(loaded[0]) & set(loaded[1])


def test_object_store_urls_tensorstore_cannot_read_are_refused():
  with pytest.raises(ValueError, match="memory://x/v.image.zarr: prepared stores live on local disk, gs:// or s3://"):
    store.write_array("memory://x/v.image.zarr", np.zeros((2, 2, 2), np.int16))


@pytest.mark.parametrize("codec", [c for c in store.CODECS if c != "zstd"])
def test_stores_of_every_codec_read_back_bitwise_equal_to_a_zstd_store(tmp_path, codec):
  """Readers name no codec (TensorStore reads it from each array's metadata): a store written before
  store_codec existed (zstd) and one written with `codec` give the same arrays, windows and whole levels."""
  hu = np.clip(volume((70, 66, 40), seed=3), -1024, 1500)  # edges not multiples of the 64^3 chunks
  labels = (np.abs(hu) % 7).astype(np.uint8)
  dirs = {c: tmp_path / c for c in ("zstd", codec)}
  for c, d in dirs.items():
    store.write_record(str(d), "v", hu, labels, {"region": "chest"}, lowres=hu // 2, whole_sizes=(16,), codec=c)
  meta = json.loads((dirs[codec] / "v.image.zarr" / "zarr.json").read_text())["codecs"][1:]
  assert [m["name"] for m in meta] == [m["name"] for m in store.CODECS[codec]]  # really written with `codec`
  old, new = (store.PreparedStore(str(d)) for d in dirs.values())
  for a, b, want in zip(old.load(0)[:2], new.load(0)[:2], (hu, labels)):
    np.testing.assert_array_equal(np.asarray(b), want)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(a[5:69, 3:40, 30:40], b[5:69, 3:40, 30:40])
  np.testing.assert_array_equal(np.asarray(store.open_array(str(dirs[codec] / "v.lowres.zarr"))), hu // 2)
  for a, b in zip(old.load_whole(0, 16), new.load_whole(0, 16)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
