"""Train-step throughput, analytic FLOPs / MFU, and compiled memory per device.

Usage:
  python benchmarks/train_step.py                       # tiny + base presets on this machine
  python benchmarks/train_step.py --presets=base --batch=2 --patch=64 --steps=10
  python benchmarks/train_step.py --memory              # replicated vs fsdp=8 on 8 fake CPU devices
  python benchmarks/train_step.py --monai               # + a matched MONAI DiffusionModelUNet step in torch

Prints a table and writes JSON (--out, default benchmarks/results/train_step.json).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import _common

ROOT = _common.ROOT


def parse_args():
  p = argparse.ArgumentParser()
  p.add_argument("--presets", default="tiny,base")
  p.add_argument("--batch", type=int, default=0, help="override batch size (0: preset's)")
  p.add_argument("--patch", type=int, default=0, help="override patch size (0: preset's)")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--dtype", default="", help="override compute dtype")
  p.add_argument("--remat", default="", help="override remat policy")
  p.add_argument("--conv_impl", default="", help="override model.conv_impl (auto | xla | depth_taps)")
  p.add_argument("--memory", action="store_true", help="compiled memory: replicated vs fsdp=8 (fake devices)")
  p.add_argument("--monai", action="store_true", help="also time a matched MONAI UNet in torch (CPU)")
  p.add_argument(
    "--meshes", default="data=8;fsdp=8", help="--memory: meshes to compare, ';'-separated, each 'axis=size,axis=size'"
  )
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
  return p.parse_args()


def preset_config(name, args):
  from meddiff_jax.configs import pretrain

  c = pretrain.get_config(name)
  c.data.source = "phantom"
  if args.batch:
    c.training.batch_size = args.batch
  if args.patch:
    c.data.patch_size = args.patch
  if args.dtype:
    c.model.dtype = args.dtype
  if args.remat:
    c.model.remat = args.remat
  if args.conv_impl:
    c.model.conv_impl = args.conv_impl
  c.training.grad_accum_steps = 1
  return c


def synthetic_batch(config, n):
  """n samples of the layout the host ships for this config (train/step.batch_spec)."""
  from meddiff_jax.train import step as step_lib
  from meddiff_jax.train.spec import PretrainConfig

  return _common.synthetic_batch(step_lib.batch_spec(PretrainConfig.from_config(config), n))


def build_step(config, mesh_sizes):
  from meddiff_jax import pretrained, sharding
  from meddiff_jax.models import unet3d
  from meddiff_jax.train import state as state_lib
  from meddiff_jax.train import step as step_lib
  from meddiff_jax.train.spec import PretrainConfig

  config = PretrainConfig.from_config(config)  # typed (the mesh is the caller's)
  mesh = sharding.make_mesh(mesh_sizes)
  rules = config.sharding.logical_rules
  spec = config.model
  model = unet3d.UNet3D(spec)
  tx = state_lib.make_optimizer(config.optimizer)
  init_fn = pretrained.init_params_fn(model, spec, config.data.patch_size)
  st, shardings = state_lib.create(init_fn, tx, 0, mesh, rules, config.sharding.min_shard_size)
  fn = step_lib.make_train_step(model.apply, config.diffusion.make_schedule(), tx, config, rules)
  batch_sh = sharding.batch_sharding(mesh, rules)
  jitted = step_lib.jit_train_step(fn, shardings, batch_sh, mesh)
  return mesh, rules, spec, st, jitted, batch_sh


def bench_preset(name, args):
  import jax

  from meddiff_jax import sharding
  from meddiff_jax.models import unet3d
  from meddiff_jax.train import throughput

  config = preset_config(name, args)
  n, p = config.training.batch_size, config.data.patch_size
  mesh, rules, spec, st, jitted, batch_sh = build_step(config, {"data": -1})
  batch = {k: jax.device_put(v, batch_sh) for k, v in synthetic_batch(config, n).items()}
  with sharding.activate(mesh, rules):
    t0 = time.perf_counter()
    compiled = jitted.lower(st, batch).compile()
    compile_s = time.perf_counter() - t0
    st, m = compiled(st, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      st, m = compiled(st, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  fwd = unet3d.forward_flops(spec, (p, p, p), n)
  train_flops = 3 * fwd * (1.33 if spec.remat != "none" else 1.0)  # fwd + 2x bwd (+ recompute)
  kind = jax.devices()[0].device_kind
  peak = throughput.peak_flops(kind)
  row = {
    "preset": name,
    "device": kind,
    "devices": jax.device_count(),
    "batch": n,
    "patch": p,
    "dtype": str(spec.dtype),
    "remat": spec.remat,
    "params": unet3d.count_params(st.params),
    "compile_s": round(compile_s, 2),
    "step_s_median": step_s,
    "step_s_min": min(times),
    "voxels_per_s": n * p**3 / step_s,
    "samples_per_s": n / step_s,
    "train_tflop_per_step": train_flops / 1e12,
    "achieved_tflops": train_flops / step_s / 1e12,
    "mfu": (train_flops / step_s / (peak * jax.device_count())) if peak else None,
  }
  del m
  return row


def bench_memory(args):
  """Compile (don't run) the paper config at 128^3 under replicated vs fsdp=8 on 8 fake devices."""
  import jax

  rows = []
  for name in args.presets.split(","):
    for mesh_text in args.meshes.split(";"):
      mesh_sizes = {"data": 1, **{k: int(v) for k, v in (kv.split("=") for kv in mesh_text.split(","))}}
      config = preset_config(name, args)
      config.training.batch_size = mesh_sizes["data"] * mesh_sizes.get("fsdp", 1)  # one sample per data shard
      mesh, rules, spec, st, jitted, batch_sh = build_step(config, mesh_sizes)
      from meddiff_jax import sharding

      batch = synthetic_batch(config, config.training.batch_size)
      abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh) for k, v in batch.items()}
      with sharding.activate(mesh, rules):
        mem = jitted.lower(st, abstract).compile().memory_analysis()
      rows.append(
        {
          "preset": name,
          "mesh": mesh_sizes,
          "patch": config.data.patch_size,
          "batch": config.training.batch_size,
          "remat": config.model.remat,
          "argument_mib": mem.argument_size_in_bytes / 2**20,
          "temp_mib": mem.temp_size_in_bytes / 2**20,
          "output_mib": mem.output_size_in_bytes / 2**20,
        }
      )
  return rows


def bench_monai(args):
  """A MONAI DiffusionModelUNet with our tiny/base preset's channels, levels, res blocks and attention."""
  import torch
  from monai.networks.nets import DiffusionModelUNet

  rows = []
  torch.set_num_threads(os.cpu_count() or 1)
  for name in args.presets.split(","):
    config = preset_config(name, args)
    m = config.model
    levels = len(m.channel_mult)
    p, n = config.data.patch_size, config.training.batch_size
    channels = tuple(m.base_channels * k for k in m.channel_mult)
    attn = tuple(i in tuple(m.attention_levels) for i in range(levels))
    in_ch = 1 + m.structure_channels + 3 * (2 * m.pos_num_freqs + 1)
    net = DiffusionModelUNet(
      spatial_dims=3,
      in_channels=in_ch,
      out_channels=1,
      channels=channels,
      attention_levels=attn,
      num_res_blocks=m.num_res_blocks,
      norm_num_groups=m.norm_groups,
      num_head_channels=m.num_head_channels,
      with_conditioning=False,
      num_class_embeds=4,
    )
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(n, in_ch, p, p, p)
    t = torch.randint(0, 1000, (n,))
    cls = torch.zeros(n, dtype=torch.long)
    target = torch.randn(n, 1, p, p, p)

    def step():
      opt.zero_grad()
      loss = (net(x, t, class_labels=cls) - target).abs().mean()
      loss.backward()
      opt.step()

    step()
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      step()
      times.append(time.perf_counter() - t0)
    rows.append(
      {
        "preset": name,
        "framework": "monai/torch " + torch.__version__,
        "params": sum(q.numel() for q in net.parameters()),
        "step_s_median": statistics.median(times),
        "voxels_per_s": n * p**3 / statistics.median(times),
      }
    )
  return rows


def main():
  args = parse_args()
  if args.memory:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  import jax

  result = {
    "command": " ".join(sys.argv),
    "host": platform.node(),
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "time": time.strftime("%Y-%m-%d %H:%M:%S"),
  }
  if args.memory:
    result["memory"] = bench_memory(args)
    for r in result["memory"]:
      print(
        f"{r['preset']:6s} mesh={r['mesh']!s:40s} patch={r['patch']:4d} batch={r['batch']:2d} "
        f"args={r['argument_mib']:9.1f} MiB "
        f"temp={r['temp_mib']:9.1f} MiB"
      )
  else:
    result["jax_rows"] = [bench_preset(name, args) for name in args.presets.split(",")]
    print(
      f"{'preset':6s} {'device':>14s} {'batch':>5s} {'patch':>5s} {'params':>10s} {'step s':>8s} "
      f"{'Mvox/s':>8s} {'TFLOP/step':>10s} {'TFLOP/s':>8s} {'MFU':>6s}"
    )
    for r in result["jax_rows"]:
      mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
      print(
        f"{r['preset']:6s} {r['device'][:14]:>14s} {r['batch']:5d} {r['patch']:5d} {r['params']:10,d} "
        f"{r['step_s_median']:8.3f} {r['voxels_per_s'] / 1e6:8.3f} {r['train_tflop_per_step']:10.4f} "
        f"{r['achieved_tflops']:8.3f} {mfu:>6s}"
      )
    if args.monai:
      result["monai_rows"] = bench_monai(args)
      for r, j in zip(result["monai_rows"], result["jax_rows"]):
        print(
          f"{r['preset']:6s} MONAI step {r['step_s_median']:.3f} s ({r['params']:,} params) | "
          f"ours {j['step_s_median']:.3f} s ({j['params']:,} params) | ours/MONAI time ratio "
          f"{j['step_s_median'] / r['step_s_median']:.2f}"
        )
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
