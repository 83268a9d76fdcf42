"""How well does a mini CLIP tell a canvas's caption from almost-true ones?

    python scripts/measure_clip.py [CHECKPOINT] [N]     (default: pretrained:prompted-digits-clip 2000)

On N test canvases (MNIST's test split, seed 1) with their full captions (captions.full_caption):
retrieval (the own caption ranks first among 32 full captions of other canvases) and three swap
tests, the share of canvases whose own caption scores higher than its variant with the two
colours, the two numbers, or "left" and "right" swapped (captions.binding_negatives; canvases
whose variant equals the caption are left out). Chance is 50% on the swap tests and 1/32 on
retrieval; each share comes with its 95% Wilson interval.
"""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion_course import captions, checkpoints  # noqa: E402


def wilson(successes: int, num: int, z: float = 1.96) -> tuple[float, float]:
    p = successes / num
    centre, half = (p + z * z / (2 * num)) / (1 + z * z / num), z * math.sqrt(p * (1 - p) / num + z * z / (4 * num * num)) / (1 + z * z / num)
    return centre - half, centre + half


@torch.no_grad()
def image_embeddings(clip, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([clip.encode_image(chunk) for chunk in images.split(500)])


@torch.no_grad()
def swap_tests(clip, image_emb: torch.Tensor, prompts: list[str]) -> list[tuple[str, int, int]]:
    """(name, wins, num) for the three swap tests: how often each image's own caption scores above
    its variant, among the images (given as clip.encode_image's embeddings) whose variant differs."""
    own = (image_emb * clip.encode_text(clip.tokenizer.encode(prompts))).sum(1)
    variants = [captions.binding_negatives(prompt) for prompt in prompts]
    results = []
    for k, name in enumerate(("colours swapped", "numbers swapped", "sides swapped")):
        texts = [v[k] for v in variants]
        differ = torch.tensor([t != p.lower() for t, p in zip(texts, prompts)])
        score = (image_emb * clip.encode_text(clip.tokenizer.encode(texts))).sum(1)
        results.append((name, int((own > score)[differ].sum()), int(differ.sum())))
    return results


@torch.no_grad()
def main(checkpoint: str = "pretrained:prompted-digits-clip", num: int = 2000, group: int = 32) -> None:
    clip = checkpoints.load_checkpoint(checkpoint).model.eval()
    test = captions.build_prompted_digits(num, train=False, seed=1)
    prompts = [captions.full_caption(scene) for scene in test.scenes]
    image_emb = image_embeddings(clip, test.images)
    text_emb = clip.encode_text(clip.tokenizer.encode(prompts))
    scores = torch.stack([image_emb[i:i + group] @ text_emb[i:i + group].T for i in range(0, num - group + 1, group)])
    hits = int((scores.argmax(-1) == torch.arange(group)).sum())
    total = scores.shape[0] * group
    print(f"{checkpoint}: retrieval among {group}: {hits / total:.1%} [{wilson(hits, total)[0]:.1%}, {wilson(hits, total)[1]:.1%}] of {total}")
    for name, wins, n in swap_tests(clip, image_emb, prompts):
        low, high = wilson(wins, n)
        print(f"  swap test, {name}: own caption higher {wins / n:.1%} [{low:.1%}, {high:.1%}] of {n}")


if __name__ == "__main__":
    main(*(cast(value) for cast, value in zip((str, int), sys.argv[1:])))
