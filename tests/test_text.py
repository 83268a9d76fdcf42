"""Lesson 09's text side: tokenizer, text encoder, mini CLIP, cross-attention and the TextUNet."""

import functools
import math

import pytest
import torch

from diffusion_course import checkpoints, guidance, runs, text
from diffusion_course.schedules import linear_schedule
from diffusion_course.training import diffusion_loss
from diffusion_course.unet import UNet, UNetConfig

WORDS = ("a", "red", "blue", "green", "3", "seven", "on", "the", "left", "right", "and", "digit")


@pytest.fixture
def text_config():
    return text.TextEncoderConfig(words=WORDS, max_length=10, dim=16, depth=1, heads=2)


@pytest.fixture
def text_unet(text_config):
    torch.manual_seed(0)
    config = text.TextUNetConfig(base_channels=8, channel_mults=(1, 2), text=text_config, attention_heads=2)
    return text.TextUNet(config)


@pytest.fixture
def clip(text_config):
    torch.manual_seed(0)
    return text.MiniCLIP(text.CLIPConfig(text=text_config, image_base_channels=4, embed_dim=8))


def randomise_cross_attention(model):
    """The output projections (and the U-Net's last convolution) start at zero; give them
    weights so the words matter."""
    for module in model.modules():
        if isinstance(module, text.CrossAttention):
            torch.nn.init.normal_(module.to_out.weight, std=0.2)
    torch.nn.init.normal_(model.conv_out.weight, std=0.2)


# --- Tokenizer ---------------------------------------------------------------------------------

def test_tokenizer_round_trip_and_layout():
    tokenizer = text.Tokenizer(WORDS, max_length=10)
    ids = tokenizer.encode(["A red 3, on the left.", "", "blue  seven:right"])
    assert ids.dtype == torch.int64 and ids.shape == (3, 10)
    assert ids[0].tolist() == [1, 3, 4, 7, 9, 10, 11, 2, 0, 0]       # <start> a red 3 on the left <end> pads
    assert ids[1].tolist() == [1, 2] + [0] * 8                       # the empty prompt
    assert tokenizer.decode(ids) == ["a red 3 on the left", "", "blue seven right"]
    assert tokenizer.vocabulary[:3] == ("<pad>", "<start>", "<end>") and tokenizer.vocab_size == 3 + len(WORDS)


def test_tokenizer_errors():
    tokenizer = text.Tokenizer(WORDS, max_length=6)
    with pytest.raises(ValueError, match="'purple'"):
        tokenizer.encode(["a purple 3"])
    with pytest.raises(ValueError, match="5 words; at most 4"):
        tokenizer.encode(["a red 3 on the"])
    with pytest.raises(ValueError, match="list of prompts"):
        tokenizer.encode("a red 3")
    with pytest.raises(ValueError, match="'<end>'"):
        tokenizer.encode(["<end>"])
    for words in ([], ["a", "a"], ["Red"], ["two words"], ["<pad>"]):
        with pytest.raises(ValueError):
            text.Tokenizer(words)


def test_bad_ids_are_named():
    tokenizer = text.Tokenizer(WORDS, max_length=6)
    good = tokenizer.encode(["a red 3"])
    with pytest.raises(ValueError, match="int64 tensor of shape"):
        tokenizer.decode(good.int())
    with pytest.raises(ValueError, match="int64 tensor of shape"):
        tokenizer.decode(good[:, :4])
    with pytest.raises(ValueError, match=r"lie in \[0, 15\)"):
        tokenizer.decode(torch.where(good == 4, 99, good))
    with pytest.raises(ValueError, match="not <start> words <end>"):
        tokenizer.decode(torch.where(good == 2, 0, good))               # no <end>


# --- Text encoder ------------------------------------------------------------------------------

def test_padding_is_ignored(text_config):
    """Changing what a pad looks like (its token and position embeddings) changes nothing at the
    real tokens, nor the pooled feature."""
    torch.manual_seed(0)
    encoder = text.TextEncoder(text_config)
    ids = encoder.tokenizer.encode(["a red 3", "blue seven on the right"])
    real = ids != text.PAD
    before, pooled = encoder(ids), encoder.pooled(ids)
    with torch.no_grad():
        encoder.token_emb.weight[text.PAD] += torch.randn(16)
        encoder.position_emb.weight[7:] += torch.randn(3, 16)     # positions that are pads in both rows
    after = encoder(ids)
    assert torch.allclose(before[real], after[real], atol=1e-6)
    assert torch.allclose(pooled, encoder.pooled(ids), atol=1e-6)
    assert not torch.allclose(before[~real], after[~real])
    assert pooled.shape == (2, 16) and torch.equal(pooled[0], before[0, 4])    # the feature at <end>


# --- Mini CLIP ---------------------------------------------------------------------------------

def test_clip_loss_by_hand_for_two_pairs(clip):
    images = torch.rand(2, 3, 32, 64) * 2 - 1
    ids = clip.tokenizer.encode(["a red 3", "a blue seven"])
    image_vectors, text_vectors = clip.encode_image(images), clip.encode_text(ids)
    assert torch.allclose(image_vectors.norm(dim=1), torch.ones(2)) and text_vectors.shape == (2, 8)
    scale = 1 / 0.07
    cos = [[float(image_vectors[i].detach() @ text_vectors[j].detach()) for j in range(2)] for i in range(2)]

    def xent(row, k):      # -log softmax(row)[k]
        return -scale * row[k] + math.log(sum(math.exp(scale * v) for v in row))

    columns = [[cos[0][j], cos[1][j]] for j in range(2)]
    expected = (xent(cos[0], 0) + xent(cos[1], 1)) / 4 + (xent(columns[0], 0) + xent(columns[1], 1)) / 4
    assert text.clip_loss(clip, images, cond=ids).item() == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(text.clip_score(clip, images, ids), torch.tensor([cos[0][0], cos[1][1]]), atol=1e-6)


def test_clip_loss_with_hard_negatives_by_hand(clip):
    images = torch.rand(2, 3, 32, 64) * 2 - 1
    ids = clip.tokenizer.encode(["a red 3 on the left", "a blue seven"])
    negatives = clip.tokenizer.encode(["a red 3 on the right", "a blue seven"]).view(2, 1, -1)   # the 2nd: no swap
    image_vectors = clip.encode_image(images).detach()
    text_vectors = clip.encode_text(torch.cat([ids, negatives[:, 0]])).detach()
    logits = (image_vectors @ text_vectors.T / 0.07).tolist()          # columns: 2 captions, 2 negatives

    def xent(row, k):
        return -row[k] + math.log(sum(math.exp(v) for v in row))

    rows = xent(logits[0][:3], 0) + xent(logits[1][:2], 1)                   # image 0 also meets its negative
    columns = xent([logits[0][0], logits[1][0]], 0) + xent([logits[0][1], logits[1][1]], 1)
    assert text.clip_loss(clip, images, cond=ids, negatives=negatives).item() == pytest.approx((rows + columns) / 4, rel=1e-5)
    same = ids.view(2, 1, -1).repeat(1, 3, 1)                                # negatives equal to the caption: ignored
    assert text.clip_loss(clip, images, cond=ids, negatives=same).item() == pytest.approx(
        text.clip_loss(clip, images, cond=ids).item(), rel=1e-6)
    with pytest.raises(ValueError, match=r"negatives must be \(B, K, 10\)"):
        text.clip_loss(clip, images, cond=ids, negatives=negatives[:, 0])


def test_clip_errors_and_null_cond(clip):
    with pytest.raises(ValueError, match=r"shape \(B, 3, 32, 64\)"):
        clip.encode_image(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="Token ids"):
        clip.encode_text(torch.zeros(1, 10))
    assert torch.equal(clip.null_cond(3), clip.tokenizer.encode(["", "", ""]))
    with pytest.raises(ValueError, match="TextEncoderConfig"):
        text.CLIPConfig()


# --- Cross-attention ---------------------------------------------------------------------------

def test_cross_attention_matches_a_naive_reference():
    torch.manual_seed(0)
    layer = text.CrossAttention(8, 6, heads=2)
    torch.nn.init.normal_(layer.to_out.weight)
    x, context = torch.randn(2, 8, 3, 5), torch.randn(2, 4, 6)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    q = layer.to_q(layer.norm(x).flatten(2).transpose(1, 2)).view(2, 15, 2, 4)     # (B, HW, heads, d)
    k, v = layer.to_k(context).view(2, 4, 2, 4), layer.to_v(context).view(2, 4, 2, 4)
    scores = torch.einsum("bphd,blhd->bhpl", q, k) / 2.0                          # / sqrt(d = 4)
    weights = scores.masked_fill(~mask[:, None, None, :], -1e9).softmax(-1)
    out = torch.einsum("bhpl,blhd->bphd", weights, v).reshape(2, 15, 8)
    expected = x + layer.to_out(out).transpose(1, 2).reshape(x.shape)
    maps = layer.attention_maps(x, context, mask)
    assert maps.shape == (2, 2, 15, 4) and torch.allclose(maps, weights, atol=1e-6)
    assert torch.allclose(layer(x, context, mask), expected, atol=1e-5)
    assert torch.all(maps[0, :, :, 3] == 0) and torch.all(maps[1, :, :, 1:] == 0)   # masked: exactly 0
    assert torch.allclose(maps.sum(-1), torch.ones(2, 2, 15))


def test_cross_attention_starts_as_the_identity_and_checks_inputs():
    layer = text.CrossAttention(8, 6, heads=2)
    x, context = torch.randn(1, 8, 2, 2), torch.randn(1, 3, 6)
    assert torch.equal(layer(x, context), x)
    with pytest.raises(ValueError, match="at least one True"):
        layer(x, context, torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool"):
        layer(x, context, torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"context must have shape \(1, L, 6\)"):
        layer(x, torch.randn(1, 3, 5))


# --- TextUNet ----------------------------------------------------------------------------------

def test_plain_unet_has_no_context_weights():
    model = UNet(UNetConfig(num_classes=10))
    assert model.context(torch.zeros(2, dtype=torch.long)) is None
    assert not any("context" in key for key in model.state_dict())


def test_text_unet_shapes_null_cond_and_words_matter(text_unet):
    randomise_cross_attention(text_unet)
    x_t, t = torch.randn(2, 4, 8, 16), torch.tensor([5, 900])
    ids = text_unet.tokenizer.encode(["a red 3 on the left", "a blue seven"])
    null = text_unet.null_cond(2)
    assert torch.equal(null, text_unet.tokenizer.encode(["", ""]))
    with torch.no_grad():
        out = text_unet(x_t, t, ids)
        assert out.shape == x_t.shape
        assert torch.equal(text_unet(x_t, t), text_unet(x_t, t, null))            # None is the empty prompt
        assert not torch.allclose(text_unet(x_t, t, ids.flip(0)), out)              # other words, other output
    assert isinstance(text_unet.mid_context_layer, text.CrossAttention)
    assert isinstance(text_unet.down_context_layers[1][0], text.CrossAttention)
    assert len(text_unet.up_context_layers[0]) == 2 and isinstance(text_unet.up_context_layers[1][0], torch.nn.Module)


def test_text_unet_rejects_bad_conditions(text_unet):
    x_t, t = torch.randn(2, 4, 8, 16), torch.tensor([5, 900])
    with pytest.raises(ValueError, match=r"shape \(2, 10\)"):
        text_unet(x_t, t, torch.tensor([1, 2]))                                    # labels, not ids
    with pytest.raises(ValueError, match=r"lie in \[0, 15\)"):
        text_unet(x_t, t, torch.full((2, 10), 40))
    with pytest.raises(ValueError, match="divisible by 2"):
        text_unet(torch.randn(2, 4, 8, 15), t)
    with pytest.raises(ValueError, match="num_classes must be None"):
        text.TextUNetConfig(num_classes=10, text=text_unet.config.text)
    with pytest.raises(ValueError, match="attention_levels"):
        text.TextUNetConfig(attention_levels=(2,), text=text_unet.config.text)


def test_frozen_text_encoder_gets_no_gradient(text_unet):
    ids = text_unet.tokenizer.encode(["a red 3", "green seven on the right"])
    loss = diffusion_loss(text_unet, torch.randn(2, 4, 8, 16), linear_schedule(), cond=ids)
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in text_unet.text_encoder.parameters())
    assert text_unet.text_proj.weight.grad is not None and text_unet.conv_in.weight.grad is not None


def test_from_clip_copies_the_text_encoder(clip, text_unet):
    model = text.TextUNet.from_clip(text_unet.config, clip)
    for key, value in clip.text_encoder.state_dict().items():
        assert torch.equal(model.text_encoder.state_dict()[key], value)
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    other = text.TextEncoderConfig(words=WORDS, max_length=12, dim=16, depth=1, heads=2)
    with pytest.raises(ValueError, match="clip.config.text"):
        text.TextUNet.from_clip(text.TextUNetConfig(text=other), clip)


def test_checkpoint_round_trips(text_unet, clip, tmp_path):
    randomise_cross_attention(text_unet)
    ids = text_unet.tokenizer.encode(["a red 3", "the left digit"])
    for model, name in ((text_unet, "text_unet"), (clip, "mini_clip")):
        checkpoints.save_checkpoint(tmp_path / name, model, linear_schedule() if name == "text_unet" else None)
        loaded = checkpoints.load_checkpoint(tmp_path / name)
        assert loaded.info["type"] == name and type(loaded.model) is type(model)
        assert loaded.model.config == model.config
        assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()))
    loaded = checkpoints.load_checkpoint(tmp_path / "text_unet").model
    assert not any(p.requires_grad for p in loaded.text_encoder.parameters())
    x_t, t = torch.randn(2, 4, 8, 16), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(loaded(x_t, t, ids), text_unet.eval()(x_t, t, ids))


def test_runs_train_takes_ids_as_labels(text_unet, clip):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 4, 8, 16, generator=generator)
    ids = text_unet.tokenizer.encode(["a red 3", "a blue seven", "", "green 3 on the left", "right", "a digit"])
    loss_fn = functools.partial(diffusion_loss, schedule=linear_schedule())
    config = runs.TrainConfig(steps=3, minutes=None, batch_size=4, label_dropout=0.1, progress=False)
    result = runs.train(text_unet, latents, loss_fn, labels=ids, config=config)
    assert result.step == 3 and all(math.isfinite(loss) for loss in result.losses)
    images = torch.rand(6, 3, 32, 64, generator=generator) * 2 - 1
    config = runs.TrainConfig(steps=2, minutes=None, batch_size=4, label_dropout=0.0, progress=False)
    assert runs.train(clip, images, text.clip_loss, labels=ids, config=config).step == 2


def test_guidance_with_a_negative_prompt(text_unet):
    randomise_cross_attention(text_unet)
    x_t, t = torch.randn(2, 4, 8, 16), torch.tensor([5, 900])
    ids = text_unet.tokenizer.encode(["a red 3", "a blue seven"])
    negative = text_unet.tokenizer.encode(["green", "green"])
    guided = guidance.guided(text_unet, 3.0, negative=negative)
    with torch.no_grad():
        expected = text_unet(x_t, t, negative) + 3.0 * (text_unet(x_t, t, ids) - text_unet(x_t, t, negative))
        assert torch.allclose(guided(x_t, t, ids), expected, atol=1e-5)
        plain = guidance.guided(text_unet, 3.0)
        uncond = text_unet(x_t, t, text_unet.null_cond(2))
        assert torch.allclose(plain(x_t, t, ids), uncond + 3.0 * (text_unet(x_t, t, ids) - uncond), atol=1e-5)
    dropped = guidance.drop_cond(ids, text_unet.null_cond(2), 1.0)
    assert torch.equal(dropped, text_unet.null_cond(2))


def test_config_dicts_round_trip(text_unet, clip):
    for config in (text_unet.config, clip.config, clip.config.text):
        d = config.to_dict()
        assert type(config).from_dict(d) == config
        assert isinstance(d["words" if "words" in d else "text"], (list, dict))
    with pytest.raises(ValueError, match="Unknown CLIPConfig fields"):
        text.CLIPConfig.from_dict({**clip.config.to_dict(), "colour": 1})


def test_coordinates_let_the_first_convolution_tell_columns_apart(text_config):
    """With a constant input, a plain convolution gives the same output at every interior pixel;
    CoordConv2d's outputs differ from column to column (and row to row), borders or not."""
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(4, 8, 3, padding=1)
    coord = text.CoordConv2d(4, 8, 3, padding=1)
    assert coord.weight.shape == (8, 6, 3, 3)
    x = torch.ones(2, 4, 8, 16)
    with torch.no_grad():
        interior_plain, interior_coord = plain(x)[:, :, 1:-1, 1:-1], coord(x)[:, :, 1:-1, 1:-1]
    assert torch.allclose(interior_plain, interior_plain[:, :, :1, :1].expand_as(interior_plain), atol=1e-6)
    assert (interior_coord[..., 1:] - interior_coord[..., :-1]).abs().amax() > 1e-3      # columns differ
    assert (interior_coord[:, :, 1:] - interior_coord[:, :, :-1]).abs().amax() > 1e-3   # rows differ
    config = text.TextUNetConfig(base_channels=8, channel_mults=(1, 2), text=text_config, attention_heads=2,
                                 coordinates=True)
    model = text.TextUNet(config)
    assert isinstance(model.conv_in, text.CoordConv2d) and text.TextUNetConfig.from_dict(config.to_dict()) == config
    ids = model.tokenizer.encode(["a red 3", ""])
    assert model(torch.randn(2, 4, 8, 16), torch.tensor([3, 900]), ids).shape == (2, 4, 8, 16)
    assert not text.TextUNetConfig(text=text_config).coordinates      # off by default: old checkpoints load as they were
