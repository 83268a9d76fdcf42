"""scripts/train_mnist_fast.py, every stage on a tiny budget: the teacher trains by flow matching,
`pairs` stores the guided teacher's endpoints beside their noise (in claimed chunks, resumably), the student
trains by reflow from the teacher's weights, and `ship` writes loadable checkpoints with their own
sampling defaults. Code paths only; the shipped models' quality is measured by benchmarks/few_step.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from diffusion_course import checkpoints, distill, generate

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_mnist_fast.py"


def load_script():
    spec = importlib.util.spec_from_file_location("train_mnist_fast", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_stage_runs_and_ships(tmp_path, monkeypatch, data_root, capsys):
    script = load_script()
    monkeypatch.setattr(script, "RUNS", tmp_path / "runs")
    (tmp_path / "pretrained").mkdir()
    monkeypatch.setattr(checkpoints, "PRETRAINED_DIR", tmp_path / "pretrained")
    tiny = ["--batch-size", "8", "--base-channels", "4"]
    assert script.main(["teacher", "--minutes", "0.01", *tiny]) == 0
    (tmp_path / "runs" / "pairs").mkdir()
    (tmp_path / "runs" / "pairs" / "pairs_000010.claim").touch()     # another process is making this chunk
    assert script.main(["pairs", "--num", "30", "--chunk", "10", "--teacher-steps", "1"]) == 0
    assert not (tmp_path / "runs" / "pairs" / "pairs_000010.pt").exists()
    (tmp_path / "runs" / "pairs" / "pairs_000010.claim").unlink()     # ... that process died: run again
    assert script.main(["pairs", "--num", "30", "--chunk", "10", "--teacher-steps", "1"]) == 0
    chunks = sorted((tmp_path / "runs" / "pairs").glob("pairs_*.pt"))
    assert [c.name for c in chunks] == ["pairs_000000.pt", "pairs_000010.pt", "pairs_000020.pt"]
    pairs = script.load_pairs()
    assert pairs["x0"].shape == pairs["noise"].shape == (30, 1, 28, 28) and pairs["labels"].tolist() == [i % 10 for i in range(30)]
    teacher = checkpoints.load_checkpoint(tmp_path / "runs" / "teacher").model
    first = torch.load(chunks[0])
    torch.testing.assert_close(first["x0"], distill.teacher_digits(teacher, first["noise"], first["labels"],
                                                                   guidance_scale=first["guidance"], steps=1))
    assert script.main(["student", "--minutes", "0.01", "--batch-size", "8"]) == 0
    assert script.main(["ship", "--stage", "teacher"]) == 0 and script.main(["ship", "--stage", "student"]) == 0
    fast = generate.load_pipeline(tmp_path / "pretrained" / "mnist-fast")
    assert fast.schedule is None and fast.sampling == distill.FAST_SAMPLING
    assert fast.info["distilled"] == "reflow" and fast.info["pairs"] == 30
    assert generate.load_pipeline(tmp_path / "pretrained" / "mnist-flow").sampling["sampler"] == "heun"
