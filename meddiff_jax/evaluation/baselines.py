"""Classical denoising baselines the denoising protocol reports beside the model (host side, numpy).

Both run on HU clipped to the evaluation window and mapped to [0, 1] (the range the filters' parameters
are defined on), and are mapped back to HU. Non-local means is scikit-image's `denoise_nl_means`
(fast mode, 3D patches) with its documented recipe h = 0.8 sigma_est; sigma_est is the MAD of first
differences along the last axis (inside the window) / 0.6745 / sqrt(2) (skimage's `estimate_sigma` would
need PyWavelets).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _to_unit(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
  lo, hi = window
  return (np.clip(np.asarray(hu, np.float64), lo, hi) - lo) / (hi - lo)


def _from_unit(x: np.ndarray, window: tuple[float, float]) -> np.ndarray:
  lo, hi = window
  return (x * (hi - lo) + lo).astype(np.float32)


def gaussian(hu: np.ndarray, window: tuple[float, float], sigma_voxels: float = 1.0) -> np.ndarray:
  return _from_unit(ndimage.gaussian_filter(_to_unit(hu, window), sigma_voxels), window)


def noise_sigma(x: np.ndarray) -> float:
  """Robust white-noise std of a [0, 1] windowed image: neighbour differences cancel smooth anatomy, the
  median ignores edges; pairs touching the clipped ends (air, bone) are left out, they carry no noise."""
  x = np.asarray(x, np.float64)
  inside = (x > 0.0) & (x < 1.0)
  d = np.diff(x, axis=-1)[inside[..., 1:] & inside[..., :-1]]
  if d.size == 0:
    return 0.0
  return float(np.median(np.abs(d - np.median(d))) / 0.6745 / np.sqrt(2.0))


def non_local_means(
  hu: np.ndarray, window: tuple[float, float], h_factor: float = 0.8, patch_size: int = 3, patch_distance: int = 3
) -> np.ndarray:
  from skimage.restoration import denoise_nl_means

  x = _to_unit(hu, window)
  sigma = noise_sigma(x)
  out = denoise_nl_means(
    x, h=h_factor * sigma, sigma=sigma, patch_size=patch_size, patch_distance=patch_distance, fast_mode=True
  )
  return _from_unit(out, window)
