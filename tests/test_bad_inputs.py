"""scripts/bad_inputs.py (issue 12's census of bad inputs): its classifier on synthetic outcomes,
and a handful of cheap cases run against this repository, each of which must end in a clear error."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bad_inputs", ROOT / "scripts" / "bad_inputs.py")
bad_inputs = importlib.util.module_from_spec(spec)
sys.modules["bad_inputs"] = bad_inputs
spec.loader.exec_module(bad_inputs)
Observed, classify = bad_inputs.Observed, bad_inputs.classify

TRACEBACK = 'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\nRuntimeError: boom\n'


def test_exit_2_with_an_error_line_is_a_clear_error():
    obs = Observed("cli", rc=2, stderr="error: --lr must be a finite number > 0, got nan.\n")
    assert classify(obs, "error") == ("clear error", "error: --lr must be a finite number > 0, got nan.")
    argparse_style = "usage: diffusion-course train [-h]\ndiffusion-course train: error: argument --steps: bad\n"
    assert classify(Observed("cli", rc=2, stderr=argparse_style), "error")[0] == "clear error"


def test_a_traceback_or_exit_1_is_a_traceback():
    assert classify(Observed("cli", rc=1, stderr=TRACEBACK), "error") == ("traceback", "RuntimeError: boom")
    assert classify(Observed("cli", rc=2, stderr="error: x\n" + TRACEBACK), "error")[0] == "traceback"
    assert classify(Observed("cli", rc=1, stderr="something failed\n"), "error")[0] == "traceback"
    assert classify(Observed("cli", rc=2, stderr="no error line\n"), "error")[0] == "traceback"


def test_exit_0_on_a_bad_input_is_silent_wrong_and_on_a_control_correct():
    obs = Observed("cli", rc=0, stdout="wrote 2 samples\n")
    assert classify(obs, "error") == ("silent wrong", "exit 0 on a bad input: wrote 2 samples")
    assert classify(obs, "ok")[0] == "correct"
    assert classify(Observed("cli", rc=None, timed_out=True, seconds=45), "error")[0] == "silent wrong"


def test_lost_data_comes_first_whatever_the_exit_status(tmp_path):
    notes = tmp_path / "run" / "step_00000002_best" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("mine")
    kept = tmp_path / "kept.txt"
    kept.write_text("kept")
    before = bad_inputs.snapshot([tmp_path / "run", kept])
    notes.unlink()
    lost = bad_inputs.changed(before, tmp_path)
    assert lost == [os.path.join("run", "step_00000002_best", "notes.txt") + " (gone)"]
    for rc, stderr in [(0, ""), (2, "error: refused\n"), (1, TRACEBACK)]:
        assert classify(Observed("cli", rc=rc, stderr=stderr, lost=lost), "error")[0] == "data lost"
    assert classify(Observed("cli", rc=2, stderr="error: x\n", work_lost="failed after training"), "error")[0] \
        == "data lost"


def test_snippet_outcomes():
    def snippet(marker, rc=0):
        return Observed("python", rc=rc, marker=marker)
    assert classify(snippet({"kind": "exception", "type": "ValueError", "message": "eta must be >= 0"}, 1),
                    "error") == ("clear error", "ValueError: eta must be >= 0")
    assert classify(snippet({"kind": "exception", "type": "TypeError", "message": "bad"}, 1), "error")[0] == "traceback"
    assert classify(snippet({"kind": "exception", "type": "ValueError", "message": ""}, 1), "error")[0] == "traceback"
    missing = classify(snippet({"kind": "exception", "type": "MissingAPI", "message": "none of x exists"}, 1), "error")
    assert missing == ("traceback", "not in this version: none of x exists")
    assert classify(snippet({"kind": "returned", "detail": ""}), "error")[0] == "silent wrong"
    assert classify(snippet({"kind": "returned", "detail": ""}), "ok")[0] == "correct"
    assert classify(snippet({"kind": "wrong", "detail": "x0 for all"}), "ok") == ("silent wrong", "x0 for all")
    assert classify(snippet({"kind": "right", "detail": "ok"}), "ok") == ("correct", "ok")
    assert classify(Observed("python", rc=-9, stderr="Killed"), "error")[0] == "traceback"


def test_the_case_names_are_unique_and_each_expectation_known():
    cases = bad_inputs.all_cases()
    assert len({c.name for c in cases}) == len(cases)
    assert all(c.expect in ("error", "ok", "either") for c in cases)
    assert sum(c.expect == "error" for c in cases) >= 60


CHEAP_CLEAR_ERRORS = ["sample-guidance-nan", "sample-num-0", "train-lr-inf", "lib-trainconfig-grad-clip-negative",
                      "lib-unetconfig-num-classes-0"]


@pytest.mark.skipif(not (Path(os.environ.get("DIFFUSION_COURSE_ARCHIVES", "/work/shared/data")) / "MNIST").is_dir(),
                    reason="needs the offline MNIST archives (DIFFUSION_COURSE_ARCHIVES)")
def test_cheap_cases_end_in_a_clear_error_on_this_repository():
    cases = [c for c in bad_inputs.all_cases() if c.name in CHEAP_CLEAR_ERRORS]
    assert len(cases) == len(CHEAP_CLEAR_ERRORS)
    repo = Path(os.environ.get("BAD_INPUTS_REPO", ROOT))   # another checkout, to try the test on it
    results, _ = bad_inputs.run_all(repo, cases, jobs=2, fixtures=False)
    wrong = {r["case"]: f"{r['outcome']}: {r['detail']}" for r in results if r["outcome"] != "clear error"}
    assert not wrong
