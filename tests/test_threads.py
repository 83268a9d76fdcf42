"""threads.py: the override wins and is checked, a measured choice stays within the CPUs, the
learner gets one line saying why, batches are cut into parts that run side by side (map_parts);
and the thread benchmark runs and writes well-formed JSON."""

from __future__ import annotations

import json
import threading

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


@pytest.fixture
def keep_workers():
    """Restore the batch layout after a test that sets it."""
    saved = threads.workers(), threads._Layout.threads_each
    yield
    threads.set_workers(*saved)


def test_the_override_wins_without_measuring(keep_threads, monkeypatch, capsys):
    monkeypatch.setenv(threads.ENV_VARIABLE, "3")
    monkeypatch.setattr(threads, "measure", lambda *a, **k: pytest.fail("measured despite the override"))
    assert threads.pick_threads() == 3
    assert threads.use_best_threads() == 3 and torch.get_num_threads() == 3
    assert capsys.readouterr().out == f"Threads: {threads.ENV_VARIABLE}=3: using 3 threads, batches not split.\n"


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
def test_the_choice_and_its_reason(keep_threads, keep_workers, monkeypatch, capsys, times, chosen, why):
    cpus = max(times)
    monkeypatch.setattr(threads, "available_cpus", lambda: cpus)
    monkeypatch.setattr(threads, "measure", lambda counts, seconds: {c: times[c] for c in counts})
    assert threads.use_best_threads() == chosen and torch.get_num_threads() == chosen
    line = capsys.readouterr().out
    batches = f"batches cut into {cpus} parts side by side (4 when training), 1 thread each"
    assert line.startswith(f"Threads: {cpus} CPUs, load average ") and line.endswith(f"{why}; {batches}.\n")
    assert line.count("\n") == 1
    assert threads.workers() == cpus and threads.training_workers() == 4 and threads.threads_each() == 1
    assert threads.use_best_threads(verbose=False) == chosen and capsys.readouterr().out == ""


@pytest.mark.parametrize("cpus, workers, each, training", [(1, 1, 1, 1), (2, 2, 1, 4), (3, 3, 1, 4), (4, 4, 1, 4),
                                                           (8, 4, 2, 4), (16, 4, 4, 4)])
def test_the_batch_layout_for_each_machine_size(keep_threads, keep_workers, monkeypatch, cpus, workers, each,
                                                training):
    monkeypatch.setattr(threads, "available_cpus", lambda: cpus)
    monkeypatch.setattr(threads, "measure", lambda counts, seconds: {c: 1.0 / c for c in counts})
    threads.use_best_threads(verbose=False)
    assert (threads.workers(), threads.threads_each(), threads.training_workers()) == (workers, each, training)


def test_the_override_does_not_split_batches(keep_threads, keep_workers, monkeypatch):
    threads.set_workers(2)
    monkeypatch.setenv(threads.ENV_VARIABLE, "2")
    assert threads.choose_threads() == (2, 1, 1, f"{threads.ENV_VARIABLE}=2: using 2 threads, batches not split")
    threads.use_best_threads(verbose=False)
    assert threads.workers() == 1 and threads.training_workers() == 1


@pytest.mark.parametrize("size, count, parts", [
    (16, 2, [(0, 8), (8, 16)]),
    (10, 3, [(0, 5), (5, 10)]),            # at least MIN_PART = 4 images a part: 2 parts, not 3
    (12, 3, [(0, 4), (4, 8), (8, 12)]),
    (13, 3, [(0, 4), (4, 9), (9, 13)]),    # nearly equal, consecutive, all images once
    (7, 2, [(0, 7)]),                      # too small to cut
    (100, 1, [(0, 100)]),
])
def test_batch_parts(size, count, parts):
    assert threads.batch_parts(size, count) == [slice(a, b) for a, b in parts]


def test_set_workers_checks_and_returns_the_previous(keep_workers):
    threads.set_workers(1)
    assert threads.set_workers(3) == 1 and threads.workers() == 3 and len(threads.batch_parts(12)) == 3
    assert threads.training_workers() == 4                  # one thread each: twice as many (at most 4) to train
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="count must be a whole number of at least 1"):
            threads.set_workers(bad)


def test_map_parts_runs_the_parts_side_by_side_with_their_threads_and_the_callers_grad_mode(keep_threads):
    torch.set_num_threads(2)
    together = threading.Barrier(3, timeout=30)     # passes only if all three parts run at once

    def part(index):
        together.wait()
        return index, threading.current_thread() is threading.main_thread(), torch.get_num_threads(), \
            torch.is_grad_enabled()
    with torch.no_grad():
        results = threads.map_parts(part, [0, 1, 2], threads_each=1)
    assert results == [(0, False, 1, False), (1, False, 1, False), (2, False, 1, False)]


def test_torch_threads_sets_and_restores(keep_threads):
    torch.set_num_threads(2)
    with threads.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_a_single_part_runs_here_as_it_is(keep_threads):
    torch.set_num_threads(2)
    seen = threads.map_parts(lambda p: (p, threading.current_thread() is threading.main_thread(),
                                        torch.get_num_threads()), [7], threads_each=1)
    assert seen == [(7, True, 2)] and torch.get_num_threads() == 2


def test_parts_of_a_call_from_inside_a_part_run_one_after_the_other(keep_threads):
    inner = lambda outer: threads.map_parts(lambda p: (outer, p, threading.current_thread().name), [0, 1],
                                            threads_each=1)
    results = threads.map_parts(inner, ["a", "b"], threads_each=1)
    assert [[(o, p) for o, p, _ in result] for result in results] == [[("a", 0), ("a", 1)], [("b", 0), ("b", 1)]]
    assert all(len({name for _, _, name in result}) == 1 for result in results)   # in the part's own thread


def test_a_failing_part_cancels_the_others_and_its_error_is_raised(keep_threads):
    torch.set_num_threads(2)
    cancel, finished = threading.Event(), []

    def part(index):
        if index == 1:
            raise ValueError("part 1 is broken")
        cancel.wait(timeout=30)                     # the others stop when told to
        finished.append(index)
        return index
    with pytest.raises(ValueError, match="part 1 is broken"):
        threads.map_parts(part, [0, 1, 2], threads_each=1, cancel=cancel)
    assert cancel.is_set() and sorted(finished) == [0, 2]    # told to stop, and waited for
    assert torch.get_num_threads() == 2


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
        assert [1 <= c["workers"] <= record["available_cpus"] for c in record["choices"][phase]] == [True]
    assert record["target_ratio"] == 1.6 and {"cpu", "load_average"} <= set(record["machine"])
