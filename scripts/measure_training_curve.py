"""Score every checkpoint of a folder the way `sample` + `evaluate` score the shipped model: how
quality grew during a training run (README, "The CIFAR-10 model").

    python scripts/measure_training_curve.py runs/cifar10-curve [--num 500] [--guidance 3]

The folder holds checkpoint folders (step_NNNNNNNN, e.g. copies kept while a run pruned its own).
Each is sampled with DPM-Solver++ 20 steps, labels spread over the classes, seed 0, and scored by
metrics.evaluate_samples on its dataset. One line of JSON per checkpoint is printed and appended to
FOLDER/curve.jsonl; checkpoints already scored there (same --num and --guidance) are skipped, so an
interrupted run continues.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from diffusion_course import checkpoints, generate, metrics  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--guidance", type=float, default=3.0)
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    record_file = folder / "curve.jsonl"
    done = set()
    if record_file.exists():
        done = {(r["step"], r["num"], r["guidance"]) for r in map(json.loads, record_file.read_text().splitlines())}
    for path in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_")):
        checkpoint = checkpoints.load_checkpoint(path)
        info = checkpoint.info
        if (info["step"], args.num, args.guidance) in done:
            continue
        dataset = info.get("dataset") or "mnist"
        labels = torch.arange(args.num) % checkpoint.model.null_class
        start = time.perf_counter()
        images = generate.generate(checkpoint.model, checkpoint.schedule, num=args.num, shape=generate.image_shape(checkpoint.model),
                                   cond=labels, guidance_scale=args.guidance, sampler="dpm", sampling_steps=20, seed=0)
        report = metrics.evaluate_samples(images, labels, dataset=dataset)
        record = {"step": info["step"], "num": args.num, "guidance": args.guidance,
                  "images_seen": info["step"] * info["train_config"]["batch_size"], "training_hours": info["seconds"] / 3600,
                  **{key: report[key] for key in ("accuracy", "frechet", "frechet_real_baseline", "kid", "precision", "recall")},
                  "sampling_seconds": time.perf_counter() - start}
        print(json.dumps(record), flush=True)
        with record_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
