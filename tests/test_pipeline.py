"""Multi-level samples, the Grain pipeline, the phantom, and the prepared store (incl. bad files)."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from conftest import MinimalStore, prepare_config, sample_spec, tiny

from meddiff_jax.data import multilevel, nifti, phantom, pipeline, prepare, preprocess, store, volumes
from meddiff_jax.models import embeddings


def test_phantom_has_ct_values_and_totalsegmentator_labels():
  for region, organ in (("abdomen", 5), ("chest", 10), ("head_neck", 90)):
    p = phantom.make_phantom((48, 48, 48), (6.0, 6.0, 6.0), region, seed=1, num_lesions=2)
    assert p.hu.min() < -900 and p.hu.max() > 500  # air and bone
    assert (p.labels == organ).sum() > 50
    assert p.lesions.sum() > 0
    volumes.check_ct(volumes.Volume(p.hu, p.affine))
  a = phantom.make_phantom((32, 32, 32), seed=3)
  b = phantom.make_phantom((32, 32, 32), seed=3)
  np.testing.assert_array_equal(a.hu, b.hu)
  liver_hu = np.median(a.hu[a.labels == 5])
  assert 40 < liver_hu < 80


@pytest.mark.parametrize("operation", multilevel.OPERATIONS)
def test_sample_coordinates_match_the_whole_volume_frame(operation):
  """Each sample voxel's coordinate (from pos_box) must point at the whole-volume voxel it came from."""
  shape = (40, 36, 44)
  idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float32)
  # encode each voxel's own normalised x coordinate as its "HU" so we can read positions back
  coord = np.stack([2 * idx[..., a] / (n - 1) - 1 for a, n in enumerate(shape)], -1)
  patch = 16
  for axis in range(3):
    hu = (coord[..., axis] * 100.0).astype(np.float32)  # in [-100, 100] HU: inside the abdomen window
    s = multilevel.make_sample(
      hu, None, preprocess.region_id("abdomen"), sample_spec(patch), np.random.default_rng(1), operation=operation
    )
    grid = np.asarray(embeddings.coordinate_grid(s["pos_box"][None], (patch,) * 3))[0, ..., axis]
    seen = preprocess.unit_to_hu(s["image"][..., 0], "abdomen") / 100.0
    inside = np.abs(grid) <= 1.0  # padded voxels (volume smaller than the crop) hold air, not coordinates
    np.testing.assert_allclose(seen[inside], grid[inside], atol=2e-3)
  if operation == "whole":
    np.testing.assert_allclose(s["pos_box"], [[-1, 1]] * 3)


def test_structure_channels_group_labels_and_body():
  lut = preprocess.group_lookup(
    {1: "spleen", 5: "liver", 10: "lung_upper_lobe_left", 99: "unknown_thing"}, preprocess.DEFAULT_STRUCTURE_GROUPS
  )
  names = list(preprocess.DEFAULT_STRUCTURE_GROUPS)
  labels = np.array([[[0, 1, 5, 10, 99]]])
  hu = np.array([[[-1000.0, 50, 60, -850, 30]]])
  ch = preprocess.structure_channels(labels, hu, lut, len(names))
  assert ch.shape == (1, 1, 5, len(names) + 1)
  assert ch[0, 0, 1, names.index("spleen")] == 1 and ch[0, 0, 2, names.index("liver")] == 1
  assert ch[0, 0, 3, names.index("lung")] == 1 and ch[0, 0, 4, :-1].sum() == 0
  np.testing.assert_array_equal(ch[0, 0, :, -1], [0, 1, 1, 0, 1])  # body = HU > -500


def test_windows_invert():
  for region, (w, l) in preprocess.WINDOWS.items():
    hu = np.linspace(l - w / 2, l + w / 2, 11)
    np.testing.assert_allclose(preprocess.unit_to_hu(preprocess.hu_to_unit(hu, region), region), hu, atol=1e-3)
    assert preprocess.hu_to_unit(np.array([l - w]), region)[0] == -1.0


def test_grain_pipeline_is_deterministic_sharded_and_checkpointable():
  config = tiny(**{"data.decode_on_device": False})  # finished samples; shipped ones: test_decode.py
  st = pipeline.make_store(config.data)
  make = lambda **kw: iter(pipeline.make_dataset(st, config.data, batch_size=4, seed=3, **kw))
  a, b = make(), make()
  first = [next(a) for _ in range(3)]
  for batch in first:
    ref = next(b)
    for k in batch:
      np.testing.assert_array_equal(batch[k], ref[k])
  assert first[0]["image"].shape == (4, 8, 8, 8, 1) and config.data.structure_channel_count == 13
  assert first[0]["structures"].shape[-1] == 1  # the 13 channels packed (data.pack_structures), expanded on device
  ops = np.concatenate([x["operation"] for x in first])
  assert len(set(ops.tolist())) > 1  # multi-level operations are mixed
  # resume: a stream started at the position after 3 batches (12 samples) reproduces batch 4
  nxt = next(a)
  c = make(first_sample=12)
  np.testing.assert_array_equal(next(c)["image"], nxt["image"])
  # two processes holding rows 0-1 and 2-3 load exactly those samples of the same global batch
  halves = [make(part=pipeline.LocalPart(4, rows, {})) for rows in ((0, 1), (2, 3))]
  x0, x1 = next(halves[0]), next(halves[1])
  np.testing.assert_array_equal(np.concatenate([x0["image"], x1["image"]]), first[0]["image"])


class _CountingStore(MinimalStore):
  """Small in-memory volumes that count how many samples were read (what a bucket would be asked for)."""

  def __init__(self, n=3, shape=(12, 12, 12)):
    rng = np.random.default_rng(0)
    self.volumes = [rng.uniform(-1000, 1000, shape).astype(np.float32) for _ in range(n)]
    self.loads = 0

  def __len__(self):
    return len(self.volumes)

  def load(self, index):
    self.loads += 1
    return self.volumes[index], None, 0


def test_a_finite_dataset_reads_exactly_its_batches_and_matches_the_stream():
  """Validation / previews (num_batches): the same batches as the infinite stream's first ones, and no
  read-ahead past them; the infinite stream's prefetch keeps reading batches nobody asked for."""
  import time

  config = tiny(
    **{"data.use_structures": False, "data.prefetch": 4, "data.num_threads": 2, "model.structure_channels": 0}
  )
  infinite, finite = _CountingStore(), _CountingStore()
  stream = iter(pipeline.make_dataset(infinite, config.data, batch_size=2, seed=5))
  it = iter(pipeline.make_dataset(finite, config.data, batch_size=2, seed=5, num_batches=2))
  fixed = [next(it), next(it)]
  with pytest.raises(StopIteration):
    next(it)
  assert finite.loads == 4
  for batch in fixed:
    ref = next(stream)
    for k in batch:
      np.testing.assert_array_equal(batch[k], ref[k])
  deadline = time.monotonic() + 10
  while infinite.loads <= 4 and time.monotonic() < deadline:
    time.sleep(0.05)
  assert infinite.loads > 4  # what validation and previews read before (prefetch 4 batches ahead)


def test_global_batches_are_laid_out_on_the_mesh():
  from meddiff_jax import sharding
  from meddiff_jax.train import step as step_lib

  config = tiny(**{"data.decode_on_device": False})
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
  layout = sharding.input_layout(mesh, (("batch", ("data", "fsdp")),), step_lib.batch_spec(config))
  batches = pipeline.GlobalBatches(pipeline.make_store(config.data), config.data, layout, seed=0)
  batch = next(batches)
  assert set(batch) == {"image", "pos_box", "region", "structures"}
  assert batch["image"].shape == (8, 8, 8, 8, 1)
  assert len(batch["image"].addressable_shards) == 8
  assert batch["image"].addressable_shards[0].data.shape == (1, 8, 8, 8, 1)


def test_prepare_skips_bad_files_reports_them_and_resumes(tmp_path, real_data_dir):
  src = tmp_path / "in"
  src.mkdir()
  for i, region in enumerate(("abdomen", "chest")):
    p = phantom.make_phantom((24, 24, 24), (6.0, 6.0, 6.0), region, seed=i)
    nifti.save(volumes.Volume(p.hu, p.affine), src / f"ph{i}.nii.gz", np.int16)
    nifti.save(volumes.Volume(p.labels, p.affine), src / f"ph{i}_seg.nii.gz", np.uint8)
  nib.save(
    nib.Nifti1Image(np.random.default_rng(0).integers(0, 255, (16, 16, 16)).astype(np.uint8), np.eye(4)),
    src / "mr_like.nii.gz",
  )
  (src / "broken.nii.gz").write_bytes(open(src / "ph0.nii.gz", "rb").read()[:300])
  nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), np.eye(4)), src / "slice2d.nii.gz")
  manifest = tmp_path / "manifest.csv"
  rows = [
    "image,region,mask,parent",
    "ph0.nii.gz,abdomen,ph0_seg.nii.gz,",
    "ph1.nii.gz,chest,ph1_seg.nii.gz,",
    "mr_like.nii.gz,abdomen,,",
    "broken.nii.gz,chest,,",
    "slice2d.nii.gz,chest,,",
    f"{real_data_dir / 'example_ct_sm.nii.gz'},abdomen,{real_data_dir / 'example_seg.nii.gz'},"
    f"{real_data_dir / 'example_ct.nii.gz'}",
    "ph0.nii.gz_missing,chest,,",
  ]
  manifest.write_text("\n".join(rows) + "\n")
  out = tmp_path / "out"
  report = prepare.run(
    prepare_config(src, out, manifest=str(manifest), spacing=(4.0, 4.0, 4.0), allow_outside_paths=True)
  )  # the real CT rows live in shared/data
  assert len(report["prepared"]) == 2
  reasons = {os.path.basename(r["image"]): r["reason"] for r in report["failed"]}
  assert set(reasons) == {
    "mr_like.nii.gz",
    "broken.nii.gz",
    "slice2d.nii.gz",
    "example_ct_sm.nii.gz",
    "ph0.nii.gz_missing",
  }
  assert "not CT in Hounsfield units" in reasons["mr_like.nii.gz"]
  assert "expected a 3D volume" in reasons["slice2d.nii.gz"]
  assert "affine was not updated" in reasons["example_ct_sm.nii.gz"]
  assert "does not exist" in reasons["ph0.nii.gz_missing"]
  assert json.loads((out / "report.json").read_text())["total_in_store"] == 2
  records = store.read_records(str(out))
  assert {r["region"] for r in records} == {"abdomen", "chest"}
  assert records[0]["spacing"] == pytest.approx([4.0, 4.0, 4.0])
  # resumable: a second run prepares nothing new
  again = prepare.run(
    prepare_config(src, out, manifest=str(manifest), spacing=(4.0, 4.0, 4.0), allow_outside_paths=True)
  )
  assert len(again["prepared"]) == 0 and len(again["skipped"]) == 2
  # and the store feeds the training pipeline
  ps = store.PreparedStore(str(out))
  hu, labels, region = ps.load(0)
  assert hu.dtype == np.int16 and labels is not None and region in (1, 2)
  assert labels.shape == hu.shape == (35, 35, 35)  # the 6 mm centres' extent (23 * 6 mm) holds 35 4-mm voxels


def test_prepare_real_ct_with_masks_by_directory_scan(tmp_path, real_data_dir):
  src = tmp_path / "in"
  masks = tmp_path / "masks"
  src.mkdir()
  masks.mkdir()
  os.symlink(real_data_dir / "example_ct.nii.gz", src / "case.nii.gz")
  os.symlink(real_data_dir / "example_seg_fast_force_split.nii.gz", masks / "case.nii.gz")
  report = prepare.run(
    prepare_config(
      src, tmp_path / "out", mask_dir=str(masks), default_region="abdomen", spacing=(3.0, 3.0, 3.0), workers=2
    )
  )
  assert len(report["prepared"]) == 1, report
  hu, labels, region = store.PreparedStore(str(tmp_path / "out")).load(0)
  assert region == preprocess.region_id("abdomen") and hu.shape == (122, 101, 112)
  assert np.median(np.asarray(hu)[np.asarray(labels) == 5]) == pytest.approx(55, abs=40)  # liver HU


def _prepare_one(tmp_path, manifest_csv: str) -> store.PreparedStore:
  """Prepare the one scan in tmp_path/in that the manifest lists, at 6 mm; its store."""
  manifest = tmp_path / "m.csv"
  manifest.write_text(manifest_csv)
  cfg = prepare_config(tmp_path / "in", tmp_path / "out", manifest=str(manifest), spacing=(6.0, 6.0, 6.0))
  cfg.limits.max_spacing_mm = 40.0  # the SR test's partner has 30 mm slices (5 x 6 mm)
  report = prepare.run(cfg)
  assert len(report["prepared"]) == 1, report
  return store.PreparedStore(str(tmp_path / "out"))


def test_prepare_merges_user_lesion_masks_for_controlnet(tmp_path):
  src = tmp_path / "in"
  src.mkdir()
  p = phantom.make_phantom((24, 24, 24), (6.0, 6.0, 6.0), "abdomen", seed=4, num_lesions=2)
  nifti.save(volumes.Volume(p.hu, p.affine), src / "ct.nii.gz", np.int16)
  nifti.save(volumes.Volume(p.labels, p.affine), src / "ct_seg.nii.gz", np.uint8)
  nifti.save(volumes.Volume(p.lesions, p.affine), src / "ct_lesion.nii.gz", np.uint8)
  hu, labels, _ = _prepare_one(
    tmp_path, "image,region,mask,lesion\nct.nii.gz,abdomen,ct_seg.nii.gz,ct_lesion.nii.gz\n"
  ).load(0)
  organs, lesion = multilevel.split_lesions(np.asarray(labels))
  np.testing.assert_array_equal(lesion, p.lesions > 0)
  np.testing.assert_array_equal(organs, p.labels)  # the organ under a lesion is kept
  sample = multilevel.make_sample(
    np.asarray(hu), np.asarray(labels), 2, sample_spec(8, hint="lesion"), np.random.default_rng(0), operation="whole"
  )
  assert set(np.unique(sample["hint"])) <= {-1.0, 1.0}


def test_prepare_stores_a_real_low_resolution_partner_for_sr(tmp_path):
  """Manifest column `lowres`: a thick-slice scan of the same extent, stored on the prepared grid; the SR
  hint of a training sample is then that scan, not the simulated degradation."""
  src = tmp_path / "in"
  src.mkdir()
  p = phantom.make_phantom((24, 24, 30), (6.0, 6.0, 6.0), "chest", seed=4)
  thin = volumes.Volume(np.round(p.hu), p.affine)
  nifti.save(thin, src / "ct.nii.gz", np.int16)
  thick = volumes.resample(thin, (6.0, 6.0, 30.0), order=1)
  nifti.save(thick, src / "ct_thick.nii.gz", np.int16)
  st = _prepare_one(tmp_path, "image,region,lowres\nct.nii.gz,chest,ct_thick.nii.gz\n")
  lowres = np.asarray(st.load_lowres(0))
  hu = np.asarray(st.load(0)[0])
  assert lowres.shape == hu.shape
  # the partner is smoother along z than the thin scan, and agrees with it on average
  assert np.abs(np.diff(lowres, axis=2)).mean() < 0.7 * np.abs(np.diff(hu, axis=2)).mean()
  assert abs(lowres.mean() - hu.mean()) < 20
  spec = sample_spec(8, operation_probs=(0, 0, 1), hint="lowres")
  sample = pipeline.MultiLevelSample(st, spec)(0, np.random.default_rng(0))
  box = sample["pos_box"]
  start = np.round((box[:, 0] + 1) / 2 * (np.array(hu.shape) - 1)).astype(int)
  crop = tuple(slice(a, a + 8) for a in start)
  np.testing.assert_allclose(
    sample["hint"][..., 0], preprocess.hu_to_unit(lowres[crop].astype(np.float32), 1), atol=1e-5
  )
