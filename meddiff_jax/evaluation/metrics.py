"""Image-quality and detection metrics for 3D volumes (numpy, float64, host side).

Definitions follow the reference libraries so numbers are comparable: PSNR and SSIM as scikit-image's
`peak_signal_noise_ratio` / `structural_similarity` (7^3 uniform window, K1=0.01, K2=0.03, sample
covariance, mean over the valid interior); AUROC / AUPRC as scikit-learn's `roc_auc_score` /
`average_precision_score`. MS-SSIM follows Wang et al. (2003): 5 scales, 2x average-pool downsampling.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def psnr(reference: np.ndarray, image: np.ndarray, data_range: float) -> float:
  mse = float(np.mean((np.asarray(reference, np.float64) - np.asarray(image, np.float64)) ** 2))
  return psnr_of_mse(mse, data_range)


def psnr_of_mse(mse: float, data_range: float) -> float:
  """PSNR (dB) of a mean squared error (accumulated elsewhere, e.g. block by block)."""
  return float("inf") if mse == 0 else float(10.0 * np.log10(data_range**2 / mse))


def _ssim_terms(x: np.ndarray, y: np.ndarray, data_range: float, win_size: int):
  ndim = x.ndim
  n = win_size**ndim
  cov_norm = n / (n - 1)  # sample covariance, as skimage's default
  mean = lambda a: ndimage.uniform_filter(a, size=win_size, mode="reflect")
  ux, uy = mean(x), mean(y)
  vx = cov_norm * (mean(x * x) - ux * ux)
  vy = cov_norm * (mean(y * y) - uy * uy)
  vxy = cov_norm * (mean(x * y) - ux * uy)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  luminance = (2 * ux * uy + c1) / (ux**2 + uy**2 + c1)
  contrast_structure = (2 * vxy + c2) / (vx + vy + c2)
  pad = (win_size - 1) // 2
  interior = tuple(slice(pad, s - pad) for s in x.shape)
  return luminance[interior], contrast_structure[interior]


def ssim(reference: np.ndarray, image: np.ndarray, data_range: float, win_size: int = 7) -> float:
  """Mean structural similarity over the valid interior (scikit-image's definition, any ndim)."""
  x, y = np.asarray(reference, np.float64), np.asarray(image, np.float64)
  if x.shape != y.shape:
    raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
  if min(x.shape) < win_size:
    raise ValueError(f"every side must be >= win_size={win_size}; got {x.shape}")
  lum, cs = _ssim_terms(x, y, data_range, win_size)
  return float(np.mean(lum * cs))


def ms_ssim(
  reference: np.ndarray,
  image: np.ndarray,
  data_range: float,
  win_size: int = 7,
  weights: tuple[float, ...] = MS_SSIM_WEIGHTS,
) -> float:
  """Multi-scale SSIM: contrast-structure at every scale, luminance at the coarsest.

  Needs every side >= win_size * 2^(scales-1); fewer scales (renormalised weights) are used otherwise.
  """
  x, y = np.asarray(reference, np.float64), np.asarray(image, np.float64)
  max_scales = int(np.floor(np.log2(min(x.shape) / win_size))) + 1
  weights = np.asarray(weights[: max(1, min(len(weights), max_scales))])
  weights = weights / weights.sum()
  values = []
  for scale in range(len(weights)):
    lum, cs = _ssim_terms(x, y, data_range, win_size)
    last = scale == len(weights) - 1
    values.append(np.mean(lum * cs) if last else np.mean(cs))
    if not last:
      crop = tuple(slice(0, s - s % 2) for s in x.shape)
      pool = lambda a: (
        a[crop].reshape([d for s in a[crop].shape for d in (s // 2, 2)]).mean(axis=tuple(range(1, 2 * a.ndim, 2)))
      )
      x, y = pool(x), pool(y)
  values = np.maximum(np.asarray(values), 0.0)
  return float(np.prod(values**weights))


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Area under the ROC curve via the rank statistic (ties get average ranks)."""
  labels = np.asarray(labels).ravel().astype(bool)
  scores = np.asarray(scores, np.float64).ravel()
  pos, neg = int(labels.sum()), int((~labels).sum())
  if pos == 0 or neg == 0:
    raise ValueError("AUROC needs both positive and negative labels")
  ranks = _average_ranks(scores)
  return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _average_ranks(scores: np.ndarray) -> np.ndarray:
  order = np.argsort(scores, kind="mergesort")
  sorted_scores = scores[order]
  ranks = np.empty(len(scores), np.float64)
  boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
  starts = np.concatenate([[0], boundaries])
  ends = np.concatenate([boundaries, [len(scores)]])
  for s, e in zip(starts, ends):
    ranks[order[s:e]] = (s + e + 1) / 2.0  # average of 1-based ranks s+1 .. e
  return ranks


def auprc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Average precision: sum over thresholds of (R_n - R_{n-1}) P_n (scikit-learn's definition)."""
  labels = np.asarray(labels).ravel().astype(bool)
  scores = np.asarray(scores, np.float64).ravel()
  if not labels.any():
    raise ValueError("AUPRC needs at least one positive label")
  order = np.argsort(-scores, kind="mergesort")
  s, y = scores[order], labels[order]
  last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # thresholds at distinct score values
  tp = np.cumsum(y)[last_of_tie]
  fp = (last_of_tie + 1) - tp
  precision = tp / (tp + fp)
  recall = tp / y.sum()
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def dice(a: np.ndarray, b: np.ndarray) -> float:
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  denom = a.sum() + b.sum()
  return 1.0 if denom == 0 else float(2.0 * np.logical_and(a, b).sum() / denom)


def slice_scores(
  amap: np.ndarray, body: np.ndarray | None = None, axis: int = 2, top_fraction: float = 0.01
) -> np.ndarray:
  """Per-2D-slice anomaly scores (BMAD scores slices): the mean of the top `top_fraction` of the map inside
  the body in each slice along `axis` (0 for a slice without body voxels)."""
  amap = np.moveaxis(np.asarray(amap, np.float64), axis, 0)
  body = np.ones(amap.shape, bool) if body is None else np.moveaxis(np.asarray(body, bool), axis, 0)
  out = np.zeros(amap.shape[0], np.float64)
  for i, (a, b) in enumerate(zip(amap, body)):
    values = a[b]
    if values.size:
      k = max(1, int(round(top_fraction * values.size)))
      out[i] = np.mean(np.partition(values, values.size - k)[-k:])
  return out


def anomaly_aurocs(
  amaps: list[np.ndarray],
  truths: list[np.ndarray],
  bodies: list[np.ndarray] | None = None,
  axis: int = 2,
  top_fraction: float = 0.01,
) -> dict[str, float]:
  """Slice-level and pixel-level AUROC over a set of volumes (BMAD's two levels; the volume score is
  `volume_score`). A slice is positive when it holds a lesion voxel; pixels are scored inside the body.
  A level whose labels are all one class is reported as NaN."""
  bodies = bodies if bodies is not None else [np.ones(np.shape(a), bool) for a in amaps]
  s_lab, s_score, p_lab, p_score = [], [], [], []
  for amap, truth, body in zip(amaps, truths, bodies):
    truth, body = np.asarray(truth, bool), np.asarray(body, bool)
    s_lab.append(np.moveaxis(truth, axis, 0).reshape(truth.shape[axis], -1).any(axis=1))
    s_score.append(slice_scores(amap, body, axis, top_fraction))
    p_lab.append(truth[body])
    p_score.append(np.asarray(amap)[body])
  out = {}
  for name, lab, score in (("slice_auroc", s_lab, s_score), ("pixel_auroc", p_lab, p_score)):
    lab, score = np.concatenate(lab), np.concatenate(score)
    out[name] = auroc(lab, score) if 0 < lab.sum() < lab.size else float("nan")
  return out
