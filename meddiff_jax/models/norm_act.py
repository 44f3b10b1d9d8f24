"""GroupNorm (+ per-sample scale-shift) (+ SiLU) as one elementwise pass each way, over one array or over
the channel-parts of an array that is never concatenated.

`group_norm_act(x, gamma, beta, groups, ...)` computes, per sample and group, float32 statistics of x
(E[x] and E[x^2] from per-channel sums, as flax's GroupNorm with use_fast_variance), then

    u = (x - mean) * rsqrt(var + eps) * gamma + beta        (flax nn.GroupNorm, float32)
    v = u * (1 + scale) + shift                             (ADM's scale-shift by the embedding; optional)
    y = silu(v) if act else v                               -> cast to out_dtype once

Everything but the statistics folds into one per-(sample, channel) affine map, so the full-resolution
work is one read of x and one write of y: v = x * A + B with A, B of shape (N, C) computed on the side.
A custom VJP keeps only x (in its own dtype, bf16 in training) and the (N, C) maps: the backward
recomputes v from x in the pass that reads dy, so no float32 copy of a full-resolution activation is ever
written (autodiff of the plain formulation saves x - mean, the normalised x and the pre-activation in
float32). Backward = one reduction pass over (x, dy) for per-channel sums, and one elementwise pass
dx = dy' * P + x * Q + R (per-channel P, Q, R).

`x` may be a tuple of arrays that differ only in their channel count: the GroupNorm of their channel
concatenation (groups may straddle the parts), returned as a tuple of the same parts. The decoder uses it
to feed `concat(h, skip)` into a ResBlock without writing the concatenation (models/unet3d.py).
Same function as nn.GroupNorm -> scale-shift -> nn.silu on the concatenation (tests/test_fused_blocks.py
checks values and gradients against that plain formulation in float32).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _channel_sums(parts: Sequence[Array], fn) -> Array:
  """(N, C): per-channel sums over the spatial axes of fn(part, part index), parts concatenated."""
  out = []
  for i, x in enumerate(parts):
    out.append(jnp.sum(fn(x, i), axis=tuple(range(1, x.ndim - 1))))
  return jnp.concatenate(out, axis=-1)


def _group_mean(per_channel: Array, groups: int, count: int) -> Array:
  """(N, C) per-channel sums -> (N, C): each channel gets its group's mean (sum over the group / count)."""
  n, c = per_channel.shape
  g = jnp.sum(per_channel.reshape(n, groups, c // groups), axis=-1) / count
  return jnp.repeat(g, c // groups, axis=1)


def _channel_maps(layout: tuple[int, ...] | None, groups: int, channels: int, voxels: int):
  """(group_mean, to_stored, to_model) over the stored channels. layout[k] is the model channel that stored
  channel k holds (None: stored = model channels); a model channel may be stored several times (models/fold.py
  keeps W sub-positions in channels), and its statistics count every copy.

  group_mean: (N, S) per-stored-channel sums -> (N, S) its group's mean; to_stored: (..., C) -> (..., S);
  to_model: (..., S) -> (..., C), summing the copies (what a gradient does)."""
  if layout is None:
    count = voxels * (channels // groups)
    return (lambda v: _group_mean(v, groups, count)), (lambda v: v), (lambda v: v)
  of = np.asarray(layout)
  group_of = of // (channels // groups)
  count = voxels * np.bincount(group_of, minlength=groups)

  def group_mean(v: Array) -> Array:
    return (jax.ops.segment_sum(v.T, group_of, groups).T / count)[:, group_of]

  def to_model(v: Array) -> Array:
    return jnp.moveaxis(jax.ops.segment_sum(jnp.moveaxis(v, -1, 0), of, channels), 0, -1)

  return group_mean, (lambda v: v[..., of]), to_model


def _split(v: Array, sizes: Sequence[int]) -> list[Array]:
  out, off = [], 0
  for s in sizes:
    out.append(v[:, off : off + s])
    off += s
  return out


def _bcast(v: Array, ndim: int) -> Array:
  """(N, C) -> (N, 1, ..., 1, C)."""
  return v.reshape(v.shape[0], *([1] * (ndim - 2)), v.shape[-1])


def _voxels(parts) -> int:
  return parts[0].size // (parts[0].shape[0] * parts[0].shape[-1])


def _affine(parts, gamma, beta, scale, shift, groups, eps, layout):
  """Per-(sample, stored channel) float32 maps: mean, rstd (group statistics), and A, B with v = x * A + B."""
  f32 = jnp.float32
  group_mean, to_stored, _ = _channel_maps(layout, groups, gamma.shape[0], _voxels(parts))
  mean = group_mean(_channel_sums(parts, lambda x, i: x.astype(f32)))
  mean2 = group_mean(_channel_sums(parts, lambda x, i: jnp.square(x.astype(f32))))
  rstd = jax.lax.rsqrt(jnp.maximum(0.0, mean2 - jnp.square(mean)) + eps)
  g = to_stored(gamma.astype(f32))[None] * rstd  # (N, S)
  b = to_stored(beta.astype(f32))[None] - mean * g
  if scale is not None:
    one_plus = 1.0 + to_stored(scale.astype(f32))
    g, b = g * one_plus, b * one_plus + to_stored(shift.astype(f32))
  return mean, rstd, g, b


def _apply(parts, a_map, b_map, act, out_dtype):
  sizes = [x.shape[-1] for x in parts]
  out = []
  for x, a, b in zip(parts, _split(a_map, sizes), _split(b_map, sizes)):
    v = x.astype(jnp.float32) * _bcast(a, x.ndim) + _bcast(b, x.ndim)
    out.append((jax.nn.silu(v) if act else v).astype(out_dtype))
  return tuple(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _norm_act(parts, gamma, beta, scale, shift, groups, eps, act, out_dtype, layout):
  _, _, a_map, b_map = _affine(parts, gamma, beta, scale, shift, groups, eps, layout)
  return _apply(parts, a_map, b_map, act, out_dtype)


def _norm_act_fwd(parts, gamma, beta, scale, shift, groups, eps, act, out_dtype, layout):
  mean, rstd, a_map, b_map = _affine(parts, gamma, beta, scale, shift, groups, eps, layout)
  return _apply(parts, a_map, b_map, act, out_dtype), (parts, gamma, beta, scale, shift, mean, rstd, a_map, b_map)


def _norm_act_bwd(groups, eps, act, out_dtype, layout, res, dys):
  del eps, out_dtype
  parts, gamma, beta, scale, shift, mean, rstd, a_map, b_map = res
  f32 = jnp.float32
  sizes = [x.shape[-1] for x in parts]
  nd = parts[0].ndim
  split = lambda m: _split(m, sizes)
  a_p, b_p, m_p, r_p = split(a_map), split(b_map), split(mean), split(rstd)

  def dv(x, i):  # dL/dv from dy, recomputing v = x * A + B
    d = dys[i].astype(f32)
    if act:
      v = x.astype(f32) * _bcast(a_p[i], nd) + _bcast(b_p[i], nd)
      sig = jax.nn.sigmoid(v)
      d = d * (sig * (1.0 + v * (1.0 - sig)))
    return d

  def xhat(x, i):
    return (x.astype(f32) - _bcast(m_p[i], nd)) * _bcast(r_p[i], nd)

  group_mean, to_stored, to_model = _channel_maps(layout, groups, gamma.shape[0], _voxels(parts))
  sum_dv = _channel_sums(parts, dv)  # (N, S)
  sum_dv_xhat = _channel_sums(parts, lambda x, i: dv(x, i) * xhat(x, i))
  g32, b32 = to_stored(gamma.astype(f32)), to_stored(beta.astype(f32))
  one_plus = 1.0 + to_stored(scale.astype(f32)) if scale is not None else jnp.ones_like(sum_dv)
  d_gamma = to_model(jnp.sum(sum_dv_xhat * one_plus, axis=0)).astype(gamma.dtype)
  d_beta = to_model(jnp.sum(sum_dv * one_plus, axis=0)).astype(beta.dtype)
  if scale is not None:
    d_scale = to_model(g32 * sum_dv_xhat + b32 * sum_dv).astype(scale.dtype)  # sum of dv * u
    d_shift = to_model(sum_dv).astype(shift.dtype)
  else:
    d_scale = d_shift = None
  # dx = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)), dxhat = dv * gamma * (1 + scale)
  gain = one_plus * g32  # (N, S)
  m1 = group_mean(sum_dv * gain)
  m2 = group_mean(sum_dv_xhat * gain)
  p_map = rstd * gain  # dx = dv * P + x * Q + R
  q_map = -jnp.square(rstd) * m2
  r_map = -rstd * m1 - mean * q_map
  dxs = []
  for i, (x, p, q, r) in enumerate(zip(parts, split(p_map), split(q_map), split(r_map))):
    dx = dv(x, i) * _bcast(p, nd) + x.astype(f32) * _bcast(q, nd) + _bcast(r, nd)
    dxs.append(dx.astype(x.dtype))
  return tuple(dxs), d_gamma, d_beta, d_scale, d_shift


_norm_act.defvjp(_norm_act_fwd, _norm_act_bwd)


def group_norm_act(
  x: Array | Sequence[Array],
  gamma: Array,
  beta: Array,
  groups: int,
  *,
  scale: Array | None = None,
  shift: Array | None = None,
  act: bool = True,
  eps: float = 1e-5,
  out_dtype=None,
  layout: Sequence[int] | None = None,
) -> Array | tuple[Array, ...]:
  """silu(GroupNorm(x) * (1 + scale) + shift) in float32, returned in out_dtype (default x's dtype).

  x: (N, ..., C) channels-last, or a tuple of such arrays (the channel-parts of one array: the result is
  the same tuple of parts); gamma, beta: (C,) over all channels; scale, shift: (N, C) or None (both or neither).
  layout: the model channel each stored channel of x (its parts concatenated) holds, when they differ
  (models/fold.py: W sub-positions folded into channels); None: x's channels are the model's.
  """
  parts = tuple(x) if isinstance(x, (tuple, list)) else (x,)
  stored = sum(p.shape[-1] for p in parts)
  channels = gamma.shape[0] if layout is not None else stored
  if layout is not None:
    layout = tuple(int(c) for c in layout)
    if len(layout) != stored or set(layout) != set(range(channels)):
      raise ValueError(f"group_norm_act: layout of {len(layout)} entries for {stored} stored / {channels} channels")
  if (scale is None) != (shift is None):
    raise ValueError("group_norm_act: give both scale and shift, or neither")
  if channels % groups:
    raise ValueError(f"group_norm_act: {channels} channels do not split into {groups} groups")
  if gamma.shape != (channels,) or beta.shape != (channels,):
    raise ValueError(f"group_norm_act: gamma/beta {gamma.shape}/{beta.shape} for {channels} channels")
  if any(p.shape[:-1] != parts[0].shape[:-1] for p in parts):
    raise ValueError(f"group_norm_act: parts differ in more than channels: {[p.shape for p in parts]}")
  out = _norm_act(parts, gamma, beta, scale, shift, groups, eps, act, jnp.dtype(out_dtype or parts[0].dtype), layout)
  return out if isinstance(x, (tuple, list)) else out[0]
