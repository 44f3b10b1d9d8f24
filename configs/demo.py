"""The embedded-default demo: pretrain the tiny model on synthetic phantoms on CPU in about a minute."""

from __future__ import annotations

import ml_collections

from meddiff_jax.configs import pretrain


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = pretrain.get_config("tiny")
  c.training.update(num_steps=60, log_every=10)
  return c
