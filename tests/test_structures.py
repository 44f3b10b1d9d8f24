"""Structure conditioning: grouped one-hot channels (default) or all classes + body as a learned embedding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import sample_spec, unet_spec
from flax.core import meta

from meddiff_jax.data import class_map, multilevel, preprocess
from meddiff_jax.data.spec import DataSpec
from meddiff_jax.models import conditions


def test_structure_labels_encode_classes_body_and_background():
  labels = np.array([0, 5, 90, 300, 0, 117])
  hu = np.array([-1000.0, 40.0, 40.0, 40.0, 40.0, -900.0])
  out = preprocess.structure_labels(labels, hu, preprocess.class_lookup(class_map.TOTAL), 117)
  # background outside body, classes by id, unknown label (300) -> body, body without class -> 118, a class
  # keeps its id even outside the body threshold (the mask says so); the high bit is the body mask
  np.testing.assert_array_equal(conditions.label_ids(out[..., 0]), [0, 5, 90, 118, 118, 117])
  np.testing.assert_array_equal(out[..., 0] & conditions.LABEL_BODY_BIT > 0, hu > preprocess.BODY_THRESHOLD_HU)
  assert out.dtype == np.uint8 and out.shape == (6, 1)
  with pytest.raises(ValueError, match="at most 126"):
    preprocess.structure_labels(labels, hu, preprocess.class_lookup(class_map.TOTAL), 127)


def test_grouping_table_comes_from_the_config():
  from meddiff_jax.configs import pretrain

  c = pretrain.get_config("tiny")
  c.data.structure_groups = (("lung", ("lung_*",)), ("liver", ("liver",)))
  data = DataSpec.from_config(c.data)
  lut, n = data.structure_lut()
  assert n == 2 and lut[5] == 2 and lut[10] == 1 and lut[1] == 0  # liver, lung lobe, spleen ungrouped
  assert data.structure_channel_count == 3
  c = pretrain.get_config("tiny+classes")
  data = DataSpec.from_config(c.data)
  assert data.structure_channel_count == 1 and data.structure_lut()[1] == 117
  assert c.model.num_structure_ids == 119


def test_classes_mode_samples_are_one_label_channel():
  from meddiff_jax.configs import pretrain

  data = DataSpec.from_config(pretrain.get_config("tiny+classes").data)
  lut, n = data.structure_lut()
  hu = np.full((16, 16, 16), -1000.0)
  hu[4:12, 4:12, 4:12] = 40.0
  labels = np.zeros((16, 16, 16), np.int16)
  labels[6:10, 6:10, 6:10] = 5
  spec = sample_spec(16, lut=lut, num_groups=n, structure_labels=True)
  s = multilevel.make_sample(hu, labels, 2, spec, np.random.default_rng(0), operation="whole")
  assert s["structures"].shape == (16, 16, 16, 1)
  bit = conditions.LABEL_BODY_BIT
  np.testing.assert_array_equal(np.unique(s["structures"]), [0, 5 | bit, 118 | bit])


def test_validate_refuses_a_model_that_does_not_match_classes_mode():
  from meddiff_jax import checks
  from meddiff_jax.configs import pretrain

  c = pretrain.get_config("tiny+classes")
  c.model.num_structure_ids = 50
  with pytest.raises(ValueError, match="num_structure_ids=119"):
    checks.pretrain(c)
  with pytest.raises(ValueError, match="unknown preset option"):
    pretrain.get_config("tiny+onehot")


@pytest.mark.slow
def test_embedding_with_an_identity_table_equals_one_hot_channels():
  """The embedding path is exactly one_hot(ids) @ table: with table = I it must reproduce the one-hot model."""
  from meddiff_jax.models import unet3d

  k, patch = 5, 8
  common = dict(
    base_channels=8,
    channel_mult=(1, 2),
    attention_levels=(),
    mid_attention=False,
    num_head_channels=8,
    use_position=False,
    use_region=False,
    norm_groups=4,
  )
  onehot_spec = unet_spec(structure_channels=k, **common)
  embed_spec = unet_spec(structure_channels=1, structure_embed_dim=k, num_structure_ids=k, **common)
  ids = jax.random.randint(jax.random.PRNGKey(1), (1, patch, patch, patch), 0, k)
  x = jax.random.normal(jax.random.PRNGKey(2), (1, patch, patch, patch, 1))
  t = jnp.array([10])
  onehot_model, embed_model = unet3d.UNet3D(onehot_spec), unet3d.UNet3D(embed_spec)
  params = meta.unbox(onehot_model.init(jax.random.PRNGKey(0), x, t, {"structures": jax.nn.one_hot(ids, k)})["params"])
  embed_params = meta.unbox(embed_model.init(jax.random.PRNGKey(0), x, t, {"structures": ids[..., None]})["params"])
  assert embed_params["encoder"]["structure_embed"]["embedding"].shape == (k, k)
  params_with_table = jax.tree_util.tree_map(lambda a: a, params)
  params_with_table["encoder"]["structure_embed"] = {"embedding": jnp.eye(k)}
  # the out conv is zero-initialised: give it weights so the comparison sees the whole network
  for p in (params, params_with_table):
    p["decoder"]["out_conv"]["kernel"] = jnp.full_like(p["decoder"]["out_conv"]["kernel"], 0.01)
  a = onehot_model.apply({"params": params}, x, t, {"structures": jax.nn.one_hot(ids, k)})
  b = embed_model.apply({"params": params_with_table}, x, t, {"structures": ids[..., None].astype(jnp.uint8)})
  assert float(jnp.abs(a).max()) > 0
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
  with_bit = (ids[..., None] | conditions.LABEL_BODY_BIT).astype(jnp.uint8)  # the body bit is not an id
  np.testing.assert_array_equal(
    np.asarray(embed_model.apply({"params": params_with_table}, x, t, {"structures": with_bit})), np.asarray(b)
  )
  shuffled = embed_model.apply({"params": params_with_table}, x, t, {"structures": ((ids + 1) % k)[..., None]})
  assert float(jnp.abs(shuffled - a).max()) > 1e-4  # the ids matter
