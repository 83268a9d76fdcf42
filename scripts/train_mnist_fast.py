"""Train the course's few-step MNIST model, `mnist-fast` (lesson 11), one resumable stage at a time:

    python scripts/train_mnist_fast.py teacher --minutes 30      # a flow-matching U-Net (lesson 10)
    python scripts/train_mnist_fast.py pairs --num 20000         # the teacher's guided ODE: noise -> digit
    python scripts/train_mnist_fast.py student --minutes 20      # reflow on those pairs, guidance folded in
    python scripts/train_mnist_fast.py ship --stage teacher      # -> diffusion_course/pretrained/mnist-flow
    python scripts/train_mnist_fast.py ship --stage student      # -> diffusion_course/pretrained/mnist-fast

The teacher is lesson 10's recipe (class-conditional flow matching with label dropout, so that it
can be guided). `pairs` integrates the teacher's guided ODE (Heun, --teacher-steps steps, guidance
--guidance) from stored noise to a digit for --num labels spread over the classes, in chunks that
survive an interruption (start the same command once per free core: each process claims the next
chunk nobody has made). `student` starts from the teacher's weights and learns the straight line
between each noise and the digit the teacher made from it (rectified flow's "reflow", Liu et al.
2022), with the label as its only condition: guidance is folded into the student, so each of its
steps is one network call. Runs live in runs/mnist-fast/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion_course import checkpoints, data, distill, runs  # noqa: E402
from diffusion_course.threads import use_best_threads  # noqa: E402
from diffusion_course.unet import UNet, UNetConfig  # noqa: E402

RUNS = Path("runs/mnist-fast")
SHIPPED = {"teacher": "mnist-flow", "student": "mnist-fast"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["teacher", "pairs", "student", "ship"])
    parser.add_argument("--minutes", type=float, default=20.0, help="training time budget (total, across resumes)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, help="default: teacher 4e-3, student 1e-3")
    parser.add_argument("--base-channels", type=int, default=UNetConfig.base_channels, help="teacher's width")
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--num", type=int, default=20_000, help="pairs: how many (noise, digit) pairs in all")
    parser.add_argument("--guidance", type=float, default=distill.DEFAULT_TEACHER_GUIDANCE, help="pairs: the teacher's w")
    parser.add_argument("--teacher-steps", type=int, default=distill.DEFAULT_TEACHER_STEPS, help="pairs: Heun steps")
    parser.add_argument("--chunk", type=int, default=1000, help="pairs: saved every this many")
    parser.add_argument("--run", help="student/ship: the run folder's name under runs/mnist-fast (default: the stage's)")
    parser.add_argument("--stage", dest="ship_stage", choices=sorted(SHIPPED), help="ship: which model")
    parser.add_argument("--fresh", action="store_true", help="start the stage over instead of resuming")
    args = parser.parse_args(argv)
    use_best_threads()
    start = time.perf_counter()
    if args.stage == "ship":
        return ship(args.ship_stage, args.run or args.ship_stage)
    if args.stage == "pairs":
        return make_pairs(args)
    result = train_teacher(args) if args.stage == "teacher" else train_student(args)
    print(f"{args.stage}: {result.step} steps, {result.seconds / 60:.1f} training minutes in total "
          f"({time.perf_counter() - start:.0f} s this run), last loss {result.losses[-1] if result.losses else float('nan'):.4f}")
    return 0


def _config(args, lr: float, label_dropout: float) -> runs.TrainConfig:
    return runs.TrainConfig(minutes=args.minutes, batch_size=args.batch_size, lr=args.lr or lr,
                            label_dropout=label_dropout, checkpoint_minutes=2.0, keep_checkpoints=2,
                            precision=args.precision)


def train_teacher(args) -> runs.TrainResult:
    mnist = data.load_dataset("mnist")
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=args.base_channels, num_classes=10))
    return runs.train_diffusion(model, mnist, None, objective="flow", config=_config(args, 4e-3, 0.1),
                                out_dir=RUNS / "teacher", resume=not args.fresh)


def make_pairs(args) -> int:
    """Chunks of (noise, teacher's digit, label) in runs/mnist-fast/pairs/, each written once."""
    teacher = checkpoints.load_checkpoint(RUNS / "teacher").model
    teacher.to(memory_format=torch.channels_last)       # oneDNN's fastest layout on a CPU (generate does the same)
    folder = RUNS / "pairs"
    folder.mkdir(parents=True, exist_ok=True)
    labels = torch.arange(args.num) % 10
    for start in range(0, args.num, args.chunk):
        path = folder / f"pairs_{start:06d}.pt"
        if (path.exists() and not args.fresh) or not _claim(path.with_suffix(".claim")):
            continue
        begun = time.perf_counter()
        generator = torch.Generator().manual_seed(1_000_003 * (start + 1))
        noise = torch.randn(min(args.chunk, args.num - start), 1, 28, 28, generator=generator)
        part = labels[start:start + len(noise)]
        x0 = distill.teacher_digits(teacher, noise, part, guidance_scale=args.guidance, steps=args.teacher_steps)
        tmp = path.with_suffix(".tmp")
        torch.save({"noise": noise, "x0": x0, "labels": part, "guidance": args.guidance,
                    "teacher_steps": args.teacher_steps}, tmp)
        tmp.replace(path)
        path.with_suffix(".claim").unlink()
        print(f"{path.name}: {len(noise)} pairs in {time.perf_counter() - begun:.0f} s", flush=True)
    return 0


def _claim(claim: Path) -> bool:
    """True if this process may make the chunk: it created `claim` first. Several processes (one per
    core) can then share the chunks; a claim left by a crash is taken over after 30 minutes."""
    if claim.exists() and time.time() - claim.stat().st_mtime > 1800:
        claim.unlink(missing_ok=True)
    try:
        claim.open("x").close()
        return True
    except FileExistsError:
        return False


def load_pairs() -> dict:
    chunks = [torch.load(p) for p in sorted((RUNS / "pairs").glob("pairs_*.pt"))]
    if not chunks:
        raise SystemExit("no pairs yet: run the pairs stage first")
    return {key: torch.cat([c[key] for c in chunks]) for key in ("noise", "x0", "labels")} | {
        "guidance": chunks[0]["guidance"], "teacher_steps": chunks[0]["teacher_steps"]}


def train_student(args) -> runs.TrainResult:
    pairs = load_pairs()
    student = checkpoints.load_checkpoint(RUNS / "teacher").model.train()
    info = {"dataset": "mnist", "objective": "flow", "distilled": "reflow", "teacher_guidance": pairs["guidance"],
            "teacher_steps": pairs["teacher_steps"], "pairs": len(pairs["labels"])}
    return runs.train(student, torch.cat([pairs["x0"], pairs["noise"]], dim=1), distill.reflow_loss,
                      labels=pairs["labels"], config=_config(args, 1e-3, 0.0), out_dir=RUNS / (args.run or "student"),
                      resume=not args.fresh, info=info)


def ship(stage: str | None, run: str | None) -> int:
    """A run's EMA weights into the package (no optimizer state), with the sampling to use by default:
    the teacher's is how it made the pairs, the student's the few Euler steps it was distilled for."""
    if stage is None:
        raise SystemExit("ship needs --stage teacher or student")
    checkpoint = checkpoints.load_checkpoint(RUNS / run)
    info = {k: v for k, v in checkpoint.info.items() if k not in checkpoints.RESERVED_KEYS}
    info["sampling"] = distill.FAST_SAMPLING if stage == "student" else {
        "sampler": "heun", "steps": distill.DEFAULT_TEACHER_STEPS, "guidance": distill.DEFAULT_TEACHER_GUIDANCE}
    out = checkpoints.PRETRAINED_DIR / SHIPPED[stage]
    checkpoints.save_checkpoint(out, checkpoint.model, None, step=checkpoint.info.get("step", 0), info=info)
    print(f"shipped {RUNS / run} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
