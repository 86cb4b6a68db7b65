"""A Triton flash-attention forward with a per-key logit bias, for TimeRipple's ``"tokens"`` variant (and row subsets).

The ``"tokens"`` variant (``ops.timeripple_tokens``) reduces attention to its structured form: the unique query rows
against the merged key set, where a merged key carries the mean value of the keys it replaces and a logit bias
``log(count)``. This module computes exactly that form in one kernel::

    out[b, i, h]  = Σ_j softmax_j(scale · q[b, i, h] · k[b, j, h] + bias[b, j]) · v[b, j, h]      [B, M, H, Dv]
    lse[b, i, h]  = ln Σ_j exp(scale · q[b, i, h] · k[b, j, h] + bias[b, j])                     [B, M, H]

- :func:`biased_attention_triton`: the kernel. Flash-attention-2 style forward: one program per
  (``BLOCK_M`` query rows, batch·head), keys streamed in ``BLOCK_N`` tiles with an online softmax in base 2, fp32
  accumulation, fp32/fp16/bf16 inputs read in place from the diffusers ``[B, S, H, D]`` layout (any strides with a
  unit last stride), masked tails on ``M``, ``N`` and head dims that are not powers of two. Returns ``out`` in the
  input dtype and ``lse`` float32, natural log (so it serves Astraea's row-subset attention and ring/LSE merging).
- :func:`biased_attention_reference`: its plain-PyTorch twin (explicit scores, ``logsumexp``, ``softmax``).
- :func:`row_subset_attention_triton`: ``ops.attention.row_subset_attention``'s contract (selected rows over all
  keys, with LSE) on the kernel (``bias=None``).

Not here: a backward pass (inference only), causal or dropout masks, per-head or per-(row, key) biases, and any
autotuning (block sizes are arguments with defaults by head dim and dtype; ``benchmarks/timeripple_gpu.py`` times a
few). The scatter of unique rows back to all rows stays in torch (one ``index_select``), in ``ops.timeripple_tokens``.

What has been verified where (so far no GPU was available to this code): numerics under the interpreter on CPU
(``tests/test_ops_timeripple_triton.py``: fp32 within 2e-5 of the float64 reference, fp16/bf16 within FlashAttention's
bound); the GPU code path compiles to an sm_90 cubin with Hopper ``wgmma`` instructions (a slow test compiles it
with triton's bundled ``ptxas``, no GPU needed). Its speed and its numerics on hardware are measured by
``benchmarks/timeripple_gpu.py`` when a GPU is lent.

Triton is imported lazily, at the first call, never at import of this module: the package imports and runs
without Triton. On CPU tensors the kernel runs only under ``TRITON_INTERPRET=1`` (Triton's interpreter, used by the
tests at tiny sizes); the variable is read when the kernel is first compiled for that mode, so set it before the
first call (kernels are cached per mode).
"""

from __future__ import annotations

import functools
import math
import os

import torch

from vdit_accel.errors import ConfigError

__all__ = [
    "TritonUnavailableError",
    "biased_attention_reference",
    "biased_attention_triton",
    "default_blocks",
    "row_subset_attention_triton",
    "triton_available",
    "triton_usable",
]

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

tl = None  # triton.language, bound at the first kernel build (lazy import; the kernel body resolves it as a global)


class TritonUnavailableError(ConfigError):
    """The Triton kernel was asked for but cannot run here (no triton, or a CPU tensor outside the interpreter)."""


# --------------------------------------------------------------------------------------------------- capability
@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works in this process (cached; the import happens here, not at module import).

    Example:
        >>> isinstance(triton_available(), bool)
        True
    """
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_usable(device: torch.device | str) -> tuple[bool, str]:
    """Whether the kernel can run on tensors of `device`, and why not.

    CUDA tensors need triton; CPU tensors need triton and ``TRITON_INTERPRET=1`` (the interpreter).

    Returns:
        `(ok, reason)`; `reason` is `""` when `ok`.

    Example:
        >>> triton_usable("meta")[0]
        False
    """
    device = torch.device(device)
    if not triton_available():
        return False, "triton is not installed (or fails to import)"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and _interpret():
        return True, ""
    return False, (f"tensors on {device.type!r} run the Triton kernel only on CUDA, or on CPU under "
                   "TRITON_INTERPRET=1 (the interpreter)")


# ------------------------------------------------------------------------------------------------------ kernel
def _attn_fwd(  # pragma: no cover - compiled/interpreted by triton, never called as Python directly
    Q, K, V, Bias, Out, Lse,
    sqb, sqm, sqh,
    skb, skn, skh,
    svb, svn, svh,
    sbb, sbn,
    sob, som, soh,
    slb, slm, slh,
    H, M, N, D, DV,
    qk_scale,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # one program: BLOCK_M query rows of one (batch, head); keys streamed in BLOCK_N tiles (online softmax, base 2)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < M
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:  # the interpreter's tl.dot mis-reads bfloat16 (raw bits): widen the operands there only
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, dtype=tl.float32)

    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < N
        k = tl.load(k_base + cols[None, :] * skn + offs_d[:, None], mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        if HAS_BIAS:
            bias = tl.load(Bias + b * sbb + cols * sbn, mask=n_ok, other=0.0).to(tl.float32)
            s = s + bias[None, :] * 1.4426950408889634
        s = tl.where(n_ok[None, :], s, float("-inf"))
        if INTERPRET:  # tl.max/tl.sum are @jit functions the interpreter cannot call when triton was imported
            # before TRITON_INTERPRET was set; tl.reduce with the same combine functions runs as numpy there
            row_max = tl.reduce(s, 1, tl.standard._elementwise_max)
        else:
            row_max = tl.max(s, 1)
        m_new = tl.maximum(m_i, row_max)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with only -inf so far: no NaN from -inf - -inf
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        if INTERPRET:
            row_sum = tl.reduce(p, 1, tl.standard._sum_combine)
        else:
            row_sum = tl.sum(p, 1)
        l_i = l_i * alpha + row_sum
        v = tl.load(v_base + cols[:, None] * svn + offs_dv[None, :], mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        if DOT_FP32:
            p = p.to(V.dtype.element_ty).to(tl.float32)  # keep the GPU path's rounding of p to the input dtype
            v = v.to(tl.float32)
        else:
            p = p.to(v.dtype)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptrs = Out + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=m_ok[:, None] & dv_ok[None, :])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # back to natural log
    tl.store(Lse + b * slb + h * slh + offs_m * slm, lse, mask=m_ok)


@functools.cache
def _kernel(interpret: bool):
    """Decorate `_attn_fwd` with `triton.jit` once per mode (the interpreter flag is read at decoration time)."""
    global tl
    import triton
    import triton.language as language

    tl = language
    return triton.jit(_attn_fwd)


# ------------------------------------------------------------------------------------------------------ checks
def _check(q, k, v, bias, scale) -> float:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ConfigError(f"{name} is not accepted: expected a 4-dim [B, S, H, D] tensor, "
                              f"got {getattr(t, 'shape', type(t))}")
    (b, _, h, d), (bk, n, hk, dk) = q.shape, k.shape
    if (bk, hk, dk) != (b, h, d) or tuple(v.shape[:3]) != (b, n, h):
        raise ConfigError(f"q/k/v shapes {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)} are not accepted: "
                          "expected q [B, M, H, D], k [B, N, H, D], v [B, N, H, Dv]")
    if n < 1 or d < 1 or v.shape[3] < 1:
        raise ConfigError(f"N={n}, D={d}, Dv={v.shape[3]} is out of range: accepted N >= 1 keys and D, Dv >= 1")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES + (torch.float64,):
        raise ConfigError(f"dtypes {q.dtype}/{k.dtype}/{v.dtype} are not accepted: expected one of "
                          f"{[str(x) for x in _DTYPES + (torch.float64,)]} for q, k and v alike")
    if not (q.device == k.device == v.device):
        raise ConfigError(f"devices {q.device}/{k.device}/{v.device} are not accepted: expected one device")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (b, n) or not bias.is_floating_point():
            raise ConfigError(f"bias.shape={tuple(getattr(bias, 'shape', ()))} is not accepted: expected a float "
                              f"[B, N]=[{b}, {n}] tensor (one logit bias per key, shared by every head and row)")
        if bias.device != q.device:
            raise ConfigError(f"bias.device={bias.device} is not accepted: expected {q.device}")
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ConfigError(f"scale={scale!r} is out of range: accepted a finite float or None (1/sqrt(D))")
    return float(scale)


def default_blocks(head_dim: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int, int]:
    """`(BLOCK_M, BLOCK_N, num_warps, num_stages)` used when none are given, by head dim and dtype (not by GPU).

    Checked by compiling for sm_90 without a GPU (shared memory per program: bf16 D=128 48 KiB, fp32 D=128 with
    128x64 tiles 161 KiB, hence smaller fp32 tiles); not tuned on hardware (``benchmarks/timeripple_gpu.py`` times
    alternatives).

    Example:
        >>> default_blocks(128)
        (128, 64, 8, 2)
    """
    if dtype == torch.float32:
        return 64, 32, 4, 2
    if head_dim <= 64:
        return 128, 64, 4, 3
    return 128, 64, 8, 2


# ------------------------------------------------------------------------------------------------------- ops
def biased_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query row over all keys with a per-key additive logit bias, and each row's LSE.

    Args:
        q (`torch.Tensor`): `[B, M, H, D]` queries (the unique rows); `M` may be 0.
        k (`torch.Tensor`): `[B, N, H, D]` keys (the merged key set), `N >= 1`.
        v (`torch.Tensor`): `[B, N, H, Dv]` values; q, k, v share one dtype (float32, float16 or bfloat16) and device.
        bias (`torch.Tensor | None`, defaults to `None`): `[B, N]` float logit bias per key (e.g. `log(count)` of a
            merged key; `-inf` drops a key), shared by every head and row; read as float32. `None`: no bias.
        scale (`float | None`, defaults to `None`): score scale, `1/sqrt(D)` when `None`.
        block_m, block_n (`int | None`): query/key tile sizes (powers of two, >= 16); defaults: `default_blocks(D)`.
        num_warps, num_stages (`int | None`): launch parameters on CUDA (ignored by the interpreter).

    Returns:
        `(out, lse)`: `out` `[B, M, H, Dv]` contiguous in the input dtype; `lse` `[B, M, H]` contiguous float32,
        natural log of `Σ_j exp(scale·q·k_j + bias_j)`. A row whose keys all have bias `-inf` gives NaN.

    Raises:
        TritonUnavailableError: triton is missing, or the tensors are on CPU outside `TRITON_INTERPRET=1`.
        ConfigError: shapes, dtypes (float64 is rejected: use the reference), devices, bias or scale are invalid.

    Example:
        >>> q = torch.randn(1, 3, 2, 16)
        >>> try:
        ...     out, lse = biased_attention_triton(q, q, q)  # needs CUDA, or TRITON_INTERPRET=1 on CPU
        ... except TritonUnavailableError:
        ...     pass
    """
    scale = _check(q, k, v, bias, scale)
    if q.dtype not in _DTYPES:
        raise ConfigError(f"dtype {q.dtype} is not accepted by the Triton kernel: expected one of "
                          f"{[str(x) for x in _DTYPES]} (use biased_attention_reference for float64)")
    for name, t in (("q", q), ("k", k), ("v", v)):  # the kernel's pointer offsets are int32
        if sum((t.shape[i] - 1) * t.stride(i) for i in range(4)) >= 2**31:
            raise ConfigError(f"{name}.shape={tuple(t.shape)} is out of range: the kernel addresses < 2**31 "
                              "elements per tensor (split the batch or heads)")
    ok, why = triton_usable(q.device)
    if not ok:
        raise TritonUnavailableError(f"the Triton attention kernel cannot run: {why}")
    b, m, h, d = q.shape
    n, dv = k.shape[1], v.shape[3]
    dm, dn, dw, ds = default_blocks(d, q.dtype)
    block_m, block_n = block_m or dm, block_n or dn
    for name, val in (("block_m", block_m), ("block_n", block_n)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 16 or val & (val - 1):
            raise ConfigError(f"{name}={val!r} is out of range: accepted a power of two >= 16")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((b, m, h, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, m, h), dtype=torch.float32, device=q.device)
    if m == 0 or b == 0 or h == 0:
        return out, lse
    if bias is not None:
        bias = bias.to(torch.float32)
    bias_arg = bias if bias is not None else lse  # a dummy pointer when HAS_BIAS is False (never read)
    sbb, sbn = (bias.stride(0), bias.stride(1)) if bias is not None else (0, 0)
    grid = (math.ceil(m / block_m), b * h)
    interpret = _interpret()
    interp_bf16 = interpret and q.dtype == torch.bfloat16
    _kernel(interpret)[grid](
        q, k, v, bias_arg, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        sbb, sbn,
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        h, m, n, d, dv,
        scale * _LOG2E,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=max(16, 1 << (d - 1).bit_length()),
        BLOCK_DV=max(16, 1 << (dv - 1).bit_length()),
        PRECISION="ieee" if q.dtype == torch.float32 or interp_bf16 else "tf32",
        DOT_FP32=interp_bf16,
        INTERPRET=interpret,
        num_warps=num_warps or dw,
        num_stages=num_stages or ds,
    )
    return out, lse


def biased_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch twin of `biased_attention_triton`: explicit scores + bias, `logsumexp`, `softmax`.

    Computes in float64 (tests compare the fp32-accumulating kernel against it) and returns `out` `[B, M, H, Dv]`
    in the input dtype and `lse` `[B, M, H]` float32 (float64 for float64 inputs). Memory `O(B·H·M·N)`: small sizes.

    Example:
        >>> q = k = v = torch.zeros(1, 4, 1, 2)
        >>> out, lse = biased_attention_reference(q, k, v, torch.zeros(1, 4))
        >>> round(float(lse[0, 0, 0]), 6) == round(math.log(4), 6)
        True
    """
    scale = _check(q, k, v, bias, scale)
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))  # [B, H, *, D]
    scores = torch.matmul(qd, kd.transpose(-1, -2)) * scale  # [B, H, M, N]
    if bias is not None:
        scores = scores + bias.double()[:, None, None, :]
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, M]
    out = torch.matmul(torch.softmax(scores, dim=-1), vd)  # [B, H, M, Dv]
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out.to(q.dtype).transpose(1, 2).contiguous(), lse.to(lse_dtype).transpose(1, 2).contiguous()


def row_subset_attention_triton(
    q_sel: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ops.attention.row_subset_attention` on the Triton kernel: selected query rows over all keys, with LSE.

    Args:
        q_sel (`torch.Tensor`): `[B, Sq, H, D]` queries of the selected rows (`Sq` may be 0).
        k, v (`torch.Tensor`): `[B, S, H, D]` keys and values of all tokens.
        scale (`float | None`, defaults to `None`): softmax scale, `1/sqrt(D)` when `None`.

    Returns:
        `(out [B, Sq, H, D], lse [B, Sq, H] float32, natural log)`, as `row_subset_attention`.

    Raises:
        TritonUnavailableError, ConfigError: as `biased_attention_triton`; also when `v`'s shape differs from `k`'s.

    Example:
        >>> q = torch.randn(1, 2, 1, 16)
        >>> try:
        ...     out, lse = row_subset_attention_triton(q, q, q)
        ... except TritonUnavailableError:
        ...     pass
    """
    if isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(k.shape):
        raise ConfigError(f"k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)} are not accepted: expected both "
                          "[B, S, H, D]")
    return biased_attention_triton(q_sel, k, v, None, scale=scale)
