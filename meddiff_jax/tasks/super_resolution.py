"""Super-resolution with a fine-tuned ControlNet (configs/super_resolution.py); see tasks/controlled.py."""

from meddiff_jax.tasks.controlled import run_super_resolution as run  # noqa: F401
