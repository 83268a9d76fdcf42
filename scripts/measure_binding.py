"""Does the text-to-image model put each named digit and colour on the side the prompt says?

    python scripts/measure_binding.py [CHECKPOINT] [N] [GUIDANCE]     (default: prompted-digits 300 3)

N full prompts from random scenes (seed 123), one sample each (DPM-Solver++ 20 steps, seed 0);
prints, from the pixels (captions.colours_of, captions.digits_of): each side's colour and digit
right, and how often the two colours (digits) are swapped among prompts whose two differ. A model
that reads a prompt as a bag of words swaps about half of them.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion_course import captions, generate  # noqa: E402


def main(checkpoint: str = "prompted-digits", num: int = 300, guidance: float = 3.0) -> None:
    pipeline = generate.load_pipeline(checkpoint)
    scenes = captions.random_scenes(num, torch.Generator().manual_seed(123))
    prompts = [captions.full_caption(scene) for scene in scenes]
    images = generate.generate(pipeline.model, pipeline.schedule, num=num, shape=pipeline.shape,
                               cond=generate.prompt_ids(pipeline.model, prompts, num), guidance_scale=guidance,
                               sampler="dpm", sampling_steps=20, seed=0, decode=pipeline.decode, clip_x0=None)
    colours, digits = captions.colours_of(images), captions.digits_of(images)
    for name, drawn, left, right in (("colour", colours, scenes[:, 1], scenes[:, 4]),
                                     ("digit", digits, scenes[:, 0], scenes[:, 3])):
        differ = left != right
        swapped = ((drawn[:, 0] == right) & (drawn[:, 1] == left))[differ].float().mean()
        print(f"{name}: left right {(drawn[:, 0] == left).float().mean():.1%}, right right "
              f"{(drawn[:, 1] == right).float().mean():.1%}, swapped {swapped:.1%} of {int(differ.sum())} "
              f"prompts whose two {name}s differ")


if __name__ == "__main__":
    main(*(cast(value) for cast, value in zip((str, int, float), sys.argv[1:])))
