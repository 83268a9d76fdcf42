"""Generate the learner's notebooks in lessons/ from the solution notebooks in solutions/.

In a solution notebook each exercise sits inside a function body between two marker lines,
with an optional hint right after the first (the nbgrader convention):

        ### BEGIN SOLUTION
        # HINT: use schedules.gather to look up alpha_bar_t
        ...the reference answer...
        ### END SOLUTION

In the lesson the whole block becomes one line, at the same indentation:

        raise NotImplementedError("Exercise: use schedules.gather to look up alpha_bar_t")

Both folders are committed without outputs, so this script also strips the outputs, execution
counts and execution metadata from the solution notebooks (in place). Cell ids are kept, so a
lesson cell has the same id as its solution cell and diffs stay small.

    python scripts/make_lessons.py           # rewrite lessons/ (and clean solutions/)
    python scripts/make_lessons.py --check   # exit 1 if anything is out of date; writes nothing
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END, HINT = "### BEGIN SOLUTION", "### END SOLUTION", "# HINT:"
DEFAULT_HINT = "replace this line with your code"
# Metadata that running or opening a notebook adds; none of it belongs in the repository.
CELL_METADATA_TO_DROP = {"execution", "ExecuteTime", "collapsed", "scrolled", "papermill", "vscode"}
NOTEBOOK_METADATA_TO_DROP = {"widgets", "language_info", "papermill", "vscode", "execution"}


def strip_solutions(source: str, where: str = "cell") -> str:
    """Replace every BEGIN/END SOLUTION block in a cell's source by a NotImplementedError stub."""
    out, block = [], None
    for number, line in enumerate(source.split("\n"), start=1):
        marker = line.strip()
        if marker == BEGIN:
            if block is not None:
                raise ValueError(f"{where}, line {number}: {BEGIN} inside another solution block.")
            block = {"indent": line[: len(line) - len(line.lstrip())], "hint": None, "first": True}
        elif marker == END:
            if block is None:
                raise ValueError(f"{where}, line {number}: {END} without a {BEGIN}.")
            hint = (block["hint"] or DEFAULT_HINT).replace("\\", "\\\\").replace('"', '\\"')
            out.append(f'{block["indent"]}raise NotImplementedError("Exercise: {hint}")')
            block = None
        elif block is not None:
            if block["first"] and marker.startswith(HINT):
                block["hint"] = marker[len(HINT):].strip()
            block["first"] = False
        else:
            out.append(line)
    if block is not None:
        raise ValueError(f"{where}: {BEGIN} without an {END}.")
    return "\n".join(out)


def has_solution(cell) -> bool:
    return cell.cell_type == "code" and any(line.strip() == BEGIN for line in cell.source.split("\n"))


def clean(nb):
    """A copy of the notebook without outputs, execution counts or execution metadata."""
    nb = copy.deepcopy(nb)
    for key in NOTEBOOK_METADATA_TO_DROP:
        nb.metadata.pop(key, None)
    for cell in nb.cells:
        for key in CELL_METADATA_TO_DROP:
            cell.metadata.pop(key, None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return nb


def make_lesson(solution):
    """The lesson notebook for a (cleaned) solution notebook: same cells, solutions stubbed out."""
    lesson = clean(solution)
    for index, cell in enumerate(lesson.cells):
        if has_solution(cell):
            cell.source = strip_solutions(cell.source, f"cell {index} (id {cell.get('id')})")
    return lesson


def to_text(nb) -> str:
    nbformat.validate(nb)
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def planned_files(root: Path = ROOT) -> dict[Path, str]:
    """Every file this script would write: cleaned solutions and generated lessons, with their text."""
    files = {}
    for path in sorted((root / "solutions").glob("*.ipynb")):
        solution = clean(nbformat.read(path, as_version=4))
        files[path] = to_text(solution)
        files[root / "lessons" / path.name] = to_text(make_lesson(solution))
    return files


def check(root: Path = ROOT) -> list[str]:
    """Problems that `make_lessons.py` would fix, as readable lines (empty when all is up to date)."""
    problems = []
    for path, text in planned_files(root).items():
        if not path.is_file():
            problems.append(f"{path.relative_to(root)} is missing")
        elif path.read_text() != text:
            what = "has outputs or execution metadata" if path.parent.name == "solutions" else "is out of date"
            problems.append(f"{path.relative_to(root)} {what}")
    solutions = {p.name for p in (root / "solutions").glob("*.ipynb")}
    for path in sorted((root / "lessons").glob("*.ipynb")):
        if path.name not in solutions:
            problems.append(f"{path.relative_to(root)} has no solution notebook in solutions/")
    return problems


def write(root: Path = ROOT) -> list[Path]:
    """Write every planned file that changed; returns the files written."""
    written = []
    for path, text in planned_files(root).items():
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report what is out of date; write nothing")
    args = parser.parse_args(argv)
    if args.check:
        problems = check()
        for problem in problems:
            print(problem)
        if problems:
            print("Run: python scripts/make_lessons.py")
        return 1 if problems else 0
    for path in write():
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
