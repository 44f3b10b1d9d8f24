"""model.conv_impl inside the real UNet: plain XLA 3D conv vs depth taps (one 2D conv + shifted depth sum).

python benchmarks/conv_impl.py [--cases=tiny:16:8,base:32:1] [--repeats=3] [--grad]
  case = preset:window:batch (float32; forward = one sliding-window model call; --grad adds fwd+bwd of an
  MSE loss w.r.t. the params, i.e. the train step without the optimizer)
Appends JSON lines to benchmarks/results/conv_impl.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timeit(fn, *args, repeats=3):
  import jax

  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts), first


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--cases", default="tiny:16:8,base:32:1")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--grad", action="store_true")
  args = p.parse_args()

  import jax
  import jax.numpy as jnp

  from meddiff_jax import pretrained
  from meddiff_jax.configs import pretrain
  from meddiff_jax.models import unet3d

  out = ROOT / "benchmarks" / "results" / "conv_impl.jsonl"
  out.parent.mkdir(parents=True, exist_ok=True)
  for case in args.cases.split(","):
    preset, window, batch = case.split(":")
    window, batch = int(window), int(batch)
    config = pretrain.get_config(preset)
    config.model.dtype = "float32"
    config.data.patch_size = window
    model, spec = pretrained.build_model(config)
    x, t, cond = pretrained.dummy_inputs(spec, window)
    rep = lambda a: jnp.repeat(a, batch, axis=0)
    x, t, cond = rep(x), rep(t), jax.tree_util.tree_map(rep, cond)
    params = jax.jit(model.init)(jax.random.key(0), x, t, cond)
    row = {
      "command": " ".join(sys.argv),
      "preset": preset,
      "window": window,
      "batch": batch,
      "gflop_fwd": unet3d.forward_flops(spec, (window,) * 3, batch) / 1e9,
    }
    for impl in ("xla", "depth_taps"):
      m = unet3d.UNet3D(dataclasses.replace(spec, conv_impl=impl))
      fwd = jax.jit(lambda p, x: m.apply(p, x, t, cond))
      row[f"{impl}_fwd_s"], row[f"{impl}_fwd_first_s"] = timeit(fwd, params, x, repeats=args.repeats)
      if args.grad:
        g = jax.jit(jax.grad(lambda p, x: jnp.mean(m.apply(p, x, t, cond) ** 2)))
        row[f"{impl}_grad_s"], _ = timeit(g, params, x, repeats=args.repeats)
    row["fwd_speedup"] = row["xla_fwd_s"] / row["depth_taps_fwd_s"]
    if args.grad:
      row["grad_speedup"] = row["xla_grad_s"] / row["depth_taps_grad_s"]
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "command"}, flush=True)
    with out.open("a") as f:
      f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
