"""Pluggable 3D feature extractors for the Fréchet distance; nothing is downloaded at run time.

`config.extractor` forms:
  DIR                 an exported network, DIR/extractor.json + weights:
                      - {"arch": "medicalnet_resnet", "depth": 10|18|34|50|101, ...} + weights.npz: a
                        MedicalNet 3D ResNet (evaluation/medicalnet.py; convert the released .pth with
                        `python -m meddiff_jax.evaluation.medicalnet PTH DIR DEPTH`);
                      - {"widths": [...], ...} + params.msgpack: the small flax `FeatureNet3D` below.
                      Both also give "hu_window": [lo, hi], "input_size": [X, Y, Z] and optionally
                      "normalize": "window" (HU window -> [-1, 1], default) or "zscore" (then zero mean,
                      unit std over the volume, MedicalNet's input convention).
  features:DIR        the user's own features: DIR/<case_id>.npy (one 1-D vector per volume), computed by
                      any tool (e.g. MedicalNet ResNet-50 in PyTorch, or MAISI's 2.5D RadImageNet protocol).
                      Generated volumes are looked up as DIR/<case_id>_generated.npy.
An empty or missing extractor is a one-line error naming what to provide. `save_extractor` writes the
DIR form (tests build a small randomly initialised one to check the plumbing).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

MISSING = (
  "no feature extractor configured: set --config.extractor=DIR (an exported 3D network: extractor.json + "
  "params.msgpack, e.g. MedicalNet converted with meddiff_jax.evaluation.extractors.save_extractor) or "
  "--config.extractor=features:DIR (your own DIR/<case_id>.npy features)"
)


def feature_net(widths: Sequence[int]):
  """A plain 3D conv net (stride-2 convs, GroupNorm, SiLU) whose global-average-pooled last stage is the
  feature vector. Built lazily so importing this module does not import flax."""
  import flax.linen as nn
  import jax.numpy as jnp

  class FeatureNet3D(nn.Module):
    widths: tuple[int, ...]

    @nn.compact
    def __call__(self, x):  # (N, X, Y, Z, 1) -> (N, widths[-1])
      for w in self.widths:
        x = nn.Conv(w, (3, 3, 3), strides=(2, 2, 2))(x)
        x = nn.GroupNorm(num_groups=min(4, w))(x)
        x = nn.silu(x)
      return jnp.mean(x, axis=(1, 2, 3))

  return FeatureNet3D(tuple(int(w) for w in widths))


def save_extractor(
  directory: str,
  widths: Sequence[int],
  params: Any,
  hu_window: tuple[float, float] = (-1000.0, 1000.0),
  input_size: Sequence[int] = (32, 32, 32),
) -> str:
  import flax.serialization
  import jax

  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "extractor.json"), "w") as f:
    json.dump({"widths": list(widths), "hu_window": list(hu_window), "input_size": list(input_size)}, f)
  with open(os.path.join(directory, "params.msgpack"), "wb") as f:
    f.write(flax.serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, params)))
  return directory


def init_random_extractor(
  directory: str, widths: Sequence[int] = (4, 8), seed: int = 0, input_size: Sequence[int] = (16, 16, 16)
) -> str:
  """A randomly initialised FeatureNet3D saved as an extractor directory (plumbing tests only)."""
  import jax
  import jax.numpy as jnp

  net = feature_net(widths)
  params = net.init(jax.random.key(seed), jnp.zeros((1, *input_size, 1)))["params"]
  return save_extractor(directory, widths, params, input_size=input_size)


class Extractor:
  """case_id, HU volume (X, Y, Z), generated? -> feature vector (F,)."""

  def __init__(self, spec: str):
    self.spec = spec
    if not spec:
      raise FileNotFoundError(MISSING)
    if spec.startswith("features:"):
      self.features_dir = spec[len("features:") :]
      if not os.path.isdir(self.features_dir):
        raise FileNotFoundError(
          f"--config.extractor={spec!r}: {self.features_dir} is not a directory of <case_id>.npy feature files"
        )
      self._fn: Callable | None = None
      return
    self.features_dir = ""
    meta_path = os.path.join(spec, "extractor.json")
    if not os.path.isfile(meta_path):
      raise FileNotFoundError(f"--config.extractor={spec!r}: extractor.json not found; {MISSING}")
    try:
      with open(meta_path) as f:
        meta = json.load(f)
      self.hu_window, self.input_size = tuple(meta["hu_window"]), tuple(meta["input_size"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{meta_path}: malformed ({type(e).__name__}: {e})") from None
    self.normalize = meta.get("normalize", "window")
    weights = "weights.npz" if meta.get("arch") == "medicalnet_resnet" else "params.msgpack"
    if not os.path.isfile(os.path.join(spec, weights)):
      raise FileNotFoundError(f"--config.extractor={spec!r}: {weights} not found; {MISSING}")
    self._fn = self._load_medicalnet(spec, meta) if weights == "weights.npz" else self._load_network(spec, meta)

  def _load_medicalnet(self, directory: str, meta: dict) -> Callable:
    import jax

    from meddiff_jax.evaluation import medicalnet

    depth = int(meta.get("depth", 10))
    if depth not in medicalnet.DEPTHS:
      raise ValueError(f"{directory}/extractor.json: depth {depth} not in {sorted(medicalnet.DEPTHS)}")
    with np.load(os.path.join(directory, "weights.npz")) as z:
      state = {k: z[k] for k in z.files}
    return jax.jit(lambda x: medicalnet.forward(state, x, depth))

  def _load_network(self, directory: str, meta: dict) -> Callable:
    import flax.serialization
    import jax
    import jax.numpy as jnp

    if "widths" not in meta:
      raise ValueError(f"{directory}/extractor.json: missing key 'widths'")
    widths = meta["widths"]
    net = feature_net(widths)
    template = net.init(jax.random.key(0), jnp.zeros((1, *self.input_size, 1)))["params"]
    with open(os.path.join(directory, "params.msgpack"), "rb") as f:
      try:
        params = flax.serialization.from_bytes(template, f.read())
      except Exception as e:  # noqa: BLE001 - any decoding failure is the same user error
        raise ValueError(f"{directory}/params.msgpack does not match extractor.json widths {widths}: {e}") from None
    return jax.jit(lambda x: net.apply({"params": params}, x))

  def preprocess(self, hu: np.ndarray) -> np.ndarray:
    """HU -> [-1, 1] in the extractor's window, resized (linear) to its input size."""
    from scipy import ndimage

    lo, hi = self.hu_window
    x = (np.clip(np.asarray(hu, np.float32), lo, hi) - lo) / (hi - lo) * 2.0 - 1.0
    if self.normalize == "zscore":
      x = (x - x.mean()) / (x.std() + 1e-6)
    zoom = [t / s for t, s in zip(self.input_size, x.shape)]
    return ndimage.zoom(x, zoom, order=1)[None, ..., None].astype(np.float32)

  def __call__(self, case_id: str, hu: np.ndarray | None, generated: bool = False) -> np.ndarray:
    if self.features_dir:
      path = os.path.join(self.features_dir, f"{case_id}{'_generated' if generated else ''}.npy")
      if not os.path.isfile(path):
        raise FileNotFoundError(
          f"{path}: feature file missing (features:DIR expects one <case_id>.npy per real "
          "volume and <case_id>_generated.npy per generated one)"
        )
      f = np.load(path).astype(np.float64).ravel()
      if not np.isfinite(f).all():
        raise ValueError(f"{path}: features contain NaN/inf")
      return f
    return np.asarray(self._fn(self.preprocess(hu)), np.float64)[0]
