"""model.conv_impl='depth_taps' (3^3 conv as a 2D conv + shifted depth sum) equals the plain 3D conv."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meddiff_jax.models import unet3d


@pytest.mark.parametrize("shape,cin,cout", [((2, 5, 6, 7), 3, 4), ((1, 8, 8, 8), 8, 16)])
def test_depth_tap_conv_equals_lax_conv3d(shape, cin, cout):
  x = jax.random.normal(jax.random.key(0), (*shape, cin))
  plain = unet3d.conv3d(cout, 3, unet3d.UNetSpec(conv_impl="xla"))
  assert isinstance(plain, unet3d.nn.Conv) and not isinstance(plain, unet3d.DepthTapConv)
  params = plain.init(jax.random.key(1), x)
  params = jax.tree_util.tree_map(
    lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params
  )  # bias != 0
  taps = unet3d.conv3d(cout, 3, unet3d.UNetSpec(conv_impl="depth_taps"))
  assert isinstance(taps, unet3d.DepthTapConv)
  assert jax.tree_util.tree_structure(taps.init(jax.random.key(1), x)) == jax.tree_util.tree_structure(params)
  ref = (
    jax.lax.conv_general_dilated(
      x, params["params"]["kernel"].value, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
    )
    + params["params"]["bias"].value
  )
  np.testing.assert_allclose(np.asarray(taps.apply(params, x)), np.asarray(ref), atol=1e-5)
  np.testing.assert_allclose(np.asarray(plain.apply(params, x)), np.asarray(ref), atol=1e-5)


@pytest.mark.slow
def test_unet_with_depth_taps_equals_the_plain_unet_on_the_same_params():
  from conftest import tiny_config

  from meddiff_jax import pretrained

  config = tiny_config()
  config.model.conv_impl = "xla"
  model, spec = pretrained.build_model(config)
  x, t, cond = pretrained.dummy_inputs(spec, config.data.patch_size)
  params = jax.jit(model.init)(jax.random.key(0), x, t, cond)
  # zero-init output convs would hide everything: perturb all params
  params = jax.tree_util.tree_map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
  x = jax.random.normal(jax.random.key(2), x.shape)
  ref = jax.jit(model.apply)(params, x, t, cond)
  fast = jax.jit(unet3d.UNet3D(dataclasses.replace(spec, conv_impl="depth_taps")).apply)(params, x, t, cond)
  assert float(jnp.max(jnp.abs(ref))) > 1e-2
  np.testing.assert_allclose(np.asarray(fast), np.asarray(ref), atol=1e-5 * float(jnp.max(jnp.abs(ref))) + 1e-6)


def test_unknown_conv_impl_is_refused():
  from meddiff_jax.configs import pretrain

  c = pretrain.get_config("tiny")
  c.model.conv_impl = "winograd"
  with pytest.raises(ValueError, match="conv_impl"):
    unet3d.UNetSpec.from_config(c.model)
