"""Exercise checkers, tiered hints, predictions and derivations for the lessons (ring 3).

Each checker runs your function on small inputs and compares it with the package's reference
implementation; it prints one verdict and returns True or False (see _harness for the verdicts
and strict mode):

    from diffusion_course import checks
    checks.check_q_sample(q_sample)      # ✅ Passed / ⏳ Not done yet / ❌ the likely mistake
    checks.hint("q_sample")              # what to think about; call again for the equation, then the line

One file per lesson, named after the module it checks, holds its checkers and their hints:

    schedules.py  L01  check_q_sample, check_cosine_alpha_bar
    unet.py       L02  check_timestep_embedding, check_res_block_forward
    training.py   L03  check_diffusion_loss, check_train_step
    sampling.py   L04  check_ddpm_step, check_ddim_step
    guidance.py   L05  check_drop_labels, check_guided_eps
    editing.py    L06  check_img2img_start, check_inpaint_step
    data.py       L07  check_pixels_to_model, check_random_hflip
    autoencoder.py L08 check_kl_divergence, check_sample_posterior, check_measure_scale_factor
    text.py       L09  check_clip_loss, check_attention_maps
    flow.py       L10  check_flow_matching_loss
    distill.py    L11  check_teacher_digits, check_reflow_loss

_prompts.py holds hint, predict, reveal and check_derivation.
"""

from __future__ import annotations

from . import autoencoder, data, distill, editing, flow, guidance, sampling, schedules, text, training, unet
from ._harness import NOT_DONE, STRICT_ENV
from ._prompts import check_derivation, predict, reveal, show_hint
from .autoencoder import check_kl_divergence, check_measure_scale_factor, check_sample_posterior
from .data import check_pixels_to_model, check_random_hflip
from .distill import check_reflow_loss, check_teacher_digits
from .editing import check_img2img_start, check_inpaint_step
from .flow import check_flow_matching_loss
from .guidance import check_drop_labels, check_guided_eps
from .sampling import check_ddim_step, check_ddpm_step
from .schedules import check_cosine_alpha_bar, check_q_sample
from .text import check_attention_maps, check_clip_loss
from .training import check_diffusion_loss, check_train_step
from .unet import check_res_block_forward, check_timestep_embedding

LESSONS = (schedules, unet, training, sampling, guidance, editing, data, autoencoder, text, flow, distill)   # the checks files, in lesson order
HINTS = {name: tiers for lesson in LESSONS for name, tiers in lesson.HINTS.items()}


def hint(name: str, tier: int | None = None) -> None:
    """Print a hint for the exercise `name` ("q_sample", ...): the next tier each call, or `tier`
    (1: what to think about, 2: which equation, 3: the line(s), close to code)."""
    show_hint(HINTS, name, tier)


__all__ = [
    "NOT_DONE", "STRICT_ENV", "HINTS", "LESSONS", "hint", "predict", "reveal", "check_derivation",
    "check_q_sample", "check_cosine_alpha_bar", "check_timestep_embedding", "check_res_block_forward",
    "check_diffusion_loss", "check_train_step", "check_ddpm_step", "check_ddim_step",
    "check_drop_labels", "check_guided_eps", "check_img2img_start", "check_inpaint_step",
    "check_flow_matching_loss", "check_pixels_to_model", "check_random_hflip",
    "check_kl_divergence", "check_sample_posterior", "check_measure_scale_factor",
    "check_clip_loss", "check_attention_maps", "check_teacher_digits", "check_reflow_loss",
]
