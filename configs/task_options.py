"""Options every whole-volume task shares (windows, sampler, seed)."""

import ml_collections


def add_window_options(c: ml_collections.ConfigDict, num_steps: int = 50) -> ml_collections.ConfigDict:
  c.num_steps = num_steps  # reverse-process steps
  c.overlap = 0.5  # fraction shared by neighbouring windows
  c.window_batch = 8  # windows per model call (rounded up to a multiple of the device count)
  c.seed = 0
  return c
