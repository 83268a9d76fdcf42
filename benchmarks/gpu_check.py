"""A short check of the GPU path (run on a machine with CUDA): the library runs there, with the
same results as on the CPU, and the automatic precision picks bfloat16 autocast. With two or more
GPUs, `diffusion-course train` also runs under torchrun on all of them (DistributedDataParallel,
NCCL) and resumes there (README, "Scaling up").

    python benchmarks/gpu_check.py          (needs MNIST: see README, "Data")

Prints what it measured and exits non-zero when a check fails.
"""

import json
import shutil
import subprocess
import sys
import time

import torch

from diffusion_course import checkpoints, data, metrics, runs, schedules
from diffusion_course.generate import generate
from diffusion_course.unet import UNet, UNetConfig


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    device = torch.device("cuda")
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    results["autocast_dtype"] = str(runs.pick_autocast_dtype(device))

    # The same model and inputs on CPU and GPU give the same noise prediction (float32).
    torch.manual_seed(0)
    model = UNet(UNetConfig(num_classes=10))
    torch.nn.init.normal_(model.conv_out.weight, std=0.02)
    x, t, c = torch.randn(8, 1, 28, 28), torch.randint(0, 1000, (8,)), torch.randint(0, 10, (8,))
    with torch.no_grad():
        cpu_out = model(x, t, c)
        gpu_out = model.to(device)(x.to(device), t.to(device), c.to(device)).cpu()
    results["cpu_vs_gpu_max_abs_diff"] = float((cpu_out - gpu_out).abs().max())

    # Train on real MNIST on the GPU through the same train() the CLI uses.
    dataset = data.load_dataset("mnist")
    torch.manual_seed(0)
    model = UNet(UNetConfig(num_classes=10)).to(device)
    schedule = schedules.cosine_schedule()
    config = runs.TrainConfig(steps=1500, minutes=None, batch_size=256, progress=False)
    start = time.perf_counter()
    result = runs.train_diffusion(model, dataset, schedule, device=device, config=config, out_dir="/tmp/gpu_run")
    results["train_steps"] = result.step
    results["train_seconds"] = round(time.perf_counter() - start, 1)
    results["train_images_per_second"] = round(result.step * config.batch_size / results["train_seconds"])
    results["loss_first_50"] = sum(result.losses[:50]) / 50
    results["loss_last_50"] = sum(result.losses[-50:]) / 50

    # Sample on the GPU, evaluate on the CPU; then reload the checkpoint and sample again.
    labels = torch.arange(500) % 10
    start = time.perf_counter()
    images = generate(result.ema_model, schedule, num=500, shape=(1, 28, 28), cond=labels, guidance_scale=3.0,
                      sampler="dpm", sampling_steps=20, seed=0, device=device)
    results["sample_500_dpm20_seconds"] = round(time.perf_counter() - start, 2)
    report = metrics.evaluate_samples(images.cpu(), labels)
    results["accuracy"] = report["accuracy"]
    results["frechet"] = round(report["frechet"], 2)
    results["frechet_real_baseline"] = round(report["frechet_real_baseline"], 2)
    reloaded = checkpoints.load_checkpoint("/tmp/gpu_run", device)
    again = generate(reloaded.model, reloaded.schedule, num=500, shape=(1, 28, 28), cond=labels, guidance_scale=3.0,
                     sampler="dpm", sampling_steps=20, seed=0, device=device)
    results["reload_max_abs_diff"] = float((again - images).abs().max())

    torchrun_checks = check_torchrun(results)         # only with two or more GPUs
    print(json.dumps(results, indent=2))
    checks = {
        "CPU and GPU forward agree": results["cpu_vs_gpu_max_abs_diff"] < 1e-3,
        "bfloat16 autocast picked on CUDA": results["autocast_dtype"] == "torch.bfloat16",
        "loss falls": results["loss_last_50"] < 0.5 * results["loss_first_50"],
        "samples recognised": results["accuracy"] > 0.9,
        "checkpoint reload reproduces samples": results["reload_max_abs_diff"] < 1e-4,
        **torchrun_checks,
    }
    for name, ok in checks.items():
        print(("PASS " if ok else "FAIL ") + name)
    return 0 if all(checks.values()) else 1


def check_torchrun(results: dict, steps: int = 300, per_gpu_batch: int = 256) -> dict[str, bool]:
    """With two or more GPUs: the CLI's training under torchrun on all of them, then a resume by
    100 steps. Records the time and images per second (process start-up included)."""
    gpus = torch.cuda.device_count()
    results["gpus"] = gpus
    if gpus < 2:
        return {}
    out = "/tmp/gpu_torchrun_run"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
               "-m", "diffusion_course.cli", "train", "--dataset", "mnist", "--out", out, "--device", "cuda",
               "--batch-size", str(per_gpu_batch * gpus), "--checkpoint-every", "0"]
    start = time.perf_counter()
    first = subprocess.run(command + ["--steps", str(steps)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    resumed = subprocess.run(command + ["--steps", str(steps + 100), "--resume"], capture_output=True, text=True)
    for done in (first, resumed):
        if done.returncode != 0:
            print(f"torchrun failed ({done.returncode}):\n{done.stderr[-3000:]}")
    latest = checkpoints.latest_checkpoint(out)
    results["torchrun_seconds"] = round(seconds, 1)
    results["torchrun_images_per_second"] = round(steps * per_gpu_batch * gpus / seconds)
    results["torchrun_latest_checkpoint"] = None if latest is None else latest.name
    ok = first.returncode == resumed.returncode == 0 and latest is not None and latest.name == f"step_{steps + 100:08d}"
    return {f"torchrun on {gpus} GPUs trains and resumes": ok}


if __name__ == "__main__":
    sys.exit(main())
