"""models/fold.py: W sub-positions folded into channels (conv_impl='folded', lane-dense levels on TPU) computes
the unfolded model's function on the same params: each folded layer against its plain form, and the whole
UNet / ControlNet against conv_impl='xla' (values and gradients, float32)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny, unet_spec

from meddiff_jax.models import controlnet, fold, norm_act, unet3d


def _rand(seed, shape, scale=1.0, offset=0.0):
  return jnp.asarray(np.random.default_rng(seed).normal(offset, scale, shape), jnp.float32)


def _close(a, b, tol=2e-5):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape
  np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(np.max(np.abs(b)) + 1e-6))


def _stored(x, parts, f):
  """The model's (N, D, H, W, C) array as a folded layout of these channel parts stores it."""
  edges = np.cumsum((0, *parts))
  return jnp.concatenate([fold.fold(x[..., a:b], f) for a, b in zip(edges[:-1], edges[1:])], axis=-1)


CASES = [  # mode, kernel, fold in, fold out, input parts, spatial
  ("same", 3, 4, 4, (5,), (4, 6, 16)),
  ("same", 3, 2, 2, (5, 3), (3, 5, 8)),
  ("same", 1, 4, 4, (5, 3), (2, 3, 8)),
  ("down", 3, 4, 2, (5,), (4, 6, 16)),
  ("down", 3, 2, 1, (5,), (4, 6, 8)),
  ("up", 3, 2, 4, (5,), (3, 5, 8)),
  ("up", 3, 1, 2, (5,), (3, 5, 8)),
]


@pytest.mark.parametrize("mode, k, fold_in, fold_out, parts, spatial", CASES)
def test_folded_conv_is_the_plain_conv_on_the_same_params(mode, k, fold_in, fold_out, parts, spatial):
  """Against lax's conv ('same': SAME stride 1; 'down': flax's SAME stride 2) and jnp.repeat x2 + conv ('up'):
  values, and gradients for the input and the model-shaped kernel and bias."""
  cout = 6
  x = _rand(0, (2, *spatial, sum(parts)))
  init = nn.initializers.lecun_normal()
  layer = fold.FoldedConv(
    cout, k, mode, fold.Layout(fold_in, parts), fold_out, jnp.float32, jnp.float32, init, nn.initializers.normal(1.0)
  )
  params = layer.init(jax.random.key(0), _stored(x, parts, fold_in))["params"]
  assert params["kernel"].shape == (k, k, k, sum(parts), cout) and params["bias"].shape == (cout,)

  def folded(p, x):
    return fold.unfold(layer.apply({"params": p}, _stored(x, parts, fold_in)), fold.Layout(fold_out, (cout,)))

  def plain(p, x):
    if mode == "up":
      for axis in (1, 2, 3):
        x = jnp.repeat(x, 2, axis=axis)
    stride = (2,) * 3 if mode == "down" else (1,) * 3
    dims = ("NDHWC", "DHWIO", "NDHWC")
    return jax.lax.conv_general_dilated(x, p["kernel"], stride, "SAME", dimension_numbers=dims) + p["bias"]

  want = plain(params, x)
  _close(folded(params, x), want)
  dy = _rand(1, want.shape)
  grads = [jax.grad(lambda p, x: jnp.sum(fn(p, x) * dy), (0, 1))(params, x) for fn in (folded, plain)]
  jax.tree_util.tree_map(_close, *grads)


def test_folded_conv_refuses_a_fold_its_mode_cannot_make():
  x = jnp.zeros((1, 2, 2, 4, 8))
  layer = fold.FoldedConv(
    4, 3, "down", fold.Layout(2, (4,)), 2, jnp.float32, jnp.float32, nn.initializers.zeros, nn.initializers.zeros
  )
  with pytest.raises(ValueError, match="makes fold 1"):
    layer.init(jax.random.key(0), x)


def test_group_norm_on_a_folded_concatenation_is_the_norm_of_the_model_channels():
  """norm_act's layout: the stored channels of two folded parts; groups count every sub-position's copy."""
  x, skip = _rand(2, (2, 3, 4, 16, 8), 3.0, 1.0), _rand(3, (2, 3, 4, 16, 4))
  gamma, beta = _rand(4, (12,)), _rand(5, (12,))
  scale, shift = _rand(6, (2, 12), 0.3), _rand(7, (2, 12))
  layout = fold.Layout(4, (8, 4))

  def plain(x, skip, gamma, beta, scale, shift):
    return norm_act.group_norm_act(jnp.concatenate([x, skip], -1), gamma, beta, 4, scale=scale, shift=shift)

  def folded(x, skip, gamma, beta, scale, shift):
    stored = jnp.concatenate([fold.fold(x, 4), fold.fold(skip, 4)], -1)
    y = norm_act.group_norm_act(stored, gamma, beta, 4, scale=scale, shift=shift, layout=layout.model_channel())
    return fold.unfold(y, layout)

  args = (x, skip, gamma, beta, scale, shift)
  _close(folded(*args), plain(*args))
  dy = _rand(8, (2, 3, 4, 16, 12))
  grads = [jax.grad(lambda *a: jnp.sum(fn(*a) * dy), range(6))(*args) for fn in (folded, plain)]
  jax.tree_util.tree_map(_close, *grads)


def test_folds_fill_128_lanes_and_halve_per_level():
  paper = unet_spec(conv_impl="folded")
  assert [paper.fold_at(level) for level in range(4)] == [4, 2, 1, 1]
  assert unet_spec(conv_impl="xla").fold_at(0) == 1
  assert (
    unet_spec(conv_impl="folded", base_channels=8, channel_mult=(1, 2), attention_levels=()).fold_at(0) == 2
  )  # at most 2^(levels-1)
  assert unet_spec(conv_impl="folded", base_channels=64).fold_at(0) == 2


@pytest.mark.parametrize("backend, impl", [("tpu", "folded"), ("gpu", "xla"), ("cpu", "depth_taps")])
def test_auto_is_folded_on_tpu_only_and_the_tpu_dry_run_compiles_it(monkeypatch, backend, impl):
  from meddiff_jax.train import tpu_compile

  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  assert unet3d.resolved_conv_impl("auto") == impl
  assert unet_spec(conv_impl="auto").fold_at(0) == (4 if backend == "tpu" else 1)
  assert unet3d.resolved_conv_impl("xla") == "xla"
  assert tpu_compile.for_tpu(tiny()).model.conv_impl == "folded"


SPEC = unet_spec(
  base_channels=8,
  channel_mult=(1, 2, 2),
  attention_levels=(1,),
  num_head_channels=8,
  pos_num_freqs=2,
  norm_groups=4,
  use_region=True,
)


def _inputs(seed=0, shape=(2, 8, 8, 16)):
  x = _rand(seed, (*shape, 1))
  t = jnp.array([3, 700])
  box = jnp.array([[[0.1, 0.6], [0.2, 0.5], [0.0, 1.0]]] * 2, jnp.float32)
  return x, t, {"pos_box": box, "region": jnp.array([0, 2])}


def _perturbed(params, seed=9):
  leaves, tree = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  return tree.unflatten([p + 0.05 * rng.standard_normal(p.shape).astype(np.float32) for p in leaves])


@pytest.mark.parametrize("attention_levels", [(1,), pytest.param((0,), marks=pytest.mark.slow)])
def test_folded_unet_is_the_xla_unet_on_the_same_params(attention_levels):
  """The whole UNet3D with conv_impl='folded' (level folds 4, 2, 1; attention at a folded level unfolds)
  against conv_impl='xla': one param tree, equal outputs and gradients."""
  spec = dataclasses.replace(SPEC, attention_levels=attention_levels, conv_impl="xla")
  x, t, cond = _inputs()
  plain, folded = unet3d.UNet3D(spec), unet3d.UNet3D(dataclasses.replace(spec, conv_impl="folded"))
  params = nn.meta.unbox(plain.init(jax.random.key(0), x, t, cond)["params"])
  folded_init = nn.meta.unbox(folded.init(jax.random.key(0), x, t, cond)["params"])
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), params, folded_init)
  params = _perturbed(params)  # zero-initialised output convs would hide most of the network
  _close(folded.apply({"params": params}, x, t, cond), plain.apply({"params": params}, x, t, cond))
  dy = _rand(5, x.shape)
  grads = [
    jax.grad(lambda p, x: jnp.sum(m.apply({"params": p}, x, t, cond) * dy), (0, 1))(params, x) for m in (folded, plain)
  ]
  jax.tree_util.tree_map(lambda a, b: _close(a, b, 1e-4), *grads)


@pytest.mark.slow
def test_folded_controlnet_is_the_xla_controlnet_on_the_same_params():
  """ControlledUNet (branch + base) folded against xla: the zero convs on folded skips and the hint added
  after the stem."""
  spec = dataclasses.replace(SPEC, conv_impl="xla")
  x, t, cond = _inputs(1)
  cond = {**cond, "hint": _rand(3, x.shape)}
  plain = controlnet.ControlledUNet(spec, hint_hidden=(4,))
  folded = controlnet.ControlledUNet(dataclasses.replace(spec, conv_impl="folded"), hint_hidden=(4,))
  params = _perturbed(nn.meta.unbox(plain.init(jax.random.key(0), x, t, cond)["params"]))
  _close(folded.apply({"params": params}, x, t, cond), plain.apply({"params": params}, x, t, cond))
  grads = [jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x, t, cond) ** 2))(params) for m in (folded, plain)]
  jax.tree_util.tree_map(lambda a, b: _close(a, b, 1e-4), *grads)
