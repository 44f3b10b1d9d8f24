"""ControlNet for the 3D UNet (Zhang et al. 2023), pixel-space version.

The branch is a trainable copy of `UNetEncoder` (same param names, so it is initialised from the
pretrained encoder), plus
  - a hint encoder: a few 3x3x3 convs at full resolution on the condition volume (low-res scan, lesion
    mask, ...) ending in a zero-initialised conv, added after the copy's conv_in (no downsampling: the
    condition already lives on the patch grid);
  - zero-initialised 1x1x1 convs on every skip and on the middle output.
Their outputs, times a conditioning scale, are added to the frozen UNet's skips and middle features. At
initialisation every zero conv outputs 0, so the combined model equals the base model exactly.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from meddiff_jax.models import conditions, unet3d


class HintEncoder(nn.Module):
  spec: unet3d.UNetSpec
  hidden: tuple[int, ...] = (16, 16, 32)

  @nn.compact
  def __call__(self, hint: jax.Array) -> jax.Array:
    h = hint.astype(self.spec.dtype)
    for i, ch in enumerate(self.hidden):
      h = nn.silu(unet3d.conv3d(ch, 3, self.spec, name=f"conv{i}")(h))
    return unet3d.conv3d(self.spec.base_channels, 3, self.spec, zero_init=True, name="zero_out")(h)


class ControlNet(nn.Module):
  """(x_t, t, cond, hint) -> {'skips': [...], 'middle': ...} residuals for `UNet3D(control=...)`."""

  spec: unet3d.UNetSpec
  hint_hidden: tuple[int, ...] = (16, 16, 32)

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    t: jax.Array,
    cond: dict[str, jax.Array] | None,
    hint: jax.Array,
    *,
    train: bool = False,
    scale: jax.Array | float = 1.0,
  ) -> dict[str, Any]:
    hint_features = HintEncoder(self.spec, self.hint_hidden, name="hint_encoder")(hint)
    h, skips, _ = unet3d.UNetEncoder(self.spec, name="encoder")(x, t, cond, train=train, hint=hint_features)
    out_skips = [  # on the skips as stored (W-folded where conv_impl='folded': models/fold.py)
      unet3d.conv3d(
        s.shape[-1] // f,
        1,
        self.spec,
        zero_init=True,
        name=f"zero_skip{i}",
        layout=unet3d.stored_layout(f, s.shape[-1] // f),
      )(s)
      * scale
      for i, (s, f) in enumerate(zip(skips, self.spec.skip_folds(), strict=True))
    ]
    middle = unet3d.conv3d(h.shape[-1], 1, self.spec, zero_init=True, name="zero_middle")(h) * scale
    return {"skips": out_skips, "middle": middle}


class ControlledUNet(nn.Module):
  """The pretrained UNet plus a ControlNet branch as one module: params {'base': ..., 'controlnet': ...}.

  One parameter tree, so one optimizer decides per leaf what trains (train/state.py: the base is frozen
  by label, not by a separate argument). The condition volume comes in cond['hint'].
  """

  spec: unet3d.UNetSpec
  hint_hidden: tuple[int, ...] = (16, 16, 32)

  @nn.compact
  def __call__(
    self, x: jax.Array, t: jax.Array, cond: dict[str, jax.Array], *, train: bool = False, scale: jax.Array | float = 1.0
  ) -> jax.Array:
    residuals = ControlNet(self.spec, self.hint_hidden, name="controlnet")(
      x, t, cond, cond[conditions.HINT], train=train, scale=scale
    )
    return unet3d.UNet3D(self.spec, name="base")(x, t, cond, train=train, control=residuals)


def branch_forward_flops(
  spec: unet3d.UNetSpec,
  hint_hidden: tuple[int, ...],
  spatial: tuple[int, int, int],
  batch: int = 1,
  hint_channels: int = 1,
) -> float:
  """Analytic FLOPs of one `ControlNet` forward pass (as `unet3d.forward_flops`): the hint encoder, the
  encoder copy (stem, down path, middle) and the 1x1x1 zero convs on every skip and the middle."""
  vox = spatial[0] * spatial[1] * spatial[2]
  chans = (hint_channels, *hint_hidden, spec.base_channels)
  flops = sum(unet3d.conv_flops(a, b, 3, vox) for a, b in zip(chans[:-1], chans[1:]))
  flops += unet3d.forward_flops_parts(spec, spatial)["encoder"]
  skips = [(spec.base_channels, vox)]  # conv_in, then each res block and each downsampling (UNetEncoder)
  for level, mult in enumerate(spec.channel_mult):
    skips += [(spec.base_channels * mult, vox)] * spec.num_res_blocks
    if level != len(spec.channel_mult) - 1:
      vox //= 8
      skips.append((spec.base_channels * mult, vox))
  skips.append((spec.base_channels * spec.channel_mult[-1], vox))  # zero_middle
  flops += sum(unet3d.conv_flops(c, c, 1, v) for c, v in skips)
  return flops * batch
