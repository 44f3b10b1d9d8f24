"""Training throughput: model FLOPs per step, samples/s and TFLOP/s per device, MFU by device kind.

MFU counts model FLOPs (3 x forward: forward + backward, no rematerialisation recompute) against the
device's dense bf16 peak, as maxdiffusion and big_vision report it. Unknown device kinds (CPU, new
chips) have no peak: MFU is left out and `peak_flops` returns None, so callers can say so.
"""

from __future__ import annotations

from typing import Any

from meddiff_jax.models import unet3d

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


def step_metrics(steps_per_sec: float, flops_per_step: float, samples_per_step: int, num_devices: int,
                 device_kind: str) -> dict[str, float]:
  """Per-device throughput of the last logging interval; `mfu` only when the device kind's peak is known."""
  tflops = steps_per_sec * flops_per_step / num_devices / 1e12
  out = {"samples_per_sec_per_device": steps_per_sec * samples_per_step / num_devices,
         "tflops_per_sec_per_device": tflops}
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


def flops_for_config(config: Any, spec: unet3d.UNetSpec) -> float:
  return train_flops_per_step(spec, int(config.data.patch_size), int(config.training.batch_size))
