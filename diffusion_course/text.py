"""Lesson 09: text to image: words to token ids, a small text transformer, a mini CLIP that
learns which caption goes with which picture, and cross-attention, through which every pixel
of the U-Net looks at the prompt's words.
Exercises: CrossAttention.attention_maps, CrossAttention.forward.

The pieces of a (mini) Stable Diffusion's text side (Rombach et al. 2022, Sec. 3.3):

    prompt --Tokenizer--> ids (B, L) --TextEncoder--> token features (B, L, D)
                                                      pooled feature (B, D): the one at <end>

`MiniCLIP` trains the text encoder together with a small image encoder so that matching
(image, caption) pairs get a high cosine similarity and the other pairs of the batch a low one
(CLIP, Radford et al. 2021, Fig. 3: `clip_loss`). `TextUNet` is lesson 02's U-Net with that text
encoder inside, frozen: the pooled feature is added to the time embedding, and after the residual
blocks at `attention_levels` (and in the middle) a `CrossAttention` lets the pixels (queries)
read the words (keys and values):

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V,   Q = W_q norm(h),  K = W_k c,  V = W_v c    (1)

with padding tokens masked out. The condition `cond` of a TextUNet is the prompt's token ids,
and its "no condition" (`null_cond`) is the empty prompt's ids, so lesson 05's label dropout and
classifier-free guidance work unchanged, and a negative prompt is just other ids.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .unet import UNet, UNetConfig, group_norm

SPECIAL_TOKENS = ("<pad>", "<start>", "<end>")
PAD, START, END = 0, 1, 2              # the ids of the special tokens; the words come after them
_SEPARATORS = re.compile(r"[\s,:;.]+")  # prompts are split on whitespace and these punctuation marks


class Tokenizer:
    """Words to ids and back: 0 <pad>, 1 <start>, 2 <end>, then `words` in their order.

    A prompt is lowercased and split on whitespace and ",:;."; encode writes <start>, the words,
    <end>, then pads to max_length. The empty prompt "" is <start> <end>.
    """

    def __init__(self, words: Sequence[str], max_length: int = 24):
        if isinstance(words, str) or not isinstance(words, (list, tuple)) or not words:
            raise ValueError(f"words must be a non-empty list of words, got {words!r}.")
        for word in words:
            if not isinstance(word, str) or not word or word != word.lower() or _SEPARATORS.search(word) \
                    or word in SPECIAL_TOKENS:
                raise ValueError(f"Each word must be a non-empty lowercase string without spaces or ',:;.' "
                                 f"and not one of {SPECIAL_TOKENS}, got {word!r}.")
        if len(set(words)) != len(words):
            raise ValueError(f"words must not repeat, got {sorted(w for w in set(words) if words.count(w) > 1)} twice.")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be a whole number >= 2 (room for <start> and <end>), "
                             f"got {max_length!r}.")
        self.words, self.max_length = tuple(words), max_length
        self.vocabulary = SPECIAL_TOKENS + self.words
        self._ids = {word: i for i, word in enumerate(self.vocabulary)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def split(self, text: str) -> list[str]:
        """The words of a prompt: lowercased, split on whitespace and ",:;."."""
        if not isinstance(text, str):
            raise ValueError(f"A prompt must be a string, got {text!r}.")
        return [word for word in _SEPARATORS.split(text.lower()) if word]

    def encode(self, texts: Sequence[str]) -> Tensor:
        """(B, max_length) int64 ids of a list of B prompts: <start> words <end> <pad> ...

        Raises ValueError naming an unknown word, or a prompt longer than max_length - 2 words."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise ValueError(f"texts must be a list of prompts (put one prompt in a list: [{texts!r}]), got {texts!r}.")
        ids = torch.full((len(texts), self.max_length), PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            words = self.split(text)
            unknown = [word for word in words if word not in self._ids or word in SPECIAL_TOKENS]
            if unknown:
                raise ValueError(f"Unknown word {unknown[0]!r} in the prompt {text!r}; the vocabulary has "
                                 f"{len(self.words)} words: {' '.join(self.words)}.")
            if len(words) > self.max_length - 2:
                raise ValueError(f"The prompt {text!r} has {len(words)} words; at most {self.max_length - 2} fit "
                                 f"(max_length={self.max_length} includes <start> and <end>).")
            tokens = [START] + [self._ids[word] for word in words] + [END]
            ids[row, :len(tokens)] = torch.tensor(tokens)
        return ids

    def decode(self, ids: Tensor) -> list[str]:
        """The prompts of (B, L) ids: the words between <start> and <end>, joined by spaces."""
        check_ids(ids, self)
        texts = []
        for row in ids.tolist():
            words = [self.vocabulary[i] for i in row[1:row.index(END)]]
            texts.append(" ".join(words))
        return texts


def check_ids(ids: Tensor, tokenizer: Tokenizer, batch_size: int | None = None) -> None:
    """A clear ValueError unless `ids` is what tokenizer.encode makes: (B, max_length) int64 in
    [0, vocab_size), each row <start> ... <end> then <pad>s (B = batch_size when given)."""
    shape = f"({'B' if batch_size is None else batch_size}, {tokenizer.max_length})"
    if not isinstance(ids, Tensor) or ids.dtype != torch.int64 or ids.ndim != 2 \
            or ids.shape[1] != tokenizer.max_length or (batch_size is not None and ids.shape[0] != batch_size):
        got = f"{ids.dtype} of shape {tuple(ids.shape)}" if isinstance(ids, Tensor) else repr(ids)
        raise ValueError(f"Token ids must be an int64 tensor of shape {shape} (from tokenizer.encode), got {got}.")
    if ids.numel() == 0:
        return
    if int(ids.min()) < 0 or int(ids.max()) >= tokenizer.vocab_size:
        raise ValueError(f"Token ids must lie in [0, {tokenizer.vocab_size}) (the vocabulary's size), "
                         f"got values from {int(ids.min())} to {int(ids.max())}.")
    is_end = ids == END
    one_end = is_end.sum(1) == 1
    after_end = is_end.long().cumsum(1) - is_end.long() > 0          # positions after the <end>
    well_formed = (ids[:, 0] == START) & one_end & ((ids == PAD) == after_end).all(1)
    if not bool(well_formed.all()):
        row = int((~well_formed).nonzero()[0])
        raise ValueError(f"Row {row} of the token ids is not <start> words <end> <pad>...: {ids[row].tolist()} "
                         "(make ids with tokenizer.encode).")


# ---------------------------------------------------------------------------------------------
# The text encoder


@dataclass(frozen=True)
class TextEncoderConfig:
    words: tuple = ()           # the vocabulary's words (ids 3, 4, ... in this order)
    max_length: int = 24        # tokens per prompt, <start> and <end> included
    dim: int = 64               # feature size of each token
    depth: int = 2              # transformer layers
    heads: int = 4              # attention heads per layer (dim must divide by it)

    def __post_init__(self):
        object.__setattr__(self, "words", tuple(self.words) if isinstance(self.words, list) else self.words)
        Tokenizer(self.words, self.max_length)          # checks the words and max_length
        for name in ("dim", "depth", "heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TextEncoderConfig.{name} must be a whole number >= 1, got {value!r}.")
        if self.dim % self.heads:
            raise ValueError(f"TextEncoderConfig.dim ({self.dim}) must divide by heads ({self.heads}).")

    def to_dict(self) -> dict:
        return {**asdict(self), "words": list(self.words)}

    @classmethod
    def from_dict(cls, d: dict) -> "TextEncoderConfig":
        return cls(**_known_fields(cls, d))


def _known_fields(cls, d: dict) -> dict:
    """d itself, after a clear error for keys that are not fields of the dataclass cls."""
    if not isinstance(d, dict):
        raise ValueError(f"A {cls.__name__} must be given as a dict of its fields, got {d!r}.")
    unknown = set(d) - set(cls.__dataclass_fields__)
    if unknown:
        raise ValueError(f"Unknown {cls.__name__} fields {sorted(unknown)}; expected some of "
                         f"{sorted(cls.__dataclass_fields__)}.")
    return dict(d)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, N, heads * d) -> (B, heads, N, d)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    return x.transpose(1, 2).flatten(2)


class TransformerLayer(nn.Module):
    """A pre-norm transformer encoder layer (Vaswani et al. 2017, with the LayerNorm first as in
    GPT-2 and CLIP's text tower): x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: (B, L, dim); mask: (B, L) bool, True for a real token (pads are never attended to)."""
        q, k, v = (_split_heads(part, self.heads) for part in self.to_qkv(self.norm1(x)).chunk(3, dim=-1))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + self.to_out(_merge_heads(attended))
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """Token ids (B, L) -> token features (B, L, dim): learned token and position embeddings,
    `depth` pre-norm transformer layers that ignore the pads, a final LayerNorm."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self._tokenizer = Tokenizer(config.words, config.max_length)
        self.token_emb = nn.Embedding(self._tokenizer.vocab_size, config.dim)
        self.position_emb = nn.Embedding(config.max_length, config.dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        nn.init.normal_(self.position_emb.weight, std=0.01)
        self.layers = nn.ModuleList(TransformerLayer(config.dim, config.heads) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def forward(self, ids: Tensor) -> Tensor:
        """(B, max_length) int64 ids -> (B, max_length, dim) features (those at pads mean nothing)."""
        check_ids(ids, self.tokenizer)
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.token_emb(ids) + self.position_emb(positions)
        for layer in self.layers:
            h = layer(h, ids != PAD)
        return self.norm(h)

    def pooled(self, ids: Tensor) -> Tensor:
        """(B, dim): the feature at each prompt's <end> token, which has attended to all its words."""
        features = self(ids)
        end = (ids == END).long().argmax(dim=1)
        return features[torch.arange(ids.shape[0], device=ids.device), end]

    def null_cond(self, batch_size: int, device: torch.device | str | None = None) -> Tensor:
        """(B, max_length) int64: the empty prompt's ids, <start> <end> <pad>..., in every row."""
        device = self.token_emb.weight.device if device is None else device
        return self.tokenizer.encode([""]).to(device).repeat(batch_size, 1)


# ---------------------------------------------------------------------------------------------
# Mini CLIP


@dataclass(frozen=True)
class CLIPConfig:
    text: TextEncoderConfig | None = None   # the text tower (a TextEncoderConfig or its dict)
    image_channels: int = 3                 # channels of the images
    image_size: tuple = (32, 64)            # (H, W) of the images; both must divide by 8
    image_base_channels: int = 32           # channels of the image tower's first convolution
    embed_dim: int = 64                     # size of the shared embedding space

    def __post_init__(self):
        object.__setattr__(self, "text", _text_config(self.text, "CLIPConfig"))
        object.__setattr__(self, "image_size", tuple(self.image_size))
        if len(self.image_size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 8 or s % 8
                                            for s in self.image_size):
            raise ValueError(f"CLIPConfig.image_size must be (H, W), whole numbers divisible by 8, "
                             f"got {self.image_size!r}.")
        for name in ("image_channels", "image_base_channels", "embed_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CLIPConfig.{name} must be a whole number >= 1, got {value!r}.")

    def to_dict(self) -> dict:
        return {**asdict(self), "text": self.text.to_dict(), "image_size": list(self.image_size)}

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfig":
        return cls(**_known_fields(cls, d))


def _text_config(text, owner: str) -> TextEncoderConfig:
    """A TextEncoderConfig from itself or its dict (a clear error for anything else)."""
    if isinstance(text, dict):
        return TextEncoderConfig.from_dict(text)
    if not isinstance(text, TextEncoderConfig):
        raise ValueError(f"{owner}.text must be a TextEncoderConfig (or its dict), e.g. "
                         f"TextEncoderConfig(words=captions.VOCABULARY), got {text!r}.")
    return text


def image_encoder(channels: int, base_channels: int) -> nn.Sequential:
    """A small CNN: (B, channels, H, W) -> (B, 4 * base_channels, H/8, W/8), three stride-2 stages."""
    widths = [base_channels, 2 * base_channels, 4 * base_channels, 4 * base_channels]
    layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, padding=1)]
    for c_in, c_out in zip(widths, widths[1:]):
        layers += [group_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)]
    return nn.Sequential(*layers, group_norm(widths[-1]), nn.SiLU())


class MiniCLIP(nn.Module):
    """A text tower and an image tower mapped to unit vectors in one space (Radford et al. 2021).

    The image features keep their layout (flattened, not averaged), so "on the left" can be seen."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        height, width = config.image_size
        self.text_encoder = TextEncoder(config.text)
        self.image_encoder = image_encoder(config.image_channels, config.image_base_channels)
        self.text_projection = nn.Linear(config.text.dim, config.embed_dim, bias=False)
        flat = 4 * config.image_base_channels * (height // 8) * (width // 8)
        self.image_projection = nn.Sequential(nn.Flatten(), nn.Linear(flat, config.embed_dim, bias=False))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))   # CLIP's initial temperature 0.07

    @property
    def tokenizer(self) -> Tokenizer:
        return self.text_encoder.tokenizer

    def null_cond(self, batch_size: int, device: torch.device | str | None = None) -> Tensor:
        """The empty prompt's ids (B, max_length), so runs.train accepts ids as labels."""
        return self.text_encoder.null_cond(batch_size, device)

    def encode_text(self, ids: Tensor) -> Tensor:
        """(B, max_length) int64 ids -> (B, embed_dim) unit vectors."""
        return F.normalize(self.text_projection(self.text_encoder.pooled(ids)), dim=-1)

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, C, H, W) images in [-1, 1] -> (B, embed_dim) unit vectors."""
        self._check_images(images)
        return F.normalize(self.image_projection(self.image_encoder(images)), dim=-1)

    def forward(self, images: Tensor, ids: Tensor) -> Tensor:
        """(B, B) logits: scale * cosine similarity of image i and caption j (the scale is
        exp(logit_scale), at most 100 as in CLIP)."""
        _check_same_batch(images, ids)
        return self.scale * self.encode_image(images) @ self.encode_text(ids).T

    @property
    def scale(self) -> Tensor:
        """exp(logit_scale), capped at 100 as in CLIP: what the cosine similarities are multiplied by."""
        return self.logit_scale.clamp(max=math.log(100)).exp()

    def _check_images(self, images: Tensor) -> None:
        expected = (self.config.image_channels, *self.config.image_size)
        if not isinstance(images, Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != expected:
            got = tuple(images.shape) if isinstance(images, Tensor) else repr(images)
            raise ValueError(f"images must have shape (B, {', '.join(map(str, expected))}), got {got}.")
        dtype = self.image_projection[1].weight.dtype
        if images.dtype != dtype:
            raise ValueError(f"images must be {dtype} like the model's weights (in [-1, 1]), got {images.dtype}.")


def clip_loss(model: MiniCLIP, x0: Tensor, *, cond: Tensor, negatives: Tensor | None = None,
              generator: torch.Generator | None = None) -> Tensor:
    """CLIP's symmetric contrastive loss (Radford et al. 2021, Fig. 3): in a batch of B pairs, the
    cross-entropy of picking each image's caption among the B captions, and each caption's image
    among the B images, averaged. A random model scores about log(B).

    Args:
        x0: (B, C, H, W) images in [-1, 1].
        cond: (B, max_length) int64 token ids of their captions (identical captions in a batch
            are allowed; they count as wrong answers for each other).
        negatives: optional (B, K, max_length) ids of hard negatives: K captions per image that
            are almost its own but false (NegCLIP, Yuksekgonul et al. 2023: e.g. its two colours
            swapped). They join that image's candidates in the image -> caption direction; a
            negative equal to the image's own caption is ignored (no swap was possible).
        generator: unused (the loss draws nothing); there for runs.train's loss contract.
    Returns:
        Scalar tensor.
    """
    if cond is None:
        raise ValueError("clip_loss needs the captions' token ids: cond=tokenizer.encode(captions).")
    if negatives is None:
        logits = model(x0, cond)                                # (B images, B captions)
        target = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    if not isinstance(negatives, Tensor) or negatives.ndim != 3 or negatives.shape[0] != cond.shape[0] \
            or negatives.shape[2] != cond.shape[1]:
        got = tuple(negatives.shape) if isinstance(negatives, Tensor) else repr(negatives)
        raise ValueError(f"negatives must be (B, K, {cond.shape[1]}) token ids (K hard negatives per caption), got {got}.")
    _check_same_batch(x0, cond)
    batch, k, length = negatives.shape
    image_emb, text_emb = model.encode_image(x0), model.encode_text(cond)
    negative_emb = model.encode_text(negatives.reshape(batch * k, length)).view(batch, k, -1)
    logits = model.scale * image_emb @ text_emb.T
    negative_logits = model.scale * (image_emb[:, None] * negative_emb).sum(-1)      # (B, K)
    negative_logits = negative_logits.masked_fill((negatives == cond[:, None]).all(-1), float("-inf"))
    target = torch.arange(batch, device=logits.device)
    return (F.cross_entropy(torch.cat([logits, negative_logits], 1), target) + F.cross_entropy(logits.T, target)) / 2


@torch.no_grad()
def clip_score(model: MiniCLIP, images: Tensor, ids: Tensor) -> Tensor:
    """(B,) cosine similarity in [-1, 1] between each image and its own caption's ids.

    The plain cosine, not scaled: torchmetrics' CLIPScore reports 100 * max(cos, 0), Hessel et
    al. 2021's CLIPScore 2.5 * max(cos, 0)."""
    _check_same_batch(images, ids)
    return (model.encode_image(images) * model.encode_text(ids)).sum(dim=-1)


def _check_same_batch(images: Tensor, ids: Tensor) -> None:
    if ids.shape[:1] != images.shape[:1]:
        raise ValueError(f"images and ids must have the same batch size, got {images.shape[0]} and {ids.shape[0]}.")


# ---------------------------------------------------------------------------------------------
# Cross-attention


class CrossAttention(nn.Module):
    """Every pixel reads the prompt's tokens (Eq. 1): queries from the GroupNorm'd pixels, keys
    and values from the token features, pads masked out, then a projection added to x. The
    projection starts at zero, so a new layer changes nothing until it has learned something."""

    def __init__(self, channels: int, context_dim: int, heads: int = 4):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must divide by heads ({heads}).")
        self.channels, self.context_dim, self.heads = channels, context_dim, heads
        self.norm = group_norm(channels)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(context_dim, channels, bias=False)
        self.to_v = nn.Linear(context_dim, channels, bias=False)
        self.to_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def attention_maps(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        """softmax(Q K^T / sqrt(d)) of Eq. 1, with d = channels / heads.

        Args:
            x: (B, C, H, W) features; context: (B, L, D) token features;
            mask: (B, L) bool, True for a real token (None: all are real).
        Returns:
            (B, heads, H * W, L) weights: for each pixel, how much it reads each token (each row
            sums to 1; masked tokens get exactly 0).
        """
        mask = self._check(x, context, mask)
        pixels = self.norm(x).flatten(2).transpose(1, 2)                   # (B, H*W, C)
        q = _split_heads(self.to_q(pixels), self.heads)                    # (B, heads, H*W, d)
        k = _split_heads(self.to_k(context), self.heads)                   # (B, heads, L, d)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        return scores.softmax(dim=-1)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        """x + the attention output (B, C, H, W); arguments as in attention_maps."""
        weights = self.attention_maps(x, context, mask)
        v = _split_heads(self.to_v(context), self.heads)                   # (B, heads, L, d)
        out = self.to_out(_merge_heads(weights @ v))                       # (B, H*W, C)
        return x + out.transpose(1, 2).reshape(x.shape)

    def _check(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        """The mask, checked (all True when None), after clear errors for wrong shapes."""
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must have shape (B, {self.channels}, H, W), got {tuple(x.shape)}.")
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != self.context_dim:
            raise ValueError(f"context must have shape ({x.shape[0]}, L, {self.context_dim}), "
                             f"got {tuple(context.shape)}.")
        if mask is None:
            return torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        if mask.dtype != torch.bool or mask.shape != context.shape[:2]:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(context.shape[:2])} (True: a real "
                             f"token), got {mask.dtype} of shape {tuple(mask.shape)}.")
        if not bool(mask.any(dim=1).all()):
            raise ValueError("Each row of mask needs at least one True (a token to attend to).")
        return mask


class TextContext(NamedTuple):
    tokens: Tensor   # (B, L, D) token features from the text encoder
    mask: Tensor     # (B, L) bool, True for a real token (<start>, the words, <end>), False for a pad


class ContextCrossAttention(CrossAttention):
    """CrossAttention called the U-Net's way, layer(h, context), with a TextContext, and with
    queries that know where their pixel is: a learned projection of `position_features` is added
    to x before the attention reads it (and taken away after). Convolutions know a pixel's place
    only from the zero padding at the borders. On its own this did not stop the course's U-Net from
    drawing a prompt's two colours on swapped sides about half the time (its keys, the token
    features, carried no binding); what did is CoordConv2d with a hard-negative CLIP (README,
    "A small Stable Diffusion")."""

    def __init__(self, channels: int, context_dim: int, heads: int = 4):
        super().__init__(channels, context_dim, heads)
        self.position = nn.Conv2d(POSITION_FEATURES, channels, 1)

    def forward(self, x: Tensor, context: TextContext) -> Tensor:
        where = self.position(position_features(x))                        # (1, C, H, W)
        return super().forward(x + where, context.tokens, context.mask) - where


POSITION_FEATURES = 10


def position_features(x: Tensor) -> Tensor:
    """(1, 10, H, W): each pixel's column u and row v, both scaled to [-1, 1] (u < 0 is the left
    half), and sin/cos of pi * u, pi * v, 2 pi * u and 2 pi * v."""
    h, w = x.shape[-2:]
    v, u = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device), torch.linspace(-1, 1, w, device=x.device),
                          indexing="ij")
    waves = [f(k * math.pi * c) for k in (1, 2) for c in (u, v) for f in (torch.sin, torch.cos)]
    return torch.stack([u, v, *waves]).to(x.dtype)[None]


# ---------------------------------------------------------------------------------------------
# The text-conditioned U-Net


class CoordConv2d(nn.Conv2d):
    """A convolution that also reads two more channels, each pixel's x and y in [-1, 1] (CoordConv,
    Liu et al. 2018). A plain convolution knows where it is only near the zero-padded borders; the
    U-Net needs to know it everywhere to put what the pooled prompt feature (added to every block,
    the same at every pixel) says about "the left digit" on the left. Built with the input's
    channels; the weight has two more."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, **options):
        super().__init__(in_channels + 2, out_channels, kernel_size, **options)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        y_map = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        x_map = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        return super().forward(torch.cat([x, x_map, y_map], dim=1))


@dataclass(frozen=True)
class TextUNetConfig(UNetConfig):
    """UNetConfig's fields (defaults for 4 x 8 x 16 latents; num_classes must stay None) plus the
    text side. Any latent size whose sides divide by 2**(levels - 1) runs; image_size is the height."""
    in_channels: int = 4                  # latent channels (lesson 08's autoencoder)
    image_size: int = 8                   # latent height (the width may differ, e.g. 8 x 16)
    base_channels: int = 64
    channel_mults: tuple = (1, 2)
    text: TextEncoderConfig | None = None  # the frozen text encoder (a TextEncoderConfig or its dict)
    attention_levels: tuple = (1,)        # levels (indexes into channel_mults) with cross-attention after each ResBlock
    attention_heads: int = 4              # heads of each cross-attention
    coordinates: bool = False             # True: the first convolution also sees each pixel's (x, y) (CoordConv)

    def __post_init__(self):
        super().__post_init__()
        if self.num_classes is not None:
            raise ValueError("TextUNetConfig.num_classes must be None: the prompt is the condition.")
        object.__setattr__(self, "text", _text_config(self.text, "TextUNetConfig"))
        levels = tuple(self.attention_levels)
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.channel_mults) for i in levels) \
                or len(set(levels)) != len(levels):
            raise ValueError(f"attention_levels must be distinct levels in [0, {len(self.channel_mults)}) "
                             f"(indexes into channel_mults), got {self.attention_levels!r}.")
        object.__setattr__(self, "attention_levels", tuple(sorted(levels)))
        widths = [self.base_channels * self.channel_mults[i] for i in (*levels, -1)]
        if isinstance(self.attention_heads, bool) or not isinstance(self.attention_heads, int) \
                or self.attention_heads < 1 or any(w % self.attention_heads for w in widths):
            raise ValueError(f"attention_heads must be a whole number >= 1 dividing the channels {widths}, "
                             f"got {self.attention_heads!r}.")

    def to_dict(self) -> dict:
        return {**super().to_dict(), "text": self.text.to_dict(), "attention_levels": list(self.attention_levels)}


class TextUNet(UNet):
    """Lesson 02's U-Net conditioned on a prompt: model(x_t, t, ids) -> (B, C, H, W).

    A frozen TextEncoder (no gradients; load it from a trained MiniCLIP with `from_clip`) turns
    the ids into token features; the pooled one, projected, joins the time embedding, and the
    tokens are read by cross-attention after the ResBlocks at config.attention_levels (down and
    up) and after the middle's self-attention."""

    def __init__(self, config: TextUNetConfig):
        if not isinstance(config, TextUNetConfig):
            raise ValueError(f"TextUNet needs a TextUNetConfig, got {type(config).__name__}.")
        super().__init__(config)
        text = config.text
        self.text_encoder = TextEncoder(text).requires_grad_(False)
        self.text_proj = nn.Linear(text.dim, 4 * config.base_channels)
        levels = len(config.channel_mults)
        for level in config.attention_levels:
            channels = config.base_channels * config.channel_mults[level]
            self.down_context_layers[level] = self._cross_attention(channels, config.num_res_blocks)
            self.up_context_layers[levels - 1 - level] = self._cross_attention(channels, config.num_res_blocks + 1)
        self.mid_context_layer = ContextCrossAttention(config.base_channels * config.channel_mults[-1], text.dim,
                                                       config.attention_heads)
        if config.coordinates:
            self.conv_in = CoordConv2d(config.in_channels, config.base_channels, 3, padding=1)

    def _cross_attention(self, channels: int, count: int) -> nn.ModuleList:
        heads, dim = self.config.attention_heads, self.config.text.dim
        return nn.ModuleList(ContextCrossAttention(channels, dim, heads) for _ in range(count))

    @classmethod
    def from_clip(cls, config: TextUNetConfig, clip: MiniCLIP) -> "TextUNet":
        """A new TextUNet whose (frozen) text encoder is a copy of a trained MiniCLIP's."""
        if config.text != clip.config.text:
            raise ValueError("config.text must equal the MiniCLIP's text config (clip.config.text).")
        model = cls(config)
        model.text_encoder.load_state_dict(clip.text_encoder.state_dict())
        return model

    @property
    def tokenizer(self) -> Tokenizer:
        return self.text_encoder.tokenizer

    def null_cond(self, batch_size: int, device: torch.device | str | None = None) -> Tensor:
        """(B, max_length) int64: the empty prompt's ids (label dropout and guidance use it)."""
        device = self.conv_in.weight.device if device is None else device
        return self.text_encoder.null_cond(batch_size, device)

    def embed(self, t: Tensor, cond: Tensor) -> Tensor:
        """Time embedding plus the projected pooled text feature."""
        return super().embed(t, None) + self.text_proj(self.text_encoder.pooled(cond))

    def context(self, cond: Tensor) -> TextContext:
        """The prompt's token features and which of them are real tokens."""
        return TextContext(self.text_encoder(cond), cond != PAD)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """UNet.forward with cond = (B, max_length) int64 ids; None means the empty prompt."""
        if cond is None:
            cond = self.null_cond(x_t.shape[0], x_t.device)
        return super().forward(x_t, t, cond)

    def _check_cond(self, cond: Tensor, batch_size: int) -> None:
        check_ids(cond, self.tokenizer, batch_size)
