"""Do hard negatives help lesson 09's own mini CLIP within the lesson's budget?

    python scripts/measure_lesson_clip.py [MINUTES]     (default 1.5, the lesson's CLIP_MINUTES)

Trains the lesson's mini CLIP (same config, batch 128, lr 1e-3, 20 warm-up steps, raw weights) on
the 60,000 training canvases for MINUTES, once with hard negatives (captions.negclip_loss, which
the lesson uses) and once without (text.clip_loss), and prints the steps each got and the three swap tests of
scripts/measure_clip.py on the lesson's 1,000 test canvases (seed 1), with full captions.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusion_course import captions, runs, text  # noqa: E402
from measure_clip import image_embeddings, swap_tests  # noqa: E402


def main(minutes: float = 1.5) -> None:
    train = captions.build_prompted_digits(60_000, train=True, seed=0)
    test = captions.build_prompted_digits(1000, train=False, seed=1)
    prompts = [captions.full_caption(scene) for scene in test.scenes]
    config = text.TextEncoderConfig(words=captions.VOCABULARY, max_length=24, dim=64, depth=2, heads=4)
    for hard in (True, False):
        torch.manual_seed(0)
        clip = text.MiniCLIP(text.CLIPConfig(text=config))
        train_config = runs.TrainConfig(minutes=minutes, batch_size=128, lr=1e-3, warmup_steps=20,
                                        label_dropout=0.0, progress=False)
        result = runs.train(clip, train.images, captions.negclip_loss if hard else text.clip_loss,
                            labels=clip.tokenizer.encode(train.captions), config=train_config)
        model = result.model.eval()
        tests = swap_tests(model, image_embeddings(model, test.images), prompts)
        print(f"hard negatives {hard}: {result.step} steps; swap tests: "
              + ", ".join(f"{name} {wins / n:.1%} of {n}" for name, wins, n in tests), flush=True)


if __name__ == "__main__":
    main(*(float(value) for value in sys.argv[1:2]))
