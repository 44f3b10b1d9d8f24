"""Quality vs cost of the samplers on a prior (--checkpoint, default the shipped tiny_phantom; one window, no
blending):
distance of DDIM / DPM-Solver++(2M) samples at a few step budgets to references from the same x_T.

References: the probability-flow ODE solved with DPM-Solver++(2M) at 250 steps (what every deterministic
solver converges to; in the Gaussian test its error at 160 steps is 2.7e-4, below DDIM-1000's ~2e-3), and
DDPM-1000 (the paper's sampler; stochastic, so its distance to any ODE sample has a floor, measured as the
distance between two DDPM-1000 runs from the same x_T).

python benchmarks/solver_quality.py [--checkpoint=tiny_phantom] [--budgets=10,20,50] [--ode_reference=dpmpp_2m:250]
  [--ddpm_steps=1000]
Writes benchmarks/results/solver_quality_[CHECKPOINT_]SPACING_clipN.json (no prefix for tiny_phantom).
Task metrics (PSNR/SSIM, AUROC) per budget: benchmarks/task_eval.py --budgets.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import _common
import numpy as np


def main():
  p = argparse.ArgumentParser()
  _common.add_prior_flags(p)
  p.add_argument("--budgets", default="10,20,50")
  p.add_argument("--ode_reference", default="dpmpp_2m:250")
  p.add_argument("--ddpm_steps", type=int, default=1000, help="0: skip the DDPM reference")
  p.add_argument("--spacing", default="trailing", help="timestep spacing of the budgets (trailing|leading|linspace)")
  p.add_argument("--clip_x0", type=int, default=1)
  args = p.parse_args()

  import jax
  import jax.numpy as jnp

  from meddiff_jax.diffusion import samplers

  pre = _common.load_prior(args)
  w, n = pre.patch_size, 2
  cond = _common.window_conditions(pre, n)
  x_T = jax.random.normal(jax.random.key(0), (n, w, w, w, 1))  # two different starting noises
  T = pre.schedule.num_timesteps

  def run(method, steps, x, cond, seed=1, spacing="trailing"):
    fn = lambda xx, tt: pre.apply(xx, tt, cond)
    ts = samplers.make_timesteps(T, steps, spacing)
    f = jax.jit(lambda r, x: samplers.sample(fn, pre.schedule, ts, r, x, method=method, clip_x0=bool(args.clip_x0)))
    t0 = time.perf_counter()
    out = np.asarray(f(jax.random.key(seed), x))
    return out, time.perf_counter() - t0

  ref_method, ref_steps = args.ode_reference.split(":")
  ode_ref, t_ref = run(ref_method, int(ref_steps), x_T, cond, spacing=args.spacing)
  print(f"ODE reference {args.ode_reference}: {t_ref:.1f} s", flush=True)
  rmse = _common.rmse
  result = {
    "command": " ".join(sys.argv),
    "commit": _common.commit(),
    "checkpoint": args.checkpoint,
    "patch": w,
    "ode_reference": args.ode_reference,
    "spacing": args.spacing,
    "clip_x0": bool(args.clip_x0),
    "seconds": {args.ode_reference: t_ref},
    "rows": [],
  }
  outs = {}
  for method in ("ddim", "dpmpp_2m"):
    for steps in map(int, args.budgets.split(",")):
      out, secs = run(method, steps, x_T, cond, spacing=args.spacing)
      outs[method, steps] = out
      row = {
        "method": method,
        "steps": steps,
        "rmse_to_ode_ref": rmse(out, ode_ref),
        "max_to_ode_ref": float(np.max(np.abs(out - ode_ref))),
        "seconds_incl_compile": secs,
      }
      result["rows"].append(row)
      print(row, flush=True)
  prefix = "" if args.checkpoint == "tiny_phantom" else pathlib.Path(args.checkpoint).name + "_"
  name = f"solver_quality_{prefix}{args.spacing}_clip{args.clip_x0}.json"
  _common.write_json(name, result)
  if not args.ddpm_steps:
    return
  # the same x_T[0] twice: independent ancestral noise, so the pair measures DDPM's own spread
  ddpm, t_ddpm = run("ddpm", args.ddpm_steps, jnp.concatenate([x_T[:1], x_T[:1]]), cond)
  result["seconds"][f"ddpm-{args.ddpm_steps}"] = t_ddpm
  result["ddpm_floor_rmse"] = rmse(ddpm[0], ddpm[1])
  result["ddpm_vs_ode_ref_rmse"] = rmse(ddpm[0], ode_ref[0])
  for row in result["rows"]:
    row["rmse_to_ddpm"] = rmse(outs[row["method"], row["steps"]][0], ddpm[0])
  print(f"DDPM floor {result['ddpm_floor_rmse']:.4f}  DDPM vs ODE ref {result['ddpm_vs_ode_ref_rmse']:.4f}", flush=True)
  _common.write_json(name, result)


if __name__ == "__main__":
  main()
