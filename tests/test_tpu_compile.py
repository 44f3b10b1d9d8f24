"""train/tpu_compile.py and the TPU side of sharding.py / the dry run: the optimized-HLO reader and the roofline
(always); with libtpu (the test extra), meshes on real TPU topologies and TPU compiles of the tiny step through
`--config.dry_run_topology`, all on this CPU host."""
# ruff: noqa: E501  (the HLO fixture keeps the compiler's one-instruction-per-line text)

import json
import os

import jax
import numpy as np
import pytest
from conftest import run_main

from meddiff_jax import checks, sharding
from meddiff_jax.configs import pretrain
from meddiff_jax.train import tpu_compile

# A hand-written scheduled module in the TPU compiler's text form: an entry with a fusion, a conv fusion,
# a copy, a while loop whose body holds an all-reduce, and async copy halves.
HLO = """HloModule jit_step, is_scheduled=true

%fused_computation.1 (param_0: bf16[4,128,128,32]) -> bf16[4,128,128,32] {
  %param_0 = bf16[4,128,128,32]{2,3,1,0:T(8,128)(2,1)} parameter(0)
  ROOT %negate.1 = bf16[4,128,128,32]{2,3,1,0:T(8,128)(2,1)} negate(%param_0), metadata={op_name="jit(step)/UNet3D/encoder/down0_res0/neg"}
}

%body (p: (s32[], f32[1000])) -> (s32[], f32[1000]) {
  %p = (s32[], f32[1000]{0:T(1024)}) parameter(0)
  %g0 = s32[]{:T(128)} get-tuple-element(%p), index=0
  %g1 = f32[1000]{0:T(1024)} get-tuple-element(%p), index=1
  %all-reduce.3 = f32[1000]{0:T(1024)} all-reduce(%g1), replica_groups={}, to_apply=%add, metadata={op_name="jit(step)/while/body/reduce_sum"}
  ROOT %t = (s32[], f32[1000]{0:T(1024)}) tuple(%g0, %all-reduce.3)
}

ENTRY %main (x: bf16[4,128,128,32], k: bf16[3,3,3,32,32]) -> bf16[4,128,128,32] {
  %x = bf16[4,128,128,32]{2,3,1,0:T(8,128)(2,1)} parameter(0)
  %k = bf16[3,3,3,32,32]{4,3,2,1,0:T(8,128)(2,1)} parameter(1)
  %copy-start = (bf16[3,3,3,32,32]{4,3,2,1,0:T(8,128)(2,1)S(1)}, bf16[3,3,3,32,32]{4,3,2,1,0:T(8,128)(2,1)}, u32[]{:S(2)}) copy-start(%k)
  %copy-done = bf16[3,3,3,32,32]{4,3,2,1,0:T(8,128)(2,1)S(1)} copy-done(%copy-start)
  %fusion.1 = bf16[4,128,128,32]{2,3,1,0:T(8,128)(2,1)} fusion(%x), kind=kLoop, calls=%fused_computation.1, metadata={op_name="jit(step)/UNet3D/encoder/down0_res0/neg"}, backend_config={"estimated_cycles":"1000"}
  %copy.2 = bf16[4,128,128,32]{3,2,1,0:T(8,128)(2,1)} copy(%fusion.1), metadata={op_name="jit(step)/transpose(jvp(UNet3D))/decoder/up0_res1/conv1/conv_general_dilated"}, backend_config={"estimated_cycles":"250"}
  %w = (s32[], f32[1000]{0:T(1024)}) while(%init), condition=%cond, body=%body
  ROOT %r = bf16[4,128,128,32]{2,3,1,0:T(8,128)(2,1)} negate(%copy.2)
}
"""

MiB = 2**20


def test_shape_bytes_pads_minor_dims_to_the_tile():
  # channels (32) as the minor dim of a T(8,128) tile: stored padded to 128 lanes, 4x the logical bytes
  minor_c = "bf16[4,128,128,32]{3,2,1,0:T(8,128)(2,1)}"
  assert tpu_compile.shape_bytes(minor_c, tiled=False) == 4 * 128 * 128 * 32 * 2
  assert tpu_compile.shape_bytes(minor_c) == 4 * 128 * 128 * 128 * 2
  # a spatial dim of 128 minor and channels second-minor: no padding
  assert tpu_compile.shape_bytes("bf16[4,128,128,32]{2,3,1,0:T(8,128)(2,1)}") == 4 * 128 * 128 * 32 * 2
  # second-minor padded to 8, minor to 128; tuples add up; no layout: logical
  assert tpu_compile.shape_bytes("f32[3,5]{1,0:T(8,128)}") == 8 * 128 * 4
  assert tpu_compile.shape_bytes("(f32[3,5]{1,0:T(8,128)}, s32[7])") == 8 * 128 * 4 + 7 * 4
  assert tpu_compile.shape_bytes("f32[1000]{0:T(1024)}") == 1024 * 4


def test_hlo_ops_counts_operands_and_outputs_of_scheduled_ops():
  ops = {o["name"]: o for o in tpu_compile.hlo_ops(HLO)}
  # views, parameters, the while op itself and async done-halves are free; the loop body is read
  assert set(ops) == {"copy-start", "fusion.1", "copy.2", "all-reduce.3", "r"}
  act = 4 * 128 * 128 * 32 * 2
  assert ops["fusion.1"]["bytes"] == 2 * act  # read x, write its output: no padding in this layout
  assert ops["fusion.1"]["cycles"] == 1000 and ops["fusion.1"]["kind"] == "fusion:kLoop"
  assert ops["copy.2"]["bytes"] == act + 4 * act  # writes a channels-minor layout: 4x padded
  assert ops["copy.2"]["logical_bytes"] == 2 * act
  assert ops["all-reduce.3"]["bytes"] == 2 * 1024 * 4
  kernel = 3 * 3 * 3 * 32 * 128 * 2  # minor 32 -> 128
  assert (
    ops["copy-start"]["bytes"] == 2 * kernel + 4
  )  # async start: operand + copy (+ a u32 flag), not the operand twice
  assert ops["copy.2"]["scope"].endswith("decoder/up0_res1/conv1/conv_general_dilated")
  # an op without op_name (a compiler-inserted copy, here the root) is charged to its operand's module
  assert ops["r"]["op_name"] == ops["copy.2"]["op_name"] and ops["r"]["bytes"] == 4 * act + act
  scopes = tpu_compile.by_scope(list(ops.values()))
  assert scopes["down0_res0"] == 2 * act and scopes["up0_res1"] == 10 * act
  assert scopes["unattributed"] == ops["copy-start"]["bytes"]  # its operand is a parameter: no name to inherit
  assert scopes["step"] == ops["all-reduce.3"]["bytes"]  # named, in the loop, outside the model
  assert set(scopes) == {"down0_res0", "up0_res1", "unattributed", "step"}
  # only the while body runs once per micro-step; the rest once per step
  assert [n for n, o in ops.items() if o["in_loop"]] == ["all-reduce.3"]
  outside = sum(o["bytes"] for o in ops.values()) - ops["all-reduce.3"]["bytes"]
  total = outside + ops["all-reduce.3"]["bytes"]  # what XLA's cost analysis counts: the body once
  per = tpu_compile.per_micro_step(7.0, total, list(ops.values()), loop_trips=4)
  assert per["once_per_step_bytes"] == outside and per["flops"] == 7.0
  assert per["bytes"] == pytest.approx(ops["all-reduce.3"]["bytes"] + outside / 4)  # 4 x body + outside, / 4
  assert tpu_compile.per_micro_step(7.0, total, list(ops.values()), loop_trips=1)["bytes"] == total


def test_roofline_and_chips():
  v5p = tpu_compile.chip_for("TPU v5")
  assert v5p.name == "v5p" and tpu_compile.chip_for("TPU v5 lite").name == "v5e"
  assert tpu_compile.chip_for("TPU v5p").name == "v5p" and tpu_compile.chip_for("cpu") is None
  assert {c.name for c in tpu_compile.CHIPS} == {"v4", "v5e", "v5p", "v6e"}
  r = tpu_compile.roofline(1e12, 1.2e12, 2 * v5p.hbm_bytes_per_s, v5p)  # 2 s of HBM, 2.6 ms of FLOPs
  assert r["bound"] == "memory" and r["roofline_s"] == pytest.approx(2.0)
  assert r["roofline_mfu"] == pytest.approx(1e12 / (2.0 * v5p.peak_flops))
  r = tpu_compile.roofline(1e12, 1.2e12, 0.0, v5p)
  assert r["bound"] == "compute" and r["roofline_mfu"] == pytest.approx(1 / 1.2)


needs_libtpu = pytest.mark.skipif(not tpu_compile.libtpu_available(), reason="no libtpu (pip install -e '.[test]')")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other test processes on this host may hold libtpu


def block(mesh: jax.sharding.Mesh, axis: str, index: tuple[int, ...]) -> np.ndarray:
  """Torus coordinates of the devices along mesh `axis` at `index` of the other axes: (axis size, 3)."""
  names = list(mesh.axis_names)
  where = list(index)
  where.insert(names.index(axis), slice(None))
  return np.array([d.coords for d in mesh.devices[tuple(where)]])


def compact(coords: np.ndarray) -> bool:
  """Whether devices fill a box of the torus (no gaps): each group of an axis then talks over its own links."""
  return int(np.prod(coords.max(0) - coords.min(0) + 1)) == len(coords) == len({tuple(c) for c in coords})


@needs_libtpu
@pytest.mark.parametrize(
  "topology,sizes,inner",
  [
    ("v5p:4x4x4", {"data": 8, "spatial": 8}, "spatial"),  # 8 = 4 x half of a 4: splits a physical axis
    ("v5p:4x4x4", {"data": 64}, "data"),
    ("v5p:4x4x4", {"fsdp": 16, "data": 4}, "fsdp"),
    ("v5e:4x4", {"data": 2, "spatial": 8}, "spatial"),
  ],
)
def test_any_axis_sizes_map_onto_a_tpu_torus_with_the_busy_axis_on_a_compact_block(topology, sizes, inner):
  """Logical sizes that are no product of whole physical axes (data=8 x spatial=8 on 4x4x4) still make a mesh
  (jax.make_mesh refuses them), every chip once, and each group of the busiest axis (spatial, fsdp) fills a box of
  the torus: its collectives stay on the group's own links."""
  devices = tpu_compile.topology_devices(topology)
  mesh = sharding.make_mesh(sizes, devices)
  expected = sharding.resolve_mesh_sizes(sizes, len(devices))
  assert dict(mesh.shape) == expected
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
  others = [n for a, n in mesh.shape.items() if a != inner]
  for index in np.ndindex(*others):
    assert compact(block(mesh, inner, index)), (inner, index, block(mesh, inner, index).tolist())
  if topology == "v5p:4x4x4" and sizes.get("spatial") == 8:
    with pytest.raises(NotImplementedError, match="Failed to find assignment"):  # what the mesh was built with
      jax.make_mesh(tuple(expected.values()), sharding.MESH_AXES, devices=devices)


@needs_libtpu
def test_several_slices_put_data_across_slices_and_keep_each_sample_inside_one():
  """Two v5p:2x2x2 slices (16 chips): data=2 goes over the data-centre network, each sample's spatial group of 8
  stays on one slice's ICI; a mesh that would split samples across slices is refused in one line."""
  from jax.experimental import topologies

  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2", num_slices=2).devices
  assert sharding.num_slices(devices) == 2
  mesh = sharding.make_mesh({"data": 2, "spatial": 8}, devices)
  for i in range(2):
    assert {d.slice_index for d in mesh.devices[i].flat} == {i}
  with pytest.raises(ValueError, match=r"config.mesh.data \(or fsdp\) must be a multiple of the slice count 2"):
    sharding.make_mesh({"data": 1, "spatial": 16}, devices)


def test_a_topology_that_does_not_exist_is_refused_by_the_check_in_one_line():
  config = pretrain.get_config("tiny")
  config.dry_run_topology = "v9z:1x1"
  with pytest.raises(ValueError, match=r"cannot describe TPU topology 'v9z:1x1' \(.*\); names look like") as e:
    checks.pretrain(config)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("key,value", [("dry_run", True), ("dry_run_topology", "v5p:2x2x1")])
def test_controlnet_refuses_a_dry_run_instead_of_training(key, value):
  from meddiff_jax.configs import controlnet

  config = controlnet.get_config()
  setattr(config, key, value)
  with pytest.raises(ValueError, match="dry runs compile pretraining only"):
    checks.controlnet(config)


def dry_run(topology: str, tmp_path, *overrides: str) -> dict:
  """`python -m meddiff_jax.main --config=pretrain:tiny --config.dry_run_topology=TOPOLOGY ...`: its JSON line."""
  args = [f"--config.dry_run_topology={topology}", *overrides]
  out = run_main("--config=pretrain:tiny", f"--workdir={tmp_path}", *args, timeout=1500)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize(
  "topology,mesh,chip,hosts,conv_impl,accum",
  [
    ("v5e:2x2", ("data=2", "spatial=2"), "v5e", 1, "xla", 1),
    ("v5p:2x2x2", ("data=2", "spatial=4"), "v5p", 2, "auto", 2),  # as a TPU host resolves it: folded
  ],
)
def test_the_dry_run_compiles_the_tiny_step_for_a_tpu_slice_that_is_not_here(
  tmp_path, topology, mesh, chip, hosts, conv_impl, accum
):
  """The tiny preset compiled by the TPU compiler for a v5e and a (2-host) v5p slice on this CPU host: the chip,
  its HBM and the fit, XLA's FLOPs per chip near the analytic count, and a roofline step time that is the slower
  of the FLOP time and the HBM time at the chip's peaks, with the optimizer's bytes spread over the micro-steps."""
  accumulate = (f"--config.training.batch_size={2 * accum}", f"--config.training.grad_accum_steps={accum}")
  result = dry_run(
    topology, tmp_path, *(f"--config.mesh.{m}" for m in mesh), f"--config.model.conv_impl={conv_impl}", *accumulate
  )
  peaks = {c.name: c for c in tpu_compile.CHIPS}[chip]
  assert result["topology"] == topology and result["chip"] == chip and result["num_hosts"] == hosts
  assert result["num_devices"] == 4 * hosts and result["mesh"]["spatial"] == int(mesh[1].split("=")[1])
  assert result["device_kind"] == peaks.device_kind and result["hbm_gib_per_chip"] == peaks.hbm_gib
  assert 0 < result["memory_per_device_gib"] < 1 and result["fits"] is True
  # XLA counts the same convs and matmuls (no remat in tiny), minus padding taps, plus norms and the optimizer;
  # folded (tiny folds 2 voxels at level 0) runs level 0's convs on a 2x kernel: more, never fewer
  xla_flops, model_flops = result["xla_flops_per_chip_micro_step"], result["flops_per_device"] / accum
  if conv_impl == "xla":
    assert xla_flops == pytest.approx(model_flops, rel=0.35)
  else:
    assert model_flops < xla_flops < 2.2 * model_flops
  flop_s = result["xla_flops_per_chip_micro_step"] / peaks.peak_flops
  # the once-per-step ops (optimizer, EMA) outside the accumulation loop are spread over its micro-steps
  once = result["once_per_step_bytes_per_chip"]
  assert result["grad_accum_steps"] == accum
  assert 0 < once < result["bytes_accessed_per_chip_micro_step"]
  hbm_s = (result["bytes_accessed_per_chip_micro_step"] - once + once / accum) / peaks.hbm_bytes_per_s
  assert result["roofline_step_s"] == pytest.approx(accum * max(flop_s, hbm_s))
  assert result["bound"] == ("memory" if hbm_s > flop_s else "compute") and 0 < result["roofline_mfu"] < 1
