"""#24: samples shipped as HU and group ids and finished on the accelerator (data.decode_on_device; with
resize_on_device, zoom2's window resized there too) equal the host's finished samples (data/multilevel.make_sample's
host path, the reference): the same operations, boxes and rng draws, the image within float32 rounding of the
resize, the same structures (body and groups), through the Grain pipeline, the train step's inputs and a depth
split without halo traffic."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import sample_spec, tiny

from meddiff_jax import sharding
from meddiff_jax.data import decode, multilevel, phantom, pipeline, preprocess, store
from meddiff_jax.models import conditions


def ct_volume(shape, seed, lesions=True):
  """int16 HU (a prepared store's dtype) and a label map with lesion codes (int16) from a phantom."""
  p = phantom.make_phantom(shape, (6.0, 6.0, 6.0), "abdomen", seed=seed, num_lesions=2 if lesions else 0)
  labels = multilevel.with_lesions(p.labels, p.lesions) if lesions else p.labels.astype(np.uint8)
  return np.round(p.hu).astype(np.int16), labels


def shipped(spec, resize=False):
  return dataclasses.replace(spec, decode_on_device=True, resize_on_device=resize, hu_dtype="int16")


def decoded(sample, spec):
  """One shipped sample -> the host path's sample, through data/decode.py (a batch of one, on CPU)."""
  batch = {k: jnp.asarray(np.asarray(v))[None] for k, v in sample.items()}
  return {k: np.asarray(v)[0] for k, v in decode.decode(batch, spec).items()}


def device_hu(sample, spec):
  if "hu" in sample:
    return np.asarray(sample["hu"])[..., 0] * multilevel.HU_STEP
  op = multilevel.OPERATIONS[int(sample["operation"])]
  x = jnp.asarray(np.asarray(sample[multilevel.SHIPPED_HU[op]]))[None]
  return np.asarray(decode.resize_half(x, spec.patch) if op == "zoom2" else x)[0, ..., 0]


def assert_same_sample(host, ship, spec):
  """The host sample and the decoded shipped one: equal but for float32 rounding of the zoom2 resize and HU shipped
  in steps of HU_STEP (image: within one step of the sample's window), and body voxels whose HU lies within that
  rounding of the threshold (none expected, but not a difference)."""
  got = decoded(ship, spec)
  lo, hi = preprocess.window_bounds(int(host[conditions.REGION]))
  step = multilevel.HU_STEP * 2 / (hi - lo) if multilevel.HU in ship else 0.0
  assert set(got) == set(host) - {"operation"}
  assert int(ship["operation"]) == int(host["operation"])
  for key in (conditions.POS_BOX, conditions.REGION, conditions.HINT):
    if key in host:
      np.testing.assert_array_equal(got[key], host[key], err_msg=key)
  np.testing.assert_allclose(got[conditions.IMAGE], host[conditions.IMAGE], rtol=0, atol=2e-6 + step)
  if conditions.STRUCTURES in host:
    a, b = got[conditions.STRUCTURES], host[conditions.STRUCTURES]
    assert a.shape == b.shape and a.dtype == b.dtype
    differ = np.any(a != b, axis=-1)
    near = np.abs(device_hu(ship, spec) + 500.0) < 1e-2
    assert not np.any(differ & ~near), f"{differ.sum()} structure voxels differ away from the body threshold"


@pytest.mark.parametrize("resize", [False, True], ids=["host-resize", "device-resize"])
@pytest.mark.parametrize("operation", multilevel.OPERATIONS)
@pytest.mark.parametrize("mode", ["packed", "one-hot", "classes"])
def test_shipped_samples_decode_to_the_host_samples(operation, mode, resize):
  lut, k = tiny().data.structure_lut()
  if mode == "classes":
    lut, k = preprocess.class_lookup({i: f"c{i}" for i in range(1, 120)}), 119
  kw = dict(lut=lut, num_groups=k, pack_structures=mode == "packed", structure_labels=mode == "classes")
  for shape, seed in (((40, 36, 44), 0), ((20, 26, 18), 1), ((50, 33, 12), 2)):  # larger / smaller than 2P
    hu, labels = ct_volume(shape, seed)
    for hint in ("", "lesion", "lowres"):
      spec = sample_spec(16, hint=hint, **kw)
      for draw in range(3):
        host = multilevel.make_sample(hu, labels, 2, spec, np.random.default_rng(draw), operation=operation)
        ship = multilevel.make_sample(
          hu, labels, 2, shipped(spec, resize), np.random.default_rng(draw), operation=operation
        )
        assert_same_sample(host, ship, shipped(spec, resize))


def test_operations_boxes_and_draws_are_the_host_paths():
  """Drawn by the spec's probabilities, with positive (lesion-centred) crops: the same operation and box for every
  seed, so the same operation frequencies; with resize_on_device the shipped HU key is the drawn operation's."""
  hu, labels = ct_volume((40, 36, 44), 3)
  lut, k = tiny().data.structure_lut()
  spec = sample_spec(16, lut=lut, num_groups=k, operation_probs=(0.2, 0.5, 0.3), positive_fraction=0.5)
  coords = multilevel.lesion_coordinates(labels)
  ops = []
  for seed in range(150):
    kw = dict(positive_coords=coords)
    host = multilevel.make_sample(hu, labels, 1, spec, np.random.default_rng(seed), **kw)
    ship = multilevel.make_sample(hu, labels, 1, shipped(spec, True), np.random.default_rng(seed), **kw)
    assert int(host["operation"]) == int(ship["operation"])
    np.testing.assert_array_equal(host["pos_box"], ship["pos_box"])
    ops.append(int(ship["operation"]))
    live = multilevel.SHIPPED_HU[multilevel.OPERATIONS[ops[-1]]]
    assert all(not np.asarray(ship[key]).any() for key in multilevel.SHIPPED_HU.values() if key != live)
  freq = np.bincount(ops, minlength=3) / len(ops)
  np.testing.assert_allclose(freq, (0.2, 0.5, 0.3), atol=0.1)


def test_the_shipped_layout_is_static_and_holds_the_store_dtype():
  hu, labels = ct_volume((40, 36, 44), 4)
  lut, k = tiny().data.structure_lut()
  for resize in (False, True):
    spec = shipped(sample_spec(16, lut=lut, num_groups=k, pack_structures=True), resize)
    layout = multilevel.shipped_layout(spec)
    assert layout["labels"] == ((16, 16, 16, 1), np.uint8)
    if resize:
      assert layout["hu_zoom2"] == ((32, 32, 32, 1), np.int16) and layout["hu_patch"] == ((16, 16, 16, 1), np.int16)
      assert layout["hu_whole"] == ((16, 16, 16, 1), np.float32) and "operation" in layout
    else:
      assert layout["hu"] == ((16, 16, 16, 1), np.int16) and "operation" not in layout
    for op in multilevel.OPERATIONS:
      s = multilevel.make_sample(hu, labels, 0, spec, np.random.default_rng(0), operation=op)
      assert {k: (np.shape(v), np.asarray(v).dtype) for k, v in s.items() if k in layout} == layout
  # only the operations that can be drawn ship a key
  patch_only = dataclasses.replace(spec, operation_probs=(0.0, 0.0, 1.0))
  assert not {"hu_whole", "hu_zoom2"} & set(multilevel.shipped_layout(patch_only))
  with pytest.raises(ValueError, match="probability 0"):
    multilevel.make_sample(hu, labels, 0, patch_only, np.random.default_rng(0), operation="zoom2")
  # shipped as read (resize_on_device): HU that int16 cannot hold exactly are refused, not rounded
  with pytest.raises(ValueError, match="cannot hold exactly"):
    multilevel.make_sample(
      hu + np.float32(0.5), labels, 0, shipped(spec, True), np.random.default_rng(0), operation="patch"
    )


def test_hu_ship_in_fixed_steps_that_keep_every_window_and_the_body_decision():
  """multilevel.fixed_point: integer HU exactly, others rounded up by less than HU_STEP (so `> BODY_THRESHOLD_HU`
  decides alike), saturated outside -4096 .. 4095.875 HU, which holds every window and the threshold; zoom2's
  halving converts slab by slab to the same steps; the device's decode is exact on them."""
  step = multilevel.HU_STEP
  ints = np.arange(-4096, 4096, dtype=np.int16)
  np.testing.assert_array_equal(multilevel.fixed_point(ints).astype(np.float64) * step, ints)
  np.testing.assert_array_equal(
    multilevel.fixed_point(np.array([-32768, -4097, 4096, 32767], np.int16)) * step, [-4096, -4096, 4095, 4095]
  )
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.uniform(-4096, 4095.8, 100_000), -500 + rng.uniform(-0.2, 0.2, 10_000)]).astype(np.float32)
  q = multilevel.fixed_point(x).astype(np.float64) * step
  assert np.all((q >= x) & (q - x < step))  # rounded up by less than one step
  assert np.array_equal(q > preprocess.BODY_THRESHOLD_HU, x > preprocess.BODY_THRESHOLD_HU)
  assert 0 < np.mean(q - x) < step  # neither exact nor truncated: the rounding is there, and bounded
  np.testing.assert_array_equal(multilevel.fixed_point(np.array([-5e4, 5e4], np.float32)) * step, [-4096, 4095.875])
  for region in range(preprocess.UNKNOWN_REGION + 1):  # every window inside the range, with a step of margin
    lo, hi = preprocess.window_bounds(region)
    assert -4096 + step <= lo < hi <= 4095
  window = rng.integers(-1024, 3071, (32, 32, 32)).astype(np.int16)
  window[:6], window[-6:] = -32768, 32767  # whole output slices saturate, both ways
  for w in (window, window.astype(np.float32), np.pad(window, 3)[3:-3, 3:-3, 3:-3]):  # a strided view as from a map
    fused = multilevel.halve(w, fixed=True)  # the conversion in the resize's pass
    np.testing.assert_array_equal(fused, multilevel.fixed_point(multilevel.halve(w)))
  assert fused[0].max() == -4096 * 8 and fused[-1].min() == 4096 * 8 - 1
  q16 = multilevel.fixed_point(x)
  got = decode.decode(
    {"hu": jnp.asarray(q16.reshape(1, -1, 1, 1, 1)), "pos_box": jnp.zeros((1, 3, 2)), "region": jnp.asarray([1])},
    sample_spec(16),
  )
  want = preprocess.hu_to_unit(q16.astype(np.float64) * step, 1).reshape(1, -1, 1, 1, 1)
  np.testing.assert_allclose(np.asarray(got["image"]), want, rtol=0, atol=1e-6)


def test_the_devices_label_lookup_is_the_hosts():
  """decode.label_groups of multilevel.label_codes (a gather from multilevel.group_table) equals the host's
  multilevel.label_groups for uint8 maps (legacy lesion 255) and int16 maps with lesion codes, grouped and classes."""
  rng = np.random.default_rng(0)
  grouped = tiny().data.structure_lut()[0]
  classes = preprocess.class_lookup({i: f"c{i}" for i in range(1, 120)})
  u8 = rng.integers(0, 256, (6, 7, 8)).astype(np.uint8)
  i16 = np.where(rng.random((6, 7, 8)) < 0.3, u8.astype(np.int16) % 200 + multilevel.LESION_OFFSET, u8).astype(np.int16)
  for lut in (grouped, classes):
    assert np.unique(multilevel.label_groups(i16, lut)).size > 3  # not all background
    for labels in (u8, i16):
      codes = multilevel.label_codes(labels, lut)
      assert codes.dtype == np.uint8 and (codes is labels) == (labels.dtype == np.uint8)  # uint8 maps as read
      got = np.asarray(decode.label_groups(jnp.asarray(codes), lut))
      np.testing.assert_array_equal(got, multilevel.label_groups(labels, lut))
  with pytest.raises(ValueError, match="label codes"):
    multilevel.label_codes(i16.astype(np.float32), grouped)


@pytest.mark.parametrize("shape", [(64, 64, 64), (32, 32, 32), (16, 16, 16)])
def test_halving_a_window_is_the_general_resize_in_float32(shape):
  """multilevel.halve (the host's zoom2 resize) and decode.resize_half (the device's) against multilevel.resize
  (scipy zoom's positions and weights, float64): within float32 rounding, and each other's (the same operations)."""
  rng = np.random.default_rng(shape[0])
  for window in (rng.integers(-1024, 3071, shape).astype(np.int16), np.full(shape, -500, np.int16)):
    want = multilevel.resize(window, tuple(n // 2 for n in shape), 1, np.float32)
    host = multilevel.halve(window)
    device = np.asarray(decode.resize_half(jnp.asarray(window)[None, ..., None], shape[0] // 2))[0, ..., 0]
    np.testing.assert_allclose(host, want, rtol=0, atol=1e-3)  # |HU| < 3072: float32 rounding of three lerps
    np.testing.assert_allclose(device, host, rtol=0, atol=1e-3)
    assert np.abs(host - want).max() > 0 or window.min() == window.max()  # not the same code
  np.testing.assert_array_equal(multilevel.halve(np.full(shape, -500, np.int16)), -500.0)  # uniform stays exact


@pytest.mark.parametrize("fmt", store.FORMATS)
def test_stored_volumes_and_whole_levels_ship_and_decode_like_the_host_path(tmp_path, fmt):
  """From a prepared store (zarr through TensorStore, memory-mapped .npy), whole levels stored: the same samples."""
  lut, k = tiny().data.structure_lut()
  for i, shape in enumerate(((40, 36, 44), (20, 26, 18))):
    hu, labels = ct_volume(shape, i)
    store.write_record(str(tmp_path), f"v{i}", hu, labels, {"region": "chest"}, fmt=fmt, whole_sizes=(16,))
  ps = store.PreparedStore(str(tmp_path))
  spec = sample_spec(16, lut=lut, num_groups=k, pack_structures=True)
  host = pipeline.MultiLevelSample(ps, spec)
  for resize in (False, True):
    ship = pipeline.MultiLevelSample(ps, shipped(spec, resize))
    for i in range(2):
      for seed in range(6):
        want, got = host(i, np.random.default_rng(seed)), ship(i, np.random.default_rng(seed))
        assert_same_sample(want, got, shipped(spec, resize))


def test_windows_read_into_reused_memory_never_reach_a_sample(tmp_path):
  """zoom2 windows from a zarr store are read into each thread's reused array (multilevel.Scratch): samples made one
  after another, then compared, equal the host path's, with the window shipped (resize_on_device) or halved here; a
  read into reused memory is the read; threads get their own arrays; a pickled Scratch starts empty."""
  import pickle
  import threading

  hu, labels = ct_volume((40, 36, 44), 0)
  store.write_record(str(tmp_path), "v0", hu, labels, {"region": "chest"}, fmt="zarr")
  ps = store.PreparedStore(str(tmp_path))
  lut, k = tiny().data.structure_lut()
  spec = sample_spec(16, lut=lut, num_groups=k, pack_structures=True, operation_probs=(0.0, 1.0, 0.0))
  host = pipeline.MultiLevelSample(ps, spec)
  for resize in (False, True):
    ship = pipeline.MultiLevelSample(ps, shipped(spec, resize))
    made = [ship(0, np.random.default_rng(seed)) for seed in range(5)]  # all made before any is compared
    for seed, got in enumerate(made):
      assert_same_sample(host(0, np.random.default_rng(seed)), got, shipped(spec, resize))

  volume, scratch = store.open_array(str(tmp_path / ps.records[0]["image"])), multilevel.Scratch()
  read = lambda start: multilevel.start_crop(volume, np.array(start), np.array([32] * 3), -1000.0, scratch=scratch)()
  first = read((0, 0, 0))
  np.testing.assert_array_equal(first, hu[:32, :32, :32])
  second = read((8, 4, 12))
  assert second is first  # the same memory, now the second window
  np.testing.assert_array_equal(second, hu[8:40, 4:36, 12:44])
  other = []
  thread = threading.Thread(target=lambda: other.append(scratch.array((32,) * 3, np.int16)))
  thread.start()
  thread.join()
  assert other[0] is not scratch.array((32,) * 3, np.int16)
  assert getattr(pickle.loads(pickle.dumps(scratch))._local, "held", None) is None
  with pytest.raises(ValueError, match="read into"):
    volume.read_async((slice(0, 8),) * 3, out=np.empty((8, 8, 9), np.int16))
  # windows that reach outside the volume: the inside read into the reused array, only the outside filled (a
  # window read before leaves nothing behind), from zarr and from an array (a memory map) alike
  size = np.array([48, 40, 56])
  for source in (volume, hu):
    for start in ((-5, 2, 3), (-4, -2, -6), (0, 10, -30), (30, 20, 40), (100, 0, 0)):
      start = np.array(start)
      multilevel.start_crop(source, np.zeros(3, int), size, 7.0, scratch=scratch)()  # leave other values behind
      got = multilevel.start_crop(source, start, size, -1000.0, scratch=scratch)()
      assert got is scratch.array(tuple(size), np.int16)  # every one of these windows is padded
      np.testing.assert_array_equal(got, multilevel.crop_padded(hu, start, size, -1000.0), err_msg=str(start))


def test_nearest_gathers_equal_crop_then_resize(tmp_path):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 200, (70, 50, 40)).astype(np.uint8)
  store.write_array(str(tmp_path / "l.zarr"), labels)
  for volume in (labels, store.open_array(str(tmp_path / "l.zarr"))):
    for start, size in (((3, 5, 2), (32, 32, 32)), ((-7, 30, 20), (32, 32, 32)), ((60, -40, 30), (32, 16, 64))):
      start, size = np.array(start), np.array(size)
      want = multilevel.resize(multilevel.crop_padded(labels, start, size, 0), (16, 16, 16), 0)
      np.testing.assert_array_equal(multilevel.gather_nearest(volume, start, size, (16, 16, 16), 0), want)
      begun = multilevel.start_gather_nearest(volume, start, size, 0, (16, 16, 16))  # the inside into its block
      np.testing.assert_array_equal(begun(), want)
  zarr = store.open_array(str(tmp_path / "l.zarr"))
  np.testing.assert_array_equal(zarr[5:60, 3:49, 1:40], labels[5:60, 3:49, 1:40])


def test_gathers_as_strided_boxes_equal_numpy(tmp_path):
  """ChunkedVolume.oindex as strided box reads (an index of a few arithmetic runs per axis, e.g. zoom2's nearest
  2P -> P) equals numpy's gather; indices that repeat, step back or need more boxes take TensorStore's oindex."""
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 200, (70, 50, 40)).astype(np.uint8)
  labels[:, :20] = 0  # whole chunks absent from the store (their fill value), as background is
  store.write_array(str(tmp_path / "l.zarr"), labels, chunk=16)
  local = store.open_array(str(tmp_path / "l.zarr"))
  assert local.strided_gathers  # what the pipeline reads local zarr stores with
  plain = store.ChunkedVolume(local._array, strided_gathers=False)
  half = multilevel.nearest_indices(32, 16)
  cases = [
    [3 + half, 5 + half, 2 + half],  # zoom2: two runs of step 2 per axis, 8 boxes
    [np.arange(4, 60, 3), np.array([0, 1, 2, 7, 9, 11, 40, 41]), np.array([5])],  # several runs: oindex
    [np.array([1, 1, 2]), np.arange(10), np.arange(0, 40, 4)],  # a repeat: oindex
    [np.array([9, 3]), np.arange(10), np.arange(3)],  # backwards: oindex
  ]
  for index in cases:
    want = labels[np.ix_(*index)]
    for volume in (local, plain):
      np.testing.assert_array_equal(volume.oindex(index), want)
  assert store._arithmetic_runs(half) == [(0, 0, 2, 8), (8, 17, 2, 8)]


@pytest.mark.parametrize("resize", [False, True], ids=["host-resize", "device-resize"])
def test_the_pipeline_and_the_train_step_see_the_host_paths_batches(resize):
  """Grain batches of either path give the model the same inputs; the step decodes before the dropouts."""
  from meddiff_jax.train import step as step_lib

  seen = []

  def apply_fn(variables, x, t, cond, train=False, rngs=None):
    seen.append(cond)
    return jnp.zeros_like(x)

  configs = {
    flag: tiny(**{"data.decode_on_device": flag, "data.resize_on_device": flag and resize, "data.source": "phantom"})
    for flag in (False, True)
  }
  batches = {}
  for flag, config in configs.items():
    ds = pipeline.make_dataset(pipeline.make_store(config.data), config.data, batch_size=8, seed=1)
    batches[flag] = next(iter(ds))
  assert "image" in batches[False] and ("hu_zoom2" if resize else "hu") in batches[True]
  np.testing.assert_array_equal(batches[False]["operation"], batches[True]["operation"])
  assert len(set(batches[True]["operation"].tolist())) > 1
  # phantoms are float32 HU: shipped as read (resize_on_device) they ship as float32, exactly; else in HU_STEPs
  assert batches[True]["hu_patch" if resize else "hu"].dtype == (np.float32 if resize else np.int16)
  finished = decode.decode({k: jnp.asarray(v) for k, v in batches[True].items()}, configs[True].data.sample_spec())
  narrowest = min(np.diff(preprocess.window_bounds(r))[0] for r in range(preprocess.UNKNOWN_REGION + 1))
  step = 0 if resize else multilevel.HU_STEP * 2 / narrowest
  np.testing.assert_allclose(np.asarray(finished["image"]), batches[False]["image"], atol=2e-6 + step)
  np.testing.assert_array_equal(np.asarray(finished["structures"]), batches[False]["structures"])
  for flag, config in configs.items():
    spec = step_lib.batch_spec(config)
    assert {k: (v.shape, v.dtype) for k, v in spec.items()} == {
      k: (v.shape, v.dtype) for k, v in batches[flag].items() if k != "operation" or (flag and resize)
    }
    loss_fn = step_lib.make_loss_fn(apply_fn, config.diffusion.make_schedule(), config.diffusion, config.model)
    batch = {k: jnp.asarray(v) for k, v in batches[flag].items() if k != "operation" or (flag and resize)}
    loss_fn({}, step_lib.decode_inputs(config)(batch), jax.random.key(0))
  for key in seen[0]:
    np.testing.assert_allclose(np.asarray(seen[0][key]), np.asarray(seen[1][key]), atol=2e-6, err_msg=key)


def test_a_depth_split_decodes_without_collectives():
  """hu_zoom2 split along depth over `spatial` decodes into the image split the same way: equal to one device, and
  the compiled decode moves no data between devices (output depth k reads window rows 2k, 2k + 1 only)."""
  config = tiny(**{"data.decode_on_device": True, "data.resize_on_device": True})
  spec = config.data.sample_spec()
  rules = sharding.DEFAULT_RULES
  mesh = sharding.make_mesh({"data": 2, "spatial": 4})
  ds = pipeline.make_dataset(pipeline.make_store(config.data), config.data, batch_size=4, seed=2)
  local = next(iter(ds))
  shapes = decode.batch_shapes(spec, 4)
  shardings = sharding.input_shardings(mesh, rules, shapes)
  batch = {k: jax.device_put(v, shardings[k]) for k, v in local.items()}
  assert batch["hu_zoom2"].addressable_shards[0].data.shape == (2, 4, 16, 16, 1)
  out_shardings = {
    k: sharding.input_shardings(mesh, rules, {k: v})[k]
    for k, v in jax.eval_shape(lambda b: decode.decode(b, spec), shapes).items()
  }
  fn = jax.jit(lambda b: decode.decode(b, spec), in_shardings=(shardings,), out_shardings=out_shardings)
  hlo = fn.lower(batch).compile().as_text()
  for collective in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
    assert collective not in hlo, collective
  got = fn(batch)
  want = decode.decode({k: jnp.asarray(v) for k, v in local.items()}, spec)
  assert got["image"].sharding.shard_shape(got["image"].shape) == (2, 2, 8, 8, 1)
  for key in want:  # the image within float32 rounding (XLA fuses the jitted lerps differently)
    np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=0, atol=1e-6, err_msg=key)
