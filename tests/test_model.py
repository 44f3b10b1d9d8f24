"""UNet3D structure, conditions, numerics, and the analytic FLOP count."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meddiff_jax.models import embeddings, unet3d

SPEC = unet3d.UNetSpec(
  base_channels=8,
  channel_mult=(1, 2),
  attention_levels=(1,),
  num_head_channels=4,
  structure_channels=3,
  pos_num_freqs=2,
)


def inputs(spec, n=2, size=8, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k[0], (n, size, size, size, 1))
  t = jnp.arange(n) * 300
  cond = {
    "pos_box": jnp.tile(jnp.array([[-1.0, 0.5]]), (n, 3, 1)),
    "region": jnp.arange(n) % 4,
    "structures": (jax.random.uniform(k[1], (n, size, size, size, spec.structure_channels)) > 0.5).astype(jnp.uint8),
  }
  return x, t, cond


def init(model, *args):
  return jax.jit(model.init)(jax.random.key(0, impl="rbg"), *args)


@pytest.fixture(scope="module")
def tiny_unet():
  """UNet3D(SPEC), its inputs and its initialised variables: one init for the tests that share them."""
  model = unet3d.UNet3D(SPEC)
  x, t, cond = inputs(SPEC)
  return model, (x, t, cond), init(model, x, t, cond)


def test_output_shape_and_zero_init(tiny_unet):
  model, (x, t, cond), variables = tiny_unet
  out = jax.jit(model.apply)(variables, x, t, cond)
  assert out.shape == x.shape and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)  # zero-initialised output conv (ADM)


def test_every_param_has_logical_axes(tiny_unet):
  params = tiny_unet[2]["params"]
  leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert leaves and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
  for v in leaves:
    assert len(v.names) == v.value.ndim


def perturbed(params, seed=1):
  """Random params everywhere (zero-init convs would hide the conditions' effect)."""

  @jax.jit
  def perturb(params):
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed, impl="rbg"), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [l + 0.1 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])

  return perturb(nn.meta.unbox(params))


@pytest.mark.slow
def test_conditions_change_the_output_and_can_be_switched_off(tiny_unet):
  model, (x, t, cond), variables = tiny_unet
  params = perturbed(variables["params"])
  apply = jax.jit(model.apply)
  base = apply({"params": params}, x, t, cond)
  for key, value in (
    ("region", (cond["region"] + 1) % 4),
    ("structures", 1 - cond["structures"]),
    ("pos_box", cond["pos_box"] * 0.5),
  ):
    other = apply({"params": params}, x, t, {**cond, key: value})
    assert float(jnp.abs(other - base).max()) > 1e-4, key
  bare = dataclasses.replace(SPEC, use_position=False, use_region=False, structure_channels=0)
  assert bare.in_channels == 1
  model = unet3d.UNet3D(bare)
  variables = init(model, x, t)
  assert jax.jit(model.apply)(variables, x, t).shape == x.shape
  assert "region_embed" not in variables["params"]["encoder"]


@pytest.mark.slow
def test_remat_and_bf16_agree_with_reference(tiny_unet):
  ref_model, (x, t, cond), variables = tiny_unet
  params = perturbed(variables["params"])
  loss = lambda m: jax.jit(jax.value_and_grad(lambda p: jnp.mean(m.apply({"params": p}, x, t, cond) ** 2)))(params)
  l_ref, g_ref = loss(ref_model)
  for policy in ("full", "dots"):
    l_remat, g_remat = loss(unet3d.UNet3D(dataclasses.replace(SPEC, remat=policy)))
    np.testing.assert_allclose(l_remat, l_ref, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_remat, g_ref)
  bf16 = unet3d.UNet3D(dataclasses.replace(SPEC, dtype=jnp.bfloat16))
  out_ref = jax.jit(ref_model.apply)({"params": params}, x, t, cond)
  out_bf16 = jax.jit(bf16.apply)({"params": params}, x, t, cond)
  assert out_bf16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out_bf16 - out_ref) / jnp.linalg.norm(out_ref))
  assert rel < 0.05


def test_remat_segments_cover_whole_levels():
  """One rematerialised segment per stem, encoder level, middle, decoder level and head, and every conv
  of the network (skips, resampling, conv_in, output head included) sits inside one."""
  x, t, cond = inputs(SPEC)
  model = unet3d.UNet3D(dataclasses.replace(SPEC, remat="full"))
  params = nn.meta.unbox(init(model, x, t, cond)["params"])
  jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, x, t, cond))(params).jaxpr
  segments = [e for e in jaxpr.eqns if e.primitive.name in ("checkpoint", "remat", "remat2")]
  levels = len(SPEC.channel_mult)
  assert len(segments) == 2 * levels + 3
  outside = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert not outside
  convs = sum(str(e.params["jaxpr"]).count("conv_general_dilated") for e in segments)
  num_kernels = sum(
    1 for path, _ in jax.tree_util.tree_flatten_with_path(params)[0] if "kernel" in str(path[-1]) and _.ndim == 5
  )
  assert convs == num_kernels


@pytest.mark.slow
def test_attention_is_keyed_by_level_and_legacy_configs_map_to_levels():
  from meddiff_jax import pretrained

  # tiny_phantom was trained at 16^3 with attention_resolutions=(8,): attention at level 1.
  pre = pretrained.load("tiny_phantom")
  assert pre.spec.attention_levels == (1,)
  assert unet3d.legacy_attention_levels((16, 8), 4, 64) == (2, 3)
  with pytest.raises(ValueError, match="patch size"):
    unet3d.UNetSpec.from_config({"attention_resolutions": (8,)})
  with pytest.raises(ValueError, match="levels are 0..1"):
    unet3d.UNetSpec.from_config({"channel_mult": (1, 2), "attention_levels": (2,)})
  # The same weights run at any window 2^(levels-1) divides, with the same parameter tree (attention found).
  params = nn.meta.unbox(pre.params)
  for size in (8, 16, 32):
    x, t, cond = inputs(pre.spec, n=1, size=size)
    shapes = jax.eval_shape(lambda: pre.model.init(jax.random.key(0), x, t, cond)["params"])
    assert jax.tree_util.tree_structure(nn.meta.unbox(shapes)) == jax.tree_util.tree_structure(params)
    out = jax.jit(lambda p: pre.model.apply({"params": p}, x, t, cond))(params)
    assert out.shape == x.shape and bool(jnp.isfinite(out).all())


def test_rejects_bad_shapes_and_unknown_config_keys():
  model = unet3d.UNet3D(SPEC)
  x, t, cond = inputs(SPEC, size=7)
  with pytest.raises(ValueError, match="divisible by 2"):
    init(model, x, t, cond)
  with pytest.raises(ValueError, match="unknown keys"):
    unet3d.UNetSpec.from_config({"base_channels": 8, "bogus": 1})


@pytest.mark.slow
def test_flops_estimate_matches_xla_cost_analysis():
  spec = dataclasses.replace(SPEC, base_channels=16)
  model = unet3d.UNet3D(spec)
  x, t, cond = inputs(spec, size=16)
  variables = init(model, x, t, cond)
  cost = jax.jit(lambda v: model.apply(v, x, t, cond)).lower(variables).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = unet3d.forward_flops(spec, (16, 16, 16), batch=2)
  assert analytic == pytest.approx(cost["flops"], rel=0.15)


def test_coordinate_grid_and_fourier_features():
  box = jnp.array([[[-1.0, 1.0], [0.0, 0.5], [0.25, 0.25]]])
  grid = embeddings.coordinate_grid(box, (3, 2, 1))
  np.testing.assert_allclose(grid[0, :, 0, 0, 0], [-1, 0, 1])
  np.testing.assert_allclose(grid[0, 0, :, 0, 1], [0, 0.5])
  np.testing.assert_allclose(grid[0, 0, 0, :, 2], [0.25])  # size-1 axis: the box midpoint
  feats = embeddings.fourier_features(grid, 3)
  assert feats.shape[-1] == embeddings.position_channels(3) == 21
  c = float(grid[0, 2, 1, 0, 0])
  np.testing.assert_allclose(feats[0, 2, 1, 0, 3:6], [np.sin(c), np.sin(2 * c), np.sin(4 * c)], rtol=1e-6)


def test_timestep_embedding_formula():
  emb = embeddings.timestep_embedding(jnp.array([0, 10]), 6)
  freqs = np.exp(-np.log(10000.0) * np.arange(3) / 3)
  np.testing.assert_allclose(emb[1], np.concatenate([np.cos(10 * freqs), np.sin(10 * freqs)]), rtol=1e-5)


def test_builtin_priors_load_at_their_training_spacing_and_window():
  """Every shipped prior loads from the package (EMA params against its own config) and records the grid it
  was trained on, which the tasks resample to (tiny_ct: 2 mm, 32^3 windows; tiny_phantom predates the key)."""
  from meddiff_jax import pretrained

  pre = pretrained.load("tiny_ct")
  assert tuple(pre.config.data.spacing) == (2.0, 2.0, 2.0) and pre.patch_size == 32
  assert pre.config.data.source == "prepared" and pre.spec.attention_levels == (2,)
  assert set(pretrained.BUILTIN) == {"tiny_phantom", "tiny_ct"}
