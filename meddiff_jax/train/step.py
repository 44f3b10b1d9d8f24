"""The jitted pretraining step: noise, denoise, loss, accumulated gradients, guarded update, EMA."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from meddiff_jax import sharding
from meddiff_jax.data import decode
from meddiff_jax.diffusion import losses, samplers, schedules
from meddiff_jax.diffusion.spec import DiffusionSpec
from meddiff_jax.models import conditions, trainable
from meddiff_jax.models.unet3d import UNetSpec
from meddiff_jax.train.spec import PretrainConfig
from meddiff_jax.train.state import TrainState, float32_tree, learning_rate_schedule

Batch = dict[str, jax.Array]


def batch_spec(config: PretrainConfig, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of one global training batch (data/multilevel.make_sample, batched) as the host ships it:
  what the dry run compiles against and what input shardings are built for (default: config.training.batch_size).
  With data.decode_on_device, the store's values (data/decode.batch_shapes), which the step decodes first."""
  n = config.training.batch_size if batch_size is None else batch_size
  if config.data.decode_on_device:
    return decode.batch_shapes(config.data.sample_spec(), n)
  p, k = config.data.patch_size, config.model.structure_channels
  if k and config.data.packs_structures:
    k = 1  # one packed uint8 channel, expanded in the step (expand_structures)
  spec = {
    conditions.IMAGE: jax.ShapeDtypeStruct((n, p, p, p, 1), jnp.float32),
    conditions.POS_BOX: jax.ShapeDtypeStruct((n, 3, 2), jnp.float32),
    conditions.REGION: jax.ShapeDtypeStruct((n,), jnp.int32),
  }
  if k:
    spec[conditions.STRUCTURES] = jax.ShapeDtypeStruct((n, p, p, p, k), jnp.uint8)
  if config.data.hint:  # ControlNet's condition volume (data/multilevel.make_sample)
    spec[conditions.HINT] = jax.ShapeDtypeStruct((n, p, p, p, 1), jnp.float32)
  return spec


def decode_inputs(config: PretrainConfig, rules: Any = ()) -> Callable[[Batch], Batch]:
  """Shipped batch -> the model's batch, inside jit (data/decode.py: resize, HU window, body, structures, on the
  accelerator, laid out as the shipped batch: by batch and, with rules, along depth); identity when the host
  finished the samples (data.decode_on_device=False)."""
  if not config.data.decode_on_device:
    return lambda batch: batch
  finish = decode.decoder(config.data.sample_spec())
  if not rules:
    return finish
  return lambda batch: sharding.constrain_inputs(finish(batch), rules)


def expand_structures(cond: Batch, model: UNetSpec) -> Batch:
  """Packed grouped structures (one uint8 channel, data.pack_structures) -> the model's K + 1 one-hot channels,
  on the accelerator; anything else passes unchanged. Before the condition dropouts, which act per channel."""
  s = cond.get(conditions.STRUCTURES)
  if s is None:
    return cond
  return {
    **cond,
    conditions.STRUCTURES: conditions.unpack_if_packed(s, model.structure_channels, model.structure_embed_dim),
  }


def drop_conditions(cond: Batch, drop: jax.Array, num_regions: int) -> Batch:
  """Replace region/structures of samples where `drop` is True by their unconditional values (CFG)."""
  null = samplers.null_condition(cond, num_regions)
  out = {}
  for key, value in cond.items():
    mask = drop.reshape(drop.shape + (1,) * (value.ndim - 1))
    out[key] = jnp.where(mask, null[key], value)
  return out


def make_loss_fn(
  apply_fn: Callable[..., jax.Array], schedule: schedules.Schedule, diffusion: DiffusionSpec, model: UNetSpec
) -> Callable[[Any, Batch, jax.Array, Any], tuple[jax.Array, dict[str, jax.Array]]]:
  """(params, batch, rng, frozen) -> (loss, aux) for one micro-batch: `diffusion`'s target, loss and condition
  dropouts on a model of architecture `model`.

  `params` are the trainable leaves (differentiated), `frozen` the rest of the same tree (models/trainable.py
  split): apply_fn receives variables {"params": the merged tree}.
  """
  dcfg = diffusion
  num_regions = model.num_regions

  def loss_fn(params, batch, rng, frozen=None):
    x0 = batch[conditions.IMAGE]
    n = x0.shape[0]
    t_rng, noise_rng, drop_rng, dropout_rng = jax.random.split(rng, 4)
    t = jax.random.randint(t_rng, (n,), 0, schedule.num_timesteps)
    noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
    x_t = schedules.q_sample(schedule, x0.astype(jnp.float32), t, noise)
    cond = expand_structures({k: batch[k] for k in conditions.COND_KEYS if k in batch}, model)
    if dcfg.structure_drop_prob > 0:  # organs unknown (and sometimes no body): tasks without labels
      organ_drop = jax.random.bernoulli(jax.random.fold_in(drop_rng, 1), dcfg.structure_drop_prob, (n,))
      body_drop = jax.random.bernoulli(jax.random.fold_in(drop_rng, 2), dcfg.body_drop_prob, (n,))
      cond = conditions.drop_organ_structures(
        cond,
        organ_drop,
        body_drop,
        label_body_id=conditions.label_body_id(model.structure_embed_dim, model.num_structure_ids),
      )
    if dcfg.cond_drop_prob > 0:
      cond = drop_conditions(cond, jax.random.bernoulli(drop_rng, dcfg.cond_drop_prob, (n,)), num_regions)
    full = trainable.merge(params, frozen) if frozen else params
    out = apply_fn({"params": full}, x_t, t, cond, train=True, rngs={"dropout": dropout_rng})
    loss, per_sample = losses.diffusion_loss(
      schedule,
      out,
      x0,
      noise,
      t,
      prediction_type=dcfg.prediction_type,
      loss_type=dcfg.loss_type,
      min_snr_gamma=dcfg.min_snr_gamma or None,
    )
    return loss, {"per_sample_loss": per_sample, "t": t}

  return loss_fn


def _split_micro(batch: Batch, k: int) -> Batch:
  """(B, ...) -> (k, B/k, ...) such that each micro-batch stays spread over the data axes.

  Sample j of the batch goes to micro-batch j % k, so the contiguous per-device blocks of the sharded
  batch dimension stay per device after the reshape.
  """

  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch {x.shape[0]} not divisible by grad_accum_steps={k}")
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

  return jax.tree_util.tree_map(split, batch)


def make_train_step(
  apply_fn: Callable[..., jax.Array],
  schedule: schedules.Schedule,
  tx: optax.GradientTransformation,
  config: PretrainConfig,
  rules: Any = (),
  labels: Any = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """Un-jitted step of `config` (its diffusion loss, accumulation, EMA and learning-rate schedule; `tx` is
  `state.make_optimizer(config.optimizer, labels)`); see `jit_train_step` for the sharded, donated version.

  labels (models/trainable.py): only the trainable leaves are differentiated, updated and averaged into
  the EMA; frozen leaves pass through untouched (bitwise) and have no gradient buffers.
  """
  loss_fn = make_loss_fn(apply_fn, schedule, config.diffusion, config.model)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  lr_schedule = learning_rate_schedule(config.optimizer)
  k = config.training.grad_accum_steps
  ema_decay = float(config.training.ema_decay)
  finish = decode_inputs(config, rules)

  def step(state: TrainState, batch: Batch):
    batch = finish(batch)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    params, frozen = trainable.split(state.params, labels) if labels is not None else (state.params, {})
    if k == 1:
      (loss, aux), grads = grad_fn(params, batch, rng, frozen)
      per_sample = aux["per_sample_loss"]
    else:
      micro = _split_micro(batch, k)

      def accumulate(carry, xs):
        grads_acc, loss_acc = carry
        mb, i = xs
        if rules:  # keep each micro-batch split over the batch axes (and along depth over spatial)
          mb = sharding.constrain_inputs(mb, rules)
        (l, aux), g = grad_fn(params, mb, jax.random.fold_in(rng, i), frozen)
        grads_acc = jax.tree_util.tree_map(lambda a, b: a + b.astype(jnp.float32), grads_acc, g)
        return (grads_acc, loss_acc + l), aux["per_sample_loss"]

      zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      (grads, loss), per_sample = jax.lax.scan(accumulate, (zeros, jnp.float32(0)), (micro, jnp.arange(k)))
      grads = jax.tree_util.tree_map(lambda g: g / k, grads)
      loss = loss / k
      per_sample = per_sample.reshape(-1)

    # Optimizer maths in float32 whatever the param dtype: the moments are float32 (state.create), and
    # apply_updates casts the fp32 update sum back to each param's dtype.
    grads = jax.tree_util.tree_map(lambda g: g.astype(jnp.float32), grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # frozen leaves: zero "gradients" that set_to_zero ignores (dead code for XLA), never applied
    full_grads = (
      trainable.merge(grads, jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), frozen))
      if frozen
      else grads
    )
    updates, new_opt_state = tx.update(full_grads, state.opt_state, float32_tree(state.params))
    if frozen:
      updates = trainable.split(updates, labels)[0]
    new_params = optax.apply_updates(params, updates)
    # EMA in float32: with decay 0.9999 a bf16 EMA could not represent its own updates.
    new_ema = optax.incremental_update(float32_tree(new_params), state.ema_params, step_size=1.0 - ema_decay)
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(
      step=state.step + 1,
      params=trainable.merge(keep(new_params, params), frozen) if frozen else keep(new_params, params),
      ema_params=keep(new_ema, state.ema_params),
      opt_state=keep(new_opt_state, state.opt_state),
      nan_skips=state.nan_skips + (~finite).astype(jnp.int32),
      consecutive_nan=jnp.where(finite, 0, state.consecutive_nan + 1),
    )
    metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "param_norm": optax.tree.norm(params),
      "learning_rate": lr_schedule(state.step),
      "finite": finite.astype(jnp.float32),
      "nan_skips": new_state.nan_skips,
      "consecutive_nan": new_state.consecutive_nan,
      "per_sample_loss_max": jnp.max(per_sample),
    }
    return new_state, metrics

  return step


def jit_train_step(
  step_fn: Callable, state_shardings: TrainState, batch_sharding: Any, mesh: Any, labels: Any = None
) -> Callable:
  """jit with the state donated and laid out by its shardings; metrics replicated.

  With frozen leaves (labels), those are a read-only input at the jit boundary rather than part of the
  donated state: the caller still passes and gets back one state, but XLA neither aliases nor writes the
  frozen buffers back (JAX hands the same arrays back).
  """
  metrics_sharding = sharding.replicated(mesh)
  if labels is None or not trainable.has_frozen(labels):
    return jax.jit(
      step_fn,
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, metrics_sharding),
      donate_argnums=(0,),
    )

  def split(state):
    moving, frozen = trainable.split(state.params, labels)
    return state.replace(params=moving), frozen

  moving_shardings, frozen_shardings = split(state_shardings)

  def inner(moving, batch, frozen):
    new_state, metrics = step_fn(moving.replace(params=trainable.merge(moving.params, frozen)), batch)
    return split(new_state)[0], metrics

  return _FrozenInput(
    jax.jit(
      inner,
      in_shardings=(moving_shardings, batch_sharding, frozen_shardings),
      out_shardings=(moving_shardings, metrics_sharding),
      donate_argnums=(0,),
    ),
    split,
  )


class _FrozenInput:
  """(state, batch) -> (state, metrics) over a jitted or compiled (moving state, batch, frozen params) step;
  `lower(...).compile()` works as on a jitted function."""

  def __init__(self, fn: Any, split: Callable):
    self.fn, self.split = fn, split

  def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    moving, frozen = self.split(state)
    new_state, metrics = self.fn(moving, batch, frozen)
    return new_state.replace(params=trainable.merge(new_state.params, frozen)), metrics

  def lower(self, state: TrainState, batch: Batch) -> Any:
    moving, frozen = self.split(state)
    return _FrozenLowered(self.fn.lower(moving, batch, frozen), self.split)

  def memory_analysis(self) -> Any:
    return self.fn.memory_analysis()

  def cost_analysis(self) -> Any:
    return self.fn.cost_analysis()


@dataclasses.dataclass
class _FrozenLowered:
  lowered: Any
  split: Callable

  def compile(self) -> _FrozenInput:
    return _FrozenInput(self.lowered.compile(), self.split)
