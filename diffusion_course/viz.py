"""Plotting helpers for the notebooks (matplotlib only).

Every function draws into a new figure, or into the axes you pass, and returns the figure.
Nothing here keeps state between calls. Images are (N, C, H, W) tensors in [-1, 1], the
range the models work in.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Rectangle
from torch import Tensor

from .schedules import NoiseSchedule, q_sample, snr

SCHEDULE_COLORS = {"linear": "tab:blue", "cosine": "tab:orange"}


# --- Images -------------------------------------------------------------------------------

def to_numpy_images(images: Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W) or (N, H, W, 3) floats in [0, 1], ready for imshow."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}.")
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy()
    return pixels[:, 0] if pixels.shape[1] == 1 else pixels.transpose(0, 2, 3, 1)


def image_grid(images: Tensor, nrow: int = 8, padding: int = 1) -> np.ndarray:
    """Tile images into one array of nrow images per row, with white gaps between them."""
    pixels = to_numpy_images(images)
    n, h, w = pixels.shape[:3]
    rows = -(-n // nrow)
    grid = np.ones((rows * (h + padding) + padding, nrow * (w + padding) + padding) + pixels.shape[3:])
    for i, image in enumerate(pixels):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[top:top + h, left:left + w] = image
    return grid


def show_images(images: Tensor, nrow: int = 8, titles: Sequence[str] | None = None, ax=None,
                title: str | None = None, size: float = 1.0) -> Figure:
    """Show images (N, C, H, W) in [-1, 1] as a grid with nrow images per row.

    Args:
        titles: one short label per image (drawn in a separate small panel per image).
        ax: draw the tiled grid into these axes instead of a new figure (no per-image titles).
        title: a title over the whole grid.
        size: inches per image.
    Returns:
        The matplotlib figure.
    """
    nrow = max(1, min(nrow, len(images)))
    if titles is not None:
        if ax is not None:
            raise ValueError("Per-image titles need a figure of their own: pass titles or ax, not both.")
        return _show_images_with_titles(images, nrow, list(titles), title, size)
    if ax is None:
        rows = -(-len(images) // nrow)
        _, ax = plt.subplots(figsize=(size * nrow, size * rows + (0.4 if title else 0)))
    ax.imshow(image_grid(images, nrow), cmap="gray", vmin=0, vmax=1)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax.figure


def _show_images_with_titles(images: Tensor, nrow: int, titles: list, title: str | None,
                             size: float) -> Figure:
    if len(titles) != len(images):
        raise ValueError(f"Got {len(titles)} titles for {len(images)} images.")
    rows = -(-len(images) // nrow)
    fig, axes = plt.subplots(rows, nrow, figsize=(size * nrow, (size + 0.3) * rows + (0.3 if title else 0)),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, image, text in zip(axes.flat, to_numpy_images(images), titles):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        ax.set_title(text, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# --- Noise schedules ----------------------------------------------------------------------

def plot_schedule(schedules: Sequence[NoiseSchedule], t: int | None = None, axes=None) -> Figure:
    """alpha_bar_t (left) and the signal-to-noise ratio on a log scale (right) against t.

    Args:
        schedules: the schedules to compare (each labelled by its name).
        t: optional timestep to mark on every curve.
        axes: two matplotlib axes to draw into (a new figure when None).
    """
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_bar, ax_snr = axes
    for schedule in schedules:
        steps = np.arange(schedule.num_steps)
        color = SCHEDULE_COLORS.get(schedule.name)
        ax_bar.plot(steps, schedule.alpha_bar.numpy(), label=schedule.name, color=color)
        ax_snr.plot(steps, snr(schedule).numpy(), label=schedule.name, color=color)
        if t is not None:
            ax_bar.plot(t, float(schedule.alpha_bar[t]), "o", color=color)
            ax_snr.plot(t, float(snr(schedule)[t]), "o", color=color)
    ax_bar.set(xlabel="timestep t", ylabel=r"$\bar\alpha_t$", title=r"signal kept: $\bar\alpha_t$", ylim=(-0.03, 1.03))
    ax_snr.set(xlabel="timestep t", ylabel="SNR (log scale)", yscale="log",
               title=r"SNR $= \bar\alpha_t / (1 - \bar\alpha_t)$")
    for ax in axes:
        if t is not None:
            ax.axvline(t, color="gray", linestyle=":", linewidth=1)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_bar.figure.tight_layout()
    return ax_bar.figure


def show_noising(x0: Tensor, schedules: Sequence[NoiseSchedule], timesteps: Sequence[int],
                 noise: Tensor | None = None, size: float = 1.1) -> Figure:
    """x_t at a few timesteps: one column per timestep, one row per (schedule, image).

    The same noise is used for every schedule and timestep, so only the schedule and t change.

    Args:
        x0: (N, C, H, W) clean images in [-1, 1].
        noise: (N, C, H, W) standard normal noise; drawn once when None.
    """
    if noise is None:
        noise = torch.randn_like(x0)
    rows = [(schedule, i) for schedule in schedules for i in range(len(x0))]
    fig, axes = plt.subplots(len(rows), len(timesteps), squeeze=False,
                             figsize=(size * len(timesteps) + 0.8, size * len(rows) + 0.4))
    for r, (schedule, i) in enumerate(rows):
        for c, step in enumerate(timesteps):
            t = torch.tensor([step])
            x_t = q_sample(x0[i:i + 1], t, schedule, noise[i:i + 1])
            ax = axes[r, c]
            ax.imshow(to_numpy_images(x_t)[0], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t = {step}", fontsize=10)
            if c == 0:
                ax.set_ylabel(schedule.name, fontsize=10, color=SCHEDULE_COLORS.get(schedule.name, "black"))
    fig.tight_layout()
    return fig


# --- The U-Net ----------------------------------------------------------------------------

def draw_unet(channel_mults: Sequence[int] = (1, 2, 4), base_channels: int = 16,
              image_size: int = 28) -> Figure:
    """A block diagram of the course's U-Net: the encoder going down, the decoder coming up,
    the skip connections across, and attention at the lowest resolution."""
    levels = len(channel_mults)
    fig, ax = plt.subplots(figsize=(10, 1.4 * levels + 1.8))
    for level, mult in enumerate(channel_mults):
        y, size = levels - level, image_size // 2 ** level
        label = f"{size}x{size}, {base_channels * mult} channels"
        _box(ax, 0.5, y, f"ResBlock\n{label}", "#cfe2f3")
        _box(ax, 6.5, y, f"ResBlock x2\n{label}", "#d9ead3")
        ax.add_patch(FancyArrowPatch((2.6, y + 0.35), (6.4, y + 0.35), arrowstyle="-|>",
                                     mutation_scale=14, linestyle="--", color="gray"))
        ax.text(4.5, y + 0.45, "skip connection (concatenate)", ha="center", fontsize=9, color="gray")
        if level < levels - 1:
            _arrow(ax, (1.5, y), (1.5, y - 0.3), "downsample /2")
            _arrow(ax, (7.5, y - 0.3), (7.5, y), "upsample x2")
    size = image_size // 2 ** (levels - 1)
    _box(ax, 2.9, 0.1, f"middle: ResBlock, self-attention, ResBlock\n{size}x{size}", "#fce5cd", width=4.2)
    _arrow(ax, (1.5, 1), (2.9, 0.45), "")
    _arrow(ax, (7.1, 0.45), (7.5, 1), "")
    _arrow(ax, (1.5, levels + 1.0), (1.5, levels + 0.7), "")
    _arrow(ax, (7.5, levels + 0.7), (7.5, levels + 1.0), "")
    ax.text(1.5, levels + 1.05, f"x_t in ({image_size}x{image_size})", ha="center", va="bottom",
            fontsize=10, weight="bold")
    ax.text(7.5, levels + 1.05, f"eps_pred out ({image_size}x{image_size})", ha="center", va="bottom",
            fontsize=10, weight="bold")
    ax.text(4.5, levels + 1.1, "the time (+ class) embedding\nfeeds every ResBlock",
            ha="center", va="bottom", fontsize=9, style="italic")
    ax.set(xlim=(0, 9), ylim=(-0.1, levels + 1.6))
    ax.set_axis_off()
    fig.tight_layout()
    return fig


def _box(ax, x: float, y: float, text: str, color: str, width: float = 2.0) -> None:
    ax.add_patch(Rectangle((x, y), width, 0.7, facecolor=color, edgecolor="black"))
    ax.text(x + width / 2, y + 0.35, text, ha="center", va="center", fontsize=9)


def _arrow(ax, start: tuple, end: tuple, label: str) -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, color="black"))
    if label:
        ax.text(max(start[0], end[0]) + 0.1, (start[1] + end[1]) / 2, label, va="center", fontsize=8)


# --- Training curves and rows of samples (lessons 03 and 04) --------------------------------

def plot_losses(losses: Sequence[float], ax=None, window: int = 50, title: str = "training loss") -> Figure:
    """The loss of every training step (faint) and its moving average (bold), on a log scale.

    Args:
        losses: one float per training step.
        ax: axes to draw into (a new figure when None); they are not cleared first.
        window: the moving average covers this many steps (fewer while the run is short).
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3))
    values = np.asarray(losses, dtype=float)
    steps = np.arange(1, len(values) + 1)
    ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=0.8, label="each step")
    width = max(1, min(window, len(values) // 2))
    if len(values) >= 2:
        smooth = np.convolve(values, np.ones(width) / width, mode="valid")
        # Each mean is drawn at the middle of its window, so the line runs through the raw curve
        # instead of trailing it (a mean drawn at the window's end sits above a falling loss).
        middle = steps[:len(smooth)] + (width - 1) / 2
        ax.plot(middle, smooth, color="tab:blue", linewidth=2, label=f"mean of {width} steps")
        ax.legend(loc="upper right", fontsize=8)
    ax.set(xlabel="training step", ylabel="loss (log scale)", yscale="log", title=title)
    _plain_log_ticks(ax)
    return ax.figure


def plot_loss_by_timestep(timesteps: Sequence[int], curves: dict, ax=None,
                          title: str = "loss at each timestep") -> Figure:
    """Loss against the timestep t, one line per model.

    Args:
        timesteps: the t values, shared by every curve.
        curves: {label: list of losses, one per timestep}.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3))
    for label, values in curves.items():
        ax.plot(list(timesteps), list(values), "o-", markersize=4, label=label)
    ax.set(xlabel="timestep t", ylabel="loss (log scale)", yscale="log", title=title)
    ax.legend(fontsize=9)
    _plain_log_ticks(ax)
    return ax.figure


def _plain_log_ticks(ax) -> None:
    """Label a log-scale y axis with plain numbers (0.05, 0.1, ...), as many as fit, and add a grid."""
    from matplotlib.ticker import FuncFormatter

    low, high = ax.get_ylim()
    decades = np.log10(high / low) if low > 0 else np.inf
    keep = {2, 3, 4, 5, 6, 7, 8, 9} if decades < 1.2 else {2, 5} if decades < 2.5 else set()

    def minor(value, _):
        mantissa = round(value / 10 ** np.floor(np.log10(value) + 1e-9))
        return f"{value:g}" if mantissa in keep else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))
    ax.tick_params(axis="y", which="minor", labelsize=8)
    ax.grid(alpha=0.3, which="both")


def show_image_rows(rows: Sequence[Tensor], row_labels: Sequence[str],
                    column_labels: Sequence[str] | None = None, size: float = 0.8,
                    title: str | None = None) -> Figure:
    """Several batches of images, one labelled row each (one row per checkpoint, seed, sampler...).

    Args:
        rows: (N, C, H, W) tensors in [-1, 1]; the rows may hold different numbers of images.
        row_labels: one short label per row, written on the left.
        column_labels: optional label over each column (e.g. the digit asked for).
        size: inches per image.
    Returns:
        The matplotlib figure.
    """
    if len(rows) != len(row_labels):
        raise ValueError(f"Got {len(row_labels)} row labels for {len(rows)} rows.")
    ncol, nrows, gap = max(len(images) for images in rows), len(rows), 0.06
    # Fixed margins in inches: the row labels (about 0.075 inch per character at font size 9) on
    # the left, the title and column labels on top. Images of `size` inches fill the rest.
    left = 0.075 * max(len(line) for label in row_labels for line in str(label).split("\n")) + 0.25
    top = (0.45 if title else 0.05) + (0.25 if column_labels is not None else 0)
    grid_width, grid_height = size * (ncol + (ncol - 1) * gap), size * (nrows + (nrows - 1) * gap)
    width, height = left + grid_width + 0.05, top + grid_height + 0.05
    fig, axes = plt.subplots(nrows, ncol, squeeze=False, figsize=(width, height))
    fig.subplots_adjust(left=left / width, right=1 - 0.05 / width, bottom=0.05 / height,
                        top=1 - top / height, wspace=gap, hspace=gap)
    for r, (images, label) in enumerate(zip(rows, row_labels)):
        pixels = to_numpy_images(images)
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(pixels):
                ax.imshow(pixels[c], cmap="gray", vmin=0, vmax=1)
            else:   # an empty cell: hide the frame but keep the axes, so column labels line up
                ax.spines[:].set_visible(False)
            if r == 0 and column_labels is not None and c < len(column_labels):
                ax.set_title(column_labels[c], fontsize=9)
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, y=1 - 0.08 / height, va="top")
    return fig
