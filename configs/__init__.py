"""The shipped configs, installed as the package `meddiff_jax.configs` (meddiff_jax/configs links here).

Run one by name, `meddiff --config=denoise` or `--config=pretrain:paper` (the text after the colon is the
preset), or by path, `--config=configs/denoise.py`; a config of one's own imports these as
`from meddiff_jax.configs import pretrain`. input_options.py and task_options.py are shared option helpers.
"""
