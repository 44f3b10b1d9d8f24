"""A public real CT for the demos: TotalSegmentator's example_ct (Apache-2.0 repository; Wasserthal et al.,
Radiology: AI 2023), 122x101x112 at 3 mm, pelvis to lung bases, non-contrast.

Offline (tests, or a machine with the files) `$MEDDIFF_TEST_DATA/example_ct.nii.gz` is used as is; otherwise
the file is downloaded once into a cache folder. The caller checks it is CT (`volumes.check_ct`) after loading.
"""

from __future__ import annotations

import os
import urllib.request

EXAMPLE_CT_URL = "https://github.com/wasserth/TotalSegmentator/raw/master/tests/reference_files/example_ct.nii.gz"
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "meddiff_jax")


def example_ct(cache_dir: str = CACHE_DIR, url: str = EXAMPLE_CT_URL) -> str:
  """Local path of example_ct.nii.gz: from $MEDDIFF_TEST_DATA when set, else downloaded (once) into cache_dir."""
  local = os.environ.get("MEDDIFF_TEST_DATA")
  if local:
    path = os.path.join(local, "example_ct.nii.gz")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: not found ($MEDDIFF_TEST_DATA={local!r} has no example_ct.nii.gz)")
    return path
  path = os.path.join(cache_dir, "example_ct.nii.gz")
  if not os.path.isfile(path):
    os.makedirs(cache_dir, exist_ok=True)
    partial = path + ".part"
    urllib.request.urlretrieve(url, partial)
    os.replace(partial, path)  # never leave a truncated file under the final name
  return path
