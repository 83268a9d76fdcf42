"""Lesson 02: a small, readable U-Net that predicts the noise in a noisy image.
Exercises: timestep_embedding, ResBlock.forward.

Contract, shared by every model in the course:

    model(x_t, t, cond=None) -> prediction      (same shape as x_t)
    model.null_cond(batch_size) -> the "no condition" value for a batch (None: unconditional)

x_t is (B, C, H, W); t is (B,): int64 steps in [0, T) for the discrete schedules of lessons
01-06, or floats (a continuous time, e.g. flow matching's t in [0, 1] scaled by the caller);
cond is (B,) int64 class labels or None. The network knows nothing about betas: it only sees t.
Label dropout and guidance take "no condition" from `null_cond`, so a text embedding can take a
label's place later without touching them.

Lesson 09's text-conditioned U-Net (text.TextUNet) reuses this class: its `context(cond)` turns a
prompt into per-token features, and it puts cross-attention where this U-Net keeps the do-nothing
`IgnoreContext` layers after each residual block (they have no weights, so they change nothing here).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConfigDict:
    """to_dict / from_dict for a frozen config dataclass, as checkpoints store it in config.json:
    tuples become JSON lists and back; unknown keys are refused with a clear error."""

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict):
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} fields {sorted(unknown)}; expected some of {sorted(known)}.")
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in d.items()})


@dataclass(frozen=True)
class UNetConfig(ConfigDict):
    in_channels: int = 1                 # 1 for MNIST, 3 for CIFAR-10
    image_size: int = 28                 # 28 (MNIST) or 32 (CIFAR-10); must divide by 2**(levels-1)
    base_channels: int = 16              # channels at full resolution
    channel_mults: tuple = (1, 2, 4)     # channels per level = base_channels * mult; each level halves H, W
    num_res_blocks: int = 1              # residual blocks per level on the way down
    num_classes: int | None = None       # None: unconditional; else labels 0..num_classes-1 plus a null class
    dropout: float = 0.0                 # dropout inside residual blocks

    def __post_init__(self):
        for name in ("in_channels", "image_size", "base_channels", "num_res_blocks"):
            _check_whole(name, getattr(self, name), 1)
        if self.num_classes is not None:
            _check_whole("num_classes", self.num_classes, 1, " (or None for an unconditional model)")
        if not self.channel_mults or any(isinstance(m, bool) or not isinstance(m, int) or m < 1
                                         for m in self.channel_mults):
            raise ValueError(f"channel_mults must be a non-empty list of whole numbers >= 1, got {self.channel_mults!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}.")



def _check_whole(name: str, value, low: int, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be a whole number of at least {low}{note}, got {value!r}.")


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of the timesteps (Vaswani et al. 2017, Sec. 3.5; DDPM, App. B).

    Args:
        t: (B,) timesteps (int or float).
        dim: even embedding size.
    Returns:
        (B, dim) float32: [sin(t * f_0), ..., sin(t * f_{dim/2-1}), cos(t * f_0), ...]
        with frequencies f_i = max_period ** (-i / (dim / 2)).
    """
    if dim % 2:
        raise ValueError(f"dim must be even (half sines, half cosines), got {dim}.")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups of at least 4 channels each (fewer groups for few channels)."""
    groups = math.gcd(8, max(1, channels // 4))
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and SiLU and a skip connection around both (Ho et al.
    2020, after Wide ResNets). In between, the time embedding (plus the class) scales and shifts
    every channel of the normalised features (Nichol and Dhariwal 2021's "scale-shift norm").
    It comes after the norm: added before it, a per-channel shift would be normalised away."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels)   # a scale and a shift per channel
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over all pixels of a (small) feature map, with a skip connection."""

    def __init__(self, channels: int, num_heads: int = 4):
        super().__init__()
        self.norm = group_norm(channels)
        self.attn = nn.MultiheadAttention(channels, num_heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)          # (B, H*W, C)
        out, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class IgnoreContext(nn.Module):
    """A place for a layer that reads the condition's context after a residual block (lesson 09
    puts cross-attention to the prompt's words here). This one returns x unchanged; no weights."""

    def forward(self, x: Tensor, context) -> Tensor:
        return x


class UNet(nn.Module):
    """Encoder-decoder with skip connections; self-attention at the lowest resolution."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        levels = len(config.channel_mults)
        if config.image_size % (2 ** (levels - 1)):
            raise ValueError(f"image_size {config.image_size} must be divisible by 2**{levels - 1} "
                             f"for {levels} levels (channel_mults={config.channel_mults}).")
        base = config.base_channels
        emb_dim = 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # Class labels 0..num_classes-1, plus one extra "null" label (index num_classes) meaning
        # "no condition", used for label dropout and classifier-free guidance.
        self.class_emb = nn.Embedding(config.num_classes + 1, emb_dim) if config.num_classes else None

        self.conv_in = nn.Conv2d(config.in_channels, base, 3, padding=1)
        channels = [base * m for m in config.channel_mults]
        skip_channels, ch = self._build_down(base, channels, emb_dim)
        self.mid1 = ResBlock(ch, ch, emb_dim, config.dropout)
        self.mid_attn = SelfAttention(ch)
        self.mid_context_layer = IgnoreContext()
        self.mid2 = ResBlock(ch, ch, emb_dim, config.dropout)
        ch = self._build_up(channels, skip_channels, ch, emb_dim)
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, config.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)   # start by predicting zero noise: a calm first step
        nn.init.zeros_(self.conv_out.bias)

    def _build_down(self, base: int, channels: list[int], emb_dim: int) -> tuple[list[int], int]:
        """The encoder: per level, residual blocks then a stride-2 convolution (not after the last).
        Returns the channel count of every skip connection and the channels at the bottom."""
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        self.down_context_layers = nn.ModuleList()
        skip_channels, ch = [base], base
        for level, out_ch in enumerate(channels):
            blocks = nn.ModuleList()
            for _ in range(self.config.num_res_blocks):
                blocks.append(ResBlock(ch, out_ch, emb_dim, self.config.dropout))
                ch = out_ch
                skip_channels.append(ch)
            self.down.append(blocks)
            self.down_context_layers.append(nn.ModuleList(IgnoreContext() for _ in blocks))
            last = level == len(channels) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            if not last:
                skip_channels.append(ch)
        return skip_channels, ch

    def _build_up(self, channels: list[int], skip_channels: list[int], ch: int, emb_dim: int) -> int:
        """The decoder: per level, one more residual block than on the way down, each taking a skip
        connection, then a 2x nearest upsampling and a convolution. Returns the output channels."""
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        self.up_context_layers = nn.ModuleList()
        for level, out_ch in reversed(list(enumerate(channels))):
            blocks = nn.ModuleList()
            for _ in range(self.config.num_res_blocks + 1):
                blocks.append(ResBlock(ch + skip_channels.pop(), out_ch, emb_dim, self.config.dropout))
                ch = out_ch
            self.up.append(blocks)
            self.up_context_layers.append(nn.ModuleList(IgnoreContext() for _ in blocks))
            self.upsample.append(nn.Identity() if level == 0 else
                                 nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                               nn.Conv2d(ch, ch, 3, padding=1)))
        return ch

    @property
    def null_class(self) -> int | None:
        """The label meaning "no condition" (None for an unconditional model)."""
        return self.config.num_classes

    def null_cond(self, batch_size: int, device: torch.device | str | None = None) -> Tensor | None:
        """The "no condition" for a batch: (B,) int64 full of the null label; None if unconditional."""
        if self.null_class is None:
            return None
        device = self.conv_in.weight.device if device is None else device
        return torch.full((batch_size,), self.null_class, dtype=torch.long, device=device)

    def embed(self, t: Tensor, cond: Tensor | None) -> Tensor:
        """Time embedding, plus the class embedding when the model is conditional."""
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels))
        if self.class_emb is not None:
            if cond is None:
                cond = self.null_cond(t.shape[0], t.device)
            emb = emb + self.class_emb(cond)
        return emb

    def context(self, cond: Tensor | None) -> None:
        """Per-token features of the condition for the layers after the residual blocks: None here,
        where a label enters through `embed` alone (lesson 09's TextUNet returns the prompt's words)."""
        return None

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        self._check_inputs(x_t, t, cond)
        emb, context = self.embed(t, cond), self.context(cond)
        h = self.conv_in(x_t)
        skips = [h]
        for blocks, context_layers, downsample in zip(self.down, self.down_context_layers, self.downsample):
            for block, context_layer in zip(blocks, context_layers):
                h = context_layer(block(h, emb), context)
                skips.append(h)
            if not isinstance(downsample, nn.Identity):
                h = downsample(h)
                skips.append(h)
        h = self.mid_context_layer(self.mid_attn(self.mid1(h, emb)), context)
        h = self.mid2(h, emb)
        for blocks, context_layers, upsample in zip(self.up, self.up_context_layers, self.upsample):
            for block, context_layer in zip(blocks, context_layers):
                h = context_layer(block(torch.cat([h, skips.pop()], dim=1), emb), context)
            h = upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def _check_inputs(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> None:
        c, size = self.config.in_channels, self.config.image_size
        factor = 2 ** (len(self.config.channel_mults) - 1)
        if x_t.ndim != 4 or x_t.shape[1] != c or x_t.shape[2] % factor or x_t.shape[3] % factor:
            # Trained on size x size, but any canvas whose sides divide by `factor` runs
            # (it is fully convolutional): outpainting uses a larger canvas.
            raise ValueError(f"x_t must have shape (B, {c}, H, W) with H and W divisible by {factor} "
                             f"(trained on {size}x{size}), got {tuple(x_t.shape)}.")
        weight_dtype = self.conv_in.weight.dtype
        if x_t.dtype != weight_dtype:
            raise ValueError(f"x_t must be {weight_dtype} like the model's weights, got {x_t.dtype}"
                             + (" (scale pixels with data.to_model_range)." if not x_t.is_floating_point() else "."))
        if t.shape != (x_t.shape[0],) or not (t.dtype == torch.int64 or t.is_floating_point()):
            raise ValueError(f"t must be a tensor of shape ({x_t.shape[0]},), int64 steps or floats, "
                             f"got {t.dtype} of shape {tuple(t.shape)}.")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError("t holds NaN or infinite values.")
        if cond is not None:
            self._check_cond(cond, x_t.shape[0])

    def _check_cond(self, cond: Tensor, batch_size: int) -> None:
        """A clear error unless cond is (B,) int64 labels in [0, null_class]."""
        if self.class_emb is None:
            raise ValueError("This model is unconditional (num_classes=None); call it with cond=None.")
        if cond.dtype != torch.int64 or cond.shape != (batch_size,):
            raise ValueError(f"cond must be an int64 tensor of shape ({batch_size},), "
                             f"got {cond.dtype} of shape {tuple(cond.shape)}.")
        if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) > self.null_class):
            raise ValueError(f"cond labels must lie in [0, {self.null_class}] "
                             f"({self.null_class} is the null class), got {cond.tolist()[:8]}...")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
