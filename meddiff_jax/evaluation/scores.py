"""Protocol-level scores built on evaluation/metrics.py: anomaly maps scored per volume / slice / voxel,
Dice over several labels, PSNR/SSIM in a stated HU window.

Conventions (stated once, used by every protocol):
- PSNR/SSIM are computed on HU clipped to a window [lo, hi] with data_range = hi - lo (so a value is
  comparable only with the same window); SSIM is scikit-image's (7-voxel uniform window, sample covariance)
  either in 3D or as the mean of 2D SSIMs over the axial slices.
- Dice of two empty masks is 1 (nothing to find, nothing found); for a set of labels, labels absent from
  the reference are skipped, a label present in the reference but missing from the prediction counts 0.
- Slice-level anomaly scores are the mean of the top `top_fraction` voxels of the map inside the body on
  each axial slice (the volume score's rule per slice); a slice is abnormal when its mask has any voxel.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from meddiff_jax.evaluation import metrics


def windowed(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
  return np.clip(np.asarray(hu, np.float64), window[0], window[1])


def image_quality(
  reference_hu: np.ndarray, image_hu: np.ndarray, window: tuple[float, float], slice_axis: int = 2
) -> dict[str, float]:
  """PSNR, 3D SSIM and slice-mean 2D SSIM on HU clipped to `window`, data range = its width."""
  lo, hi = float(window[0]), float(window[1])
  if not hi > lo:
    raise ValueError(f"window {window}: hi must exceed lo")
  ref, img = windowed(reference_hu, (lo, hi)), windowed(image_hu, (lo, hi))
  if ref.shape != img.shape:
    raise ValueError(f"shapes differ: {ref.shape} vs {img.shape}")
  rng = hi - lo
  out = {"psnr": metrics.psnr(ref, img, rng)}
  out["ssim_3d"] = metrics.ssim(ref, img, rng) if min(ref.shape) >= 7 else float("nan")
  in_plane = [s for i, s in enumerate(ref.shape) if i != slice_axis]
  if min(in_plane) >= 7:
    out["ssim_2d"] = float(
      np.mean(
        [
          metrics.ssim(np.take(ref, k, slice_axis), np.take(img, k, slice_axis), rng)
          for k in range(ref.shape[slice_axis])
        ]
      )
    )
  else:
    out["ssim_2d"] = float("nan")
  return out


def top_fraction_mean(values: np.ndarray, top_fraction: float) -> float:
  values = np.asarray(values, np.float64).ravel()
  if values.size == 0:
    return 0.0
  k = max(1, int(round(top_fraction * values.size)))
  return float(np.mean(np.partition(values, values.size - k)[-k:]))


def slice_scores(
  amap: np.ndarray, body: np.ndarray | None, top_fraction: float = 0.01, slice_axis: int = 2
) -> np.ndarray:
  """One anomaly score per slice along `slice_axis` (top-fraction mean inside the body)."""
  amap = np.asarray(amap)
  body = np.ones(amap.shape, bool) if body is None else np.asarray(body, bool)
  return np.array(
    [
      top_fraction_mean(np.take(amap, k, slice_axis)[np.take(body, k, slice_axis)], top_fraction)
      for k in range(amap.shape[slice_axis])
    ]
  )


def slice_labels(mask: np.ndarray, slice_axis: int = 2) -> np.ndarray:
  """1 for each slice holding any mask voxel."""
  axes = tuple(i for i in range(np.ndim(mask)) if i != slice_axis)
  return np.any(np.asarray(mask) > 0, axis=axes).astype(np.int8)


def detection_scores(labels: Sequence[int], scores: Sequence[float]) -> dict[str, float]:
  """AUROC / AUPRC (scikit-learn's definitions); NaN when only one class is present."""
  labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
  if labels.size == 0 or labels.min() == labels.max():
    return {"auroc": float("nan"), "auprc": float("nan"), "n": int(labels.size), "n_positive": int(labels.sum())}
  return {
    "auroc": metrics.auroc(labels, scores),
    "auprc": metrics.auprc(labels, scores),
    "n": int(labels.size),
    "n_positive": int(labels.sum()),
  }


def dice_per_label(
  prediction: np.ndarray, reference: np.ndarray, labels: Iterable[int] | None = None
) -> dict[int, float]:
  """Dice for each label present in the reference (or each of `labels` present in it)."""
  prediction, reference = np.asarray(prediction), np.asarray(reference)
  if prediction.shape != reference.shape:
    raise ValueError(f"shapes differ: {prediction.shape} vs {reference.shape}")
  present = set(int(v) for v in np.unique(reference)) - {0}
  wanted = present if labels is None else present & set(int(v) for v in labels)
  return {lab: metrics.dice(prediction == lab, reference == lab) for lab in sorted(wanted)}


def mean_dice(prediction: np.ndarray, reference: np.ndarray, labels: Iterable[int] | None = None) -> float:
  """Mean of `dice_per_label`; NaN when the reference holds none of the labels."""
  d = dice_per_label(prediction, reference, labels)
  return float(np.mean(list(d.values()))) if d else float("nan")
