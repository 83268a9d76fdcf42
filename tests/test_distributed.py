"""Distributed training (runs.py under torchrun): two CPU processes with DistributedDataParallel end
with the weights of one process trained on the same global batches, also across a resume; a global
batch that does not split evenly over the processes is a clear error.

This file is also the script torchrun starts: `python -m torch.distributed.run --standalone
--nproc_per_node=2 tests/test_distributed.py DATA RUN_DIR RESULT STEPS` trains (or resumes) the run in
RUN_DIR to STEPS steps, and each rank saves its final weights to RESULT.<rank>.
"""

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffusion_course import checkpoints, runs
from diffusion_course.runs import TrainConfig
from diffusion_course.schedules import cosine_schedule
from diffusion_course.training import diffusion_loss
from diffusion_course.unet import UNet, UNetConfig

STEPS = 3
LOSS = functools.partial(diffusion_loss, schedule=cosine_schedule(), min_snr_gamma=5.0)
INFO = {"dataset": "mnist8", "schedule": cosine_schedule().to_config(), "min_snr_gamma": 5.0}
REPO = Path(__file__).resolve().parent.parent


def train_tiny(images, labels, *, steps, out_dir=None, resume=False, batch_size=8):
    """A tiny conditional U-Net (8 base channels, 2 levels) on 8 x 8 digits, global batch 8,
    with label dropout 0.5 so that the dropout draws matter."""
    torch.manual_seed(0)
    model = UNet(UNetConfig(image_size=8, base_channels=8, channel_mults=(1, 2), num_classes=10))
    with torch.no_grad():       # conv_out starts at zero; redraw it so every layer learns from step 1
        model.conv_out.weight.copy_(0.1 * torch.randn(model.conv_out.weight.shape))
    config = TrainConfig(steps=steps, minutes=None, batch_size=batch_size, warmup_steps=1, label_dropout=0.5,
                         checkpoint_minutes=None, progress=False)
    return runs.train(model, images, LOSS, config=config, labels=labels, out_dir=out_dir, resume=resume, info=INFO)


def assert_weights_close(got: dict, expected: dict) -> None:
    """Equal within 1e-5, except the key bias of the attention layer (the middle third of in_proj_bias):
    adding b to every key adds q.b to all of a query's scores, which softmax ignores, so its gradient
    is zero but for rounding. AdamW divides a gradient by its own size (plus eps = 1e-8), so rounding
    noise of 1e-10 still moves it by up to about lr * 0.01 = 4e-5 per step, differently in one and
    two processes (measured: 3.3e-5 after 3 steps; every other weight within 4e-6)."""
    for name, value in expected.items():
        mine = got[name]
        if name.endswith("attn.in_proj_bias"):
            (query, key, val), (my_query, my_key, my_val) = value.chunk(3), mine.chunk(3)
            torch.testing.assert_close(my_key, key, atol=2e-4, rtol=0, msg=name + " (key part)")
            mine, value = torch.cat([my_query, my_val]), torch.cat([query, val])
        torch.testing.assert_close(mine, value, atol=1e-5, rtol=0, msg=name)


@pytest.fixture(scope="module")
def digits8(mnist_subset):
    """The 64 real MNIST digits, cropped to 24 x 24 and averaged down to 8 x 8 (still in [-1, 1])."""
    return F.avg_pool2d(mnist_subset.images[:, :, 2:26, 2:26], 3), mnist_subset.labels


def torchrun(tmp_path: Path, steps: int, timeout: float = 90) -> None:
    """Run this file's main() in two CPU processes started by torchrun (a whole process group is
    killed on timeout, so no worker is left behind)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(Path(__file__).resolve()), str(tmp_path / "data.pt"), str(tmp_path / "run"),
               str(tmp_path / "result"), str(steps)]
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    assert process.returncode == 0, f"torchrun failed ({process.returncode}):\n{output[-4000:]}"
    print(f"torchrun, 2 processes, {steps} steps: {time.perf_counter() - start:.1f} s")


def test_two_processes_train_like_one_with_the_same_global_batch(digits8, tmp_path):
    """2 steps, then a second torchrun resumes the run to 3: the weights equal those of one process."""
    torch.save(digits8, tmp_path / "data.pt")
    torchrun(tmp_path, steps=2)
    torchrun(tmp_path, steps=STEPS)

    one = train_tiny(*digits8, steps=STEPS)
    ranks = [torch.load(tmp_path / f"result.{rank}") for rank in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == STEPS
    for name in one.model.state_dict():
        assert torch.equal(ranks[0]["model"][name], ranks[1]["model"][name]), f"the ranks disagree on {name}"
    assert_weights_close(ranks[0]["model"], one.model.state_dict())
    assert_weights_close(ranks[0]["ema"], one.ema_model.state_dict())
    # The resumed part's losses are those of the whole batch (the mean over both processes).
    torch.testing.assert_close(ranks[0]["losses"], one.losses[2:], atol=1e-5, rtol=0)
    # Rank 0 alone wrote: the checkpoints of step 2 and 3, and no lock is left behind.
    assert [p.name for p in checkpoints.run_checkpoints(tmp_path / "run")] == ["step_00000002", "step_00000003"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["step_00000002", "step_00000003"]


def test_a_global_batch_that_does_not_split_evenly_is_a_clear_error(digits8, monkeypatch):
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="batch_size is the global batch.*7 does not divide by 2.*e.g. 8"):
        train_tiny(*digits8, steps=1, batch_size=7)


def test_without_torchrun_there_is_one_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert runs.launched_world_size() == 1 and runs.is_main_process()
    assert runs.process_device("cpu") == torch.device("cpu")


def main(data_file: str, run_dir: str, result_file: str, steps: str) -> None:
    """What each process torchrun starts does: train (or resume) the run to `steps`, then save."""
    images, labels = torch.load(data_file)
    result = train_tiny(images, labels, steps=int(steps), out_dir=run_dir, resume=Path(run_dir).exists())
    torch.save({"model": result.model.state_dict(), "ema": result.ema_model.state_dict(), "step": result.step,
                "losses": result.losses}, f"{result_file}.{os.environ['RANK']}")


if __name__ == "__main__":
    main(*sys.argv[1:])
