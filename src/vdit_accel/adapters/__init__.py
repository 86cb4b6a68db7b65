"""Model-family adapters: everything vdit-accel knows about a model lives in one small adapter.

An adapter says where the transformer blocks are, which modules are the video self-attention, how
the token grid follows from the input shape and patch size, where text tokens sit in self-attention,
how each head's channels split into RoPE groups (t, h, w), and how to compute post-RoPE Q/K/V exactly
as the stock processor does. Adapters are resolved by exact class through the MRO, never by name,
and a user can pass one explicitly.

Example:
    >>> from diffusers import WanTransformer3DModel
    >>> resolve_adapter(WanTransformer3DModel).family
    'wan'
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vdit_accel.errors import UnsupportedModelError

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``(q_sel [B,k,H,D], k [B,S,H,D], v [B,S,H,D]) -> (out [B,k,H,D], lse [B,k,H])``."""


@dataclass
class RowCache:
    """What a row-subset block forward may keep between calls of one block (one CFG branch, one generation).

    Args:
        k, v (`torch.Tensor | None` of shape `[B, S, H, D]`): post-norm, post-RoPE keys and values of every token
            as last computed (K/V reuse); ``None`` until the first full computation.
        text_k, text_v (`torch.Tensor | None` of shape `[B, L, H, D]`): cross-attention keys/values of the text.
        text_src (`torch.Tensor | None` of shape `[B, L, C]`): the text states they were computed from (checked
            for equality on every call, so a changed prompt never reuses stale keys).
        dtype (`torch.dtype | None`): storage dtype of ``k``/``v`` (``None``: the activations' dtype).
    """

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    text_k: torch.Tensor | None = None
    text_v: torch.Tensor | None = None
    text_src: torch.Tensor | None = None
    dtype: torch.dtype | None = None

    def nbytes(self) -> int:
        ts = (self.k, self.v, self.text_k, self.text_v)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


@dataclass(frozen=True)
class TokenLayout:
    """Token layout of one transformer call: grid (T', H', W'), text tokens around the video, batch."""

    grid: tuple[int, int, int]
    text_prefix: int
    text_suffix: int
    batch: int


class ModelAdapter(ABC):
    """What vdit-accel needs to know about one model family (see module docstring)."""

    family: str = ""
    model_classes: tuple[type, ...] = ()

    @abstractmethod
    def layout(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> TokenLayout:
        """Token layout of a root-forward call with these arguments."""

    @abstractmethod
    def timestep(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The ``timestep`` argument of a root-forward call."""

    @abstractmethod
    def blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The transformer blocks, in execution order."""

    @abstractmethod
    def self_attention(self, block: torch.nn.Module) -> torch.nn.Module:
        """The video self-attention module of a block."""

    @abstractmethod
    def rope_groups(self, model: torch.nn.Module) -> dict[str, slice]:
        """Head-channel slices of the RoPE groups ``{"t": ..., "h": ..., "w": ...}``."""

    def has_rope(self, model: torch.nn.Module) -> bool:
        """Whether the model applies RoPE inside self-attention (TimeRipple needs it)."""
        return True

    def block_rows_forward(self, block: torch.nn.Module, args: tuple, kwargs: dict, idx: torch.Tensor,
                           attention_fn: AttentionFn, *, kv: str = "all",
                           cache: RowCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One block computed for the token rows ``idx`` `[B, k]` only (Astraea's row-subset block).

        ``args``/``kwargs`` are the block's own forward arguments. ``kv``: ``"all"`` (K/V projected from every
        token), ``"rows"`` (K/V from the selected rows only: the SELECT Q&K ablation) or ``"cache"`` (fresh K/V
        for the selected rows, the others from ``cache``; the first call fills it). Returns the block output
        rows `[B, k, C]` and the attention LSE `[B, k, H]`.
        """
        raise UnsupportedModelError(f"the {self.family or type(self).__name__} adapter has no row-subset block")

    def block_hidden_states(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The ``hidden_states`` `[B, S, C]` argument of a block's forward."""
        return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


_ADAPTERS: list[ModelAdapter] = []


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    """Make an adapter known to :func:`resolve_adapter`."""
    _ADAPTERS.append(adapter)
    return adapter


def resolve_adapter(model: torch.nn.Module | type) -> ModelAdapter:
    """The adapter whose model class is the nearest exact class in ``model``'s MRO.

    Raises:
        UnsupportedModelError: listing the supported classes.
    """
    _load_builtin_adapters()
    cls = model if isinstance(model, type) else type(model)
    for klass in cls.__mro__:
        for adapter in _ADAPTERS:
            if klass in adapter.model_classes:
                return adapter
    supported = sorted(c.__name__ for a in _ADAPTERS for c in a.model_classes)
    raise UnsupportedModelError(
        f"no adapter for {cls.__name__}: supported classes are {supported}; pass adapter=... explicitly"
    )


def _load_builtin_adapters() -> None:
    if not _ADAPTERS:
        from vdit_accel.adapters import wan  # noqa: F401  (registers itself)
