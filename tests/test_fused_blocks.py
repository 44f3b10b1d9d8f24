"""The UNet's blocks rewritten for memory traffic (models/norm_act.py, unet3d internals) against their plain
formulations (flax nn.GroupNorm, nn.silu, a concatenated skip, nn.Conv), float32, values and gradients.

Each reference below is written from flax's own layers, independently of the code under test, and runs
with the very same param tree: equal outputs on a shared tree also prove that names, shapes and the
checkpoint format did not change.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import unet_spec

from meddiff_jax.models import norm_act, unet3d

SPEC = unet_spec(base_channels=8, channel_mult=(1, 2), attention_levels=(1,), num_head_channels=4, norm_groups=4)


def _rand(key, shape, scale=1.0, offset=0.0):
  return offset + scale * jax.random.normal(key, shape)


def _perturb(params, seed=3):
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [l + 0.2 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def _close(a, b, rtol=2e-5):
  """Max-abs error relative to the reference's scale (gradients of sums span orders of magnitude)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(np.abs(b).max(), 1e-6)
  assert np.abs(a - b).max() <= rtol * scale, (np.abs(a - b).max(), scale)


def _plain_norm(x, gamma, beta, groups, scale=None, shift=None, act=True):
  u = nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=jnp.float32).apply(
    {"params": {"scale": gamma, "bias": beta}}, x
  )
  if scale is not None:
    u = u * (1 + scale[:, None, None, None, :]) + shift[:, None, None, None, :]
  return nn.silu(u) if act else u


@pytest.mark.parametrize("act", [True, False])
@pytest.mark.parametrize("emb", [True, False])
def test_group_norm_act_matches_flax_group_norm_scale_shift_silu(act, emb):
  k = jax.random.split(jax.random.key(0), 6)
  n, c, groups = 2, 12, 4
  x = _rand(k[0], (n, 4, 5, 6, c), 2.0, 0.5)  # non-zero mean: the fast variance must handle it
  gamma, beta = _rand(k[1], (c,), 0.3, 1.0), _rand(k[2], (c,), 0.2)
  scale, shift = (_rand(k[3], (n, c), 0.3), _rand(k[4], (n, c), 0.3)) if emb else (None, None)
  dy = _rand(k[5], x.shape)

  def fused(x, gamma, beta, scale, shift):
    return norm_act.group_norm_act(x, gamma, beta, groups, scale=scale, shift=shift, act=act)

  def plain(x, gamma, beta, scale, shift):
    return _plain_norm(x, gamma, beta, groups, scale, shift, act)

  args = (x, gamma, beta, scale, shift)
  _close(fused(*args), plain(*args), 1e-5)
  argnums = (0, 1, 2, 3, 4) if emb else (0, 1, 2)
  g_fused = jax.grad(lambda *a: jnp.sum(fused(*a) * dy), argnums)(*args)
  g_plain = jax.grad(lambda *a: jnp.sum(plain(*a) * dy), argnums)(*args)
  for a, b in zip(g_fused, g_plain):
    _close(a, b)


@pytest.mark.parametrize("split", [4, 9])
def test_group_norm_act_over_channel_parts_is_the_norm_of_their_concatenation(split):
  """Parts (h, skip) of 4 + 8 or 9 + 3 channels in 4 groups of 3: at 9 the groups straddle the parts."""
  k = jax.random.split(jax.random.key(5), 6)
  n, c, groups = 2, 12, 4
  x = _rand(k[0], (n, 3, 4, 5, c), 1.5, -0.7)
  gamma, beta = _rand(k[1], (c,), 0.3, 1.0), _rand(k[2], (c,), 0.2)
  dy = _rand(k[3], x.shape)

  def fused(x, gamma, beta):
    parts = norm_act.group_norm_act((x[..., :split], x[..., split:]), gamma, beta, groups)
    assert isinstance(parts, tuple) and [p.shape[-1] for p in parts] == [split, c - split]
    return jnp.concatenate(parts, axis=-1)

  plain = lambda x, gamma, beta: _plain_norm(x, gamma, beta, groups)
  _close(fused(x, gamma, beta), plain(x, gamma, beta), 1e-5)
  g_fused = jax.grad(lambda *a: jnp.sum(fused(*a) * dy), (0, 1, 2))(x, gamma, beta)
  g_plain = jax.grad(lambda *a: jnp.sum(plain(*a) * dy), (0, 1, 2))(x, gamma, beta)
  for a, b in zip(g_fused, g_plain):
    _close(a, b)


def test_group_norm_act_keeps_the_activation_dtype_and_writes_no_float32():
  """bf16 in, bf16 out, and the backward's only full-size float32 values are fused temporaries: the
  residuals the VJP keeps are x itself and per-group statistics."""
  x = _rand(jax.random.key(1), (1, 8, 8, 8, 16)).astype(jnp.bfloat16)
  gamma, beta = jnp.ones(16), jnp.zeros(16)
  y, vjp = jax.vjp(lambda x: norm_act.group_norm_act(x, gamma, beta, 4), x)
  assert y.dtype == jnp.bfloat16 and vjp(jnp.ones_like(y))[0].dtype == jnp.bfloat16
  residuals = [r for r in jax.tree_util.tree_leaves(vjp) if hasattr(r, "shape")]
  big = [r for r in residuals if r.size >= x.size]
  assert big and all(r.dtype == jnp.bfloat16 for r in big)


class PlainNorm(nn.Module):
  """flax's nn.GroupNorm one scope down (norm1/GroupNorm_0/...), in float32."""

  groups: int

  @nn.compact
  def __call__(self, x):
    return nn.GroupNorm(num_groups=self.groups, epsilon=1e-5, dtype=jnp.float32)(x)


class PlainResBlock(nn.Module):
  """ResBlock as first written: GN-SiLU-Conv, scale-shift, GN-SiLU-Conv, 1x1 skip conv, residual."""

  out_channels: int
  groups: int

  @nn.compact
  def __call__(self, x, emb):
    conv = lambda f, k, name: nn.Conv(f, (k,) * 3, padding="SAME", name=name)
    h = conv(self.out_channels, 3, "conv1")(nn.silu(PlainNorm(self.groups, name="norm1")(x)))
    scale, shift = jnp.split(nn.Dense(2 * self.out_channels, name="emb_proj")(nn.silu(emb)), 2, axis=-1)
    h = PlainNorm(self.groups, name="norm2")(h) * (1 + scale[:, None, None, None]) + shift[:, None, None, None]
    h = conv(self.out_channels, 3, "conv2")(nn.silu(h))
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, "skip")(x)
    return x + h


@pytest.mark.parametrize("cin, conv_impl", [(8, "xla"), (24, "xla"), (20, "depth_taps")])
def test_resblock_matches_the_plain_formulation(cin, conv_impl):
  """The fused ResBlock against the plain block: same param tree (initialised equal),
  same values and gradients (and the same initial values, but for ADM's zero-initialised conv2)."""
  spec = dataclasses.replace(SPEC, conv_impl=conv_impl)
  k = jax.random.split(jax.random.key(2), 3)
  x, emb = _rand(k[0], (2, 6, 6, 6, cin), 1.5, 0.3), _rand(k[1], (2, 32))
  block = unet3d.ResBlock(spec, 8)
  params = nn.meta.unbox(block.init(jax.random.key(0), x, emb)["params"])
  plain = PlainResBlock(8, spec.norm_groups)
  plain_init = nn.meta.unbox(plain.init(jax.random.key(0), x, emb)["params"])
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(plain_init)
  plain_init["conv2"] = jax.tree_util.tree_map(jnp.zeros_like, plain_init["conv2"])  # ADM's zero conv
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), params, plain_init)
  params = _perturb(params)
  dy = _rand(k[2], (2, 6, 6, 6, 8))
  f_new = lambda p, x, emb: jnp.sum(block.apply({"params": p}, x, emb) * dy)
  f_ref = lambda p, x, emb: jnp.sum(plain.apply({"params": p}, x, emb) * dy)
  _close(block.apply({"params": params}, x, emb), plain.apply({"params": params}, x, emb), 1e-5)
  g_new = jax.grad(f_new, (0, 1, 2))(params, x, emb)
  g_ref = jax.grad(f_ref, (0, 1, 2))(params, x, emb)
  jax.tree_util.tree_map(_close, g_new, g_ref)


@pytest.mark.parametrize("conv_impl", ["xla", "depth_taps"])
def test_upsample_is_nearest_repeat_then_conv(conv_impl):
  """Upsample (the sub-pixel conv at low resolution) against jnp.repeat x2 along D, H, W then flax's nn.Conv,
  on the same param tree: values and gradients (odd sizes: the borders of every phase are checked)."""
  spec = dataclasses.replace(SPEC, conv_impl=conv_impl)
  k = jax.random.split(jax.random.key(6), 3)
  x = _rand(k[0], (2, 3, 4, 5, 6), 1.0, 0.2)

  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x):
      for axis in (1, 2, 3):
        x = jnp.repeat(x, 2, axis=axis)
      return nn.Conv(6, (3, 3, 3), padding="SAME", name="conv")(x)

  block = unet3d.Upsample(spec)
  params = nn.meta.unbox(block.init(jax.random.key(0), x)["params"])
  plain_init = Plain().init(jax.random.key(0), x)["params"]
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), params, plain_init)
  params = _perturb(params)
  dy = _rand(k[1], (2, 6, 8, 10, 6))
  _close(block.apply({"params": params}, x), Plain().apply({"params": params}, x), 1e-5)
  g_new = jax.grad(lambda p, x: jnp.sum(block.apply({"params": p}, x) * dy), (0, 1))(params, x)
  g_ref = jax.grad(lambda p, x: jnp.sum(Plain().apply({"params": p}, x) * dy), (0, 1))(params, x)
  jax.tree_util.tree_map(_close, g_new, g_ref)


@pytest.mark.slow
def test_flash_attention_matches_dot_product_attention_alone_and_split_over_a_mesh():
  """attention_impl='flash' (the Pallas TPU kernel, run here in its interpreter) equals
  jax.nn.dot_product_attention: values and gradients on one device, values on a data=2 x spatial=4 mesh where
  each device keeps its queries and gathers keys and values (the interpreter's backward kernel deadlocks under
  shard_map on fake CPU devices, so the mesh's gradients are checked through the same per-device wiring with an
  XLA kernel: a wrong gather, spec or transpose changes them); token counts the kernel's 128-token blocks do not
  divide fall back to the XLA formulation."""
  from jax.experimental.pallas import tpu as pltpu

  from meddiff_jax import sharding

  k = jax.random.split(jax.random.key(4), 4)
  q, kk, v, dy = (_rand(key, (2, 512, 2, 8)) for key in k)

  def run(attend, *args):
    f = lambda q, k, v: jnp.sum(attend(q, k, v) * dy)
    return attend(*args), jax.grad(f, (0, 1, 2))(*args)

  flash = lambda q, k, v: unet3d.attention(q, k, v, "flash")
  ref_out, ref_grads = run(jax.nn.dot_product_attention, q, kk, v)
  mesh = sharding.make_mesh({"data": 2, "spatial": 4})
  with pltpu.force_tpu_interpret_mode():
    out, grads = jax.jit(lambda *a: run(flash, *a))(q, kk, v)
    _close(out, ref_out, 1e-5)
    jax.tree_util.tree_map(_close, grads, ref_grads)
    with sharding.activate(mesh, sharding.DEFAULT_RULES):
      _close(jax.jit(flash)(q, kk, v), ref_out, 1e-5)
  # a kernel that sees only its own device's keys (no gather) is caught by the same comparison
  wired = lambda q, k, v: unet3d.per_device_attention(q, k, v, jax.nn.dot_product_attention)
  with sharding.activate(mesh, sharding.DEFAULT_RULES):
    out, grads = jax.jit(lambda *a: run(wired, *a))(q, kk, v)
  _close(out, ref_out, 1e-5)
  jax.tree_util.tree_map(_close, grads, ref_grads)
  short = [a[:, :100] for a in (q, kk, v)]  # 100 tokens: not a multiple of 128, the XLA path
  _close(unet3d.attention(*short, "flash"), unet3d.attention(*short, "xla"), 1e-6)
  with pytest.raises(ValueError, match="attention_impl"):
    unet3d.attention(q, kk, v, "ring")
