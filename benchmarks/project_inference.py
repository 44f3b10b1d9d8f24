"""Projected accelerator seconds per whole CT from analytic FLOPs (no accelerator needed; nothing is compiled).

seconds = steps x windows x forward FLOPs per window x (2 with classifier-free guidance) / (peak x MFU), with
  - forward FLOPs per window: `unet3d.forward_flops` of the preset's model at its training patch,
  - windows: `sliding_window.plan_windows` of the CT at the task overlap (the count the tasks run),
  - peak: dense bf16 FLOP/s of the chip (the tasks run bf16 on GPU/TPU: `inference_dtype=auto`),
  - MFU: an assumption, stated; measure it with benchmarks/sampler.py on the accelerator.

python benchmarks/project_inference.py [--presets=paper,base] [--shape=512,512,300] [--overlap=0.5]
  [--chip=H100] [--mfu=0.3] [--steps=1000,50,20,10] [--cfg]
Writes benchmarks/results/project_inference.json.
"""

from __future__ import annotations

import argparse
import sys

import _common

from meddiff_jax.train import throughput  # noqa: E402  (_common puts the checkout on sys.path)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--presets", default="paper,base")
  p.add_argument("--shape", default="512,512,300", help="voxels at the checkpoint's spacing (1 mm: the CT in mm)")
  p.add_argument("--overlap", type=float, default=0.5)
  p.add_argument(
    "--chip", default="H100", choices=[name for name, _ in throughput.PEAK_FLOPS], help="TPU v5: v5p, TPU v5 lite: v5e"
  )
  p.add_argument("--mfu", type=float, default=0.3)
  p.add_argument("--steps", default="1000,50,20,10")
  p.add_argument("--cfg", action="store_true", help="classifier-free guidance: two model calls per step")
  args = p.parse_args()

  from meddiff_jax.configs import pretrain
  from meddiff_jax.models import unet3d
  from meddiff_jax.tasks import sliding_window

  shape = tuple(int(s) for s in args.shape.split(","))
  steps = [int(s) for s in args.steps.split(",")]
  peak = throughput.peak_flops(args.chip)
  rate = peak * args.mfu
  rows = []
  for preset in args.presets.split(","):
    config = pretrain.get_config(preset)
    spec = unet3d.UNetSpec.from_config(config.model)
    w = int(config.data.patch_size)
    windows = int(sliding_window.plan_windows(shape, w, args.overlap, 1).valid.sum())
    flops = unet3d.forward_flops(spec, (w, w, w)) * (2 if args.cfg else 1)
    row = {
      "preset": preset,
      "window": w,
      "params_spec": f"base {spec.base_channels} mult {spec.channel_mult}",
      "tflop_per_window_fwd": flops / 1e12,
      "windows": windows,
      "seconds": {str(s): s * windows * flops / rate for s in steps},
    }
    rows.append(row)
    secs = "  ".join(f"{s} steps {row['seconds'][str(s)]:.0f} s" for s in steps)
    print(f"{preset}: {w}^3 windows, {flops / 1e12:.2f} TFLOP/window, {windows} windows -> {secs}")
  _common.write_json(
    "project_inference.json",
    {
      "command": " ".join(sys.argv),
      "commit": _common.commit(),
      "shape": shape,
      "overlap": args.overlap,
      "chip": args.chip,
      "peak_bf16": peak,
      "mfu": args.mfu,
      "cfg": args.cfg,
      "rows": rows,
    },
  )


if __name__ == "__main__":
  main()
