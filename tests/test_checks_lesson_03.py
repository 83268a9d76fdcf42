"""Lesson 03 asks before it tells (issue 13) and trains to a time budget (issue 17): the numbers behind
its predictions and statements are right, its derivation check accepts the solution and rejects the
usual mistakes, and the notebook is wired as promised (prediction before reveal, BREAK_IT in the
knobs, a time-budgeted run without a probe)."""

from __future__ import annotations

import contextlib
import io
import re
import types
from pathlib import Path

import nbformat
import pytest
import torch

from diffusion_course import checkpoints, checks, schedules, training, unet

ROOT = Path(__file__).resolve().parent.parent
SOLUTION = nbformat.read(ROOT / "solutions" / "03_training.ipynb", 4)
CELLS = {cell.get("id"): cell for cell in SOLUTION.cells}


@pytest.fixture(autouse=True)
def lenient(monkeypatch):
    monkeypatch.delenv(checks.STRICT_ENV, raising=False)


def run_cell(cell_id: str, **namespace) -> dict:
    """Execute one solution cell on its own with the given globals; returns its namespace."""
    namespace = {"torch": torch, **namespace}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(CELLS[cell_id].source, namespace)
    return namespace


def measured_k(model, x0, labels, schedule, steps) -> torch.Tensor:
    """As the lesson measures it: the model's noise error over its clean-image error at each step."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    ratios = []
    with torch.no_grad():
        for step in steps.tolist():
            t = torch.full((len(x0),), step)
            x_t = schedules.q_sample(x0, t, schedule, noise)
            eps_hat = model(x_t, t, labels)
            alpha_bar = schedule.alpha_bar[step]
            x0_hat = (x_t - (1 - alpha_bar).sqrt() * eps_hat) / alpha_bar.sqrt()
            ratios.append((noise - eps_hat).square().mean().double() / (x0 - x0_hat).square().mean().double())
    return torch.stack(ratios)


# ----------------------------------------------------------------------------------------------
# The derivation: ||eps - eps_hat||^2 = SNR_t ||x0 - x0_hat||^2


def test_derivation_accepts_the_solution_and_rejects_the_usual_mistakes():
    solution = run_cell("03-derive")["noise_error_per_x0_error"]
    shipped = checkpoints.load_checkpoint("mnist")
    schedule = shipped.schedule
    x0 = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    steps = torch.tensor([5, 50, 150, 300, 500, 700, 850, 950])
    measured = measured_k(shipped.model, x0, torch.arange(16) % 10, schedule, steps)
    alpha_bar = schedule.alpha_bar[steps].double()
    assert checks.check_derivation("k_t", lambda: solution(alpha_bar), measured, rtol=0.01)
    torch.testing.assert_close(measured, schedules.snr(schedule)[steps].double(), rtol=1e-3, atol=0)
    alpha = schedule.alpha[steps].double()
    mistakes = {
        "inverted: 1 / SNR": (1 - alpha_bar) / alpha_bar,
        "not squared: sqrt(SNR)": (alpha_bar / (1 - alpha_bar)).sqrt(),
        "alpha_bar alone": alpha_bar,
        "one minus alpha_bar": 1 - alpha_bar,
        "no factor at all": torch.ones(len(steps)),
        "alpha for alpha_bar": alpha / (1 - alpha),
    }
    for name, value in mistakes.items():
        assert not checks.check_derivation("k_t", value, measured, rtol=0.01), name


def test_derivation_not_done_yet_is_not_a_failure(capsys):
    def stub(alpha_bar_t):
        raise NotImplementedError("Exercise: ...")
    assert not checks.check_derivation("k_t", lambda: stub(torch.ones(3)), torch.ones(3))
    assert "Not done yet" in capsys.readouterr().out


def test_the_identity_holds_for_any_prediction_not_only_a_trained_one():
    # An untrained network with made-up output weights: the ratio is still SNR_t at every step.
    torch.manual_seed(0)
    net = unet.UNet(unet.UNetConfig(base_channels=8, channel_mults=(1, 2), num_classes=10))
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    schedule, steps = schedules.cosine_schedule(), torch.tensor([10, 400, 900])
    measured = measured_k(net, torch.rand(4, 1, 28, 28) * 2 - 1, torch.arange(4), schedule, steps)
    torch.testing.assert_close(measured, schedules.snr(schedule)[steps].double(), rtol=1e-3, atol=0)


def test_the_derivation_has_three_tiers_of_hints(capsys):
    tiers = checks.HINTS["noise_error_per_x0_error"]
    assert len(tiers) == 3 and not any(word in tiers[0] for word in ("torch", "schedules.", "return", "**"))
    assert "alpha_bar_t / (1 - alpha_bar_t)" in tiers[2]
    checks.hint("noise_error_per_x0_error", tier=1)
    assert "Hint 1/3 for noise_error_per_x0_error" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# The predictions and the statements the lesson makes


def test_a_fresh_unet_is_exactly_the_zero_predictor():
    torch.manual_seed(0)
    fresh = unet.UNet(unet.UNetConfig(num_classes=10))
    schedule = schedules.cosine_schedule()
    x0 = torch.rand(32, 1, 28, 28) * 2 - 1
    t, noise = torch.randint(0, 1000, (32,)), torch.randn(32, 1, 28, 28)
    with torch.no_grad():
        assert fresh(x0, t, torch.arange(32) % 10).abs().max() == 0
        loss = training.diffusion_loss(fresh, x0, schedule, cond=torch.arange(32) % 10, t=t, noise=noise)
    assert loss.item() == pytest.approx(noise.square().mean().item(), abs=1e-7)


def test_the_zero_predictors_min_snr_loss_is_the_mean_weight():
    schedule = schedules.cosine_schedule()
    weight = (5.0 / schedules.snr(schedule)).clamp(max=1.0)
    zero = lambda x_t, t, cond=None: torch.zeros_like(x_t)
    t = torch.arange(1000).repeat(4)                  # every step, four times
    noise = torch.randn(4000, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    loss = training.diffusion_loss(zero, torch.zeros(4000, 1, 4, 4), schedule, t=t, noise=noise, min_snr_gamma=5.0)
    assert loss.item() == pytest.approx(weight.mean().item(), rel=0.03)
    assert weight.mean().item() == pytest.approx(0.82, abs=0.01)      # what the lesson's text says


def test_adamw_ignores_a_constant_loss_factor_and_sgd_does_not():
    """The lesson's cell: AdamW moves the weights as far and the same way; SGD's moves are far longer."""
    namespace = run_cell("03-006b", unet=unet, training=training, linear=schedules.linear_schedule(), SEED=0,
                         F=torch.nn.functional)
    five_steps = namespace["five_steps"]
    adam = lambda p: torch.optim.AdamW(p, lr=1e-3)
    plain, scaled = five_steps(adam, 1.0), five_steps(adam, 100.0)
    assert (scaled.norm() / plain.norm()).item() == pytest.approx(1.0, abs=0.01)
    assert torch.nn.functional.cosine_similarity(plain, scaled, dim=0).item() > 0.99
    sgd = lambda p: torch.optim.SGD(p, lr=1e-3)
    assert (five_steps(sgd, 100.0).norm() / five_steps(sgd, 1.0).norm()).item() > 20


@pytest.mark.parametrize("num_steps", [100, 300, 600])
def test_the_lessons_ema_window_matches_training_ema(num_steps, capsys):
    """The cell's share-of-each-step formula against the real EMA: a weight that equals the step
    number after each step averages to num_steps minus the mean age."""
    weight = torch.nn.Linear(1, 1, bias=False)
    ema = training.EMA(weight, decay=0.999)
    for step in range(1, num_steps + 1):
        with torch.no_grad():
            weight.weight.fill_(float(step))
        ema.update(weight)
    namespace = run_cell("03-ema-window", result=types.SimpleNamespace(step=num_steps),
                         train_config=types.SimpleNamespace(ema_decay=0.999))
    mean_age = float((namespace["share"] * namespace["age"]).sum())
    assert num_steps - ema.model.weight.item() == pytest.approx(mean_age, rel=1e-4)
    assert mean_age == pytest.approx(num_steps / 10, abs=1.0)        # "about a tenth of the run"
    assert namespace["share"].sum().item() == pytest.approx(1.0, abs=1e-9)


# ----------------------------------------------------------------------------------------------
# The wiring of the notebook


def code_order() -> list[str]:
    return [cell.source for cell in SOLUTION.cells if cell.cell_type == "code"]


@pytest.mark.parametrize("question", ["fresh_unet_loss", "fresh_unet_min_snr_loss"])
def test_each_prediction_is_asked_with_a_placeholder_before_it_is_revealed(question):
    sources = code_order()
    asked = [i for i, s in enumerate(sources) if re.search(rf'checks\.predict\("{question}", \.\.\.\)', s)]
    revealed = [i for i, s in enumerate(sources) if f'checks.reveal("{question}"' in s]
    assert len(asked) == 1 and len(revealed) == 1 and asked[0] < revealed[0]


def test_break_it_is_a_knob_used_by_the_training_run():
    assert re.search(r"^BREAK_IT = False\b", CELLS["03-003"].source, re.M)
    assert "BREAK_IT" in CELLS["03-026"].source and "alpha_bar=schedule.alpha" in CELLS["03-026"].source
    assert "<details>" in CELLS["03-035"].source and "BREAK_IT = True" in CELLS["03-035"].source


def test_the_run_is_time_budgeted_with_even_checkpoints_and_no_probe():
    source = CELLS["03-030"].source
    for piece in ("minutes=TRAIN_MINUTES", "steps=None", "checkpoint_every=0",
                  "checkpoint_minutes=TRAIN_MINUTES / NUM_CHECKPOINTS", "keep_checkpoints=NUM_CHECKPOINTS + 1",
                  "warmup_steps=WARMUP_STEPS"):
        assert piece in source, piece
    assert not any("probe" in s or "seconds_per_step" in s for s in code_order())


def test_quality_figures_come_with_an_interval_and_the_target_is_scored():
    assert "metrics.bootstrap_interval" in CELLS["03-034b"].source and "kid" in CELLS["03-034b"].source
    assert "frechet" not in CELLS["03-034b"].source
    assert "scores[-1]" in CELLS["03-target"].source and "0.9" in CELLS["03-target"].source
