"""The exercise checkers accept the reference, wait for stubs, and diagnose the usual mistakes."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_course import checks, editing, guidance, sampling, schedules, training, unet
from diffusion_course.checks import _prompts
from diffusion_course.schedules import gather


@pytest.fixture(autouse=True)
def lenient(monkeypatch):
    """Checkers run in their notebook mode unless a test turns strict mode on."""
    monkeypatch.delenv(checks.STRICT_ENV, raising=False)


# ----------------------------------------------------------------------------------------------
def not_done(*args, **kwargs):
    raise NotImplementedError("Exercise: write this function")


# ----------------------------------------------------------------------------------------------
# Mistakes, written the way a learner might write them.

def q_sample_rand(x0, t, schedule, noise=None):
    noise = torch.rand_like(x0) if noise is None else noise
    return schedules.q_sample(x0, t, schedule, noise)


def q_sample_alpha(x0, t, schedule, noise=None):
    noise = torch.randn_like(x0) if noise is None else noise
    alpha_t = gather(schedule.alpha, t, x0)
    return alpha_t.sqrt() * x0 + (1 - alpha_t).sqrt() * noise


def q_sample_no_sqrt(x0, t, schedule, noise=None):
    noise = torch.randn_like(x0) if noise is None else noise
    alpha_bar_t = gather(schedule.alpha_bar, t, x0)
    return alpha_bar_t * x0 + (1 - alpha_bar_t) * noise


def q_sample_t_plus_one(x0, t, schedule, noise=None):
    return schedules.q_sample(x0, t + 1, schedule, noise)


def q_sample_t_minus_one(x0, t, schedule, noise=None):
    alpha_bar_t = gather(schedule.alpha_bar, t - 1, x0)
    noise = torch.randn_like(x0) if noise is None else noise
    return alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * noise


def q_sample_swapped(x0, t, schedule, noise=None):
    noise = torch.randn_like(x0) if noise is None else noise
    alpha_bar_t = gather(schedule.alpha_bar, t, x0)
    return (1 - alpha_bar_t).sqrt() * x0 + alpha_bar_t.sqrt() * noise


def q_sample_no_reshape(x0, t, schedule, noise=None):
    noise = torch.randn_like(x0) if noise is None else noise
    alpha_bar_t = schedule.alpha_bar[t]
    return alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * noise


def q_sample_bad_reshape(x0, t, schedule, noise=None):
    noise = torch.randn_like(x0) if noise is None else noise
    alpha_bar_t = schedule.alpha_bar[t][:, None, None]
    return alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * noise


def q_sample_ignores_noise(x0, t, schedule, noise=None):
    return schedules.q_sample(x0, t, schedule, torch.randn_like(x0))


def _cosine_f(steps, num_steps, s):
    return torch.cos((steps / num_steps + s) / (1 + s) * math.pi / 2) ** 2


def cosine_unnormalised(num_steps, s=0.008):
    return _cosine_f(torch.arange(1, num_steps + 1, dtype=torch.float64), num_steps, s)


def cosine_too_long(num_steps, s=0.008):
    f = _cosine_f(torch.arange(num_steps + 1, dtype=torch.float64), num_steps, s)
    return f / f[0]


def cosine_from_zero(num_steps, s=0.008):
    f = _cosine_f(torch.arange(num_steps, dtype=torch.float64), num_steps, s)
    return f / f[0]


def cosine_not_squared(num_steps, s=0.008):
    steps = torch.arange(num_steps + 1, dtype=torch.float64)
    f = torch.cos((steps / num_steps + s) / (1 + s) * math.pi / 2)
    return (f / f[0])[1:]


def cosine_fixed_s(num_steps, s=0.008):
    return schedules.cosine_schedule(num_steps).alpha_bar


def cosine_wrong_shape(num_steps, s=0.008):
    return schedules.cosine_schedule(num_steps, s).alpha_bar[:, None]


def embedding_swapped(t, dim):
    sin_cos = unet.timestep_embedding(t, dim)
    return torch.cat([sin_cos[:, dim // 2:], sin_cos[:, :dim // 2]], dim=1)


def embedding_base_1000(t, dim):
    return unet.timestep_embedding(t, dim, max_period=1000.0)


def embedding_half(t, dim):
    return unet.timestep_embedding(t, dim)[:, :dim // 2]


def _modulated(block, h, emb):
    scale, shift = block.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
    return block.norm2(h) * (1 + scale) + shift


def res_block_no_skip(block, x, emb):
    h = block.conv1(F.silu(block.norm1(x)))
    return block.conv2(block.dropout(F.silu(_modulated(block, h, emb))))


def res_block_no_emb(block, x, emb):
    h = block.conv1(F.silu(block.norm1(x)))
    return block.skip(x) + block.conv2(block.dropout(F.silu(block.norm2(h))))


def res_block_raw_skip(block, x, emb):
    h = block.conv1(F.silu(block.norm1(x)))
    return x + block.conv2(block.dropout(F.silu(_modulated(block, h, emb))))


def res_block_no_one_plus(block, x, emb):
    h = block.conv1(F.silu(block.norm1(x)))
    scale, shift = block.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
    return block.skip(x) + block.conv2(block.dropout(F.silu(block.norm2(h) * scale + shift)))


def res_block_act_before_norm(block, x, emb):
    h = block.conv1(block.norm1(F.silu(x)))
    scale, shift = block.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
    return block.skip(x) + block.conv2(block.dropout(block.norm2(F.silu(h)) * (1 + scale) + shift))


def loss_against_x0(model, x0, schedule, cond=None, t=None, noise=None):
    t = torch.randint(0, schedule.num_steps, (x0.shape[0],)) if t is None else t
    noise = torch.randn_like(x0) if noise is None else noise
    return F.mse_loss(model(schedules.q_sample(x0, t, schedule, noise), t, cond), x0)


def loss_sum(model, x0, schedule, cond=None, t=None, noise=None):
    t = torch.randint(0, schedule.num_steps, (x0.shape[0],)) if t is None else t
    noise = torch.randn_like(x0) if noise is None else noise
    return ((model(schedules.q_sample(x0, t, schedule, noise), t, cond) - noise) ** 2).sum()


def loss_no_mean(model, x0, schedule, cond=None, t=None, noise=None):
    t = torch.randint(0, schedule.num_steps, (x0.shape[0],)) if t is None else t
    noise = torch.randn_like(x0) if noise is None else noise
    return (model(schedules.q_sample(x0, t, schedule, noise), t, cond) - noise) ** 2


def loss_alpha(model, x0, schedule, cond=None, t=None, noise=None):
    t = torch.randint(0, schedule.num_steps, (x0.shape[0],)) if t is None else t
    noise = torch.randn_like(x0) if noise is None else noise
    alpha_t = gather(schedule.alpha, t, x0)
    x_t = alpha_t.sqrt() * x0 + (1 - alpha_t).sqrt() * noise
    return F.mse_loss(model(x_t, t, cond), noise)


def loss_rand(model, x0, schedule, cond=None, t=None, noise=None):
    noise = torch.rand_like(x0) if noise is None else noise
    return training.diffusion_loss(model, x0, schedule, cond=cond, t=t, noise=noise)


def loss_item(model, x0, schedule, cond=None, t=None, noise=None):
    return training.diffusion_loss(model, x0, schedule, cond=cond, t=t, noise=noise).item()


def loss_forgets_cond(model, x0, schedule, cond=None, t=None, noise=None):
    return training.diffusion_loss(model, x0, schedule, t=t, noise=noise)


def train_step_solution(model, optimizer, x0, loss_fn, *, cond=None, grad_clip=1.0):
    loss = loss_fn(model, x0, cond=cond)
    optimizer.zero_grad()
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()


def train_step_zero_grad_first(model, optimizer, x0, loss_fn, *, cond=None, grad_clip=1.0):
    """Correct: clears the gradients before the forward pass, returns float(loss)."""
    optimizer.zero_grad(set_to_none=False)
    loss = loss_fn(model, x0, cond=cond)
    loss.backward()
    if grad_clip is not None and grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=grad_clip)
    optimizer.step()
    return float(loss.detach())


def train_step_no_zero_grad(model, optimizer, x0, loss_fn, *, cond=None, grad_clip=1.0):
    loss = loss_fn(model, x0, cond=cond)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()


def train_step_no_step(model, optimizer, x0, loss_fn, *, cond=None, grad_clip=1.0):
    loss = loss_fn(model, x0, cond=cond)
    optimizer.zero_grad()
    loss.backward()
    return loss.item()


def train_step_tensor(model, optimizer, x0, loss_fn, *, cond=None, grad_clip=1.0):
    loss = loss_fn(model, x0, cond=cond)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def train_step_no_clip(model, optimizer, x0, loss_fn, *, cond=None, grad_clip=1.0):
    loss = loss_fn(model, x0, cond=cond)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def train_step_always_clips(model, optimizer, x0, loss_fn, *, cond=None, grad_clip=1.0):
    loss = loss_fn(model, x0, cond=cond)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def train_step_clips_with_zero(model, optimizer, x0, loss_fn, *, cond=None, grad_clip=1.0):
    loss = loss_fn(model, x0, cond=cond)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()


def train_step_forgets_cond(model, optimizer, x0, loss_fn, *, cond=None, grad_clip=1.0):
    return train_step_solution(model, optimizer, x0, loss_fn, grad_clip=grad_clip)


def train_step_positional_cond(model, optimizer, x0, loss_fn, *, cond=None, grad_clip=1.0):
    loss = loss_fn(model, x0, cond)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def train_step_loss_after(model, optimizer, x0, loss_fn, *, cond=None, grad_clip=1.0):
    train_step_solution(model, optimizer, x0, loss_fn, cond=cond, grad_clip=grad_clip)
    return loss_fn(model, x0, cond=cond).item()


def ddpm_noise_at_zero(x_t, t, eps_pred, schedule, noise=None):
    mean = sampling.ddpm_step(x_t, t, eps_pred, schedule, torch.zeros_like(x_t))
    return mean + gather(schedule.beta, t, x_t).sqrt() * noise


def ddpm_alpha_bar_for_alpha(x_t, t, eps_pred, schedule, noise=None):
    beta_t, alpha_bar_t = gather(schedule.beta, t, x_t), gather(schedule.alpha_bar, t, x_t)
    mean = (x_t - beta_t / (1 - alpha_bar_t).sqrt() * eps_pred) / alpha_bar_t.sqrt()
    return mean + (t > 0).view(-1, 1, 1, 1) * beta_t.sqrt() * noise


def ddpm_alpha_for_alpha_bar(x_t, t, eps_pred, schedule, noise=None):
    beta_t, alpha_t = gather(schedule.beta, t, x_t), gather(schedule.alpha, t, x_t)
    mean = (x_t - beta_t / (1 - alpha_t).sqrt() * eps_pred) / alpha_t.sqrt()
    return mean + (t > 0).view(-1, 1, 1, 1) * beta_t.sqrt() * noise


def ddpm_no_sqrt(x_t, t, eps_pred, schedule, noise=None):
    beta_t, alpha_t = gather(schedule.beta, t, x_t), gather(schedule.alpha, t, x_t)
    alpha_bar_t = gather(schedule.alpha_bar, t, x_t)
    mean = (x_t - beta_t / (1 - alpha_bar_t).sqrt() * eps_pred) / alpha_t
    return mean + (t > 0).view(-1, 1, 1, 1) * beta_t.sqrt() * noise


def ddpm_sigma_beta(x_t, t, eps_pred, schedule, noise=None):
    mean = sampling.ddpm_step(x_t, t, eps_pred, schedule, torch.zeros_like(x_t))
    return mean + (t > 0).view(-1, 1, 1, 1) * gather(schedule.beta, t, x_t) * noise


def ddim_ignores_minus_one(x_t, t, t_prev, eps_pred, schedule, eta=0.0, noise=None):
    alpha_bar_t, alpha_bar_prev = gather(schedule.alpha_bar, t, x_t), gather(schedule.alpha_bar, t_prev, x_t)
    x0_pred = (x_t - (1 - alpha_bar_t).sqrt() * eps_pred) / alpha_bar_t.sqrt()
    return alpha_bar_prev.sqrt() * x0_pred + (1 - alpha_bar_prev).sqrt() * eps_pred


def ddim_alpha(x_t, t, t_prev, eps_pred, schedule, eta=0.0, noise=None):
    padded = torch.cat([torch.ones(1), schedule.alpha])
    alpha_t, alpha_prev = gather(schedule.alpha, t, x_t), gather(padded, t_prev + 1, x_t)
    x0_pred = (x_t - (1 - alpha_t).sqrt() * eps_pred) / alpha_t.sqrt()
    return alpha_prev.sqrt() * x0_pred + (1 - alpha_prev).sqrt() * eps_pred


def ddim_no_sqrt(x_t, t, t_prev, eps_pred, schedule, eta=0.0, noise=None):
    padded = torch.cat([torch.ones(1), schedule.alpha_bar])
    alpha_bar_t, alpha_bar_prev = gather(schedule.alpha_bar, t, x_t), gather(padded, t_prev + 1, x_t)
    x0_pred = (x_t - (1 - alpha_bar_t) * eps_pred) / alpha_bar_t
    return alpha_bar_prev * x0_pred + (1 - alpha_bar_prev) * eps_pred


def ddim_ignores_eta(x_t, t, t_prev, eps_pred, schedule, eta=0.0, noise=None):
    return sampling.ddim_step(x_t, t, t_prev, eps_pred, schedule)


def guided_ho_salimans(eps_cond, eps_uncond, guidance_scale):
    return (1 + guidance_scale) * eps_cond - guidance_scale * eps_uncond


def guided_swapped(eps_cond, eps_uncond, guidance_scale):
    return eps_cond + guidance_scale * (eps_uncond - eps_cond)


def drop_inverted(cond, null_class, p, generator=None):
    keep = torch.rand(cond.shape, generator=generator) < p
    return torch.where(keep, cond, torch.full_like(cond, null_class))


def drop_to_zero(cond, null_class, p, generator=None):
    drop = torch.rand(cond.shape, generator=generator) < p
    return torch.where(drop, torch.zeros_like(cond), cond)


def drop_in_place(cond, null_class, p, generator=None):
    cond[torch.rand(cond.shape, generator=generator) < p] = null_class
    return cond


def drop_ignores_generator(cond, null_class, p, generator=None):
    return guidance.drop_labels(cond, null_class, p)


def _noised(x0, step, schedule, noise):
    return schedules.q_sample(x0, torch.full((len(x0),), step), schedule, noise)


def start_no_minus_one(x0, strength, schedule, noise=None):
    t_start = min(math.ceil(strength * schedule.num_steps), schedule.num_steps - 1)
    return _noised(x0, t_start, schedule, noise), math.ceil(strength * schedule.num_steps)


def start_inverted(x0, strength, schedule, noise=None):
    t_start = math.ceil((1 - strength) * schedule.num_steps) - 1
    return _noised(x0, max(t_start, 0), schedule, noise), t_start


def start_alpha(x0, strength, schedule, noise=None):
    t_start = math.ceil(strength * schedule.num_steps) - 1
    return _noised(x0, t_start, dataclasses.replace(schedule, alpha_bar=schedule.alpha), noise), t_start


def start_not_noised(x0, strength, schedule, noise=None):
    return x0, math.ceil(strength * schedule.num_steps) - 1


def start_noise_one_step_late(x0, strength, schedule, noise=None):
    t_start = math.ceil(strength * schedule.num_steps) - 1
    return _noised(x0, min(t_start + 1, schedule.num_steps - 1), schedule, noise), t_start


def start_fresh_noise(x0, strength, schedule, noise=None):
    return editing.img2img_start(x0, strength, schedule)


def start_float_step(x0, strength, schedule, noise=None):
    x_t, t_start = editing.img2img_start(x0, strength, schedule, noise)
    return x_t, t_start + 0.5


def start_no_pair(x0, strength, schedule, noise=None):
    return editing.img2img_start(x0, strength, schedule, noise).x_t


def inpaint_inverted(x_t, t, x_known, mask, schedule, noise=None):
    return editing.inpaint_step(x_t, t, x_known, 1 - mask, schedule, noise)


def inpaint_not_noised(x_t, t, x_known, mask, schedule, noise=None):
    return mask * x_t + (1 - mask) * x_known


def inpaint_t_plus_one(x_t, t, x_known, mask, schedule, noise=None):
    return editing.inpaint_step(x_t, torch.where(t >= 0, t + 1, t), x_known, mask, schedule, noise)


def inpaint_alpha(x_t, t, x_known, mask, schedule, noise=None):
    return editing.inpaint_step(x_t, t, x_known, mask, dataclasses.replace(schedule, alpha_bar=schedule.alpha), noise)


def inpaint_ignores_clean_step(x_t, t, x_known, mask, schedule, noise=None):
    return mask * x_t + (1 - mask) * schedules.q_sample(x_known, t, schedule, noise)   # q_sample rejects t = -1


def inpaint_wraps_minus_one(x_t, t, x_known, mask, schedule, noise=None):
    alpha_bar_t = gather(schedule.alpha_bar, t, x_t)       # t = -1 quietly picks the last step of the schedule
    return mask * x_t + (1 - mask) * (alpha_bar_t.sqrt() * x_known + (1 - alpha_bar_t).sqrt() * noise)


def inpaint_fresh_noise(x_t, t, x_known, mask, schedule, noise=None):
    return editing.inpaint_step(x_t, t, x_known, mask, schedule)


def inpaint_forgets_known(x_t, t, x_known, mask, schedule, noise=None):
    return mask * x_t


def inpaint_scalar_t(x_t, t, x_known, mask, schedule, noise=None):
    """The lesson's solution from before t became a tensor."""
    if t < 0:
        known_t = x_known
    else:
        known_t = schedules.q_sample(x_known, torch.full((x_t.shape[0],), t, dtype=torch.long), schedule, noise)
    return mask * x_t + (1 - mask) * known_t


def inpaint_all_clean_if_any(x_t, t, x_known, mask, schedule, noise=None):
    if (t < 0).any():
        return mask * x_t + (1 - mask) * x_known
    return mask * x_t + (1 - mask) * schedules.q_sample(x_known, t, schedule, noise)


def inpaint_first_step_for_all(x_t, t, x_known, mask, schedule, noise=None):
    return editing.inpaint_step(x_t, t[:1].expand_as(t).clone(), x_known, mask, schedule, noise)


# ----------------------------------------------------------------------------------------------

REFERENCES = {
    "check_q_sample": schedules.q_sample,
    "check_cosine_alpha_bar": lambda num_steps, s=0.008: schedules.cosine_schedule(num_steps, s).alpha_bar,
    "check_timestep_embedding": unet.timestep_embedding,
    "check_res_block_forward": lambda block, x, emb: block(x, emb),
    "check_diffusion_loss": training.diffusion_loss,
    "check_train_step": lambda *args, **kwargs: training.train_step(*args, **kwargs),   # patched until the merge
    "check_ddpm_step": sampling.ddpm_step,
    "check_ddim_step": sampling.ddim_step,
    "check_guided_eps": guidance.guided_eps,
    "check_drop_labels": guidance.drop_labels,
    "check_img2img_start": editing.img2img_start,
    "check_inpaint_step": lambda *args: editing.inpaint_step(*args),   # patched until the merge
}

MISTAKES = [   # (checker, wrong function, a word the diagnosis must contain)
    ("check_q_sample", q_sample_rand, "torch.rand"),
    ("check_q_sample", q_sample_alpha, "alpha_bar"),
    ("check_q_sample", q_sample_no_sqrt, "square root"),
    ("check_q_sample", q_sample_t_plus_one, "off by one"),
    ("check_q_sample", q_sample_t_minus_one, "off by one"),
    ("check_q_sample", q_sample_swapped, "swapped"),
    ("check_q_sample", q_sample_no_reshape, "broadcasting"),
    ("check_q_sample", q_sample_bad_reshape, "shape"),
    ("check_q_sample", q_sample_ignores_noise, "same noise"),
    ("check_cosine_alpha_bar", cosine_unnormalised, "f(0)"),
    ("check_cosine_alpha_bar", cosine_too_long, "off-by-one"),
    ("check_cosine_alpha_bar", cosine_from_zero, "off by one"),
    ("check_cosine_alpha_bar", cosine_not_squared, "square"),
    ("check_cosine_alpha_bar", cosine_fixed_s, "s argument"),
    ("check_cosine_alpha_bar", cosine_wrong_shape, "shape"),
    ("check_timestep_embedding", embedding_swapped, "swapped"),
    ("check_timestep_embedding", embedding_base_1000, "frequenc"),
    ("check_timestep_embedding", embedding_half, "shape"),
    ("check_res_block_forward", res_block_no_skip, "skip connection is missing"),
    ("check_res_block_forward", res_block_no_emb, "does not reach the features"),
    ("check_res_block_forward", res_block_no_one_plus, "(1 + scale)"),
    ("check_res_block_forward", res_block_raw_skip, "block.skip"),
    ("check_res_block_forward", res_block_act_before_norm, "activation order"),
    ("check_diffusion_loss", loss_against_x0, "x0"),
    ("check_diffusion_loss", loss_sum, "sum instead of a mean"),
    ("check_diffusion_loss", loss_no_mean, "missing mean"),
    ("check_diffusion_loss", loss_alpha, "alpha_bar"),
    ("check_diffusion_loss", loss_rand, "torch.rand"),
    ("check_diffusion_loss", loss_item, "Python number"),
    ("check_diffusion_loss", loss_forgets_cond, "cond"),
    ("check_train_step", train_step_no_zero_grad, "zero_grad"),
    ("check_train_step", train_step_no_step, "optimizer.step"),
    ("check_train_step", train_step_tensor, "float"),
    ("check_train_step", train_step_no_clip, "not clipped"),
    ("check_train_step", train_step_always_clips, "must not be clipped"),
    ("check_train_step", train_step_clips_with_zero, "clip only when grad_clip is set"),
    ("check_train_step", train_step_forgets_cond, "cond was not passed"),
    ("check_train_step", train_step_positional_cond, "cond goes by name"),
    ("check_train_step", train_step_loss_after, "before the update"),
    ("check_ddpm_step", ddpm_noise_at_zero, "t == 0"),
    ("check_ddpm_step", ddpm_alpha_bar_for_alpha, "alpha_t belongs"),
    ("check_ddpm_step", ddpm_alpha_for_alpha_bar, "alpha_bar_t (the cumulative product) belongs"),
    ("check_ddpm_step", ddpm_no_sqrt, "square root"),
    ("check_ddpm_step", ddpm_sigma_beta, "sigma = beta"),
    ("check_ddim_step", ddim_ignores_minus_one, "t_prev = -1"),
    ("check_ddim_step", ddim_alpha, "alpha_bar"),
    ("check_ddim_step", ddim_no_sqrt, "square root"),
    ("check_ddim_step", ddim_ignores_eta, "eta"),
    ("check_guided_eps", guided_ho_salimans, "Ho & Salimans"),
    ("check_guided_eps", guided_swapped, "swapped"),
    ("check_drop_labels", drop_inverted, "inverted"),
    ("check_drop_labels", drop_to_zero, "instead of null_class"),
    ("check_drop_labels", drop_in_place, "in place"),
    ("check_drop_labels", drop_ignores_generator, "generator"),
    ("check_img2img_start", start_no_minus_one, "off by one"),
    ("check_img2img_start", start_inverted, "inverted"),
    ("check_img2img_start", start_alpha, "alpha_bar"),
    ("check_img2img_start", start_not_noised, "x0 itself"),
    ("check_img2img_start", start_noise_one_step_late, "t_start + 1"),
    ("check_img2img_start", start_fresh_noise, "same noise"),
    ("check_img2img_start", start_float_step, "whole step"),
    ("check_img2img_start", start_no_pair, "return two things"),
    ("check_inpaint_step", inpaint_inverted, "mask is inverted"),
    ("check_inpaint_step", inpaint_not_noised, "noise them to step t"),
    ("check_inpaint_step", inpaint_t_plus_one, "off by one"),
    ("check_inpaint_step", inpaint_alpha, "alpha_bar"),
    ("check_inpaint_step", inpaint_ignores_clean_step, "final replacement"),
    ("check_inpaint_step", inpaint_wraps_minus_one, "t = -1 means the clean image"),
    ("check_inpaint_step", inpaint_fresh_noise, "same noise"),
    ("check_inpaint_step", inpaint_forgets_known, "known pixels are missing"),
    ("check_inpaint_step", inpaint_scalar_t, "one step per image"),
    ("check_inpaint_step", inpaint_all_clean_if_any, "only the rows whose t is -1"),
    ("check_inpaint_step", inpaint_first_step_for_all, "step of the first one"),
]


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_reference_passes(name, capsys, monkeypatch):
    monkeypatch.setenv(checks.STRICT_ENV, "1")
    assert getattr(checks, name)(REFERENCES[name]) is True
    out = capsys.readouterr().out
    assert out.startswith("✅ Passed:") and out.count("\n") == 1


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_stub_is_not_done_even_in_strict_mode(name, capsys, monkeypatch):
    monkeypatch.setenv(checks.STRICT_ENV, "1")
    assert getattr(checks, name)(not_done) is False
    assert capsys.readouterr().out.strip() == checks.NOT_DONE


@pytest.mark.parametrize("name, wrong, word", MISTAKES,
                         ids=[f"{name[6:]}-{wrong.__name__}" for name, wrong, _ in MISTAKES])
def test_mistake_is_diagnosed(name, wrong, word, capsys):
    assert getattr(checks, name)(wrong) is False
    out = capsys.readouterr().out
    assert out.startswith("❌") and word in out, out


@pytest.mark.parametrize("fn", [train_step_solution, train_step_zero_grad_first], ids=["solution", "zero-grad-first"])
def test_train_step_accepts_other_correct_solutions(fn, capsys):
    assert checks.check_train_step(fn) is True, capsys.readouterr().out


def test_strict_mode_raises_for_a_wrong_answer(capsys, monkeypatch):
    monkeypatch.setenv(checks.STRICT_ENV, "1")
    with pytest.raises(AssertionError, match="alpha_bar"):
        checks.check_q_sample(q_sample_alpha)
    assert capsys.readouterr().out.startswith("❌")


def test_errors_are_reported_and_raise_only_in_strict_mode(capsys, monkeypatch):
    def broken(eps_cond, eps_uncond, guidance_scale):
        raise KeyError("oops")
    assert checks.check_guided_eps(broken) is False
    assert "KeyError" in capsys.readouterr().out
    monkeypatch.setenv(checks.STRICT_ENV, "1")
    with pytest.raises(AssertionError, match="KeyError"):
        checks.check_guided_eps(broken)


def test_returning_none_is_a_wrong_answer(capsys):
    assert checks.check_guided_eps(lambda eps_cond, eps_uncond, guidance_scale: None) is False
    assert "return statement" in capsys.readouterr().out


def test_checkers_leave_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    checks.check_q_sample(schedules.q_sample)
    checks.check_drop_labels(guidance.drop_labels)
    assert torch.equal(torch.rand(3), expected)


# ----------------------------------------------------------------------------------------------
# Hints, predictions and derivations


@pytest.fixture
def fresh_prompts(monkeypatch):
    """Forget the hints shown and the predictions made by earlier tests."""
    monkeypatch.setattr(_prompts, "_shown", {})
    monkeypatch.setattr(_prompts, "_predictions", {})


def test_hint_shows_the_next_tier_each_time_then_stays_at_the_last(fresh_prompts, capsys):
    for tier in (1, 2, 3, 3):
        checks.hint("q_sample")
        out = capsys.readouterr().out
        assert out.startswith(f"💡 Hint {tier}/3 for q_sample") and checks.HINTS["q_sample"][tier - 1] in out
    checks.hint("ddim_step", tier=2)
    assert "Hint 2/3 for ddim_step" in capsys.readouterr().out
    checks.hint("ddim_step")              # after tier 2 comes tier 3
    assert "Hint 3/3 for ddim_step" in capsys.readouterr().out
    checks.hint("check_guided_eps")       # the checker's name works too
    assert "Hint 1/3 for guided_eps" in capsys.readouterr().out


def test_hint_errors_name_what_exists(fresh_prompts):
    with pytest.raises(ValueError, match="q_sample.*") as error:
        checks.hint("q_sampel")
    assert all(name in str(error.value) for name in checks.HINTS)
    with pytest.raises(ValueError, match="tier must be 1, 2 or 3"):
        checks.hint("q_sample", tier=4)


def test_every_exercise_has_three_tiers_that_grow_closer_to_code():
    derivations = {name for lesson in checks.LESSONS for name in getattr(lesson, "DERIVATION_HINTS", {})}
    assert len(set(checks.HINTS) - derivations) == 22          # the exercises of lessons 01-11 (plus derivations)
    for name, tiers in checks.HINTS.items():
        assert len(tiers) == 3 and all(isinstance(tier, str) and len(tier) > 40 for tier in tiers), name
        assert not any(word in tiers[0] for word in ("torch", "schedules.", "return", "**")), f"{name}: tier 1 is words"
        assert any(word in tiers[2] for word in ("return", "=")), f"{name}: tier 3 shows the line(s)"


def test_prediction_is_recorded_then_revealed_without_a_verdict(fresh_prompts, capsys, monkeypatch):
    monkeypatch.setenv(checks.STRICT_ENV, "1")     # a far-off prediction never raises
    checks.predict("snr", 400)
    assert "Recorded" in capsys.readouterr().out
    assert checks.reveal("snr", torch.tensor(520), tolerance=50) is False
    out = capsys.readouterr().out
    assert "You predicted 400; measured 520: off by 120 (23%)" in out
    checks.predict("snr", 500)
    assert "Changed" in capsys.readouterr().out
    assert checks.reveal("snr", 520, tolerance=0, rtol=0.05) is True
    checks.predict("choice", "Cosine ")
    assert checks.reveal("choice", "cosine") is True


def test_an_unanswered_prediction_gets_a_reminder(fresh_prompts, capsys):
    checks.predict("signal_left", ...)
    assert "No prediction" in capsys.readouterr().out
    assert checks.reveal("signal_left", 0.34) is None
    assert "did not commit" in capsys.readouterr().out
    assert checks.reveal("never_asked", 1.0) is None


def test_check_derivation_gives_a_verdict_like_an_exercise(capsys, monkeypatch):
    # The posterior variance beta_tilde_t of DDPM (Eq. 7), against a Monte Carlo estimate of
    # Var[x_{t-1} | x_t, x0] from the forward process.
    schedule = schedules.linear_schedule(50)
    t, n = 20, 200_000
    generator = torch.Generator().manual_seed(0)
    alpha_bar_prev = schedule.alpha_bar[t - 1].double()
    x_prev = alpha_bar_prev.sqrt() + (1 - alpha_bar_prev).sqrt() * torch.randn(n, generator=generator, dtype=torch.float64)
    x_t = schedule.alpha[t].double().sqrt() * x_prev + schedule.beta[t].double().sqrt() * torch.randn(
        n, generator=generator, dtype=torch.float64)
    slope = torch.cov(torch.stack([x_prev, x_t]))[0, 1] / x_t.var()
    monte_carlo = (x_prev - slope * x_t).var()           # the variance left once x_t is known
    derived = (1 - alpha_bar_prev) / (1 - schedule.alpha_bar[t]) * schedule.beta[t]
    assert checks.check_derivation("posterior variance", derived, monte_carlo, rtol=0.02) is True
    assert capsys.readouterr().out.startswith("✅ Passed: your posterior variance agrees")
    assert checks.check_derivation("posterior variance", schedule.beta[t], monte_carlo, rtol=0.02) is False
    assert "differs from the numerical estimate" in capsys.readouterr().out
    monkeypatch.setenv(checks.STRICT_ENV, "1")
    assert checks.check_derivation("posterior variance", ..., monte_carlo) is False   # not done: no raise
    assert capsys.readouterr().out.strip() == checks.NOT_DONE
    assert checks.check_derivation("posterior variance", not_done, monte_carlo) is False
    with pytest.raises(AssertionError, match="differs"):
        checks.check_derivation("posterior variance", 2 * derived, monte_carlo)
