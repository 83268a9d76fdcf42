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

from benchmarks import common, notebooks, recipes, sample_speed, samplers, time_to_quality, train_speed

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
    assert record["model_gflop_per_step"] > 0 and record["peak_resident_memory_mib"] > 0
    assert set(record["variants"]) == {train_speed.TRAIN_PATH, train_speed.BASELINE, "channels_last", "1 thread"}
    assert {"cpu_flags", "torch", "load_average"} <= set(record["machine"])


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
    assert lines[0].split()[:3] == ["minutes", "step", "train_seconds"] and len(lines) == 3
    record = read_results(tmp_path, "time_to_quality")
    assert set(record["marks"]) == {"0.02_min", "0.04_min"}
    first, second = record["marks"]["0.02_min"], record["marks"]["0.04_min"]
    assert 0 < first["step"] <= second["step"]          # the second piece resumed the first
    assert 0 <= record["accuracy_at_0.04_min"] <= 1 and record["frechet_at_0.04_min"] > 0
    assert record["frechet_real_baseline"] > 0


@pytest.mark.parametrize("text", ["2,1", "0,1", "one"])
def test_time_to_quality_rejects_bad_marks(text):
    with pytest.raises(ValueError, match="--minutes"):
        time_to_quality.parse_marks(text)


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


@pytest.mark.parametrize("text, message", [("nocolon", "NAME:KEY=VALUE"), ("x:learning_rate=1", "unknown setting"),
                                           ("x:lr=fast", "lr must be a number")])
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
