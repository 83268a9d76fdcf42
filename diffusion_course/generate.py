"""Making images: the one function that the command line, the widgets, the benchmarks and the
lessons all call (ring 2: it runs the samplers of lesson 04 with the guidance of lesson 05).

    images = generate.generate(model, schedule, num=100, shape=(1, 28, 28), cond=labels,
                               guidance_scale=3.0, sampler="dpm", sampling_steps=20, seed=0)

What it takes care of, so no caller writes it again:
- the seed: the starting noise of all `num` images is drawn first from one generator, so DDIM
  and DPM-Solver++ (deterministic from there) give the same images whatever the batch size;
  DDPM's per-step noise depends on the batching;
- batching (`batch_size` images per sampler call) and an optional progress bar (one tick per
  sampler step of each batch, so a long DDPM run shows that it is moving);
- on a CPU, each batch cut into `workers` parts (default: what `threads.use_best_threads` chose)
  that are sampled (and decoded) side by side, each in its own thread: the same images up to
  float rounding for DDIM and DPM-Solver++; DDPM's noise then comes from one generator per part,
  seeded from `seed`, so DDPM's images depend on the number of parts as they do on the batch size;
- guidance: the model is wrapped with `guidance.guided`, which leaves an unconditional model
  (or w = 1 without a negative condition) as it is;
- the DDPM rule: DDPM visits every step, so `sampling_steps` counts only for DDIM and DPM-Solver++;
- flow-matching models (lesson 10; schedule None): the ODE samplers "euler" and "heun" over
  `sampling_steps` even steps of t from 1 to 0 (Heun calls the model twice per step);
- the device, and channels-last activations on a CPU (the order oneDNN's convolutions run
  fastest on; the same images up to float rounding; benchmarks/sample_speed.py measures it);
- an optional `decode` step (latent diffusion decodes latents into images);
- no silent failure: NaN or infinite samples raise an error instead of becoming black images.
"""

from __future__ import annotations

import contextlib
import math
import threading
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import checkpoints, data, flow, sampling, threads
from .guidance import guided
from .schedules import NoiseSchedule
from .unet import UNet

DEFAULT_SAMPLING = {"sampler": "dpm", "steps": 20, "guidance": 3.0}   # for a checkpoint that names none


def generate(model, schedule: NoiseSchedule, **options) -> Tensor:
    """All the images of `generate_batches(model, schedule, **options)` in one (num, C, H, W) tensor."""
    return torch.cat([images for _, images in generate_batches(model, schedule, **options)])


def generate_batches(model, schedule: NoiseSchedule | None, *, num: int, shape: tuple, cond: Tensor | None = None,
                     guidance_scale: float = 1.0, negative: int | Tensor | None = None, sampler: str = "dpm",
                     sampling_steps: int | None = None, seed: int = 0, batch_size: int = 100,
                     device: str | torch.device = "cpu", decode: Callable[[Tensor], Tensor] | None = None,
                     clip_x0: float | None = 1.0, progress: bool = False,
                     workers: int | None = None) -> Iterator[tuple[int, Tensor]]:
    """Sample `num` images, `batch_size` at a time; yields (index of the first image, images).

    Args:
        shape: (C, H, W) of what the model denoises (pixels, or latents when `decode` is given).
        cond: (num,) labels (or (num, ...) conditions), or None for unconditional samples.
        guidance_scale: classifier-free guidance w (1: none); negative: a condition to steer away from.
        schedule: the model's noise schedule, or None for a flow-matching model (lesson 10).
        sampler: "ddpm", "ddim" or "dpm"; "euler" or "heun" for a flow-matching model.
        sampling_steps: sampler steps (None: the sampler's default).
        decode: maps the sampler's output to images (e.g. an autoencoder's decoder).
        clip_x0: the data range the sampler clamps its x0 guesses to (None for latents).
        workers: on a CPU, cut each batch into this many parts sampled side by side in threads
            (None: threads.workers(), what use_best_threads chose; 1: one call per batch).
    Yields:
        (start, images): images (B, C, H, W) on `device`, clamped to [-1, 1] (or to clip_x0 when
        there is no decode step).
    """
    _check_options(num, shape, cond, guidance_scale, seed, batch_size)
    sample, num_steps = _sampler(sampler, schedule, sampling_steps)
    generator = torch.Generator(device).manual_seed(seed)
    x_T = torch.randn(num, *shape, generator=generator, device=device)
    cond = None if cond is None else cond.to(device)
    model = guided(model, guidance_scale, negative)
    workers = _check_workers(workers, device)
    batches = [(start, [slice(start + p.start, start + p.stop)    # each batch's parts, in image indices
                        for p in threads.batch_parts(min(batch_size, num - start), workers)])
               for start in range(0, num, batch_size)]
    bar = tqdm(total=sum(len(parts) for _, parts in batches) * num_steps,
               disable=not progress, unit="step", desc=f"sampling {num} with {sampler}")
    ticks, cancel = threading.Lock(), threading.Event()

    def sample_part(part: slice, part_generator: torch.Generator) -> Tensor:
        def tick(step):
            if cancel.is_set():              # another part failed, or the caller was interrupted
                raise RuntimeError("sampling cancelled")
            with ticks:
                bar.update(1)
        x = sample(model, x_T[part], generator=part_generator, cond=None if cond is None else cond[part],
                   clip_x0=clip_x0, callback=tick)
        return x if decode is None else decode(x)

    with _fast_layout(model, device), torch.no_grad(), bar:
        for start, parts in batches:
            generators = [generator] if len(parts) == 1 else [_child(generator, device) for _ in parts]
            images = torch.cat(threads.map_parts(lambda job: sample_part(*job), list(zip(parts, generators)),
                                                 cancel=cancel))
            yield start, _finish(images, 1.0 if decode is not None else clip_x0)


def generate_to_file(path, model, schedule: NoiseSchedule, *, num: int, shape: tuple, cond: Tensor | None = None,
                     overwrite: bool = False, prompts: list[str] | None = None,
                     images_shape: tuple | None = None, **options) -> Path:
    """generate_batches streamed into a samples file (data.SampleWriter): memory stays bounded for
    any `num`, and if the run is interrupted the finished samples are kept in s.partial.npz.
    Labels ((num,) conditions) are stored with the images, and so are `prompts` (one per image)
    for a text-conditioned model. `images_shape`: (C, H, W) of the decoded images when there is a
    decode step (Pipeline.images_shape); by default `shape`. Returns the path of the .npz (a PNG
    grid is written beside it)."""
    labels = cond if cond is not None and cond.ndim == 1 else None
    with data.SampleWriter(path, num, images_shape or shape, overwrite=overwrite, prompts=prompts) as writer:
        for start, images in generate_batches(model, schedule, num=num, shape=shape, cond=cond, **options):
            writer.write(images, None if labels is None else labels[start:start + len(images)])
    return writer.path


def _sampler(sampler: str, schedule: NoiseSchedule | None, sampling_steps: int | None) -> tuple[Callable, int]:
    """(sample(model, x_T, **options), number of sampler steps) for a diffusion or a flow-matching model."""
    if schedule is None:
        if sampler not in flow.SAMPLERS:
            raise ValueError(f"A flow-matching model (no noise schedule) is sampled with {sorted(flow.SAMPLERS)}, "
                             f"got {sampler!r}.")
        times = flow.flow_time_grid(flow.DEFAULT_FLOW_STEPS if sampling_steps is None else sampling_steps)
        return (lambda model, x, **options: flow.SAMPLERS[sampler](model, x, times, **options)), len(times) - 1
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"These samplers need the noise schedule the model was trained with (or None for a "
                         f"flow-matching model), got {schedule!r}.")
    if sampler in flow.SAMPLERS:
        raise ValueError(f"{sampler!r} integrates a flow-matching model's ODE; this model predicts noise on a "
                         f"schedule: use one of {sorted(sampling.SAMPLERS)}.")
    timesteps = sampling.timestep_grid(sampler, schedule, None if sampler == "ddpm" else sampling_steps)
    return (lambda model, x, **options: sampling.SAMPLERS[sampler](model, x, schedule, timesteps, **options)), \
        len(timesteps)


class Pipeline(NamedTuple):
    """Everything needed to make images with a checkpoint (what `load_pipeline` returns)."""
    model: nn.Module                          # the denoiser: model(x_t, t, cond) -> eps (or velocity)
    schedule: NoiseSchedule | None            # the noise schedule it was trained with (None: flow matching)
    shape: tuple[int, int, int]               # (C, H, W) of what it denoises: pixels, or latents
    autoencoder: nn.Module | None             # a latent model's autoencoder (lesson 08), else None
    images_shape: tuple[int, int, int]        # (C, H, W) of the images it makes (after decode)
    info: dict                                # the checkpoint's config.json
    path: Path                                # the checkpoint folder

    @property
    def decode(self) -> Callable[[Tensor], Tensor] | None:
        """latents -> images in [-1, 1] (the autoencoder's decoder), or None for a pixel model."""
        return None if self.autoencoder is None else self.autoencoder.decode_latents

    @property
    def sampling(self) -> dict:
        """The sampler, steps and guidance to use unless asked otherwise: the checkpoint's own
        (config.json "sampling", e.g. a distilled model's) over the course's defaults."""
        default = DEFAULT_SAMPLING if self.schedule is not None else {**DEFAULT_SAMPLING, "sampler": "euler"}
        return {**default, **self.info.get("sampling", {})}


def load_pipeline(name: str | Path, device: str | torch.device = "cpu") -> Pipeline:
    """A checkpoint ready for `generate`: a pixel-space U-Net as it is; a latent model (its config.json
    names an "autoencoder" checkpoint and a "latent_shape") with that autoencoder's decoder as the
    decode step, as Stable Diffusion decodes its latents with its VAE."""
    checkpoint = checkpoints.load_checkpoint(name, device)
    model, info = checkpoint.model, checkpoint.info
    if not isinstance(model, UNet) or (checkpoint.schedule is None and info.get("objective") != "flow"):
        raise ValueError(f"{checkpoint.path} holds a {info.get('type', 'unet')!r} model, not a diffusion model "
                         "with its noise schedule (nor a flow-matching one): it makes no images by itself (the "
                         "shipped ones: 'mnist', 'mnist-fast', 'cifar10' and 'prompted-digits').")
    if info.get("autoencoder") is None:
        shape = image_shape(model)
        return Pipeline(model, checkpoint.schedule, shape, None, shape, info, checkpoint.path)
    autoencoder = checkpoints.load_checkpoint(info["autoencoder"], device).model
    shape = tuple(info["latent_shape"])
    with torch.no_grad():    # the decoded images' shape, from one latent
        images_shape = tuple(autoencoder.decode_latents(torch.zeros(1, *shape, device=device)).shape[1:])
    return Pipeline(model, checkpoint.schedule, shape, autoencoder, images_shape, info, checkpoint.path)


def prompt_ids(model, prompts: list[str], num: int) -> Tensor:
    """(num, L) token ids for a text-conditioned model: the prompts cycled to `num` images."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("This checkpoint does not take prompts (it has no tokenizer); use labels instead.")
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}.")
    ids = tokenizer.encode(list(prompts))
    return ids[torch.arange(num) % len(prompts)]


def image_shape(model) -> tuple[int, int, int]:
    """(C, H, W) of what a U-Net checkpoint denoises, from its config."""
    config = model.config
    return (config.in_channels, config.image_size, config.image_size)


def _check_workers(workers: int | None, device) -> int:
    """The parts to cut each batch into: 1 off a CPU (a GPU runs a batch at once)."""
    if workers is None:
        workers = threads.workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a whole number of at least 1 (1: no split), got {workers!r}.")
    return workers if torch.device(device).type == "cpu" else 1


def _child(generator: torch.Generator, device) -> torch.Generator:
    """A generator of its own for one part of a batch, seeded from `generator` (in part order)."""
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator(device).manual_seed(seed)


def _finish(images: Tensor, clamp: float | None) -> Tensor:
    if not bool(torch.isfinite(images).all()):
        raise FloatingPointError("The samples contain NaN or infinite values (a diverged model, or a "
                                 "non-finite setting); nothing was written.")
    return images if clamp is None else images.clamp(-clamp, clamp)


def _check_options(num, shape, cond, guidance_scale, seed, batch_size) -> None:
    for name, value, low in (("num", num, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be a whole number of at least {low}, got {value!r}.")
    if not (isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 3
            and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ValueError(f"shape must be (C, H, W) with positive whole numbers, got {shape!r}.")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number (1: no guidance), got {guidance_scale!r}.")
    if cond is not None and (not isinstance(cond, Tensor) or cond.ndim == 0 or cond.shape[0] != num):
        raise ValueError(f"cond must be a tensor with one condition per image ({num}), "
                         f"got {getattr(cond, 'shape', type(cond).__name__)}.")


@contextlib.contextmanager
def _fast_layout(model, device):
    """Channels-last weights (hence activations) while sampling on a CPU; restored afterwards."""
    if not isinstance(model, nn.Module) or torch.device(device).type != "cpu":
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)
