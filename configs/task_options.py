"""Options every whole-volume task shares (windows, sampler, seed)."""

import ml_collections


def add_window_options(
  c: ml_collections.ConfigDict, num_steps: int = 50, sampler: str = "dpmpp_2m"
) -> ml_collections.ConfigDict:
  c.num_steps = num_steps  # reverse-process steps (network calls per window); the step budget
  # ddpm | ddim | dpmpp_2m (DPM-Solver++(2M), second order). Default: the cheapest measured budget within RMSE
  # 0.02 of the converged ODE sample from pure noise on the shipped prior is dpmpp_2m-50 (ddim-50: 0.021);
  # denoise (10) and anomaly (20) measured their own task budgets (configs/denoise.py, anomaly.py). RESULTS.md #15.
  # Not used by RePaint (lesion inpaint: stochastic DDPM re-noising) or DiffPIR (its own data-consistency loop).
  c.sampler = sampler
  c.overlap = 0.5  # fraction shared by neighbouring windows
  c.window_batch = 8  # windows per model call (rounded up to a multiple of the device count)
  c.seed = 0
  # The network's compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU) | float32 | bfloat16. Parameters
  # stay float32 in storage; norms, the model output and the sampler stay float32 (bf16 vs fp32 agreement:
  # tests/test_inference_dtype.py, RESULTS.md #15).
  c.inference_dtype = "auto"
  return c
