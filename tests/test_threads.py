"""threads.py: the override wins and is checked, a measured choice stays within the CPUs, the
learner gets one line saying why; and the thread benchmark runs and writes well-formed JSON."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import threads as threads_benchmark
from diffusion_course import threads


@pytest.fixture
def keep_threads(monkeypatch):
    """Restore torch's thread count after a test that sets it; no override unless the test sets one."""
    monkeypatch.delenv(threads.ENV_VARIABLE, raising=False)
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def test_the_override_wins_without_measuring(keep_threads, monkeypatch, capsys):
    monkeypatch.setenv(threads.ENV_VARIABLE, "3")
    monkeypatch.setattr(threads, "measure", lambda *a, **k: pytest.fail("measured despite the override"))
    assert threads.pick_threads() == 3
    assert threads.use_best_threads() == 3 and torch.get_num_threads() == 3
    assert capsys.readouterr().out == f"Threads: {threads.ENV_VARIABLE}=3: using 3 threads.\n"


@pytest.mark.parametrize("text", ["0", "-1", "two", "1.5", "2 threads"])
def test_a_bad_override_is_refused_clearly(keep_threads, monkeypatch, text):
    monkeypatch.setenv(threads.ENV_VARIABLE, text)
    with pytest.raises(ValueError, match=rf"{threads.ENV_VARIABLE}='{text}': expected a positive whole number"):
        threads.pick_threads()


def test_an_empty_override_means_measure(keep_threads, monkeypatch):
    monkeypatch.setenv(threads.ENV_VARIABLE, "  ")
    assert threads.threads_from_env() is None


def test_a_measured_choice_is_within_the_cpus(keep_threads):
    cpus = threads.available_cpus()
    assert 1 <= threads.pick_threads(seconds=0.02) <= cpus
    assert threads.pick_threads(1, seconds=0.02) == 1
    assert threads.pick_threads(cpus + 5, seconds=0.02) <= cpus
    with pytest.raises(ValueError, match="max_threads=0"):
        threads.pick_threads(0)


@pytest.mark.parametrize("max_threads, expected", [(1, [1]), (2, [1, 2]), (3, [1, 2, 3]), (6, [1, 2, 4, 6]),
                                                   (16, [1, 2, 4, 8, 16])])
def test_candidates(max_threads, expected):
    assert threads.candidates(max_threads) == expected


@pytest.mark.parametrize("times, chosen, why", [
    ({1: 1.0, 2: 1.6}, 1, "using 1 thread (1.6x faster than 2 right now)"),   # a busy core: fewer threads
    ({1: 1.4, 2: 1.0}, 2, "using 2 threads (1.4x faster than 1 right now)"),  # idle: every core
    ({1: 1.05, 2: 1.0}, 1, "using 1 thread (as fast as 2 right now, and fewer)"),  # a tie: fewer
    ({1: 2.0, 2: 1.0, 4: 1.3}, 2, "using 2 threads (1.3x faster than 4 right now)"),
])
def test_the_choice_and_its_reason(keep_threads, monkeypatch, capsys, times, chosen, why):
    monkeypatch.setattr(threads, "available_cpus", lambda: max(times))
    monkeypatch.setattr(threads, "measure", lambda counts, seconds: {c: times[c] for c in counts})
    assert threads.use_best_threads() == chosen and torch.get_num_threads() == chosen
    line = capsys.readouterr().out
    assert line.startswith(f"Threads: {max(times)} CPUs, load average ") and line.endswith(f"{why}.\n")
    assert line.count("\n") == 1
    assert threads.use_best_threads(verbose=False) == chosen and capsys.readouterr().out == ""


def test_measure_times_each_count_and_restores_the_threads(keep_threads):
    torch.set_num_threads(1)
    times = threads.measure([1, 2], seconds=0.02, rounds=1)
    assert set(times) == {1, 2} and all(0 < t < 1 for t in times.values())
    assert torch.get_num_threads() == 1


def test_threads_benchmark_quick(keep_threads, tmp_path, capsys, data_root):
    assert threads_benchmark.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["workload", "threads", "idle", "s", "loaded", "s", "loaded/idle", "loaded/best", "idle"]
    assert [line.split()[:2] for line in lines[2:6]] == [["train_step", "default"], ["train_step", "chosen"],
                                                         ["sample_batch", "default"], ["sample_batch", "chosen"]]
    record = json.loads((tmp_path / "threads.json").read_text())
    assert record["benchmark"] == "threads" and record["command"] and record["date"] and record["quick"]
    for name in ("train_step", "sample_batch"):
        entry = record["workloads"][name]
        for key in ("idle_default_s", "idle_chosen_s", "loaded_default_s", "loaded_chosen_s"):
            assert entry[key] > 0
        assert entry["ratio_loaded_idle_chosen"] == pytest.approx(
            entry["loaded_chosen_s"] / entry["idle_chosen_s"], abs=0.01)
        assert entry["ratio_loaded_chosen_vs_idle_best"] == pytest.approx(
            entry["loaded_chosen_s"] / min(entry["idle_default_s"], entry["idle_chosen_s"]), abs=0.01)
        assert entry["target_met"] == (entry["ratio_loaded_chosen_vs_idle_best"] <= 1.6)
    for phase in ("idle", "loaded"):
        assert [1 <= c["threads"] <= record["available_cpus"] for c in record["choices"][phase]] == [True]
    assert record["target_ratio"] == 1.6 and {"cpu", "load_average"} <= set(record["machine"])
