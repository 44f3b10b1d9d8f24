"""train/tpu_compile.py: the optimized-HLO reader (always) and a TPU compile of a tiny step (with libtpu)."""
# ruff: noqa: E501  (the HLO fixture keeps the compiler's one-instruction-per-line text)

import dataclasses

import pytest

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


@pytest.mark.slow
@pytest.mark.skipif(not tpu_compile.libtpu_available(), reason="libtpu not installed (pip install 'jax[tpu]')")
def test_tiny_step_compiles_for_a_tpu_slice_and_the_analysis_adds_up():
  """The tiny preset's train step, compiled by the TPU compiler for 4 v5e chips (data=2 x spatial=2; the
  level-1 attention through the flash kernel, split along depth): the analysis' FLOPs match the analytic
  count, its bytes match the HLO ops it lists, memory fits."""
  from configs import pretrain
  from meddiff_jax import pretrained
  from meddiff_jax.train import throughput

  config = pretrain.get_config("tiny")
  config.mesh.update(data=2, spatial=2)
  devices = tpu_compile.topology_devices("v5e:2x2")
  assert len(devices) == 4 and devices[0].device_kind == "TPU v5 lite"
  compiled, facts = tpu_compile.compile_train_step(config, devices)
  assert facts["spec"].conv_impl == "xla" and facts["spec"].attention_impl == "flash"  # what 'auto' runs on TPU
  assert facts["mesh"]["spatial"] == 2 and config.model.conv_impl == "auto"  # the caller's config is untouched
  _, spec = pretrained.build_model(config)
  model_flops = throughput.flops_for_config(config, dataclasses.replace(spec, conv_impl="xla")) / 4
  r = tpu_compile.analyse(compiled, model_flops, devices[0].device_kind)
  # XLA counts the same convs and matmuls (no remat in tiny), minus padding taps, plus norms and the optimizer
  assert r["xla_flops"] == pytest.approx(model_flops, rel=0.35)
  assert r["hlo_bytes_total"] == pytest.approx(r["bytes_accessed"], rel=0.3)
  assert r["hlo_logical_bytes_total"] < r["hlo_bytes_total"]
  assert 0 < r["memory_per_device_gib"] < 1 and r["fits"]
  assert r["chip"]["name"] == "v5e" and 0 < r["roofline_mfu"] < 1
  assert r["top_ops"][0]["bytes"] >= r["top_ops"][-1]["bytes"]
  assert any(k.startswith("down0_res0") for k in r["bytes_by_scope"])
