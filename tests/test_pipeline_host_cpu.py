"""#12 pipeline margin: the host's cheaper samples equal today's.

- `multilevel.resize` (separable) against scipy's `zoom` with the arguments it used before;
- grouped structures shipped packed in one uint8 channel and expanded on the device against
  `preprocess.structure_channels` (real TotalSegmentator labels, phantoms with lesions), through the train
  step's condition path and the model;
- whole-volume samples from the store's precomputed whole level against the computed ones, and what they read.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import sample_spec, tiny, unet_spec
from scipy import ndimage

from meddiff_jax.data import multilevel, nifti, phantom, pipeline, preprocess, store, volume_io, volumes
from meddiff_jax.models import conditions


def zoom_reference(volume, shape, order, dtype=None):
  """`multilevel.resize` as it was (scipy zoom, align corners, mode nearest, no prefilter)."""
  dtype = np.dtype(dtype or volume.dtype)
  if tuple(volume.shape) == tuple(shape):
    return np.asarray(volume, dtype)
  factors = [o / i for o, i in zip(shape, volume.shape)]
  return ndimage.zoom(volume, factors, output=dtype, order=order, mode="nearest", grid_mode=False, prefilter=False)


def real_ct(real_data_dir):
  hu = volume_io.load(str(real_data_dir / "example_ct.nii.gz")).data
  labels = volume_io.load(str(real_data_dir / "example_seg_fast_force_split.nii.gz"), is_mask=True).data
  return np.round(hu).astype(np.int16), labels.astype(np.uint8)


# ------------------------------------------------------------------------------------------ resize


@pytest.mark.parametrize(
  "shape,target",
  [
    ((64, 64, 64), (32, 32, 32)),
    ((37, 50, 11), (16, 16, 16)),
    ((10, 7, 5), (16, 3, 1)),
    ((9, 1, 20), (4, 5, 20)),
    ((40, 33, 70), (40, 24, 24)),
  ],
)
def test_separable_resize_equals_scipy_zoom_on_random_volumes(shape, target):
  rng = np.random.default_rng(sum(shape))
  for src in (rng.integers(-1024, 3000, shape).astype(np.int16), rng.normal(0, 500, shape).astype(np.float32)):
    np.testing.assert_array_equal(multilevel.resize(src, target, 0), zoom_reference(src, target, 0))
    got = multilevel.resize(src, target, 1, np.float32)
    ref = zoom_reference(src, target, 1, np.float32)
    assert got.dtype == np.float32 and got.shape == target
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-5)  # float64 sums in another order, then float32
  labels = rng.integers(0, 1300, shape).astype(np.int16)
  np.testing.assert_array_equal(multilevel.resize(labels, target, 0), zoom_reference(labels, target, 0))


def test_separable_resize_equals_scipy_zoom_on_real_ct(real_data_dir):
  hu, labels = real_ct(real_data_dir)
  for target in ((128, 128, 128), (48, 48, 48), (64, 40, 100)):
    got, ref = multilevel.resize(hu, target, 1, np.float32), zoom_reference(hu, target, 1, np.float32)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-5)
    unit = lambda x: preprocess.hu_to_unit(x, "abdomen")  # the sample's scale: the narrowest window
    assert np.abs(unit(got) - unit(ref)).max() <= 1e-5
    np.testing.assert_array_equal(multilevel.resize(labels, target, 0), zoom_reference(labels, target, 0))
  crop = hu[10:90, 5:85, 20:100]  # a zoom2-style crop, 2x down
  np.testing.assert_allclose(
    multilevel.resize(crop, (40,) * 3, 1, np.float32),
    zoom_reference(crop, (40,) * 3, 1, np.float32),
    rtol=1e-6,
    atol=1e-5,
  )


def test_hu_to_unit_in_place_equals_the_expression_it_replaces():
  rng = np.random.default_rng(1)
  for hu in (rng.normal(0, 800, (30, 20, 10)).astype(np.float32), rng.integers(-1024, 3000, 500).astype(np.int16)):
    for region in preprocess.REGIONS + ("unknown",):
      lo, hi = preprocess.window_bounds(region if region != "unknown" else preprocess.UNKNOWN_REGION)
      ref = np.clip((np.asarray(hu, np.float32) - lo) / (hi - lo) * 2.0 - 1.0, -1.0, 1.0)
      keep = hu.copy()
      got = preprocess.hu_to_unit(hu, region if region != "unknown" else preprocess.UNKNOWN_REGION)
      assert got.dtype == np.float32 and np.array_equal(got, ref) and np.array_equal(hu, keep)


# ------------------------------------------------------------------------------------------ packed structures


def test_packed_structures_expand_to_the_structure_channels_on_real_labels(real_data_dir):
  hu, labels = real_ct(real_data_dir)
  lut, k = tiny().data.structure_lut()
  ref = preprocess.structure_channels(labels, hu, lut, k)
  assert ref[..., :-1].any() and ref[..., -1].any() and (ref[..., :-1].sum(-1) <= 1).all()
  packed = conditions.pack_structures(multilevel.label_groups(labels, lut), preprocess.body_mask(hu))
  assert packed.shape == hu.shape + (1,) and packed.dtype == np.uint8
  np.testing.assert_array_equal(conditions.expand_structures(packed, k + 1), ref)
  on_device = jax.jit(lambda p: conditions.expand_structures(p, k + 1))(jnp.asarray(packed))
  assert on_device.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(on_device), ref)
  with pytest.raises(ValueError, match="groups"):
    conditions.expand_structures(packed, 129)


def test_label_groups_equal_split_lesions_then_the_lut():
  rng = np.random.default_rng(0)
  lut = (np.arange(120) % 7).astype(np.uint8)
  cases = [
    rng.integers(0, 256, 5000).astype(np.uint8),  # incl. the legacy lesion label 255, past the LUT
    rng.integers(-40, 1400, 5000).astype(np.int16),  # lesion codes (label + 1024), negatives
    rng.integers(0, 300, 5000).astype(np.int32),
  ]  # other dtypes: the reference path itself
  for labels in cases:
    ref = preprocess.group_ids(multilevel.split_lesions(labels)[0], lut)
    got = multilevel.label_groups(labels, lut)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, ref)
    organs = multilevel.split_lesions(labels)[0]
    np.testing.assert_array_equal(
      preprocess.structure_channels(organs, np.zeros(organs.shape), lut, 6)[..., :-1],
      conditions.expand_structures(conditions.pack_structures(got, 0), 7)[..., :-1],
    )


@pytest.mark.parametrize("operation", multilevel.OPERATIONS)
def test_packed_samples_expand_to_todays_samples_with_lesions(operation):
  p = phantom.make_phantom((40, 40, 40), (6.0, 6.0, 6.0), "abdomen", seed=3, num_lesions=2)
  labels = multilevel.with_lesions(p.labels, p.lesions)
  lut, k = tiny().data.structure_lut()
  for hint in ("", "lesion"):
    kw = dict(lut=lut, num_groups=k, hint=hint)
    ref = multilevel.make_sample(p.hu, labels, 2, sample_spec(16, **kw), np.random.default_rng(7), operation=operation)
    packed = sample_spec(16, pack_structures=True, **kw)
    got = multilevel.make_sample(p.hu, labels, 2, packed, np.random.default_rng(7), operation=operation)
    assert got["structures"].shape == (16, 16, 16, 1) and ref["structures"].shape == (16, 16, 16, k + 1)
    assert ref["structures"][..., :-1].any()
    for key in ref:
      want = ref[key]
      have = conditions.expand_structures(got[key], k + 1) if key == "structures" else got[key]
      np.testing.assert_array_equal(have, want)


def test_the_train_step_expands_packed_batches_before_the_condition_dropouts():
  """What the model receives from a packed batch equals what it received from today's batch, dropouts included."""
  from meddiff_jax.train import step as step_lib

  seen = []

  def apply_fn(variables, x, t, cond, train=False, rngs=None):
    seen.append(cond)
    return jnp.zeros_like(x)

  config = tiny(
    **{"diffusion.structure_drop_prob": 0.5, "diffusion.body_drop_prob": 0.5, "diffusion.cond_drop_prob": 0.3}
  )
  packed_cfg = tiny(**{"data.pack_structures": True, "data.decode_on_device": False})
  plain_cfg = tiny(**{"data.pack_structures": False, "data.decode_on_device": False})
  assert step_lib.batch_spec(packed_cfg)["structures"].shape == (8, 8, 8, 8, 1)
  assert step_lib.batch_spec(plain_cfg)["structures"].shape == (8, 8, 8, 8, 13)
  packed = next(
    iter(pipeline.make_dataset(pipeline.make_store(packed_cfg.data), packed_cfg.data, batch_size=8, seed=1))
  )
  plain = next(iter(pipeline.make_dataset(pipeline.make_store(plain_cfg.data), plain_cfg.data, batch_size=8, seed=1)))
  assert packed["structures"].shape[-1] == 1 and plain["structures"].shape[-1] == 13
  np.testing.assert_array_equal(conditions.expand_structures(packed["structures"], 13), plain["structures"])
  loss_fn = step_lib.make_loss_fn(apply_fn, config.diffusion.make_schedule(), config.diffusion, config.model)
  for batch in (packed, plain):
    batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "operation"}
    loss_fn({}, batch, jax.random.key(0))
  a, b = seen[0]["structures"], seen[1]["structures"]
  assert a.shape == b.shape == (8, 8, 8, 8, 13)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), plain["structures"])  # the dropouts did act


@pytest.mark.slow
def test_the_model_takes_packed_structures_as_the_expanded_channels():
  from meddiff_jax.models import unet3d

  spec = unet_spec(
    base_channels=8,
    channel_mult=(1,),
    attention_levels=(),
    num_head_channels=4,
    structure_channels=4,
    pos_num_freqs=2,
    mid_attention=False,
  )
  model = unet3d.UNet3D(spec)
  rng = np.random.default_rng(0)
  packed = conditions.pack_structures(rng.integers(0, 4, (2, 8, 8, 8)), rng.integers(0, 2, (2, 8, 8, 8)))
  x, t = jnp.asarray(rng.normal(size=(2, 8, 8, 8, 1)), jnp.float32), jnp.array([10, 500])
  cond = {"pos_box": jnp.tile(jnp.array([[-1.0, 1.0]]), (2, 3, 1)), "region": jnp.array([0, 2])}
  expanded = {**cond, "structures": jnp.asarray(conditions.expand_structures(packed, 4))}
  params = model.init(jax.random.key(0), x, t, expanded)
  params = jax.tree_util.tree_map(lambda p: p + 0.05, params)  # zero-initialised heads would hide differences
  a = model.apply(params, x, t, expanded)
  b = model.apply(params, x, t, {**cond, "structures": jnp.asarray(packed)})
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c = model.apply(params, x, t, {**cond, "structures": jnp.zeros_like(expanded["structures"])})
  assert not np.allclose(np.asarray(a), np.asarray(c))


# ------------------------------------------------------------------------------------------ whole levels


class _ReadCounting:
  """A lazy volume that counts the voxels sliced out of it (what a bucket would be asked for)."""

  def __init__(self, array):
    self.array, self.shape, self.dtype, self.ndim, self.voxels_read = array, array.shape, array.dtype, 3, 0

  def __getitem__(self, index):
    out = np.asarray(self.array[index])
    self.voxels_read += out.size
    return out


class _CountingStore(pipeline.SubsetStore):
  def __init__(self, base):
    super().__init__(base, list(range(len(base))))
    self.volumes_read = []

  def load(self, index):
    hu, labels, region = super().load(index)
    self.volumes_read += [_ReadCounting(hu)] + ([_ReadCounting(labels)] if labels is not None else [])
    return self.volumes_read[-2], self.volumes_read[-1] if labels is not None else None, region


@pytest.mark.parametrize("fmt", store.FORMATS)
def test_whole_samples_from_the_stored_level_equal_the_computed_ones(tmp_path, fmt):
  vols = []
  for i, shape in enumerate(((40, 36, 30), (20, 26, 18))):
    p = phantom.make_phantom(shape, (6.0, 6.0, 6.0), "chest", seed=i, num_lesions=1)
    vols.append((np.round(p.hu), multilevel.with_lesions(p.labels, p.lesions) if i == 0 else p.labels))
  plain, cached = str(tmp_path / "plain"), str(tmp_path / "cached")
  for i, (hu, labels) in enumerate(vols):
    store.write_record(plain, f"v{i}", hu, labels, {"region": "chest"}, fmt=fmt)
    store.write_record(cached, f"v{i}", hu, labels, {"region": "chest"}, fmt=fmt, whole_sizes=(16,))
  later = str(tmp_path / "later")  # an existing store given its levels afterwards
  for i, (hu, labels) in enumerate(vols):
    store.write_record(later, f"v{i}", hu, labels, {"region": "chest"}, fmt=fmt)
  assert store.add_whole_levels(later, (16,)) == 2 and store.add_whole_levels(later, (16,)) == 0
  lut, k = tiny().data.structure_lut()
  for pack in (False, True):
    for hint in ("", "lesion"):
      spec = sample_spec(16, lut=lut, num_groups=k, operation_probs=(1.0, 0.0, 0.0), hint=hint, pack_structures=pack)
      ref_store = store.PreparedStore(plain)
      ref = pipeline.MultiLevelSample(ref_store, spec)
      for directory in (cached, later):
        counting = _CountingStore(store.PreparedStore(directory))
        got = pipeline.MultiLevelSample(counting, spec)
        for i in range(2):
          want, have = ref(i, np.random.default_rng(i)), got(i, np.random.default_rng(i))
          assert set(want) == set(have)
          for key in want:
            np.testing.assert_array_equal(have[key], want[key])
        assert sum(v.voxels_read for v in counting.volumes_read) == 0  # no voxel of the volumes themselves
  # another patch size has no level: the sample is computed from the volume (which is then read)
  counting = _CountingStore(store.PreparedStore(cached))
  whole8 = sample_spec(8, lut=lut, num_groups=k, operation_probs=(1.0, 0.0, 0.0))
  other = pipeline.MultiLevelSample(counting, whole8)(0, np.random.default_rng(0))
  want = pipeline.MultiLevelSample(store.PreparedStore(plain), whole8)(0, np.random.default_rng(0))
  for key in want:
    np.testing.assert_array_equal(other[key], want[key])
  assert counting.volumes_read[0].voxels_read == 40 * 36 * 30
  # the lowres hint needs the native volume: it does not use the level
  counting = _CountingStore(store.PreparedStore(cached))
  lowres = sample_spec(16, lut=lut, num_groups=k, operation_probs=(1.0, 0.0, 0.0), hint="lowres")
  pipeline.MultiLevelSample(counting, lowres)(0, np.random.default_rng(0))
  assert counting.volumes_read[0].voxels_read == 40 * 36 * 30


def test_prepare_writes_whole_levels_and_adds_them_to_volumes_prepared_before(tmp_path):
  from conftest import prepare_config

  from meddiff_jax.data import prepare

  src = tmp_path / "in"
  src.mkdir()
  for i in range(2):
    p = phantom.make_phantom((24, 24, 24), (6.0, 6.0, 6.0), "abdomen", seed=i)
    nifti.save(volumes.Volume(np.round(p.hu), p.affine), src / f"ph{i}.nii.gz", np.int16)
  (src / "manifest.csv").write_text("image,region\nph0.nii.gz,abdomen\n")
  out = tmp_path / "out"
  prepare.run(prepare_config(src, out, manifest=str(src / "manifest.csv"), spacing=(6.0,) * 3))
  assert "whole" not in store.read_records(str(out))[0]
  (src / "manifest.csv").write_text("image,region\nph0.nii.gz,abdomen\nph1.nii.gz,abdomen\n")
  prepare.run(prepare_config(src, out, manifest=str(src / "manifest.csv"), spacing=(6.0,) * 3, whole_sizes=(8, 16)))
  ps = store.PreparedStore(str(out))
  for i in range(2):
    assert set(ps.records[i]["whole"]) == {"8", "16"}
    hu_level, labels = ps.load_whole(i, 16)
    assert labels is None and hu_level.dtype == np.float32
    np.testing.assert_array_equal(hu_level, multilevel.resize(np.asarray(ps.load(i)[0]), (16,) * 3, 1, np.float32))
  assert ps.load_whole(0, 32) is None


def test_prepare_refuses_whole_sizes_that_are_not_patch_sizes(tmp_path):
  from conftest import prepare_config

  from meddiff_jax import checks

  for bad in ((0,), (128.0,), ("128",)):
    with pytest.raises(checks.ConfigError, match="whole_sizes"):
      checks.prepare(prepare_config(tmp_path, tmp_path / "out", whole_sizes=bad))
  checks.prepare(prepare_config(tmp_path, tmp_path / "out", whole_sizes=(64, 128)))
