"""Train-step throughput per preset on the devices present: the same numbers the training log writes
(samples/s per device, TFLOP/s per device, MFU against the device kind's peak; train/throughput.py).

Usage:
  python benchmarks/train_throughput.py                              # tiny on this machine
  python benchmarks/train_throughput.py --presets=base,paper --steps=10
  python benchmarks/train_throughput.py --presets=paper --set=model.remat=dots --set=mesh.spatial=-1

Synthetic batches of the configured shapes (no data needed), the real sharded, donated step. Prints a
markdown table and one JSON line per preset. On CPU the MFU column says n/a (no peak for 'cpu').
"""

from __future__ import annotations

import argparse
import ast
import json
import time

import _common


def parse_args():
  p = argparse.ArgumentParser()
  p.add_argument("--presets", default="tiny")
  p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
  p.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
  return p.parse_args()


def make_config(preset, overrides):
  from meddiff_jax.configs import pretrain

  c = pretrain.get_config(preset)
  c.data.source = "phantom"  # shapes only: the data never load
  for item in overrides:
    key, value = item.split("=", 1)
    node = c
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    try:
      node[last] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[last] = value
  return c


def measure(config, steps):
  import jax

  from meddiff_jax import checks, pretrained, sharding
  from meddiff_jax.models import unet3d
  from meddiff_jax.train import state as state_lib
  from meddiff_jax.train import step as step_lib
  from meddiff_jax.train import throughput

  config = checks.pretrain(config)  # typed, the batch plan against the devices present
  mesh = sharding.make_mesh(config.mesh.sizes)
  rules = config.sharding.logical_rules
  spec = config.model
  model = unet3d.UNet3D(spec)
  schedule = config.diffusion.make_schedule()
  tx = state_lib.make_optimizer(config.optimizer)
  st, shardings = state_lib.create(
    pretrained.init_params_fn(model, spec, config.data.patch_size),
    tx,
    config.seed,
    mesh,
    rules,
    config.sharding.min_shard_size,
  )
  spec_batch = step_lib.batch_spec(config)
  batch_sh = sharding.input_shardings(mesh, rules, spec_batch)
  host = _common.synthetic_batch(spec_batch)
  step_fn = step_lib.make_train_step(model.apply, schedule, tx, config, rules)
  jitted = step_lib.jit_train_step(step_fn, shardings, batch_sh, mesh)
  with sharding.activate(mesh, rules):
    batch = {k: jax.device_put(v, batch_sh[k]) for k, v in host.items()}
    t0 = time.perf_counter()
    compiled = jitted.lower(st, batch).compile()
    compile_s = time.perf_counter() - t0
    st, m = compiled(st, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
      st, m = compiled(st, batch)
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t0) / steps
  kind = jax.devices()[0].device_kind
  flops = throughput.flops_for_config(config)
  out = {
    "preset": config.preset,
    "patch": config.data.patch_size,
    "batch": config.training.batch_size,
    "accum": config.training.grad_accum_steps,
    "remat": spec.remat,
    "mesh": dict(mesh.shape),
    "device_kind": kind,
    "devices": jax.device_count(),
    "compile_s": round(compile_s, 1),
    "step_s": step_s,
    "flops_per_step": flops,
  }
  out.update(throughput.step_metrics(1.0 / step_s, flops, config.training.batch_size, jax.device_count(), kind))
  return out


def main():
  args = parse_args()
  rows = [measure(make_config(p, args.set), args.steps) for p in args.presets.split(",")]
  print("| preset | patch | micro x accum | mesh | device | step s | samples/s/device | TFLOP/s/device | MFU |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
    mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a (unknown peak)"
    print(
      f"| {r['preset']} | {r['patch']}^3 | {r['batch'] // r['accum']} x {r['accum']} | {mesh} | "
      f"{r['devices']} x {r['device_kind']} | {r['step_s']:.3f} | {r['samples_per_sec_per_device']:.3f} | "
      f"{r['tflops_per_sec_per_device']:.4f} | {mfu} |"
    )
  for r in rows:
    print(json.dumps(r))


if __name__ == "__main__":
  main()
