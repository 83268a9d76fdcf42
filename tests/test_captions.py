"""Prompted digits: canvases, captions and their grammar, reading prompts, and reading images back."""

import math

import pytest
import torch

from diffusion_course import captions, data, metrics
from diffusion_course.captions import DigitSpec, PromptSpec
from diffusion_course.text import Tokenizer


@pytest.fixture(scope="module")
def mnist_test(data_root):
    return data.load_dataset("mnist", train=False)


@pytest.fixture(scope="module")
def composed(mnist_test):
    """1000 canvases of test-split digits, their scenes, drawn with a fixed seed."""
    generator = torch.Generator().manual_seed(1)
    scenes = captions.random_scenes(1000, generator)
    digits = (mnist_test.images[:, 0] + 1) / 2
    left, right = (captions._images_of(mnist_test.labels, scenes[:, c], generator) for c in (0, 3))
    return captions.compose(digits[left], digits[right], scenes, generator), scenes


def test_palette_sizes_and_vocabulary():
    assert len(captions.PALETTE) == 7 and list(captions.PALETTE)[:3] == ["red", "green", "blue"]
    assert all(0 <= v <= 1 for rgb in captions.PALETTE.values() for v in rgb)
    assert captions.SIZES == ("small", "normal", "large") and captions.CANVAS_SHAPE == (3, 32, 64)
    assert list(captions.VOCABULARY) == sorted(set(captions.VOCABULARY))
    assert all(w == w.lower() for w in captions.VOCABULARY) and "normal" not in captions.VOCABULARY


def test_compose_shapes_ranges_and_placement():
    generator = torch.Generator().manual_seed(0)
    scenes = torch.tensor([[3, 0, 1, 7, 2, 2]])           # a red normal 3, a blue large 7
    square = torch.zeros(1, 28, 28)
    square[:, 4:24, 4:24] = 1.0
    canvas = captions.compose(square, square, scenes, generator)
    assert canvas.shape == (1, 3, 32, 64) and canvas.dtype == torch.float32
    assert canvas.min() == -1 and canvas.max() <= 1
    left, right = canvas[0, :, :, :32], canvas[0, :, :, 32:]
    assert left[1:].max() == -1 and right[:2].max() == -1   # red has no green or blue, blue no red or green
    width = lambda half: int((half.amax(0) > 0).any(0).sum())
    assert abs(width(left) - 20 * 22 / 28) <= 2 and abs(width(right) - 20) <= 2   # the size's scale
    centre = lambda half: (half.amax(0) > 0).nonzero().float().mean(0)
    assert (centre(left) - 15.5).abs().max() <= 2.5 and (centre(right) - 15.5).abs().max() <= 2.5


def test_compose_and_scenes_reject_bad_input():
    scenes = captions.random_scenes(2, torch.Generator().manual_seed(0))
    assert scenes.shape == (2, 6) and scenes.dtype == torch.int64
    with pytest.raises(ValueError, match=r"\(2, 28, 28\)"):
        captions.compose(torch.zeros(2, 32, 32), torch.zeros(2, 28, 28), scenes)
    bad = scenes.clone()
    bad[0, 1] = 7
    with pytest.raises(ValueError, match="column 1 must lie in"):
        captions.compose(torch.zeros(2, 28, 28), torch.zeros(2, 28, 28), bad)
    with pytest.raises(ValueError, match="int64"):
        captions.compose(torch.zeros(2, 28, 28), torch.zeros(2, 28, 28), scenes.float())


def test_every_caption_parses_back_to_its_scene():
    generator = torch.Generator().manual_seed(0)
    kinds = set()
    for scene in captions.random_scenes(600, generator):
        text = captions.caption(scene, generator)
        assert set(text.replace(",", " ").replace(":", " ").split()) <= set(captions.VOCABULARY), text
        spec = captions.parse_prompt(text)
        kinds.add("side_free" if spec.side_free else "full" if None not in (spec.left.digit, spec.right.digit)
                  else "one side")
        sides = [DigitSpec(*scene[:3].tolist()), DigitSpec(*scene[3:].tolist())]
        wanted = [(spec.left, side) for side in sides] if spec.side_free else list(zip(spec, sides))
        agrees = [all(a is None or a == b for a, b in zip(w, s)) and w.digit is not None for w, s in wanted
                  if w != DigitSpec()]
        assert (any if spec.side_free else all)(agrees) and agrees, (text, scene.tolist(), spec)
    assert kinds == {"full", "one side", "side_free"}


def test_full_caption_is_canonical_and_exact():
    scene = torch.tensor([3, 0, 1, 8, 2, 0])
    assert captions.full_caption(scene) == "a red 3 on the left and a small blue 8 on the right"
    assert captions.parse_prompt(captions.full_caption(scene)) == PromptSpec(DigitSpec(3, 0, None), DigitSpec(8, 2, 0))
    assert captions.full_caption(torch.tensor([8, 6, 1, 0, 6, 2])).startswith("a white 8")


def _swapped(spec: PromptSpec, field: str | None) -> PromptSpec:
    """spec with `field` exchanged between the sides when both name it (None: the sides themselves)."""
    if field is not None and None in (getattr(spec.left, field), getattr(spec.right, field)):
        return spec
    if field is None:
        return PromptSpec(spec.right, spec.left, spec.side_free)
    left, right = spec.left._replace(**{field: getattr(spec.right, field)}), spec.right._replace(**{field: getattr(spec.left, field)})
    return PromptSpec(left, right, spec.side_free)


def test_binding_negatives_swap_exactly_one_binding_and_keep_the_grammar():
    generator = torch.Generator().manual_seed(0)
    made = [0, 0, 0]
    for scene in captions.random_scenes(600, generator):
        text = captions.caption(scene, generator)
        spec, words = captions.parse_prompt(text), text.lower()
        for k, (variant, field) in enumerate(zip(captions.binding_negatives(text), ("colour", "digit", None))):
            expected = _swapped(spec, field)
            if variant == words:     # no swap possible: the caption names fewer than two different values
                assert expected == spec or (field is None and spec.side_free) \
                    or (field is None and "left" not in words and "right" not in words), (text, k)
            else:
                assert captions.parse_prompt(variant) == expected and expected != spec, (text, variant)
                made[k] += 1
            split = variant.replace(",", " ").replace(":", " ").split()
            for article, following in zip(split, split[1:]):
                if article in ("a", "an"):
                    assert (article == "an") == (following in ("8", "eight")), variant
    assert min(made) > 150, made      # each kind of swap is made for a good share of the captions
    assert captions.binding_negatives("a large red 8 on the left and a blue 3 on the right") == [
        "a large blue 8 on the left and a red 3 on the right", "a large red 3 on the left and a blue 8 on the right",
        "a large red 8 on the right and a blue 3 on the left"]
    assert captions.binding_negatives("a 3 on the left, an 8 on the right")[1] == "an 8 on the left, a 3 on the right"
    tokenizer = Tokenizer(captions.VOCABULARY)
    ids = tokenizer.encode(["a red 3 on the left and a blue 7 on the right", "a green 4"])
    negatives = captions.binding_negative_ids(tokenizer, ids)
    assert negatives.shape == (2, 3, 24) and tokenizer.decode(negatives[0]) == [
        "a blue 3 on the left and a red 7 on the right", "a red 7 on the left and a blue 3 on the right",
        "a red 3 on the right and a blue 7 on the left"]
    assert (negatives[1] == ids[1]).all()       # "a green 4": no swap can be made
    assert captions.binding_negatives("Two digits: red 3, blue 3") == ["two digits: blue 3, red 3"] + ["two digits: red 3, blue 3"] * 2


@pytest.mark.parametrize("text, spec", [
    ("a red 3 on the left and a blue seven on the right", PromptSpec(DigitSpec(3, 0), DigitSpec(7, 2))),
    ("a blue 7 to the right of a red three", PromptSpec(DigitSpec(3, 0), DigitSpec(7, 2))),
    ("a 7 to the left of a 3", PromptSpec(DigitSpec(7), DigitSpec(3))),
    ("two digits: red three, blue seven", PromptSpec(DigitSpec(3, 0), DigitSpec(7, 2))),
    ("left: small two, right: large nine", PromptSpec(DigitSpec(2, None, 0), DigitSpec(9, None, 2))),
    ("on the right, a cyan 1", PromptSpec(DigitSpec(), DigitSpec(1, 5))),
    ("a 5 on the right and a 6", PromptSpec(DigitSpec(6), DigitSpec(5))),
    ("a green 4", PromptSpec(DigitSpec(4, 1), DigitSpec(), side_free=True)),
    ("", PromptSpec()),
    ("  A Small YELLOW 0.  ", PromptSpec(DigitSpec(0, 3, 0), DigitSpec(), side_free=True)),
])
def test_parse_prompt_examples(text, spec):
    assert captions.parse_prompt(text) == spec


@pytest.mark.parametrize("text, match", [
    ("a purple 3", r"'purple'.*VOCABULARY"),
    ("a red 3 next to a 4", r"'next'"),
    ("a red blue 3", "two colours"),
    ("a small large 3", "two sizes"),
    ("a 3 on the left and a 4 on the left", "both digits on the left"),
    ("a 1, a 2, a 3", "names 3 digits"),
    ("a 3 on the left on the right", "on the left and on the right"),
    ("a red", "followed by its digit"),
    ("on the left", "has no digit"),
    ("to the left of a 3", "one digit before it"),
])
def test_parse_prompt_rejects_unknown_words_and_contradictions(text, match):
    with pytest.raises(ValueError, match=match):
        captions.parse_prompt(text)
    with pytest.raises(ValueError, match="must be a str"):
        captions.parse_prompt(None)


def test_colours_are_recovered_from_composed_canvases(composed):
    images, scenes = composed
    found = captions.colours_of(images)
    assert found.shape == (1000, 2) and found.dtype == torch.int64
    assert (found == scenes[:, [1, 4]]).float().mean() >= 0.99
    dim = (images + 1) * 0.3 - 1                            # the same strokes at 30% brightness
    assert (captions.colours_of(dim) == scenes[:, [1, 4]]).float().mean() >= 0.99
    assert captions.colours_of(-torch.ones(1, 3, 32, 64)).tolist() == [[-1, -1]]


def test_digits_are_recovered_from_composed_canvases(composed):
    """The shipped classifier gets 97.8% of plain MNIST test digits. On this fixture's 2000 digits it
    was measured at 97.3% (small), 96.2% (normal), 97.8% (large), 97.1% in all; on 10000 digits
    (seed 7) at 96.6%, 98.1%, 97.9%. The floors leave about 2 points for library changes."""
    images, scenes = composed
    right = captions.digits_of(images, metrics.load_classifier("mnist")) == scenes[:, [0, 3]]
    sizes = scenes[:, [2, 5]]
    assert right.float().mean() >= 0.95
    for size, floor in zip(captions.SIZES, (0.94, 0.94, 0.94)):
        assert right[sizes == captions.SIZES.index(size)].float().mean() >= floor, size


def test_adherence_of_true_and_false_prompts(composed):
    images, scenes = composed
    images, scenes = images[:100], scenes[:100]
    classifier = metrics.load_classifier("mnist")
    true = captions.adherence(images, [captions.full_caption(s) for s in scenes], classifier)
    assert true["num"] == 100 and true["colours"] == 1.0 and true["digits"] >= 0.93 and true["all"] >= 0.88
    swapped = torch.cat([scenes[:, 3:], scenes[:, :3]], dim=1)   # each prompt names the sides the wrong way round
    changed = (scenes[:, 0] != scenes[:, 3]) & (scenes[:, 1] != scenes[:, 4])
    false = captions.adherence(images[changed], [captions.full_caption(s) for s in swapped[changed]], classifier)
    assert false["colours"] == 0.0 and false["all"] <= 0.05
    either = [f"a {list(captions.PALETTE)[int(s[4])]} {int(s[3])}" for s in scenes]   # side_free: the right digit
    assert captions.adherence(images, either, classifier)["colours"] == 1.0
    empty = captions.adherence(images[:2], ["", ""], classifier)
    assert math.isnan(empty["digits"]) and math.isnan(empty["all"])
    with pytest.raises(ValueError, match="one per image"):
        captions.adherence(images, ["a 3"], classifier)


def test_build_prompted_digits_is_deterministic(data_root):
    first = captions.build_prompted_digits(6, train=False, seed=3, chunk=4)
    again = captions.build_prompted_digits(6, train=False, seed=3)
    other = captions.build_prompted_digits(6, train=False, seed=4)
    assert first.images.shape == (6, 3, 32, 64) and first.scenes.shape == (6, 6) and len(first.captions) == 6
    data.check_model_range(first.images)
    assert torch.equal(first.images, again.images) and first.captions == again.captions
    assert not torch.equal(first.images, other.images)
    assert (captions.colours_of(first.images) == first.scenes[:, [1, 4]]).all()
    with pytest.raises(ValueError, match="positive int"):
        captions.build_prompted_digits(0)


def test_nearest_training_images_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    train = torch.rand(50, 3, 4, 8, generator=generator) * 2 - 1
    queries = torch.cat([train[[7, 21]], torch.rand(3, 3, 4, 8, generator=generator) * 2 - 1])
    nearest = captions.nearest_training_images(queries, train, k=3, batch_size=2, train_batch_size=16)
    reference = torch.cdist(queries.flatten(1), train.flatten(1)).topk(3, dim=1, largest=False)
    assert torch.allclose(nearest.distances, reference.values, atol=1e-4)
    assert torch.equal(nearest.indices, reference.indices)
    assert nearest.indices[:2, 0].tolist() == [7, 21] and nearest.distances[:2, 0].abs().max() < 1e-3
    with pytest.raises(ValueError, match="k must be"):
        captions.nearest_training_images(queries, train, k=51)
