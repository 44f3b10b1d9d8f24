"""The data stream as a function of (seed, global sample index): the same global batches on every mesh and
process layout, each (simulated) process loading exactly the part its devices hold, and resume positions that
do not depend on the process count. Several real processes: tests/test_multihost.py."""

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny

from meddiff_jax import checkpoint, sharding
from meddiff_jax.data import multilevel, pipeline
from meddiff_jax.train import loop
from meddiff_jax.train import step as step_lib


class Counting(pipeline.SubsetStore):
  """A store that records which volumes were read."""

  def __init__(self, base):
    super().__init__(base, list(range(len(base))))
    self.loaded = []

  def load(self, index):
    self.loaded.append(index)
    return super().load(index)


def config_of(**overrides):
  return tiny(**{"training.batch_size": 8, "data.prefetch": 0, "data.num_threads": 0, **overrides})


def layout_of(config, mesh_sizes, rules=sharding.DEFAULT_RULES):
  devices = jax.devices()[: int(np.prod(list(mesh_sizes.values())))]
  return sharding.input_layout(sharding.make_mesh(mesh_sizes, devices), rules, step_lib.batch_spec(config))


def reference(config, num_batches, seed=3, first_sample=0):
  """The global batches as one process that loads everything (no mesh) sees them."""
  it = iter(
    pipeline.make_dataset(
      pipeline.make_store(config.data),
      config.data,
      batch_size=config.training.batch_size,
      seed=seed,
      first_sample=first_sample,
    )
  )
  return [{k: v for k, v in next(it).items() if k != "operation"} for _ in range(num_batches)]


MESHES = [
  {"data": 1},
  {"data": 8},
  {"data": 4, "fsdp": 2},
  {"data": 2, "spatial": 4},
  {"data": 1, "spatial": 8},
  {"data": 2, "spatial": 2, "tensor": 2},
]


def test_the_global_batches_are_the_same_on_every_mesh():
  config = config_of()
  ref = reference(config, 2)
  for mesh_sizes in MESHES:
    layout = layout_of(config, mesh_sizes)
    batches = pipeline.GlobalBatches(pipeline.make_store(config.data), config.data, layout, seed=3)
    for k in range(2):
      batch = next(batches)
      assert set(batch) == set(ref[k])
      for key, x in batch.items():
        assert x.shape == layout[key].shape and x.sharding == layout[key].sharding, (mesh_sizes, key)
        np.testing.assert_array_equal(np.asarray(x), ref[k][key], err_msg=f"{mesh_sizes} {key}")
    assert batches.state() == {"next_sample": 16}


def test_each_sample_is_keyed_by_seed_and_global_index_and_a_stream_continues_from_its_position():
  config = config_of(**{"training.batch_size": 4})
  store = pipeline.make_store(config.data)
  ref = reference(config, 3)
  # sample g of the stream: volume volume_order[g], drawn with sample_rng(seed, g), whatever the batch it is in
  order = pipeline.volume_order(len(store), 3)
  make = pipeline.MultiLevelSample(store, config.data.sample_spec())
  for g in (0, 5, 11):
    sample = make(order[g], pipeline.sample_rng(3, g))
    for key in ref[0]:
      np.testing.assert_array_equal(sample[key], ref[g // 4][key][g % 4])
  # a stream started at sample 4 (a resumed run) is the same stream from its second batch on
  for got, want in zip(reference(config, 2, first_sample=4), ref[1:]):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  # every volume once per epoch, in a new order each epoch
  epochs = [[order[e * len(store) + i] for i in range(len(store))] for e in range(4)]
  assert all(sorted(e) == list(range(len(store))) for e in epochs)
  big = pipeline.volume_order(50, 3)
  assert [big[i] for i in range(50)] != [big[50 + i] for i in range(50)]
  assert not np.array_equal(reference(config, 1, seed=4)[0][multilevel.HU], ref[0][multilevel.HU])


def held_mask(x: jax.ShapeDtypeStruct, devices) -> np.ndarray:
  """Which elements of a global array `devices` hold (the sharding's index map, independently of local_part)."""
  mask = np.zeros(x.shape, bool)
  index_map = x.sharding.devices_indices_map(tuple(x.shape))
  for d in devices:
    mask[index_map[d]] = True
  return mask


def loaded_mask(x: jax.ShapeDtypeStruct, part: pipeline.LocalPart, key: str) -> np.ndarray:
  mask = np.zeros(x.shape, bool)
  box = tuple(slice(lo, hi) for lo, hi in part.boxes[key])
  for r in part.rows:
    mask[(r, *box)] = True
  return mask


# (mesh, processes as groups of device ids): contiguous groups are how jax orders the devices of several hosts;
# the interleaved grouping gives a process non-adjacent depth slabs (it loads the range between them too).
LAYOUTS = [
  ({"data": 1, "spatial": 8}, 2, "contiguous"),  # one sample split along depth across both processes
  ({"data": 2, "spatial": 4}, 2, "contiguous"),
  ({"data": 2, "spatial": 4}, 4, "contiguous"),  # each process: one row, half its depth
  ({"data": 8}, 4, "contiguous"),
  ({"data": 2, "fsdp": 2, "tensor": 2}, 4, "contiguous"),  # tensor: replicated inputs inside a process
  ({"data": 2, "spatial": 2, "tensor": 2}, 8, "contiguous"),  # tensor pairs across processes load the same slab
  ({"data": 2, "spatial": 4}, 2, "interleaved"),
]


@pytest.mark.parametrize("mesh_sizes,num_processes,grouping", LAYOUTS)
def test_simulated_processes_load_exactly_the_parts_their_devices_hold(mesh_sizes, num_processes, grouping):
  """Processes simulated by splitting the 8 devices into groups: each loads only the samples its devices hold
  and cuts them to its slabs; every device's piece assembled from its process's data is the global batch's;
  together the processes load the whole batch, overlapping only where the sharding replicates."""
  config = config_of()
  layout = layout_of(config, mesh_sizes)
  ref = reference(config, 2)
  devices = layout[multilevel.HU].sharding.mesh.devices.flatten().tolist()
  n = len(devices) // num_processes
  groups = (
    [devices[p * n : (p + 1) * n] for p in range(num_processes)]
    if grouping == "contiguous"
    else [devices[p::num_processes] for p in range(num_processes)]
  )
  held_count = {key: np.zeros(x.shape, int) for key, x in layout.items()}
  loaded_count = {key: np.zeros(x.shape, int) for key, x in layout.items()}
  for group in groups:
    part = pipeline.local_part(layout, group)
    store = Counting(pipeline.make_store(config.data))
    it = iter(pipeline.make_dataset(store, config.data, batch_size=8, seed=3, part=part))
    rows = pipeline.row_to_sample(part, 1)
    for k in range(2):
      local = next(it)
      assert len(store.loaded) == (k + 1) * len(part.rows)  # only its own samples are read, each once
      for key, x in layout.items():
        index_map = x.sharding.devices_indices_map(tuple(x.shape))
        for d in group:
          piece = pipeline.device_piece(local[key], part.boxes[key], rows, tuple(x.shape), index_map[d])
          np.testing.assert_array_equal(piece, ref[k][key][index_map[d]], err_msg=f"{key} on {d}")
    for key, x in layout.items():
      held, loaded = held_mask(x, group), loaded_mask(x, part, key)
      assert not (held & ~loaded).any()
      if grouping == "contiguous":
        np.testing.assert_array_equal(loaded, held)  # nothing loaded that no device of the process holds
      held_count[key] += held
      loaded_count[key] += loaded
  for key in layout:
    assert loaded_count[key].min() >= 1  # the union is the whole global batch
    if grouping == "contiguous":  # overlaps: exactly where several processes hold the same element
      np.testing.assert_array_equal(loaded_count[key], held_count[key])
  if mesh_sizes == {"data": 1, "spatial": 8}:  # both processes load all 8 samples and keep half their depth
    assert [pipeline.local_part(layout, g).boxes[multilevel.HU][0] for g in groups] == [(0, 4), (4, 8)]


def test_the_part_is_read_off_the_sharding_itself():
  config = config_of()
  layout = layout_of(config, {"data": 2, "spatial": 4})
  devices = layout[multilevel.HU].sharding.mesh.devices
  part = pipeline.local_part(layout, devices[1, 0, :2, 0].tolist())  # data row 1, the first two depth slabs
  assert part.rows == (4, 5, 6, 7)
  assert part.boxes[multilevel.HU] == ((0, 4), (0, 8), (0, 8), (0, 1)) and part.boxes["pos_box"] == ((0, 3), (0, 2))
  # rules that leave the batch unsplit: every process loads every row
  unsplit = layout_of(config, {"data": 2, "spatial": 4}, (("batch", None), ("act_depth", "spatial")))
  assert pipeline.local_part(unsplit, devices[1, 0, :2, 0].tolist()).rows == tuple(range(8))
  assert pipeline.local_part(layout).rows == tuple(range(8))  # one process: all of it


def test_previews_read_sample_zero_once_per_process_and_fill_every_row():
  config = config_of()
  layout = layout_of(config, {"data": 4, "spatial": 2})
  store = Counting(pipeline.make_store(config.data))
  batch = next(pipeline.GlobalBatches(store, config.data, layout, seed=777, repeat=8, num_batches=1))
  ref = reference(config, 1, seed=777)[0]
  assert store.loaded == [pipeline.volume_order(len(store), 777)[0]]
  for key, x in batch.items():
    np.testing.assert_array_equal(np.asarray(x), np.repeat(ref[key][:1], 8, axis=0))


def test_a_sample_that_does_not_match_the_layout_is_refused_in_one_line():
  config = config_of()
  layout = layout_of(config, {"data": 8})
  part = pipeline.local_part(layout)
  local = {k: v for k, v in reference(config, 1)[0].items()}
  rows = pipeline.row_to_sample(part, 1)
  with pytest.raises(ValueError, match=r"batch key 'hu': loaded \(8, 8, 8, 8, 1\) float64, the layout's part"):
    pipeline.assemble({**local, multilevel.HU: local[multilevel.HU].astype(np.float64)}, part, rows, layout)
  with pytest.raises(ValueError, match=r"samples carry \['hu', 'labels', 'pos_box', 'region', 'x'\]"):
    pipeline.assemble(dict(local, x=local["region"]), part, rows, layout)


def test_a_checkpoint_saves_the_stream_position_and_an_old_one_resumes_from_its_step(tmp_path, caplog):
  """The position is one number for all processes; a checkpoint written before (per-process Grain iterator
  state in item 'data') restores its state, and the stream continues at step x its batch size."""
  state = {"step": np.int32(3), "w": np.arange(4.0, dtype=np.float32)}
  abstract = jax.tree_util.tree_map(np.zeros_like, state)
  config = ml_collections.ConfigDict({"training": {"batch_size": 6}})
  ck = checkpoint.Checkpointer(str(tmp_path / "new"), asynchronous=False)
  ck.save(3, state, {"next_sample": 18}, config)
  restored = ck.restore_latest(abstract)
  assert restored.stream == {"next_sample": 18} and restored.step == 3
  ck.close()

  old_dir = str(tmp_path / "old")  # as the previous checkpoint.py wrote it
  old = ocp.CheckpointManager(
    old_dir,
    options=ocp.CheckpointManagerOptions(create=True),
    item_handlers={
      "state": ocp.StandardCheckpointHandler(),
      "data": grain.checkpoint.CheckpointHandler(),
      "config": ocp.JsonCheckpointHandler(),
    },
  )
  iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
  next(iterator)
  old.save(
    5,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(iterator),
      config=ocp.args.JsonSave(config.to_dict()),
    ),
  )
  old.wait_until_finished()
  old.close()
  restored = checkpoint.Checkpointer(old_dir).restore_latest(abstract)
  assert restored.step == 5 and restored.stream is None
  np.testing.assert_array_equal(restored.state["w"], state["w"])

  assert loop.stream_position(restored, 4) == 5 * 6  # the checkpoint's batch size, not today's
  assert any("no data stream position" in r.getMessage() for r in caplog.records)
  assert loop.stream_position(checkpoint.Checkpointer(str(tmp_path / "new")).restore_latest(abstract), 4) == 18
