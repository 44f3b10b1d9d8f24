"""Mutation check for the diffusion samplers, the task algorithms (#14) and the host sample pipeline (#12).

Applies one semantic mutation at a time (sign flips, off-by-one timesteps, dropped noise / data terms,
wrong noise levels, conditions ignored) to a scratch copy of the package, runs the FAST tests that target
it (Gaussian-oracle and closed-form tests, no UNet compiles), and reports which mutants survive.

python benchmarks/mutation_check.py [--only NAME,NAME] [--jobs 1]
Writes benchmarks/results/mutation_check.json and prints a markdown table. A mutant "survives" when its
tests still pass; a mutation whose text is not found fails loudly (the code moved: update the list).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

SAMPLERS = "meddiff_jax/diffusion/samplers.py"
DENOISE = "meddiff_jax/tasks/denoise.py"
CONTROLLED = "meddiff_jax/tasks/controlled.py"
COMMON = "meddiff_jax/tasks/common.py"
MULTILEVEL = "meddiff_jax/data/multilevel.py"
T_ALG = "tests/test_task_algorithms.py"
T_SAMP = "tests/test_samplers.py"
T_COND = "tests/test_conditions.py"
T_HOST = "tests/test_pipeline_host_cpu.py"

# (name, file, original text, mutated text, pytest selection)
MUTANTS = [
  (
    "partial: fresh noise on top of y's noise",
    SAMPLERS,
    "one_minus_alpha_bar(schedule, t, y.ndim) - abar * jnp.square(input_sigma)",
    "one_minus_alpha_bar(schedule, t, y.ndim) - 0.0 * jnp.square(input_sigma)",
    [T_ALG, "-k", "partial or noise_matched"],
  ),
  (
    "partial: start without the sqrt(abar) scale",
    SAMPLERS,
    "return jnp.sqrt(abar) * y + jnp.sqrt(extra) * noise",
    "return y + jnp.sqrt(extra) * noise",
    [T_ALG, "-k", "partial or noise_matched"],
  ),
  (
    "sample: first step not from t_start",
    SAMPLERS,
    "rng, step_rng = jax.random.split(rng)\n    t = jnp.full((n,), jnp.where(e == first, t_first, ts_ext[e]))",
    "rng, step_rng = jax.random.split(rng)\n    t = jnp.full((n,), ts_ext[e])",
    [T_ALG, "-k", "t_start_itself"],
  ),
  (
    "dpm-solver++: first step not from t_start",
    SAMPLERS,
    "x, x0_prev, h_prev = carry\n    t = jnp.full((n,), jnp.where(e == first, t_first, ts_ext[e]))",
    "x, x0_prev, h_prev = carry\n    t = jnp.full((n,), ts_ext[e])",
    [T_ALG, "-k", "t_start_itself"],
  ),
  (
    "sample: off-by-one start index",
    SAMPLERS,
    "first = above + on_grid.astype(jnp.int32)",
    "first = above + 1",
    [T_ALG, "-k", "t_start_itself"],
  ),
  (
    "partial grid: off by one below t*",
    SAMPLERS,
    "np.round(np.linspace(0, t_start, n))",
    "np.round(np.linspace(0, t_start - 1, n))",
    [T_ALG, "-k", "partial"],
  ),
  (
    "ddim: direction sign flipped",
    SAMPLERS,
    "return jnp.exp(0.5 * log_prev) * x0 + direction + sigma * noise",
    "return jnp.exp(0.5 * log_prev) * x0 - direction + sigma * noise",
    [T_SAMP, "-k", "clipped_steps_match_the_float64 or oracle_denoiser"],
  ),
  (
    "ddpm: noise term dropped",
    SAMPLERS,
    "return mean + jnp.where(t_prev >= 0, jnp.sqrt(var), 0.0) * noise",
    "return mean",
    [T_SAMP, "-k", "clipped_steps_match_the_float64"],
  ),
  (
    "ddpm: clip_x0 ignored",
    SAMPLERS,
    "  if clip_x0:\n    x0 = jnp.clip(x0, -1.0, 1.0)\n  mean",
    "  if False:\n    x0 = jnp.clip(x0, -1.0, 1.0)\n  mean",
    [T_SAMP, "-k", "clipped_steps_match_the_float64"],
  ),
  (
    "ddim: eps not recomputed from the clipped x0",
    SAMPLERS,
    "    eps = (x_t - jnp.exp(0.5 * log_t) * x0) / jnp.sqrt(one_minus_t)\n",
    "",
    [T_SAMP, "-k", "clipped_steps_match_the_float64"],
  ),
  (
    "cfg: guidance around the conditional output",
    SAMPLERS,
    "return out_u + guidance_scale * (out_c - out_u)",
    "return out_c + guidance_scale * (out_c - out_u)",
    [T_SAMP, "-k", "classifier_free"],
  ),
  (
    "null condition: structures kept",
    SAMPLERS,
    "null[conditions.STRUCTURES] = jnp.zeros_like(null[conditions.STRUCTURES])",
    "null[conditions.STRUCTURES] = null[conditions.STRUCTURES]",
    [T_SAMP, "-k", "drop_conditions or classifier_free"],
  ),
  (
    "organ dropout: body dropped too",
    SAMPLERS,
    "  body = s[..., -1:]\n",
    "  body = jnp.zeros_like(s[..., -1:])\n",
    [T_COND, "-k", "dropout"],
  ),
  (
    "diffpir: lambda on the [-1,1] scale (rho x4)",
    DENOISE,
    "rho = lam * (0.5 * sigma_n) ** 2 / sigma_t2",
    "rho = lam * sigma_n ** 2 / sigma_t2",
    [T_ALG, "-k", "diffpir_matches"],
  ),
  (
    "diffpir: data step dropped",
    DENOISE,
    "x0_hat = (y + rho * x0) / (1.0 + rho)",
    "x0_hat = x0",
    [T_ALG, "-k", "diffpir"],
  ),
  (
    "diffpir: data step sign flipped",
    DENOISE,
    "x0_hat = (y + rho * x0) / (1.0 + rho)",
    "x0_hat = (-y + rho * x0) / (1.0 + rho)",
    [T_ALG, "-k", "diffpir"],
  ),
  (
    "diffpir: zeta ignored",
    DENOISE,
    "noise = jnp.sqrt(1.0 - zeta) * eps_hat + jnp.sqrt(zeta) * jax.random.normal(z_rng, x.shape)",
    "noise = eps_hat",
    [T_ALG, "-k", "diffpir"],
  ),
  (
    "diffpir: start from pure noise",
    DENOISE,
    "x = samplers.noise_matched_start(schedule, y, jnp.full((n,), ts[0]), jax.random.normal(init_rng, y.shape), sigma_n)",
    "x = jax.random.normal(init_rng, y.shape)",
    [T_ALG, "-k", "diffpir"],
  ),
  (
    "diffpir: start adds fresh noise (y's noise ignored)",
    DENOISE,
    "jax.random.normal(init_rng, y.shape), sigma_n)",
    "jax.random.normal(init_rng, y.shape), 0.0)",
    [T_ALG, "-k", "diffpir"],
  ),
  (
    "diffpir: eps_hat sign flipped",
    DENOISE,
    "eps_hat = (x - jnp.sqrt(abar) * x0_hat)",
    "eps_hat = (x + jnp.sqrt(abar) * x0_hat)",
    [T_ALG, "-k", "diffpir"],
  ),
  (
    "denoise: noisy input decides the window merge",
    DENOISE,
    "below = (denoised_unit <= -1.0 + margin) & (input_hu <= lo)",
    "below = input_hu <= lo",
    [T_ALG, "-k", "window"],
  ),
  (
    "noise estimate: white-noise lag 1",
    DENOISE,
    "mask: np.ndarray | None = None, lag: int = 4)",
    "mask: np.ndarray | None = None, lag: int = 1)",
    ["tests/test_tasks.py", "-k", "noise_estimate"],
  ),
  (
    "anomaly: noise level one grid step low",
    "meddiff_jax/tasks/anomaly.py",
    "denoise.partial_diffusion(fn, pre.schedule, y, int(config.noise_t),",
    "denoise.partial_diffusion(fn, pre.schedule, y, int(config.noise_t) - 10,",
    [T_ALG, "-k", "anomaly"],
  ),
  (
    "repaint: known region not re-noised",
    CONTROLLED,
    "known_prev = schedules.q_sample(schedule, known, t_prev, jax.random.normal(k2, x.shape))",
    "known_prev = known",
    [T_ALG, "-k", "repaint"],
  ),
  (
    "repaint: known region at the wrong noise level (t)",
    CONTROLLED,
    "known_prev = schedules.q_sample(schedule, known, t_prev, jax.random.normal(k2, x.shape))",
    "known_prev = schedules.q_sample(schedule, known, t, jax.random.normal(k2, x.shape))",
    [T_ALG, "-k", "repaint"],
  ),
  (
    "repaint: jumps do not re-noise",
    CONTROLLED,
    "return jnp.sqrt(ratio) * x + jnp.sqrt(1.0 - ratio) * jax.random.normal(rng, x.shape)",
    "return x",
    [T_ALG, "-k", "repaint"],
  ),
  (
    "repaint: no jumps",
    CONTROLLED,
    "    if u >= 0 and jumps.get(u, 0) > 0:",
    "    if False:",
    [T_ALG, "-k", "repaint"],
  ),
  ("repaint: final step repeated", CONTROLLED, "  while u >= 0:\n", "  while u >= -1:\n", [T_ALG, "-k", "repaint"]),
  (
    "conditions: label map ignored",
    COMMON,
    "out = encode(labels, np.asarray(hu), lut, groups)",
    "out = encode(None, np.asarray(hu), lut, groups)",
    [T_COND, "-k", "structures"],
  ),
  (
    "conditions: body channel not from HU",
    "meddiff_jax/data/preprocess.py",
    "return np.asarray(hu) > BODY_THRESHOLD_HU",
    "return np.asarray(hu) > -2000.0",
    [T_COND, "-k", "structures or synthesis"],
  ),
  (
    "position frame: padding counted in the frame",
    "meddiff_jax/tasks/sliding_window.py",
    "rel = self.starts - np.asarray(self.frame_start)",
    "rel = self.starts.astype(np.float32)",
    [T_COND, "-k", "frame"],
  ),
  (
    "lesion crops: positive centre ignored",
    MULTILEVEL,
    "  if centre is not None:\n",
    "  if False:\n",
    [T_COND, "-k", "lesion"],
  ),
  (
    "lesion labels: organ lost under the lesion",
    MULTILEVEL,
    "organs = np.where(wide >= LESION_OFFSET, wide - LESION_OFFSET,",
    "organs = np.where(wide >= LESION_OFFSET, 0,",
    [T_COND, "-k", "lesion"],
  ),
  (
    "sr hint: degradation after the resize",
    MULTILEVEL,
    "      thick = thick_slices(np.asarray(native, np.float32), sr_factor, axis=2)\n"
    "    sample[conditions.HINT] = preprocess.hu_to_unit(resize(thick, target, order=1, dtype=np.float32), region)",
    "      thick = None\n"
    "    sample[conditions.HINT] = thick_slices(sample[conditions.IMAGE], sr_factor, axis=2) if thick is None else "
    "preprocess.hu_to_unit(resize(thick, target, order=1, dtype=np.float32), region)",
    [T_COND, "-k", "sr_hint"],
  ),
  (
    "resize: linear weights swapped",
    MULTILEVEL,
    "taps.append((lo, np.minimum(lo + 1, n - 1), 1.0 - w, w))",
    "taps.append((lo, np.minimum(lo + 1, n - 1), w, 1.0 - w))",
    [T_HOST, "-k", "separable"],
  ),
  (
    "resize: nearest rounds down",
    MULTILEVEL,
    "np.floor(_source_coordinates(n, m) + 0.5)",
    "np.floor(_source_coordinates(n, m))",
    [T_HOST, "-k", "separable"],
  ),
  (
    "packed structures: body bit read as a group bit",
    "meddiff_jax/models/conditions.py",
    "masks = np.array([0xFE] * k + [0x01], np.uint8)",
    "masks = np.array([0xFF] * k + [0x01], np.uint8)",
    [T_HOST, "-k", "packed"],
  ),
  (
    "loss: L1 computed as L2",
    "meddiff_jax/diffusion/losses.py",
    "    err = jnp.abs(diff)",
    "    err = jnp.square(diff)",
    [T_SAMP, "-k", "loss_type"],
  ),
  (
    "slice AUROC: slice score is the mean",
    "meddiff_jax/evaluation/metrics.py",
    "      out[i] = np.mean(np.partition(values, values.size - k)[-k:])",
    "      out[i] = np.mean(values)",
    ["tests/test_metrics.py", "-k", "slice"],
  ),
]


def run_tests(tree: pathlib.Path, selection: list[str], timeout: int) -> tuple[int, float, str]:
  env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS="cpu")
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *selection],
      cwd=tree,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
    )
    rc, tail = proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()[-1:]
  except subprocess.TimeoutExpired:
    rc, tail = -1, ["timeout"]
  return rc, time.perf_counter() - t0, " ".join(tail)


def scratch_copy(dest: pathlib.Path) -> None:
  for name in ("meddiff_jax", "tests", "configs"):
    shutil.copytree(ROOT / name, dest / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
  shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--only", default="", help="comma-separated substrings of mutant names")
  p.add_argument("--timeout", type=int, default=900)
  p.add_argument("--skip_baseline", action="store_true", help="skip the unmutated runs (they must pass)")
  args = p.parse_args()
  chosen = [m for m in MUTANTS if not args.only or any(s in m[0] for s in args.only.split(","))]
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    base = pathlib.Path(tmp) / "base"
    scratch_copy(base)
    # every selection must pass unmutated, or "killed" would mean nothing
    for selection in [] if args.skip_baseline else sorted({tuple(m[4]) for m in chosen}):
      rc, seconds, tail = run_tests(base, list(selection), args.timeout)
      print(f"baseline  {seconds:6.1f}s  {' '.join(selection)}  ({tail})", flush=True)
      if rc != 0:
        raise SystemExit(f"baseline fails for {' '.join(selection)}: {tail}")
    for name, path, old, new, selection in chosen:
      tree = pathlib.Path(tmp) / "mutant"
      if tree.exists():
        shutil.rmtree(tree)
      shutil.copytree(base, tree)
      source = (tree / path).read_text()
      if source.count(old) != 1:
        raise SystemExit(f"mutant {name!r}: the text to mutate occurs {source.count(old)} times in {path}")
      (tree / path).write_text(source.replace(old, new))
      rc, seconds, tail = run_tests(tree, selection, args.timeout)
      status = "killed" if rc != 0 else "SURVIVED"
      results.append(
        {
          "mutant": name,
          "file": path,
          "tests": " ".join(selection),
          "status": status,
          "seconds": round(seconds, 1),
          "pytest": tail,
        }
      )
      print(f"{status:9s} {seconds:6.1f}s  {name}  ({tail})", flush=True)
  out = ROOT / "benchmarks" / "results" / "mutation_check.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1))
  killed = sum(r["status"] == "killed" for r in results)
  print(f"\n{killed}/{len(results)} mutants killed\n\n| mutant | file | status |\n|---|---|---|")
  for r in results:
    print(f"| {r['mutant']} | `{r['file']}` | {r['status']} |")


if __name__ == "__main__":
  main()
