"""Row-subset attention with the row log-sum-exp (LSE), as pure tensor functions.

Astraea recomputes only the selected query rows against the full key/value set (paper §3): every recomputed row
still normalises over all ``S`` keys, so its output and its LSE are exactly the dense ones for that row. This module
returns both, in diffusers' ``[B, S, H, D]`` layout:

- :func:`row_subset_attention`: fast path through a fused PyTorch SDPA kernel that already returns the LSE;
- :func:`row_subset_attention_reference`: its plain-PyTorch twin (matmul, ``logsumexp``, ``softmax`` in float32);
- :func:`dense_attention_with_lse`: the same with every row selected.

Fast paths (all take ``[B, H, S, D]`` inputs; the ``[B, S, H, D]`` tensors are handed over as transposed views and
the kernels write a ``[B, S, H, D]``-contiguous output):

==================  ============================================================  ===========================
backend             op                                                            LSE
==================  ============================================================  ===========================
``cpu_flash``       ``aten._scaled_dot_product_flash_attention_for_cpu``          ``[B, H, Sq]``
``cuda_flash``      ``aten._scaled_dot_product_flash_attention`` (fp16/bf16)      ``[B, H, Sq]`` float32
``cuda_efficient``  ``aten._scaled_dot_product_efficient_attention`` (+ fp32)     ``[B, H, >=Sq]``, sliced
==================  ============================================================  ===========================

Verified on torch 2.13 (CPU): ``_scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, *,
attn_mask=None, scale=None) -> (output, logsumexp)``; ``logsumexp`` is the *natural* log of ``Σ_j exp(scale·q·k_j)``
(matches ``torch.logsumexp`` to 5e-7 in fp32), float32 for fp32/fp16/bf16 inputs and float64 for float64 inputs,
and it is returned without autograd history (gradients flow through ``out`` only). Called directly, the aten ops
skip SDPA's input checks: the CPU kernel dies with SIGFPE on an empty query or key set, and returns wrong numbers
when the head dim is strided (``stride(-1) != 1``), so empty inputs never reach it and such inputs are made
contiguous first. The CUDA variants were not run here (no GPU): the capability probe runs each candidate once on
tiny inputs and keeps it only if its output *and* LSE match the reference (a base-2 LSE or a layout change fails
the probe), and a kernel error at call time falls back too, so a wrong assumption costs speed (with a one-time
warning), never correctness.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator

import torch

from vdit_accel.errors import ConfigError, check_choice

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "cpu_flash", "cuda_flash", "cuda_efficient")
_CANDIDATES = {"cpu": ("cpu_flash",), "cuda": ("cuda_flash", "cuda_efficient")}
_PROBE_SHAPE = (1, 3, 1, 5)  # (B, Sq, H, S) of the probe; D is the caller's head dim
_PROBE_ATOL = {torch.float16: 2e-2, torch.bfloat16: 5e-2}  # other dtypes: 1e-4

_backend_override: str | None = None
_warned: set[tuple] = set()


# ------------------------------------------------------------------------------------------- backend selection
def set_attention_backend(name: str | None) -> str | None:
    """Force a backend for :func:`row_subset_attention` (``None`` or ``"auto"``: probe); return the previous one.

    A forced fast path that fails its probe on the tensors' device and dtype falls back to the reference with a
    one-time warning.

    Args:
        name (`str | None`): one of ``BACKENDS`` or ``None``.

    Example:
        >>> previous = set_attention_backend("reference")
        >>> _ = set_attention_backend(previous)
    """
    global _backend_override
    if name is not None:
        check_choice("backend", name, BACKENDS)
    previous, _backend_override = _backend_override, (None if name == "auto" else name)
    return previous


@contextlib.contextmanager
def attention_backend(name: str | None) -> Iterator[None]:
    """Context manager form of :func:`set_attention_backend`; restores the previous choice on exit.

    Example:
        >>> with attention_backend("reference"):
        ...     out, lse = row_subset_attention(*(torch.randn(1, 4, 1, 8) for _ in range(3)))
    """
    previous = set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def _run_backend(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Call fast path ``name`` on ``[B, H, S, D]`` views; return ``(out [B, H, Sq, D], lse [B, H, Sq])``."""
    if name == "cpu_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=None, scale=scale
        )
    elif name == "cuda_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    elif name == "cuda_efficient":
        res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
        out, lse = res[0], res[1]
    else:  # pragma: no cover - guarded by check_choice
        raise ConfigError(f"backend={name!r} is not accepted: choose one of {list(BACKENDS[2:])}")
    return out, lse[..., : q.shape[2]]  # the efficient kernel may pad the LSE's Sq axis (alignment)


@functools.cache
def _probe_one(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    b, sq, h, s = _PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)  # never touch the global RNG
    q, k, v = (torch.randn(b, n, h, head_dim, generator=gen) * 0.5 for n in (sq, s, s))
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    scale = 0.7 / math.sqrt(head_dim)
    try:
        with torch.no_grad():
            out, lse = _run_backend(name, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)
    except (RuntimeError, NotImplementedError, AttributeError) as err:  # kernel absent or unsupported here
        logger.debug("attention backend %s unavailable on %s/%s/D=%d: %s", name, device, dtype, head_dim, err)
        return False
    ref_out, ref_lse = row_subset_attention_reference(q, k, v, scale=scale)
    atol = _PROBE_ATOL.get(dtype, 1e-4)
    ok = tuple(out.shape) == (b, h, sq, head_dim) and tuple(lse.shape) == (b, h, sq)
    ok = ok and torch.allclose(out.transpose(1, 2).float(), ref_out.float(), atol=atol, rtol=atol)
    ok = ok and torch.allclose(lse.transpose(1, 2).float(), ref_lse.float(), atol=atol, rtol=atol)
    if not ok:
        logger.debug("attention backend %s disagrees with the reference on %s/%s", name, device, dtype)
    return bool(ok)


@torch.compiler.disable
def probe_fast_path(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """Return the fast backend :func:`row_subset_attention` uses for these inputs, or ``"reference"``.

    Each candidate of the device type is run once on tiny inputs and kept only if it matches the reference; the
    answer is cached per ``(backend, device, dtype, head_dim)`` for the process. Overridden by
    :func:`set_attention_backend`.

    Args:
        device (`torch.device`): device of the inputs.
        dtype (`torch.dtype`): dtype of the inputs.
        head_dim (`int`): ``D``.

    Example:
        >>> probe_fast_path(torch.device("cpu"), torch.float32, 64)
        'cpu_flash'
    """
    device = torch.device(device)
    if _backend_override == "reference":
        return "reference"
    if _backend_override is not None:
        if _probe_one(_backend_override, device, dtype, head_dim):
            return _backend_override
        where = f"{device}/{dtype}/D={head_dim}"
        _warn_once(("forced", _backend_override, where), f"forced backend {_backend_override!r} fails on {where}")
        return "reference"
    candidates = _CANDIDATES.get(device.type, ())
    for name in candidates:
        if _probe_one(name, device, dtype, head_dim):
            return name
    where = f"{device}/{dtype}/D={head_dim}"
    _warn_once(("auto", where), f"no fused attention kernel with LSE on {where} (tried {list(candidates)})")
    return "reference"


def _warn_once(key: tuple, reason: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning("%s; using row_subset_attention_reference (slower, same results)", reason)


# ------------------------------------------------------------------------------------------------ validation
def _check_inputs(q_sel: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> float:
    for name, t in (("q_sel", q_sel), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ConfigError(f"{name}.shape={tuple(t.shape)} is not accepted: expected 4 dims [B, S, H, D]")
    (b, _, h, d), (bk, s, hk, dk) = q_sel.shape, k.shape
    if (bk, hk, dk) != (b, h, d) or tuple(v.shape) != tuple(k.shape):
        raise ConfigError(
            f"q_sel.shape={tuple(q_sel.shape)}, k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)} are not "
            "accepted: expected q_sel [B, Sq, H, D] and k, v both [B, S, H, D]"
        )
    if s < 1 or d < 1:
        raise ConfigError(f"S={s}, D={d} is out of range: accepted S >= 1 keys and D >= 1")
    if not (q_sel.dtype == k.dtype == v.dtype) or not q_sel.is_floating_point():
        raise ConfigError(f"dtypes {q_sel.dtype}, {k.dtype}, {v.dtype} are not accepted: expected one float dtype")
    if not (q_sel.device == k.device == v.device):
        raise ConfigError(f"devices {q_sel.device}, {k.device}, {v.device} are not accepted: expected one device")
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ConfigError(f"scale={scale!r} is out of range: accepted a finite float or None (1/sqrt(D))")
    return float(scale)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _empty(q_sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty_like(q_sel, memory_format=torch.contiguous_format)
    lse = torch.empty(q_sel.shape[:3], dtype=_lse_dtype(q_sel.dtype), device=q_sel.device)
    return out, lse


# ----------------------------------------------------------------------------------------------------- ops
def row_subset_attention(
    q_sel: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the selected query rows against all keys, with each row's log-sum-exp.

    ``out = softmax(q_sel·kᵀ·scale)·v`` and ``lse = ln Σ_j exp(q_sel·k_jᵀ·scale)`` per (batch, row, head): exactly
    the dense attention's rows and LSE, because no key is dropped. Runs a fused kernel when the cached probe
    (:func:`probe_fast_path`) finds one for the device/dtype/head dim, else :func:`row_subset_attention_reference`.

    Args:
        q_sel (`torch.Tensor` of shape `[B, Sq, H, D]`): queries of the selected rows (``Sq`` may be 0).
        k (`torch.Tensor` of shape `[B, S, H, D]`): keys of all tokens, same dtype and device, ``S >= 1``.
        v (`torch.Tensor` of shape `[B, S, H, D]`): values of all tokens.
        scale (`float`, *optional*, defaults to `1/sqrt(D)`): softmax scale, any finite float.
        key_mask (`torch.Tensor`, *optional*): `[B, S]` bool, ``True`` = the key is attended (a key-padding mask,
            e.g. HunyuanVideo's text padding). Masked keys are dropped before the kernel (one call when every batch
            element keeps the same keys, else one call per element), so out and LSE are exactly those of the kept
            keys; ``None`` or all ``True``: every key.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: ``out`` `[B, Sq, H, D]` contiguous, in the input dtype, and ``lse``
        `[B, Sq, H]` contiguous, float32 (float64 for float64 inputs), natural log. On the fast path ``lse`` has
        no autograd history; use the reference to differentiate through it.

    Raises:
        ConfigError: ranks, shapes, dtypes or devices disagree, ``S`` or ``D`` is 0, ``scale`` is not finite, or
            ``key_mask`` is not a `[B, S]` bool tensor keeping at least one key per batch element.

    Example:
        >>> q, k, v = torch.randn(2, 5, 3, 8), torch.randn(2, 9, 3, 8), torch.randn(2, 9, 3, 8)
        >>> out, lse = row_subset_attention(q[:, [1, 4]], k, v)
        >>> out.shape, lse.shape, lse.dtype
        (torch.Size([2, 2, 3, 8]), torch.Size([2, 2, 3]), torch.float32)
    """
    scale = _check_inputs(q_sel, k, v, scale)
    if key_mask is not None:
        return _masked(row_subset_attention, q_sel, k, v, scale, key_mask)
    if q_sel.numel() == 0:  # the CPU kernel raises SIGFPE on empty inputs
        return _empty(q_sel)
    backend = probe_fast_path(q_sel.device, q_sel.dtype, q_sel.shape[-1])
    if backend == "reference":
        return row_subset_attention_reference(q_sel, k, v, scale=scale)
    # The raw aten kernels skip SDPA's input checks: a strided head dim gives silently wrong results on CPU.
    q, kk, vv = (t if t.stride(-1) == 1 else t.contiguous() for t in (q_sel, k, v))
    try:
        out, lse = _run_backend(backend, q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), scale)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err:  # a shape/stride the tiny probe did not cover (e.g. alignment on CUDA)
        where = f"{q.device}/{q.dtype}/D={q.shape[-1]}"
        _warn_once(("runtime", backend, where), f"backend {backend!r} failed on {where}: {str(err)[:200]}")
        return row_subset_attention_reference(q_sel, k, v, scale=scale)
    return out.transpose(1, 2).contiguous(), lse.transpose(1, 2).to(_lse_dtype(q_sel.dtype)).contiguous()


def row_subset_attention_reference(
    q_sel: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch twin of :func:`row_subset_attention`: explicit scores, ``logsumexp`` and ``softmax``.

    Computes in float32 (float64 for float64 inputs) and casts ``out`` back to the input dtype. Memory is
    ``O(B·H·Sq·S)``; meant for tests and as the fallback, fully differentiable.

    Args:
        q_sel (`torch.Tensor` of shape `[B, Sq, H, D]`): queries of the selected rows.
        k (`torch.Tensor` of shape `[B, S, H, D]`): keys of all tokens.
        v (`torch.Tensor` of shape `[B, S, H, D]`): values of all tokens.
        scale (`float`, *optional*, defaults to `1/sqrt(D)`): softmax scale.
        key_mask (`torch.Tensor`, *optional*): `[B, S]` bool, ``True`` = attended; masked keys get score ``-inf``.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: ``out`` `[B, Sq, H, D]` and ``lse`` `[B, Sq, H]`, as in
        :func:`row_subset_attention`.

    Example:
        >>> q = k = v = torch.zeros(1, 4, 1, 2)
        >>> out, lse = row_subset_attention_reference(q, k, v)
        >>> round(lse[0, 0, 0].item(), 6) == round(math.log(4), 6)  # uniform scores: ln(S)
        True
    """
    scale = _check_inputs(q_sel, k, v, scale)
    compute = _lse_dtype(q_sel.dtype)
    q, kk, vv = (t.transpose(1, 2).to(compute) for t in (q_sel, k, v))  # [B, H, *, D]
    scores = torch.matmul(q, kk.transpose(-1, -2)) * scale  # [B, H, Sq, S]
    if key_mask is not None:
        _check_key_mask(key_mask, k)
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Sq]
    out = torch.matmul(torch.softmax(scores, dim=-1), vv)  # [B, H, Sq, D]
    return out.to(q_sel.dtype).transpose(1, 2).contiguous(), lse.transpose(1, 2).contiguous()


def _check_key_mask(key_mask: torch.Tensor, k: torch.Tensor) -> None:
    b, s = k.shape[:2]
    if key_mask.dtype != torch.bool or tuple(key_mask.shape) != (b, s) or key_mask.device != k.device:
        raise ConfigError(f"key_mask of shape {tuple(key_mask.shape)} and dtype {key_mask.dtype} is not accepted: "
                          f"expected a bool [B, S] = [{b}, {s}] tensor on {k.device}")
    if not bool(key_mask.any(dim=1).all()):
        raise ConfigError("key_mask masks every key of a batch element: accepted at least one attended key per row")


def _masked(fn, q_sel: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, key_mask: torch.Tensor):
    """``fn`` on the kept keys only (key-padding mask `[B, S]`): exact, and the fused kernels need no mask."""
    _check_key_mask(key_mask, k)
    if bool(key_mask.all()):
        return fn(q_sel, k, v, scale=scale)
    if bool((key_mask == key_mask[:1]).all()):  # the same keys kept for the whole batch: one call
        keep = key_mask[0].nonzero().squeeze(1)
        return fn(q_sel, k.index_select(1, keep), v.index_select(1, keep), scale=scale)
    outs, lses = zip(*(fn(q_sel[i:i + 1], k[i:i + 1, m], v[i:i + 1, m], scale=scale)
                       for i, m in enumerate(key_mask)))
    return torch.cat(outs).contiguous(), torch.cat(lses).contiguous()


def dense_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention plus per-row LSE: :func:`row_subset_attention` with every query row selected.

    Args:
        q (`torch.Tensor` of shape `[B, S, H, D]`): queries of all tokens.
        k (`torch.Tensor` of shape `[B, S, H, D]`): keys.
        v (`torch.Tensor` of shape `[B, S, H, D]`): values.
        scale (`float`, *optional*, defaults to `1/sqrt(D)`): softmax scale.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: ``out`` `[B, S, H, D]` and ``lse`` `[B, S, H]`.

    Example:
        >>> x = torch.randn(1, 6, 2, 4)
        >>> out, lse = dense_attention_with_lse(x, x, x)
        >>> out.shape, lse.shape
        (torch.Size([1, 6, 2, 4]), torch.Size([1, 6, 2]))
    """
    return row_subset_attention(q, k, v, scale=scale)
