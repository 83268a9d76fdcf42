"""Static checks of the committed notebooks (running them is nbval's job, see the README).

- lessons/ is exactly what scripts/make_lessons.py generates from solutions/;
- no notebook carries outputs or execution counts;
- lessons keep no solution code, and every exercise stub raises NotImplementedError;
- every exercise in a solution is followed by a `checks.check_...` cell.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
LESSONS = sorted((ROOT / "lessons").glob("*.ipynb"))


def load_generator():
    spec = importlib.util.spec_from_file_location("make_lessons", ROOT / "scripts" / "make_lessons.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_lessons = load_generator()


def read(path: Path):
    return nbformat.read(path, as_version=4)


def exercise_cells(nb) -> list[int]:
    return [i for i, cell in enumerate(nb.cells) if make_lessons.has_solution(cell)]


def test_there_are_notebooks():
    assert SOLUTIONS, "no solution notebooks found in solutions/"


def test_lessons_are_up_to_date_with_solutions():
    problems = make_lessons.check(ROOT)
    assert not problems, "\n".join(problems) + "\nRun: python scripts/make_lessons.py"


@pytest.mark.parametrize("path", SOLUTIONS + LESSONS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_notebook_has_no_outputs_or_execution_counts(path):
    nb = read(path)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} has outputs"
            assert cell.execution_count is None, f"cell {i} has an execution count"
    assert "widgets" not in nb.metadata, "notebook metadata holds saved widget state"


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_each_solution_has_its_lesson(path):
    assert (ROOT / "lessons" / path.name).is_file(), f"lessons/{path.name} is missing"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_lesson_has_no_solutions_and_stubs_raise(path):
    lesson = read(path)
    solution = read(ROOT / "solutions" / path.name)
    for i, cell in enumerate(lesson.cells):
        assert make_lessons.BEGIN not in cell.source, f"cell {i} still holds a solution block"
        assert make_lessons.END not in cell.source, f"cell {i} still holds a solution marker"
    by_id = {cell.get("id"): cell for cell in lesson.cells}
    exercises = exercise_cells(solution)
    assert exercises or "NotImplementedError" not in "".join(c.source for c in lesson.cells)
    for i in exercises:
        source = solution.cells[i].source
        blocks = sum(line.strip() == make_lessons.BEGIN for line in source.split("\n"))
        stub = by_id[solution.cells[i].get("id")].source
        assert stub.count('raise NotImplementedError("Exercise') == blocks, (
            f"exercise cell {i}: expected {blocks} NotImplementedError stub(s) in the lesson")
        compile(stub, f"{path.name}, cell {i}", "exec")   # the stub is still valid Python


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_each_exercise_is_followed_by_a_check(path):
    nb = read(path)
    for i in exercise_cells(nb):
        following = nb.cells[i + 1] if i + 1 < len(nb.cells) else None
        assert following is not None and following.cell_type == "code" and "checks.check_" in following.source, (
            f"exercise cell {i} must be followed by a code cell calling checks.check_<name>(...)")


def test_strip_solutions_keeps_indentation_and_hint():
    source = ("def f(x):\n"
              "    ### BEGIN SOLUTION\n"
              "    # HINT: return \"x\" twice\n"
              "    return 2 * x\n"
              "    ### END SOLUTION\n")
    stub = make_lessons.strip_solutions(source)
    assert stub == 'def f(x):\n    raise NotImplementedError("Exercise: return \\"x\\" twice")\n'
    namespace = {}
    exec(stub, namespace)
    with pytest.raises(NotImplementedError, match='return "x" twice'):
        namespace["f"](1)


def test_strip_solutions_rejects_unbalanced_markers():
    with pytest.raises(ValueError):
        make_lessons.strip_solutions("def f():\n    ### BEGIN SOLUTION\n    return 1\n")
    with pytest.raises(ValueError):
        make_lessons.strip_solutions("def f():\n    return 1\n    ### END SOLUTION\n")
