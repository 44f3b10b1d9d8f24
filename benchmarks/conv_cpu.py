"""Cheap ways to speed up XLA:CPU 3D convolutions, measured on one UNet-sized conv (fwd + bwd).

python benchmarks/conv_cpu.py   -> table + benchmarks/results/conv_cpu.json
Variants: channels-last (ours) vs channels-first layout, float32 vs bfloat16, and torch (oneDNN) on the
same shapes when installed.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPES = [(2, 32, 8), (2, 32, 32), (2, 16, 64)]  # (batch, spatial, channels)


def timeit(fn, *args, n=5):
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def jax_conv(batch, size, ch, layout, dtype):
  dn = ("NDHWC", "DHWIO", "NDHWC") if layout == "last" else ("NCDHW", "OIDHW", "NCDHW")
  xs = (batch, size, size, size, ch) if layout == "last" else (batch, ch, size, size, size)
  ws = (3, 3, 3, ch, ch) if layout == "last" else (ch, ch, 3, 3, 3)
  x = jnp.ones(xs, dtype)
  w = jnp.ones(ws, dtype) * 0.01

  def loss(w, x):
    y = jax.lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=dn)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  return timeit(jax.jit(jax.grad(loss, argnums=(0, 1))), w, x)


def torch_conv(batch, size, ch):
  try:
    import torch
  except ImportError:
    return None
  conv = torch.nn.Conv3d(ch, ch, 3, padding=1, bias=False)
  x = torch.ones(batch, ch, size, size, size, requires_grad=True)

  def step():
    conv.zero_grad()
    (conv(x) ** 2).sum().backward()

  step()
  ts = []
  for _ in range(5):
    t0 = time.perf_counter()
    step()
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def main():
  rows = []
  print(f"{'shape (N,S,C)':>16s} {'last f32':>9s} {'first f32':>9s} {'last bf16':>9s} {'torch f32':>9s}  (ms, fwd+bwd)")
  for b, s, c in SHAPES:
    row = {
      "batch": b,
      "spatial": s,
      "channels": c,
      "channels_last_f32": jax_conv(b, s, c, "last", jnp.float32),
      "channels_first_f32": jax_conv(b, s, c, "first", jnp.float32),
      "channels_last_bf16": jax_conv(b, s, c, "last", jnp.bfloat16),
      "torch_f32": torch_conv(b, s, c),
    }
    rows.append(row)
    fmt = lambda v: f"{1000 * v:9.1f}" if v else f"{'n/a':>9s}"
    print(
      f"{str((b, s, c)):>16s} {fmt(row['channels_last_f32'])} {fmt(row['channels_first_f32'])} "
      f"{fmt(row['channels_last_bf16'])} {fmt(row['torch_f32'])}"
    )
  out = ROOT / "benchmarks" / "results" / "conv_cpu.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"command": " ".join(sys.argv), "jax": jax.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
  main()
