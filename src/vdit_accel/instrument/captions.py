"""The caption grammar of the embedded model, its parser and its word-level tokenizer.

Grammar (one or two objects, then a background)::

    caption    := object [" and " object] " on a " bgcolour [" gradient" | " textured"] " background"
    object     := "a " colour " " shape " " motion
    motion     := "moves left" | "moves right" | "moves up" | "moves down" | "grows" | "shrinks"
                | "stays still"

Example:
    >>> c = parse_caption("a red circle moves left on a blue background")
    >>> (c.objects[0].colour, c.objects[0].shape, c.objects[0].motion, c.background.kind)
    ('red', 'circle', 'left', 'solid')
    >>> format_caption(c)
    'a red circle moves left on a blue background'
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vdit_accel.errors import PromptError

OBJECT_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.15, 0.15),
    "orange": (1.0, 0.55, 0.05),
    "yellow": (1.0, 0.95, 0.1),
    "green": (0.15, 0.95, 0.2),
    "cyan": (0.1, 0.95, 0.95),
    "blue": (0.25, 0.4, 1.0),
    "purple": (0.75, 0.25, 1.0),
    "white": (1.0, 1.0, 1.0),
}
BACKGROUND_COLOURS: dict[str, tuple[float, float, float]] = {
    "black": (0.05, 0.05, 0.05),
    "gray": (0.3, 0.3, 0.3),
    "blue": (0.08, 0.12, 0.38),
    "green": (0.08, 0.3, 0.12),
    "brown": (0.35, 0.2, 0.08),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "grow", "shrink", "still")
BACKGROUND_KINDS: tuple[str, ...] = ("solid", "gradient", "texture")

_MOTION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("moves", "left"),
    "right": ("moves", "right"),
    "up": ("moves", "up"),
    "down": ("moves", "down"),
    "grow": ("grows",),
    "shrink": ("shrinks",),
    "still": ("stays", "still"),
}
_KIND_WORDS: dict[str, tuple[str, ...]] = {"solid": (), "gradient": ("gradient",), "texture": ("textured",)}

PAD = "<pad>"
MAX_CAPTION_TOKENS = 20


def _build_vocab() -> tuple[str, ...]:
    words = {"a", "and", "on", "background"}
    words |= set(OBJECT_COLOURS) | set(BACKGROUND_COLOURS) | set(SHAPES)
    for ws in list(_MOTION_WORDS.values()) + list(_KIND_WORDS.values()):
        words |= set(ws)
    return (PAD, *sorted(words))


VOCAB: tuple[str, ...] = _build_vocab()
_WORD_ID = {w: i for i, w in enumerate(VOCAB)}


@dataclass(frozen=True)
class ObjectCaption:
    """One object of a caption: colour name, shape name and motion name (see module constants)."""

    colour: str
    shape: str
    motion: str


@dataclass(frozen=True)
class BackgroundCaption:
    """The background of a caption: colour name and kind (``solid``, ``gradient`` or ``texture``)."""

    colour: str
    kind: str


@dataclass(frozen=True)
class Caption:
    """A parsed caption: one or two objects and a background."""

    objects: tuple[ObjectCaption, ...]
    background: BackgroundCaption


def format_caption(caption: Caption) -> str:
    """Render a :class:`Caption` back to its canonical text."""
    parts = []
    for obj in caption.objects:
        parts.append(" ".join(("a", obj.colour, obj.shape, *_MOTION_WORDS[obj.motion])))
    bg = caption.background
    words = ("on", "a", bg.colour, *_KIND_WORDS[bg.kind], "background")
    return " and ".join(parts) + " " + " ".join(words)


def _expect(words: list[str], pos: int, accepted: list[str], text: str) -> str:
    if pos >= len(words):
        raise PromptError(f"prompt {text!r} ends early at word {pos + 1}: expected one of {accepted}")
    if words[pos] not in accepted:
        raise PromptError(
            f"prompt {text!r}: word {pos + 1} {words[pos]!r} is not accepted here: expected one of {accepted}"
        )
    return words[pos]


def parse_caption(text: str) -> Caption:
    """Parse a prompt in the caption grammar.

    Args:
        text (`str`): the prompt, lower-case words separated by spaces.

    Returns:
        `Caption`: the parsed objects and background.

    Raises:
        PromptError: naming the first word that does not fit the grammar and the accepted words there.
    """
    unknown = [w for w in text.split() if w not in _WORD_ID or w == PAD]
    if unknown:
        raise PromptError(
            f"prompt {text!r} has unknown word(s) {unknown}: accepted words are {list(VOCAB[1:])}"
        )
    words = text.split()
    pos = 0
    objects: list[ObjectCaption] = []
    while True:
        _expect(words, pos, ["a"], text)
        colour = _expect(words, pos + 1, list(OBJECT_COLOURS), text)
        shape = _expect(words, pos + 2, list(SHAPES), text)
        first = _expect(words, pos + 3, sorted({ws[0] for ws in _MOTION_WORDS.values()}), text)
        pos += 4
        motion = None
        for name, ws in _MOTION_WORDS.items():
            if ws[0] != first:
                continue
            if len(ws) == 1:
                motion = name
                break
            if pos < len(words) and words[pos] == ws[1]:
                motion = name
                pos += 1
                break
        if motion is None:
            seconds = [ws[1] for ws in _MOTION_WORDS.values() if ws[0] == first and len(ws) > 1]
            _expect(words, pos, seconds, text)
        objects.append(ObjectCaption(colour, shape, motion))
        if pos < len(words) and words[pos] == "and":
            if len(objects) == 2:
                raise PromptError(f"prompt {text!r}: at most 2 objects are accepted")
            pos += 1
            continue
        break
    _expect(words, pos, ["on", "and"], text)
    _expect(words, pos + 1, ["a"], text)
    bg_colour = _expect(words, pos + 2, list(BACKGROUND_COLOURS), text)
    pos += 3
    kind = "solid"
    if pos < len(words) and words[pos] in ("gradient", "textured"):
        kind = "gradient" if words[pos] == "gradient" else "texture"
        pos += 1
    _expect(words, pos, ["background"], text)
    if pos + 1 != len(words):
        raise PromptError(f"prompt {text!r}: unexpected words after 'background': {words[pos + 1:]}")
    if len(objects) == 2 and objects[0].colour == objects[1].colour:
        raise PromptError(f"prompt {text!r}: the two objects must have different colours")
    return Caption(tuple(objects), BackgroundCaption(bg_colour, kind))


def tokenize(texts: list[str] | str, max_len: int = MAX_CAPTION_TOKENS) -> torch.Tensor:
    """Map prompts to padded word ids after checking them against the grammar.

    An empty string is the unconditional (classifier-free guidance) prompt: all padding.

    Args:
        texts (`list[str]` or `str`): prompts.
        max_len (`int`, defaults to 20): padded length L.

    Returns:
        `torch.LongTensor` of shape `[B, L]`.

    Example:
        >>> tokenize(["a red circle grows on a gray background", ""]).shape
        torch.Size([2, 20])
    """
    if isinstance(texts, str):
        texts = [texts]
    ids = torch.zeros(len(texts), max_len, dtype=torch.long)
    for row, text in enumerate(texts):
        if text == "":
            continue
        parse_caption(text)
        words = text.split()
        if len(words) > max_len:
            raise PromptError(f"prompt {text!r} has {len(words)} words: accepted at most {max_len}")
        ids[row, : len(words)] = torch.tensor([_WORD_ID[w] for w in words])
    return ids
