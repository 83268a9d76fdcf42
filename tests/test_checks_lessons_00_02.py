"""Lessons 00-02 ask before they tell (issue 13): the references of their predictions and derivations
are right, and each derivation check accepts the lesson's solution and rejects the mistakes it is
meant to catch; the notebooks wire predictions, derivations and "break it" switches as promised."""

from __future__ import annotations

import math
import re
from pathlib import Path

import nbformat
import pytest
import torch

from diffusion_course import checks, schedules, unet
from diffusion_course.checks import schedules as schedule_checks
from diffusion_course.checks import unet as unet_checks

from test_stubs import code_in, solution_blocks

ROOT = Path(__file__).resolve().parent.parent
LESSONS = ("00_welcome", "01_forward_noising", "02_unet")


@pytest.fixture(autouse=True)
def lenient(monkeypatch):
    monkeypatch.delenv(checks.STRICT_ENV, raising=False)


def solution_function(lesson: str, name: str):
    """The function `name` as the solution notebook defines it (its cell, executed on its own)."""
    nb = nbformat.read(ROOT / "solutions" / f"{lesson}.ipynb", 4)
    source = next(cell.source for cell in nb.cells if cell.cell_type == "code" and f"def {name}(" in cell.source)
    namespace = {"math": math, "torch": torch}
    exec(source, namespace)
    return namespace[name]


# ----------------------------------------------------------------------------------------------
# Lesson 00: the length of pure noise


def test_noise_length_derivation_accepts_the_solution_and_rejects_the_usual_mistakes():
    noise_length = solution_function("00_welcome", "noise_length")
    for seed in range(10):    # the lesson measures the 20 starting noises of one seed
        x_T = torch.randn(20, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
        measured = x_T.flatten(1).norm(dim=1).mean()
        assert checks.check_derivation("length", lambda: noise_length(784), measured, rtol=0.02)
        for mistake in (784, 0.0, math.sqrt(784 / 2), math.sqrt(28), 1.0):
            assert not checks.check_derivation("length", mistake, measured, rtol=0.02), mistake


# ----------------------------------------------------------------------------------------------
# Lesson 01: when the SNR crosses 1, and the variance of x_t over the data set


def test_snr_crosses_one_is_where_alpha_bar_falls_below_one_half():
    for schedule in (schedules.cosine_schedule(1000), schedules.linear_schedule(1000), schedules.cosine_schedule(50)):
        t = schedule_checks.snr_crosses_one(schedule)
        assert schedule.alpha_bar[t] < 0.5 <= schedule.alpha_bar[t - 1]
    assert schedule_checks.snr_crosses_one(schedules.cosine_schedule(1000)) == 496
    assert schedule_checks.snr_crosses_one(schedules.linear_schedule(1000)) == 259


def test_snr_crosses_one_says_when_it_never_does():
    gentle = schedules.schedule_from_beta(torch.full((10,), 1e-3))
    with pytest.raises(ValueError, match="never falls below 1"):
        schedule_checks.snr_crosses_one(gentle)


def _mnist_like(n: int = 64) -> torch.Tensor:
    """Mostly black images in [-1, 1] (variance about 0.45), like MNIST's pixels."""
    ink = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1)) < 0.13
    return torch.where(ink, 1.0, -1.0)


def test_variance_by_chain_matches_the_closed_form_variance():
    x0, schedule, steps = _mnist_like(), schedules.linear_schedule(1000), [0, 50, 200, 400, 700, 999]
    measured = schedule_checks.variance_by_chain(x0, schedule, steps, generator=torch.Generator().manual_seed(0))
    alpha_bar = schedule.alpha_bar[steps].double()
    assert measured.shape == (len(steps),) and measured.dtype == torch.float64
    torch.testing.assert_close(measured, alpha_bar * x0.var().double() + 1 - alpha_bar, rtol=0.01, atol=0)


def test_variance_by_chain_runs_the_chain_not_the_closed_form():
    # A schedule whose alpha_bar entries were tampered with: the chain only reads alpha and beta.
    schedule = schedules.linear_schedule(100)
    tampered = schedule_checks._schedule_with(schedule, alpha_bar=torch.ones(100))
    x0 = _mnist_like(8)
    first = schedule_checks.variance_by_chain(x0, schedule, [60], generator=torch.Generator().manual_seed(0))
    second = schedule_checks.variance_by_chain(x0, tampered, [60], generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, second)


def test_variance_by_chain_refuses_steps_outside_the_schedule():
    schedule = schedules.linear_schedule(100)
    for steps in ([], [100], [-1, 5]):
        with pytest.raises(ValueError, match="steps must be"):
            schedule_checks.variance_by_chain(_mnist_like(2), schedule, steps)


def test_variance_derivation_accepts_the_solution_and_rejects_the_usual_mistakes():
    """As in lesson 01: the chain on 64 digits, at steps 50, 200, 400 and 700, rtol 2%."""
    variance_of_x_t = solution_function("01_forward_noising", "variance_of_x_t")
    x0, schedule, steps = _mnist_like(), schedules.linear_schedule(1000), [50, 200, 400, 700]
    var_x0 = x0.var().item()
    measured = schedule_checks.variance_by_chain(x0, schedule, steps, generator=torch.Generator().manual_seed(0))
    alpha_bar, alpha = schedule.alpha_bar[steps].double(), schedule.alpha[steps].double()
    assert checks.check_derivation("Var(x_t)", lambda: variance_of_x_t(alpha_bar, var_x0), measured, rtol=0.02)
    mistakes = {
        "variance preserving for any data (always 1)": torch.ones(len(steps)),
        "only the noise's variance (the variance for a fixed x0)": 1 - alpha_bar,
        "the weight of x0 not squared": alpha_bar.sqrt() * var_x0 + 1 - alpha_bar,
        "no weights squared": alpha_bar.sqrt() * var_x0 + (1 - alpha_bar).sqrt(),
        "the data's variance unweighted": var_x0 + 1 - alpha_bar,
        "alpha for alpha_bar": alpha * var_x0 + 1 - alpha,
    }
    for name, value in mistakes.items():
        assert not checks.check_derivation("Var(x_t)", value, measured, rtol=0.02), name


# ----------------------------------------------------------------------------------------------
# Lesson 02: the parameter count of a residual block

SHAPES = [(16, 16, 64), (16, 32, 64), (64, 32, 128)]   # the lesson's three blocks


def test_res_block_parameters_counted_counts_the_module():
    counted = unet_checks.res_block_parameters_counted(SHAPES + [(4, 8, 12)])
    assert counted.tolist() == [unet.count_parameters(unet.ResBlock(*shape)) for shape in SHAPES + [(4, 8, 12)]]
    assert counted[1] == 18_688     # worked out by hand: 32 + 4,640 + 4,160 + 64 + 9,248 + 544
    with pytest.raises(ValueError, match="shapes must be"):
        unet_checks.res_block_parameters_counted([(16, 32)])


def test_parameter_derivation_accepts_the_solution_and_rejects_the_usual_mistakes():
    res_block_parameters = solution_function("02_unet", "res_block_parameters")
    counted = unet_checks.res_block_parameters_counted(SHAPES)

    def total(c_in, c_out, emb_dim, biases=True, norms=True, pairs=2, skip="when needed", kernel=9):
        bias = 1 if biases else 0
        count = kernel * c_in * c_out + kernel * c_out * c_out + 2 * bias * c_out
        count += emb_dim * pairs * c_out + bias * pairs * c_out
        count += (2 * c_in + 2 * c_out) if norms else 0
        if skip == "always" or (skip == "when needed" and c_in != c_out):
            count += c_in * c_out + bias * c_out
        return count

    def derived(**mistake):
        return torch.tensor([total(*shape, **mistake) for shape in SHAPES])

    assert torch.equal(derived(), counted)
    assert checks.check_derivation("count", lambda: torch.tensor([res_block_parameters(*s) for s in SHAPES]),
                                   counted, rtol=0)
    for mistake in ({"biases": False}, {"norms": False}, {"pairs": 1}, {"skip": "always"}, {"skip": "never"},
                    {"kernel": 3}):
        assert not checks.check_derivation("count", derived(**mistake), counted, rtol=0), mistake


# ----------------------------------------------------------------------------------------------
# The notebooks: each asks, derives and breaks, in words


def cells(lesson: str, folder: str = "solutions"):
    return nbformat.read(ROOT / folder / f"{lesson}.ipynb", 4).cells


@pytest.mark.parametrize("lesson", LESSONS)
def test_each_prediction_is_made_with_a_placeholder_and_revealed_later(lesson):
    sources = [cell.source for cell in cells(lesson, "lessons") if cell.cell_type == "code"]
    predicted = [(i, name) for i, source in enumerate(sources)
                 for name in re.findall(r'checks\.predict\("(\w+)", \.\.\.\)', source)]
    assert predicted, f"{lesson}: no prediction"
    for i, name in predicted:
        assert any(f'checks.reveal("{name}"' in source for source in sources[i + 1:]), name


@pytest.mark.parametrize("lesson", LESSONS)
def test_each_lesson_has_a_derivation_in_words_checked_numerically(lesson):
    solution = {cell.get("id"): cell for cell in cells(lesson)}
    lesson_cells = cells(lesson, "lessons")
    derivations = 0
    for i, cell in enumerate(lesson_cells[:-1]):
        if "checks.check_derivation(" not in lesson_cells[i + 1].source:
            continue
        stubs = re.findall(r'raise NotImplementedError\("Exercise: (.*)"\)', cell.source)
        assert len(stubs) == 1, f"{lesson}: the cell before a check_derivation must hold one stub"
        assert code_in(stubs[0], solution_blocks(solution[cell.get("id")].source)[0]) == [], stubs[0]
        assert len(stubs[0].split()) >= 12
        derivations += 1
    assert derivations >= 1, f"{lesson}: no derivation"


@pytest.mark.parametrize("lesson", LESSONS)
def test_each_lesson_has_a_break_it_switch_among_its_knobs(lesson):
    code = [cell.source for cell in cells(lesson) if cell.cell_type == "code"]
    knobs = next(i for i, source in enumerate(code) if re.search(r"^BREAK_IT = False\b", source, re.M))
    assert knobs <= 12, f"{lesson}: the switch belongs in the knobs cell near the top"
    assert any(re.search(r"\bif BREAK_IT\b|if BREAK_IT else", source) for source in code[knobs + 1:])


def test_welcome_table_names_each_lessons_module_and_exercises():
    table = next(cell.source for cell in cells("00_welcome") if "| lesson |" in cell.source)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| **")}
    expected = {
        "01": ("schedules", "q_sample", "cosine_alpha_bar"), "02": ("unet", "timestep_embedding", "res_block_forward"),
        "03": ("training", "diffusion_loss", "train_step"), "04": ("sampling", "ddpm_step", "ddim_step"),
        "05": ("guidance", "drop_labels", "guided_eps"), "06": ("editing", "img2img_start", "inpaint_step"),
        "07": ("data", "pixels_to_model", "random_hflip"),
        "08": ("autoencoder", "sample_posterior", "kl_divergence", "measure_scale_factor"),
        "09": ("text", "clip_loss", "attention_maps"), "10": ("flow", "flow_matching_loss"),
        "11": ("distill", "teacher_digits", "reflow_loss"),
    }
    for number, names in expected.items():
        row = next(line for title, line in rows.items() if title.startswith(f"**{number}"))
        assert all(f"`{name}`" in row for name in names), row
        assert set(re.findall(r"`(\w+)`", row)) <= set(names) | {"runs", "generate", "metrics", "captions"}, row
    derivations = {name for lesson in checks.LESSONS for name in getattr(lesson, "DERIVATION_HINTS", {})}
    assert sorted(name for names in expected.values() for name in names[1:]) == sorted(set(checks.HINTS) - derivations)
