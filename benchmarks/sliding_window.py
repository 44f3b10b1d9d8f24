"""Blended sliding-window step (one sampler step's network evaluation over a whole volume) on the shipped
tiny_phantom prior: seconds per step, windows/s, and the growth exponent of time vs volume size.

python benchmarks/sliding_window.py [--sizes=32,48,64] [--window_batch=8] [--repeats=3] [--checkpoint=tiny_phantom]
  (a size is N for N^3 or XxYxZ, e.g. 512x512x300; --checkpoint=preset:paper: the paper model, random params)
  [--inference_dtype=auto|float32|bfloat16]
  [--null_model]   (a model that returns its input: the cost of the window machinery alone)
The structure channels are built as the tasks build them (`common.structure_volume`): the body channel from
the HU of a synthetic body (an ellipsoid of soft tissue in air), organs unknown.
Appends one JSON line per size to benchmarks/results/sliding_window.jsonl.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import _common
import numpy as np


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--sizes", default="32,48,64")
  p.add_argument("--window_batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=3)
  _common.add_prior_flags(p)
  p.add_argument("--null_model", action="store_true")
  args = p.parse_args()

  import jax
  import jax.numpy as jnp

  from meddiff_jax.configs import denoise as denoise_config
  from meddiff_jax.models import unet3d
  from meddiff_jax.tasks import common, denoise
  from meddiff_jax.train import throughput

  pre = _common.load_prior(args)
  cfg = denoise_config.get_config()
  cfg.update(overlap=0.5, window_batch=args.window_batch)
  task = denoise.DenoiseSpec.from_config(cfg)  # the task options, typed as the tasks take them
  commit = _common.commit()
  rows = []
  flops = unet3d.forward_flops(pre.spec, (pre.patch_size,) * 3)  # per window
  peak = throughput.peak_flops(jax.devices()[0].device_kind)
  for item in args.sizes.split(","):
    shape = tuple(int(v) for v in item.split("x")) if "x" in item else (int(item),) * 3
    size = round(float(np.prod(shape)) ** (1 / 3), 1)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    hu = np.where(np.sum((grid / [0.9, 0.7, 0.95]) ** 2, -1) <= 1, 40.0, -1000.0).astype(np.float32)
    structures = common.structure_volume(pre, None, hu)
    # null model: output = input + 0 * a structure channel, so the condition windows are still cut
    null = lambda x, t, c: x + 0.0 * c["structures"][..., :1].astype(x.dtype)
    canvas = common.Canvas(shape, 0, structures, None, None)
    plan = common.window_plan(pre, canvas, task)

    def step(params, cond, x, t):  # params and conditions as arguments, as the tasks compile them (run_windowed)
      apply = null if args.null_model else functools.partial(pre.apply_with, params)
      return common.windowed_denoiser(pre, canvas, task, apply, cond)[0](x, t)

    step = jax.jit(step)
    cond = common.canvas_conditions(canvas)
    x = jax.random.normal(jax.random.key(0), (1, *shape, 1))
    t = jnp.array([500])
    t0 = time.perf_counter()
    jax.block_until_ready(step(pre.params, cond, x, t))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(step(pre.params, cond, x, t))
      times.append(time.perf_counter() - t0)
    s = float(np.median(times))
    n = int(plan.valid.sum())
    row = {
      "commit": commit,
      "size": size,
      "shape": shape,
      "checkpoint": args.checkpoint,
      "device_kind": jax.devices()[0].device_kind,
      "windows": n,
      "padded_windows": len(plan.starts),
      "step_s": s,
      "windows_per_s": n / s,
      "first_call_s": compile_s,
      "window_batch": plan.batch,
      "dtype": str(pre.spec.dtype),
      "null_model": args.null_model,
      "tflops_per_s": n * flops / s / 1e12,
      "mfu": None if args.null_model or not peak else n * flops / s / peak,
    }
    rows.append(row)
    mfu = f", MFU {100 * row['mfu']:.1f}%" if row["mfu"] else ""
    print(
      f"{'x'.join(map(str, shape))}: {n} windows, {s:.3f} s/step, {n / s:.1f} windows/s, "
      f"{row['tflops_per_s']:.1f} model TFLOP/s{mfu} (first call {compile_s:.1f} s)",
      flush=True,
    )
  if len(rows) > 1:
    v = np.log([np.prod(r["shape"]) for r in rows])
    slope = np.polyfit(v, np.log([r["step_s"] for r in rows]), 1)[0]
    print(f"time ~ voxels^{slope:.2f}")
  out = _common.RESULTS / "sliding_window.jsonl"
  out.parent.mkdir(parents=True, exist_ok=True)
  with out.open("a") as f:
    for r in rows:
      f.write(json.dumps({"command": " ".join(sys.argv), **r}) + "\n")


if __name__ == "__main__":
  main()
