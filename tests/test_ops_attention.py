"""Row-subset attention with LSE: against dense SDPA, torch.logsumexp and the plain-PyTorch reference twin."""

from __future__ import annotations

import doctest
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from vdit_accel.errors import ConfigError
from vdit_accel.ops import attention as attention_mod
from vdit_accel.ops.attention import (
    BACKENDS,
    attention_backend,
    dense_attention_with_lse,
    probe_fast_path,
    row_subset_attention,
    row_subset_attention_reference,
    set_attention_backend,
)

FP32 = {"atol": 1e-5, "rtol": 1e-5}


def _qkv(b, s, h, d, *, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, s, h, d, generator=gen, dtype=dtype) for _ in range(3))


def _rows(s, sq, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(s, generator=gen)[:sq].sort().values


def _scores(q, k, scale):
    return torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale  # [B, H, Sq, S]


@pytest.fixture(autouse=True)
def _auto_backend():
    previous = set_attention_backend(None)
    yield
    set_attention_backend(previous)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize(("b", "s", "h", "d", "sq"), [(2, 97, 2, 64, 13), (1, 16, 3, 8, 16), (3, 5, 1, 7, 1)])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_rows_equal_dense_sdpa_rows(backend, b, s, h, d, sq, scale):
    q, k, v = _qkv(b, s, h, d)
    rows = _rows(s, sq)
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    dense = dense.transpose(1, 2)  # [B, S, H, D]
    with attention_backend(backend):
        out, lse = row_subset_attention(q[:, rows], k, v, scale=scale)
    assert out.shape == (b, sq, h, d) and out.dtype == torch.float32 and out.is_contiguous()
    assert lse.shape == (b, sq, h) and lse.dtype == torch.float32 and lse.is_contiguous()
    torch.testing.assert_close(out, dense[:, rows], **FP32)
    ref_scale = 1.0 / math.sqrt(d) if scale is None else scale
    expected_lse = torch.logsumexp(_scores(q[:, rows], k, ref_scale), dim=-1).transpose(1, 2)  # natural log
    torch.testing.assert_close(lse, expected_lse.float(), **FP32)


def test_fast_path_is_cpu_flash_and_equals_reference():
    q, k, v = _qkv(2, 97, 2, 64, seed=3)
    rows = _rows(97, 13, seed=4)
    assert probe_fast_path(torch.device("cpu"), torch.float32, 64) == "cpu_flash"
    fast = row_subset_attention(q[:, rows], k, v)
    ref = row_subset_attention_reference(q[:, rows], k, v)
    # FA-style bound: fast error vs a float64 oracle within 2x the fp32 reference's own error + a floor.
    oracle = row_subset_attention_reference(*(t.double() for t in (q[:, rows], k, v)))
    for i in range(2):
        err_fast = (fast[i].double() - oracle[i]).abs().max().item()
        err_ref = (ref[i].double() - oracle[i]).abs().max().item()
        assert err_fast <= 2 * err_ref + 1e-5
        torch.testing.assert_close(fast[i], ref[i], **FP32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_match_reference(dtype):
    q, k, v = _qkv(1, 33, 2, 16, seed=5, dtype=dtype)
    fast_out, fast_lse = row_subset_attention(q[:, :7], k, v)
    ref_out, ref_lse = row_subset_attention_reference(q[:, :7], k, v)
    assert fast_out.dtype == dtype and fast_lse.dtype == torch.promote_types(dtype, torch.float32)
    tol = {"atol": 1e-9, "rtol": 1e-9} if dtype == torch.float64 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(fast_out, ref_out, **tol)
    torch.testing.assert_close(fast_lse, ref_lse, **tol)


@pytest.mark.parametrize(
    "layout", ["strided_head_dim", "strided_seq", "strided_heads", "bhsd_permuted", "fused_qkv", "d_transposed"]
)
def test_any_strides_match_reference(layout):
    """Regression: the raw CPU flash op returns wrong numbers for a strided head dim unless made contiguous."""
    b, s, h, d = 2, 9, 2, 8
    gen = torch.Generator().manual_seed(11)
    make = {
        "strided_head_dim": lambda n: torch.randn(b, n, h, 2 * d, generator=gen)[..., ::2],
        "strided_seq": lambda n: torch.randn(b, 2 * n, h, d, generator=gen)[:, ::2],
        "strided_heads": lambda n: torch.randn(b, n, 2 * h, d, generator=gen)[:, :, ::2],
        "bhsd_permuted": lambda n: torch.randn(b, h, n, d, generator=gen).transpose(1, 2),
        "fused_qkv": lambda n: torch.randn(b, n, h, 3 * d, generator=gen)[..., d : 2 * d],
        "d_transposed": lambda n: torch.randn(b, n, d, h, generator=gen).transpose(2, 3),
    }[layout]
    q, k, v = make(5), make(s), make(s)
    out, lse = row_subset_attention(q, k, v)
    ref_out, ref_lse = row_subset_attention_reference(q.contiguous(), k.contiguous(), v.contiguous())
    torch.testing.assert_close(out, ref_out, **FP32)
    torch.testing.assert_close(lse, ref_lse, **FP32)


def test_dense_attention_with_lse_is_full_row_subset():
    q, k, v = _qkv(2, 11, 2, 8, seed=6)
    out, lse = dense_attention_with_lse(q, k, v, scale=0.5)
    sub_out, sub_lse = row_subset_attention(q, k, v, scale=0.5)
    assert torch.equal(out, sub_out) and torch.equal(lse, sub_lse)
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=0.5)
    torch.testing.assert_close(out, dense.transpose(1, 2), **FP32)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_empty_selection_returns_empty_without_kernel(backend):
    q, k, v = _qkv(2, 9, 2, 8)
    with attention_backend(backend):
        out, lse = row_subset_attention(q[:, :0], k, v)
    assert out.shape == (2, 0, 2, 8) and lse.shape == (2, 0, 2) and lse.dtype == torch.float32


def test_analytic_lse_uniform_scores():
    q = torch.zeros(1, 3, 1, 4)
    k = torch.randn(1, 10, 1, 4)
    v = torch.arange(40.0).view(1, 10, 1, 4)
    out, lse = row_subset_attention(q, k, v)
    torch.testing.assert_close(lse, torch.full((1, 3, 1), math.log(10.0)))
    torch.testing.assert_close(out, v.mean(dim=1, keepdim=True).expand(1, 3, 1, 4))


def test_gradients_flow_through_out():
    q, k, v = _qkv(1, 12, 2, 8, seed=7)
    q_fast, q_ref = q[:, :5].clone().requires_grad_(), q[:, :5].clone().requires_grad_()
    row_subset_attention(q_fast, k, v)[0].square().sum().backward()
    row_subset_attention_reference(q_ref, k, v)[0].square().sum().backward()
    torch.testing.assert_close(q_fast.grad, q_ref.grad, **FP32)


def test_forced_unavailable_backend_falls_back_once(caplog):
    attention_mod._warned.clear()
    q, k, v = _qkv(1, 8, 1, 4)
    with caplog.at_level(logging.WARNING, logger="vdit_accel.ops.attention"):
        with attention_backend("cuda_flash"):  # not runnable on CPU tensors
            first = row_subset_attention(q, k, v)
            second = row_subset_attention(q, k, v)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cuda_flash" in warnings[0].getMessage()
    ref = row_subset_attention_reference(q, k, v)
    for a, b in zip(first + second, ref + ref):
        assert torch.equal(a, b)


def test_kernel_runtime_error_falls_back_once(monkeypatch, caplog):
    q, k, v = _qkv(1, 8, 1, 4, seed=9)
    assert probe_fast_path(q.device, q.dtype, 4) == "cpu_flash"  # probe cached before the kernel "breaks"

    def broken(*args):
        raise RuntimeError("unsupported stride")

    monkeypatch.setattr(attention_mod, "_run_backend", broken)
    attention_mod._warned.clear()
    with caplog.at_level(logging.WARNING, logger="vdit_accel.ops.attention"):
        first, second = row_subset_attention(q, k, v), row_subset_attention(q, k, v)
    assert len(caplog.records) == 1 and "unsupported stride" in caplog.records[0].getMessage()
    ref = row_subset_attention_reference(q, k, v)
    assert all(torch.equal(a, b) for a, b in zip(first + second, ref + ref))


def test_backend_override_is_restored_and_validated():
    assert set_attention_backend("reference") is None
    assert probe_fast_path(torch.device("cpu"), torch.float32, 8) == "reference"
    assert set_attention_backend(None) == "reference"
    with pytest.raises(ConfigError, match=r"backend='flash' is not accepted: choose one of"):
        set_attention_backend("flash")
    assert "auto" in BACKENDS


@pytest.mark.parametrize(
    ("q_shape", "k_shape", "v_shape", "match"),
    [
        ((1, 3, 2, 8), (1, 5, 2, 8), (1, 5, 2, 4), "expected q_sel"),
        ((1, 3, 2, 8), (1, 5, 1, 8), (1, 5, 1, 8), "expected q_sel"),
        ((2, 3, 2, 8), (1, 5, 2, 8), (1, 5, 2, 8), "expected q_sel"),
        ((3, 2, 8), (1, 5, 2, 8), (1, 5, 2, 8), "expected 4 dims"),
        ((1, 3, 2, 8), (1, 0, 2, 8), (1, 0, 2, 8), "S=0"),
    ],
)
@pytest.mark.parametrize("fn", [row_subset_attention, row_subset_attention_reference])
def test_bad_shapes_raise(fn, q_shape, k_shape, v_shape, match):
    with pytest.raises(ConfigError, match=match):
        fn(torch.randn(q_shape), torch.randn(k_shape), torch.randn(v_shape))


def test_bad_scale_and_dtype_raise():
    q, k, v = _qkv(1, 4, 1, 4)
    with pytest.raises(ConfigError, match=r"scale=nan is out of range"):
        row_subset_attention(q, k, v, scale=float("nan"))
    with pytest.raises(ConfigError, match="dtypes"):
        row_subset_attention(q.double(), k, v)


def test_docstring_examples():
    result = doctest.testmod(attention_mod, extraglobs={"torch": torch, "math": math})
    assert result.attempted >= 6 and result.failed == 0


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("same_for_batch", [True, False])
def test_key_mask_equals_attention_over_the_kept_keys(backend, same_for_batch):
    """A key-padding mask: out and LSE of every row are those of the dense attention over the kept keys only (the
    fast path drops masked keys before the kernel, the reference masks scores with -inf)."""
    q, k, v = _qkv(3, 97, 2, 16, seed=5)
    rows = _rows(97, 11)
    mask = torch.ones(3, 97, dtype=torch.bool)
    mask[:, 90:] = False
    if not same_for_batch:
        mask[1, 40:60] = False
        mask[2, 0] = False
    with attention_backend(backend):
        out, lse = row_subset_attention(q[:, rows], k, v, key_mask=mask)
    for i in range(3):
        keep = mask[i]
        scores = _scores(q[i:i + 1, rows], k[i:i + 1, keep], 1 / math.sqrt(16))  # [1, H, Sq, S']
        ref_lse = torch.logsumexp(scores, dim=-1).transpose(1, 2)
        ref_out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v[i:i + 1, keep].double())
        torch.testing.assert_close(lse[i:i + 1].double(), ref_lse, **FP32)
        torch.testing.assert_close(out[i:i + 1].double(), ref_out, **FP32)
    unmasked, _ = row_subset_attention(q[:, rows], k, v)
    assert not torch.allclose(unmasked, out, atol=1e-4)  # the masked keys mattered
    all_true, _ = row_subset_attention(q[:, rows], k, v, key_mask=torch.ones(3, 97, dtype=torch.bool))
    assert torch.equal(all_true, unmasked)


@pytest.mark.parametrize("fn", [row_subset_attention, row_subset_attention_reference])
def test_bad_key_mask_raises(fn):
    q, k, v = _qkv(2, 9, 1, 4)
    with pytest.raises(ConfigError, match="key_mask"):
        fn(q, k, v, key_mask=torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ConfigError, match="key_mask"):
        fn(q, k, v, key_mask=torch.ones(2, 9))
    empty = torch.ones(2, 9, dtype=torch.bool)
    empty[1] = False
    with pytest.raises(ConfigError, match="every key"):
        fn(q, k, v, key_mask=empty)
