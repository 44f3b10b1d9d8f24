"""DDIM sampling speed: our jitted fori_loop vs a Python loop over a jitted step vs MONAI's DDIM
inferer (torch), same model size and shapes.

python benchmarks/sampler.py [--sizes=64,128] [--steps=50] [--preset=tiny] [--method=ddim|dpmpp_2m|ddpm]
(--method only changes the fori_loop column; the python-loop and MONAI columns are DDIM.)
Writes benchmarks/results/sampler.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def ours(preset, size, steps, method="ddim"):
  import jax
  import jax.numpy as jnp

  from meddiff_jax import pretrained
  from meddiff_jax.configs import pretrain
  from meddiff_jax.diffusion import samplers, schedules

  config = pretrain.get_config(preset)
  config.data.patch_size = size
  model, spec = pretrained.build_model(config)
  x, t, cond = pretrained.dummy_inputs(spec, size)
  params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x, t, cond)["params"]
  sched = schedules.make_schedule("cosine", 1000)
  ts = samplers.make_timesteps(1000, steps, "trailing")
  prev = samplers.previous_timesteps(ts)
  fn = lambda p: lambda xx, tt: model.apply({"params": p}, xx, tt, cond)
  scan = jax.jit(lambda p, r, x: samplers.sample(fn(p), sched, ts, r, x, method=method))
  xT = jax.random.normal(jax.random.key(1), x.shape)
  jax.block_until_ready(scan(params, jax.random.key(2), xT))
  t0 = time.perf_counter()
  jax.block_until_ready(scan(params, jax.random.key(2), xT))
  t_scan = time.perf_counter() - t0

  @jax.jit
  def one_step(p, x, t, tp):
    out = model.apply({"params": p}, x, t, cond)
    return samplers.ddim_step(sched, out, x, t, tp, jnp.zeros_like(x))

  xs = one_step(params, xT, jnp.array([ts[0]]), jnp.array([prev[0]]))
  jax.block_until_ready(xs)
  t0 = time.perf_counter()
  xs = xT
  for a, b in zip(ts, prev):
    xs = one_step(params, xs, jnp.array([a]), jnp.array([b]))
  jax.block_until_ready(xs)
  return t_scan, time.perf_counter() - t0, config


def monai_ddim(config, size, steps):
  try:
    import torch
    from monai.inferers import DiffusionInferer
    from monai.networks.nets import DiffusionModelUNet
    from monai.networks.schedulers import DDIMScheduler
  except ImportError:
    return None
  m = config.model
  levels = len(m.channel_mult)
  net = DiffusionModelUNet(
    spatial_dims=3,
    in_channels=1,
    out_channels=1,
    channels=tuple(m.base_channels * k for k in m.channel_mult),
    attention_levels=tuple(i in tuple(m.attention_levels) for i in range(levels)),
    num_res_blocks=m.num_res_blocks,
    norm_num_groups=m.norm_groups,
    num_head_channels=m.num_head_channels,
  ).eval()
  sched = DDIMScheduler(num_train_timesteps=1000, schedule="cosine")
  sched.set_timesteps(steps)
  inferer = DiffusionInferer(sched)
  noise = torch.randn(1, 1, size, size, size)
  with torch.no_grad():
    t0 = time.perf_counter()
    inferer.sample(input_noise=noise, diffusion_model=net, scheduler=sched, verbose=False)
  return time.perf_counter() - t0


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--sizes", default="64,128")
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--preset", default="tiny")
  p.add_argument("--method", default="ddim")
  args = p.parse_args()
  rows = []
  for size in map(int, args.sizes.split(",")):
    t_scan, t_loop, config = ours(args.preset, size, args.steps, args.method)
    t_monai = monai_ddim(config, size, args.steps)
    rows.append(
      {
        "size": size,
        "steps": args.steps,
        "preset": args.preset,
        "method": args.method,
        "jax_fori_loop_s": t_scan,
        "jax_python_loop_s": t_loop,
        "monai_ddim_s": t_monai,
      }
    )
    print(
      f"{size}^3 DDIM-{args.steps}: fori_loop {t_scan:.2f} s | python loop {t_loop:.2f} s | "
      f"MONAI {t_monai if t_monai is None else round(t_monai, 2)} s"
    )
  out = ROOT / "benchmarks" / "results" / "sampler.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))


if __name__ == "__main__":
  main()
