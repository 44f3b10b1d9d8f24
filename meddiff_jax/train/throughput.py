"""Training throughput: model FLOPs per step, samples/s and TFLOP/s per device, MFU by device kind.

MFU counts model FLOPs (forward + backward, no rematerialisation recompute) against the device's dense
bf16 peak, as maxdiffusion and big_vision report it. Pretraining: 3 x forward. A ControlNet step (frozen
base): the base forward, the base decoder's activation gradients (the branch's residuals enter the
decoder, so the gradient must pass through it; its weight gradients are not computed) and 3 x the
branch forward; the base encoder has no backward at all (`train_flops`; tests/test_controlnet.py checks
it against XLA's cost analysis of the compiled step). Unknown device kinds (CPU, new chips) have no
peak: MFU is left out and `peak_flops` returns None, so callers can say so.
"""

from __future__ import annotations

from typing import Any

from flax import traverse_util

from meddiff_jax.models import controlnet, trainable, unet3d
from meddiff_jax.train.spec import PretrainConfig

# Dense bf16 peak FLOP/s per device (vendor datasheets). Matched as substrings of jax's device_kind,
# first match wins (so "TPU v5 lite" comes before "TPU v5").
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
  ("H200", 989e12),
  ("H100", 989e12),
  ("B200", 2250e12),
  ("A100", 312e12),
  ("L4", 121e12),
  ("TPU v6 lite", 918e12),  # v6e
  ("TPU v5 lite", 197e12),  # v5e
  ("TPU v5", 459e12),  # v5p
  ("TPU v4", 275e12),
)

PLANNING_KINDS = ("H100", "TPU v5p", "TPU v5 lite")  # dry-run projections for these whatever the host is


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device of this kind, or None when unknown."""
  kind = device_kind.replace("TPU v5p", "TPU v5")
  for name, peak in PEAK_FLOPS:
    if name in kind:
      return peak
  return None


def train_flops_per_step(spec: unet3d.UNetSpec, patch_size: int, batch_size: int) -> float:
  """Model FLOPs of one optimizer step (all micro-batches): 3 x the analytic forward pass."""
  return 3.0 * unet3d.forward_flops(spec, (patch_size,) * 3, batch=batch_size)


def train_flops(
  spec: unet3d.UNetSpec, patch_size: int, batch_size: int, labels: dict, hint_hidden: tuple[int, ...] | None = None
) -> float:
  """Model FLOPs of one optimizer step, by which parts train (`labels`: models/trainable.labels of the
  param tree; a tree with a 'controlnet' key is a ControlledUNet, `hint_hidden` its hint encoder).

  Per part (base encoder, base decoder, branch): 1 x forward, + 1 x for activation gradients where a
  gradient passes through it, + 1 x for weight gradients where it trains. The decoder carries the
  gradient of anything that trains (everything feeds it); the encoders only their own.
  """
  spatial = (patch_size,) * 3
  base_labels = labels["base"] if "controlnet" in labels else labels
  trains = lambda tree: trainable.TRAINABLE in traverse_util.flatten_dict(tree).values()
  fwd = unet3d.forward_flops_parts(spec, spatial, batch_size)
  enc, dec = trains(base_labels.get("encoder", {})), trains(base_labels.get("decoder", {}))
  branch = "controlnet" in labels and trains(labels["controlnet"])
  flops = fwd["encoder"] * (1 + 2 * enc) + fwd["decoder"] * (1 + (enc or dec or branch) + dec)
  if "controlnet" in labels:
    flops += controlnet.branch_forward_flops(spec, tuple(hint_hidden), spatial, batch_size) * (1 + 2 * branch)
  return flops


def xla_flops(compiled: Any) -> float | None:
  """XLA's FLOP count of a compiled (per-device, partitioned) program, remat recompute included; a loop
  body (the accumulation scan) counts once. None where the backend has no cost analysis."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # not every backend implements it
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) if cost and "flops" in cost else None


def step_metrics(
  steps_per_sec: float, flops_per_step: float, samples_per_step: int, num_devices: int, device_kind: str
) -> dict[str, float]:
  """Per-device throughput of the last logging interval; `mfu` only when the device kind's peak is known."""
  tflops = steps_per_sec * flops_per_step / num_devices / 1e12
  out = {
    "samples_per_sec_per_device": steps_per_sec * samples_per_step / num_devices,
    "tflops_per_sec_per_device": tflops,
  }
  peak = peak_flops(device_kind)
  if peak:
    out["mfu"] = tflops * 1e12 / peak
  return out


def projected_step_s(flops_per_step: float, num_devices: int, device_kind: str, mfu: float = 0.4) -> float | None:
  """Step time if `num_devices` devices of this kind ran the step at `mfu`; None for unknown kinds."""
  peak = peak_flops(device_kind)
  return flops_per_step / (num_devices * peak * mfu) if peak else None


def describe_peak(device_kind: str) -> str:
  peak = peak_flops(device_kind)
  if peak is None:
    return f"MFU not reported: peak FLOP/s unknown for device kind {device_kind!r} (train/throughput.py)"
  return f"MFU against {peak / 1e12:.0f} TFLOP/s dense bf16 peak ({device_kind})"


def flops_for_config(config: PretrainConfig, labels: dict | None = None) -> float:
  """Model FLOPs per optimizer step of a training config (train/spec.PretrainConfig, ControlNetConfig: its
  model is the base's); without `labels`, everything trains (pretraining: 3 x forward)."""
  spec, patch, batch = config.model, config.data.patch_size, config.training.batch_size
  if labels is None:
    return train_flops_per_step(spec, patch, batch)
  hint = config.controlnet.hint_hidden if "controlnet" in labels else None
  return train_flops(spec, patch, batch, labels, hint)
