"""Sharded train step vs single device, shardings, loss decrease, NaN guard, gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from meddiff_jax.data import pipeline
from meddiff_jax.diffusion import schedules
from meddiff_jax.train import loop, sharding
from meddiff_jax.train import state as state_lib
from meddiff_jax.train import step as step_lib


def fixed_batch(config, seed=0):
  store = pipeline.make_store(config.data)
  ds = pipeline.make_dataset(store, config.data, batch_size=config.training.batch_size, seed=seed)
  it = iter(ds)
  batch = next(it)
  batch.pop("operation")
  return batch


def build(config, mesh_sizes):
  mesh = sharding.make_mesh(mesh_sizes, jax.devices()[: int(np.prod(list(mesh_sizes.values())))])
  rules = sharding.rules_from_config(config.sharding.rules)
  model, spec = loop.build_model(config)
  schedule = schedules.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  tx = state_lib.make_optimizer(config.optimizer)
  init_fn = loop.init_params_fn(model, spec, config.data.patch_size)
  st, shardings = state_lib.create(init_fn, tx, config.seed, mesh, rules, config.sharding.min_shard_size)
  step_fn = step_lib.make_train_step(model.apply, schedule, tx, state_lib.learning_rate_schedule(config.optimizer),
                                     config, rules)
  batch_sh = pipeline.batch_sharding(mesh, sharding.batch_axes(rules))
  jitted = step_lib.jit_train_step(step_fn, shardings, batch_sh, mesh)
  return mesh, rules, st, shardings, jitted, batch_sh


def run_steps(config, mesh_sizes, batch, n):
  mesh, rules, st, shardings, jitted, batch_sh = build(config, mesh_sizes)
  losses = []
  with sharding.activate(mesh, rules):
    gbatch = {k: jax.device_put(v, batch_sh) for k, v in batch.items()}
    for _ in range(n):
      st, metrics = jitted(st, gbatch)
      losses.append(float(metrics["loss"]))
  return st, losses, shardings


@pytest.mark.parametrize("accum", [1, 2])
def test_sharded_step_matches_single_device(accum):
  config = tiny_config(**{"training.grad_accum_steps": accum, "model.channel_mult": (1, 2),
                          "model.base_channels": 8})
  batch = fixed_batch(config)
  single, l1, _ = run_steps(config, {"data": 1, "fsdp": 1, "tensor": 1}, batch, 2)
  sharded, l8, shardings = run_steps(config, {"data": 4, "fsdp": 2, "tensor": 1}, batch, 2)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6),
                         sharded.params, single.params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6),
                         sharded.ema_params, single.ema_params)
  # FSDP really shards: some conv kernel is split over fsdp, and Adam moments follow their params.
  kernel_sh = shardings.params["encoder"]["down1_res0"]["conv1"]["kernel"]
  assert kernel_sh.spec == P(None, None, None, "fsdp", "tensor")  # tensor has size 1 here
  assert sharded.params["encoder"]["down1_res0"]["conv1"]["kernel"].sharding.spec == kernel_sh.spec
  mu = sharded.opt_state[1][0].mu["encoder"]["down1_res0"]["conv1"]["kernel"]
  assert mu.sharding.spec == kernel_sh.spec


def test_param_shardings_follow_rules_and_drop_indivisible_axes():
  config = tiny_config()
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
  with pytest.raises(ValueError, match="at most one"):
    sharding.make_mesh({"data": -1, "fsdp": -1})


def test_loss_falls_on_a_fixed_batch():
  config = tiny_config(**{"optimizer.learning_rate": 3e-3, "optimizer.warmup_steps": 1,
                          "diffusion.cond_drop_prob": 0.0})
  batch = fixed_batch(config)
  _, losses, _ = run_steps(config, {"data": 1}, batch, 50)
  assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), losses


def test_non_finite_updates_are_skipped_and_counted():
  config = tiny_config()
  batch = fixed_batch(config)
  mesh, rules, st, _, jitted, batch_sh = build(config, {"data": 1})
  before = jax.tree_util.tree_map(np.asarray, st.params)
  bad = dict(batch, image=np.where(np.arange(batch["image"].size).reshape(batch["image"].shape) == 3, np.nan,
                                   batch["image"]).astype(np.float32))
  with sharding.activate(mesh, rules):
    st, m1 = jitted(st, {k: jax.device_put(v, batch_sh) for k, v in bad.items()})
    st, m2 = jitted(st, {k: jax.device_put(v, batch_sh) for k, v in bad.items()})
  assert float(m2["finite"]) == 0 and int(m2["consecutive_nan"]) == 2 and int(m2["nan_skips"]) == 2
  assert int(st.step) == 2
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), st.params, before)
  with pytest.raises(loop.NonFiniteError, match="2 consecutive"):
    loop._check_finite(m2, 1, limit=2)
  with sharding.activate(mesh, rules):
    st, m3 = jitted(st, {k: jax.device_put(v, batch_sh) for k, v in batch.items()})
  assert float(m3["finite"]) == 1 and int(m3["consecutive_nan"]) == 0 and int(m3["nan_skips"]) == 2


def test_config_validation_messages():
  config = tiny_config(**{"model.structure_channels": 3})
  with pytest.raises(ValueError, match="structure_channels=3"):
    loop.validate(config)
  config = tiny_config(**{"data.patch_size": 7})
  with pytest.raises(ValueError, match="patch_size=7"):
    loop.validate(config)
  config = tiny_config(**{"data.source": "prepared"})
  with pytest.raises(ValueError, match="prepared_dir"):
    loop.validate(config)
