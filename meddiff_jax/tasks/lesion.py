"""Lesion generation / inpainting with a fine-tuned ControlNet (configs/lesion.py); see tasks/controlled.py."""

from meddiff_jax.tasks.controlled import run_lesion as run  # noqa: F401
