"""Quality vs cost of the samplers on the shipped tiny_phantom prior (one 16^3 window, no blending):
distance of DDIM / DPM-Solver++(2M) samples at a few step budgets to references from the same x_T.

References: the probability-flow ODE solved with DDIM-1000 (what a deterministic solver converges to), and
DDPM-1000 (the paper's sampler; stochastic, so its distance to any ODE sample has a floor, measured as
the distance between two DDPM-1000 runs from the same x_T).

python benchmarks/solver_quality.py [--budgets=10,20,50] [--batch=2]
Writes benchmarks/results/solver_quality.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--budgets", default="10,20,50")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--reference_steps", type=int, default=1000)
  args = p.parse_args()

  import jax
  import jax.numpy as jnp

  from meddiff_jax.diffusion import samplers
  from meddiff_jax.tasks import common

  pre = common.load_pretrained("tiny_phantom")
  w, n = pre.patch_size, args.batch
  cond = {"pos_box": jnp.tile(jnp.array([[[-1.0, 1.0]] * 3]), (n, 1, 1)), "region": jnp.full((n,), 2, jnp.int32)}
  if pre.spec.structure_channels:
    cond["structures"] = jnp.zeros((n, w, w, w, pre.spec.structure_channels), jnp.uint8)
  x_T = jax.random.normal(jax.random.key(0), (n, w, w, w, 1))
  T = pre.schedule.num_timesteps

  def run(method, steps, x, cond, seed=1):
    fn = lambda xx, tt: pre.apply(xx, tt, cond)
    ts = samplers.make_timesteps(T, steps, "trailing")
    f = jax.jit(lambda r, x: samplers.sample(fn, pre.schedule, ts, r, x, method=method))
    t0 = time.perf_counter()
    out = np.asarray(f(jax.random.key(seed), x))
    return out, time.perf_counter() - t0

  rows = {}
  ode_ref, t_ref = run("ddim", args.reference_steps, x_T, cond)
  rows[f"ddim-{args.reference_steps}"] = t_ref
  cond2 = jax.tree_util.tree_map(lambda a: jnp.concatenate([a, a]), cond)
  ddpm, t_ddpm = run("ddpm", args.reference_steps, jnp.concatenate([x_T, x_T]), cond2)
  ddpm_a, ddpm_b = ddpm[:n], ddpm[n:]  # same x_T, independent ancestral noise
  rmse = lambda a, b: float(np.sqrt(np.mean((a - b) ** 2)))
  result = {"command": " ".join(sys.argv), "patch": w, "batch": n, "ode_reference": f"ddim-{args.reference_steps}",
            "ddpm_floor_rmse": rmse(ddpm_a, ddpm_b), "ddpm_vs_ode_ref_rmse": rmse(ddpm_a, ode_ref),
            "seconds": {f"ddim-{args.reference_steps}": t_ref, f"ddpm-{args.reference_steps} (x2 batch)": t_ddpm},
            "rows": []}
  print(f"DDPM floor {result['ddpm_floor_rmse']:.4f}  DDPM vs ODE ref {result['ddpm_vs_ode_ref_rmse']:.4f}", flush=True)
  for method in ("ddim", "dpmpp_2m"):
    for steps in map(int, args.budgets.split(",")):
      out, secs = run(method, steps, x_T, cond)
      row = {"method": method, "steps": steps, "rmse_to_ode_ref": rmse(out, ode_ref),
             "max_to_ode_ref": float(np.max(np.abs(out - ode_ref))), "rmse_to_ddpm": rmse(out, ddpm_a),
             "seconds_incl_compile": secs}
      result["rows"].append(row)
      print(row, flush=True)
  out = ROOT / "benchmarks" / "results" / "solver_quality.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
