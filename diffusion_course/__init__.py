"""diffusion-course: the reference implementations the lessons build and import.

Modules: schedules (forward process), unet (the denoiser), training, sampling, guidance,
checkpoints, data, metrics, cli; viz and widgets for notebooks; checks for the exercises.
"""

__version__ = "0.1.0"
