"""The shape of the package (STYLE.md): three rings whose imports point inwards only, each ring-1
module importing only earlier lessons, short functions, a thin command line, and every lesson
module saying which lesson it belongs to."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "diffusion_course"

# Ring 1, in lesson order: each module may import only the ones before it.
LESSONS = ["schedules", "unet", "training", "sampling", "guidance", "editing", "autoencoder", "text", "flow", "distill"]
RUNNING = {"data", "checkpoints", "runs", "generate", "metrics", "threads", "captions"}
FRONT_ENDS = {"cli", "viz", "widgets", "checks"}
MAX_BODY_LINES = 40
MAX_CLI_LINES = 245   # 220 until the text-to-image options (--prompt, --negative-prompt) came; 240 until --objective


def modules():
    """(name, path) of every module; a package counts under its own name (checks/ -> "checks")."""
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "__init__.py":
            continue
        yield relative.parts[0].removesuffix(".py"), path


def imported_modules(path: Path, package: Path = PACKAGE) -> set[str]:
    """The diffusion_course modules a file imports (relative or absolute imports)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            inside_package = node.level == 1 and path.parent == package
            inside_subpackage = node.level == 2 and path.parent.parent == package
            if node.module and (node.module.startswith("diffusion_course") or inside_package or inside_subpackage):
                module = node.module.removeprefix("diffusion_course").lstrip(".")
                found.add(module.split(".")[0] if module else "")
            if (inside_package or inside_subpackage) and not node.module:      # from . import a, b
                found.update(alias.name for alias in node.names)
            if node.module == "diffusion_course":
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names
                         if alias.name.startswith("diffusion_course."))
    return found - {""}


def ring(name: str) -> int:
    if name in LESSONS:
        return 1
    if name in RUNNING:
        return 2
    if name in FRONT_ENDS:
        return 3
    raise AssertionError(f"diffusion_course/{name} is in no ring: add it to LESSONS, RUNNING or FRONT_ENDS "
                         "in tests/test_structure.py (and to STYLE.md's map)")


@pytest.mark.parametrize("name, path", list(modules()), ids=lambda v: str(v))
def test_imports_point_inwards(name, path):
    for other in imported_modules(path) - {name}:
        assert ring(other) <= ring(name), f"{path.name} (ring {ring(name)}) imports {other} (ring {ring(other)})"
        if ring(name) == 1 and ring(other) == 1:
            assert LESSONS.index(other) < LESSONS.index(name), \
                f"{name} (lesson module) imports {other}, which a later lesson teaches"


def test_the_import_checker_sees_each_kind_of_import(tmp_path):
    """The direction test can fail: every way of importing a module is seen."""
    (tmp_path / "checks").mkdir()
    (tmp_path / "sampling.py").write_text("from . import checkpoints, guidance\nfrom .generate import generate\n"
                                          "from diffusion_course import cli\nimport diffusion_course.widgets\n")
    (tmp_path / "checks" / "x.py").write_text("from ..runs import train\nfrom .. import data\n")
    assert imported_modules(tmp_path / "sampling.py", tmp_path) == {"checkpoints", "guidance", "generate", "cli", "widgets"}
    assert imported_modules(tmp_path / "checks" / "x.py", tmp_path) == {"runs", "data"}
    assert ring("checkpoints") > ring("sampling") and LESSONS.index("guidance") > LESSONS.index("sampling")


def function_bodies():
    for _, path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) else node.body
                if body:
                    yield f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}", body[-1].end_lineno - body[0].lineno + 1


def test_no_function_body_is_over_40_lines():
    long = {name: lines for name, lines in function_bodies() if lines > MAX_BODY_LINES}
    assert not long, f"functions with bodies over {MAX_BODY_LINES} lines: {long}"


def test_the_command_line_module_is_thin():
    lines = len((PACKAGE / "cli.py").read_text().splitlines())
    assert lines < MAX_CLI_LINES, f"cli.py has {lines} lines; parsing and printing only (< {MAX_CLI_LINES})"


@pytest.mark.parametrize("name", LESSONS)
def test_each_lesson_module_names_its_lesson_and_exercises(name):
    docstring = ast.get_docstring(ast.parse((PACKAGE / f"{name}.py").read_text()))
    assert docstring and docstring.startswith("Lesson "), f"{name}.py's docstring should start with its lesson"
    assert "Exercises:" in docstring.split("\n\n")[0], f"{name}.py's docstring should list its exercises"
