"""Interactive explorers for the notebooks (ipywidgets), ring 3: lesson 01's timestep explorer,
lesson 04's reverse process, lesson 05's guidance scale (also lesson 07's, over CIFAR-10's classes),
lesson 06's image-to-image strength, lesson 09's studio (a text-to-image web UI: prompt, guidance,
seed, start image, mask; Generate) and lesson 10's eta, from the ODE to DDPM's noise.

Each explorer is a widget (a VBox) that you display by making it the last line of a cell.
Its picture is a PNG in an `ipywidgets.Image` that is redrawn in place when a slider moves,
so the notebook does not fill up with figures. Each explorer also draws a static matplotlib
figure when it is created and carries it as the static copy of its output: it shows only where
widgets do not render (a static HTML export, GitHub's notebook viewer), never above a slider.

Tests and curious learners can drive an explorer from code: set `explorer.slider.value` and
read `explorer.image.value` (the PNG bytes shown) or the explorer's own documented attributes.
"""

from __future__ import annotations

import base64
import html
import io
import math
import textwrap
import time
from typing import NamedTuple, Sequence

import ipywidgets
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image as PILImage
from torch import Tensor
from tqdm.auto import tqdm

from . import sampling, viz
from .editing import MASKS, check_images, img2img, inpaint, make_mask
from .generate import generate, image_shape, prompt_ids
from .guidance import guided
from .schedules import NoiseSchedule, cosine_schedule, linear_schedule, q_sample


def figure_to_png(fig: Figure, dpi: int = 80) -> bytes:
    """Render a matplotlib figure to PNG bytes (for an ipywidgets.Image)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


class FastFigure:
    """Redraw a figure quickly when only a few artists change (blitting).

    Everything else (axes, labels, fixed curves) is drawn once and kept as a background; each
    `png()` call pastes the background and draws only the `changing` artists on top.
    """

    def __init__(self, fig: Figure, changing: Sequence):
        self.canvas = FigureCanvasAgg(fig)
        self.changing = list(changing)
        for artist in self.changing:
            artist.set_animated(True)      # left out of full draws; drawn by png()
        self.canvas.draw()                 # lays the figure out, then draws the background
        fig.set_layout_engine("none")      # keep that layout from now on
        self.background = self.canvas.copy_from_bbox(fig.bbox)

    def png(self) -> bytes:
        """The figure as PNG bytes, with the changing artists in their current state."""
        self.canvas.restore_region(self.background)
        for artist in self.changing:
            self.canvas.figure.draw_artist(artist)
        buffer = io.BytesIO()
        PILImage.fromarray(np.asarray(self.canvas.buffer_rgba())).save(buffer, format="png", compress_level=1)
        return buffer.getvalue()


class StaticCopy:
    """Mixin for an explorer: its static figure travels in the same output as the live widget, as
    an image/png alternative. JupyterLab with widgets shows the slider; a viewer that cannot run
    widgets (nbconvert, GitHub, a notebook without the widget extension) shows the picture instead.
    So the static copy never sits above a working slider."""

    fallback_png: bytes = b""

    def _repr_mimebundle_(self, **kwargs):
        bundle = super()._repr_mimebundle_(**kwargs)
        if self.fallback_png and isinstance(bundle, dict):
            bundle = {**bundle, "image/png": base64.b64encode(self.fallback_png).decode("ascii")}
        return bundle


def keep_static_copy(explorer: StaticCopy, fig: Figure, fallback: bool) -> None:
    """Store `fig` as the explorer's static copy (when `fallback`), then close it."""
    explorer.fallback_figure = fig
    if fallback:
        explorer.fallback_png = figure_to_png(fig, dpi=100)
    plt.close(fig)


# --- Lesson 01: the forward process ---------------------------------------------------------

class TimestepExplorer(StaticCopy, ipywidgets.VBox):
    """x_t for a few images under several schedules, with a "timestep t" slider.

    Attributes (for driving it from code):
        slider: the IntSlider (description "timestep t", 0..T-1); set `slider.value` to move it.
        image: the ipywidgets.Image showing the current picture; `image.value` is PNG bytes.
        frames: dict schedule name -> (N, C, H, W) tensor of the x_t now shown.
        noise: (N, C, H, W) the fixed noise, one draw per image, shared by all schedules.
        fallback_figure: the static matplotlib figure drawn at creation (closed; can be saved).
    """

    def __init__(self, images: Tensor, schedules: Sequence[NoiseSchedule], t: int = 0,
                 seed: int = 0, fallback_timesteps: Sequence[int] | None = None, fallback: bool = True):
        num_steps = schedules[0].num_steps
        if any(s.num_steps != num_steps for s in schedules):
            raise ValueError("All schedules must have the same number of steps.")
        self.images = images
        self.schedules = list(schedules)
        self.noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)).to(images)
        self.frames: dict[str, Tensor] = {}
        self.slider = ipywidgets.IntSlider(value=t, min=0, max=num_steps - 1, step=1,
                                           description="timestep t", continuous_update=True,
                                           readout=True, layout=ipywidgets.Layout(width="520px"))
        self.image = ipywidgets.Image(format="png")
        figure, self._artists = self._build_figure()
        self._set_artists(t)                     # before the first draw, so the layout fits the titles
        self._renderer = FastFigure(figure, self._changing_artists())
        self.slider.observe(lambda change: self.update(change["new"]), names="value")
        super().__init__([self.slider, self.image])
        self.update(t)
        if fallback_timesteps is None:
            T = num_steps
            fallback_timesteps = [0, T // 10, T // 4, T // 2, 3 * T // 4, T - 1]
        keep_static_copy(self, viz.show_noising(images[:2], self.schedules, fallback_timesteps, self.noise[:2]),
                         fallback)

    def _build_figure(self) -> tuple[Figure, dict]:
        """One row of images per schedule, and the alpha_bar curves on the right."""
        n, rows = len(self.images), len(self.schedules)
        fig = Figure(figsize=(1.3 * n + 4.2, 1.4 * rows + 0.6), dpi=80, layout="constrained")
        grid = fig.add_gridspec(rows, n + 3)
        artists = {"images": {}, "titles": {}, "markers": {}}
        for r, schedule in enumerate(self.schedules):
            row = []
            for i in range(n):
                ax = fig.add_subplot(grid[r, i])
                row.append(ax.imshow(viz.to_numpy_images(self.images[i:i + 1])[0], cmap="gray", vmin=0, vmax=1))
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_ylabel(schedule.name, color=viz.SCHEDULE_COLORS.get(schedule.name, "black"))
            artists["images"][schedule.name] = row
            artists["titles"][schedule.name] = fig.axes[r * n].set_title("", fontsize=9, loc="left")
        curve = fig.add_subplot(grid[:, n:])
        for schedule in self.schedules:
            color = viz.SCHEDULE_COLORS.get(schedule.name)
            curve.plot(schedule.alpha_bar.numpy(), color=color, label=schedule.name)
            artists["markers"][schedule.name] = curve.plot([0], [1.0], "o", color=color)[0]
        artists["line"] = curve.axvline(0, color="gray", linestyle=":")
        curve.set(xlabel="timestep t", title=r"$\bar\alpha_t$ (signal kept)", ylim=(-0.03, 1.03))
        artists["legend"] = curve.legend(fontsize=8, loc="upper right")
        curve.grid(alpha=0.3)
        return fig, artists

    def _changing_artists(self) -> list:
        """What a slider move redraws: the images, their titles, the markers, the line (and the
        legend, so that it stays on top of the line)."""
        a = self._artists
        images = [artist for row in a["images"].values() for artist in row]
        return images + [*a["titles"].values(), *a["markers"].values(), a["line"], a["legend"]]

    def update(self, t: int) -> None:
        """Show x_t at timestep t (called by the slider)."""
        self._set_artists(t)
        self.image.value = self._renderer.png()

    def _set_artists(self, t: int) -> None:
        steps = torch.full((len(self.images),), int(t), dtype=torch.long)
        for schedule in self.schedules:
            x_t = q_sample(self.images, steps, schedule, self.noise)
            self.frames[schedule.name] = x_t
            for artist, pixels in zip(self._artists["images"][schedule.name], viz.to_numpy_images(x_t)):
                artist.set_data(pixels)
            alpha_bar_t = float(schedule.alpha_bar[t])
            snr_t = alpha_bar_t / max(1 - alpha_bar_t, 1e-12)          # signal-to-noise ratio, lesson 01
            self._artists["titles"][schedule.name].set_text(f"{schedule.name}: " + r"$\bar\alpha_t$"
                                                            + f" = {alpha_bar_t:.3f}, SNR = {snr_t:.3g}")
            self._artists["markers"][schedule.name].set_data([t], [alpha_bar_t])
        self._artists["line"].set_xdata([t, t])


def timestep_explorer(images: Tensor, schedules: Sequence[NoiseSchedule] | None = None, t: int = 0,
                      seed: int = 0, fallback: bool = True) -> TimestepExplorer:
    """A "timestep t" slider showing x_t ~ q(x_t | x_0) for a few images under each schedule.

    Args:
        images: (N, C, H, W) clean images in [-1, 1]; 3 to 5 look best.
        schedules: the schedules to compare; linear and cosine with 1000 steps when None.
        t: the slider's starting value.
        seed: seeds the fixed noise (one draw per image, reused for every t and schedule, so
            moving the slider only changes t).
        fallback: keep a static figure (shown where widgets cannot run) of x_t at six timesteps.
    Returns:
        A TimestepExplorer (an ipywidgets.VBox: [slider, image]); see its attributes.
    """
    if schedules is None:
        schedules = [linear_schedule(), cosine_schedule()]
    return TimestepExplorer(images, schedules, t=t, seed=seed, fallback=fallback)


# --- Lesson 04: the reverse process ---------------------------------------------------------

class ReverseFrame(NamedTuple):
    """One cached moment of a generation (tensors on the CPU)."""

    step: int         # 0 = the starting noise, num_steps = the finished sample
    t: int            # the timestep x_t is at; -1 for the finished sample (clean)
    x_t: Tensor       # (B, C, H, W) what the sampler holds at this moment
    x0_pred: Tensor   # (B, C, H, W) the model's guess of the clean image, made from x_t


class ReverseProcessExplorer(StaticCopy, ipywidgets.VBox):
    """Scrub through one cached generation with a "reverse step" slider.

    The sampler runs once when the explorer is created; x_t and the model's current guess of
    x_0 are cached at every step, so moving the slider only redraws a picture (and a picture seen
    once is kept, so going back is instant).

    Attributes (for driving it from code):
        slider: the IntSlider (description "reverse step", 0..num_steps); 0 is the starting
            noise x_T, num_steps the finished sample. Set `slider.value` to move it.
        readout: an ipywidgets.Label next to the slider, e.g. "step 10 / 50 · t = 796".
        image: the ipywidgets.Image showing x_t (left) and x0_pred (right); `image.value` is PNG bytes.
        frames: list of ReverseFrame(step, t, x_t, x0_pred), one per slider position.
        shown: the ReverseFrame now displayed (what the image and the readout show).
        samples: (B, C, H, W) the finished samples (the same as frames[-1].x_t).
        fallback_figure: the static strip of frames drawn at creation (closed; can be saved).
    """

    def __init__(self, frames: Sequence[ReverseFrame], title: str = "", fallback_frames: int = 8,
                 fallback: bool = True):
        if len(frames) < 2:
            raise ValueError("Need at least two frames (the noise and the sample).")
        self.frames = list(frames)
        self.samples = self.frames[-1].x_t
        self.title = title
        self._png_cache: dict[int, bytes] = {}
        num_steps = len(self.frames) - 1
        self.slider = ipywidgets.IntSlider(value=0, min=0, max=num_steps, step=1, description="reverse step",
                                           continuous_update=True, readout=True, style={"description_width": "initial"},
                                           layout=ipywidgets.Layout(width="520px"))
        self.readout = ipywidgets.Label()
        self.image = ipywidgets.Image(format="png")
        self._figure, self._artists = self._build_figure()
        self.slider.observe(lambda change: self.update(change["new"]), names="value")
        super().__init__([ipywidgets.HBox([self.slider, self.readout]), self.image])
        self.update(0)
        self._figure.set_layout_engine("none")   # keep the layout of the first draw: redraws are faster
        keep_static_copy(self, self._draw_fallback(fallback_frames), fallback)

    @property
    def shown(self) -> ReverseFrame:
        """The frame now displayed."""
        return self.frames[self.slider.value]

    def describe(self, index: int) -> str:
        """The readout text for frame `index`."""
        frame, num_steps = self.frames[index], len(self.frames) - 1
        where = "finished: the sample x_0" if frame.t < 0 else f"t = {frame.t}"
        return f"step {frame.step} / {num_steps} · {where}"

    def _build_figure(self) -> tuple[Figure, dict]:
        """Two panels side by side: x_t and the model's guess of x_0."""
        first = self.frames[0]
        n = len(first.x_t)
        fig = Figure(figsize=(2 * (0.9 * n + 0.3), 1.75), layout="constrained")
        artists = {}
        for key, (name, images) in enumerate([("x_t", first.x_t), ("x0_pred", first.x0_pred)]):
            ax = fig.add_subplot(1, 2, key + 1)
            artists[name] = ax.imshow(viz.image_grid(images, nrow=n), cmap="gray", vmin=0, vmax=1)
            ax.set_axis_off()
            label = r"$x_t$: what the sampler holds" if name == "x_t" else r"model's guess of $x_0$"
            ax.set_title(label, fontsize=10)
        artists["title"] = fig.suptitle("", fontsize=10)
        return fig, artists

    def update(self, index: int) -> None:
        """Show frame `index` (called by the slider)."""
        index = int(index)
        text = self.describe(index)
        self.readout.value = text
        if index not in self._png_cache:
            frame = self.frames[index]
            n = len(frame.x_t)
            self._artists["x_t"].set_data(viz.image_grid(frame.x_t, nrow=n))
            self._artists["x0_pred"].set_data(viz.image_grid(frame.x0_pred, nrow=n))
            self._artists["title"].set_text(f"{self.title}   {text}".strip())
            self._png_cache[index] = figure_to_png(self._figure)
        self.image.value = self._png_cache[index]

    def _draw_fallback(self, count: int) -> Figure:
        """A strip of `count` frames spread over the run: x_t on top, the guess of x_0 below."""
        last = len(self.frames) - 1
        count = max(2, min(count, last + 1))
        picks = sorted({round(i * last / (count - 1)) for i in range(count)})
        n = len(self.frames[0].x_t)
        nrow = max(1, math.ceil(math.sqrt(n)))
        height, width = viz.image_grid(self.frames[0].x_t, nrow=nrow).shape[:2]
        cell = 1.45   # inches per frame
        fig, axes = plt.subplots(2, len(picks), squeeze=False,
                                 figsize=(cell * len(picks) + 0.6, 2 * cell * height / width + 0.9))
        for c, index in enumerate(picks):
            frame = self.frames[index]
            for r, images in enumerate([frame.x_t, frame.x0_pred]):
                ax = axes[r, c]
                ax.imshow(viz.image_grid(images, nrow=nrow), cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
            axes[0, c].set_title("done" if frame.t < 0 else f"t = {frame.t}", fontsize=10)
        axes[0, 0].set_ylabel(r"$x_t$", fontsize=11)
        axes[1, 0].set_ylabel(r"guess of $x_0$", fontsize=10)
        if self.title:
            fig.suptitle(self.title, fontsize=11)
        fig.tight_layout()
        return fig


def reverse_process_explorer(model, schedule: NoiseSchedule, labels: Sequence[int] | Tensor | None = (0, 1, 2, 3), *,
                             shape: tuple = (1, 28, 28), sampler: str = "ddim", num_steps: int | None = 50,
                             guidance_scale: float = 3.0, seed: int = 0, num_images: int = 4,
                             fallback: bool = True, progress: bool = True) -> ReverseProcessExplorer:
    """Generate a few images once and explore the reverse process with a "reverse step" slider.

    Args:
        model: `model(x_t, t, cond) -> eps_pred`. A class-conditional model is wrapped in
            classifier-free guidance at guidance_scale (guidance.guided; lesson 05 explains it).
        labels: the classes to generate, one image each; None for unlabelled images.
        shape: (C, H, W) of one image.
        sampler: "ddpm" (every one of the T steps: T + 1 frames), "ddim" or "dpm".
        num_steps: model calls for "ddim" and "dpm" (ignored by "ddpm").
        seed: seeds the starting noise (and DDPM's noise), so the same seed gives the same images.
        num_images: how many images when labels is None.
        fallback: keep a static strip (shown where widgets cannot run) of 8 frames.
        progress: show a progress bar while the images are made (it disappears when done).
    Returns:
        A ReverseProcessExplorer (an ipywidgets.VBox); see its attributes.
    """
    cond = None if labels is None else torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    frames = []

    x_T = torch.randn(num_images if cond is None else len(cond), *shape, generator=torch.Generator().manual_seed(seed))
    timesteps = sampling.timestep_grid(sampler, schedule, None if sampler == "ddpm" else num_steps)
    bar = tqdm(total=len(timesteps), desc=f"{sampler}, {len(x_T)} images", unit="step", leave=False,
               disable=not progress)

    def record(step: sampling.SamplerStep) -> None:      # what the model saw at t, and its guess of x0
        frames.append(ReverseFrame(step.i, step.t, step.x_t.detach().cpu(), step.x0_pred.detach().cpu()))
        bar.update(1)

    with bar:
        samples = sampling.SAMPLERS[sampler](guided(model, guidance_scale), x_T, schedule, timesteps, cond=cond,
                                             generator=torch.Generator().manual_seed(seed), callback=record)
    frames.append(ReverseFrame(len(frames), -1, samples.detach().cpu(), samples.detach().cpu()))
    title = f"{sampler.upper()}, {len(frames) - 1} steps, seed {seed}"
    return ReverseProcessExplorer(frames, title=title, fallback=fallback)


# --- Lesson 05: the guidance scale ----------------------------------------------------------

def _start(explorer, controls: Sequence, fallback_figure: Figure, fallback: bool) -> None:
    """The last steps of an explorer's __init__: redraw when any control changes, draw the first
    setting, and keep the static figure as the widget's static copy (or just close it)."""
    for control in controls:
        control.observe(lambda change: explorer.update(), names="value")
    explorer.update()
    keep_static_copy(explorer, fallback_figure, fallback)


def _sample_grid(model, schedule: NoiseSchedule, labels: Tensor, guidance_scale: float, num_steps: int,
                 seed: int, sampler: str = "dpm") -> Tensor:
    """One sample per label (on the CPU, in [-1, 1]) from the starting noise of `seed`."""
    return generate(model, schedule, num=len(labels), shape=image_shape(model), cond=labels,
                    guidance_scale=guidance_scale, sampler=sampler, sampling_steps=int(num_steps), seed=int(seed)).cpu()


class GuidanceExplorer(StaticCopy, ipywidgets.VBox):
    """A grid of samples of one digit, redrawn when the guidance scale, digit, steps or seed change.

    Every grid starts from the same noise (set by the seed), so moving the "guidance scale w"
    slider shows what guidance alone does to the same images. Grids are cached per setting, so
    going back to a setting seen before is instant.

    Attributes (for driving it from code):
        slider: the FloatSlider "guidance scale w" (0 .. max_guidance, step 0.5).
        digit: a ToggleButtons class picker (0-9, or the class names given).  steps: an IntSlider, sampler steps.
        seed: a BoundedIntText, the seed of the starting noise.
        image: the ipywidgets.Image showing the grid; `image.value` is PNG bytes.
        status: an ipywidgets.Label describing the grid shown (and how long it took to make).
        images: (N, C, H, W) the samples shown now.
        fallback_figure: the static figure drawn at creation (rows for a few scales; closed).
    """

    def __init__(self, model, schedule: NoiseSchedule, digit: int = 3, guidance_scale: float = 3.0,
                 num_steps: int = 10, seed: int = 0, num_images: int = 8, max_guidance: float = 8.0,
                 sampler: str = "dpm", fallback_scales: Sequence[float] = (0.0, 1.0, 3.0, 8.0),
                 fallback: bool = True, class_names: Sequence[str] | None = None):
        if getattr(model, "null_class", None) is None:
            raise ValueError("The guidance explorer needs a class-conditional model (with a null class).")
        if not 0 <= digit < model.null_class:
            raise ValueError(f"digit must lie in [0, {model.null_class}), got {digit}.")
        if class_names is not None and len(class_names) != model.null_class:
            raise ValueError(f"class_names must name the model's {model.null_class} classes, got {len(class_names)} names.")
        self.names = [str(c) for c in range(model.null_class)] if class_names is None else list(class_names)
        self.kind = "digit" if class_names is None else "class"
        self.model, self.schedule, self.sampler, self.num_images = model, schedule, sampler, num_images
        self._cache: dict[tuple, tuple[Tensor, bytes]] = {}
        self.slider = ipywidgets.FloatSlider(value=guidance_scale, min=0.0, max=max_guidance, step=0.5,
                                             description="guidance scale w", readout=True, readout_format=".1f",
                                             continuous_update=False, style={"description_width": "initial"},
                                             layout=ipywidgets.Layout(width="520px"))
        self.digit = ipywidgets.ToggleButtons(options=list(zip(self.names, range(model.null_class))), value=digit,
                                              description=self.kind,
                                              style={"button_width": "32px" if class_names is None else "84px"})
        self.steps = ipywidgets.IntSlider(value=num_steps, min=2, max=30, step=1, description="steps",
                                          continuous_update=False)
        self.seed = ipywidgets.BoundedIntText(value=seed, min=0, max=2**31 - 1, description="seed",
                                              layout=ipywidgets.Layout(width="180px"))
        self.status = ipywidgets.Label()
        self.image = ipywidgets.Image(format="png")
        self._figure = Figure(figsize=(0.85 * num_images + 0.2, 1.3))
        ax = self._figure.add_axes((0.01, 0.02, 0.98, 0.74))
        ax.set_axis_off()
        blank = torch.zeros(num_images, model.config.in_channels, model.config.image_size, model.config.image_size)
        self._grid = ax.imshow(viz.image_grid(blank, nrow=num_images), cmap="gray", vmin=0, vmax=1)
        self._title = self._figure.suptitle("", fontsize=10, y=0.97)
        super().__init__([self.slider, self.digit, ipywidgets.HBox([self.steps, self.seed]), self.image,
                          self.status])
        _start(self, (self.slider, self.digit, self.steps, self.seed), self._draw_fallback(fallback_scales), fallback)

    def setting(self) -> tuple:
        """(digit, guidance scale, steps, seed) as now chosen."""
        return int(self.digit.value), float(self.slider.value), int(self.steps.value), int(self.seed.value)

    def samples(self, digit: int, scale: float, steps: int, seed: int) -> Tensor:
        """The grid for one setting (cached)."""
        key = (digit, scale, steps, seed)
        if key not in self._cache:
            labels = torch.full((self.num_images,), digit, dtype=torch.long)
            images = _sample_grid(self.model, self.schedule, labels, scale, steps, seed, self.sampler)
            self._cache[key] = (images, b"")
        return self._cache[key][0]

    def update(self) -> None:
        """Show the grid for the current setting (called when a control changes)."""
        key = self.setting()
        start = time.perf_counter()
        images = self.samples(*key)
        if not self._cache[key][1]:
            digit, scale, steps, seed = key
            self._grid.set_data(viz.image_grid(images, nrow=self.num_images))
            sampler = {"dpm": "DPM-Solver++", "ddim": "DDIM", "ddpm": "DDPM"}.get(self.sampler, self.sampler)
            self._title.set_text(f"{self.kind} {self.names[digit]}, guidance scale w = {scale:.1f}  ({sampler}, {steps} steps, seed {seed})")
            self._cache[key] = (images, figure_to_png(self._figure))
        self.images = images
        self.image.value = self._cache[key][1]
        self.status.value = (f"{self.num_images} samples of {self.kind} {self.names[key[0]]} at w = {key[1]:.1f}"
                             f" · made in {time.perf_counter() - start:.2f} s (cached settings are instant)")

    def _draw_fallback(self, scales: Sequence[float]) -> Figure:
        digit, _, steps, seed = self.setting()
        rows = [self.samples(digit, float(scale), steps, seed) for scale in scales]
        return viz.show_image_rows(rows, [f"w = {scale:g}" for scale in scales], size=0.8,
                                   title=f"{self.kind} {self.names[digit]}: the same starting noise at several guidance scales")


def guidance_explorer(model, schedule: NoiseSchedule, digit: int = 3, guidance_scale: float = 3.0,
                      num_steps: int = 10, seed: int = 0, num_images: int = 8, fallback: bool = True,
                      class_names: Sequence[str] | None = None) -> GuidanceExplorer:
    """A "guidance scale w" slider (with a digit picker, step count and seed) over a grid of samples.

    Args:
        model: a class-conditional `model(x_t, t, cond) -> eps_pred` with a null class; it is wrapped
            in guidance.ClassifierFreeGuidance at each scale.
        digit, guidance_scale, num_steps, seed: the starting setting. Sampling is DPM-Solver++
            (deterministic), so the same setting always gives the same grid.
        num_images: images per grid; 8 with 10 steps takes under a second on a 2-core CPU.
        fallback: keep a static figure (shown where widgets cannot run) of the grid at w = 0, 1, 3 and 8.
        class_names: the buttons' names for the classes (e.g. CIFAR-10's, lesson 07); None: digits 0-9.
    Returns:
        A GuidanceExplorer (an ipywidgets.VBox); see its attributes.
    """
    return GuidanceExplorer(model, schedule, digit, guidance_scale, num_steps, seed, num_images, fallback=fallback,
                            class_names=class_names)


# --- Lesson 10: between the ODE and the SDE ------------------------------------------------------

class EtaExplorer(StaticCopy, ipywidgets.VBox):
    """DDIM samples from one starting noise, with an "eta" slider (lesson 10): eta = 0 follows the
    probability-flow ODE (no noise is added on the way), eta = 1 adds as much fresh noise per step as
    DDPM's ancestral sampler, values in between a share of it. Grids are cached per setting.

    Attributes (for driving it from code):
        slider: the FloatSlider "eta" (0 .. 1, step 0.1).  seed: a BoundedIntText, the seed.
        image: the ipywidgets.Image showing the grid; `image.value` is PNG bytes.
        status: an ipywidgets.Label describing the grid shown.  images: (N, C, H, W) the samples shown now.
        fallback_figure: the static figure drawn at creation (rows for a few values of eta; closed).
    """

    def __init__(self, model, schedule: NoiseSchedule, labels: Sequence[int] = tuple(range(10)), eta: float = 0.0,
                 num_steps: int = 20, guidance_scale: float = 2.0, seed: int = 0,
                 fallback_etas: Sequence[float] = (0.0, 0.5, 1.0), fallback: bool = True):
        self.model, self.schedule, self.num_steps = guided(model, guidance_scale), schedule, num_steps
        self.shape = image_shape(model)
        self.labels, self.guidance_scale = torch.as_tensor(labels, dtype=torch.long).reshape(-1), guidance_scale
        self._cache: dict[tuple, tuple[Tensor, bytes]] = {}
        self.slider = ipywidgets.FloatSlider(value=eta, min=0.0, max=1.0, step=0.1, description="eta",
                                             readout_format=".1f", continuous_update=False,
                                             layout=ipywidgets.Layout(width="520px"))
        self.seed = ipywidgets.BoundedIntText(value=seed, min=0, max=2**31 - 1, description="seed",
                                              layout=ipywidgets.Layout(width="180px"))
        self.status, self.image = ipywidgets.Label(), ipywidgets.Image(format="png")
        n = len(self.labels)
        self._figure = Figure(figsize=(0.85 * n + 0.2, 1.3))
        ax = self._figure.add_axes((0.01, 0.02, 0.98, 0.74))
        ax.set_axis_off()
        self._grid = ax.imshow(viz.image_grid(torch.zeros(n, *self.shape), nrow=n), cmap="gray", vmin=0, vmax=1)
        self._title = self._figure.suptitle("", fontsize=10, y=0.97)
        super().__init__([self.slider, self.seed, self.image, self.status])
        _start(self, (self.slider, self.seed), self._draw_fallback(fallback_etas), fallback)

    def samples(self, eta: float, seed: int) -> Tensor:
        """The grid for one setting (cached): the same starting noise for every eta."""
        key = (round(eta, 4), seed)
        if key not in self._cache:
            x_T = torch.randn(len(self.labels), *self.shape, generator=torch.Generator().manual_seed(seed))
            images = sampling.sample(self.model, x_T, self.schedule, sampler="ddim", sampling_steps=self.num_steps,
                                     cond=self.labels, eta=key[0], clip_x0=1.0,
                                     generator=torch.Generator().manual_seed(seed + 1)).clamp(-1, 1)
            self._cache[key] = (images, b"")
        return self._cache[key][0]

    def update(self) -> None:
        """Show the grid for the current setting (called when a control changes)."""
        key = (round(float(self.slider.value), 4), int(self.seed.value))
        start = time.perf_counter()
        images = self.samples(*key)
        if not self._cache[key][1]:
            self._grid.set_data(viz.image_grid(images, nrow=len(images)))
            self._title.set_text(f"DDIM, {self.num_steps} steps, eta = {key[0]:.1f}, w = {self.guidance_scale:g}, seed {key[1]}")
            self._cache[key] = (images, figure_to_png(self._figure))
        self.images = images
        self.image.value = self._cache[key][1]
        self.status.value = f"eta = {key[0]:.1f} · made in {time.perf_counter() - start:.2f} s (cached settings are instant)"

    def _draw_fallback(self, etas: Sequence[float]) -> Figure:
        seed = int(self.seed.value)
        rows = [self.samples(float(eta), seed) for eta in etas]
        return viz.show_image_rows(rows, [f"eta = {eta:g}" for eta in etas], size=0.8,
                                   title=f"DDIM, {self.num_steps} steps: the same starting noise at several eta")


def eta_explorer(model, schedule: NoiseSchedule, labels: Sequence[int] = tuple(range(10)), eta: float = 0.0,
                 num_steps: int = 20, guidance_scale: float = 2.0, seed: int = 0, fallback: bool = True) -> EtaExplorer:
    """An "eta" slider over DDIM samples of `labels` (one image each) from one starting noise.

    Args:
        model: a class-conditional `model(x_t, t, cond) -> eps_pred`, wrapped in guidance at guidance_scale.
        eta: the starting value (0: the ODE, 1: DDPM's noise level); num_steps: DDIM steps.
        fallback: keep a static figure (shown where widgets cannot run) with rows at eta = 0, 0.5 and 1.
    Returns:
        An EtaExplorer (an ipywidgets.VBox); see its attributes.
    """
    return EtaExplorer(model, schedule, labels, eta, num_steps, guidance_scale, seed, fallback=fallback)


# --- Lesson 06: image-to-image ----------------------------------------------------------------

class StrengthExplorer(StaticCopy, ipywidgets.VBox):
    """Image-to-image (SDEdit) on a few real images, with a "strength" slider.

    The top row shows the originals, the bottom row their edits at the chosen strength: each image
    is noised to the timestep t_start = ceil(strength * T) - 1 and denoised from there with DDIM.
    Optionally the edit is steered towards another class (with classifier-free guidance). Results
    are cached per setting.

    Attributes (for driving it from code):
        slider: the FloatSlider "strength" (0 .. 1, step 0.05).
        target: a Dropdown, -1 for "no label" or the class to steer towards.
        seed: a BoundedIntText, the seed of the noise.
        image: the ipywidgets.Image showing originals and edits; `image.value` is PNG bytes.
        status: an ipywidgets.Label describing what is shown.
        edits: (N, C, H, W) the edits shown now.
        fallback_figure: the static figure drawn at creation (edits at several strengths; closed).
    """

    def __init__(self, model, schedule: NoiseSchedule, images: Tensor, strength: float = 0.5, target: int = -1,
                 num_steps: int = 20, guidance_scale: float = 3.0, seed: int = 0,
                 fallback_strengths: Sequence[float] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0), fallback: bool = True):
        check_images(images)
        num_classes = getattr(model, "null_class", None)
        if target != -1 and (num_classes is None or not 0 <= target < num_classes):
            raise ValueError(f"target must be -1 (no label) or a class of this conditional model, got {target}.")
        self.model, self.schedule, self.originals = model, schedule, images.detach().cpu()
        self.num_steps, self.guidance_scale = num_steps, guidance_scale
        self._cache: dict[tuple, list] = {}
        self.slider = ipywidgets.FloatSlider(value=strength, min=0.0, max=1.0, step=0.05, description="strength",
                                             readout=True, readout_format=".2f", continuous_update=False,
                                             layout=ipywidgets.Layout(width="520px"))
        options = [("no label", -1)] + ([(f"a {d}", d) for d in range(num_classes)] if num_classes else [])
        self.target = ipywidgets.Dropdown(options=options, value=target, description="towards",
                                          layout=ipywidgets.Layout(width="200px"))
        self.seed = ipywidgets.BoundedIntText(value=seed, min=0, max=2**31 - 1, description="seed",
                                              layout=ipywidgets.Layout(width="180px"))
        self.status = ipywidgets.Label()
        self.image = ipywidgets.Image(format="png")
        n = len(images)
        self._figure = Figure(figsize=(0.95 * n + 0.9, 2.3))
        self._rows = []
        for row, label in enumerate(["original", "edit"]):
            ax = self._figure.add_axes((0.12, 0.5 - 0.46 * row, 0.87, 0.36))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
            self._rows.append(ax.imshow(viz.image_grid(self.originals, nrow=n), cmap="gray", vmin=0, vmax=1))
        self._title = self._figure.suptitle("", fontsize=10, y=0.98)
        super().__init__([self.slider, ipywidgets.HBox([self.target, self.seed]), self.image, self.status])
        _start(self, (self.slider, self.target, self.seed), self._draw_fallback(fallback_strengths), fallback)

    def setting(self) -> tuple:
        """(strength, target, seed) as now chosen."""
        return round(float(self.slider.value), 4), int(self.target.value), int(self.seed.value)

    def edit(self, strength: float, target: int, seed: int) -> Tensor:
        """The edits for one setting (cached)."""
        key = (strength, target, seed)
        if key not in self._cache:
            cond = None if target < 0 else torch.full((len(self.originals),), target, dtype=torch.long)
            model = self.model if target < 0 else guided(self.model, self.guidance_scale)
            out = img2img(model, self.originals, self.schedule, strength=strength, sampler="ddim",
                          sampling_steps=self.num_steps, cond=cond, generator=torch.Generator().manual_seed(seed))
            self._cache[key] = [out.clamp(-1, 1).cpu(), b""]
        return self._cache[key][0]

    def describe(self, strength: float, target: int) -> str:
        where = "no change" if strength == 0 else f"t_start = {math.ceil(strength * self.schedule.num_steps) - 1}"
        towards = "" if target < 0 else f", towards a {target} (guidance {self.guidance_scale:g})"
        return f"strength {strength:.2f} ({where}){towards}"

    def update(self) -> None:
        """Show the edits for the current setting (called when a control changes)."""
        key = self.setting()
        start = time.perf_counter()
        edits = self.edit(*key)
        if not self._cache[key][1]:
            self._rows[1].set_data(viz.image_grid(edits, nrow=len(edits)))
            self._title.set_text(self.describe(key[0], key[1]) + f", seed {key[2]}")
            self._cache[key][1] = figure_to_png(self._figure)
        self.edits = edits
        self.image.value = self._cache[key][1]
        self.status.value = f"{self.describe(key[0], key[1])} · made in {time.perf_counter() - start:.2f} s"

    def _draw_fallback(self, strengths: Sequence[float]) -> Figure:
        _, target, seed = self.setting()
        rows = [self.originals] + [self.edit(round(float(s), 4), target, seed) for s in strengths]
        labels = ["original"] + [f"strength {s:g}" for s in strengths]
        towards = "" if target < 0 else f", towards a {target}"
        return viz.show_image_rows(rows, labels, size=0.8, title=f"image-to-image at several strengths{towards}")


def strength_explorer(model, schedule: NoiseSchedule, images: Tensor, strength: float = 0.5, target: int = -1,
                      num_steps: int = 20, guidance_scale: float = 3.0, seed: int = 0,
                      fallback: bool = True) -> StrengthExplorer:
    """A "strength" slider for image-to-image (SDEdit) on a few real images.

    Args:
        model: `model(x_t, t, cond) -> eps_pred`; when a target class is chosen it must be
            class-conditional (it is wrapped in ClassifierFreeGuidance(guidance_scale)).
        images: (N, C, H, W) images in [-1, 1]; 4 to 8 look best.
        strength, target, seed: the starting setting (target -1: no label).
        num_steps: DDIM steps for strength 1 (a strength s takes about s * num_steps of them).
        fallback: keep a static figure (shown where widgets cannot run) of the edits at strengths 0, 0.2, ..., 1.
    Returns:
        A StrengthExplorer (an ipywidgets.VBox); see its attributes.
    """
    return StrengthExplorer(model, schedule, images, strength, target, num_steps, guidance_scale, seed,
                            fallback=fallback)


# --- Lesson 09: the studio (text to image, image to image, inpainting) ------------------------

SAMPLER_NAMES = {"dpm": "DPM-Solver++", "ddim": "DDIM", "ddpm": "DDPM (every step)"}
NO_START, PREVIOUS, NO_MASK = "none", "previous", "none"


class StudioSettings(NamedTuple):
    """What the studio's controls say (Studio.settings()); start is NO_START, PREVIOUS or the
    index of a test canvas, mask NO_MASK or one of editing.MASKS."""
    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    seed: int
    sampler: str
    num_images: int
    start: str | int
    strength: float
    mask: str


class Studio(StaticCopy, ipywidgets.VBox):
    """The controls of a Stable Diffusion web UI in one panel, for a text-to-image pipeline.

    Text to image by default; with a start image (a test canvas, or the first image of the last
    result), image to image at the chosen strength (editing.img2img), or, with a mask, inpainting
    of the masked region (editing.inpaint). Edits run in the latent space: the start image is
    encoded with the pipeline's autoencoder, edited, and decoded. Nothing happens until the
    Generate button is pressed (it is pressed once when the panel is made).

    A prompt the tokenizer cannot read (an unknown word, too many words) is shown as a message in
    the panel and the last images stay; nothing is raised.

    Attributes (for driving it from code):
        prompt, negative_prompt: Text boxes.  steps: IntSlider.  guidance: FloatSlider
            "guidance scale".  seed: BoundedIntText.  sampler: Dropdown of sampling.SAMPLERS.
        num_images: IntSlider "images".  start: Dropdown of start images.  strength: FloatSlider.
        mask: Dropdown, NO_MASK or one of editing.MASKS.  button: the Generate button; call
            `generate()` to press it.
        image: the ipywidgets.Image showing the result; `image.value` is PNG bytes.
        message: an ipywidgets.HTML, empty unless the last press went wrong (then it says why).
        status: an ipywidgets.Label describing the result shown and how long it took.
        images: (N, C, H, W) the images shown, in [-1, 1] (CPU).  prompts: the prompt of each.
        shown: the StudioSettings the images were made with.
        figure: the matplotlib Figure shown (prompt, settings, start image, results); None until
            the first images are made.
        fallback_figure: the first result's figure (closed; can be saved).
    """

    def __init__(self, pipeline, canvases=None, *, prompt: str = "", negative_prompt: str = "", num_steps: int = 20,
                 guidance_scale: float = 3.0, seed: int = 0, sampler: str = "dpm", num_images: int = 4,
                 max_images: int = 8, progress: bool = True, fallback: bool = True):
        if getattr(pipeline.model, "tokenizer", None) is None:
            raise ValueError("The studio needs a text-to-image pipeline (a model with a tokenizer), "
                             "e.g. generate.load_pipeline('prompted-digits').")
        self.pipeline, self.progress = pipeline, progress
        self.autoencoder = pipeline.autoencoder
        self.start_images, self.start_captions = _canvases(canvases, pipeline.images_shape)
        self.images, self.prompts, self.shown, self.figure = None, [], None, None
        self._controls(prompt, negative_prompt, num_steps, guidance_scale, seed, sampler, num_images, max_images)
        row = ipywidgets.HBox
        super().__init__([self.prompt, self.negative_prompt, row([self.steps, self.guidance]),
                          row([self.sampler, self.seed, self.num_images]), row([self.start, self.strength, self.mask]),
                          row([self.button, self.status]), self.message, self.progress_area, self.image])
        self.button.on_click(lambda button: self.generate())
        for control in (self.start, self.mask):
            control.observe(lambda change: self._enable_edit_controls(), names="value")
        self._enable_edit_controls()
        self.generate()
        if self.figure is not None:
            keep_static_copy(self, self.figure, fallback)

    def _controls(self, prompt, negative_prompt, num_steps, guidance_scale, seed, sampler, num_images, max_images):
        """Make the widgets (see the class docstring)."""
        style, wide = {"description_width": "110px"}, ipywidgets.Layout(width="640px")
        self.prompt = ipywidgets.Text(value=prompt, description="prompt", style=style, layout=wide,
                                      placeholder="e.g. a red 3 on the left and a blue 7 on the right")
        self.negative_prompt = ipywidgets.Text(value=negative_prompt, description="negative prompt", style=style,
                                               layout=wide, placeholder="what to steer away from (optional)")
        self.steps = ipywidgets.IntSlider(value=num_steps, min=1, max=50, description="steps", style=style,
                                          continuous_update=False)
        self.guidance = ipywidgets.FloatSlider(value=guidance_scale, min=0.0, max=10.0, step=0.5, readout_format=".1f",
                                               description="guidance scale", style=style, continuous_update=False)
        samplers = [(SAMPLER_NAMES.get(name, name), name) for name in sampling.SAMPLERS]
        self.sampler = ipywidgets.Dropdown(options=samplers, value=sampler, description="sampler", style=style)
        self.seed = ipywidgets.BoundedIntText(value=seed, min=0, max=2**31 - 1, description="seed",
                                              layout=ipywidgets.Layout(width="170px"))
        self.num_images = ipywidgets.IntSlider(value=num_images, min=1, max=max_images, description="images",
                                               continuous_update=False)
        starts = [("none (text to image)", NO_START), ("the previous result", PREVIOUS)]
        starts += [(f"test canvas {i}" + (f": {text}" if text else ""), i)
                   for i, text in enumerate(self.start_captions)]
        self.start = ipywidgets.Dropdown(options=starts, value=NO_START, description="start image", style=style)
        self.strength = ipywidgets.FloatSlider(value=0.6, min=0.05, max=1.0, step=0.05, readout_format=".2f",
                                               description="strength", continuous_update=False)
        self.mask = ipywidgets.Dropdown(options=[("none", NO_MASK)] + [(name, name) for name in MASKS],
                                        value=NO_MASK, description="mask", layout=ipywidgets.Layout(width="170px"))
        self.button = ipywidgets.Button(description="Generate", button_style="primary", icon="paint-brush")
        self.status, self.message, self.progress_area = ipywidgets.Label(), ipywidgets.HTML(), ipywidgets.Output()
        self.image = ipywidgets.Image(format="png")

    def _enable_edit_controls(self) -> None:
        """Strength counts for image to image only; a mask needs a start image."""
        self.mask.disabled = self.start.value == NO_START
        self.strength.disabled = self.start.value == NO_START or self.mask.value != NO_MASK

    def settings(self) -> StudioSettings:
        """The controls' values now."""
        return StudioSettings(self.prompt.value, self.negative_prompt.value, int(self.steps.value),
                              float(self.guidance.value), int(self.seed.value), self.sampler.value,
                              int(self.num_images.value), self.start.value, round(float(self.strength.value), 4),
                              self.mask.value)

    def generate(self) -> None:
        """Make images with the current settings and show them (what the Generate button does).
        A bad setting (an unknown word in a prompt, ...) is shown as a message instead."""
        setting, began = self.settings(), time.perf_counter()
        self.button.disabled, self.button.description, self.message.value = True, "Generating...", ""
        images, problem = None, None
        try:
            with self.progress_area:        # the progress bar shows inside the panel
                try:
                    images = self.make(setting)
                except (ValueError, FloatingPointError) as error:    # the library's clear errors
                    problem = error
        finally:
            self.button.disabled, self.button.description = False, "Generate"
        if images is None and problem is None:
            return                          # a bug: in a notebook, the log shows its traceback
        self.progress_area.clear_output()
        if problem is not None:
            self.message.value = _problem_html(problem)
            self.status.value = "nothing new was made (see the message below)"
            return
        self.show(images, setting)
        self.status.value = f'{len(images)} images for "{setting.prompt}" made in {time.perf_counter() - began:.1f} s'

    def make(self, setting: StudioSettings) -> Tensor:
        """(num_images, C, H, W) images in [-1, 1] (CPU) for one setting; ValueError for a bad one."""
        model, pipeline = self.pipeline.model, self.pipeline
        ids = prompt_ids(model, [setting.prompt], setting.num_images)
        negative = model.tokenizer.encode([setting.negative_prompt]) if setting.negative_prompt.strip() else None
        if setting.start == NO_START:
            return generate(model, pipeline.schedule, num=setting.num_images, shape=pipeline.shape, cond=ids,
                            guidance_scale=setting.guidance_scale, negative=negative, sampler=setting.sampler,
                            sampling_steps=setting.steps, seed=setting.seed, decode=pipeline.decode,
                            clip_x0=self._clip_x0, device=self._device, progress=self.progress).cpu()
        return self._edit(setting, ids, negative)

    @property
    def _device(self) -> torch.device:
        return next(self.pipeline.model.parameters()).device

    @property
    def _clip_x0(self) -> float | None:
        return None if self.pipeline.decode is not None else 1.0     # latents have no fixed range

    def start_image(self, start: str | int) -> Tensor:
        """(1, C, H, W) the start image a `start` choice names (ValueError when there is none yet)."""
        if start == PREVIOUS:
            if self.images is None:
                raise ValueError("There is no previous result yet: generate from the prompt first.")
            return self.images[:1]
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < len(self.start_images):
            raise ValueError(f"start must be {NO_START!r}, {PREVIOUS!r} or a test canvas index, got {start!r}.")
        return self.start_images[start:start + 1]

    def _edit(self, setting: StudioSettings, ids: Tensor, negative: Tensor | None) -> Tensor:
        """Image to image (no mask) or inpainting (a mask) of the start image, in the latent space."""
        start = self.start_image(setting.start).to(self._device)
        generator = torch.Generator(self._device).manual_seed(setting.seed)
        options = dict(sampler=setting.sampler, sampling_steps=setting.steps, cond=ids.to(self._device),
                       generator=generator, clip_x0=self._clip_x0)
        negative = None if negative is None else negative.to(self._device)
        model = guided(self.pipeline.model, setting.guidance_scale, negative)
        with torch.no_grad():
            x0 = self._encode(start).expand(setting.num_images, -1, -1, -1).contiguous()
            if setting.mask == NO_MASK:
                edited = img2img(model, x0, self.pipeline.schedule, strength=setting.strength, **options)
            else:
                mask = mask_of(setting.mask, x0.shape[-2:]).to(x0)
                edited = inpaint(model, x0, mask, self.pipeline.schedule, **options)
            return self._decode(edited).clamp(-1, 1).cpu()

    def _encode(self, images: Tensor) -> Tensor:
        return images if self.autoencoder is None else self.autoencoder.encode_latents(images)

    def _decode(self, latents: Tensor) -> Tensor:
        return latents if self.pipeline.decode is None else self.pipeline.decode(latents)

    def show(self, images: Tensor, setting: StudioSettings) -> None:
        """Show `images` (made with `setting`) with their prompt; they become the previous result."""
        start = None if setting.start == NO_START else self.start_image(setting.start)
        if start is not None and setting.mask != NO_MASK:      # the region to regenerate, darkened
            start = start * (1 - 0.6 * mask_of(setting.mask, start.shape[-2:]))
        self.figure = studio_figure(images, setting, describe_setting(setting), start)
        self.image.value = figure_to_png(self.figure, dpi=120)
        self.image.layout.width = f"{round(self.figure.get_figwidth() * 120)}px"    # not stretched to the panel
        self.images, self.prompts, self.shown = images, [setting.prompt] * len(images), setting


def describe_setting(setting: StudioSettings) -> str:
    """One line: the negative prompt, sampler, steps, guidance, seed and the kind of edit."""
    parts = [f'negative: "{setting.negative_prompt}"'] if setting.negative_prompt.strip() else []
    steps = "every step" if setting.sampler == "ddpm" else f"{setting.steps} steps"
    parts += [f"{SAMPLER_NAMES.get(setting.sampler, setting.sampler)}, {steps}", f"w = {setting.guidance_scale:g}",
              f"seed {setting.seed}"]
    start = "the previous result" if setting.start == PREVIOUS else f"test canvas {setting.start}"
    if setting.start != NO_START and setting.mask == NO_MASK:
        parts.append(f"image to image from {start}, strength {setting.strength:g}")
    elif setting.start != NO_START:
        parts.append(f"inpainting the {setting.mask} of {start}")
    return " · ".join(parts)


def studio_figure(images: Tensor, setting: StudioSettings, detail: str, start: Tensor | None = None) -> Figure:
    """The images (four a row) under their prompt and `detail`; the start image on the left."""
    ncol = min(4, len(images))
    nrow, extra = math.ceil(len(images) / ncol), int(start is not None)
    width = 1.75 * (ncol + extra) + 0.3
    prompt = setting.prompt.strip() or "(the empty prompt: no condition)"
    title = textwrap.wrap(f'"{prompt}"', int(12 * width)) + textwrap.wrap(detail, int(13 * width))
    fig = Figure(figsize=(width, 0.95 * nrow + 0.3 + 0.17 * len(title)), layout="constrained")
    grid = fig.add_gridspec(nrow, ncol + extra)
    label = "start image" if setting.mask == NO_MASK else f"start ({setting.mask} masked)"
    tiles = [(grid[0, 0], start, label)] if start is not None else []
    tiles += [(grid[i // ncol, extra + i % ncol], images[i:i + 1], None) for i in range(len(images))]
    for place, image, text in tiles:
        ax = fig.add_subplot(place)
        ax.imshow(viz.to_numpy_images(image)[0], cmap="gray", vmin=0, vmax=1)
        ax.set_axis_off()
        if text:
            ax.set_title(text, fontsize=8, color="dimgray")
    fig.suptitle("\n".join(title), fontsize=9)
    return fig


def mask_of(name: str, size: Sequence[int]) -> Tensor:
    """A (1, 1, H, W) mask, 1 in the region to regenerate, for any H x W (editing.make_mask makes
    square ones): a square mask of the longer side, resized (nearest) to H x W."""
    height, width = int(size[0]), int(size[1])
    square = make_mask(name, max(height, width))
    return torch.nn.functional.interpolate(square, size=(height, width), mode="nearest")


def _canvases(canvases, images_shape: tuple) -> tuple[Tensor, list[str]]:
    """Start images and their captions from a PromptedDigits (or anything with .images and
    .captions), an (N, C, H, W) tensor of images in [-1, 1], or None (no test canvases)."""
    if canvases is None:
        return torch.zeros(0, *images_shape), []
    images = canvases if isinstance(canvases, Tensor) else canvases.images
    captions = [""] * len(images) if isinstance(canvases, Tensor) else list(canvases.captions)
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(images_shape):
        raise ValueError(f"The start images must have shape (N, {', '.join(map(str, images_shape))}) like the "
                         f"pipeline's images, got {tuple(images.shape)}.")
    captions = [text if len(text) <= 60 else text[:57] + "..." for text in captions]
    return images.detach().float().cpu(), captions


def _problem_html(error: Exception) -> str:
    """A ValueError's message as a short red note for the panel."""
    return (f'<div style="color: #b00020; max-width: 640px; white-space: normal">'
            f"<b>Nothing generated:</b> {html.escape(str(error))}</div>")


def studio(pipeline, canvases=None, *, prompt: str = "a red 3 on the left and a blue 7 on the right",
           negative_prompt: str = "", num_steps: int = 20, guidance_scale: float = 3.0, seed: int = 0,
           sampler: str = "dpm", num_images: int = 4, progress: bool = True, fallback: bool = True) -> Studio:
    """A text-to-image studio: prompt, negative prompt, steps, guidance scale, seed, sampler, number
    of images, and an optional start image with a strength (image to image) or a mask (inpainting).

        pipeline = generate.load_pipeline("prompted-digits")
        widgets.studio(pipeline, captions.build_prompted_digits(8, train=False))

    Args:
        pipeline: a generate.Pipeline whose model takes prompts (it has a tokenizer); for a latent
            model, its autoencoder encodes start images.
        canvases: start images to offer: a captions.PromptedDigits (shown with their captions), an
            (N, C, H, W) tensor in [-1, 1], or None (only the previous result can be a start image).
        prompt, negative_prompt, num_steps, guidance_scale, seed, sampler, num_images: the
            starting setting; one set of images is made with it when the panel is created.
        progress: show a progress bar in the panel while sampling from the prompt.
        fallback: keep the first result's figure as the static copy (shown where widgets cannot run).
    Returns:
        A Studio (an ipywidgets.VBox); see its attributes.
    """
    return Studio(pipeline, canvases, prompt=prompt, negative_prompt=negative_prompt, num_steps=num_steps,
                  guidance_scale=guidance_scale, seed=seed, sampler=sampler, num_images=num_images,
                  progress=progress, fallback=fallback)
