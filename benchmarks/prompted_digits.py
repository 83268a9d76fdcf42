"""Prompted digits: prompt adherence, negative prompts and latent vs pixel speed of the small Stable Diffusion.

Does the shipped model draw what its prompts say, does a negative prompt keep a colour away, and
what do latents buy in speed (issue 15's measures)?

    python -m benchmarks.prompted_digits            (N = 500 samples per measure; minutes on 2 cores)
    python -m benchmarks.prompted_digits --quick    (seconds; checks that it runs, measures nothing)
    python -m benchmarks.prompted_digits --checkpoint runs/prompted-digits/unet   (a run folder or checkpoint)

Every image is made the one way (generate.load_pipeline, generate.generate with the pipeline's
decoder, DPM-Solver++ `--steps` 20, guidance `--guidance` 3, latent x0 guesses unclamped unless
`--clip-x0` says so) and judged from its pixels (captions.adherence: the shipped MNIST classifier
on each half for digits, the palette for colours).

1. Prompt adherence. Scenes (digit, colour, size per side) come from MNIST's held-back test split
   (captions.build_prompted_digits(N, train=False, seed=--scene-seed), whose scenes are
   captions.random_scenes of that seed). The model draws each scene from its full caption
   (captions.full_caption: both digits, both colours, sizes), and again from a partial caption (a
   caption of the grammar, captions.caption, redrawn until it names one digit only). Target: "all"
   (every named digit and colour right) >= 0.90 for full prompts. The real test canvases judged
   against their own full captions give the ceiling: the judge's own errors bound what any model scores.
2. Negative prompts. The full captions with their colour words taken out (so the prompt names no
   colour; parse_prompt confirms it): the share of digits drawn red (captions.colours_of, both
   sides), without a negative prompt and with the negative prompt "red", from the same seeds.
   Target: under 5% with it. The red share of the real test canvases (the data's base rate, about
   1/7) is reported beside them.
3. Speed. The shipped U-Net's config on latents (its latent shape, e.g. 4 x 8 x 16) against the same
   config on pixels (3 x 32 x 64; the network is fully convolutional), both freshly initialised:
   images per second of a training step (diffusion_loss, backward, AdamW step, the text encoder
   trained too when the shipped model's config.json says it was fine-tuned; a batch of real test
   canvases or their latents) and of sampling (`--steps` guided calls of DPM-Solver++, plus
   the decoder for latents). Each is the median of `--repeats` (training) or `--sample-repeats`
   (sampling) timings after one warm-up; a single timing on a shared machine is not to be trusted.

Intervals are 95%: Wilson's score interval for a share of images. For the red share, whose two
digits of one image are not independent, the wider of a bootstrap over images (2,000 resamples)
and Wilson's interval over the 2N digits (the bootstrap alone collapses to [0, 0] when no digit is red).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from pathlib import Path

if __package__ in (None, ""):      # run as `python benchmarks/prompted_digits.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import common
from diffusion_course import captions, checkpoints, generate, metrics, text
from diffusion_course.training import diffusion_loss

RED = list(captions.PALETTE).index("red")


def wilson_interval(successes: int, num: int, z: float = 1.96) -> list[float]:
    """Wilson's score interval for a binomial share (Wilson 1927): [low, high] in [0, 1]."""
    if num == 0:
        return [float("nan"), float("nan")]
    share = successes / num
    centre = (share + z * z / (2 * num)) / (1 + z * z / num)
    half = z / (1 + z * z / num) * (share * (1 - share) / num + z * z / (4 * num * num)) ** 0.5
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def bootstrap_interval(counts: torch.Tensor, per_image: int, resamples: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile bootstrap over images of sum(counts) / (per_image * N); counts (N,) per image."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(counts), (resamples, len(counts)), generator=generator)
    shares = counts.double()[picks].mean(1) / per_image
    low, high = torch.quantile(shares, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [round(low, 4), round(high, 4)]


def partial_prompts(scenes: torch.Tensor, seed: int) -> list[str]:
    """One caption of the grammar per scene that names a single digit (captions.caption, redrawn
    from one seeded generator until the caption is partial)."""
    generator = torch.Generator().manual_seed(seed)
    prompts = []
    for scene in scenes:
        prompt = captions.caption(scene, generator)
        while _digits_named(captions.parse_prompt(prompt)) != 1:
            prompt = captions.caption(scene, generator)
        prompts.append(prompt)
    return prompts


def colourless_prompt(scene: torch.Tensor) -> str:
    """The scene's full caption without its colour words ("a 3 on the left and an 8 on the right")."""
    words = [w for w in captions.full_caption(scene).split() if w not in captions.PALETTE]
    prompt = re.sub(r"\ba (8)\b", r"an \1", " ".join(words))
    spec = captions.parse_prompt(prompt)
    if spec.left.colour is not None or spec.right.colour is not None:
        raise ValueError(f"{prompt!r} still names a colour.")
    return prompt


def _digits_named(spec: captions.PromptSpec) -> int:
    return sum(side.digit is not None for side in (spec.left, spec.right))


def sample(pipeline: generate.Pipeline, prompts: list[str], args, negative: str | None = None) -> torch.Tensor:
    """(N, 3, 32, 64) images, one per prompt, the benchmark's way (seed, sampler, steps, guidance)."""
    model = pipeline.model
    ids = generate.prompt_ids(model, prompts, len(prompts))
    negative_ids = None if negative is None else generate.prompt_ids(model, [negative], 1)
    return generate.generate(model, pipeline.schedule, num=len(prompts), shape=pipeline.shape, cond=ids,
                             guidance_scale=args.guidance, negative=negative_ids, sampler="dpm",
                             sampling_steps=args.steps, seed=args.seed, decode=pipeline.decode, clip_x0=args.clip_x0,
                             batch_size=args.batch_size)


def adherence_record(images: torch.Tensor, prompts: list[str], classifier) -> dict:
    """captions.adherence plus a Wilson interval for "all" (every prompt here names something)."""
    shares = captions.adherence(images, prompts, classifier)
    record = {key: round(shares[key], 4) for key in ("digits", "colours", "all")}
    return record | {"num": shares["num"],
                     "interval_all": wilson_interval(round(shares["all"] * shares["num"]), shares["num"])}


def red_counts(images: torch.Tensor) -> torch.Tensor:
    """(N,) how many of each image's two digits are drawn red (0, 1 or 2)."""
    return (captions.colours_of(images) == RED).sum(1)


def negative_record(pipeline: generate.Pipeline, real: captions.PromptedDigits, args) -> dict:
    """Red shares of colourless prompts' samples without and with the negative prompt "red", and of
    the real test canvases of the same scenes (the data's base rate, about 1/7)."""
    prompts = [colourless_prompt(scene) for scene in real.scenes[:args.num]]
    without = red_counts(sample(pipeline, prompts, args))
    common.log("negative prompt: sampled without")
    with_red = red_counts(sample(pipeline, prompts, args, negative="red"))
    real_counts = red_counts(real.images[:args.num])
    share = lambda counts: round(float(counts.sum()) / (2 * len(counts)), 4)
    return {"red_share_without": share(without), "red_share_with": share(with_red), "num": len(prompts),
            "interval_without": red_interval(without), "interval_with": red_interval(with_red),
            "red_share_real": share(real_counts), "interval_real": red_interval(real_counts),
            "negative_prompt": "red", "example_prompt": prompts[0]}


def red_interval(counts: torch.Tensor) -> list[float]:
    """The wider of the bootstrap over images and Wilson's interval over the 2N digits."""
    boot, wilson = bootstrap_interval(counts, 2), wilson_interval(int(counts.sum()), 2 * len(counts))
    return [min(boot[0], wilson[0]), max(boot[1], wilson[1])]


def train_images_per_s(model, x0: torch.Tensor, ids: torch.Tensor, schedule, repeats: int) -> float:
    """Images per second of one training step: diffusion_loss, backward, AdamW step."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)

    def step():
        optimizer.zero_grad(set_to_none=True)
        diffusion_loss(model, x0, schedule, cond=ids, generator=generator).backward()
        optimizer.step()

    seconds = common.median_seconds(step, repeats)
    model.eval()
    return len(x0) / seconds


def sample_images_per_s(model, schedule, shape: tuple, ids: torch.Tensor, args, decode=None) -> float:
    """Images per second of sampling len(ids) images in one batch: `args.steps` guided calls (+ decode)."""
    run = lambda: generate.generate(model, schedule, num=len(ids), shape=shape, cond=ids,
                                    guidance_scale=args.guidance, sampler="dpm", sampling_steps=args.steps, seed=0,
                                    decode=decode, clip_x0=args.clip_x0 if decode is not None else 1.0,
                                    batch_size=len(ids))
    return len(ids) / common.median_seconds(run, args.sample_repeats)


def speed_record(pipeline: generate.Pipeline, real: captions.PromptedDigits, args) -> dict:
    """The shipped config on latents against the same config on pixels, both freshly initialised."""
    config = pipeline.model.config
    autoencoder = checkpoints.load_checkpoint(pipeline.info["autoencoder"]).model
    images = real.images[:args.speed_batch]
    ids = generate.prompt_ids(pipeline.model, [captions.full_caption(s) for s in real.scenes[:len(images)]],
                              len(images))
    with torch.no_grad():
        latents = autoencoder.encode_latents(images)
    pixel_config = dataclasses.replace(config, in_channels=images.shape[1], image_size=images.shape[2])
    train_text = str(pipeline.info.get("text_encoder", "")).startswith("fine-tuned")   # the shipped recipe's choice
    record = {}
    for name, model_config, x0, decode in (("latent", config, latents, autoencoder.decode_latents),
                                           ("pixel", pixel_config, images, None)):
        torch.manual_seed(0)
        model = text.TextUNet(model_config)
        model.text_encoder.requires_grad_(train_text)
        record[f"{name}_train_images_per_s"] = round(
            train_images_per_s(model, x0, ids, pipeline.schedule, args.repeats), 2)
        record[f"{name}_sample_images_per_s"] = round(
            sample_images_per_s(model, pipeline.schedule, tuple(x0.shape[1:]), ids, args, decode), 2)
        record[f"{name}_shape"] = list(x0.shape[1:])
        common.log(f"speed, {name}: train {record[f'{name}_train_images_per_s']:.1f} images/s, "
                   f"sample {record[f'{name}_sample_images_per_s']:.1f} images/s")
    record["train_ratio"] = round(record["latent_train_images_per_s"] / record["pixel_train_images_per_s"], 2)
    record["sample_ratio"] = round(record["latent_sample_images_per_s"] / record["pixel_sample_images_per_s"], 2)
    return record | {"text_encoder_trained": train_text, "batch_size": len(images), "train_repeats": args.repeats,
                     "sample_repeats": args.sample_repeats,
                     "statistic": "median after one warm-up", "threads": torch.get_num_threads()}


def share_rows(results: dict) -> list[dict]:
    rows = []
    for key, what in (("adherence_full", "adherence, full prompts"),
                      ("adherence_partial", "adherence, partial prompts"),
                      ("real_ceiling", "real test canvases, own full captions")):
        entry = results[key]
        rows.append({"measure": f"{what}: all", "share": entry["all"], "95% interval": _interval(entry["interval_all"]),
                     "digits": entry["digits"], "colours": entry["colours"], "num": entry["num"]})
    negative = results["negative_prompt"]
    for label, key in (("real test canvases", "real"), ("colourless prompts, without", "without"),
                       ('colourless prompts, with negative "red"', "with")):
        rows.append({"measure": f"red digits, {label}", "share": negative[f"red_share_{key}"],
                     "95% interval": _interval(negative[f"interval_{key}"]), "num": negative["num"]})
    return rows


def _interval(pair: list[float]) -> str:
    return f"[{pair[0]:.3f}, {pair[1]:.3f}]"


def speed_rows(speed: dict) -> list[dict]:
    return [{"images/s": what, "latent": speed[f"latent_{key}_images_per_s"],
             "pixel": speed[f"pixel_{key}_images_per_s"], "latent / pixel": speed[f"{key}_ratio"]}
            for what, key in (("training step", "train"), ("sampling", "sample"))]


def measure(pipeline: generate.Pipeline, args) -> dict:
    """The three measures: adherence (full, partial, real ceiling), the negative prompt, speed."""
    classifier = metrics.load_classifier("mnist")
    real = captions.build_prompted_digits(max(args.num, args.speed_batch), train=False, seed=args.scene_seed)
    scenes, results = real.scenes[:args.num], {}
    full = [captions.full_caption(scene) for scene in scenes]
    for key, prompts in (("adherence_full", full), ("adherence_partial", partial_prompts(scenes, args.scene_seed))):
        results[key] = adherence_record(sample(pipeline, prompts, args), prompts, classifier)
        results[key]["example_prompt"] = prompts[0]
        common.log(f"{key}: {results[key]}")
    results["real_ceiling"] = adherence_record(real.images[:args.num], full, classifier)
    results["negative_prompt"] = negative_record(pipeline, real, args)
    results["speed"] = speed_record(pipeline, real, args)
    return results


def print_tables(results: dict, args, info: dict) -> None:
    print(common.format_table(share_rows(results), ["measure", "share", "95% interval", "digits", "colours", "num"]))
    print()
    print(common.format_table(speed_rows(results["speed"]), ["images/s", "latent", "pixel", "latent / pixel"]))
    print(f"\nspeed: medians of {args.repeats} training steps and {args.sample_repeats} sampling runs after a "
          f"warm-up each, batch {results['speed']['batch_size']}, {results['speed']['threads']} threads on "
          f"{info['cpu']}")


def main(argv: list[str] | None = None) -> int:
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="prompted-digits",
                        help="the text-to-image model: a shipped name, a checkpoint folder or a run folder "
                             "(default prompted-digits)")
    parser.add_argument("--num", type=int, help="samples per measure (default 500; 20 with --quick)")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
    parser.add_argument("--steps", type=int, help="DPM-Solver++ steps (default 20; 5 with --quick)")
    parser.add_argument("--clip-x0", type=float, help="clamp the sampler's latent x0 guesses to [-r, r] "
                                                    "(default: none, as the command line samples latents)")
    parser.add_argument("--seed", type=int, default=0, help="the samples' seed (default 0)")
    parser.add_argument("--scene-seed", type=int, default=1, help="the test scenes' and captions' seed (default 1)")
    parser.add_argument("--batch-size", type=int, default=100, help="images per sampler call (default 100)")
    parser.add_argument("--speed-batch", type=int, help="images per timed training step / sampling call "
                                                       "(default 64; 4 with --quick)")
    parser.add_argument("--repeats", type=int,
                        help="timed training steps, median reported (default 5; 2 with --quick)")
    parser.add_argument("--sample-repeats", type=int,
                        help="timed sampling runs, median reported (default 3; 2 with --quick)")
    args = parser.parse_args(argv)
    args.num = args.num or (20 if args.quick else 500)
    args.steps = args.steps or (5 if args.quick else 20)
    args.speed_batch = args.speed_batch or (4 if args.quick else 64)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.sample_repeats = args.sample_repeats or (2 if args.quick else 3)
    if min(args.num, args.steps, args.speed_batch, args.repeats, args.sample_repeats, args.batch_size) < 1:
        parser.error("--num, --steps, --speed-batch, --repeats, --sample-repeats and --batch-size must be at least 1.")
    info = common.machine_info()
    common.log(f"prompted_digits: load average {info['load_average']}, {info['torch_threads']} threads")
    start = time.perf_counter()
    pipeline = generate.load_pipeline(args.checkpoint)
    results = measure(pipeline, args)
    print_tables(results, args, info)
    results |= {"checkpoint": str(pipeline.path), "guidance": args.guidance, "sampler": "dpm", "steps": args.steps,
                "clip_x0": args.clip_x0,
                "seed": args.seed, "scene_seed": args.scene_seed, "seconds": round(time.perf_counter() - start, 1),
                "machine": info, "load_average_end": [round(x, 2) for x in os.getloadavg()], "quick": args.quick}
    path = common.write_results("prompted_digits", results, args.out_dir)
    common.log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
