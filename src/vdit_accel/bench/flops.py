"""FLOPs of one Wan block and one denoising step, at the shapes each setting really executes; the FLOP ceiling.

One transformer call (one CFG branch of one step) at batch ``B`` over ``N`` video tokens, ``L`` text tokens,
width ``D = heads·head_dim``, FFN width ``F``. A matmul ``[m, k] x [k, n]`` counts ``2·m·k·n`` FLOPs (a
multiply and an add), as :class:`torch.utils.flop_counter.FlopCounterMode` counts them; norms, RoPE,
modulation, softmax, gathers and scatters are elementwise and count 0. ``q`` is the number of query rows the
block computes, ``kv`` the number of rows whose K/V are projected this step:

=================  =====================  =====================================================================
term               FLOPs (x B)            rows
=================  =====================  =====================================================================
``self_q``         ``2·q·D·D``            to_q on the computed rows
``self_kv``        ``2·2·kv·D·D``         to_k + to_v
``self_attn``      ``2·2·q·N·D``          Q·Kᵀ and P·V over all ``N`` keys (summed over heads: ``H·d = D``)
``self_out``       ``2·q·D·D``            to_out
``cross_q``        ``2·q·D·D``            attn2.to_q
``cross_kv``       ``2·2·L·D·D``          attn2.to_k + to_v on the text (see below)
``cross_attn``     ``2·2·q·L·D``          cross-attention products
``cross_out``      ``2·q·D·D``            attn2.to_out
``ffn``            ``2·2·q·D·F``          FFN up and down projections
=================  =====================  =====================================================================

Settings (:class:`Setting`):

- **dense** (budget 1.0): ``q = kv = N``; ``cross_kv`` counted every step (the stock block recomputes it).
- **Astraea budget b** (``0 < b < 1``): ``q = k = budget_to_count(b, N)``; ``kv = N`` with ``kv_reuse=False``
  (K/V projected for all tokens), ``kv = k`` with ``kv_reuse=True`` (the other rows' K/V come from the block's
  cache). ``cross_kv`` is computed once per generation on Astraea's row path: 0 in steady state
  (``text_kv=True`` counts it, e.g. for the first step).
- **budget 0** (forecast-only steps, any order) and any budget with ``k = 0``: 0 block FLOPs.

Outside the blocks (``overhead_flops``), every step and every setting, per call:

=====================  =====================================================================================
``patch_embedding``    ``2·B·N·D·(C_in·p_t·p_h·p_w)`` (Conv3d with stride = kernel)
``time_embedding``     ``2·B·(f·D + D·D)`` (timestep MLP, ``f = freq_dim``) + ``2·B·D·6D`` (``time_proj``)
``text_embedding``     ``2·B·L·(text_dim·D + D·D)`` (PixArt text projection; Wan runs it every call)
``head``               ``2·B·N·D·(C_out·p_t·p_h·p_w)`` (``proj_out``)
=====================  =====================================================================================

``step = overhead + num_layers · block`` and ``ceiling(setting) = step(dense) / step(setting)``: the speedup the
setting would reach if time were proportional to these FLOPs.

Example:
    >>> geo = WanGeometry(heads=2, head_dim=8, ffn_dim=32, text_dim=8, text_len=4, freq_dim=8, in_channels=4,
    ...                   out_channels=4, patch_size=(1, 2, 2), num_layers=1, grid=(1, 2, 2))
    >>> block_flops(geo, Setting())["total"]  # N=4, D=16: see tests/test_flops.py for the hand count
    26624
    >>> block_flops(geo, Setting(budget=0.0))["total"]
    0
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from vdit_accel.errors import ConfigError, check_range
from vdit_accel.ops.astraea import budget_to_count
from vdit_accel.search.latency import StepChoice

BLOCK_TERMS = ("self_q", "self_kv", "self_attn", "self_out", "cross_q", "cross_kv", "cross_attn", "cross_out",
               "ffn")
OVERHEAD_TERMS = ("patch_embedding", "time_embedding", "text_embedding", "head")


@dataclass(frozen=True)
class WanGeometry:
    """Shapes of a Wan transformer call (``D = heads·head_dim``; ``grid`` is the post-patch token grid).

    Args:
        heads (`int`), head_dim (`int`), ffn_dim (`int`), text_dim (`int`), freq_dim (`int`), in_channels (`int`),
            out_channels (`int`), patch_size (`tuple[int, int, int]`), num_layers (`int`): the model config.
        text_len (`int`): text tokens ``L`` per call (Wan: 512).
        grid (`tuple[int, int, int]`): ``(T', H', W')`` tokens after patchification; ``N = T'·H'·W'``.
        batch (`int`, defaults 1): batch of one call (one CFG branch).
    """

    heads: int
    head_dim: int
    ffn_dim: int
    text_dim: int
    text_len: int
    freq_dim: int
    in_channels: int
    out_channels: int
    patch_size: tuple[int, int, int]
    num_layers: int
    grid: tuple[int, int, int]
    batch: int = 1

    def __post_init__(self) -> None:
        for name in ("heads", "head_dim", "ffn_dim", "text_dim", "text_len", "freq_dim", "in_channels",
                     "out_channels", "batch"):
            check_range(name, getattr(self, name), lo=1)
        check_range("num_layers", self.num_layers, lo=0)
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        if len(self.grid) != 3 or min(self.grid) < 1 or len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ConfigError(f"grid={self.grid}, patch_size={self.patch_size} are not accepted: expected 3 ints >= 1")

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    @classmethod
    def from_model(cls, transformer, grid: tuple[int, int, int], text_len: int, batch: int = 1) -> WanGeometry:
        """The geometry of a ``WanTransformer3DModel`` called on ``grid`` tokens with ``text_len`` text tokens."""
        c = transformer.config
        return cls(heads=c.num_attention_heads, head_dim=c.attention_head_dim, ffn_dim=c.ffn_dim, text_dim=c.text_dim,
                   text_len=text_len, freq_dim=c.freq_dim, in_channels=c.in_channels,
                   out_channels=c.out_channels or c.in_channels, patch_size=tuple(c.patch_size),
                   num_layers=len(transformer.blocks), grid=tuple(grid), batch=batch)

    def to_dict(self) -> dict:
        return {**asdict(self), "dim": self.dim, "tokens": self.tokens}


@dataclass(frozen=True)
class Setting:
    """One kind of denoising step.

    Args:
        budget (`float`, defaults 1.0): fraction of tokens computed per block; 1.0 is the dense step, 0.0 a
            forecast-only step.
        kv_reuse (`bool`, defaults False): unselected rows' K/V come from the block cache (Astraea, ``b < 1``).
        order (`int`, defaults 0): Taylor order of the unselected rows' forecast (0: cached output).
    """

    budget: float = 1.0
    kv_reuse: bool = False
    order: int = 0

    def __post_init__(self) -> None:
        choice = StepChoice(self.budget, self.order)  # the one validation of (budget, order); dense forecasts nothing
        object.__setattr__(self, "budget", choice.budget)
        object.__setattr__(self, "order", choice.order)
        if choice.budget >= 1.0 or choice.budget == 0.0:  # dense or nothing computed: K/V reuse is moot
            object.__setattr__(self, "kv_reuse", False)

    @property
    def dense(self) -> bool:
        return self.budget >= 1.0

    @property
    def label(self) -> str:
        if self.dense:
            return "dense"
        if self.budget == 0.0:
            return f"forecast-o{self.order}"
        return f"astraea-b{self.budget:.2f}" + ("-kv" if self.kv_reuse else "") + (
            f"-o{self.order}" if self.order else "")


def block_flops(geo: WanGeometry, setting: Setting, *, text_kv: bool | None = None) -> dict[str, int]:
    """FLOPs of one block call at ``setting`` per term of the module table, plus ``total``, ``rows``, ``kv_rows``.

    Args:
        geo (`WanGeometry`): shapes.
        setting (`Setting`): the step kind.
        text_kv (`bool | None`, defaults None): count cross-attention's text K/V projections; ``None``: dense yes,
            Astraea no (computed once per generation).

    Example:
        >>> geo = WanGeometry(2, 8, 32, 8, 4, 8, 4, 4, (1, 2, 2), 1, (1, 2, 2))
        >>> block_flops(geo, Setting(budget=0.5))["rows"], block_flops(geo, Setting(budget=0.5))["kv_rows"]
        (2, 4)
    """
    n, d, f, ln, bt = geo.tokens, geo.dim, geo.ffn_dim, geo.text_len, geo.batch
    q = n if setting.dense else budget_to_count(setting.budget, n)
    kv = n if (setting.dense or not setting.kv_reuse) else q
    if text_kv is None:
        text_kv = setting.dense
    if q == 0:
        terms = dict.fromkeys(BLOCK_TERMS, 0)
        kv = 0
    else:
        terms = {
            "self_q": 2 * q * d * d,
            "self_kv": 2 * 2 * kv * d * d,
            "self_attn": 2 * 2 * q * n * d,
            "self_out": 2 * q * d * d,
            "cross_q": 2 * q * d * d,
            "cross_kv": 2 * 2 * ln * d * d if text_kv else 0,
            "cross_attn": 2 * 2 * q * ln * d,
            "cross_out": 2 * q * d * d,
            "ffn": 2 * 2 * q * d * f,
        }
    terms = {k: v * bt for k, v in terms.items()}
    return {**terms, "total": sum(terms.values()), "rows": q, "kv_rows": kv}


def overhead_flops(geo: WanGeometry) -> dict[str, int]:
    """FLOPs outside the blocks of one call (same for every setting), per term, plus ``"total"``.

    Example:
        >>> geo = WanGeometry(2, 8, 32, 8, 4, 8, 4, 4, (1, 2, 2), 1, (1, 2, 2))
        >>> overhead_flops(geo)["head"]  # 2·N·D·(C_out·4) = 2·4·16·16
        2048
    """
    n, d, bt, p = geo.tokens, geo.dim, geo.batch, math.prod(geo.patch_size)
    terms = {
        "patch_embedding": 2 * bt * n * d * geo.in_channels * p,
        "time_embedding": 2 * bt * (geo.freq_dim * d + d * d) + 2 * bt * d * 6 * d,
        "text_embedding": 2 * bt * geo.text_len * (geo.text_dim * d + d * d),
        "head": 2 * bt * n * d * geo.out_channels * p,
    }
    return {**terms, "total": sum(terms.values())}


def step_flops(geo: WanGeometry, setting: Setting, *, num_layers: int | None = None,
               text_kv: bool | None = None) -> int:
    """FLOPs of one transformer call: ``overhead + num_layers · block`` (``num_layers`` defaults to the model's)."""
    layers = geo.num_layers if num_layers is None else num_layers
    return overhead_flops(geo)["total"] + layers * block_flops(geo, setting, text_kv=text_kv)["total"]


def ceiling(geo: WanGeometry, setting: Setting, *, num_layers: int | None = None) -> float:
    """The FLOP ceiling of a setting: ``step_flops(dense) / step_flops(setting)`` (steady state).

    Example:
        >>> geo = WanGeometry(2, 8, 32, 8, 4, 8, 4, 4, (1, 2, 2), 1, (1, 2, 2))
        >>> ceiling(geo, Setting()) == 1.0 and ceiling(geo, Setting(budget=0.5)) > 1.0
        True
    """
    return step_flops(geo, Setting(), num_layers=num_layers) / step_flops(geo, setting, num_layers=num_layers)
