"""Training speed on CIFAR-10 against MNIST on this machine, in images per second (issue 14).

    python -m benchmarks.colour_speed            (about 2 minutes on 2 cores)
    python -m benchmarks.colour_speed --quick    (seconds; checks that it runs)

The two models are the ones the course ships: MNIST's default U-Net (16 base channels, 28 x 28
grey) and CIFAR-10's (32 base channels, 32 x 32 colour, the command of the README). Each setting
(float32 or bfloat16 autocast; one thread or this machine's default) times training steps of
both models through `training.train_step` with the course's loss (Min-SNR 5), interleaved round
by round so that load from elsewhere hits both alike; the median step of each round, the best
round counts. The ratio of the two speeds is the figure to compare across machines: it says how
many MNIST images one CIFAR-10 image costs (the FLOP count alone says 5.23).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

if __package__ in (None, ""):      # run as `python benchmarks/colour_speed.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import common
from diffusion_course import schedules, training
from diffusion_course.unet import UNet, UNetConfig

MODELS = {"mnist": UNetConfig(1, 28, 16, num_classes=10), "cifar10": UNetConfig(3, 32, 32, num_classes=10)}


def images_per_second(config: UNetConfig, *, batch_size: int, steps: int, autocast_dtype) -> float:
    """Images per second of the median of `steps` timed training steps (after one untimed step)."""
    torch.manual_seed(0)
    model = UNet(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = functools.partial(training.diffusion_loss, schedule=schedules.cosine_schedule(1000), min_snr_gamma=5.0)
    x0 = torch.randn(batch_size, config.in_channels, config.image_size, config.image_size).clamp(-1, 1)
    cond = torch.arange(batch_size) % 10
    step = lambda: training.train_step(model, optimizer, x0, loss_fn, cond=cond, autocast_dtype=autocast_dtype)
    return batch_size / common.median_seconds(step, steps)


def main(argv: list[str] | None = None) -> int:
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    batch_size, steps, rounds = (8, 2, 1) if args.quick else (64, 5, args.rounds)
    default_threads = torch.get_num_threads()
    rows = []
    for threads in sorted({1, default_threads}):
        for precision, dtype in (("float32", None), ("bfloat16", torch.bfloat16)):
            torch.set_num_threads(threads)
            best = {name: 0.0 for name in MODELS}
            for round_number in range(rounds):
                for name, config in MODELS.items():
                    speed = images_per_second(config, batch_size=batch_size, steps=steps, autocast_dtype=dtype)
                    best[name] = max(best[name], speed)
                    common.log(f"{threads} thread(s), {precision}, round {round_number + 1}: {name} {speed:.1f} images/s")
            rows.append({"threads": threads, "precision": precision, "mnist_images_per_second": best["mnist"],
                         "cifar10_images_per_second": best["cifar10"], "mnist_per_cifar10": best["mnist"] / best["cifar10"]})
    torch.set_num_threads(default_threads)
    print(common.format_table(rows, list(rows[0])))
    path = common.write_results("colour_speed", {"machine": common.machine_info(), "batch_size": batch_size,
                                                 "rows": rows}, args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
