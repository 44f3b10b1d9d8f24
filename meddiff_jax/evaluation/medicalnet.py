"""MedicalNet (Chen et al. 2019, Tencent/MedicalNet) 3D ResNet encoders as a feature extractor, in JAX.

The forward pass follows MedicalNet's `models/resnet.py` exactly for inference: conv 7^3 stride 2 pad 3,
BatchNorm (eps 1e-5, running statistics), ReLU, max-pool 3^3 stride 2 pad 1, four stages of BasicBlocks
(resnet10/18/34) or Bottlenecks (resnet50+) with strides 1, 2, 1, 1 and dilations 1, 1, 2, 4, shortcut
'B' (1^3 conv + BN) or 'A' (strided subsampling + zero channels), then (our feature head) a global average
pool of the last stage instead of the segmentation head. Weights come from MedicalNet's PyTorch state
dict (`module.`-prefixed names), stored as an .npz of those names: `convert_checkpoint` reads the .pth
once (needs torch) and writes the extractor directory; the run itself needs only numpy and JAX.
MedicalNet feeds nibabel's voxel order as (D, H, W), which is our (X, Y, Z): kernels are moved to
channels-last by transposing (O, I, D, H, W) -> (D, H, W, I, O).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

DEPTHS = {
  10: ("basic", (1, 1, 1, 1)),
  18: ("basic", (2, 2, 2, 2)),
  34: ("basic", (3, 4, 6, 3)),
  50: ("bottleneck", (3, 4, 6, 3)),
  101: ("bottleneck", (3, 4, 23, 3)),
}
STAGES = ((64, 1, 1), (128, 2, 1), (256, 1, 2), (512, 1, 4))  # (planes, stride, dilation)


def _strip(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {
    k[len("module.") :] if k.startswith("module.") else k: np.asarray(v)
    for k, v in state.items()
    if not k.endswith("num_batches_tracked")
  }


def forward(state: Mapping[str, np.ndarray], x, depth: int = 10):
  """x: (N, X, Y, Z, 1) float -> (N, C) globally pooled features of the last stage (jnp)."""
  import jax
  import jax.numpy as jnp

  kind, layers = DEPTHS[depth]
  w = _strip(state)

  def conv(h, name, stride=1, pad=0, dil=1):
    k = jnp.asarray(w[f"{name}.weight"]).transpose(2, 3, 4, 1, 0)
    return jax.lax.conv_general_dilated(
      h, k, (stride,) * 3, [(pad, pad)] * 3, rhs_dilation=(dil,) * 3, dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
    )

  def bn(h, name):
    scale = w[f"{name}.weight"] / np.sqrt(w[f"{name}.running_var"] + 1e-5)
    return h * jnp.asarray(scale) + jnp.asarray(w[f"{name}.bias"] - w[f"{name}.running_mean"] * scale)

  relu = jax.nn.relu
  h = relu(bn(conv(x, "conv1", 2, 3), "bn1"))
  h = jax.lax.reduce_window(
    h, -jnp.inf, jax.lax.max, (1, 3, 3, 3, 1), (1, 2, 2, 2, 1), [(0, 0), (1, 1), (1, 1), (1, 1), (0, 0)]
  )
  for s, ((_planes, stride, dil), n) in enumerate(zip(STAGES, layers)):
    for b in range(n):
      p = f"layer{s + 1}.{b}"
      st = stride if b == 0 else 1
      if kind == "basic":
        out = relu(bn(conv(h, f"{p}.conv1", st, dil, dil), f"{p}.bn1"))
        out = bn(conv(out, f"{p}.conv2", 1, dil, dil), f"{p}.bn2")
      else:
        out = relu(bn(conv(h, f"{p}.conv1"), f"{p}.bn1"))
        out = relu(bn(conv(out, f"{p}.conv2", st, dil, dil), f"{p}.bn2"))
        out = bn(conv(out, f"{p}.conv3"), f"{p}.bn3")
      if f"{p}.downsample.0.weight" in w:  # shortcut B
        res = bn(conv(h, f"{p}.downsample.0", st), f"{p}.downsample.1")
      elif out.shape[-1] != h.shape[-1] or st != 1:  # shortcut A: subsample, zero-pad channels
        res = h[:, ::st, ::st, ::st, :]
        res = jnp.pad(res, [(0, 0)] * 4 + [(0, out.shape[-1] - res.shape[-1])])
      else:
        res = h
      h = relu(out + res)
  return jnp.mean(h, axis=(1, 2, 3))


def random_state_dict(depth: int = 10, seed: int = 0, shortcut: str = "B") -> dict[str, np.ndarray]:
  """A MedicalNet-shaped state dict with random weights and statistics (tests; torch naming)."""
  rng = np.random.default_rng(seed)
  kind, layers = DEPTHS[depth]
  expansion = 1 if kind == "basic" else 4
  sd: dict[str, np.ndarray] = {}

  def conv(name, o, i, k):
    sd[f"module.{name}.weight"] = (rng.normal(size=(o, i, k, k, k)) * np.sqrt(2.0 / (i * k**3))).astype(np.float32)

  def bn(name, c):
    sd[f"module.{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    sd[f"module.{name}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
    sd[f"module.{name}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
    sd[f"module.{name}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)

  conv("conv1", 64, 1, 7)
  bn("bn1", 64)
  inplanes = 64
  for s, ((planes, stride, _), n) in enumerate(zip(STAGES, layers)):
    for b in range(n):
      p = f"layer{s + 1}.{b}"
      if kind == "basic":
        conv(f"{p}.conv1", planes, inplanes, 3), bn(f"{p}.bn1", planes)
        conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
      else:
        conv(f"{p}.conv1", planes, inplanes, 1), bn(f"{p}.bn1", planes)
        conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
        conv(f"{p}.conv3", planes * 4, planes, 1), bn(f"{p}.bn3", planes * 4)
      if b == 0 and shortcut == "B" and (stride != 1 or inplanes != planes * expansion):
        conv(f"{p}.downsample.0", planes * expansion, inplanes, 1), bn(f"{p}.downsample.1", planes * expansion)
      inplanes = planes * expansion
  return sd


def save_extractor(
  directory: str,
  state: Mapping[str, np.ndarray],
  depth: int,
  hu_window: tuple[float, float] = (-1000.0, 1000.0),
  input_size: Sequence[int] = (64, 64, 64),
  normalize: str = "zscore",
) -> str:
  """An extractor directory for `--config.extractor=DIR` (extractor.json + weights.npz)."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "extractor.json"), "w") as f:
    json.dump(
      {
        "arch": "medicalnet_resnet",
        "depth": int(depth),
        "hu_window": list(hu_window),
        "input_size": list(input_size),
        "normalize": normalize,
      },
      f,
    )
  np.savez(os.path.join(directory, "weights.npz"), **{k: np.asarray(v) for k, v in state.items()})
  return directory


def convert_checkpoint(pth: str, directory: str, depth: int, **kwargs) -> str:
  """MedicalNet's released .pth (e.g. resnet_10_23dataset.pth) -> an extractor directory. Needs torch once."""
  try:
    import torch
  except ImportError:
    raise ImportError(
      "converting a MedicalNet .pth needs torch (pip install torch); the converted directory then runs without it"
    ) from None
  ckpt = torch.load(pth, map_location="cpu", weights_only=True)
  state = ckpt.get("state_dict", ckpt)
  return save_extractor(directory, {k: v.numpy() for k, v in state.items()}, depth, **kwargs)


if __name__ == "__main__":  # python -m meddiff_jax.evaluation.medicalnet PTH OUT_DIR DEPTH
  import sys

  if len(sys.argv) != 4:
    raise SystemExit("usage: python -m meddiff_jax.evaluation.medicalnet resnet_10_23dataset.pth OUT_DIR 10")
  print(convert_checkpoint(sys.argv[1], sys.argv[2], int(sys.argv[3])))
