"""Export a training run as a small self-contained directory: config.json + params.msgpack (EMA params).

meddiff --config=export --config.source=runs/pretrain --config.output=runs/exported
Tasks then load it with --config.checkpoint=runs/exported (what meddiff_jax/assets/tiny_phantom is).
"""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.mode = "export"
  c.source = ""  # a pretraining workdir (or an exported directory / builtin name)
  c.output = ""  # a new (or empty) directory
  c.overwrite = False  # replace an existing export in `output`
  return c
