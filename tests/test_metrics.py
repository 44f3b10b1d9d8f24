"""Metrics against scikit-image / scikit-learn on random inputs, plus closed-form properties."""

import numpy as np
import pytest

from meddiff_jax.evaluation import metrics

skimage_metrics = pytest.importorskip("skimage.metrics")
sk_metrics = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("seed", [0, 1])
def test_psnr_and_ssim_match_scikit_image(seed):
  rng = np.random.default_rng(seed)
  ref = rng.uniform(-1, 1, (20, 18, 16))
  img = ref + rng.normal(0, 0.2, ref.shape)
  assert metrics.psnr(ref, img, 2.0) == pytest.approx(skimage_metrics.peak_signal_noise_ratio(ref, img, data_range=2.0))
  assert metrics.ssim(ref, img, 2.0) == pytest.approx(
    skimage_metrics.structural_similarity(ref, img, data_range=2.0), rel=1e-6
  )
  smooth = np.cumsum(rng.normal(size=ref.shape), axis=0)
  noisy = smooth + rng.normal(0, 1.0, ref.shape)
  rng_ = smooth.max() - smooth.min()
  assert metrics.ssim(smooth, noisy, rng_) == pytest.approx(
    skimage_metrics.structural_similarity(smooth, noisy, data_range=rng_), rel=1e-6
  )


def test_ms_ssim_properties():
  rng = np.random.default_rng(0)
  ref = np.cumsum(np.cumsum(rng.normal(size=(64, 64, 64)), 0), 1)
  ref = (ref - ref.min()) / (ref.max() - ref.min())
  assert metrics.ms_ssim(ref, ref, 1.0) == pytest.approx(1.0)
  values = [metrics.ms_ssim(ref, ref + rng.normal(0, s, ref.shape), 1.0) for s in (0.01, 0.05, 0.2)]
  assert values[0] > values[1] > values[2]
  # a single scale is plain SSIM
  noisy = ref + rng.normal(0, 0.05, ref.shape)
  assert metrics.ms_ssim(ref, noisy, 1.0, weights=(1.0,)) == pytest.approx(metrics.ssim(ref, noisy, 1.0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_auprc_match_scikit_learn(seed):
  rng = np.random.default_rng(seed)
  labels = rng.uniform(size=300) < 0.3
  scores = labels * 0.5 + rng.normal(size=300)
  scores[::7] = np.round(scores[::7], 1)  # ties
  assert metrics.auroc(labels, scores) == pytest.approx(sk_metrics.roc_auc_score(labels, scores))
  assert metrics.auprc(labels, scores) == pytest.approx(sk_metrics.average_precision_score(labels, scores))
  quantised = np.round(scores)  # heavy ties
  assert metrics.auroc(labels, quantised) == pytest.approx(sk_metrics.roc_auc_score(labels, quantised))
  assert metrics.auprc(labels, quantised) == pytest.approx(sk_metrics.average_precision_score(labels, quantised))


def test_dice():
  a = np.zeros((4, 4, 4), bool)
  b = np.zeros((4, 4, 4), bool)
  a[:2], b[1:3] = True, True
  assert metrics.dice(a, b) == pytest.approx(0.5)
  assert metrics.dice(np.zeros(3), np.zeros(3)) == 1.0


def test_slice_and_pixel_auroc_match_scikit_learn():
  sk_metrics = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(3)
  amaps, truths, bodies = [], [], []
  for i in range(3):
    truth = np.zeros((12, 10, 8), bool)
    if i:
      truth[3:6, 4:7, 2 + i : 4 + i] = True
    amaps.append(rng.random(truth.shape) + 0.8 * truth)
    truths.append(truth)
    bodies.append(np.ones(truth.shape, bool))
  bodies[0][:, :, 0] = False  # an empty slice scores 0
  out = metrics.anomaly_aurocs(amaps, truths, bodies, axis=2, top_fraction=0.05)
  slice_lab = np.concatenate([t.any(axis=(0, 1)) for t in truths])
  slice_sc = []
  for a, b in zip(amaps, bodies):
    for z in range(a.shape[2]):
      v = np.sort(a[..., z][b[..., z]])[::-1]
      slice_sc.append(v[: max(1, int(round(0.05 * v.size)))].mean() if v.size else 0.0)
  assert out["slice_auroc"] == pytest.approx(sk_metrics.roc_auc_score(slice_lab, slice_sc))
  pix_lab = np.concatenate([t[b] for t, b in zip(truths, bodies)])
  pix_sc = np.concatenate([a[b] for a, b in zip(amaps, bodies)])
  assert out["pixel_auroc"] == pytest.approx(sk_metrics.roc_auc_score(pix_lab, pix_sc))
  assert out["slice_auroc"] > 0.8 and out["pixel_auroc"] > 0.8
