"""ADM-style 3D diffusion UNet (channels-last, Flax linen) with MedDiff-FM's conditions.

Input assembly (MedDiff-FM, see shared/PAPER_NOTES.md section 8.2):
  concat(x_t, structure masks, fourier(voxel coordinates in the whole-volume frame)) -> conv_in
  region class embedding + timestep embedding -> scale-shift conditioning of every ResBlock.

Split into `UNetEncoder` (embeddings, conv_in, down path, middle block) and `UNetDecoder` (up path,
output head) so that a ControlNet branch is a trainable copy of exactly `UNetEncoder` whose params can
be initialised from the pretrained ones by name.

Every param carries logical axis names (see sharding.py for the rules that map them to the mesh).
GroupNorm statistics are float32 whatever the compute dtype; norm, scale-shift and SiLU run as one fused
pass that keeps activations in the compute dtype (models/norm_act.py); output convs are zero-initialised
(ADM). Upsampling runs as a sub-pixel conv at low resolution (same params and function; benchmarks/RESULTS.md
"#27": memory traffic on TPU). With conv_impl 'folded' ('auto' on TPU) the narrow levels hold W sub-positions
in channels so their activations fill 128 lanes (models/fold.py; same params and function).

Attention is placed by level (0 = full resolution, as ADM keys it by downsample factor), so a trained
model runs at any window size that 2^(levels-1) divides. Rematerialisation (`remat`) wraps whole segments:
the stem (input assembly + conv_in), each encoder level (res blocks, attention, downsampling), the middle
block, each decoder level (skip concatenations, res blocks, attention, upsampling) and the output head.
Only segment inputs/outputs (which include the skips) are kept for the backward pass.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from meddiff_jax import sections
from meddiff_jax.models import conditions, embeddings, fold, norm_act

Array = jax.Array
Dtype = Any

CONV_IMPLS = ("auto", "xla", "depth_taps", "folded")
ATTENTION_IMPLS = ("auto", "xla", "flash")
LANES = 128  # a TPU vector register's minor dimension: conv_impl 'folded' fills it
ACT_AXES = ("batch", "act_depth", "act_height", "act_width", "act_channels")

BLOCK_OUT = "unet_block_out"  # checkpoint_name of every ResBlock output (what `offload` moves to host)

_REMAT_POLICIES = {
  "full": None,  # keep only segment inputs/outputs, recompute everything inside
  "dots": jax.checkpoint_policies.checkpoint_dots,  # keep conv and matmul outputs, recompute the rest
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  # Keep ResBlock outputs in host memory (GPU/TPU with pinned_host memory), recompute the rest.
  "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
    names_which_can_be_saved=(),
    names_which_can_be_offloaded=(BLOCK_OUT,),
    offload_src="device",
    offload_dst="pinned_host",
  ),
}


DTYPES = ("float32", "bfloat16", "float16")  # config.model.dtype / param_dtype
REMAT = ("none", *_REMAT_POLICIES)  # config.model.remat


@dataclasses.dataclass(frozen=True)
class UNetSpec:
  """config.model, typed: the architecture hyper-parameters (hashable so linen modules can hold it).

  No defaults (configs/pretrain.py has them); `from_config` builds it from a config section. A config stored
  by an old checkpoint is brought up to date first (pretrained.stored_config: `legacy_attention_levels`)."""

  out_channels: int
  base_channels: int
  channel_mult: tuple[int, ...]
  num_res_blocks: int
  attention_levels: tuple[int, ...]  # levels with attention after each res block (0: full resolution)
  mid_attention: bool
  num_head_channels: int
  dropout: float
  norm_groups: int
  time_embed_mult: int
  # Conditions; each can be switched off.
  use_position: bool
  pos_num_freqs: int
  pos_include_input: bool
  use_region: bool
  num_regions: int
  structure_channels: int
  # >0: the one structure channel holds label ids (0..num_structure_ids-1), embedded by a learned table of
  # this width instead of entering as one-hot channels (the paper's 117 classes + body; data.structures=classes).
  structure_embed_dim: int
  num_structure_ids: int
  # Numerics and memory.
  dtype: Dtype  # a jnp dtype (the config names it: DTYPES)
  param_dtype: Dtype
  remat: str  # none | full | dots | dots_no_batch | offload (per whole level, see module doc)
  # auto (depth_taps on CPU, folded on TPU, xla elsewhere) | xla (lax 3D conv) | depth_taps (3^3 conv as one 2D
  # conv + shifted depth sum: 3.8x faster UNet forward on XLA:CPU, benchmarks/RESULTS.md #15) | folded (xla convs
  # on levels whose W voxels are folded into channels up to 128 lanes: models/fold.py, benchmarks/RESULTS.md "#27")
  conv_impl: str
  # auto (flash on TPU, xla elsewhere) | xla (jax.nn.dot_product_attention) | flash (the Pallas TPU flash-attention
  # kernel: the attention matrix never reaches HBM; benchmarks/RESULTS.md "#27")
  attention_impl: str

  def __post_init__(self):
    key = "config.model."
    for name in ("out_channels", "base_channels", "num_res_blocks", "num_head_channels", "norm_groups"):
      sections.count(key + name, getattr(self, name))
    sections.sizes(key + "channel_mult", self.channel_mult, length=None, integer=True)
    levels = len(self.channel_mult)
    if not isinstance(self.attention_levels, tuple) or not all(
      isinstance(l, int) and 0 <= l < levels for l in self.attention_levels
    ):
      raise sections.ConfigError(
        f"{key}attention_levels={self.attention_levels!r}; levels are 0..{levels - 1} (channel_mult has {levels})"
      )
    for name in ("mid_attention", "use_position", "pos_include_input", "use_region"):
      sections.flag(key + name, getattr(self, name))
    sections.fraction(key + "dropout", self.dropout, upper_open=True)
    sections.count(key + "time_embed_mult", self.time_embed_mult)
    sections.count(key + "pos_num_freqs", self.pos_num_freqs, 0)
    sections.count(key + "num_regions", self.num_regions)
    for name in ("structure_channels", "structure_embed_dim", "num_structure_ids"):
      sections.count(key + name, getattr(self, name), 0)
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      if not (isinstance(value, jnp.dtype) and value.name in DTYPES):
        raise sections.ConfigError(
          f"{key}{name}={value!r}; choose one of {DTYPES} (in code: jnp.dtype(name), as from_config makes it)"
        )
    sections.choice(key + "remat", self.remat, REMAT)
    sections.choice(key + "conv_impl", self.conv_impl, CONV_IMPLS)
    sections.choice(key + "attention_impl", self.attention_impl, ATTENTION_IMPLS)

  @classmethod
  def from_config(cls, section: Any) -> UNetSpec:
    return sections.from_config(cls, section, "config.model", nested={"dtype": _dtype, "param_dtype": _dtype})

  @property
  def in_channels(self) -> int:
    channels = 1 + (self.structure_embed_dim or self.structure_channels)
    if self.use_position:
      channels += embeddings.position_channels(self.pos_num_freqs, self.pos_include_input)
    return channels

  @property
  def time_embed_dim(self) -> int:
    return self.base_channels * self.time_embed_mult

  def fold_at(self, level: int) -> int:
    """W voxels folded into channels at `level` (models/fold.py): with conv_impl 'folded' ('auto' on TPU), level 0
    folds the largest power of two that keeps base_channels x fold within 128 lanes (at most 2^(levels-1), which
    every input width is a multiple of), halved per level down to 1; otherwise 1."""
    if resolved_conv_impl(self.conv_impl) != "folded":
      return 1
    f0 = 1
    while f0 * 2 * self.base_channels <= LANES and f0 * 2 <= 2 ** (len(self.channel_mult) - 1):
      f0 *= 2
    return max(1, f0 >> level)

  def skip_folds(self) -> list[int]:
    """The fold of each encoder skip, in UNetEncoder's order (stem, each res block, each downsampling)."""
    folds = [self.fold_at(0)]
    for level in range(len(self.channel_mult)):
      folds += [self.fold_at(level)] * self.num_res_blocks
      if level != len(self.channel_mult) - 1:
        folds.append(self.fold_at(level + 1))
    return folds


def _dtype(name: Any) -> Any:
  """A config's dtype name -> the jnp dtype the layers take; any other value stays as is (and is refused)."""
  return jnp.dtype(name) if isinstance(name, str) and name in DTYPES else name


def legacy_attention_levels(
  resolutions: Sequence[int], levels: int, patch_size: int | None, also_levels: bool = False
) -> tuple[int, ...]:
  """Old `attention_resolutions` (feature-map sizes at the training patch) -> attention levels."""
  if also_levels:
    raise ValueError(
      "config.model gives both attention_resolutions (legacy) and attention_levels; keep attention_levels"
    )
  if not patch_size:
    raise ValueError(
      "config.model.attention_resolutions (legacy) needs the training patch size to map to "
      "attention_levels; set config.model.attention_levels instead"
    )
  return tuple(l for l in range(levels) if patch_size // 2**l in tuple(resolutions))


# ------------------------------------------------------------------------------------------------
# Layers


def conv3d(
  features: int,
  kernel: int,
  spec: UNetSpec,
  *,
  strides: int = 1,
  zero_init: bool = False,
  name: str | None = None,
  layout: fold.Layout | None = None,
) -> nn.Module:
  """A k^3 'SAME' conv with logical axis names on kernel and bias (zero_init: ADM / ControlNet zero convs).

  spec.conv_impl='depth_taps' (or 'auto' on CPU) computes stride-1 3^3 convs as `DepthTapConv` (same params,
  same result to float rounding). `layout`: the input is W-folded (models/fold.py), and so is the output.
  """
  init = nn.initializers.zeros_init() if zero_init else nn.initializers.lecun_normal()
  if layout is not None:
    if strides != 1:
      raise ValueError("conv3d on a folded layout is stride 1 (Downsample folds its own)")
    return folded_conv(features, kernel, "same", layout, layout.fold, spec, init, name=name)
  kwargs = dict(
    strides=(strides,) * 3,
    padding="SAME",
    dtype=spec.dtype,
    param_dtype=spec.param_dtype,
    kernel_init=_kernel_init(init),
    bias_init=_bias_init(),
    name=name,
  )
  cls = DepthTapConv if _use_depth_taps(spec.conv_impl) and kernel == 3 and strides == 1 else nn.Conv
  return cls(features, (kernel,) * 3, **kwargs)


def folded_conv(
  features: int,
  kernel: int,
  mode: str,
  layout: fold.Layout,
  fold_out: int,
  spec: UNetSpec,
  init: Callable | None = None,
  *,
  name: str,
) -> fold.FoldedConv:
  """fold.FoldedConv with the params (and logical axis names) of `conv3d`'s nn.Conv (init: lecun normal)."""
  init = _kernel_init(init or nn.initializers.lecun_normal())
  return fold.FoldedConv(
    features, kernel, mode, layout, fold_out, spec.dtype, spec.param_dtype, init, _bias_init(), name=name
  )


def _kernel_init(init: Callable) -> Callable:
  return nn.with_logical_partitioning(init, (None, None, None, "conv_in", "conv_out"))


def _bias_init() -> Callable:
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",))


def stored_layout(fold_: int, *parts: int) -> fold.Layout | None:
  """The stored layout of a level's activation (None where nothing is folded: stored = model channels)."""
  return fold.Layout(fold_, parts) if fold_ > 1 else None


class DepthTapConv(nn.Conv):
  """A stride-1 k^3 'SAME' conv as ONE 2D conv over (H, W) whose output channels stack the k depth taps,
  followed by a shifted sum over depth. Same params (kernel (k,k,k,Cin,Cout), bias) as nn.Conv, so the two
  are interchangeable on a checkpoint. XLA:CPU's 2D conv kernels are much faster than its 3D ones at these
  channel counts (benchmarks/RESULTS.md #15); on GPU/TPU plain nn.Conv is the better choice.
  """

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kd, kh, kw = self.kernel_size
    cin = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (kd, kh, kw, cin, self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return depth_tap_conv(x, kernel) + bias


def depth_tap_conv(x: Array, kernel: Array) -> Array:
  """The stride-1 'SAME' conv of DepthTapConv (no bias): kernel (k, k, k, Cin, Cout)."""
  kd, kh, kw, cin, cout = kernel.shape
  n, d, h, w, _ = x.shape
  k2 = jnp.transpose(kernel, (1, 2, 3, 0, 4)).reshape(kh, kw, cin, kd * cout)  # taps on out channels
  y = jax.lax.conv_general_dilated(
    x.reshape(n * d, h, w, cin), k2, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  y = y.reshape(n, d, h, w, kd, cout)
  lo = (kd - 1) // 2
  y = jnp.pad(y, ((0, 0), (lo, kd - 1 - lo), (0, 0), (0, 0), (0, 0), (0, 0)))
  return sum(y[:, j : j + d, :, :, j] for j in range(kd))  # out[d] = sum_j x[d + j - lo] K[j]


def resolved_conv_impl(conv_impl: str) -> str:
  """'auto' as this host resolves it: depth_taps on CPU, folded on TPU (benchmarks/RESULTS.md "#27": the paper
  step moves 44% fewer bytes), xla elsewhere (GPU convs take 32 channels as they are)."""
  if conv_impl != "auto":
    return conv_impl
  return {"cpu": "depth_taps", "tpu": "folded"}.get(jax.default_backend(), "xla")


def _use_depth_taps(conv_impl: str) -> bool:
  return resolved_conv_impl(conv_impl) == "depth_taps"


def _dense(features: int, spec: UNetSpec, *, zero_init: bool = False, name: str | None = None) -> nn.Dense:
  init = nn.initializers.zeros_init() if zero_init else nn.initializers.lecun_normal()
  return nn.Dense(
    features,
    dtype=spec.dtype,
    param_dtype=spec.param_dtype,
    kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)),
    name=name,
  )


def _num_groups(channels: int, wanted: int) -> int:
  return math.gcd(channels, wanted)


class GroupNorm32(nn.Module):
  """GroupNorm with float32 statistics (bf16 statistics over 2M voxels are too coarse), optionally followed
  by ADM's per-sample scale-shift and SiLU, as one fused pass (models/norm_act.py): the activations stay in
  the compute dtype, only (N, C) maps are float32.

  Params as flax's nn.GroupNorm one scope down (GroupNorm_0/scale, GroupNorm_0/bias), the checkpoint
  layout of the models trained before the fused form."""

  spec: UNetSpec
  layout: fold.Layout | None = None  # x is W-folded (models/fold.py)

  @nn.compact
  def __call__(self, x: Array, scale: Array | None = None, shift: Array | None = None, act: bool = False) -> Array:
    channels = self.layout.channels if self.layout else x.shape[-1]
    gamma, beta = _GroupNormParams(channels, self.spec.param_dtype, name="GroupNorm_0")()
    return norm_act.group_norm_act(
      x,
      gamma,
      beta,
      _num_groups(channels, self.spec.norm_groups),
      scale=scale,
      shift=shift,
      act=act,
      out_dtype=self.spec.dtype,
      layout=self.layout.model_channel() if self.layout else None,
    )


class _GroupNormParams(nn.Module):
  """nn.GroupNorm's params (scale: ones, bias: zeros, shape (C,)) without its computation."""

  channels: int
  param_dtype: Dtype

  @nn.compact
  def __call__(self) -> tuple[Array, Array]:
    scale = self.param(
      "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (self.channels,), self.param_dtype
    )
    bias = self.param(
      "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), (self.channels,), self.param_dtype
    )
    return scale, bias


def _constrain(x: Array) -> Array:
  return nn.with_logical_constraint(x, ACT_AXES)


class ResBlock(nn.Module):
  """GN-SiLU-Conv, scale-shift by the embedding, GN-SiLU-Dropout-ZeroConv, residual."""

  spec: UNetSpec
  out_channels: int
  deterministic: bool = True
  layout: fold.Layout | None = None  # x is W-folded (models/fold.py); the output is folded alike

  @nn.compact
  def __call__(self, x: Array, emb: Array) -> Array:
    spec, lay = self.spec, self.layout
    out_lay = stored_layout(lay.fold, self.out_channels) if lay else None
    h = GroupNorm32(spec, lay, name="norm1")(x, act=True)
    h = conv3d(self.out_channels, 3, spec, name="conv1", layout=lay)(h)
    scale_shift = _dense(2 * self.out_channels, spec, name="emb_proj")(nn.silu(emb))
    scale, shift = jnp.split(scale_shift, 2, axis=-1)
    h = GroupNorm32(spec, out_lay, name="norm2")(h, scale, shift, act=True)
    h = nn.Dropout(spec.dropout, deterministic=self.deterministic)(h)
    h = conv3d(self.out_channels, 3, spec, zero_init=True, name="conv2", layout=out_lay)(h)
    if (lay.channels if lay else x.shape[-1]) != self.out_channels:
      x = conv3d(self.out_channels, 1, spec, name="skip", layout=lay)(x)
    return checkpoint_name(_constrain(x + h), BLOCK_OUT)


class AttentionBlock(nn.Module):
  """Multi-head self-attention over all voxels of a (small) feature map.

  Written with 2D Dense kernels and `jax.nn.dot_product_attention`: flax's MultiHeadDotProductAttention
  with logical partitioning breaks under a global mesh (flax#3676, #3892; STACK_NOTES section 3).
  """

  spec: UNetSpec

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n, d, h, w, c = x.shape
    heads = max(1, c // self.spec.num_head_channels)
    head_dim = c // heads
    y = GroupNorm32(self.spec, name="norm")(x).reshape(n, d * h * w, c)
    qkv = _dense(3 * c, self.spec, name="qkv")(y).reshape(n, d * h * w, 3, heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    y = attention(q, k, v, self.spec.attention_impl).reshape(n, d * h * w, c)
    y = _dense(c, self.spec, zero_init=True, name="proj_out")(y)
    return _constrain(x + y.reshape(n, d, h, w, c))


def attention(q: Array, k: Array, v: Array, impl: str = "auto") -> Array:
  """softmax(q k^T / sqrt(head_dim)) v over all tokens; q, k, v: (N, L, heads, head_dim).

  'flash' runs jax's Pallas TPU flash-attention kernel (forward and backward never write the L x L scores
  to HBM); under a mesh it runs per device in a shard_map: each device keeps its queries (tokens split
  along depth, as the activations are) and all-gathers keys and values. Token counts that do not split
  into the kernel's 128-token blocks fall back to 'xla'. Same function either way (tests/test_fused_blocks.py).
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"model.attention_impl={impl!r}; choose from {list(ATTENTION_IMPLS)}")
  if impl == "auto":
    impl = "flash" if jax.default_backend() == "tpu" else "xla"
  if impl == "flash":
    spec, mesh_shape = _token_layout(q.shape[0])
    local = q.shape[1] // math.prod(mesh_shape[a] for a in _axes(spec[1])) if spec else q.shape[1]
    head_dim = q.shape[-1]
    if q.shape[1] % _FLASH_BLOCK == 0 and local % _FLASH_BLOCK == 0 and (head_dim <= 128 or head_dim % 128 == 0):
      return per_device_attention(q, k, v, _pallas_flash_attention)
  return jax.nn.dot_product_attention(q, k, v)


def _token_layout(batch: int) -> tuple[jax.sharding.PartitionSpec | None, dict[str, int]]:
  """How the activations hold (N, L, heads, head_dim) tokens on the current mesh (None without one): samples
  over the batch axes when they divide, tokens over the depth axes."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None, {}
  spec = nn.logical_to_mesh_axes(("batch", "act_depth", None, None))
  if batch % math.prod(mesh.shape[a] for a in _axes(spec[0])):
    spec = jax.sharding.PartitionSpec(None, *spec[1:])  # e.g. init's batch of 1: samples replicated
  return spec, dict(mesh.shape)


def per_device_attention(q: Array, k: Array, v: Array, kernel: Callable[[Array, Array, Array], Array]) -> Array:
  """`kernel` (one device's attention, (N, L, heads, head_dim) in and out) over all tokens: under a mesh each
  device keeps its queries, laid out as the activations are, and all-gathers keys and values."""
  spec, _ = _token_layout(q.shape[0])
  if spec is None:
    return kernel(q, k, v)
  seq_axes = _axes(spec[1])

  def on_device(q: Array, k: Array, v: Array) -> Array:
    if seq_axes:
      k = jax.lax.all_gather(k, seq_axes, axis=1, tiled=True)
      v = jax.lax.all_gather(v, seq_axes, axis=1, tiled=True)
    return kernel(q, k, v)

  return jax.shard_map(on_device, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)


_FLASH_BLOCK = 128  # the kernel's default query / key block


def _axes(entry: Any) -> tuple[str, ...]:
  return () if entry is None else (entry if isinstance(entry, tuple) else (entry,))


def _pallas_flash_attention(q: Array, k: Array, v: Array) -> Array:
  from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash  # TPU kernel: imported on use

  heads_first = lambda a: jnp.swapaxes(a, 1, 2)  # the kernel's (N, heads, L, head_dim)
  out = pallas_flash.flash_attention(
    heads_first(q), heads_first(k), heads_first(v), sm_scale=1.0 / math.sqrt(q.shape[-1])
  )
  return heads_first(out)


class Downsample(nn.Module):
  spec: UNetSpec
  fold_in: int = 1  # x is W-folded by this (models/fold.py); the output by half of it

  @nn.compact
  def __call__(self, x: Array) -> Array:
    spec, f = self.spec, self.fold_in
    if f == 1:
      return _constrain(conv3d(x.shape[-1], 3, spec, strides=2, name="conv")(x))
    c = x.shape[-1] // f
    return _constrain(folded_conv(c, 3, "down", fold.Layout(f, (c,)), f // 2, spec, name="conv")(x))


class Upsample(nn.Module):
  """Nearest-neighbour x2 along D, H, W, then a 3^3 conv: computed as `SubpixelUpConv` (same params, same
  function), so the 8x larger repeated input is never written."""

  spec: UNetSpec
  fold_out: int = 1  # the output is W-folded by this (models/fold.py); x by half of it

  @nn.compact
  def __call__(self, x: Array) -> Array:
    spec, f = self.spec, self.fold_out
    if f > 1:
      c = x.shape[-1] // (f // 2)
      return _constrain(folded_conv(c, 3, "up", fold.Layout(f // 2, (c,)), f, spec, name="conv")(x))
    conv = SubpixelUpConv(
      x.shape[-1],
      (3, 3, 3),
      padding="SAME",
      dtype=spec.dtype,
      param_dtype=spec.param_dtype,
      kernel_init=_kernel_init(nn.initializers.lecun_normal()),
      bias_init=_bias_init(),
      conv_impl=spec.conv_impl,
      name="conv",
    )
    return _constrain(conv(x))


class SubpixelUpConv(nn.Conv):
  """conv3x3x3(nearest_upsample_x2(x)) as one 3^3 conv at the LOW resolution with 8 x Cout outputs (one
  per output phase, kernels summed from the original taps), then depth-to-space. Same params (kernel
  (3,3,3,C,Cout), bias) as nn.Conv on the upsampled input, same FLOPs, but neither the upsampled input nor
  its layout copies are ever written, and the conv's 8 x Cout output is lane-friendly on TPU."""

  conv_impl: str = "xla"  # UNetSpec.conv_impl

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cin, cout = x.shape[-1], self.features
    kernel = self.param("kernel", self.kernel_init, (3, 3, 3, cin, cout), self.param_dtype)
    bias = self.param("bias", self.bias_init, (cout,), self.param_dtype)
    m = jnp.asarray(fold.SUBPIXEL_TAPS, kernel.dtype)
    phases = jnp.einsum("psd,qte,ruf,defio->stuipqro", m, m, m, kernel).reshape(3, 3, 3, cin, 8 * cout)
    x, phases, bias = nn.dtypes.promote_dtype(x, phases, bias, dtype=self.dtype)
    if _use_depth_taps(self.conv_impl):
      y = depth_tap_conv(x, phases)
    else:
      y = jax.lax.conv_general_dilated(
        x, phases, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision=self.precision
      )
    n, d, h, w, _ = x.shape
    y = y.reshape(n, d, h, w, 2, 2, 2, cout).transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(n, 2 * d, 2 * h, 2 * w, cout)
    return y + bias


def _segment(spec: UNetSpec, fn: Any) -> Any:
  """fn(module, *arrays) as one rematerialised segment (params keep their names in the caller's scope)."""
  if spec.remat == "none":
    return fn
  return nn.remat(fn, policy=_REMAT_POLICIES[spec.remat])


# ------------------------------------------------------------------------------------------------
# Encoder / decoder / full UNet


class UNetEncoder(nn.Module):
  """Embeddings, input assembly, down path and middle block.

  Returns (middle features, skip list, conditioning embedding).
  """

  spec: UNetSpec

  @nn.compact
  def __call__(
    self, x: Array, t: Array, cond: dict[str, Array] | None = None, *, train: bool = False, hint: Array | None = None
  ) -> tuple[Array, list[Array], Array]:
    spec = self.spec
    cond = cond or {}

    emb = embeddings.timestep_embedding(t, spec.base_channels)
    emb = _dense(spec.time_embed_dim, spec, name="time_mlp1")(emb)
    emb = _dense(spec.time_embed_dim, spec, name="time_mlp2")(nn.silu(emb))
    if spec.use_region:
      region = cond.get(conditions.REGION)
      if region is None:  # unknown region == the CFG "null" class
        region = jnp.full((x.shape[0],), spec.num_regions, jnp.int32)
      region_embed = embeddings.IdEmbedding(
        spec.num_regions + 1, spec.time_embed_dim, 0.02, spec.param_dtype, name="region_embed"
      )
      emb = emb + region_embed(region).astype(emb.dtype)

    def stem(mdl, x, cond, hint):
      x, f = mdl.assemble_input(x, cond), spec.fold_at(0)
      h = conv3d(spec.base_channels, 3, spec, name="conv_in", layout=stored_layout(f, x.shape[-1]))(fold.fold(x, f))
      if hint is not None:
        h = h + fold.fold(hint, f).astype(h.dtype)
      return _constrain(h)

    h = _segment(spec, stem)(self, x, cond, hint)
    skips = [h]
    for level in range(len(spec.channel_mult)):
      h, level_skips = _segment(spec, lambda mdl, h, emb, level=level: down_level(spec, level, train, h, emb))(
        self, h, emb
      )
      skips.extend(level_skips)

    def middle(mdl, h, emb):
      channels = spec.base_channels * spec.channel_mult[-1]
      h = ResBlock(spec, channels, not train, name="mid_res0")(h, emb)
      if spec.mid_attention:
        h = AttentionBlock(spec, name="mid_attn")(h)
      return ResBlock(spec, channels, not train, name="mid_res1")(h, emb)

    h = _segment(spec, middle)(self, h, emb)
    return h, skips, emb

  def assemble_input(self, x: Array, cond: dict[str, Array]) -> Array:
    """concat(x_t, structure masks, position encoding) in the compute dtype."""
    spec = self.spec
    parts = [x.astype(spec.dtype)]
    if spec.structure_channels:
      structures = cond.get(conditions.STRUCTURES)
      if structures is None:
        structures = jnp.zeros((*x.shape[:4], spec.structure_channels), spec.dtype)
      else:  # packed (data.pack_structures) -> the one-hot channels
        structures = conditions.unpack_if_packed(structures, spec.structure_channels, spec.structure_embed_dim)
      if structures.shape[-1] != spec.structure_channels:
        raise ValueError(f"structures have {structures.shape[-1]} channels, model expects {spec.structure_channels}")
      if spec.structure_embed_dim:  # label ids -> learned vectors
        parts.append(
          embeddings.IdEmbedding(
            spec.num_structure_ids, spec.structure_embed_dim, 1.0, spec.param_dtype, name="structure_embed"
          )(conditions.label_ids(structures[..., 0])).astype(spec.dtype)
        )
      else:
        parts.append(structures.astype(spec.dtype))
    if spec.use_position:
      if conditions.POS_BOX not in cond:
        raise ValueError(f"model.use_position=True but cond has no {conditions.POS_BOX!r} (N, 3, 2)")
      coords = embeddings.coordinate_grid(cond[conditions.POS_BOX], x.shape[1:4])
      parts.append(embeddings.fourier_features(coords, spec.pos_num_freqs, spec.pos_include_input).astype(spec.dtype))
    return jnp.concatenate(parts, axis=-1)


class UNetDecoder(nn.Module):
  """Up path with skip concatenation, then GN-SiLU-ZeroConv output head."""

  spec: UNetSpec

  @nn.compact
  def __call__(self, h: Array, skips: list[Array], emb: Array, *, train: bool = False) -> Array:
    spec = self.spec
    skips = list(skips)
    for level in reversed(range(len(spec.channel_mult))):
      level_skips = [skips.pop() for _ in range(spec.num_res_blocks + 1)]  # in the order they are consumed
      h = _segment(spec, lambda mdl, h, ss, emb, level=level: up_level(spec, level, train, h, ss, emb))(
        self, h, level_skips, emb
      )
    assert not skips, "skip bookkeeping mismatch"

    def head(mdl, h):
      f = spec.fold_at(0)
      lay = stored_layout(f, h.shape[-1] // f)
      h = GroupNorm32(spec, lay, name="out_norm")(h, act=True)
      h = conv3d(spec.out_channels, 3, spec, zero_init=True, name="out_conv", layout=lay)(h)
      return fold.unfold(h, fold.Layout(f, (spec.out_channels,))).astype(jnp.float32)

    return _segment(spec, head)(self, h)


def down_level(spec: UNetSpec, level: int, train: bool, h: Array, emb: Array) -> tuple[Array, list[Array]]:
  """One encoder level: res blocks (+ attention), then downsampling; returns (h, the level's skips).
  Called inside a parent module's scope, so params are named down{level}_*."""
  skips, f = [], spec.fold_at(level)
  for i in range(spec.num_res_blocks):
    lay = stored_layout(f, h.shape[-1] // f)
    h = ResBlock(spec, spec.base_channels * spec.channel_mult[level], not train, lay, name=f"down{level}_res{i}")(
      h, emb
    )
    if level in spec.attention_levels:
      h = _unfolded(AttentionBlock(spec, name=f"down{level}_attn{i}"), h, f)
    skips.append(h)
  if level != len(spec.channel_mult) - 1:
    h = Downsample(spec, f, name=f"down{level}_downsample")(h)
    skips.append(h)
  return h, skips


def _unfolded(layer: Callable[[Array], Array], h: Array, f: int) -> Array:
  """layer(h) on the unfolded activation (attention mixes voxels), folded back."""
  if f == 1:
    return layer(h)
  return fold.fold(layer(fold.unfold(h, fold.Layout(f, (h.shape[-1] // f,)))), f)


def up_level(spec: UNetSpec, level: int, train: bool, h: Array, skips: list[Array], emb: Array) -> Array:
  """One decoder level: (concat skip, res block, attention) x (num_res_blocks + 1), then upsampling."""
  f = spec.fold_at(level)
  for i, skip in enumerate(skips):
    # concatenated: feeding (h, skip) as channel-parts with split conv kernels moved MORE bytes on TPU
    # (benchmarks/RESULTS.md "#27": two convs each padded and halo-exchanged); models/norm_act takes parts.
    # Folded, each part keeps its stored order (a lane-aligned concat; the layout says so).
    lay = stored_layout(f, h.shape[-1] // f, skip.shape[-1] // f)
    h = jnp.concatenate([h, skip], axis=-1)
    h = ResBlock(spec, spec.base_channels * spec.channel_mult[level], not train, lay, name=f"up{level}_res{i}")(h, emb)
    if level in spec.attention_levels:
      h = _unfolded(AttentionBlock(spec, name=f"up{level}_attn{i}"), h, f)
  if level:
    h = Upsample(spec, spec.fold_at(level - 1), name=f"up{level}_upsample")(h)
  return h


class UNet3D(nn.Module):
  """The MedDiff-FM denoiser: `apply(params, x_t, t, cond)` -> model output (N, D, H, W, out_channels).

  cond keys (each optional unless its condition is on): 'pos_box' (N, 3, 2) float, 'region' (N,) int,
  'structures' (N, D, H, W, K). `control` adds ControlNet residuals: {'skips': [...], 'middle': array}.
  """

  spec: UNetSpec

  def setup(self):
    self.encoder = UNetEncoder(self.spec)
    self.decoder = UNetDecoder(self.spec)

  def __call__(
    self,
    x: Array,
    t: Array,
    cond: dict[str, Array] | None = None,
    *,
    train: bool = False,
    control: dict[str, Any] | None = None,
  ) -> Array:
    _check_spatial(self.spec, x)
    h, skips, emb = self.encoder(x, t, cond, train=train)
    if control is not None:
      skips = [s + c.astype(s.dtype) for s, c in zip(skips, control["skips"], strict=True)]
      h = h + control["middle"].astype(h.dtype)
    return self.decoder(h, skips, emb, train=train)


def _check_spatial(spec: UNetSpec, x: Array) -> None:
  factor = 2 ** (len(spec.channel_mult) - 1)
  if x.ndim != 5 or any(s % factor for s in x.shape[1:4]):
    raise ValueError(f"UNet3D input must be (N, D, H, W, C) with D, H, W divisible by {factor}; got {x.shape}")


def count_params(params: Any) -> int:
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


def forward_flops(spec: UNetSpec, spatial: Sequence[int], batch: int = 1) -> float:
  """Analytic multiply-add FLOPs (2 per MAC) of one forward pass: convs, dense layers, attention.

  Norms and elementwise ops are ignored (<2% for this architecture). A training step costs ~3x.
  """
  return sum(forward_flops_parts(spec, spatial, batch).values())


def conv_flops(cin: int, cout: int, k: int, voxels: int) -> float:
  return 2.0 * cin * cout * k**3 * voxels


def forward_flops_parts(spec: UNetSpec, spatial: Sequence[int], batch: int = 1) -> dict[str, float]:
  """`forward_flops` split as the modules are: {'encoder': stem, down path and middle block (UNetEncoder,
  also what a ControlNet branch copies), 'decoder': up path and output head (UNetDecoder)}."""
  enc = 0.0
  d, h, w = spatial
  vox = d * h * w
  conv = conv_flops

  def attn(c, voxels):
    return 2.0 * voxels * c * 4 * c + 4.0 * voxels * voxels * c  # qkv+proj, QK^T and AV

  def res(cin, cout, voxels):
    f = conv(cin, cout, 3, voxels) + conv(cout, cout, 3, voxels)
    return f + (conv(cin, cout, 1, voxels) if cin != cout else 0.0)

  ch = spec.base_channels
  enc += conv(spec.in_channels, ch, 3, vox)
  chans = [ch]
  for level, mult in enumerate(spec.channel_mult):
    for _ in range(spec.num_res_blocks):
      enc += res(ch, spec.base_channels * mult, vox)
      ch = spec.base_channels * mult
      if level in spec.attention_levels:
        enc += attn(ch, vox)
      chans.append(ch)
    if level != len(spec.channel_mult) - 1:
      vox //= 8
      enc += conv(ch, ch, 3, vox)
      chans.append(ch)
  enc += 2 * res(ch, ch, vox) + (attn(ch, vox) if spec.mid_attention else 0.0)
  dec = 0.0
  for level in reversed(range(len(spec.channel_mult))):
    for _ in range(spec.num_res_blocks + 1):
      cout = spec.base_channels * spec.channel_mult[level]
      dec += res(ch + chans.pop(), cout, vox)
      ch = cout
      if level in spec.attention_levels:
        dec += attn(ch, vox)
    if level:
      vox *= 8
      dec += conv(ch, ch, 3, vox)
  dec += conv(ch, spec.out_channels, 3, vox)
  return {"encoder": enc * batch, "decoder": dec * batch}
