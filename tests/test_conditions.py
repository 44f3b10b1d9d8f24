"""Task conditions are the ones training produces (fast tier: numpy and a fake model)."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import sample_spec

from meddiff_jax.configs import pretrain
from meddiff_jax.data import multilevel, nifti, preprocess, volumes
from meddiff_jax.data.spec import DataSpec
from meddiff_jax.diffusion import schedules
from meddiff_jax.models import conditions
from meddiff_jax.tasks import common, synthesis

TINY_DATA = DataSpec.from_config(pretrain.get_config("tiny").data)


def fake_pretrained(patch=8):
  spec = types.SimpleNamespace(structure_channels=pretrain.NUM_STRUCTURE_CHANNELS)
  return types.SimpleNamespace(spec=spec, data=dataclasses.replace(TINY_DATA, patch_size=patch), patch_size=patch)


def phantom_ct():
  from meddiff_jax.data import phantom

  return phantom.make_phantom((16, 16, 16), (6.0, 6.0, 6.0), "abdomen", seed=1)


def test_task_structures_equal_the_training_sample_structures():
  """A patch-level training sample of a volume the size of the patch sees exactly what a task builds."""
  p = phantom_ct()
  pre = fake_pretrained(16)
  lut, groups = pre.data.structure_lut()
  spec = sample_spec(16, lut=lut, num_groups=groups)
  sample = multilevel.make_sample(p.hu, p.labels, 0, spec, np.random.default_rng(0), operation="patch")
  np.testing.assert_array_equal(common.structure_volume(pre, p.labels, p.hu), sample["structures"])
  no_labels = common.structure_volume(pre, None, p.hu)
  np.testing.assert_array_equal(no_labels[..., -1], p.hu > preprocess.BODY_THRESHOLD_HU)  # body from HU
  assert no_labels[..., -1].any() and not no_labels[..., :-1].any()  # organs unknown, never all-zero with a body
  with pytest.raises(ValueError, match="HU"):
    common.structure_volume(pre, None, None)


def test_the_tasks_packed_structures_are_what_the_model_expands_to_the_training_channels():
  """Tasks hold one packed byte per voxel over a whole scan; the model's expansion of it must be exactly the
  training encoding, with a label map and without (organs unknown, body kept), padded alike."""
  p = phantom_ct()
  pre = fake_pretrained(16)
  for labels in (p.labels, None):
    packed = common.structure_volume(pre, labels, p.hu, pad_to=16, packed=True)
    channels = common.structure_volume(pre, labels, p.hu, pad_to=16)
    assert packed.shape == (*channels.shape[:3], 1) and packed.dtype == np.uint8
    expanded = conditions.unpack_if_packed(jnp.asarray(packed), pre.spec.structure_channels, 0)
    np.testing.assert_array_equal(np.asarray(expanded), channels)
  assert channels[..., -1].any() and common.structure_volume(pre, p.labels, p.hu)[..., :-1].any()


def test_structures_are_padded_like_the_image():
  p = phantom_ct()
  from meddiff_jax.tasks import sliding_window

  out = common.structure_volume(fake_pretrained(24), None, p.hu[:10], pad_to=24)
  _, crop = sliding_window.pad_to_window(p.hu[:10], 24, -1000.0)
  assert out.shape == (24, 24, 24, pretrain.NUM_STRUCTURE_CHANNELS)
  assert out[crop].sum() == out.sum() > 0  # the padding (centred, as the image) is empty


def test_label_map_moves_to_the_working_grid_and_must_match_the_input(tmp_path):
  from meddiff_jax.data import regions
  from meddiff_jax.tasks import scans

  p = phantom_ct()
  original = volumes.Volume(p.hu, p.affine, "ct.nii.gz")
  nifti.save(volumes.Volume(p.labels.astype(np.int16), p.affine), tmp_path / "seg.nii.gz", np.int16)
  labels = scans.load_labels(str(tmp_path / "seg.nii.gz"), original, volumes.ReadOptions())
  scan = scans.Scan(original, labels, (regions.Part("abdomen", 2, 0, 16),), "given", (3.0, 3.0, 3.0), "3 mm")
  inp = common.prepare_part(fake_pretrained(16), scan, scan.parts[0])
  assert inp.work.shape == (31, 31, 31) and inp.structures.shape[:3] == inp.unit.shape
  organs = inp.structures[inp.crop][..., :-1].any(-1)
  np.testing.assert_array_equal(organs[::2, ::2, ::2][:4, :4, :4], p.labels[:4, :4, :4] > 0)  # nearest, moved
  shifted = p.affine.copy()
  shifted[:3, 3] += 30.0
  nifti.save(volumes.Volume(p.labels.astype(np.int16), shifted), tmp_path / "bad.nii.gz", np.int16)
  with pytest.raises(scans.Refusal, match=r"--config.labels=.*bad.nii.gz.* on another grid"):
    scans.load_labels(str(tmp_path / "bad.nii.gz"), original, volumes.ReadOptions())
  assert scans.load_labels("", original, volumes.ReadOptions()) is None


def data_of(mode: str, patch: int) -> DataSpec:
  """The tiny preset's data in structure mode grouped / packed (grouped, one packed channel) / classes."""
  config = pretrain.get_config("tiny+classes" if mode == "classes" else "tiny")
  config.data.update(patch_size=patch, pack_structures=mode == "packed")
  return DataSpec.from_config(config.data)


@pytest.mark.parametrize("mode", ["grouped", "packed", "classes"])
def test_structure_dropout_of_a_training_sample_is_the_tasks_label_free_condition(mode):
  """Structure-only dropout of a training sample (labels known) gives exactly what a task builds without a label
  map (body from the HU, organs unknown), in every structure mode; with the body dropped too, no anatomy at all;
  region and samples not dropped are untouched."""
  p = phantom_ct()
  data = data_of(mode, 16)
  channels = data.structure_channel_count
  pre = types.SimpleNamespace(spec=types.SimpleNamespace(structure_channels=channels), data=data, patch_size=16)
  spec = dataclasses.replace(data.sample_spec(), decode_on_device=False)  # the finished sample (host reference)
  sample = multilevel.make_sample(p.hu, p.labels, 0, spec, np.random.default_rng(0), operation="patch")
  s = conditions.unpack_if_packed(jnp.asarray(sample["structures"])[None], channels, 8 if mode == "classes" else 0)
  body_id = conditions.label_body_id(8, 119) if mode == "classes" else 0
  cond = {"structures": jnp.concatenate([s, s, s]), "region": jnp.array([0, 1, 2])}
  out = conditions.drop_organ_structures(
    cond, jnp.array([True, False, True]), jnp.array([False, True, True]), label_body_id=body_id
  )
  got = np.asarray(out["structures"])
  label_free = common.structure_volume(pre, None, p.hu)
  assert not np.array_equal(np.asarray(s[0]), label_free)  # the labels mattered before the dropout
  np.testing.assert_array_equal(got[0], label_free)  # organs dropped, body kept
  np.testing.assert_array_equal(got[1], np.asarray(s[0]))  # drop_body alone does nothing
  assert not got[2].any()  # organs and body dropped
  np.testing.assert_array_equal(np.asarray(out["region"]), [0, 1, 2])


def test_label_ids_carry_the_body_bit_the_model_does_not_read():
  hu = np.array([-1000.0, 40.0, -900.0, 40.0])
  labels = np.array([0, 0, 10, 5])  # air, body, lung lobe (outside the body threshold), liver
  data = data_of("classes", 16)
  lut, classes = data.structure_lut()
  ids = preprocess.structure_labels(labels, hu, lut, classes)[..., 0]
  np.testing.assert_array_equal(conditions.label_ids(ids), [0, classes + 1, 10, 5])
  np.testing.assert_array_equal(ids >= conditions.LABEL_BODY_BIT, [False, True, False, True])


def test_training_applies_structure_only_dropout_in_every_mode():
  from conftest import tiny_config

  from meddiff_jax.train import step
  from meddiff_jax.train.spec import PretrainConfig

  seen = []

  def apply_fn(variables, x, t, cond, **kw):
    seen.append(jax.tree_util.tree_map(np.asarray, cond))
    return jnp.zeros_like(x)

  drop = {"diffusion.cond_drop_prob": 0.0, "diffusion.structure_drop_prob": 1.0, "diffusion.body_drop_prob": 0.0}
  grouped = PretrainConfig.from_config(tiny_config(**drop))
  classes = tiny_config(**drop)
  classes.data.structures = "classes"
  classes.model.update(structure_channels=1, structure_embed_dim=8, num_structure_ids=119)
  classes = PretrainConfig.from_config(classes)
  k = pretrain.NUM_STRUCTURE_CHANNELS
  bit = conditions.LABEL_BODY_BIT
  for config, structures, expected in (
    (
      grouped,
      np.ones((2, 4, 4, 4, k), np.uint8),
      np.concatenate([np.zeros((2, 4, 4, 4, k - 1)), np.ones((2, 4, 4, 4, 1))], -1),
    ),
    (classes, np.array([5 | bit, 118 | bit, 0, 10], np.uint8).reshape(1, 2, 2, 1, 1).repeat(2, 0), None),
  ):
    loss_fn = step.make_loss_fn(apply_fn, schedules.make_schedule("cosine", 1000), config.diffusion, config.model)
    shape = structures.shape[:4]
    batch = {"image": jnp.zeros(shape + (1,)), "region": jnp.array([0, 1]), "structures": jnp.asarray(structures)}
    loss_fn({}, batch, jax.random.key(0))
    st = seen[-1]["structures"]
    if expected is None:  # label ids: the classes become 'body' where the body bit is set, else 'outside'
      expected = np.array([118 | bit, 118 | bit, 0, 0], np.uint8).reshape(1, 2, 2, 1, 1).repeat(2, 0)
    np.testing.assert_array_equal(st, expected)
    np.testing.assert_array_equal(seen[-1]["region"], [0, 1])


def test_synthesis_body_from_labels_is_the_filled_hull_without_air_organs():
  labels = np.zeros((20, 20, 20), np.int32)
  cmap = {v: k for k, v in TINY_DATA.class_names().items()}
  labels[4:16, 4:16, 4:16] = cmap["liver"]
  labels[8:12, 8:12, 8:12] = 0  # unlabelled tissue inside the body
  labels[5:7, 5:7, 5:7] = cmap["lung_upper_lobe_left"]
  lut, _ = TINY_DATA.structure_lut()
  body = preprocess.body_mask(synthesis.body_hu_proxy(labels, lut, tuple(preprocess.DEFAULT_STRUCTURE_GROUPS)))
  assert body[10, 10, 10] and body[4, 4, 4] and not body[0, 0, 0] and not body[6, 6, 6]


def test_small_volume_position_frame_matches_training():
  """A volume smaller than the patch: training's patch crop is centred with coordinates past [-1, 1];
  inference pads the same way and gives the window the same box and the same image."""
  from meddiff_jax.tasks import sliding_window

  hu = np.random.default_rng(0).normal(0, 100, (10, 16, 13)).astype(np.float32)
  sample = multilevel.make_sample(hu, None, 0, sample_spec(16), np.random.default_rng(0), operation="patch")
  padded, crop = sliding_window.pad_to_window(preprocess.hu_to_unit(hu, 0), 16, -1.0)
  plan = sliding_window.plan_windows(padded.shape, 16, 0.5, 1, crop)
  np.testing.assert_allclose(plan.boxes()[0], sample["pos_box"], atol=1e-6)
  np.testing.assert_allclose(padded, sample["image"][..., 0], atol=1e-6)
  np.testing.assert_array_equal(padded[crop], preprocess.hu_to_unit(hu, 0))


def test_tasks_default_to_the_checkpoint_training_spacing(tmp_path):
  from meddiff_jax.data import store

  assert TINY_DATA.spacing == "source"
  phantoms = dataclasses.replace(TINY_DATA, phantom=dataclasses.replace(TINY_DATA.phantom, spacing=(3.0, 3.0, 3.0)))
  pre = types.SimpleNamespace(data=phantoms)
  assert common.task_spacing(pre, "checkpoint") == (3.0, 3.0, 3.0)
  assert common.task_spacing(pre, (1.0, 1.0, 2.0)) == (1.0, 1.0, 2.0)
  recorded = dataclasses.replace(phantoms, spacing=(1.5, 1.5, 1.5))  # what training records in the checkpoint
  assert common.task_spacing(types.SimpleNamespace(data=recorded), "checkpoint") == (1.5, 1.5, 1.5)
  data = dataclasses.replace(TINY_DATA, source="prepared", prepared_dir=str(tmp_path))
  for i in range(2):
    store.write_record(str(tmp_path), f"v{i}", np.zeros((2, 2, 2)), None, {"spacing": [1.0, 1.0, 1.0]})
  assert data.training_spacing() == (1.0, 1.0, 1.0)
  store.write_record(str(tmp_path), "v3", np.zeros((2, 2, 2)), None, {"spacing": [2.0, 1.0, 1.0]})
  assert data.training_spacing() is None  # mixed: unknown, tasks keep the input grid


def test_lesion_crops_are_positive_at_the_configured_rate_and_keep_organs():
  """Small lesions: uniform crops rarely hold one; with positive_fraction f about f of the crops (plus the
  uniform hits) do. The organ channel under the lesion is intact."""
  from meddiff_jax.data import phantom

  p = phantom.make_phantom((64, 64, 64), (3.0, 3.0, 3.0), "abdomen", seed=2, num_lesions=1)
  labels = multilevel.with_lesions(p.labels, p.lesions)
  lut, groups = TINY_DATA.structure_lut()
  coords = multilevel.lesion_coordinates(labels)
  rng = np.random.default_rng(0)

  def hit_rate(fraction):
    hits = 0
    for _ in range(200):
      spec = sample_spec(8, lut=lut, num_groups=groups, hint="lesion", positive_fraction=fraction)
      s = multilevel.make_sample(p.hu, labels, 2, spec, rng, operation="patch", positive_coords=coords)
      hits += bool((s["hint"] > 0).any())
    return hits / 200

  uniform, half = hit_rate(0.0), hit_rate(0.5)
  assert uniform < 0.2 and half == pytest.approx(0.5 + 0.5 * uniform, abs=0.1)
  spec = sample_spec(8, lut=lut, num_groups=groups, hint="lesion", positive_fraction=1.0)
  s = multilevel.make_sample(p.hu, labels, 2, spec, rng, operation="patch", positive_coords=coords)
  spec = sample_spec(8, lut=lut, num_groups=groups)
  organs_only = multilevel.make_sample(p.hu, p.labels, 2, spec, np.random.default_rng(1), operation="patch")
  assert (s["hint"] > 0).any()
  # the same crop without lesions has the same structure channels: nothing is punched out under the lesion
  box = s["pos_box"]
  start = np.round((box[:, 0] + 1) / 2 * (np.array(p.hu.shape) - 1)).astype(int)
  crop = tuple(slice(a, a + 8) for a in start)
  np.testing.assert_array_equal(s["structures"], preprocess.structure_channels(p.labels[crop], p.hu[crop], lut, groups))
  assert organs_only["structures"].shape == s["structures"].shape


def _edge_width_native(sample, shape_z):
  """10-90% rise of the hint's z-profile, in native slices (positions from the sample's pos_box)."""
  prof = sample["hint"][..., 0].mean(axis=(0, 1))
  lo, hi = prof.min(), prof.max()
  z = np.linspace(sample["pos_box"][2, 0], sample["pos_box"][2, 1], len(prof))
  z = (z + 1) / 2 * (shape_z - 1)
  fine = np.linspace(z[0], z[-1], 2000)
  f = np.interp(fine, z, prof)
  return fine[np.argmax(f > lo + 0.9 * (hi - lo))] - fine[np.argmax(f > lo + 0.1 * (hi - lo))]


def test_sr_hint_degradation_is_the_same_in_mm_at_every_level():
  """The thick-slice hint is simulated on native slices: a step edge is blurred over the same number of
  native slices in a native patch and in a whole-volume (downsampled) sample, as at inference."""
  hu = np.full((16, 16, 48), -100.0, np.float32)
  hu[..., 24:] = 100.0
  rng = np.random.default_rng(0)
  whole = multilevel.make_sample(hu, None, 2, sample_spec(16, hint="lowres", sr_factor=5), rng, operation="whole")
  centred = sample_spec(16, hint="lowres", sr_factor=5, positive_fraction=1.0)
  patch = multilevel.make_sample(hu, None, 2, centred, rng, operation="patch", positive_coords=np.array([[8, 8, 24]]))
  w_whole, w_patch = _edge_width_native(whole, 48), _edge_width_native(patch, 48)
  assert 3.0 < w_patch < 10.0 and abs(w_whole - w_patch) < 1.5, (w_whole, w_patch)  # was 3x wider in whole


def test_sr_hint_uses_a_real_low_resolution_partner_when_given():
  hu = np.random.default_rng(0).normal(0, 50, (16, 16, 16)).astype(np.float32)
  partner = np.full(hu.shape, 40.0, np.float32)
  spec = sample_spec(16, hint="lowres")
  s = multilevel.make_sample(hu, None, 2, spec, np.random.default_rng(0), operation="patch", lowres=partner)
  np.testing.assert_allclose(s["hint"], preprocess.hu_to_unit(partner, 2)[..., None], atol=1e-6)
