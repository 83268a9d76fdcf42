"""Helpers for the end-to-end browser tests (tests/test_browser.py).

A throw-away JupyterLab server (`LabServer`) and a few functions that drive a notebook in it
through Playwright's sync API: open it, run all cells the way a learner does (Run > Run All
Cells), find an ipywidgets slider by its description, move it with the keyboard and read back
what is on the screen.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

CHROMIUM = os.environ.get("DIFFUSION_COURSE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
INSTALL_HINT = ("install Debian's chromium (`sudo bash .ci/install-browser`) or set DIFFUSION_COURSE_CHROMIUM "
                "to a Chromium executable; CI installs it. Leave these tests out with `pytest -m \"not browser\"`.")

# JupyterLab's plugin that asks "Would you like to get notified about official Jupyter news?" in a
# toast over the notebook, and checks for updates (both reach the network). The README's start
# command disables it with `jupyter labextension disable NEWS_PLUGIN`; the throw-away server does
# the same (at the level of its own config folder), and the tests check that no toast shows.
NEWS_PLUGIN = "@jupyterlab/apputils-extension:announcements"
NEWS_QUESTION = "official Jupyter news"


def missing_browser() -> str | None:
    """Why the browser tests cannot run on this machine, or None when they can."""
    try:
        import playwright.sync_api  # noqa: F401  (the Python package from the "test" extra)
    except ImportError:
        return f"The Python package playwright is not installed (`pip install -e \".[test]\"`); {INSTALL_HINT}"
    if not os.access(CHROMIUM, os.X_OK):
        return f"Chromium not found at {CHROMIUM}; {INSTALL_HINT}"
    return None


def in_ci() -> bool:
    """True when the environment variable CI is set (to anything but "", "0" or "false")."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def require_browser() -> None:
    """Skip the calling test when no browser can be driven here, with the reason; in CI, fail
    instead: CI installs the browser (.ci/install-browser), so a missing one is a broken setup."""
    reason = missing_browser()
    if reason is None:
        return
    if in_ci():
        pytest.fail(f"CI is set, so the browser tests must run, but: {reason}", pytrace=False)
    pytest.skip(reason)


def wait_until(condition: Callable[[], object], timeout: float, interval: float = 0.25,
               message: str = "condition") -> object:
    """Call `condition` until it returns something truthy (returned), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {message}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LabServer:
    """A JupyterLab server on 127.0.0.1 serving `notebook_dir`, with its own settings folders.

    The server and its kernels run in a new process group, stopped by `stop()`.
    """

    def __init__(self, notebook_dir: Path, work_dir: Path, env: dict[str, str] | None = None):
        self.notebook_dir = Path(notebook_dir)
        self.work_dir = Path(work_dir)
        self.port = free_port()
        self.token = secrets.token_hex(24)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.work_dir / "jupyterlab.log"
        self.extra_env = dict(env or {})
        self.process: subprocess.Popen | None = None

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        folders = {"JUPYTER_CONFIG_DIR": "config", "JUPYTERLAB_SETTINGS_DIR": "lab-settings",
                   "JUPYTERLAB_WORKSPACES_DIR": "lab-workspaces", "JUPYTER_RUNTIME_DIR": "runtime",
                   "JUPYTER_DATA_DIR": "data", "IPYTHONDIR": "ipython"}
        for variable, name in folders.items():
            folder = self.work_dir / name
            folder.mkdir(parents=True, exist_ok=True)
            env[variable] = str(folder)
        subprocess.run([sys.executable, "-m", "jupyter", "labextension", "disable", "--level=user", NEWS_PLUGIN],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=120)
        env.pop("MPLBACKEND", None)     # the kernel uses the inline backend, as a learner's does
        env["JUPYTER_TOKEN"] = self.token
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 180) -> None:
        command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
                   "--ip=127.0.0.1", f"--port={self.port}", "--ServerApp.port_retries=0",
                   f"--ServerApp.root_dir={self.notebook_dir}"]
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, cwd=self.notebook_dir, env=self._environment(), stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

        def answers() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                return "started" in self.api("/api/status", timeout=5)
            except (OSError, urllib.error.URLError, ValueError):
                return False

        try:
            wait_until(answers, timeout, interval=0.5, message="JupyterLab to answer /api/status")
        except TimeoutError as error:
            raise TimeoutError(f"{error}\n{self.log_tail()}") from None

    def api(self, path: str, method: str = "GET", timeout: float = 10) -> dict | list:
        """Call the server's REST API with the token; the decoded JSON answer ({} when empty)."""
        request = urllib.request.Request(self.url + path, method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else {}

    def lab_url(self, notebook: str) -> str:
        """The address that opens `notebook`, alone: `reset` starts from an empty workspace, so no
        tab (and kernel) from an earlier page is restored next to it."""
        return f"{self.url}/lab/tree/{notebook}?reset&token={self.token}"

    def shutdown_kernels(self) -> None:
        """Shut down every running kernel (best effort: the server may already be gone)."""
        try:
            for kernel in self.api("/api/kernels"):
                self.api(f"/api/kernels/{kernel['id']}", method="DELETE", timeout=30)
        except (OSError, urllib.error.URLError, ValueError):
            pass

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return "--- JupyterLab log (tail) ---\n" + "\n".join(text[-lines:])

    def stop(self) -> None:
        """Shut down kernels and server politely, then end the process group for sure."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.api("/api/shutdown", method="POST", timeout=10)
            self.process.wait(timeout=20)
        except (OSError, urllib.error.URLError, subprocess.TimeoutExpired):
            pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)    # the group this server leads: it and its kernels
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                continue


def copy_notebooks(source: Path, destination: Path) -> Path:
    """Copy a notebook folder, leaving out checkpoints and training runs (as in a fresh clone)."""
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "runs", "__pycache__"))
    return destination


# --- Driving a notebook ---------------------------------------------------------------------

ERROR_OUTPUTS = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"

# The prompts of all code cells: "[ ]:" not run, "[*]:" running or queued, "[3]:" done.
_PROMPTS_JS = """() => Array.from(document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell .jp-InputPrompt'))
                       .map(p => p.textContent.trim())"""

_ERRORS_JS = """(selector) => Array.from(document.querySelectorAll(selector)).map(e => e.innerText)
                    .filter(text => /Traceback|^\\w*(Error|Exception)\\b|Error displaying widget/m.test(text))"""


def open_notebook(page, server: LabServer, notebook: str, num_cells: int, timeout: float = 180) -> None:
    """Open `notebook` in JupyterLab; wait until all its `num_cells` cells show and its kernel is idle."""
    page.goto(server.lab_url(notebook), timeout=timeout * 1000)
    wait_until(lambda: page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").count() == num_cells, timeout,
               message=f"the notebook's {num_cells} cells to show")
    panels = page.locator(".jp-NotebookPanel").count()
    assert panels == 1, f"expected JupyterLab to show one notebook, it shows {panels}"
    wait_for_kernel_idle(page, timeout)


def kernel_status(page) -> str:
    """The kernel's name and status, as the status bar shows them ("Python 3 (ipykernel) | Idle")."""
    return page.evaluate("""() => { const bar = document.querySelector('#jp-main-statusbar');
        const line = bar ? bar.innerText.split('\\n').find(text => text.includes(' | ')) : null;
        return line || ''; }""")


def wait_for_kernel_idle(page, timeout: float) -> None:
    wait_until(lambda: re.search(r"\|\s*Idle\s*$", kernel_status(page)), timeout,
               message="the kernel to be idle")


def run_all_cells(page) -> None:
    """Run > Run All Cells, from the menu bar."""
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()


def error_outputs(page) -> list[str]:
    """The text of every output that shows an error (traceback, exception or broken widget)."""
    return page.evaluate(_ERRORS_JS, ERROR_OUTPUTS)


def wait_for_all_cells_run(page, timeout: float) -> list[str]:
    """Wait until every code cell has an execution count; fail early if a cell shows an error."""
    def done() -> list[str] | None:
        errors = error_outputs(page)
        if errors:
            raise AssertionError("A cell shows an error after Run All Cells:\n" + "\n---\n".join(errors))
        prompts = page.evaluate(_PROMPTS_JS)
        if prompts and all(re.fullmatch(r"\[\d+\]:", p) for p in prompts):
            return prompts
        return None

    started = time.monotonic()
    try:
        prompts = wait_until(done, timeout, interval=1.0, message="Run All Cells to finish")
    except TimeoutError as error:
        raise TimeoutError(f"{error}; prompts now: {page.evaluate(_PROMPTS_JS)}") from None
    print(f"  Run All Cells: {len(prompts)} code cells in {time.monotonic() - started:.0f} s")
    return prompts


def save_full_page(page, path: Path, max_height: int = 30000) -> None:
    """Screenshot the whole notebook: grow the window until the notebook needs no scrolling.

    Cells that were never on screen have only an estimated height, so this measures again after
    each growth, until the notebook fits (or reaches `max_height` pixels).
    """
    size = page.viewport_size
    # [bottom of the last cell, visible height] of the notebook's scroll area, scrolled to the top.
    # (Not its scrollHeight: JupyterLab lets one scroll past the last cell by about a window's height.)
    measure = """() => { const scroller = document.querySelector('.jp-NotebookPanel .jp-WindowedPanel-outer');
        scroller.scrollTop = 0;
        const cells = scroller.querySelectorAll('.jp-Cell');
        const bottom = cells[cells.length - 1].getBoundingClientRect().bottom - scroller.getBoundingClientRect().top;
        return [Math.ceil(bottom) + 20, scroller.clientHeight]; }"""
    next_frame = "() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))"
    height = size["height"]
    try:
        for _ in range(6):
            content, visible = page.evaluate(measure)
            if content <= visible + 2 or height >= max_height:
                break
            height = int(min(height + content - visible, max_height))
            page.set_viewport_size({"width": size["width"], "height": height})
            # JupyterLab lays itself out again for the new window size: wait until the notebook grew.
            wait_until(lambda: page.evaluate(measure)[1] > visible, 30, message="the notebook to grow with the window")
            page.evaluate(next_frame)
        page.evaluate(next_frame)
        page.screenshot(path=str(path))
    finally:
        page.set_viewport_size(size)


# --- Sliders --------------------------------------------------------------------------------

class SliderView:
    """An ipywidgets slider on the page, found by its description, and the picture beside it.

    `description` is the exact description, or a compiled regular expression searched in it.
    """

    def __init__(self, page, description: str | re.Pattern):
        self.page = page
        if isinstance(description, str):
            description = re.compile(rf"^\s*{re.escape(description)}\s*$")
        label = page.locator("label.widget-label", has_text=description)
        slider = page.locator(".widget-slider", has=label)      # (relative locators for `has=`)
        self.cell = page.locator(".jp-NotebookPanel .jp-CodeCell", has=slider)
        self.slider = self.cell.locator(slider)
        self.handle = self.slider.locator(".noUi-handle")
        self.readout_box = self.slider.locator(".widget-readout")
        # The explorer: the widget output holding the slider (slider, readouts and picture).
        self.widget = self.cell.locator(".jp-OutputArea-output", has=slider)
        self.image = self.widget.locator("img.widget-image")
        # Other text next to the slider (an ipywidgets.Label in the same row), if any.
        self.label = self.widget.locator(".widget-hbox", has=slider).locator("div.widget-label")
        self.fallback = self.cell.locator(".jp-RenderedImage img")

    def readout(self, timeout: float = 15) -> str:
        """The readout's text, once it shows one (while the view is being rendered it can be empty)."""
        return wait_until(lambda: self.readout_box.inner_text().strip(), timeout, message="the readout to show a value")

    def handle_value(self, attribute: str = "aria-valuetext") -> float:
        # noUiSlider writes aria-valuenow with one decimal (toFixed(1): 0.15 shows as 0.1) and
        # aria-valuetext with two, so the handle's value is read from the latter.
        return float(self.handle.get_attribute(attribute))

    def image_src(self) -> str:
        return self.image.get_attribute("src") or ""

    def image_png(self) -> bytes:
        """The PNG the widget shows now (the bytes behind the <img>'s blob: URL)."""
        data = self.image.evaluate("""async (img) => {
            const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
            let text = ''; for (let i = 0; i < bytes.length; i += 8192) {
                text += String.fromCharCode.apply(null, bytes.subarray(i, i + 8192)); }
            return btoa(text); }""")
        return base64.b64decode(data)

    def press(self, *keys: str) -> None:
        """Focus the slider's handle and press `keys`, one after the other."""
        self.handle.focus()
        for key in keys:
            self.handle.press(key)

    def wait_for_picture(self, expected: float, old_src: str, timeout: float = 60, settle: float = 1.0) -> str:
        """Wait until the readout shows `expected` and the picture changed, then settled; its src."""
        def readout_shows() -> bool:
            try:
                return math.isclose(float(self.readout()), expected, rel_tol=1e-6, abs_tol=1e-9)
            except ValueError:
                return False

        try:
            wait_until(readout_shows, timeout, message=f"the readout to show {expected:g}")
        except TimeoutError as error:
            raise AssertionError(f"{error}; it shows {self.readout()!r}") from None
        wait_until(lambda: self.image_src() not in ("", old_src), timeout, message="the picture to change")
        state = {"src": self.image_src(), "since": time.monotonic()}

        def settled() -> bool:      # the kernel may still be sending pictures for earlier values
            src = self.image_src()
            if src != state["src"]:
                state.update(src=src, since=time.monotonic())
            ready = self.image.evaluate("img => img.complete && img.naturalWidth > 0")
            return ready and time.monotonic() - state["since"] >= settle

        wait_until(settled, timeout, interval=0.2, message="the picture to settle")
        return state["src"]


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def differs(png_a: bytes, png_b: bytes) -> bool:
    """True when two PNGs show different pictures (size or pixels)."""
    a, b = pixels(png_a), pixels(png_b)
    return a.shape != b.shape or bool(np.abs(a - b).max() > 0)


# --- The studio (lesson 09) ---------------------------------------------------------------------

def make_tiny_text_pipeline(folder: Path) -> Path:
    """Save a tiny, randomly initialised text-to-image latent pipeline like "prompted-digits" (a
    TextUNet on 4 x 8 x 16 latents of an autoencoder for 3 x 32 x 64 canvases) into `folder`;
    returns the U-Net checkpoint's folder, for generate.load_pipeline. (The unit tests use it too,
    and the browser test's notebook imports it: nothing here depends on a trained model.)"""
    import torch

    from diffusion_course import autoencoder, captions, checkpoints, text
    from diffusion_course.schedules import cosine_schedule

    torch.manual_seed(0)
    ae = autoencoder.Autoencoder(autoencoder.AutoencoderConfig(base_channels=8, channel_mults=(1, 2, 2)))
    words = text.TextEncoderConfig(words=tuple(captions.VOCABULARY), max_length=16, dim=16, depth=1, heads=2)
    unet = text.TextUNet(text.TextUNetConfig(base_channels=8, channel_mults=(1, 2), text=words, attention_heads=2))
    with torch.no_grad():        # the output layers start at zero: give them weights, so the words matter
        for module in unet.modules():
            if isinstance(module, text.CrossAttention):
                torch.nn.init.normal_(module.to_out.weight, std=0.2)
        torch.nn.init.normal_(unet.conv_out.weight, std=0.2)
    ae_path = checkpoints.save_checkpoint(Path(folder) / "autoencoder", ae)
    return checkpoints.save_checkpoint(Path(folder) / "unet", unet, cosine_schedule(40),
                                       info={"autoencoder": str(ae_path), "latent_shape": [4, 8, 16]})


class StudioView:
    """widgets.studio's panel on the page: found by its Generate button."""

    def __init__(self, page):
        self.page = page
        button = page.locator("button.widget-button", has_text=re.compile(r"^\s*Generat"))
        self.cell = page.locator(".jp-NotebookPanel .jp-CodeCell", has=button)
        self.widget = self.cell.locator(".jp-OutputArea-output", has=button)
        self.button = self.widget.locator(button)
        self.prompt = self._text_box("prompt")
        self.negative_prompt = self._text_box("negative prompt")
        self.steps = self.widget.locator(".widget-slider", has=page.locator("label.widget-label",
                                                                            has_text=re.compile(r"^\s*steps\s*$")))
        self.start = self._dropdown("start image")
        self.mask = self._dropdown("mask")
        self.image = self.widget.locator("img.widget-image")
        self.status = self.widget.locator(".widget-hbox", has=button).locator("div.widget-label")
        self.message = self.widget.locator(".widget-html")
        self.fallback = self.cell.locator(".jp-RenderedImage img")

    def _text_box(self, description: str):
        label = self.page.locator("label.widget-label", has_text=re.compile(rf"^\s*{re.escape(description)}\s*$"))
        return self.widget.locator(".widget-text", has=label).locator("input")

    def _dropdown(self, description: str):
        label = self.page.locator("label.widget-label", has_text=re.compile(rf"^\s*{re.escape(description)}\s*$"))
        return self.widget.locator(".widget-dropdown", has=label).locator("select")

    def image_png(self) -> bytes:
        return SliderView.image_png(self)

    def generate(self, prompt: str, timeout: float = 120) -> str:
        """Type `prompt`, press Generate, wait until the panel says it is done; the status text."""
        old_status = self.status.inner_text()
        self.prompt.fill(prompt)
        self.prompt.press("Tab")                     # leave the box, as a learner would
        self.button.click()
        wait_until(lambda: self.status.inner_text() != old_status and self.button.is_enabled()
                   and "Generate" == self.button.inner_text().strip(), timeout, message="the studio to finish")
        return self.status.inner_text().strip()
