"""Model-family adapters: everything vdit-accel knows about a model lives in one small adapter.

An adapter says where the transformer blocks are, which modules are the video self-attention, how
the token grid follows from the input shape and patch size, where text tokens sit in self-attention,
how each head's channels split into RoPE groups (t, h, w), and how to compute post-RoPE Q/K/V exactly
as the stock processor does. Adapters are resolved by exact class through the MRO, never by name,
and a user can pass one explicitly. Methods call only the adapter (never a family's functions); the
contract is frozen and documented in ``docs/adapters.md``.

A self-attention call is split at the attention op into three adapter calls that together reproduce
the stock processor bit for bit (``tests/test_adapter_contract.py`` checks this for every family):

1. :meth:`ModelAdapter.qkv` -> :class:`AttentionCall` (post-RoPE q, k, v `[B, S, H, D]` over the joint
   sequence: ``text_prefix`` text tokens, the video tokens, ``text_suffix`` text tokens; the mask and the
   attention backend / context-parallel config the stock processor would hand to the attention op);
2. :meth:`ModelAdapter.attention`: the raw attention call ``(q, k, v) -> out [B, S, H, D]`` as the stock
   processor makes it (a method substitutes its own kernel here);
3. :meth:`ModelAdapter.attention_output`: heads merged, output projection, and whatever the stock processor
   returns (joint-attention families: a ``(video, text)`` pair).

Processors are installed through :meth:`ModelAdapter.install_processor`, which keeps the stock processor's
call signature visible to diffusers (legacy ``Attention`` drops keyword arguments a processor does not
declare, e.g. ``image_rotary_emb``: a ``*args, **kwargs`` processor would silently lose RoPE).

Example:
    >>> from diffusers import WanTransformer3DModel
    >>> resolve_adapter(WanTransformer3DModel).family
    'wan'
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vdit_accel.errors import UnsupportedModelError

ROW_KV_MODES = ("all", "rows", "cache")
"""The ``kv`` modes of :meth:`ModelAdapter.block_rows_forward`."""

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``(q_sel [B,k,H,D], k [B,S,H,D], v [B,S,H,D]) -> (out [B,k,H,D], lse [B,k,H])``; an adapter whose blocks mask
keys calls it with ``key_mask=`` `[B, S]` bool (``True`` = attended) when some key is masked."""


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
        stream (`torch.Tensor | None` of shape `[B, L, C]`): joint-attention blocks only: the other stream's
            (text) output of the last row-subset call, every text token computed; :meth:`ModelAdapter.block_output`
            returns it beside the video rows.
    """

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    text_k: torch.Tensor | None = None
    text_v: torch.Tensor | None = None
    text_src: torch.Tensor | None = None
    dtype: torch.dtype | None = None
    stream: torch.Tensor | None = None

    def nbytes(self) -> int:
        ts = (self.k, self.v, self.text_k, self.text_v, self.stream)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


@dataclass(frozen=True)
class TokenLayout:
    """Token layout of one transformer call: grid (T', H', W'), text tokens around the video, batch."""

    grid: tuple[int, int, int]
    text_prefix: int
    text_suffix: int
    batch: int


@dataclass
class AttentionCall:
    """One video self-attention call, split at the attention op (:meth:`ModelAdapter.qkv`).

    Args:
        q, k, v (`torch.Tensor` of shape `[B, S, H, D]`): post-norm, post-RoPE queries/keys and values of the
            joint sequence, exactly as the stock processor hands them to its attention op.
        text_prefix, text_suffix (`int`): text tokens before / after the video tokens in ``S`` (they agree with
            :class:`TokenLayout` of the root call).
        mask (`torch.Tensor | None`): the attention mask the stock processor passes to its attention op
            (broadcastable to `[B, H, S, S]`), ``None`` for none.
        backend (`Any`): the stock processor's ``_attention_backend`` (``None``: diffusers' default).
        parallel_config (`Any`): the stock processor's ``_parallel_config`` (diffusers context parallelism);
            ``None`` when the sequence is not sharded. When set, ``S`` is this rank's shard.
        extra (`dict`): family-private values :meth:`ModelAdapter.attention_output` needs (split lengths, dtype).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    text_prefix: int = 0
    text_suffix: int = 0
    mask: torch.Tensor | None = None
    backend: Any = None
    parallel_config: Any = None
    extra: dict = field(default_factory=dict)


class ModelAdapter(ABC):
    """What vdit-accel needs to know about one model family (see module docstring and ``docs/adapters.md``).

    Subclass it for your own model: the abstract methods are required; :meth:`qkv` / :meth:`attention_output`
    are needed by TimeRipple (and the inspect tap), :meth:`block_rows_forward` by Astraea's sparse steps.
    Every optional method that is not provided raises :class:`UnsupportedModelError` naming the family.
    """

    family: str = ""
    model_classes: tuple[type, ...] = ()
    joint_blocks: bool = False
    """Whether a block returns two streams ``(video, text)`` (CogVideoX, HunyuanVideo double-stream)."""

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
    def rope_groups(self, model: torch.nn.Module) -> dict[str, slice | torch.Tensor]:
        """The head channels of each RoPE group ``{"t": ..., "h": ..., "w": ...}``: a slice of the head dim (the same
        channels in every head) or a bool `[H, D]` mask (``ops.timeripple.RopeGroup``); ``{}`` if unknown."""

    def has_rope(self, model: torch.nn.Module) -> bool:
        """Whether the model applies RoPE inside self-attention (TimeRipple needs it)."""
        return True

    # ------------------------------------------------------------------------------- the self-attention call
    def qkv(self, attn: torch.nn.Module, args: tuple, kwargs: dict) -> AttentionCall | None:
        """Split a call ``processor(attn, *args, **kwargs)`` of the stock self-attention processor at its attention op.

        Returns ``None`` when this call is not a video self-attention call the adapter can split (the method then
        hands it to the stock processor unchanged).
        """
        raise UnsupportedModelError(f"the {self._name()} adapter does not split self-attention calls (qkv)")

    def attention(self, attn: torch.nn.Module, call: AttentionCall, q: torch.Tensor | None = None,
                  k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
        """The raw attention op of the stock processor on ``q``, ``k``, ``v`` (default: ``call``'s): `[B, S, H, D]`.

        Default: diffusers' ``dispatch_attention_fn`` with the call's mask, backend and context-parallel config.
        """
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        return dispatch_attention_fn(call.q if q is None else q, call.k if k is None else k,
                                     call.v if v is None else v, attn_mask=call.mask, dropout_p=0.0,
                                     is_causal=False, backend=call.backend, parallel_config=call.parallel_config)

    def attention_output(self, attn: torch.nn.Module, out: torch.Tensor, call: AttentionCall) -> Any:
        """What the stock processor returns, from the attention output ``out`` `[B, S, H, D]` of ``call``."""
        raise UnsupportedModelError(f"the {self._name()} adapter does not split self-attention calls "
                                    "(attention_output)")

    # ------------------------------------------------------------------------------ processor installation
    def install_processor(self, attn: torch.nn.Module, processor: Any) -> Any:
        """Install a method's ``processor`` on the self-attention module ``attn``; return the processor it replaces.

        ``processor`` is called as ``processor(attn, *args, **kwargs)`` with exactly the stock processor's arguments
        (its ``__call__`` may take ``(attn, *args, **kwargs)``). Its class is specialised (same name, a subclass, so
        ``isinstance`` holds) to declare the replaced processor's call signature, because diffusers' attention
        modules drop keyword arguments a processor does not declare (``image_rotary_emb``: RoPE would be lost
        silently). The replaced processor's ``_attention_backend`` / ``_parallel_config`` are carried over.
        """
        original = attn.get_processor()
        processor.__class__ = _with_signature(type(processor), original)
        for name in ("_attention_backend", "_parallel_config"):
            if getattr(original, name, None) is not None:
                setattr(processor, name, getattr(original, name))
        attn.set_processor(processor)
        return original

    def restore_processor(self, attn: torch.nn.Module, original: Any) -> None:
        """Undo :meth:`install_processor`."""
        attn.set_processor(original)

    # ------------------------------------------------------------------------------------------ block calls
    def block_stream(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The video stream `[B, N, C]` of a block's forward arguments (the rows a row-selecting method selects)."""
        return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def block_output(self, args: tuple, kwargs: dict, hidden_states: torch.Tensor,
                     cache: RowCache | None = None) -> Any:
        """The block's return value given its video-stream output ``hidden_states`` `[B, N, C]` (single-stream
        blocks: ``hidden_states`` itself; joint blocks: ``(hidden_states, text)`` with the text output of the last
        row-subset call kept in ``cache.stream``, or the text input passed through when there is none)."""
        return hidden_states

    def block_output_stream(self, output: Any) -> torch.Tensor:
        """The video stream `[B, N, C]` of a block's return value (inverse of :meth:`block_output`)."""
        return output

    def block_rows_forward(self, block: torch.nn.Module, args: tuple, kwargs: dict, idx: torch.Tensor,
                           attention_fn: AttentionFn, *, kv: str = "all",
                           cache: RowCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One block computed for the token rows ``idx`` `[B, k]` only (Astraea's row-subset block).

        ``args``/``kwargs`` are the block's own forward arguments. ``kv``: ``"all"`` (K/V projected from every
        token), ``"rows"`` (K/V from the selected rows only: the SELECT Q&K ablation) or ``"cache"`` (fresh K/V
        for the selected rows, the others from ``cache``; the first call fills it). Returns the block output
        rows `[B, k, C]` and the attention LSE `[B, k, H]`.
        """
        raise UnsupportedModelError(f"the {self._name()} adapter has no row-subset block")

    def row_kv_modes(self, model: torch.nn.Module) -> tuple[str, ...]:
        """The ``kv`` modes :meth:`block_rows_forward` supports on ``model`` (``()``: no row-subset block), so a
        method can refuse an unsupported setting when it is applied rather than at the first sparse call.

        Default: every mode when the adapter overrides :meth:`block_rows_forward`, none otherwise.
        """
        if type(self).block_rows_forward is ModelAdapter.block_rows_forward:
            return ()
        return ROW_KV_MODES

    def masks_self_attention(self, model: torch.nn.Module) -> bool:
        """Whether every video self-attention call of ``model`` carries an attention mask (HunyuanVideo's text
        padding), known when a method is applied (default ``False``: a mask is then found at call time)."""
        return False

    def block_hidden_states(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The ``hidden_states`` `[B, S, C]` argument of a single-stream block (see :meth:`block_stream`).

        Joint blocks raise :class:`UnsupportedModelError`: a caller that reads only the video stream would return a
        tensor where the model expects ``(video, text)``; such callers must use :meth:`block_stream` together with
        :meth:`block_output`.
        """
        if self.joint_blocks:
            raise UnsupportedModelError(
                f"{self._name()} blocks are joint (they return (video, text)): this caller reads only the video "
                "stream and would return the wrong structure; it must use adapter.block_stream / block_output")
        return self.block_stream(args, kwargs)

    # ------------------------------------------------------------------------------- context parallelism
    def context_parallel_plan(self, model: torch.nn.Module) -> tuple[dict | None, list[torch.nn.Module]]:
        """How diffusers' context parallelism should shard ``model``: ``(cp_plan, local_attentions)``.

        ``cp_plan``: the plan handed to ``enable_parallelism(cp_plan=...)`` (``None``: the model's own ``_cp_plan``);
        ``local_attentions``: attention modules that must run *without* the context-parallel op (their processor's
        ``_parallel_config`` is cleared after ``enable_parallelism``), e.g. a cross-attention whose text the plan
        does not split: each rank's query shard then meets the whole text, as on one process. Default: the
        model's own plan, nothing local.
        """
        return None, []

    def _name(self) -> str:
        return self.family or type(self).__name__


def context_parallel_world(model: torch.nn.Module) -> int:
    """The number of context-parallel ranks a model with diffusers' ``enable_parallelism`` shards its sequence
    over (``ulysses_degree * ring_degree``), 1 without it: a root-call hook inside the split sees ``1 / world`` of
    the tokens."""
    cp = getattr(getattr(model, "_parallel_config", None), "context_parallel_config", None)
    if cp is None:
        return 1
    return int(cp.ulysses_degree) * int(cp.ring_degree)


_SIGNED: dict[tuple[type, type], type] = {}


def _with_signature(cls: type, original: Any) -> type:
    """A subclass of ``cls`` (same name) whose ``__call__`` declares the signature of ``original.__call__``."""
    key = (cls, type(original))
    if key in _SIGNED:
        return _SIGNED[key]
    if getattr(cls, "_signed_for", None) is not None:  # already specialised: specialise its base
        return _with_signature(cls.__mro__[1], original)
    params = list(inspect.signature(original.__call__).parameters.values())
    base_call = cls.__call__

    def __call__(self, attn, *args, **kwargs):
        return base_call(self, attn, *args, **kwargs)

    __call__.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *params])
    sub = type(cls.__name__, (cls,), {"__call__": __call__, "_signed_for": type(original),
                                      "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    _SIGNED[key] = sub
    return sub


_ADAPTERS: list[ModelAdapter] = []
_BUILTINS_LOADED: list[bool] = []


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
        for adapter in reversed(_ADAPTERS):  # the latest registration for a class wins
            if klass in adapter.model_classes:
                return adapter
    supported = sorted(c.__name__ for a in _ADAPTERS for c in a.model_classes)
    raise UnsupportedModelError(
        f"no adapter for {cls.__name__}: supported classes are {supported}; pass adapter=... explicitly"
    )


def _load_builtin_adapters() -> None:
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED.append(True)
        from vdit_accel.adapters import cogvideox, hunyuan_video, ltx, wan  # noqa: F401  (each registers itself)
