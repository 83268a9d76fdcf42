"""Is splitting a batch between threads faster than PyTorch's own threads, idle and under load?

    python scripts/measure_batch_split.py        (about 2 minutes on 2 cores)

An experiment for issue 17, not a feature: the course's default class-conditional U-Net, one
AdamW training step on 64 MNIST digits and one 50-digit DPM-Solver++ 20 batch of the shipped
model, each timed (median of 6 steps / 2 batches) three ways: 1 thread; 2 threads inside each
operation (PyTorch's default); and the batch cut in two halves run by two Python threads with 1
thread each (for training each half's loss is backpropagated in its own thread; the gradients
add up to the whole batch's). Two rounds, each idle and then beside a busy process started here.
"""

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402  (median_seconds: the median after one warm-up call)
from diffusion_course import checkpoints, data, sampling, schedules  # noqa: E402
from diffusion_course.unet import UNet, UNetConfig  # noqa: E402

SPIN = "x = 1\nwhile True:\n    x = (x * 1103515245 + 12345) % 2147483648\n"
POOL = ThreadPoolExecutor(2)


def training(batch: int = 64):
    mnist = data.load_dataset("mnist", True)
    x0, labels = mnist.images[:batch].clone(), mnist.labels[:batch].clone()
    torch.manual_seed(0)
    model = UNet(UNetConfig(num_classes=10)).train()
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    schedule = schedules.cosine_schedule()

    def loss_of(part, t, noise):
        x_t = schedules.q_sample(x0[part], t[part], schedule, noise[part])
        return ((model(x_t, t[part], labels[part]) - noise[part]) ** 2).mean()

    def step(split: bool) -> None:
        t, noise = torch.randint(0, schedule.num_steps, (batch,)), torch.randn_like(x0)
        optimizer.zero_grad(set_to_none=True)
        if split:
            halves = (slice(0, batch // 2), slice(batch // 2, batch))
            list(POOL.map(lambda part: (loss_of(part, t, noise) / 2).backward(), halves))
        else:
            loss_of(slice(None), t, noise).backward()
        optimizer.step()
    return step


class Halves(torch.nn.Module):
    """model(x, t, cond) on the two halves of the batch, in two threads."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, cond=None):
        halves = (slice(0, len(x) // 2), slice(len(x) // 2, len(x)))
        return torch.cat(list(POOL.map(lambda p: self.model(x[p], t[p] if t.ndim else t, cond[p]), halves)))


def sampling_batch(num: int = 50):
    checkpoint = checkpoints.load_checkpoint("mnist")
    model, schedule = checkpoint.model.eval(), checkpoint.schedule
    x_T, labels = torch.randn(num, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.arange(num) % 10
    grid = sampling.timestep_grid("dpm", schedule, 20)

    def batch(split: bool) -> None:
        with torch.no_grad():
            sampling.dpm_solver_sample(Halves(model) if split else model, x_T, schedule, grid, cond=labels)
    return batch


def main() -> None:
    train, sample = training(), sampling_batch()
    ways = [("1 thread", 1, False), ("2 threads", 2, False), ("2 halves x 1 thread", 1, True)]
    for phase in ("idle", "loaded", "idle", "loaded"):
        busy = subprocess.Popen([sys.executable, "-c", SPIN]) if phase == "loaded" else None
        time.sleep(1 if busy else 0)
        cells = []
        for workload, action, repeats in (("train step", train, 6), ("sample batch", sample, 2)):
            for name, threads, split in ways:
                torch.set_num_threads(threads)
                cells.append(f"{workload}, {name}: {common.median_seconds(lambda: action(split), repeats):.3f} s")
        if busy:
            busy.terminate()
            busy.wait()
        print(f"{phase}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
