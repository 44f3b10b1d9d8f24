"""Evaluation metrics against independent references: scipy's float64 sqrtm and closed forms for the
Fréchet distance, scikit-image / scikit-learn for image quality and detection, hand-counted Dice."""

import numpy as np
import pytest
from scipy import linalg

from meddiff_jax.evaluation import baselines, frechet, scores


def _reference_fd(mu1, s1, mu2, s2):
  """Independent float64 reference: sqrtm of S1^(1/2) S2 S1^(1/2) (symmetric form), real part."""
  r1 = linalg.sqrtm(s1).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(r1 @ s2 @ r1).real))


def test_frechet_distance_closed_form_for_commuting_covariances():
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))  # shared eigenvectors -> S1, S2 commute
  l1, l2 = rng.uniform(0.5, 3, 6), rng.uniform(0.5, 3, 6)
  s1, s2 = q @ np.diag(l1) @ q.T, q @ np.diag(l2) @ q.T
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
  assert frechet.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-9)
  # diagonal covariances: sum of 1-D W2^2 terms
  assert frechet.frechet_distance(mu1, np.diag(l1), mu2, np.diag(l2)) == pytest.approx(closed, rel=1e-9)


def test_frechet_distance_matches_float64_reference_for_general_covariances():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
  s1, s2 = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)
  mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
  ref = _reference_fd(mu1, s1, mu2, s2)
  assert frechet.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-7)
  assert frechet.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
  # not symmetric-in-name only: swapping the Gaussians gives the same value
  assert frechet.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ref, rel=1e-7)


def test_frechet_from_samples_converges_to_the_closed_form():
  rng = np.random.default_rng(2)
  l1, l2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 1.0])
  x = rng.normal(size=(200000, 3)) * np.sqrt(l1)
  y = rng.normal(size=(200000, 3)) * np.sqrt(l2) + np.array([1.0, 0.0, -0.5])
  closed = 1.25 + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
  assert frechet.frechet_distance_from_features(x, y) == pytest.approx(closed, rel=2e-2)
  mu, cov = frechet.feature_statistics(x)
  np.testing.assert_allclose(cov, np.cov(x, rowvar=False))  # unbiased covariance


def test_frechet_singular_covariance_and_bad_shapes():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(3, 10))  # N < F: singular covariance still gives a finite, non-negative value
  assert np.isfinite(frechet.frechet_distance_from_features(x, x + 1.0))
  with pytest.raises(ValueError, match="N >= 2"):
    frechet.feature_statistics(np.zeros((1, 4)))
  with pytest.raises(ValueError, match="shapes"):
    frechet.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_image_quality_equals_skimage_on_the_stated_window():
  from skimage.metrics import peak_signal_noise_ratio, structural_similarity

  rng = np.random.default_rng(4)
  ref = rng.uniform(-1000, 400, (12, 11, 10))
  img = ref + rng.normal(0, 40, ref.shape)
  window = (-160.0, 240.0)
  q = scores.image_quality(ref, img, window)
  r, i = np.clip(ref, *window), np.clip(img, *window)
  assert q["psnr"] == pytest.approx(peak_signal_noise_ratio(r, i, data_range=400.0), rel=1e-10)
  assert q["ssim_3d"] == pytest.approx(structural_similarity(r, i, data_range=400.0), rel=1e-10)
  per_slice = [structural_similarity(r[..., k], i[..., k], data_range=400.0) for k in range(10)]
  assert q["ssim_2d"] == pytest.approx(np.mean(per_slice), rel=1e-10)
  # the window matters: unclipped values would give a different PSNR
  assert q["psnr"] != pytest.approx(peak_signal_noise_ratio(ref, img, data_range=400.0))


def test_detection_scores_equal_sklearn_and_slice_scores():
  from sklearn.metrics import average_precision_score, roc_auc_score

  rng = np.random.default_rng(5)
  y = rng.integers(0, 2, 300)
  s = np.round(y * 0.7 + rng.normal(size=300), 1)  # ties
  d = scores.detection_scores(y, s)
  assert d["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
  assert d["auprc"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
  assert np.isnan(scores.detection_scores([1, 1], [0.1, 0.2])["auroc"])

  amap = np.zeros((8, 8, 5))
  amap[2:4, 2:4, 3] = 5.0  # anomaly in slice 3
  mask = np.zeros_like(amap, np.uint8)
  mask[2:4, 2:4, 3] = 1
  ss = scores.slice_scores(amap, None, top_fraction=0.0625)  # top 4 voxels of 64
  np.testing.assert_allclose(ss, [0, 0, 0, 5.0, 0])
  np.testing.assert_array_equal(scores.slice_labels(mask), [0, 0, 0, 1, 0])
  body = np.zeros(amap.shape, bool)
  body[:, :, :3] = True  # outside the body the map does not count
  assert scores.slice_scores(amap, body)[3] == 0.0


def test_dice_conventions():
  ref = np.zeros((6, 6, 6), np.int16)
  ref[:3] = 1
  ref[3:, :2] = 2
  pred = np.zeros_like(ref)
  pred[:3, :3] = 1  # half of label 1, label 2 missing
  d = scores.dice_per_label(pred, ref)
  assert d == {1: pytest.approx(2 * 54 / (108 + 54)), 2: 0.0}
  assert scores.mean_dice(pred, ref) == pytest.approx((2 * 54 / 162 + 0.0) / 2)
  assert scores.dice_per_label(pred, ref, labels=[1, 7]) == {1: pytest.approx(2 * 54 / 162)}  # 7 absent: skipped
  assert np.isnan(scores.mean_dice(pred, np.zeros_like(ref)))
  from meddiff_jax.evaluation import metrics

  assert metrics.dice(np.zeros(3), np.zeros(3)) == 1.0  # both empty: 1


def test_denoising_baselines_reduce_noise_and_match_skimage():
  from skimage.restoration import denoise_nl_means

  rng = np.random.default_rng(6)
  clean = np.zeros((20, 20, 20), np.float32)
  clean[5:15, 5:15, 5:15] = 100.0
  noisy = clean + rng.normal(0, 20, clean.shape).astype(np.float32)
  window = (-100.0, 200.0)
  for fn in (baselines.gaussian, baselines.non_local_means):
    out = fn(noisy, window)
    assert np.mean((out - clean) ** 2) < 0.5 * np.mean((noisy - clean) ** 2)
  x = (np.clip(noisy, *window) + 100.0) / 300.0
  sig = baselines.noise_sigma(x)
  assert sig * 300 == pytest.approx(20.0, rel=0.15)  # the estimate recovers the added noise (HU)
  ref = denoise_nl_means(x, h=0.8 * sig, sigma=sig, patch_size=3, patch_distance=3, fast_mode=True) * 300 - 100
  np.testing.assert_allclose(baselines.non_local_means(noisy, window), ref, atol=1e-3)


# ------------------------------------------------------------------- MedicalNet ResNet vs a numpy reference


def _np_conv(x, w, stride=1, pad=0, dil=1):
  """Torch Conv3d semantics in numpy: x (C, D, H, W), w (O, C, k, k, k), zero padding, no bias."""
  k = w.shape[-1]
  xp = np.pad(x, [(0, 0)] + [(pad, pad)] * 3)
  out_sz = [(s + 2 * pad - dil * (k - 1) - 1) // stride + 1 for s in x.shape[1:]]
  out = np.zeros((w.shape[0], *out_sz))
  for a in range(k):
    for b in range(k):
      for c in range(k):
        patch = xp[
          :,
          a * dil : a * dil + stride * out_sz[0] : stride,
          b * dil : b * dil + stride * out_sz[1] : stride,
          c * dil : c * dil + stride * out_sz[2] : stride,
        ]
        out += np.einsum("oc,cdhw->odhw", w[:, :, a, b, c], patch)
  return out


def _np_medicalnet10(sd, x):
  sd = {k[7:]: v.astype(np.float64) for k, v in sd.items()}
  bn = lambda h, n: (
    (h - sd[f"{n}.running_mean"][:, None, None, None])
    / np.sqrt(sd[f"{n}.running_var"] + 1e-5)[:, None, None, None]
    * sd[f"{n}.weight"][:, None, None, None]
    + sd[f"{n}.bias"][:, None, None, None]
  )
  relu = lambda h: np.maximum(h, 0)
  h = relu(bn(_np_conv(x, sd["conv1.weight"], 2, 3), "bn1"))
  hp = np.pad(h, [(0, 0)] + [(1, 1)] * 3, constant_values=-np.inf)  # MaxPool3d(3, 2, padding=1)
  sz = [(s + 2 - 3) // 2 + 1 for s in h.shape[1:]]
  h = np.max(
    [
      hp[:, a : a + 2 * sz[0] : 2, b : b + 2 * sz[1] : 2, c : c + 2 * sz[2] : 2]
      for a in range(3)
      for b in range(3)
      for c in range(3)
    ],
    axis=0,
  )
  for s, (stride, dil) in enumerate(((1, 1), (2, 1), (1, 2), (1, 4))):
    p = f"layer{s + 1}.0"
    out = relu(bn(_np_conv(h, sd[f"{p}.conv1.weight"], stride, dil, dil), f"{p}.bn1"))
    out = bn(_np_conv(out, sd[f"{p}.conv2.weight"], 1, dil, dil), f"{p}.bn2")
    res = (
      bn(_np_conv(h, sd[f"{p}.downsample.0.weight"], stride), f"{p}.downsample.1")
      if (f"{p}.downsample.0.weight" in sd)
      else h
    )
    h = relu(out + res)
  return h.mean(axis=(1, 2, 3))


@pytest.mark.slow  # compiles a 3D ResNet-10 (tens of seconds on the 2-core box)
def test_medicalnet_resnet10_matches_a_numpy_reference_of_the_torch_model(tmp_path):
  from meddiff_jax.evaluation import extractors, medicalnet

  sd = medicalnet.random_state_dict(10, seed=0)
  x = np.random.default_rng(1).normal(size=(1, 1, 12, 10, 14))  # torch layout (N, C, D, H, W), D = our X
  ref = _np_medicalnet10(sd, x[0])
  got = np.asarray(medicalnet.forward(sd, np.transpose(x, (0, 2, 3, 4, 1)).astype(np.float32), 10))[0]
  assert got.shape == (512,)
  np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-4 * np.abs(ref).max())
  # through the extractor directory: same features as calling forward on the preprocessed volume
  d = medicalnet.save_extractor(str(tmp_path / "mn"), sd, 10, input_size=(12, 10, 14))
  ext = extractors.Extractor(d)
  hu = np.random.default_rng(2).uniform(-1000, 1000, (12, 10, 14))
  f = ext("a", hu)
  z = np.clip(hu, -1000, 1000) / 1000.0
  z = (z - z.mean()) / z.std()
  np.testing.assert_allclose(
    f, np.asarray(medicalnet.forward(sd, z[None, ..., None].astype(np.float32), 10))[0], rtol=1e-4, atol=1e-5
  )
