"""bf16 inference (`--config.inference_dtype`): 'auto' picks float32 on CPU and bfloat16 on GPU/TPU; the bf16
network keeps float32 params and agrees with float32 within a stated tolerance on the shipped tiny prior."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meddiff_jax import pretrained


def test_auto_is_float32_on_cpu_and_bfloat16_on_accelerators():
  assert pretrained.inference_dtype("auto", backend="cpu") == jnp.float32
  assert pretrained.inference_dtype("auto", backend="gpu") == jnp.bfloat16
  assert pretrained.inference_dtype("auto", backend="tpu") == jnp.bfloat16
  assert pretrained.inference_dtype("float32", backend="gpu") == jnp.float32
  assert pretrained.inference_dtype("bfloat16", backend="cpu") == jnp.bfloat16
  assert pretrained.inference_dtype(None) is None
  with pytest.raises(ValueError, match="inference_dtype='fp16'"):
    pretrained.inference_dtype("fp16")


def test_task_default_on_this_backend_and_params_stay_float32():
  from meddiff_jax.configs import denoise

  cfg = denoise.get_config()
  assert cfg.inference_dtype == "auto"  # the visible default every task shares (configs/task_options.py)
  pre = pretrained.load("tiny_phantom", cfg.inference_dtype)
  want = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  assert pre.spec.dtype == want
  bf = pretrained.load("tiny_phantom", "bfloat16")
  assert bf.spec.dtype == jnp.bfloat16 and bf.model.spec.dtype == jnp.bfloat16
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(bf.params)} == {jnp.dtype(jnp.float32)}
  assert pretrained.with_compute_dtype(pre, None) is pre


@pytest.mark.slow
def test_bfloat16_network_agrees_with_float32_within_tolerance():
  """Model output (eps) of the trained tiny prior on noisy CT-like windows at three noise levels.

  Tolerance: relative RMS difference <= 2e-2. bf16 keeps 8 mantissa bits (rounding 2^-9 ~ 0.2% per value);
  a few dozen conv/attention layers compound that to ~1%, while GroupNorm and the output stay float32. The
  difference must also be > 1e-4: a switch that silently ran float32 would pass the tolerance alone.
  """
  f32 = pretrained.load("tiny_phantom", "float32")
  bf = pretrained.with_compute_dtype(f32, "bfloat16")
  n, w = 3, f32.patch_size
  rng = np.random.default_rng(0)
  x0 = np.clip(np.cumsum(rng.normal(0, 0.2, (n, w, w, w, 1)), axis=1) / np.sqrt(w), -1, 1)  # smooth-ish
  t = jnp.array([50, 400, 900], jnp.int32)
  abar = jnp.asarray(f32.schedule.alphas_cumprod)[t][:, None, None, None, None]
  x = jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * jax.random.normal(jax.random.key(1), x0.shape)
  cond = {"pos_box": jnp.tile(jnp.array([[[-1.0, 1.0]] * 3]), (n, 1, 1)), "region": jnp.full((n,), 2, jnp.int32)}
  if f32.spec.structure_channels:
    cond["structures"] = jnp.zeros((n, w, w, w, f32.spec.structure_channels), jnp.uint8)
  a = np.asarray(jax.jit(f32.apply)(x, t, cond), np.float64)
  b = jax.jit(bf.apply)(x, t, cond)
  assert b.dtype == jnp.float32  # the sampler's arithmetic stays float32
  b = np.asarray(b, np.float64)
  for i in range(n):
    rel = np.sqrt(np.mean((a[i] - b[i]) ** 2) / np.mean(a[i] ** 2))
    print(f"t={int(t[i])}: relative RMS difference bf16 vs fp32 {rel:.2e}")
    assert 1e-4 < rel <= 2e-2, (int(t[i]), rel)
