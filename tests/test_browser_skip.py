"""The README's test command passes on a fresh machine (issue 17): the browser tests skip with a
reason when Chromium is missing and fail in CI (browser_helpers.require_browser, with the lookup
monkeypatched); .ci/run runs exactly the README's command; the learner's install has no test tools."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import browser_helpers as bh


@pytest.fixture
def no_chromium(monkeypatch, tmp_path):
    missing = str(tmp_path / "no-such-chromium")
    monkeypatch.setattr(bh, "CHROMIUM", missing)
    return missing


@pytest.mark.parametrize("ci", [None, "", "0", "false"])
def test_a_missing_chromium_skips_with_the_reason(monkeypatch, no_chromium, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    pytest.importorskip("playwright.sync_api")
    with pytest.raises(pytest.skip.Exception) as skipped:
        bh.require_browser()
    message = str(skipped.value)
    assert message.startswith(f"Chromium not found at {no_chromium}; install Debian's chromium")
    assert "DIFFUSION_COURSE_CHROMIUM" in message and "CI installs it" in message


@pytest.mark.parametrize("ci", ["true", "1", "yes"])
def test_a_missing_chromium_fails_in_ci(monkeypatch, no_chromium, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="CI is set, so the browser tests must run, but: "):
        bh.require_browser()


def test_a_missing_playwright_is_named(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setitem(__import__("sys").modules, "playwright.sync_api", None)    # import fails
    with pytest.raises(pytest.skip.Exception, match="playwright is not installed"):
        bh.require_browser()


def test_a_present_browser_runs(monkeypatch, tmp_path):
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setattr(bh, "CHROMIUM", str(fake))
    monkeypatch.setenv("CI", "true")
    pytest.importorskip("playwright.sync_api")
    assert bh.missing_browser() is None
    bh.require_browser()        # neither skips nor fails


ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("**Run all the tests**"):]
    command = re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines and ci_lines[-1] == command
    assert 'export CI="${CI:-true}"' in ci_lines       # so a missing browser fails there


def test_the_learners_install_has_no_test_tools():
    tomllib = pytest.importorskip("tomllib")        # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=\[ ]", requirement)[0] for requirement in project["dependencies"]}
    assert {"torch", "torchvision", "jupyterlab", "ipywidgets", "pillow"} <= names
    assert not names & {"pytest", "nbval", "playwright"}
    test_names = {re.split(r"[<>=\[ ]", r)[0] for r in project["optional-dependencies"]["test"]}
    assert {"pytest", "nbval", "playwright"} <= test_names


def test_the_readmes_start_commands_turn_off_the_news_plugin_the_browser_tests_turn_off():
    """Every command in the README that installs and starts the course disables the plugin whose
    pop-up the browser tests check is absent (tests/test_browser.py, run_notebook)."""
    readme = (ROOT / "README.md").read_text()
    commands = [block for block in re.findall(r"```bash\n(.+?)\n```", readme, re.S) if "pip install -e ." in block
                and "jupyter lab lessons/" in block]
    assert len(commands) == 2, commands          # with PyPI's PyTorch, and with the CPU-only one
    for command in commands:
        flat = " ".join(command.replace("\\\n", " ").split())
        disable = f'jupyter labextension disable "{bh.NEWS_PLUGIN}"'
        assert disable in flat and flat.index(disable) < flat.index("jupyter lab lessons/"), flat
