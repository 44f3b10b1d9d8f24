"""Sharded train step vs single device, shardings, loss decrease, NaN guard, gradient accumulation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build_step, fixed_batch, tiny, tiny_config, unet_spec
from jax.sharding import PartitionSpec as P

from meddiff_jax import checks, sharding
from meddiff_jax.data import pipeline
from meddiff_jax.models import unet3d
from meddiff_jax.train import dry_run, loop, throughput
from meddiff_jax.train import step as step_lib


def build(config, mesh_sizes):
  b = build_step(config, mesh_sizes)
  return b.mesh, b.rules, b.state, b.shardings, b.step, b.batch_shardings


def run_steps(config, mesh_sizes, batch, n):
  mesh, rules, st, shardings, jitted, batch_sh = build(config, mesh_sizes)
  losses = []
  with sharding.activate(mesh, rules):
    gbatch = {k: jax.device_put(v, batch_sh[k]) for k, v in batch.items()}
    for _ in range(n):
      st, metrics = jitted(st, gbatch)
      losses.append(float(metrics["loss"]))
  return st, losses, shardings


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_sharded_step_matches_single_device(accum):
  config = tiny(**{"training.grad_accum_steps": accum, "model.channel_mult": (1, 2), "model.base_channels": 8})
  batch = fixed_batch(config)
  single, l1, _ = run_steps(config, {"data": 1, "fsdp": 1, "tensor": 1}, batch, 2)
  sharded, l8, shardings = run_steps(config, {"data": 4, "fsdp": 2, "tensor": 1}, batch, 2)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6),
    sharded.params,
    single.params,
  )
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6),
    sharded.ema_params,
    single.ema_params,
  )
  # FSDP really shards: some conv kernel is split over fsdp, and Adam moments follow their params.
  kernel_sh = shardings.params["encoder"]["down1_res0"]["conv1"]["kernel"]
  assert kernel_sh.spec == P(None, None, None, "fsdp", "tensor")  # tensor has size 1 here
  assert sharded.params["encoder"]["down1_res0"]["conv1"]["kernel"].sharding.spec == kernel_sh.spec
  mu = sharded.opt_state[1][0].mu["encoder"]["down1_res0"]["conv1"]["kernel"]
  assert mu.sharding.spec == kernel_sh.spec


@pytest.mark.slow
def test_param_shardings_follow_rules_and_drop_indivisible_axes():
  config = tiny()
  mesh, rules, st, shardings, _, _ = build(config, {"data": 2, "fsdp": 2, "tensor": 2})
  out_conv = shardings.params["decoder"]["out_conv"]
  # (3,3,3,8,1): conv_in -> fsdp divides 8, conv_out -> tensor cannot split 1 channel
  assert out_conv["kernel"].spec == P(None, None, None, "fsdp", None)
  assert out_conv["bias"].spec == P(None)
  dense = shardings.params["encoder"]["time_mlp2"]["kernel"]  # (32, 32): embed->fsdp, mlp->tensor
  assert dense.spec == P("fsdp", "tensor")
  norm = shardings.params["encoder"]["down0_res0"]["norm1"]["GroupNorm_0"]["scale"]
  assert norm.spec == P(None)
  assert sharding.fit_spec(P("fsdp"), (9,), mesh) == P(None)
  assert sharding.fit_spec(P("fsdp", None), (8, 8), mesh, min_shard_size=100) == P()
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh({"data": 4, "fsdp": 4})
  with pytest.raises(ValueError, match="at most one"):  # the config's mesh section, checked once
    sharding.MeshSpec(data=-1, fsdp=-1, spatial=1, tensor=1)


@pytest.mark.slow
def test_loss_falls_on_a_fixed_batch():
  config = tiny(**{"optimizer.learning_rate": 3e-3, "optimizer.warmup_steps": 1, "diffusion.cond_drop_prob": 0.0})
  batch = fixed_batch(config)
  _, losses, _ = run_steps(config, {"data": 1}, batch, 50)
  assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), losses


@pytest.mark.slow
def test_non_finite_updates_are_skipped_and_counted():
  config = tiny()
  batch = fixed_batch(config)
  mesh, rules, st, _, jitted, batch_sh = build(config, {"data": 1})
  before = jax.tree_util.tree_map(np.asarray, st.params)
  key = "hu" if "hu" in batch else "image"  # shipped HU (data.decode_on_device) or the finished image
  x = batch[key]
  bad = dict(batch, **{key: np.where(np.arange(x.size).reshape(x.shape) == 3, np.nan, x).astype(np.float32)})
  with sharding.activate(mesh, rules):
    st, m1 = jitted(st, {k: jax.device_put(v, batch_sh[k]) for k, v in bad.items()})
    st, m2 = jitted(st, {k: jax.device_put(v, batch_sh[k]) for k, v in bad.items()})
  assert float(m2["finite"]) == 0 and int(m2["consecutive_nan"]) == 2 and int(m2["nan_skips"]) == 2
  assert int(st.step) == 2
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), st.params, before)
  with pytest.raises(loop.NonFiniteError, match="2 consecutive"):
    loop._check_finite(m2, 1, limit=2)
  with sharding.activate(mesh, rules):
    st, m3 = jitted(st, {k: jax.device_put(v, batch_sh[k]) for k, v in batch.items()})
  assert float(m3["finite"]) == 1 and int(m3["consecutive_nan"]) == 0 and int(m3["nan_skips"]) == 2


def test_config_validation_messages():
  config = tiny_config(**{"model.structure_channels": 3})
  with pytest.raises(ValueError, match="structure_channels=3"):
    checks.pretrain(config)
  config = tiny_config(**{"data.patch_size": 7})
  with pytest.raises(ValueError, match="patch_size=7"):
    checks.pretrain(config)
  config = tiny_config(**{"data.source": "prepared"})
  with pytest.raises(ValueError, match="prepared_dir"):
    checks.pretrain(config)


def assert_trees_close(a, b, rtol=2e-4, atol=2e-6):
  jax.tree_util.tree_map(
    lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b
  )


@pytest.mark.slow
def test_spatially_sharded_step_matches_single_device():
  """Each sample split along depth over 4 devices (x 2 data shards): same loss, params and EMA as one
  device, inputs really split along depth, and XLA exchanges halos (collective-permute), not whole maps."""
  # data.resize_on_device: the 2P^3 zoom2 window ships too and must split along depth like the image it becomes
  config = tiny(**{"training.batch_size": 4, "training.grad_accum_steps": 2, "data.resize_on_device": True})
  batch = fixed_batch(config)
  single, l1, _ = run_steps(config, {"data": 1}, batch, 2)
  mesh_sizes = {"data": 2, "spatial": 4}
  sharded, l8, _ = run_steps(config, mesh_sizes, batch, 2)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  assert_trees_close(sharded.params, single.params)
  assert_trees_close(sharded.ema_params, single.ema_params)
  mesh, rules, st, _, jitted, batch_sh = build(config, mesh_sizes)
  # shipped samples (data.decode_on_device): the 2P^3 zoom2 window splits along depth like the image it becomes
  assert batch_sh["hu_zoom2"].spec == batch_sh["hu_patch"].spec == P(("data", "fsdp"), "spatial")
  assert batch_sh["pos_box"].spec == P(("data", "fsdp"))
  with sharding.activate(mesh, rules):
    gbatch = {k: jax.device_put(v, batch_sh[k]) for k, v in batch.items()}
    assert gbatch["hu_patch"].addressable_shards[0].data.shape == (2, 2, 8, 8, 1)  # 4 samples / 2, depth 8 / 4
    assert gbatch["hu_zoom2"].addressable_shards[0].data.shape == (2, 4, 16, 16, 1)
    hlo = jitted.lower(st, gbatch).compile().as_text()
  assert "collective-permute" in hlo


def test_batch_plan_is_checked_against_the_mesh_with_a_fix(tmp_path):
  rules = sharding.DEFAULT_RULES
  plan = lambda b, k, n, **axes: sharding.check_plan(b, k, 128, 4, sharding.resolve_mesh_sizes(axes, n), rules)
  from meddiff_jax.configs import pretrain

  paper = pretrain.get_config("paper")
  # The paper preset ('auto' data and accumulation): samples whole on up to 4 devices, then split along depth.
  expected = {1: (4, 1, 1), 2: (2, 2, 1), 4: (1, 4, 1), 8: (1, 4, 2), 64: (1, 4, 16)}  # n: (accum, data, spatial)
  for n, (accum, data, spatial) in expected.items():
    k, sizes = sharding.resolve_plan(4, paper.training.grad_accum_steps, dict(paper.mesh), n, rules)
    assert (k, sizes["data"], sizes["spatial"], sizes["fsdp"]) == (accum, data, spatial, 1), n
    sharding.check_plan(4, k, paper.data.patch_size, len(paper.model.channel_mult), sizes, rules)
  # 'auto' next to numbered axes: data x fsdp shards of whole samples, the rest along depth; numbers pass through
  k, sizes = sharding.resolve_plan(8, "auto", {"data": "auto", "fsdp": 2, "spatial": -1}, 16, rules)
  assert (k, sizes) == (1, {"data": 4, "fsdp": 2, "spatial": 2, "tensor": 1})
  sharding.check_plan(8, k, 128, 4, sizes, rules)
  assert sharding.resolve_plan(6, 3, {"data": "auto", "spatial": -1}, 4, rules) == (
    3,
    {"data": 2, "fsdp": 1, "spatial": 2, "tensor": 1},
  )
  paper.data.prepared_dir = str(tmp_path)
  typed = checks.pretrain(paper, 8)  # what the run gets: numbers, no 'auto'
  assert (typed.training.grad_accum_steps, typed.mesh.data, typed.mesh.spatial) == (1, 4, 2)
  # The failures: paper batch on data=8 (IndivisibleError late), batch 8 x 4 accumulation (4x padding).
  with pytest.raises(
    ValueError,
    match=r"micro-batch 1 .* 8 devices .*--config.mesh.data=1 --config.mesh.fsdp=1 "
    r"--config.mesh.spatial=8 or --config.training.batch_size=32",
  ):
    plan(4, 4, 8, data=8)
  with pytest.raises(ValueError, match=r"micro-batch 2 .*grad_accum_steps=1 or .*spatial=4"):
    plan(8, 4, 8, data=2, fsdp=4)
  plan(8, 1, 8, data=2, fsdp=4)
  plan(2, 2, 8, data=1, spatial=8)
  with pytest.raises(ValueError, match="coarsest feature map has depth 16"):
    sharding.check_plan(1, 1, 128, 4, sharding.resolve_mesh_sizes({"spatial": 32}, 32), rules)
  with pytest.raises(ValueError, match="both batch and act_depth"):
    sharding.check_plan(
      1, 1, 128, 4, sharding.resolve_mesh_sizes({"fsdp": 8}, 8), (("batch", ("data", "fsdp")), ("act_depth", "fsdp"))
    )
  with pytest.raises(ValueError, match="micro-batch"):  # checks.pretrain runs it for the devices present
    checks.pretrain(tiny_config(**{"training.batch_size": 4}))  # 8 fake devices, data=-1


@pytest.mark.slow
def test_dry_run_reports_cost_without_padding():
  """Depth-split dry run on 8 devices: XLA's per-device FLOPs are ~1/8 of the single-device step's (no
  padding), and match the analytic model FLOPs that MFU is computed from."""
  config = tiny(**{"training.batch_size": 2, "training.grad_accum_steps": 1, "mesh.data": 2, "mesh.spatial": 4})
  result = dry_run.run(config)
  assert result["flops_per_step"] == pytest.approx(3 * unet3d.forward_flops(config.model, (8, 8, 8), batch=2))
  assert result["params"] == unet3d.count_params(build(config, {"data": 1})[2].params)
  assert result["xla_flops_per_device"] * 8 == pytest.approx(result["flops_per_step"], rel=0.3)
  assert result["memory_per_device_gib"] > 0 and result["compile_s"] > 0
  assert 0 < result["decode_flops_per_step"] < 1e-3 * result["flops_per_step"]  # the samples' decoding, on device
  assert result["projected_step_s_at_40pct_mfu"] is None and "unknown" in result["note"]  # CPU
  assert result["projected_step_s_at_40pct_mfu_by_kind"]["H100"] == pytest.approx(
    result["flops_per_step"] / (8 * 989e12 * 0.4)
  )


@pytest.mark.slow
def test_paper256_preset_lowers_with_depth_split_inputs():
  """The 256^3 preset on 8 devices: lowered ahead of time (ShapeDtypeStructs, nothing allocated). Its full
  compile (minutes on 2 CPU cores) is recorded with the dry run in docs/scaling.md."""
  from meddiff_jax.configs import pretrain

  config = pretrain.get_config("paper256")
  config.data.prepared_dir = "unused"
  config = checks.pretrain(config, num_devices=8)
  lowered, facts = dry_run.lower_train_step(config)
  assert facts["mesh"] == {"data": 1, "fsdp": 1, "spatial": 8, "tensor": 1}
  text = lowered.as_text()
  assert "tensor<4x256x256x256x1xi16>" in text  # the global batch: 4 samples = 1 x 4 accumulation
  # Volumes split along depth over the 8 devices (Shardy annotation of the image and structures arguments).
  # (structures: the 13 grouped channels packed in 1, data.pack_structures; expanded inside the step)
  assert config.data.shipped_structure_channels == 1
  # shipped samples (data.decode_on_device): the HU on the sample's grid (int16 steps of multilevel.HU_STEP) and the
  # label ids (ui8), split along depth; no 2P^3 window (data.resize_on_device=False)
  assert "512x512x512" not in text
  for arg in ("4x256x256x256x1xi16", "4x256x256x256x1xui8"):
    assert re.search(rf'tensor<{arg}> {{sdy\.sharding = #sdy\.sharding<@mesh, \[{{[^}}]*}}, {{"spatial"}}', text), arg


@pytest.mark.slow
def test_bf16_params_keep_float32_ema_and_moments():
  config = tiny(
    **{
      "model.param_dtype": "bfloat16",
      "model.dtype": "bfloat16",
      "training.ema_decay": 0.9999,
      "training.batch_size": 8,
    }
  )
  batch = fixed_batch(config)
  mesh, rules, st, _, jitted, batch_sh = build(config, {"data": 1})
  leaves = lambda t: jax.tree_util.tree_leaves(t)
  assert {x.dtype for x in leaves(st.params)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in leaves(st.ema_params)} == {jnp.dtype(jnp.float32)}
  adam = st.opt_state[1][0]
  assert {x.dtype for x in leaves(adam.mu) + leaves(adam.nu)} == {jnp.dtype(jnp.float32)}
  ema0 = [np.asarray(x, np.float64) for x in leaves(st.ema_params)]
  with sharding.activate(mesh, rules):
    st, _ = jitted(st, {k: jax.device_put(v, batch_sh[k]) for k, v in batch.items()})
  new_params = [np.asarray(x.astype(jnp.float32), np.float64) for x in leaves(st.params)]
  moved = 0
  for e0, p, e in zip(ema0, new_params, leaves(st.ema_params)):
    expected = 0.9999 * e0 + 0.0001 * p  # float64 reference of the EMA update
    np.testing.assert_allclose(np.asarray(e, np.float64), expected, rtol=1e-6, atol=1e-9)
    assert e.dtype == jnp.float32
    moved += int(np.sum(np.asarray(e, np.float64) != e0))
  # The update is real in float32 ...
  assert moved > 0
  # ... and below bfloat16 resolution: a bf16 EMA would not have moved at all for most weights.
  big = [(e0, np.asarray(e, np.float64)) for e0, e in zip(ema0, leaves(st.ema_params)) if np.abs(e0).max() > 0.05]
  lost = sum(
    int(np.sum((e0.astype(np.float32).astype(jnp.bfloat16) == e.astype(np.float32).astype(jnp.bfloat16)) & (e0 != e)))
    for e0, e in big
  )
  assert lost > 0


def test_throughput_metrics_and_peak_lookup():
  assert throughput.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert throughput.peak_flops("TPU v5 lite") == 197e12
  assert throughput.peak_flops("TPU v5") == 459e12
  assert throughput.peak_flops("TPU v5p") == 459e12
  assert throughput.peak_flops("cpu") is None and "unknown" in throughput.describe_peak("cpu")
  m = throughput.step_metrics(
    steps_per_sec=0.5, flops_per_step=8e13, samples_per_step=4, num_devices=8, device_kind="NVIDIA H100 80GB HBM3"
  )
  assert m["samples_per_sec_per_device"] == pytest.approx(0.25)
  assert m["tflops_per_sec_per_device"] == pytest.approx(5.0)
  assert m["mfu"] == pytest.approx(5e12 / 989e12)
  assert "mfu" not in throughput.step_metrics(1.0, 1e12, 1, 1, "cpu")
  spec = unet_spec()
  assert throughput.train_flops_per_step(spec, 32, 2) == pytest.approx(6 * unet3d.forward_flops(spec, (32,) * 3))


def test_train_flops_count_backward_only_where_gradients_flow():
  """Closed-form bookkeeping of throughput.train_flops; its total is checked against XLA in
  tests/test_controlnet.py (test_logged_flops_per_step_match_xla_cost_analysis_of_the_compiled_step)."""
  from meddiff_jax.models import controlnet

  spec = unet_spec(base_channels=8, channel_mult=(1, 2), attention_levels=(1,))
  parts = unet3d.forward_flops_parts(spec, (16,) * 3, 2)
  assert parts["encoder"] + parts["decoder"] == unet3d.forward_flops(spec, (16,) * 3, 2)
  enc, dec = parts["encoder"], parts["decoder"]
  t, f = "trainable", "frozen"
  unet = lambda e, d: {"encoder": {"conv_in": {"kernel": e}}, "decoder": {"out_conv": {"kernel": d}}}
  assert throughput.train_flops(spec, 16, 2, unet(t, t)) == pytest.approx(throughput.train_flops_per_step(spec, 16, 2))
  assert throughput.train_flops(spec, 16, 2, unet(f, t)) == pytest.approx(enc + 3 * dec)
  branch = controlnet.branch_forward_flops(spec, (4, 4), (16,) * 3, 2)
  hint = 2 * 27 * 16**3 * (1 * 4 + 4 * 4 + 4 * 8) * 2  # 3x3x3 convs 1 -> 4 -> 4 -> base channels
  zero = 2 * 2 * (8 * 8 * (2 * 16**3 + 8**3) + 16 * 16 * 2 * 8**3)  # 1x1x1 on 4 skips + the middle
  assert branch == pytest.approx(enc + hint + zero)
  cn = lambda e, d, b: {"base": unet(e, d), "controlnet": {"encoder": {"conv_in": {"kernel": b}}}}
  assert throughput.train_flops(spec, 16, 2, cn(f, f, t), (4, 4)) == pytest.approx(enc + 2 * dec + 3 * branch)
  assert throughput.train_flops(spec, 16, 2, cn(f, t, t), (4, 4)) == pytest.approx(enc + 3 * dec + 3 * branch)


def test_preview_reads_one_sample_and_validation_only_its_batches(tmp_path):
  """A preview montage shows sample 0: it reads that one sample (not a batch plus Grain's read-ahead, which
  from a bucket is whole volumes for a third of the samples), with the conditions a full batch gave it."""
  import time

  class Counting(pipeline.SubsetStore):
    def __init__(self, base):
      super().__init__(base, list(range(len(base))))
      self.loads = 0

    def load(self, index):
      self.loads += 1
      return super().load(index)

  config = tiny(**{"training.batch_size": 4, "eval.num_batches": 2, "data.prefetch": 4})
  store = pipeline.make_store(config.data)
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  layout = sharding.input_layout(mesh, sharding.DEFAULT_RULES, step_lib.batch_spec(config))
  seen = {}

  def preview(params, rng, cond):
    seen.update(cond)
    return jnp.zeros((cond["region"].shape[0], 8, 8, 8, 1))

  class Writer:
    def images(self, step, images):
      seen["montage"] = images

  counting = Counting(store)
  decode = jax.jit(step_lib.decode_inputs(config))  # shipped samples (data.decode_on_device) -> the model's
  loop.write_samples(preview, decode, None, counting, config, layout, Writer(), str(tmp_path), 1)
  time.sleep(0.5)
  assert counting.loads == 1 and (tmp_path / "samples" / "step_00000001.png").exists()
  full = next(iter(pipeline.make_dataset(store, config.data, batch_size=4, seed=loop.PREVIEW_SEED)))
  full = {k: np.asarray(v) for k, v in decode(full).items()}
  for k in ("pos_box", "region", "structures"):
    assert seen[k].shape[0] == 4
    for i in range(4):
      np.testing.assert_array_equal(np.asarray(seen[k][i]), full[k][0])

  counting = Counting(store)
  eval_step = lambda params, batch, rng: jnp.ones(config.eval.num_buckets)
  out = loop.run_eval(eval_step, None, counting, config, layout, 1000)
  time.sleep(0.5)
  assert out["val/loss"] == 1.0 and counting.loads == 2 * 4


def test_ema_and_frozen_leaves_follow_the_float64_update():
  """The step on a two-leaf linear "model" (fast: no UNet): the EMA of a trained leaf is
  decay * ema + (1 - decay) * new param (float64 reference), a frozen leaf stays bitwise and has no EMA."""
  from meddiff_jax.diffusion import schedules
  from meddiff_jax.models import trainable
  from meddiff_jax.train import state as state_lib
  from meddiff_jax.train import step as step_lib

  config = tiny(
    **{
      "training.ema_decay": 0.9,
      "optimizer.warmup_steps": 0,
      "diffusion.cond_drop_prob": 0.0,
      "data.decode_on_device": False,  # the batch below is the model's own (no shipped HU to finish)
    }
  )
  apply_fn = lambda v, x, t, cond, **kw: x * v["params"]["w"] + v["params"]["b"]
  params = {"w": jnp.full((1,), 0.5), "b": jnp.full((1,), 0.25)}
  labels = trainable.labels(params, ["w"])
  tx = state_lib.make_optimizer(config.optimizer, labels)
  st = state_lib.TrainState(
    step=jnp.int32(0),
    params=params,
    ema_params={"w": jnp.full((1,), 0.1)},
    opt_state=tx.init(params),
    rng=jax.random.key_data(jax.random.key(0)),
    nan_skips=jnp.int32(0),
    consecutive_nan=jnp.int32(0),
  )
  step = step_lib.make_train_step(apply_fn, schedules.make_schedule("cosine", 1000), tx, config, labels=labels)
  batch = {"image": jnp.full((2, 4, 4, 4, 1), 0.3), "region": jnp.array([0, 1])}
  new, _ = jax.jit(step)(st, batch)
  w = float(new.params["w"][0])
  assert w != 0.5  # the trained leaf moved
  assert float(new.ema_params["w"][0]) == pytest.approx(0.9 * 0.1 + 0.1 * w, rel=1e-6)
  assert float(new.params["b"][0]) == 0.25 and set(new.ema_params) == {"w"}


@pytest.mark.slow
def test_validation_and_preview_are_compiled_before_the_first_step(tmp_path, monkeypatch):
  """Start-up compiles the train step, validation and the preview sampler ahead of time; the training steps,
  validation and previews of the run then compile none of them again (their step times hold no compile)."""
  config = tiny(
    **{
      "model.channel_mult": (1,),
      "model.attention_levels": (),
      "model.mid_attention": False,
      "training.batch_size": 2,
      "training.num_steps": 2,
      "mesh.data": 2,
      "mesh.spatial": 4,
      "eval.every_steps": 1,
      "eval.sample_every_steps": 1,
      "eval.sample_steps": 1,
      "eval.num_buckets": 1,
      "eval.num_batches": 1,
      "checkpoint.every_steps": 0,
    }
  )
  compiles, started = [], []
  original = loop.compile_steps

  def compile_steps(*args):
    out = original(*args)
    started.append(len(compiles))
    assert isinstance(out[0].eval, jax.stages.Compiled) and isinstance(out[0].preview, jax.stages.Compiled)
    return out

  def listen(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append((kw.get("fun_name"), duration))

  monkeypatch.setattr(loop, "compile_steps", compile_steps)
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    last = loop.train_and_evaluate(config, str(tmp_path))
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert started and last["loss"] > 0 and (tmp_path / "samples" / "step_00000002.png").exists()
  at_startup, later = compiles[: started[0]], compiles[started[0] :]
  names = {name for name, _ in at_startup}
  ours = {"jit(step)", "jit(inner)", "jit(eval_step)", "jit(sample)"}  # train step (frozen params: inner), ...
  assert {"jit(step)", "jit(eval_step)", "jit(sample)"} <= names, names
  assert not ours & {name for name, _ in later}, later
  assert sum(d for _, d in later) < 0.2 * sum(d for _, d in at_startup), later  # later: small eager ops only
