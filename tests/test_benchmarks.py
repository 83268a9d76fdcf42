"""The benchmark scripts run on a tiny budget, print a well-formed table and write well-formed JSON
with the keys the issue asks for. They measure nothing here: benchmarks are scripts, and no test
asserts a timing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from benchmarks import common, few_step, notebooks, prompted_digits, recipes, sample_speed, samplers, time_to_quality, train_speed
from diffusion_course import autoencoder, captions, checkpoints, schedules, text

ROOT = Path(__file__).resolve().parent.parent


def table_lines(text: str) -> list[str]:
    """The table at the start of stdout: a header, a dashed rule, then rows."""
    lines = text.splitlines()
    assert len(lines) >= 3, text
    assert set(lines[1].replace(" ", "")) == {"-"}, f"no dashed rule under the header:\n{text}"
    rows = []
    for line in lines[2:]:
        if not line.strip():
            break
        rows.append(line)
    return [lines[0]] + rows


def read_results(folder: Path, name: str) -> dict:
    record = json.loads((folder / f"{name}.json").read_text())
    assert record["benchmark"] == name and record["command"] and record["date"]
    return record


def test_format_table_aligns_columns():
    text = common.format_table([{"a": 1.23456, "bb": "x"}, {"a": 12345.6, "bb": None}], ["a", "bb"])
    assert text.splitlines() == ["a      bb", "-----  --", "1.23   x ", "12346  - "]


def test_train_speed_quick(tmp_path, capsys):
    assert train_speed.main(["--quick", "--out-dir", str(tmp_path), "--only", "channels_last,1 thread"]) == 0
    lines = table_lines(capsys.readouterr().out)
    assert lines[0].split()[:2] == ["variant", "images/s"]
    assert [line.split("  ")[0].strip() for line in lines[1:]] == [
        train_speed.TRAIN_PATH, train_speed.BASELINE, "channels_last", "1 thread"]
    record = read_results(tmp_path, "train_speed")
    assert record["images_per_second"] > 0 and record["speedup_vs_fp32_eager"] > 0
    assert 0 < record["fraction_of_fp32_matmul_peak"] and 0 < record["fraction_of_bf16_matmul_peak"]
    used = "bf16" if record["autocast_dtype"] == "torch.bfloat16" else "fp32"
    assert record["fraction_of_matmul_peak"] == record[f"fraction_of_{used}_matmul_peak"]
    shares = record["time_breakdown"]
    assert shares["convolutions"] > 0.1 and abs(sum(shares.values()) - 1) < 0.01   # convolutions dominate a U-Net
    assert record["model_gflop_per_step"] > 0 and record["peak_resident_memory_mib"] > 0
    assert set(record["variants"]) == {train_speed.TRAIN_PATH, train_speed.BASELINE, "channels_last", "1 thread"}
    assert {"cpu_flags", "torch", "load_average"} <= set(record["machine"])


def test_colour_speed_quick(tmp_path, capsys):
    from benchmarks import colour_speed
    assert colour_speed.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    assert table_lines(capsys.readouterr().out)[0].split()[:3] == ["threads", "precision", "mnist_images_per_second"]
    record = read_results(tmp_path, "colour_speed")
    assert {row["precision"] for row in record["rows"]} == {"float32", "bfloat16"}
    for row in record["rows"]:
        assert row["mnist_images_per_second"] > 0 and row["cifar10_images_per_second"] > 0
        assert row["mnist_per_cifar10"] == pytest.approx(row["mnist_images_per_second"] / row["cifar10_images_per_second"])
    assert {"cpu", "cpu_flags", "load_average"} <= set(record["machine"])


def test_train_speed_rejects_an_unknown_variant(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_speed.main(["--quick", "--out-dir", str(tmp_path), "--only", "warp drive"])
    assert "Unknown variants ['warp drive']" in capsys.readouterr().err


def test_samplers_quick(tmp_path, capsys, data_root):
    assert samplers.main(["--quick", "--out-dir", str(tmp_path), "--num", "10", "--only", "ddim_10,dpm_10"]) == 0
    lines = table_lines(capsys.readouterr().out)
    assert lines[0].split()[:3] == ["sampler", "num_samples", "frechet"]
    assert len(lines) == 3
    assert [line.split()[0] for line in lines[1:]] == ["ddim_10", "dpm_10"]   # each row names its step count
    record = read_results(tmp_path, "samplers")
    for name in ("ddim_10", "dpm_10"):
        entry = record[name]
        assert entry["num_samples"] == 10 and 0 <= entry["accuracy"] <= 1
        assert entry["frechet"] > 0 and entry["frechet_real_baseline"] > 0 and entry["seconds_per_100"] > 0
    assert "ddpm_1000" not in record and record["seconds_100_digits_dpm_10"] > 0


def test_samplers_rejects_an_unknown_sampler(capsys):
    with pytest.raises(SystemExit):
        samplers.main(["--only", "ddim_7"])
    assert "Unknown samplers ['ddim_7']" in capsys.readouterr().err


def test_time_to_quality_quick(tmp_path, capsys, data_root):
    assert time_to_quality.main(["--quick", "--out-dir", str(tmp_path), "--num", "10"]) == 0
    lines = table_lines(capsys.readouterr().out)
    assert lines[0].split()[:3] == ["minutes", "step", "train_seconds"] and len(lines) == 4
    record = read_results(tmp_path, "time_to_quality")
    assert set(record["marks"]) == {"0.02_min", "0.04_min", "32_images"}
    images = record["marks"]["32_images"]       # a second run from scratch, budgeted in images: 2 steps of 16
    assert images["step"] == 2 and images["images_seen"] == 32 and images["minutes"] is None
    assert record["accuracy_at_32_images"] == images["accuracy"]
    assert record["frechet_over_baseline_at_32_images"] == images["frechet_over_baseline"] > 0
    first, second = record["marks"]["0.02_min"], record["marks"]["0.04_min"]
    assert 0 < first["step"] <= second["step"]          # the second piece resumed the first
    assert 0 <= record["accuracy_at_0.04_min"] <= 1 and record["frechet_at_0.04_min"] > 0
    assert record["frechet_real_baseline"] > 0


@pytest.mark.parametrize("text", ["2,1", "0,1", "one"])
def test_time_to_quality_rejects_bad_marks(text):
    with pytest.raises(ValueError, match="--minutes"):
        time_to_quality.parse_marks(text)
    with pytest.raises(ValueError, match="--images must be"):
        time_to_quality.parse_marks(text, "--images")


def test_recipes_quick(tmp_path, capsys, data_root):
    assert recipes.main(["--quick", "--out-dir", str(tmp_path), "--recipe", "plain:min_snr_gamma=none",
                         "--recipe", "default:"]) == 0
    lines = table_lines(capsys.readouterr().out)
    assert lines[0].split()[:3] == ["recipe", "settings", "steps"] and len(lines) == 3
    record = read_results(tmp_path, "recipes")
    plain, default = record["recipes"]["plain"], record["recipes"]["default"]
    assert plain["train_config"]["min_snr_gamma"] is None and default["train_config"]["min_snr_gamma"] == 5.0
    assert plain["steps"] == default["steps"] == 3 and plain["train_config"]["batch_size"] == 16
    assert 0 <= default["accuracy"] <= 1 and default["frechet"] > 0


def test_recipes_with_an_image_budget_and_flow_matching(tmp_path, capsys, data_root):
    """--images gives every recipe the same training images (steps = images / batch size, rounded up);
    objective=flow trains lesson 10's flow matching and samples it with Heun."""
    assert recipes.main(["--quick", "--images", "20000", "--out-dir", str(tmp_path), "--recipe", "flow:objective=flow",
                         "--recipe", "small:batch_size=8"]) == 0
    record = read_results(tmp_path, "recipes")
    flow_row, small = record["recipes"]["flow"], record["recipes"]["small"]
    assert flow_row["objective"] == "flow" and flow_row["train_config"]["min_snr_gamma"] is None
    assert (flow_row["steps"], flow_row["images_seen"]) == (3, 48)      # quick: 48 images at batch 16
    assert (small["steps"], small["images_seen"]) == (6, 48) and small["objective"] == "eps"
    assert 0 <= flow_row["accuracy"] <= 1 and flow_row["frechet"] > 0


@pytest.mark.parametrize("text, message", [("nocolon", "NAME:KEY=VALUE"), ("x:learning_rate=1", "unknown setting"),
                                           ("x:lr=fast", "lr must be a number"), ("x:objective=v", "objective must be one of")])
def test_recipes_rejects_bad_recipes(text, message):
    with pytest.raises(ValueError, match=message):
        recipes.parse_recipe(text)


def test_recipes_parses_numbers_and_none():
    assert recipes.parse_recipe("a:lr=4e-3,warmup_steps=100,min_snr_gamma=none,base_channels=12") == \
        ("a", {"lr": 0.004, "warmup_steps": 100, "min_snr_gamma": None, "base_channels": 12})


def fake_lesson(folder: Path, name: str, source: str) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import os"), nbformat.v4.new_code_cell(source)])
    nbformat.write(nb, folder / name)


def test_notebooks_times_each_lesson_in_each_mode(tmp_path, capsys):
    lessons = tmp_path / "solutions"
    lessons.mkdir()
    fake_lesson(lessons, "00_first.ipynb", "assert os.environ['DIFFUSION_COURSE_QUICK'] in '01'")
    fake_lesson(lessons, "01_quick_only.ipynb", "assert os.environ['DIFFUSION_COURSE_QUICK'] == '1'")
    argv = ["--solutions", str(lessons), "--out-dir", str(tmp_path), "--mode", "both"]
    assert notebooks.main(argv) == 1            # lesson 01 fails in full mode
    lines = table_lines(capsys.readouterr().out)
    assert lines[0].split()[:5] == ["lesson", "quick", "s", "full", "s"] and len(lines) == 3
    record = read_results(tmp_path, "notebooks")
    assert record["lessons"]["00_first"]["quick"]["ok"] and record["lessons"]["00_first"]["full"]["ok"]
    assert record["lessons"]["01_quick_only"]["quick"]["ok"]
    assert not record["lessons"]["01_quick_only"]["full"]["ok"]
    assert "AssertionError" in record["lessons"]["01_quick_only"]["full"]["error"]
    assert record["lessons"]["00_first"]["quick"]["seconds"] > 0 and record["total_seconds"]["full"] > 0


def test_notebooks_rejects_an_unknown_lesson(capsys):
    with pytest.raises(SystemExit):
        notebooks.main(["--lessons", "99"])
    assert "No lesson matches ['99']" in capsys.readouterr().err


def test_a_benchmark_runs_as_a_script(tmp_path):
    """`python benchmarks/NAME.py` works as well as `python -m benchmarks.NAME`."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "notebooks.py"), "--help"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--lessons" in result.stdout and "--out-dir" in result.stdout


def test_sample_speed_quick(tmp_path, capsys):
    assert sample_speed.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    lines = table_lines(capsys.readouterr().out)
    assert lines[0].split()[:2] == ["batch", "layout"] and len(lines) == 6
    record = read_results(tmp_path, "sample_speed")
    assert len(record["seconds_per_100_digits_per_call"]) == 5
    assert all(v > 0 for v in record["seconds_per_100_digits_per_call"].values())
    assert record["cli_seconds"] > 0 and record["seconds_100_digits_dpm_2"] > 0
    assert record["cli_command"].startswith("diffusion-course sample --checkpoint mnist --num 200")


def tiny_text_to_image(folder: Path) -> Path:
    """A randomly initialised latent text-to-image pipeline (tiny autoencoder + tiny TextUNet), saved
    the way scripts/train_prompted_digits.py saves the real one: code paths only, no quality."""
    torch.manual_seed(0)
    ae = checkpoints.save_checkpoint(folder / "autoencoder", autoencoder.Autoencoder(
        autoencoder.AutoencoderConfig(base_channels=8)))
    words = text.TextEncoderConfig(words=tuple(captions.VOCABULARY), dim=16, depth=1, heads=2)
    model = text.TextUNet(text.TextUNetConfig(base_channels=8, channel_mults=(1, 2), text=words, attention_heads=2))
    schedule = schedules.cosine_schedule()
    return checkpoints.save_checkpoint(folder / "unet", model, schedule, info={
        "autoencoder": str(ae), "latent_shape": [4, 8, 16], "schedule": schedule.to_config()})


def test_prompted_digits_quick(tmp_path, capsys, data_root):
    """With the shipped prompted-digits model when the package has it, else a tiny random pipeline."""
    argv = ["--quick", "--out-dir", str(tmp_path), "--num", "8"]
    if "prompted-digits" not in checkpoints.shipped_models():
        argv += ["--checkpoint", str(tiny_text_to_image(tmp_path / "model"))]
    assert prompted_digits.main(argv) == 0
    lines = table_lines(capsys.readouterr().out)
    assert lines[0].split()[:2] == ["measure", "share"] and len(lines) == 7
    record = read_results(tmp_path, "prompted_digits")
    for key in ("adherence_full", "adherence_partial", "real_ceiling"):
        entry = record[key]
        assert entry["num"] == 8 and all(0 <= entry[k] <= 1 for k in ("digits", "colours", "all"))
        low, high = entry["interval_all"]
        assert 0 <= low <= entry["all"] <= high <= 1
    negative = record["negative_prompt"]
    assert negative["num"] == 8 and {"red_share_without", "red_share_with"} <= set(negative)
    for side in ("without", "with", "real"):
        low, high = negative[f"interval_{side}"]
        assert 0 <= low <= negative[f"red_share_{side}"] <= high <= 1
    speed = record["speed"]
    for key in ("latent_train", "pixel_train", "latent_sample", "pixel_sample"):
        assert speed[f"{key}_images_per_s"] > 0
    assert speed["train_ratio"] > 0 and speed["sample_ratio"] > 0 and speed["pixel_shape"] == [3, 32, 64]
    assert record["guidance"] == 3.0 and record["sampler"] == "dpm" and record["steps"] == 5
    assert record["clip_x0"] is None and isinstance(speed["text_encoder_trained"], bool)
    assert {"cpu", "torch_threads"} <= set(record["machine"])


def test_prompted_digits_prompts_name_what_they_should():
    scenes = captions.random_scenes(50, torch.Generator().manual_seed(0))
    for prompt in map(prompted_digits.colourless_prompt, scenes):
        spec = captions.parse_prompt(prompt)
        assert spec.left.colour is None and spec.right.colour is None
        assert spec.left.digit is not None and spec.right.digit is not None
    for prompt in prompted_digits.partial_prompts(scenes, seed=0):
        spec = captions.parse_prompt(prompt)
        assert (spec.left.digit is None) != (spec.right.digit is None)      # one digit named


def test_prompted_digits_intervals():
    assert prompted_digits.wilson_interval(0, 20)[0] == 0 and prompted_digits.wilson_interval(20, 20)[1] == 1
    low, high = prompted_digits.wilson_interval(90, 100)
    assert low < 0.9 < high and abs(low - 0.8256) < 1e-3 and abs(high - 0.9448) < 1e-3   # the tabulated Wilson interval
    low, high = prompted_digits.bootstrap_interval(torch.tensor([0, 1, 2, 1] * 50), 2)
    assert low < 0.5 < high


def test_few_step_quick(tmp_path, capsys, data_root):
    """The issue's keys for the shipped mnist-fast, and network calls that are counted, not assumed:
    DPM-Solver++ with guidance calls the network twice per step (10 steps in quick mode), the
    distilled student once."""
    assert few_step.main(["--quick", "--out-dir", str(tmp_path), "--num", "10", "--steps", "1,2"]) == 0
    lines = table_lines(capsys.readouterr().out)
    assert lines[0].split()[:2] == ["name", "evaluations_per_image"] and len(lines) == 4    # header, 3 rows
    record = read_results(tmp_path, "few_step")
    rows = {row["name"]: row for row in record["rows"]}
    assert rows["mnist dpm 10, w 3"]["evaluations_per_image"] == 20
    assert rows["mnist-fast euler 1"]["evaluations_per_image"] == 1 and rows["mnist-fast euler 2"]["evaluations_per_image"] == 2
    assert record["shipped"] == "mnist-fast euler 2" and record["evaluations_per_image"] == 2
    assert 0 <= record["accuracy"] <= 1 and record["seconds_per_100_images"] > 0 and record["speedup_vs_dpm20_guided"] > 0
