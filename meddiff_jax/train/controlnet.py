"""ControlNet fine-tuning on a frozen pretrained UNet.

The frozen base is a *separate, non-differentiated, non-donated* jit argument: no gradients and no
optimizer state exist for it, and it is bitwise unchanged by construction (optax.masked alone would not
freeze it; STACK_NOTES section 4). Checkpoints hold only the branch state plus the config, whose
`base_checkpoint` names the pretrained model to load the frozen weights from on resume.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from meddiff_jax import storage
from meddiff_jax.data import pipeline
from meddiff_jax.models import controlnet, unet3d
from meddiff_jax.tasks import common
from meddiff_jax.train import checkpoint, loop, sharding
from meddiff_jax.train import state as state_lib
from meddiff_jax.train import step as step_lib
from meddiff_jax.train import writer as writer_lib
from meddiff_jax.train.metrics import TrainMetrics


def make_apply_fn(base: unet3d.UNet3D, branch: controlnet.ControlNet, scale: float = 1.0):
  """linen-style apply over variables {'params': branch, 'base': frozen base params}."""
  def apply_fn(variables, x, t, cond, train=False, rngs=None):
    return controlnet.controlled_apply(base, branch, variables["base"], variables["params"], x, t, cond, cond["hint"],
                                       train=train, scale=scale, rngs=rngs)
  return apply_fn


def setup(config: ml_collections.ConfigDict, mesh, rules):
  """(pretrained, branch model, branch state, its shardings, base params on the mesh, their shardings)."""
  pre = common.load_pretrained(config.base_checkpoint)
  branch = controlnet.ControlNet(pre.spec, tuple(config.controlnet.hint_hidden))
  x, t, cond = loop.dummy_inputs(pre.spec, pre.patch_size)
  hint = jnp.zeros(x.shape, jnp.float32)
  tx = state_lib.make_optimizer(config.optimizer)
  st, shardings = state_lib.create(lambda key: branch.init(key, x, t, cond, hint)["params"], tx, config.seed, mesh,
                                   rules, config.sharding.min_shard_size)
  with sharding.activate(mesh, rules):
    base_abstract = jax.eval_shape(lambda k: pre.model.init(k, x, t, cond)["params"], jax.random.key(0))
    base_shardings = sharding.tree_shardings(base_abstract, mesh, rules, config.sharding.min_shard_size)
  base_params = jax.device_put(pre.params, base_shardings)
  # the trainable copy starts from the pretrained encoder (EMA too); Adam moments stay zero
  # fresh buffers: the branch state is donated every step, the base must not be
  copy = jax.jit(lambda tree: jax.tree_util.tree_map(jnp.copy, tree), out_shardings=shardings.params["encoder"])
  st = st.replace(params={**st.params, "encoder": copy(base_params["encoder"])},
                  ema_params={**st.ema_params, "encoder": copy(base_params["encoder"])})
  return pre, branch, st, shardings, base_params, base_shardings


def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Fine-tune a ControlNet branch; resumes from WORKDIR/checkpoints (branch only)."""
  t_start = time.perf_counter()
  storage.makedirs(workdir)
  mesh = sharding.make_mesh(dict(config.mesh))
  rules = sharding.rules_from_config(config.sharding.rules)
  pre, branch, st, shardings, base_params, base_shardings = setup(config, mesh, rules)
  with config.unlocked():  # architecture, diffusion and data layout are the base's
    config.model = pre.config.model
    config.diffusion = pre.config.diffusion
    config.data.patch_size = pre.patch_size
    config.data.use_structures = pre.config.data.use_structures
  tx = state_lib.make_optimizer(config.optimizer)
  lr_schedule = state_lib.learning_rate_schedule(config.optimizer)
  step_fn = step_lib.make_train_step(make_apply_fn(pre.model, branch), pre.schedule, tx, lr_schedule, config, rules)
  batch_sharding = pipeline.batch_sharding(mesh, sharding.batch_axes(rules))
  train_step = step_lib.jit_train_step(step_fn, shardings, batch_sharding, mesh, {"base": base_shardings})
  store = pipeline.make_store(config.data)
  batches = pipeline.GlobalBatches(pipeline.make_dataset(
      store, config.data, batch_size=config.training.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count()), batch_sharding)
  ckpt = checkpoint.Checkpointer(storage.join(workdir, "checkpoints"), keep=config.checkpoint.keep)
  restored = (ckpt.restore_latest(checkpoint.abstract_target(st, shardings), batches.iterator)
              if config.restore else None)
  if restored is not None:
    st = restored.state
    writer_lib.progress(f"resumed ControlNet branch from step {restored.step}")
  writer = writer_lib.MetricWriter(workdir)
  watcher = loop.PreemptionWatcher(config.checkpoint.preemption_check_every)
  last, acc, stopping = {}, None, False
  with sharding.activate(mesh, rules):
    step, t0 = int(st.step), time.perf_counter()
    while step < config.training.num_steps:
      st, m = train_step(st, next(batches), {"base": base_params})
      step += 1
      loop._check_finite(m, step, config.training.max_consecutive_nan)
      single = TrainMetrics.single_from_model_output(**m)
      acc = single if acc is None else acc.merge(single)
      stopping = watcher.should_stop(step)
      if step % config.training.log_every == 0 or step == config.training.num_steps or stopping:
        last = {k: float(v) for k, v in acc.compute().items()}
        last["steps_per_sec"] = config.training.log_every / (time.perf_counter() - t0)
        writer.scalars(step, last, prefix="controlnet/")
        writer_lib.progress(f"step {step}/{config.training.num_steps}  "
                            + writer_lib.format_scalars(last, ("loss", "grad_norm", "steps_per_sec")))
        acc, t0 = None, time.perf_counter()
      if step % config.checkpoint.every_steps == 0 or step == config.training.num_steps or stopping:
        ckpt.save(step, st, batches.iterator, config)
      if stopping:
        break
  watcher.close()
  ckpt.close()
  writer.close()
  writer_lib.progress(writer_lib.closing_summary(
      kind="ControlNet fine-tuning", workdir=workdir, step=step, num_steps=config.training.num_steps, last=last,
      last_val={}, checkpoints=ckpt.all_steps(), preempted=stopping, seconds=time.perf_counter() - t_start))
  return last
