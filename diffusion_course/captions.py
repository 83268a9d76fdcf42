"""Ring 2: prompted digits, the small text-to-image dataset of lesson 09 (and the checks of what a
text-conditioned model drew).

A canvas is (3, 32, 64) in [-1, 1] (black background = -1) holding two MNIST digits: the left one
in the left 32 x 32 half, the right one in the right half. Each digit has a colour (PALETTE: its
pixel = MNIST intensity in [0, 1] times the colour's RGB, then mapped to [-1, 1]) and a size
(SIZES: the 28 x 28 MNIST image is resized, antialiased, to 16, 22 or 28 px square), and sits
centred in its half, shifted by up to 2 px each way. A *scene* says all of that as six ints (`Scene`).

Captions come from this grammar (`caption` draws every choice from the generator you pass):

    caption   := full (70%) | one_side (15%) | side_free (15%)
    full      := L " on the left and " R " on the right"     | R " on the right and " L " on the left"
               | L " on the left, " R " on the right"         | "on the left " L ", on the right " R
               | "on the right " R " and on the left " L      | L " to the left of " R
               | R " to the right of " L                      | "two digits: " l ", " r
               | "left: " l ", right: " r
    one_side  := D " on the " side | "on the " side " " D | side ": " d      (side: "left" | "right")
    side_free := D | d                                       (either side may satisfy it)
    D         := article " " d                  (article: "an" before 8 or "eight", else "a")
    d         := [size " "] [colour " "] number  (L, l: the left digit; R, r: the right one)
    size      := "small" | "large"   (said with probability 0.8; "normal" is never said)
    colour    := "red" | "green" | ... (a PALETTE name, said with probability 0.8)
    number    := "0" ... "9" | "zero" ... "nine"   (numeral or word, half each)

`parse_prompt` reads these captions and also free prompts made of the same words (VOCABULARY):
commas, semicolons, full stops and "and" separate clauses; a side word ("left", "right") belongs to
the digit in its clause ("on the left a 3", "a 3 on the left", "left: 3"); "X to the left of Y"
relates two digits; two digits without side words are read left to right; one digit without a side
word may be on either side (`PromptSpec.side_free`).

What is here: PALETTE, SIZES, NUMBER_WORDS, VOCABULARY, CANVAS_SHAPE, `Scene`; `random_scenes`,
`compose`, `caption`, `full_caption`, `build_prompted_digits` (the dataset); `parse_prompt`;
`colours_of`, `digits_of`, `adherence` (did the image do what the prompt said?) and
`nearest_training_images` (did the model copy its training set?).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import data, metrics, text

PALETTE: dict[str, tuple[float, float, float]] = {   # colour name -> RGB in [0, 1], in index order
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "magenta": (1.0, 0.0, 1.0), "cyan": (0.0, 1.0, 1.0),
    "white": (1.0, 1.0, 1.0),
}
SIZES = ("small", "normal", "large")
SIZE_PIXELS = (16, 22, 28)                           # the side of the resized 28 x 28 MNIST image, per size
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CANVAS_SHAPE = (3, 32, 64)
HALF = 32                                            # each digit's square half of the canvas
MAX_SHIFT = 2                                        # pixels a digit may move from the centre, each way

_SIDES = ("left", "right")
_SEPARATORS = {",", ";", ".", "and"}
_FILLERS = {"a", "an", "the", "on", "to", "of", "digits"}
_SAID = 0.8                                          # probability that a colour / a non-normal size is said
_FULL_TEMPLATES = (
    "{L} on the left and {R} on the right", "{R} on the right and {L} on the left",
    "{L} on the left, {R} on the right", "on the left {L}, on the right {R}",
    "on the right {R} and on the left {L}", "{L} to the left of {R}", "{R} to the right of {L}",
    "two digits: {l}, {r}", "left: {l}, right: {r}",
)
_ONE_SIDE_TEMPLATES = ("{D} on the {side}", "on the {side} {D}", "{side}: {d}")
_SIDE_FREE_TEMPLATES = ("{D}", "{d}")

VOCABULARY: tuple[str, ...] = tuple(sorted(
    {"a", "an", "and", "digits", "left", "of", "on", "right", "the", "to", "small", "large"}
    | set(PALETTE) | set(NUMBER_WORDS) | {str(d) for d in range(10)}))


class Scene:
    """Column indices of a scene: an int64 tensor (N, 6) (or (6,) for one canvas) holding
    [left_digit, left_colour, left_size, right_digit, right_colour, right_size], where a digit is
    0-9, a colour an index into PALETTE and a size an index into SIZES."""
    LEFT_DIGIT, LEFT_COLOUR, LEFT_SIZE, RIGHT_DIGIT, RIGHT_COLOUR, RIGHT_SIZE = range(6)
    COLUMNS = 6
    LIMITS = (10, len(PALETTE), len(SIZES)) * 2      # each column's values lie in [0, limit)


class DigitSpec(NamedTuple):
    """What a prompt asks of one digit; None where it says nothing."""
    digit: int | None = None     # 0-9
    colour: int | None = None    # an index into PALETTE
    size: int | None = None      # an index into SIZES


class PromptSpec(NamedTuple):
    """What a prompt asks for, per side. With side_free (one digit, no side word), the digit is in
    `left` and either side of the canvas may satisfy it; `right` is then empty."""
    left: DigitSpec = DigitSpec()
    right: DigitSpec = DigitSpec()
    side_free: bool = False


class PromptedDigits(NamedTuple):
    images: Tensor         # (N, 3, 32, 64) float32 in [-1, 1]
    captions: list[str]    # N captions from `caption`
    scenes: Tensor         # (N, 6) int64, see Scene


# ----------------------------------------------------------------------------------------------
# Scenes and canvases

def random_scenes(num: int, generator: torch.Generator | None = None) -> Tensor:
    """(num, 6) int64 scenes: digits, colours and sizes drawn uniformly and independently."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 0:
        raise ValueError(f"num must be a non-negative int (how many scenes), got {num!r}.")
    limits = torch.tensor(Scene.LIMITS)
    return (torch.rand(num, Scene.COLUMNS, generator=generator) * limits).long().clamp(max=limits - 1)


def check_scenes(scenes: Tensor) -> Tensor:
    """Check that scenes are an int64 (N, 6) tensor with every column in range; return them."""
    if not isinstance(scenes, Tensor) or scenes.dtype != torch.int64 or scenes.ndim != 2 \
            or scenes.shape[1] != Scene.COLUMNS:
        got = f"{scenes.dtype} of shape {tuple(scenes.shape)}" if isinstance(scenes, Tensor) else type(scenes).__name__
        raise ValueError(f"scenes must be an int64 (N, 6) tensor (see captions.Scene), got {got}.")
    limits = torch.tensor(Scene.LIMITS, device=scenes.device)
    bad = ((scenes < 0) | (scenes >= limits)).any(0)
    if bad.any():
        column = int(bad.nonzero()[0])
        raise ValueError(f"scenes column {column} must lie in [0, {Scene.LIMITS[column]}) "
                         "(digit 0-9, colour index into PALETTE, size index into SIZES), "
                         f"got values from {int(scenes[:, column].min())} to {int(scenes[:, column].max())}.")
    return scenes


def compose(digits_left: Tensor, digits_right: Tensor, scenes: Tensor,
            generator: torch.Generator | None = None) -> Tensor:
    """Draw scenes: each digit resized to its size, shifted, coloured, on a black canvas.

    Args:
        digits_left, digits_right: (N, 28, 28) MNIST intensities in [0, 1] (0 = background).
        scenes: (N, 6) int64, see Scene (the digit columns are not used: the pixels say the digit).
        generator: draws the shifts, uniform ints in [-2, 2] per side and axis.
    Returns:
        (N, 3, 32, 64) float32 canvases in [-1, 1].
    """
    scenes = check_scenes(scenes)
    for name, digits in (("digits_left", digits_left), ("digits_right", digits_right)):
        if not isinstance(digits, Tensor) or digits.shape != (len(scenes), 28, 28) or not digits.is_floating_point():
            got = (f"{digits.dtype} of shape {tuple(digits.shape)}" if isinstance(digits, Tensor)
                   else type(digits).__name__)
            raise ValueError(f"{name} must be a float ({len(scenes)}, 28, 28) tensor in [0, 1] (one digit per "
                             f"scene; data.load_dataset gives [-1, 1]: use (x + 1) / 2), got {got}.")
    shifts = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (len(scenes), 2, 2), generator=generator)
    halves = [_place(digits.float(), scenes[:, 3 * side + 2], shifts[:, side]) for side, digits
              in enumerate((digits_left, digits_right))]
    palette = torch.tensor(list(PALETTE.values()))
    coloured = [half[:, None] * palette[scenes[:, 3 * side + 1]][:, :, None, None] for side, half in enumerate(halves)]
    return torch.cat(coloured, dim=3) * 2 - 1


def _place(digits: Tensor, sizes: Tensor, shifts: Tensor) -> Tensor:
    """(N, 28, 28) digits -> (N, 32, 32) halves: resized to SIZE_PIXELS[size], centred, shifted by
    (dy, dx) = shifts (N, 2) and clipped to the half."""
    half = digits.new_zeros(len(digits), HALF, HALF)
    for size, pixels in enumerate(SIZE_PIXELS):
        chosen = sizes == size
        if chosen.any():
            resized = F.interpolate(digits[chosen, None], size=(pixels, pixels), mode="bilinear",
                                    antialias=True, align_corners=False)[:, 0].clamp(0, 1)
            before = (HALF - pixels) // 2
            half[chosen] = F.pad(resized, (before, HALF - pixels - before) * 2)
    # Shift: out[i, j] = in[i - dy, j - dx], read from a copy padded with MAX_SHIFT zeros.
    padded = F.pad(half, (MAX_SHIFT,) * 4)
    index = torch.arange(HALF)
    rows = (index[None] + MAX_SHIFT - shifts[:, :1])[:, :, None]
    cols = (index[None] + MAX_SHIFT - shifts[:, 1:])[:, None, :]
    return padded[torch.arange(len(half))[:, None, None], rows, cols]


# ----------------------------------------------------------------------------------------------
# Captions

def caption(scene: Tensor, generator: torch.Generator | None = None) -> str:
    """A random caption of one scene (6,) int64, drawn from the grammar in the module docstring."""
    left, right = _scene_sides(scene)
    kind = float(torch.rand((), generator=generator))
    if kind < 0.7:
        template = _FULL_TEMPLATES[_choice(len(_FULL_TEMPLATES), generator)]
        phrases = {"l": _phrase(left, generator), "r": _phrase(right, generator)}
        phrases |= {"L": _with_article(phrases["l"]), "R": _with_article(phrases["r"])}
        return template.format(**phrases)
    side = _choice(2, generator)
    d = _phrase((left, right)[side], generator)
    if kind < 0.85:
        template = _ONE_SIDE_TEMPLATES[_choice(len(_ONE_SIDE_TEMPLATES), generator)]
        return template.format(D=_with_article(d), d=d, side=_SIDES[side])
    return _SIDE_FREE_TEMPLATES[_choice(len(_SIDE_FREE_TEMPLATES), generator)].format(D=_with_article(d), d=d)


def full_caption(scene: Tensor) -> str:
    """The canonical full caption of a scene (6,) int64: numerals, both colours, sizes when not
    normal, e.g. "a red 3 on the left and a small blue 7 on the right"."""
    left, right = (_with_article(" ".join(_words(spec, colour=True, size=True, numeral=True)))
                   for spec in _scene_sides(scene))
    return f"{left} on the left and {right} on the right"


def _scene_sides(scene: Tensor) -> tuple[DigitSpec, DigitSpec]:
    if not isinstance(scene, Tensor) or scene.shape != (Scene.COLUMNS,):
        got = f"shape {tuple(scene.shape)}" if isinstance(scene, Tensor) else type(scene).__name__
        raise ValueError(f"scene must be one (6,) int64 scene (a row of the (N, 6) scenes), got {got}.")
    values = check_scenes(scene[None])[0].tolist()
    return DigitSpec(*values[:3]), DigitSpec(*values[3:])


def _phrase(spec: DigitSpec, generator: torch.Generator | None) -> str:
    """d := [size] [colour] number, each optional part said with probability _SAID."""
    said = torch.rand(3, generator=generator)
    return " ".join(_words(spec, colour=bool(said[0] < _SAID), size=bool(said[1] < _SAID),
                           numeral=bool(said[2] < 0.5)))


def _words(spec: DigitSpec, *, colour: bool, size: bool, numeral: bool) -> list[str]:
    words = [SIZES[spec.size]] if size and SIZES[spec.size] != "normal" else []
    words += [list(PALETTE)[spec.colour]] if colour else []
    return words + [str(spec.digit) if numeral else NUMBER_WORDS[spec.digit]]


def _with_article(phrase: str) -> str:
    return ("an " if phrase.split()[0] in ("8", "eight") else "a ") + phrase


def _choice(num: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(num, (), generator=generator))


def binding_negatives(prompt: str) -> list[str]:
    """Three almost-true variants of a caption for contrastive training (NegCLIP's hard negatives,
    Yuksekgonul et al. 2023): its two colour words swapped, its two numbers swapped, and "left" and
    "right" swapped. Articles are fixed ("an 8", "a 3") and punctuation kept, so only the binding
    tells a variant from the caption. A variant that cannot be made (one colour said, two equal
    numbers, no side word) or that means what the caption means (parse_prompt: two equal digits
    swapped sides) is the caption itself, lowercased."""
    pieces = re.split(r"([\s,:;.]+)", prompt.lower())   # words at even positions, separators between
    words = pieces[::2]
    colours = [i for i, word in enumerate(words) if word in PALETTE]
    numbers = [i for i, word in enumerate(words) if _number(word) is not None       # not the "two" of "two digits"
               and (i + 1 == len(words) or words[i + 1] != "digits")]
    variants = []
    for positions, key in ((colours, lambda word: word), (numbers, _number)):
        swapped = list(words)
        if len(positions) == 2 and key(words[positions[0]]) != key(words[positions[1]]):
            a, b = positions
            swapped[a], swapped[b] = words[b], words[a]
        variants.append(swapped)
    variants.append([{"left": "right", "right": "left"}.get(word, word) for word in words])
    texts = ["".join(piece for pair in zip(_fix_articles(variant), pieces[1::2] + [""]) for piece in pair)
             for variant in variants]
    meaning = _meaning(prompt)
    return [prompt.lower() if meaning is not None and _meaning(text) == meaning else text for text in texts]


def _meaning(prompt: str) -> PromptSpec | None:
    try:
        return parse_prompt(prompt)
    except ValueError:
        return None


def binding_negative_ids(tokenizer, ids: Tensor) -> Tensor:
    """(B, 3, L) token ids of the binding_negatives of each caption in ids (B, L), for
    text.clip_loss(..., negatives=...). `tokenizer` is the model's (a text.Tokenizer)."""
    variants = [variant for prompt in tokenizer.decode(ids) for variant in binding_negatives(prompt)]
    return tokenizer.encode(variants).to(ids.device).view(ids.shape[0], 3, ids.shape[1])


def negclip_loss(model, x0: Tensor, *, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """text.clip_loss with each caption's three binding negatives (NegCLIP), with runs.train's loss
    contract: model a text.MiniCLIP, x0 (B, 3, 32, 64) canvases, cond (B, L) their captions' ids."""
    return text.clip_loss(model, x0, cond=cond, negatives=binding_negative_ids(model.tokenizer, cond))


def _number(word: str) -> int | None:
    return int(word) if word.isdigit() and len(word) == 1 else (NUMBER_WORDS.index(word) if word in NUMBER_WORDS else None)


def _fix_articles(words: list[str]) -> list[str]:
    """"an" before 8 and eight, "a" before anything else (empty strings, left by the split, skipped)."""
    result, real = list(words), [i for i, word in enumerate(words) if word]
    for i, following in zip(real, real[1:] + [None]):
        if words[i] in ("a", "an"):
            result[i] = "an" if following is not None and words[following] in ("8", "eight") else "a"
    return result


# ----------------------------------------------------------------------------------------------
# The dataset

def build_prompted_digits(num: int, *, train: bool = True, seed: int = 0, root=None,
                          chunk: int = 4096) -> PromptedDigits:
    """`num` captioned canvases from MNIST's training (or test) split, reproducible from `seed`.

    Scenes are drawn with random_scenes; each side gets a random MNIST image of its digit, and
    canvases are composed `chunk` at a time (so only the result itself is large: 24 KB a canvas).
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int (how many canvases), got {num!r}.")
    mnist = data.load_dataset("mnist", train, root)
    generator = torch.Generator().manual_seed(seed)
    scenes = random_scenes(num, generator)
    pick = [_images_of(mnist.labels, scenes[:, column], generator) for column in (Scene.LEFT_DIGIT, Scene.RIGHT_DIGIT)]
    digits = (mnist.images[:, 0] + 1) / 2
    images = torch.cat([compose(digits[left], digits[right], part, generator) for left, right, part
                        in zip(pick[0].split(chunk), pick[1].split(chunk), scenes.split(chunk))])
    return PromptedDigits(images, [caption(scene, generator) for scene in scenes], scenes)


def _images_of(labels: Tensor, wanted: Tensor, generator: torch.Generator) -> Tensor:
    """For each wanted digit, the index of a uniformly drawn image with that label."""
    order = labels.argsort(stable=True)
    counts = torch.bincount(labels, minlength=10)
    starts = counts.cumsum(0) - counts
    offsets = (torch.rand(len(wanted), generator=generator) * counts[wanted]).long()
    return order[starts[wanted] + offsets.clamp(max=counts[wanted] - 1)]


# ----------------------------------------------------------------------------------------------
# Reading prompts

def parse_prompt(text: str) -> PromptSpec:
    """What a prompt asks for, per side (see the module docstring for what is understood).

    Raises ValueError for words outside VOCABULARY, and for prompts that contradict themselves
    (two colours for one digit, two digits on one side, more than two digits).
    """
    if not isinstance(text, str):
        raise ValueError(f"A prompt must be a str, got {type(text).__name__}.")
    tokens = re.findall(r"[^\s,;.:]+|[,;.]", text.lower())
    unknown = sorted({t for t in tokens if t not in VOCABULARY and t not in _SEPARATORS})
    if unknown:
        raise ValueError(f"Unknown words in the prompt {text!r}: {', '.join(map(repr, unknown))}. Prompts may use "
                         "only the words in captions.VOCABULARY (numerals or number words, colours "
                         f"{', '.join(PALETTE)}, sizes small and large, and a few linking words).")
    return _assign_sides(_clauses(tokens, text), text)


def _clauses(tokens: list[str], text: str) -> list[tuple[list[DigitSpec], list[str]]]:
    """Split tokens into clauses, each (digit phrases, side words); a side word followed by "of"
    ("to the left of") is kept as "left of" / "right of"."""
    clauses, phrases, sides, pending = [], [], [], []
    for i, token in enumerate(tokens):
        if token == "two" and tokens[i + 1:i + 2] == ["digits"]:
            continue                                              # the "two digits:" heading
        if token in _SEPARATORS or token in _SIDES or token in _FILLERS:
            if pending and token not in ("a", "an", "the"):
                raise ValueError(f"In {text!r}, {' '.join(pending)!r} must be followed by its digit, as in "
                                 "'a small red 3'.")
            if token in _SEPARATORS:
                clauses.append((phrases, sides))
                phrases, sides = [], []
            elif token in _SIDES:
                sides.append(token + (" of" if tokens[i + 1:i + 2] == ["of"] else ""))
        elif token in PALETTE or token in SIZES:
            pending.append(token)
        else:
            phrases.append(_digit_spec(pending, token, text))
            pending = []
    if pending:
        raise ValueError(f"In {text!r}, {' '.join(pending)!r} must be followed by its digit, as in 'a small red 3'.")
    return clauses + [(phrases, sides)]


def _digit_spec(modifiers: list[str], number: str, text: str) -> DigitSpec:
    """One digit phrase: its colour and size words, then its numeral or number word."""
    digit = int(number) if number.isdigit() else NUMBER_WORDS.index(number)
    colours = {list(PALETTE).index(w) for w in modifiers if w in PALETTE}
    sizes = {SIZES.index(w) for w in modifiers if w in SIZES}
    for kind, found in (("colours", colours), ("sizes", sizes)):
        if len(found) > 1:
            raise ValueError(f"The prompt {text!r} gives the digit {number!r} two {kind} "
                             f"({' and '.join(w for w in modifiers if w in PALETTE or w in SIZES)}); give one.")
    return DigitSpec(digit, min(colours, default=None), min(sizes, default=None))


def _assign_sides(clauses: list[tuple[list[DigitSpec], list[str]]], text: str) -> PromptSpec:
    """Give each digit phrase its side (or None), then build the PromptSpec."""
    placed, carried = [], None
    for phrases, sides in clauses:
        if any(side.endswith(" of") for side in sides):
            placed += _relation(phrases, sides, text)
            continue
        side = _one_side(sides, carried, text)
        if side is not None and len(phrases) > 1:
            raise ValueError(f"In {text!r}, one side word is given for {len(phrases)} digits; "
                             "give each digit its own clause, as in 'a 3 on the left and a 7 on the right'.")
        carried = side if not phrases else None                   # "on the left, a 3": the side carries on
        placed += [(phrase, side) for phrase in phrases]
    if carried is not None:
        raise ValueError(f"In {text!r}, the side word {carried!r} has no digit; name one, "
                         f"as in 'a 3 on the {carried}'.")
    return _spec_from(placed, text)


def _one_side(sides: list[str], carried: str | None, text: str) -> str | None:
    found = set(sides) | ({carried} if carried else set())
    if len(found) > 1:
        raise ValueError(f"The prompt {text!r} puts one digit on the left and on the right; give it one side.")
    return found.pop() if found else None


def _relation(phrases: list[DigitSpec], sides: list[str], text: str) -> list[tuple[DigitSpec, str]]:
    """"X to the left of Y" (or right): X on that side, Y on the other."""
    if len(phrases) != 2 or len(sides) != 1:
        raise ValueError(f"In {text!r}, 'to the {sides[0]}' needs exactly one digit before it and one after "
                         "it (and no other side word in that clause), as in 'a 3 to the left of a 7'.")
    first = sides[0].removesuffix(" of")
    return [(phrases[0], first), (phrases[1], _SIDES[1 - _SIDES.index(first)])]


def _spec_from(placed: list[tuple[DigitSpec, str | None]], text: str) -> PromptSpec:
    """Digits with sides -> PromptSpec: two unsided digits read left to right, one unsided digit
    paired with a sided one takes the other side, a lone unsided digit is side_free."""
    if len(placed) > 2:
        raise ValueError(f"The prompt {text!r} names {len(placed)} digits; a canvas holds at most two.")
    if len(placed) == 1 and placed[0][1] is None:
        return PromptSpec(placed[0][0], DigitSpec(), side_free=True)
    if len(placed) == 2:
        (first, side_a), (second, side_b) = placed
        side_a = side_a or (_SIDES[1 - _SIDES.index(side_b)] if side_b else "left")
        side_b = side_b or _SIDES[1 - _SIDES.index(side_a)]
        if side_a == side_b:
            raise ValueError(f"The prompt {text!r} puts both digits on the {side_a}; a side holds one digit.")
        placed = [(first, side_a), (second, side_b)]
    by_side = {side: spec for spec, side in placed}
    return PromptSpec(by_side.get("left", DigitSpec()), by_side.get("right", DigitSpec()))


# ----------------------------------------------------------------------------------------------
# Reading images: which colours and digits did a model draw?

INK = 0.5        # a pixel is part of the digit where its brightness is over INK x the half's brightest
MNIST_BOX = 20   # MNIST digits fit a 20 x 20 box, centred by their centre of mass in 28 x 28 (LeCun et al.)
CONTRAST = 1.3   # brightness gain before classifying (resized strokes come out greyer than MNIST's)


def colours_of(images: Tensor) -> Tensor:
    """The palette colour of each digit, read from the pixels.

    Per half: average the RGB of the digit's pixels (brighter than INK x the half's brightest),
    and pick the palette colour at the smallest angle to it (cosine), so a dim stroke still reads
    as its colour. Args: images (N, 3, 32, 64) in [-1, 1]. Returns (N, 2) int64 palette indices
    (left, right); -1 where a half is black.
    """
    images = data.check_model_range(images, shape=CANVAS_SHAPE, what="images")
    palette = F.normalize(torch.tensor(list(PALETTE.values())), dim=1)
    found = []
    for half in _halves(images):
        rgb = (half.float() + 1) / 2                                # (N, 3, 32, 32) in [0, 1]
        brightness = rgb.amax(1)
        ink = brightness > INK * brightness.flatten(1).amax(1)[:, None, None]
        ink &= brightness > 0.05                                    # a black half has no ink
        mean = (rgb * ink[:, None]).sum((2, 3)) / ink.sum((1, 2)).clamp(min=1)[:, None]
        nearest = (F.normalize(mean, dim=1) @ palette.T).argmax(1)
        found.append(torch.where(ink.flatten(1).any(1), nearest, -1))
    return torch.stack(found, dim=1)


def digits_of(images: Tensor, classifier: metrics.Classifier | None = None) -> Tensor:
    """The digit in each half, read by the MNIST classifier (metrics.load_classifier("mnist")).

    Each half goes to grey (the brightest channel, so any palette colour works) and is framed the
    way MNIST's digits were: scaled so its ink fits a 20 x 20 box and centred by its centre of mass
    in 28 x 28 (`_mnist_frame`), whatever size it was drawn at.
    Args: images (N, 3, 32, 64) in [-1, 1]; classifier: the MNIST classifier (loaded if None).
    Returns (N, 2) int64 digits (left, right).
    """
    images = data.check_model_range(images, shape=CANVAS_SHAPE, what="images")
    classifier = classifier or metrics.load_classifier("mnist")
    found = []
    for half in _halves(images):
        grey = (half.float().amax(1) + 1) / 2                       # (N, 32, 32) in [0, 1]
        framed = _mnist_frame(grey)
        framed = (framed / framed.flatten(1).amax(1).clamp(min=0.1)[:, None, None] * CONTRAST).clamp(0, 1)
        found.append(metrics.predict(framed[:, None] * 2 - 1, "mnist", model=classifier))
    return torch.stack(found, dim=1)


def _halves(images: Tensor) -> tuple[Tensor, Tensor]:
    return images[..., :HALF], images[..., HALF:]


def _mnist_frame(grey: Tensor) -> Tensor:
    """(N, 32, 32) grey halves in [0, 1] -> (N, 28, 28): the ink's longer side scaled to MNIST_BOX
    pixels, its centre of mass at the centre (MNIST's own preprocessing), bilinear resampling."""
    ink = grey > INK * grey.flatten(1).amax(1).clamp(min=1e-6)[:, None, None]
    extent = torch.maximum(_ink_extent(ink.any(2)), _ink_extent(ink.any(1))).float()
    scale = MNIST_BOX / extent                                      # output pixels per input pixel
    position = torch.arange(HALF, dtype=grey.dtype)
    mass = grey.sum((1, 2)).clamp(min=1e-6)
    centre_y = (grey.sum(2) * position).sum(1) / mass
    centre_x = (grey.sum(1) * position).sum(1) / mass
    # Output pixel u (0..27) reads input pixel centre + (u - 13.5) / scale; grid_sample wants [-1, 1].
    offsets = (torch.arange(28, dtype=grey.dtype) - 13.5)[None] / scale[:, None]
    to_unit = lambda p: (2 * p + 1) / HALF - 1
    grid_y = to_unit(centre_y[:, None] + offsets)[:, :, None].expand(-1, 28, 28)
    grid_x = to_unit(centre_x[:, None] + offsets)[:, None, :].expand(-1, 28, 28)
    grid = torch.stack([grid_x, grid_y], dim=-1)
    return F.grid_sample(grey[:, None], grid, mode="bilinear", align_corners=False)[:, 0]


def _ink_extent(any_ink: Tensor) -> Tensor:
    """(N, L) bool -> (N,) number of pixels from the first True to the last (at least 1)."""
    position = torch.arange(any_ink.shape[1], device=any_ink.device)
    first = torch.where(any_ink, position, any_ink.shape[1]).amin(1)
    last = torch.where(any_ink, position, -1).amax(1)
    return (last - first + 1).clamp(min=1)


def adherence(images: Tensor, prompts: list[str], classifier: metrics.Classifier | None = None) -> dict:
    """How well images follow their prompts, read with digits_of and colours_of.

    Returns {"digits": share of the digits named that were drawn, "colours": share of the colours
    named that were drawn, "all": share of the images (among those whose prompt names something)
    with everything named right, "num": N}. A side_free prompt is right where either side matches.
    Sizes are not measured. A share with nothing to count is nan.
    """
    images = data.check_model_range(images, shape=CANVAS_SHAPE, what="images")
    if not isinstance(prompts, (list, tuple)) or len(prompts) != len(images):
        raise ValueError(f"prompts must be a list of {len(images)} strs, one per image, got "
                         f"{len(prompts) if isinstance(prompts, (list, tuple)) else type(prompts).__name__}.")
    specs = [parse_prompt(p) for p in prompts]
    drawn = torch.stack([digits_of(images, classifier), colours_of(images)], dim=2).tolist()   # (N, 2, 2)
    counts = {"digits": [0, 0], "colours": [0, 0], "all": [0, 0]}   # [right, named]
    for spec, sides in zip(specs, drawn):
        for key, (right, named) in _judge(spec, sides).items():
            counts[key][0] += right
            counts[key][1] += named
    shares = {key: right / named if named else float("nan") for key, (right, named) in counts.items()}
    return shares | {"num": len(images)}


def _judge(spec: PromptSpec, sides: list[list[int]]) -> dict[str, tuple[int, int]]:
    """(right, named) counts of one image for digits, colours and all; sides = [[digit, colour]] * 2."""
    if spec.side_free:
        wanted = spec.left
        named = {"digits": wanted.digit is not None, "colours": wanted.colour is not None}
        right = {key: any(_matches(wanted, side, key) for side in sides) for key in named}
        right["all"] = any(_matches(wanted, side, "digits") and _matches(wanted, side, "colours") for side in sides)
        named["all"] = named["digits"] or named["colours"]
        return {key: (int(right[key] and named[key]), int(named[key])) for key in named}
    counts = {"digits": (0, 0), "colours": (0, 0)}
    for wanted, side in zip(spec, sides):
        for key, field in (("digits", wanted.digit), ("colours", wanted.colour)):
            counts[key] = (counts[key][0] + int(field is not None and _matches(wanted, side, key)),
                           counts[key][1] + int(field is not None))
    named = counts["digits"][1] + counts["colours"][1]
    return counts | {"all": (int(named > 0 and counts["digits"][0] + counts["colours"][0] == named), int(named > 0))}


def _matches(wanted: DigitSpec, side: list[int], key: str) -> bool:
    """Whether a drawn side [digit, colour] agrees with what is wanted on `key` (None: anything)."""
    value = wanted.digit if key == "digits" else wanted.colour
    return value is None or side[0 if key == "digits" else 1] == value


# ----------------------------------------------------------------------------------------------
# Copying


def format_adherence(score: dict) -> str:
    """One line for `adherence`'s result (what `diffusion-course evaluate` prints for text samples)."""
    return (f"{score['num']} samples: the named digits right {score['digits']:.1%}, the named colours right "
            f"{score['colours']:.1%}, everything named right {score['all']:.1%}")

class Nearest(NamedTuple):
    distances: Tensor   # (N, k) L2 distances in pixel space (values in [-1, 1]), nearest first
    indices: Tensor     # (N, k) int64 rows of train_images


@torch.no_grad()
def nearest_training_images(images: Tensor, train_images: Tensor, k: int = 1, *,
                            batch_size: int = 256, train_batch_size: int = 8192) -> Nearest:
    """The k training images closest to each image (L2 in pixel space): did the model copy?

    Args:
        images: (N, C, H, W) in [-1, 1]; train_images: (M, C, H, W) of the same (C, H, W).
        k: neighbours per image, 1 <= k <= M. Distances are computed in blocks of
        batch_size x train_batch_size (|a|^2 + |b|^2 - 2 a.b, in float32), so memory stays bounded.
    """
    images = data.check_model_range(images, what="images")
    train_images = data.check_model_range(train_images, shape=tuple(images.shape[1:]), what="train_images")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(train_images):
        raise ValueError(f"k must be an int in [1, {len(train_images)}] (neighbours per image), got {k!r}.")
    train = train_images.flatten(1).float()
    parts = [_nearest_block(block.flatten(1).float(), train, k, train_batch_size) for block in images.split(batch_size)]
    return Nearest(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))


def _nearest_block(queries: Tensor, train: Tensor, k: int, train_batch_size: int) -> tuple[Tensor, Tensor]:
    """Running top-k over blocks of the training set: (B, k) distances and indices."""
    best = queries.new_full((len(queries), 0), float("inf")), torch.zeros(len(queries), 0, dtype=torch.long)
    query_norms = queries.square().sum(1, keepdim=True)
    for start in range(0, len(train), train_batch_size):
        block = train[start:start + train_batch_size]
        squared = (query_norms + block.square().sum(1)[None] - 2 * queries @ block.T).clamp(min=0)
        values = torch.cat([best[0], squared], dim=1)
        indices = torch.cat([best[1], torch.arange(start, start + len(block)).expand(len(queries), -1)], dim=1)
        top = values.topk(min(k, values.shape[1]), dim=1, largest=False)
        best = top.values, indices.gather(1, top.indices)
    return best[0].sqrt(), best[1]
