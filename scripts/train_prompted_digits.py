"""Train the three parts of the course's small Stable Diffusion on prompted digits, one stage at a
time, each resumable (the same command continues an interrupted stage; a larger budget extends it):

    python scripts/train_prompted_digits.py autoencoder --minutes 15   # pixels <-> latents (lesson 08)
    python scripts/train_prompted_digits.py ship --stage autoencoder   # measures the latent scale factor
    python scripts/train_prompted_digits.py clip --minutes 20 --hard-negatives   # the text encoder (lesson 09)
    python scripts/train_prompted_digits.py ship --stage clip
    python scripts/train_prompted_digits.py unet --minutes 50 --freeze-text --coordinates   # the latent U-Net
    python scripts/train_prompted_digits.py ship --stage unet

(The shipped models were trained with --run names clip-neg and unet-coord; see the README.)

Runs live in runs/prompted-digits/{autoencoder,clip,unet}; `ship` writes the EMA weights of a
run's latest checkpoint to diffusion_course/pretrained/prompted-digits{-autoencoder,-clip,}.
The U-Net stage uses the shipped autoencoder and text encoder: it encodes the canvases into
latents once (the posterior means, times the autoencoder's measured scale factor) and copies the
text encoder into the U-Net, frozen, as Stable Diffusion does with CLIP's.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion_course import autoencoder, captions, checkpoints, runs, schedules, text  # noqa: E402
from diffusion_course.threads import use_best_threads  # noqa: E402
from diffusion_course.training import diffusion_loss  # noqa: E402

RUNS = Path("runs/prompted-digits")
SHIPPED = {"autoencoder": "prompted-digits-autoencoder", "clip": "prompted-digits-clip", "unet": "prompted-digits"}
TEXT = dict(max_length=24, dim=64, depth=2, heads=4)
UNET = dict(in_channels=4, image_size=8, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
            attention_levels=(1,))      # 8x16 latents; cross-attention at 4x8 and in the middle


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["autoencoder", "clip", "unet", "ship"])
    parser.add_argument("--minutes", type=float, default=10.0, help="training time budget (total, across resumes)")
    parser.add_argument("--num", type=int, default=60_000, help="training canvases (from MNIST's training split)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, help="default: the stage's own")
    parser.add_argument("--fresh", action="store_true", help="start the stage over instead of resuming")
    parser.add_argument("--stage", dest="ship_stage", choices=sorted(SHIPPED), help="for ship: which stage")
    parser.add_argument("--run", help="the run folder's name under runs/prompted-digits (default: the stage's name)")
    parser.add_argument("--attention-levels", default="1", help="unet: the levels with cross-attention, e.g. 0,1")
    parser.add_argument("--hard-negatives", action="store_true",
                        help="clip: also contrast each image with its caption's colour-, number- and side-swapped "
                             "variants (NegCLIP), so the text encoder must say which colour goes with which digit")
    parser.add_argument("--clip", default=f"pretrained:{SHIPPED['clip']}",
                        help="unet: the mini CLIP whose text encoder the U-Net starts from (a checkpoint or run folder)")
    parser.add_argument("--freeze-text", action="store_true",
                        help="unet: keep the text encoder frozen, as Stable Diffusion does (default: fine-tune it)")
    parser.add_argument("--coordinates", action="store_true",
                        help="unet: the first convolution also reads each pixel's (x, y) (text.CoordConv2d)")
    parser.add_argument("--text-init", choices=["clip", "scratch"], default="clip",
                        help="unet: start the text encoder from the mini CLIP's, or from random weights (as GLIDE)")
    args = parser.parse_args(argv)
    use_best_threads()
    if args.stage == "ship":
        return ship(args.ship_stage, args.run or args.ship_stage)
    canvases = captions.build_prompted_digits(args.num, train=True, seed=0)
    stage = {"autoencoder": train_autoencoder, "clip": train_clip, "unet": train_unet}[args.stage]
    start = time.perf_counter()
    result = stage(canvases, args)
    print(f"{args.stage}: {result.step} steps, {result.seconds / 60:.1f} training minutes in total "
          f"({time.perf_counter() - start:.0f} s this run), last loss {result.losses[-1] if result.losses else float('nan'):.4f}")
    return 0


def _config(args, lr: float) -> runs.TrainConfig:
    return runs.TrainConfig(minutes=args.minutes, batch_size=args.batch_size, lr=args.lr or lr, label_dropout=0.0,
                            checkpoint_minutes=2.0, keep_checkpoints=2)


def train_autoencoder(canvases, args) -> runs.TrainResult:
    torch.manual_seed(0)
    model = autoencoder.Autoencoder(autoencoder.AutoencoderConfig())
    return runs.train(model, canvases.images, autoencoder.autoencoder_loss, config=_config(args, 2e-3),
                      out_dir=RUNS / "autoencoder", resume=not args.fresh, info={"dataset": "prompted-digits"})


def train_clip(canvases, args) -> runs.TrainResult:
    torch.manual_seed(0)
    text_config = text.TextEncoderConfig(words=tuple(captions.VOCABULARY), **TEXT)
    model = text.MiniCLIP(text.CLIPConfig(text=text_config.to_dict()))
    ids = model.tokenizer.encode(canvases.captions)
    loss_fn = captions.negclip_loss if args.hard_negatives else text.clip_loss
    return runs.train(model, canvases.images, loss_fn, labels=ids, config=_config(args, 1e-3),
                      out_dir=RUNS / (args.run or "clip"), resume=not args.fresh,
                      info={"dataset": "prompted-digits", "hard_negatives": args.hard_negatives})


def latents_of(images: torch.Tensor, ae: torch.nn.Module, batch_size: int = 500) -> torch.Tensor:
    """The canvases as scaled latents (posterior means), batch by batch."""
    with torch.no_grad():
        return torch.cat([ae.encode_latents(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def train_unet(canvases, args) -> runs.TrainResult:
    ae = checkpoints.load_checkpoint(f"pretrained:{SHIPPED['autoencoder']}").model
    latents = latents_of(canvases.images, ae)
    clip = checkpoints.load_checkpoint(args.clip).model
    torch.manual_seed(0)
    levels = tuple(int(level) for level in args.attention_levels.split(","))
    config = text.TextUNetConfig(**{**UNET, "attention_levels": levels}, text=clip.config.text,
                                 coordinates=args.coordinates)
    model = text.TextUNet.from_clip(config, clip) if args.text_init == "clip" else text.TextUNet(config)
    # Stable Diffusion keeps its text encoder frozen (--freeze-text, the shipped recipe). Fine-tuning
    # it with the denoising loss was tried when the mini CLIP was blind to binding (no hard
    # negatives): it did not teach the U-Net which colour goes where (README).
    model.text_encoder.requires_grad_(not args.freeze_text)
    schedule = schedules.scaled_linear_schedule()   # Stable Diffusion's: alpha_bar_{T-1} ~ 0.0047, not ~0 (see its docstring)
    loss_fn = functools.partial(diffusion_loss, schedule=schedule, min_snr_gamma=5.0)
    info = {"dataset": "prompted-digits", "schedule": schedule.to_config(), "min_snr_gamma": 5.0,
            "autoencoder": f"pretrained:{SHIPPED['autoencoder']}", "latent_shape": list(latents.shape[1:]),
            "scale_factor": ae.config.scale_factor, "text_encoder": (f"{'frozen' if args.freeze_text else 'fine-tuned'}, from {args.clip}"
                             if args.text_init == "clip" else "trained with the U-Net from random weights")}
    config = runs.TrainConfig(minutes=args.minutes, batch_size=args.batch_size, lr=args.lr or 2e-3,
                              label_dropout=0.1, checkpoint_minutes=2.0, keep_checkpoints=2)
    return runs.train(model, latents, loss_fn, labels=model.tokenizer.encode(canvases.captions), config=config,
                      out_dir=RUNS / (args.run or "unet"), resume=not args.fresh, info=info)


def ship(stage: str | None, run: str | None) -> int:
    """Write a stage's EMA weights into the package (no optimizer state). The autoencoder gets its
    latent scale factor, measured on 5,000 training canvases (1 / the latents' std)."""
    if stage is None:
        raise SystemExit("ship needs --stage autoencoder, clip or unet")
    checkpoint = checkpoints.load_checkpoint(RUNS / run)
    model, info = checkpoint.model, {k: v for k, v in checkpoint.info.items() if k not in checkpoints.RESERVED_KEYS}
    if stage == "autoencoder":
        images = captions.build_prompted_digits(5000, train=True, seed=0).images
        model = autoencoder.with_scale_factor(model, autoencoder.measure_scale_factor(model, images))
        print(f"latent scale factor: {model.config.scale_factor:.4f}")
    path = checkpoints.save_checkpoint(checkpoints.PRETRAINED_DIR / SHIPPED[stage], model, checkpoint.schedule,
                                       step=checkpoint.info.get("step", 0), info=info)
    size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    print(f"shipped {stage} ({checkpoint.path}) as {path}: {size:.2f} MiB")
    print(json.dumps({k: info[k] for k in ("seconds", "train_config") if k in info}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
