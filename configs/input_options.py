"""How input volumes are read and checked (every task and prepare): overrides and limits.

Defaults refuse anything ambiguous with a one-line reason naming the override below.
"""

import ml_collections


def add_input_options(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.assume_orientation = ""  # e.g. "RAS" / "LPS": axis directions of a NIfTI with qform_code = sform_code = 0
  c.trust_affine = ""  # "sform" | "qform": which to use when a NIfTI's two affines disagree
  c.assume_hu = False  # accept intensities the CT check doubts (it must really be CT in Hounsfield units)
  c.limits = ml_collections.ConfigDict()
  c.limits.max_voxels = 1024 * 1024 * 2000  # refused from the header, before reading
  c.limits.max_gb = 8.0  # decompressed voxel data, from the header (gzip bombs)
  c.limits.max_spacing_mm = 20.0  # larger voxel spacing = a slice gap, not a volume (thick CT slices: <= 10 mm)
  c.limits.min_side_voxels = 4  # thinner volumes are refused; others smaller than the patch are padded with air
  return c
