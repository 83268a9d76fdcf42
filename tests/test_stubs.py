"""Every exercise stub in lessons/ says what to write in words, never the code (issue 13).

A stub is the message of `raise NotImplementedError("Exercise: ...")` that scripts/make_lessons.py
writes from the `# HINT:` line of a solution block. An exercise's stub must end with "Stuck?
checks.hint('NAME')" (NAME an exercise with hints; other stubs, such as a derivation's formula, have
no such ending), and apart from that ending it must hold no code: no call `word(`,
no dotted name `a.b`, no indexing `[`, no power `**`, no torch or schedules, and no piece of 12 or
more characters of a solution line (whitespace removed on both sides).
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from diffusion_course import checks

ROOT = Path(__file__).resolve().parent.parent
LESSONS = sorted((ROOT / "lessons").glob("*.ipynb"))
STUB = re.compile(r'raise NotImplementedError\("Exercise: (.*)"\)')
ENDING = re.compile(r"\s*Stuck\? checks\.hint\('(\w+)'\)$")
CODE = [(re.compile(r"[A-Za-z_]\w*\("), "a call"), (re.compile(r"[A-Za-z_]\w*\.[A-Za-z_]"), "a dotted name"),
        (re.compile(r"\["), "indexing"), (re.compile(r"\*\*"), "a power"),
        (re.compile(r"\b(torch|schedules|sqrt|math|gather)\b"), "a library name")]
MIN_PIECE = 12


def code_in(message: str, solution: list[str]) -> list[str]:
    """The pieces of code in a stub's message (without its "Stuck?" ending), as readable lines."""
    found = [f"{what}: {match.group()!r}" for pattern, what in CODE for match in [pattern.search(message)] if match]
    squeezed = re.sub(r"\s", "", message)
    for line in solution:
        code = re.sub(r"\s", "", line)
        piece = next((code[i:i + MIN_PIECE] for i in range(len(code) - MIN_PIECE + 1)
                      if code[i:i + MIN_PIECE] in squeezed), None)
        if piece:
            found.append(f"code from the solution line {line.strip()!r}: {piece!r}")
    return found


def solution_blocks(source: str) -> list[list[str]]:
    """The code lines of each BEGIN/END SOLUTION block (the HINT line and comments left out)."""
    blocks, block = [], None
    for line in source.split("\n"):
        marker = line.strip()
        if marker == "### BEGIN SOLUTION":
            block = []
        elif marker == "### END SOLUTION":
            blocks.append(block)
            block = None
        elif block is not None and marker and not marker.startswith("#"):
            block.append(line)
    return blocks


def exercises(lesson: Path):
    """(function name, stub message, solution lines) for every stub of a lesson notebook."""
    solution = {cell.get("id"): cell for cell in nbformat.read(ROOT / "solutions" / lesson.name, 4).cells}
    for cell in nbformat.read(lesson, 4).cells:
        messages = STUB.findall(cell.source)
        if messages:
            names = re.findall(r"^\s*def (\w+)\(", cell.source, re.M)
            for name, message, block in zip(names, messages, solution_blocks(solution[cell.get("id")].source)):
                yield name, message.replace('\\"', '"'), block


# The stubs as they were before they were rewritten in words (lessons/ at commit 03e28ec). The
# check must find code in every one of them, with the solutions as they are now.
OLD_STUBS = {
    "q_sample": "look up alpha_bar_t with schedules.gather(schedule.alpha_bar, t, x0), then apply the boxed formula",
    "cosine_alpha_bar": "compute f at t = 0, 1, ..., T in float64 (torch.arange(num_steps + 1)); alpha_bar is f[1:] / f[0]",
    "timestep_embedding": "with half = dim // 2, freqs[i] = exp(-log(10000) * i / half); angles = t.float()[:, None] * "
                          "freqs[None, :]; then torch.cat of sin and cos",
    "res_block_forward": "conv1 after norm1 and SiLU; scale, shift = block.emb_proj(F.silu(emb))[:, :, None, None]"
                         ".chunk(2, dim=1); then norm2, scale and shift, SiLU, dropout, conv2, and add block.skip(x)",
    "diffusion_loss": "draw t with torch.randint(0, schedule.num_steps, (B,)) and noise with torch.randn_like when they "
                      "are None; x_t = schedules.q_sample(x0, t, schedule, noise); return F.mse_loss(model(x_t, t, cond), noise)",
    "train_step": "loss = training.diffusion_loss(model, x0, schedule, cond); then optimizer.zero_grad(), "
                  "loss.backward(), optimizer.step(); return loss.item()",
    "ddpm_step": "beta_t = schedules.gather(schedule.beta, t, x_t), likewise alpha_t and alpha_bar_t; mean = (x_t - "
                 "beta_t / sqrt(1 - alpha_bar_t) * eps_pred) / sqrt(alpha_t); add sqrt(beta_t) * noise only where t > 0",
    "ddim_step": "alpha_bar_prev = torch.where(t_prev >= 0, schedule.alpha_bar[t_prev.clamp(min=0)], torch.tensor(1.0))"
                 ".view(-1, 1, 1, 1); x0_pred from the formula; then sqrt(alpha_bar_prev) * x0_pred + sqrt(1 - "
                 "alpha_bar_prev - sigma**2) * eps_pred + sigma * noise",
    "drop_labels": "drop = torch.rand(cond.shape, generator=generator) < p, then torch.where(drop, null_class, cond)",
    "guided_eps": "start from eps_uncond and move w times the difference (eps_cond - eps_uncond)",
    "img2img_start": "t_start = ceil(strength * T) - 1 as an int (math.ceil); noise x0 to that step for every image "
                     "with schedules.q_sample",
    "inpaint_step": "known_t = x_known when t == -1, else schedules.q_sample(x_known, torch.full((B,), t), schedule, "
                    "noise); then mask * x_t + (1 - mask) * known_t",
}
STUBS = [exercise for lesson in LESSONS for exercise in exercises(lesson)]
EXERCISES = [stub for stub in STUBS if stub[0] in checks.HINTS]      # the checked exercises, with tiered hints
OTHER_STUBS = [stub for stub in STUBS if stub[0] not in checks.HINTS]   # e.g. a derivation's formula cell


def test_every_exercise_is_found():
    assert sorted(name for name, _, _ in EXERCISES) == sorted(checks.HINTS)
    assert set(OLD_STUBS) <= set(checks.HINTS)     # the twelve exercises, plus derivations with hints


@pytest.mark.parametrize("name, message, solution", EXERCISES, ids=[name for name, _, _ in EXERCISES])
def test_stub_is_words_only_and_points_to_its_hint(name, message, solution):
    ending = ENDING.search(message)
    assert ending, f"{name}: the stub must end with \"Stuck? checks.hint('{name}')\": {message!r}"
    assert ending.group(1) == name, f"{name}: the stub points to the hints of {ending.group(1)!r}"
    words = message[:ending.start()]
    assert len(words.split()) >= 12, f"{name}: say what to write (inputs, output, the equation): {words!r}"
    assert code_in(words, solution) == [], f"{name}: the stub holds code: {words!r}"


@pytest.mark.parametrize("name, message, solution", OTHER_STUBS, ids=[name for name, _, _ in OTHER_STUBS])
def test_other_stubs_are_words_only_too(name, message, solution):
    """Stubs without tiered hints (a derivation the learner writes, checked by checks.check_derivation)."""
    assert len(message.split()) >= 8, f"{name}: say what to write in words: {message!r}"
    assert code_in(message, solution) == [], f"{name}: the stub holds code: {message!r}"


@pytest.mark.parametrize("name", sorted(OLD_STUBS))
def test_the_old_stubs_would_have_failed(name):
    solution = next(block for exercise, _, block in EXERCISES if exercise == name)
    assert code_in(OLD_STUBS[name], solution), f"{name}: the check finds no code in the old stub"


def test_code_in_finds_each_kind_of_code():
    solution = ["    alpha_bar_t = schedules.gather(schedule.alpha_bar, t, x0)"]
    assert code_in("the boxed formula of lesson 01, with alpha_bar looked up per image", solution) == []
    for message in ("use gather here", "look up alpha_bar(t)", "x0.shape", "f[0]", "sigma**2",
                    "alpha_bar_t = schedules gather", "then alpha_bar_t=schedule"):
        assert code_in(message, solution), message
