"""Procedural synthetic CT phantom in HU with TotalSegmentator-id label maps.

The embedded default dataset: a body outline (skin, fat, muscle), organs, bone and vessels placed with
random jitter per seed, optional lesions with their own mask, and CT-like noise. Arrays are in RAS voxel
order (axis 0: right, 1: anterior, 2: superior), like volumes after `data.volume_io.load` canonicalisation, with a
diagonal affine of the given spacing.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from meddiff_jax.data import preprocess

# TotalSegmentator ids (class_map_total.json) used by the phantom.
LABELS = {
  "spleen": 1,
  "kidney_right": 2,
  "kidney_left": 3,
  "liver": 5,
  "stomach": 6,
  "lung_upper_lobe_left": 10,
  "lung_lower_lobe_left": 11,
  "lung_upper_lobe_right": 12,
  "lung_lower_lobe_right": 14,
  "esophagus": 15,
  "trachea": 16,
  "thyroid_gland": 17,
  "vertebrae_L1": 31,
  "heart": 51,
  "aorta": 52,
  "inferior_vena_cava": 63,
  "spinal_cord": 79,
  "autochthon_left": 86,
  "autochthon_right": 87,
  "brain": 90,
  "skull": 91,
  "rib_left_5": 96,
  "rib_right_5": 108,
  "sternum": 116,
}

HU = {
  "air": -1000.0,
  "lung": -850.0,
  "fat": -100.0,
  "muscle": 45.0,
  "liver": 60.0,
  "spleen": 50.0,
  "kidney": 35.0,
  "blood": 40.0,
  "heart": 40.0,
  "bone_cortical": 900.0,
  "bone_cancellous": 250.0,
  "brain": 35.0,
  "csf": 8.0,
  "stomach": 20.0,
  "thyroid": 90.0,
}


@dataclasses.dataclass
class Phantom:
  hu: np.ndarray  # float32 (X, Y, Z)
  labels: np.ndarray  # int16 TotalSegmentator ids
  lesions: np.ndarray  # uint8 lesion mask
  spacing: tuple[float, float, float]
  region: str

  @property
  def affine(self) -> np.ndarray:
    aff = np.diag([*self.spacing, 1.0])
    aff[:3, 3] = -0.5 * np.array(self.hu.shape) * np.array(self.spacing)  # centred at the origin
    return aff


def _ellipsoid(grid, center, radii):
  x, y, z = grid
  return ((x - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2 + (
    (z - center[2]) / radii[2]
  ) ** 2 <= 1.0


def _cylinder_z(grid, center, radii, z_range=(-np.inf, np.inf)):
  x, y, z = grid
  inside = ((x - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2 <= 1.0
  return inside & (z >= z_range[0]) & (z <= z_range[1])


def make_phantom(
  shape: tuple[int, int, int] = (96, 96, 96),
  spacing: tuple[float, float, float] = (3.0, 3.0, 3.0),
  region: str = "abdomen",
  seed: int = 0,
  num_lesions: int = 0,
  noise_hu: float = 15.0,
) -> Phantom:
  """One phantom volume.

  Args:
    shape: voxels (X, Y, Z).
    spacing: mm per voxel.
    region: head_neck, chest or abdomen (which anatomy appears).
    seed: everything random (jitter, lesions, noise) derives from it.
    num_lesions: hypodense/hyperdense spherical lesions placed inside the liver (abdomen), lungs (chest)
      or brain (head_neck).
    noise_hu: std of the additive, slightly correlated noise.
  """
  if region not in preprocess.REGIONS:
    raise ValueError(f"phantom region {region!r} not in {preprocess.REGIONS}")
  rng = np.random.default_rng(seed)
  extent = np.array(shape) * np.array(spacing)
  axes = [(np.arange(n) + 0.5) * s - e / 2 for n, s, e in zip(shape, spacing, extent)]
  grid = np.meshgrid(*axes, indexing="ij")
  jit = lambda scale=1.0: rng.uniform(-1, 1, 3) * scale
  hu = np.full(shape, HU["air"], np.float32)
  labels = np.zeros(shape, np.int16)

  def put(mask, value, label=None):
    hu[mask] = value
    if label is not None:
      labels[mask] = label

  half_w = extent[0] * rng.uniform(0.36, 0.44)
  half_ap = extent[1] * rng.uniform(0.26, 0.32)
  if region == "head_neck":
    half_w, half_ap = half_w * 0.6, half_ap * 0.75
  body = _cylinder_z(grid, (0, 0, 0), (half_w, half_ap))
  put(body, HU["fat"])  # subcutaneous fat
  put(_cylinder_z(grid, (0, 0, 0), (half_w * 0.88, half_ap * 0.85)), HU["muscle"])  # body wall
  if region == "abdomen":  # visceral fat inside the muscular wall; organs and bowel go into it
    put(_cylinder_z(grid, (0, 0, 0), (half_w * 0.8, half_ap * 0.76)), HU["fat"] + 10)
  spine_c = np.array([0.0, -half_ap * 0.55, 0.0])
  cord = _cylinder_z(grid, spine_c + [0, -8, 0], (5, 5))
  vert = _cylinder_z(grid, spine_c, (14, 12))
  disc = np.mod(grid[2], 30.0) < 5.0
  put(_cylinder_z(grid, spine_c + [22, -14, 0], (10, 14)), HU["muscle"] + 10, LABELS["autochthon_left"])
  put(_cylinder_z(grid, spine_c + [-22, -14, 0], (10, 14)), HU["muscle"] + 10, LABELS["autochthon_right"])
  put(vert & ~disc, HU["bone_cortical"], LABELS["vertebrae_L1"])
  put(_cylinder_z(grid, spine_c, (11, 9)) & ~disc, HU["bone_cancellous"], LABELS["vertebrae_L1"])
  put(vert & disc, 80.0)
  put(cord, HU["csf"] + 20, LABELS["spinal_cord"])

  lesion_hosts: list[np.ndarray] = []
  if region == "abdomen":
    liver = _ellipsoid(grid, np.array([half_w * 0.35, half_ap * 0.1, 10]) + jit(8), (half_w * 0.45, half_ap * 0.6, 90))
    put(liver, HU["liver"], LABELS["liver"])
    spleen = _ellipsoid(grid, np.array([-half_w * 0.55, -half_ap * 0.2, 30]) + jit(5), (25, 35, 45))
    put(spleen & ~liver, HU["spleen"], LABELS["spleen"])
    for side, label in ((1, "kidney_right"), (-1, "kidney_left")):
      k = _ellipsoid(grid, np.array([side * half_w * 0.4, -half_ap * 0.4, -20]) + jit(5), (22, 22, 50))
      put(k, HU["kidney"], LABELS[label])
      put(_ellipsoid(grid, np.array([side * half_w * 0.4, -half_ap * 0.4, -20]), (8, 8, 25)), HU["fat"] + 60)
    stomach = _ellipsoid(grid, np.array([-half_w * 0.2, half_ap * 0.35, 45]) + jit(5), (35, 25, 30))
    put(stomach & ~liver, HU["stomach"], LABELS["stomach"])
    put(stomach & (grid[1] > half_ap * 0.35 + 12), HU["air"] + 50, LABELS["stomach"])  # gastric air cap
    organs = labels > 0
    for _ in range(14):  # bowel loops: soft-tissue tubes cut across, some with gas
      c = np.array(
        [rng.uniform(-0.6, 0.6) * half_w, rng.uniform(-0.1, 0.6) * half_ap, rng.uniform(-1, 1) * extent[2] / 2]
      )
      r = rng.uniform(8, 14)
      loop = _ellipsoid(grid, c, (r, r, r * rng.uniform(1.5, 3))) & ~organs & (labels == 0)
      put(loop, HU["stomach"] + 10)
      if rng.uniform() < 0.4:
        put(_ellipsoid(grid, c, (r * 0.4,) * 3) & loop, HU["air"] + 100)
    lesion_hosts.append(liver)
  elif region == "chest":
    for side, (up, lo) in (
      (1, ("lung_upper_lobe_right", "lung_lower_lobe_right")),
      (-1, ("lung_upper_lobe_left", "lung_lower_lobe_left")),
    ):
      lung = _ellipsoid(
        grid, np.array([side * half_w * 0.45, 0, 0]) + jit(4), (half_w * 0.4, half_ap * 0.75, extent[2])
      )
      upper = grid[2] > (grid[1] * 0.6)
      put(lung & upper, HU["lung"], LABELS[up])
      put(lung & ~upper, HU["lung"], LABELS[lo])
      lesion_hosts.append(lung)
    heart = _ellipsoid(
      grid, np.array([-half_w * 0.1, half_ap * 0.25, -extent[2] * 0.2]) + jit(5), (half_w * 0.3, half_ap * 0.4, 55)
    )
    put(heart, HU["heart"], LABELS["heart"])
    put(_cylinder_z(grid, (0, half_ap * 0.1, 0), (7, 7)), HU["air"], LABELS["trachea"])
    put(_cylinder_z(grid, (0, half_ap * 0.85, 0), (15, 5)), HU["bone_cortical"] * 0.7, LABELS["sternum"])
    for side, label in ((1, "rib_right_5"), (-1, "rib_left_5")):
      shell = (((grid[0] / (half_w * 0.85)) ** 2 + (grid[1] / (half_ap * 0.8)) ** 2) <= 1.0) & (
        ((grid[0] / (half_w * 0.78)) ** 2 + (grid[1] / (half_ap * 0.72)) ** 2) > 1.0
      )
      ribs = shell & (np.mod(grid[2], 25.0) < 8.0) & (np.sign(grid[0]) == side)
      put(ribs, HU["bone_cortical"] * 0.8, LABELS[label])
  else:  # head_neck: skull with brain in the upper part, neck below
    top = grid[2] > -extent[2] * 0.1
    skull = _ellipsoid(grid, (0, 0, extent[2] * 0.2), (half_w * 1.05, half_ap * 1.15, extent[2] * 0.45)) & top
    brain = _ellipsoid(grid, (0, 0, extent[2] * 0.2), (half_w * 0.9, half_ap, extent[2] * 0.4)) & top
    put(skull, HU["bone_cortical"], LABELS["skull"])
    put(brain, HU["brain"], LABELS["brain"])
    put(_ellipsoid(grid, (0, 0, extent[2] * 0.2) + jit(3), (4, 20, 15)) & top, HU["csf"], LABELS["brain"])  # ventricle
    put(_cylinder_z(grid, (0, half_ap * 0.3, 0), (6, 6), (-np.inf, -extent[2] * 0.1)), HU["air"], LABELS["trachea"])
    put(_ellipsoid(grid, (0, half_ap * 0.45, -extent[2] * 0.3), (18, 8, 12)), HU["thyroid"], LABELS["thyroid_gland"])
    lesion_hosts.append(brain)
  if region != "head_neck":
    put(_cylinder_z(grid, spine_c + [-14, 22, 0] + jit(2) * [1, 1, 0], (9, 9)), HU["blood"], LABELS["aorta"])
    if region == "abdomen":
      put(_cylinder_z(grid, spine_c + [18, 24, 0], (9, 7)), HU["blood"] - 5, LABELS["inferior_vena_cava"])
  put(~body, HU["air"], 0)

  lesions = np.zeros(shape, np.uint8)
  host = np.any(lesion_hosts, axis=0) if lesion_hosts else np.zeros(shape, bool)
  candidates = np.argwhere(ndimage.binary_erosion(host, iterations=3)) if host.any() else np.zeros((0, 3))
  for _ in range(num_lesions if len(candidates) else 0):
    center_vox = candidates[rng.integers(len(candidates))]
    center = np.array([ax[c] for ax, c in zip(axes, center_vox)])
    radius = rng.uniform(6.0, 15.0)
    sphere = _ellipsoid(grid, center, radius * rng.uniform(0.8, 1.2, 3)) & host
    contrast = rng.choice([-45.0, 40.0]) if region != "chest" else 850.0 + 30.0  # lung nodule ~ soft tissue
    hu[sphere] = hu[sphere] + contrast
    lesions[sphere] = 1

  # Partial-volume blur then correlated noise, as CT reconstruction produces.
  hu = ndimage.gaussian_filter(hu, sigma=0.6)
  noise = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape).astype(np.float32), sigma=0.7)
  noise *= noise_hu / (noise.std() + 1e-6)
  hu = np.where(body, hu + noise, hu + 0.2 * noise)
  return Phantom(
    hu=hu.astype(np.float32), labels=labels, lesions=lesions, spacing=tuple(map(float, spacing)), region=region
  )
