"""The Triton biased flash-attention kernel (tokens variant, row subsets) vs its reference twins, and its dispatch.

The kernel runs on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, set per test through
``monkeypatch``: Triton reads it when the kernel is decorated, which this package does at the first call per mode),
at tiny sizes. Under the interpreter, bfloat16 operands of ``tl.dot`` are widened to float32 inside the kernel
(the interpreter's ``tl.dot`` mis-reads bfloat16), so the bfloat16 cases check loads, masks, the online softmax and
the rounding of ``p`` and of the output, not the GPU's bfloat16 tensor-core dot.
"""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import vdit_accel.ops.timeripple_tokens as tokens_mod
import vdit_accel.ops.timeripple_triton as tri
from vdit_accel.errors import ConfigError
from vdit_accel.ops.attention import row_subset_attention_reference
from vdit_accel.ops.timeripple_tokens import (
    resolve_tokens_backend,
    token_dedup_attention,
    token_dedup_attention_reference,
    tokens_backend,
    tokens_timeripple_attention,
)
from vdit_accel.ops.timeripple_triton import (
    TritonUnavailableError,
    biased_attention_reference,
    biased_attention_triton,
    row_subset_attention_triton,
    triton_available,
)

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

# fp32: the kernel accumulates in fp32 with IEEE dots; measured max errors ~1e-6 at these sizes
ATOL_FP32 = 2e-5
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}  # FA's bound: err <= 2 * err(same-precision torch) + floor


@pytest.fixture
def interp(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _qkv(b, m, n, h, d, dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, m, h, d, generator=g)
    k = torch.randn(b, n, h, d, generator=g)
    v = torch.randn(b, n, h, dv or d, generator=g)
    bias = torch.rand(b, n, generator=g) * math.log(4.0)  # log(count) of merged keys with counts in [1, 4]
    return q.to(dtype), k.to(dtype), v.to(dtype), bias


def _sdpa_same_precision(q, k, v, bias):
    """Torch at the input precision (the 'same-precision PyTorch' term of FA's error bound)."""
    mask = bias.to(q.dtype)[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------- kernel vs reference
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("b", [1, 2])
def test_kernel_matches_reference(interp, dtype, d, b):
    # M = 37 and N = 53 are not multiples of the 16-row/16-key tiles: masked tails on both axes
    q, k, v, bias = _qkv(b, 37, 53, 2, d, dtype=dtype, seed=d + b)
    out, lse = biased_attention_triton(q, k, v, bias, block_m=16, block_n=16)
    ref_out, ref_lse = biased_attention_reference(q.double(), k.double(), v.double(), bias)
    assert out.shape == (b, 37, 2, d) and out.dtype == dtype and lse.shape == (b, 37, 2) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=ATOL_FP32)
    err = (out.double() - ref_out).abs().max().item()
    if dtype == torch.float32:
        assert err <= ATOL_FP32
    else:
        base = (_sdpa_same_precision(q, k, v, bias).double() - ref_out).abs().max().item()
        assert err <= 2 * base + FLOOR[dtype], (err, base)


@needs_triton
@pytest.mark.parametrize("m,n,d,dv,bm,bn", [
    (1, 1, 64, 64, 16, 16),  # one row, one key
    (17, 33, 64, 32, 16, 16),  # one past a tile on both axes, Dv != D
    (5, 70, 40, 24, 16, 32),  # head dims that are not powers of two (padded, masked)
    (130, 9, 128, 128, 128, 64),  # default-sized tiles, M past one tile, N shorter than one
])
def test_tails_and_odd_head_dims(interp, m, n, d, dv, bm, bn):
    q, k, v, bias = _qkv(2, m, n, 3, d, dv, seed=m * n)
    out, lse = biased_attention_triton(q, k, v, bias, block_m=bm, block_n=bn)
    ref_out, ref_lse = biased_attention_reference(q, k, v, bias)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=ATOL_FP32)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=ATOL_FP32)


@needs_triton
@pytest.mark.parametrize("d", [64, 128])
def test_zero_bias_equals_plain_sdpa(interp, d):
    q, k, v, _ = _qkv(2, 29, 45, 2, d, seed=3)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    lse_ref = torch.logsumexp(torch.einsum("bihd,bjhd->bihj", q, k) / math.sqrt(d), dim=-1)
    for bias in (torch.zeros(2, 45), None):
        out, lse = biased_attention_triton(q, k, v, bias, block_m=16, block_n=16)
        torch.testing.assert_close(out, sdpa, rtol=0, atol=ATOL_FP32)
        torch.testing.assert_close(lse, lse_ref, rtol=0, atol=ATOL_FP32)


@needs_triton
def test_bias_shifts_lse_and_minus_inf_drops_keys(interp):
    q, k, v, _ = _qkv(1, 20, 30, 2, 64, seed=5)
    out0, lse0 = biased_attention_triton(q, k, v, None)
    out_c, lse_c = biased_attention_triton(q, k, v, torch.full((1, 30), 0.7))  # a constant bias: same out, lse + c
    torch.testing.assert_close(out_c, out0, rtol=0, atol=ATOL_FP32)
    torch.testing.assert_close(lse_c, lse0 + 0.7, rtol=0, atol=ATOL_FP32)
    keep = torch.arange(30) % 3 != 1
    bias = torch.zeros(1, 30).masked_fill(~keep, float("-inf"))  # a whole first tile of 16 keys has some -inf
    bias[0, :16] = float("-inf")
    keep[:16] = False
    out, lse = biased_attention_triton(q, k, v, bias, block_m=16, block_n=16)
    ref_out, ref_lse = biased_attention_reference(q, k[:, keep], v[:, keep], None)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=ATOL_FP32)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=ATOL_FP32)


@needs_triton
def test_strided_inputs_and_explicit_scale(interp):
    q, k, v, bias = _qkv(1, 21, 19, 2, 64, seed=7)
    qs = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, M, H, D] view of a [B, H, M, D] buffer
    out, lse = biased_attention_triton(qs, k, v, bias, scale=0.3)
    ref_out, ref_lse = biased_attention_reference(q, k, v, bias, scale=0.3)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=ATOL_FP32)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=ATOL_FP32)


@needs_triton
def test_empty_query_set(interp):
    q, k, v, bias = _qkv(1, 0, 5, 2, 64)
    out, lse = biased_attention_triton(q, k, v, bias)
    assert out.shape == (1, 0, 2, 64) and lse.shape == (1, 0, 2)


# ------------------------------------------------------------------------------------------------ row subsets
@needs_triton
@pytest.mark.parametrize("d", [64, 128])
def test_row_subset_matches_attention_reference(interp, d):
    q, k, v, _ = _qkv(2, 41, 41, 2, d, seed=11)
    rows = torch.tensor([0, 3, 17, 40])
    out, lse = row_subset_attention_triton(q[:, rows], k, v)
    ref_out, ref_lse = row_subset_attention_reference(q[:, rows], k, v)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=ATOL_FP32)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=ATOL_FP32)


def test_row_subset_rejects_v_shape_mismatch():
    q = torch.randn(1, 2, 1, 16)
    with pytest.raises(ConfigError, match="k.shape"):
        row_subset_attention_triton(q, q, torch.randn(1, 2, 1, 8))


# -------------------------------------------------------------------------------------- tokens-path dispatch
def _tokens_case(b=2, grid=(4, 4, 3), h=2, d=64, seed=0):
    """q/k where whole tokens repeat their t-anchor (so rows and keys really merge) plus a few text tokens."""
    g = torch.Generator().manual_seed(seed)
    t, hh, w = grid
    n = t * hh * w
    q = torch.randn(b, n + 2, h, d, generator=g)
    k = torch.randn(b, n + 2, h, d, generator=g)
    v = torch.randn(b, n + 2, h, d, generator=g)
    vid = torch.arange(n).view(t, hh, w)
    src = vid.clone()
    src[1::2] = vid[0::2][: src[1::2].shape[0]]  # odd frames copy the previous frame
    copy = torch.rand(b, n, generator=g) < 0.6  # ... at 60% of their tokens
    for bi in range(b):
        idx = torch.where(copy[bi], src.flatten(), torch.arange(n)) + 2
        q[bi, 2:] = q[bi, idx]
        k[bi, 2:] = k[bi, idx]
    return q, k, v, grid


class _Spy:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a, **kw):
        self.calls += 1
        return self.fn(*a, **kw)


@needs_triton
@pytest.mark.parametrize("reuse_q,reuse_k", [(True, True), (False, True), (True, False)])
def test_tokens_path_dispatches_to_kernel_and_matches_cpu_path(interp, monkeypatch, reuse_q, reuse_k):
    q, k, v, grid = _tokens_case()
    spy_kernel = _Spy(tokens_mod.biased_attention_triton)
    monkeypatch.setattr(tokens_mod, "biased_attention_triton", spy_kernel)
    kw = dict(grid=grid, thresholds=0.05, text_prefix=2, reuse_q=reuse_q, reuse_k=reuse_k)
    out_torch, st_torch, dec = tokens_timeripple_attention(q, k, v, backend="torch", **kw)
    assert spy_kernel.calls == 0
    spy_sdpa = _Spy(F.scaled_dot_product_attention)
    monkeypatch.setattr(tokens_mod.F, "scaled_dot_product_attention", spy_sdpa)
    out_tri, st_tri, _ = tokens_timeripple_attention(q, k, v, backend="triton", **kw)
    assert spy_kernel.calls == q.shape[0] and spy_sdpa.calls == 0  # one kernel launch per batch item, no SDPA
    assert st_tri.rows_removed == st_torch.rows_removed and st_tri.keys_removed == st_torch.keys_removed
    assert (st_tri.rows_removed > 0.2) == reuse_q and (st_tri.keys_removed > 0.2) == reuse_k  # really removed
    ref = token_dedup_attention_reference(q, k, v, dec.root if reuse_q else None, dec.root if reuse_k else None)
    torch.testing.assert_close(out_tri, ref, rtol=0, atol=ATOL_FP32)
    torch.testing.assert_close(out_tri, out_torch, rtol=0, atol=ATOL_FP32)


@needs_triton
def test_tokens_backend_context_forces_kernel(interp, monkeypatch):
    q, k, v, _ = _tokens_case(b=1)
    root = torch.arange(q.shape[1])[None].clone()
    root[0, 5], root[0, 9] = 4, 4  # tokens 5 and 9 take token 4's q/k: one row group, one merged key of count 3
    spy = _Spy(tokens_mod.biased_attention_triton)
    monkeypatch.setattr(tokens_mod, "biased_attention_triton", spy)
    token_dedup_attention(q, k, v, root, root)  # auto on CPU: the torch path
    assert spy.calls == 0
    with tokens_backend("triton"):
        out, st = token_dedup_attention(q, k, v, root, root)
    assert spy.calls == 1 and st.rows_removed == st.keys_removed == pytest.approx(2 / q.shape[1], abs=1e-12)
    torch.testing.assert_close(out, token_dedup_attention_reference(q, k, v, root, root), rtol=0, atol=ATOL_FP32)
    token_dedup_attention(q, k, v, root, root)  # the context restored "auto"
    assert spy.calls == 1


def test_forced_triton_outside_interpreter_raises_typed_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 8, 2, 16)
    root = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(TritonUnavailableError, match="TRITON_INTERPRET|not installed") as info:
        token_dedup_attention(q, q, q, root, root, backend="triton")
    assert isinstance(info.value, ConfigError)
    with pytest.raises(TritonUnavailableError):
        biased_attention_triton(q, q, q)
    monkeypatch.setattr(tri, "triton_available", lambda: False)  # as on a machine without triton
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(TritonUnavailableError, match="not installed"):
        token_dedup_attention(q, q, q, root, root, backend="triton")
    with pytest.raises(TritonUnavailableError, match="not installed"), tokens_backend("triton"):
        token_dedup_attention(q, q, q, root, root)


def test_auto_backend_resolution(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_tokens_backend("auto", "cpu") == "torch"  # nothing changes on CPU by default
    assert resolve_tokens_backend("torch", "cuda") == "torch"
    assert resolve_tokens_backend("auto", "cuda") == ("triton" if triton_available() else "torch")
    monkeypatch.setattr(tri, "triton_available", lambda: False)
    assert resolve_tokens_backend("auto", "cuda") == "torch"  # falls back (one-time warning), never raises
    with pytest.raises(ConfigError, match="backend"):
        resolve_tokens_backend("flash", "cpu")
    with pytest.raises(ConfigError, match="backend"), tokens_backend("flash"):
        pass


# ------------------------------------------------------------------------------------------------ validation
def _bad_cases():
    q, k, v = torch.randn(1, 4, 2, 16), torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 16)
    return {
        "float64": ((q.double(), k.double(), v.double(), None), {}),  # the reference's job, not the kernel's
        "bias length": ((q, k, v, torch.zeros(1, 3)), {}),
        "bias per head": ((q, k, v, torch.zeros(1, 5, 2)), {}),
        "heads differ": ((q, torch.randn(1, 5, 3, 16), torch.randn(1, 5, 3, 16), None), {}),
        "no keys": ((q, k[:, :0], v[:, :0], None), {}),
        "block not a power of two": ((q, k, v, None), {"block_m": 24}),
        "nan scale": ((q, k, v, None), {"scale": float("nan")}),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_kernel_rejects_bad_inputs(case, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args, kw = _bad_cases()[case]
    with pytest.raises(ConfigError) as info:
        biased_attention_triton(*args, **kw)
    assert not isinstance(info.value, TritonUnavailableError) or not triton_available()


@pytest.mark.slow  # a fresh interpreter imports torch (~3-13 s on a shared machine)
def test_package_imports_and_runs_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, vdit_accel\n"
        "from vdit_accel.ops.timeripple_tokens import tokens_timeripple_attention\n"
        "from vdit_accel.ops.timeripple_triton import triton_available\n"
        "assert not triton_available()\n"
        "q = torch.randn(1, 8, 2, 16)\n"
        "out, st, _ = tokens_timeripple_attention(q, q, q, grid=(2, 2, 2), thresholds=2.0)\n"
        "assert out.shape == q.shape and st.keys_removed == 0.875\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


# --------------------------------------------------------------------------------------- the GPU benchmark
def _gpu_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "timeripple_gpu.py"
    spec = importlib.util.spec_from_file_location("timeripple_gpu_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit on a machine without CUDA")
def test_gpu_benchmark_exits_cleanly_without_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "gpu.json"
    assert _gpu_bench().main(["--out", str(out)]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not out.exists()


@needs_triton  # the whole script in the interpreter at a 2x4x6 grid (~3 s here)
def test_gpu_benchmark_cpu_smoke(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "gpu.json"
    argv = ["--cpu-smoke", "--grid", "2", "4", "6", "--heads", "2", "--head-dim", "64", "--warmup", "0",
            "--repeats", "1", "--configs", "16,16,4,2", "--presets", "timeripple-op1.5x", "--out", str(out)]
    assert _gpu_bench().main(argv) == 0
    res = json.loads(out.read_text())
    assert res["best_config"] == "triton_dense_16x16_w4_s2"
    assert res["errors"]["triton_dense_16x16_w4_s2"]["lse_max_abs_vs_flash"] < 1e-3
    names = [c["name"] for c in res["cases"]]
    assert names == ["timeripple-op1.5x", "timeripple-op1.5x+q"]
    k_only, both = res["cases"]
    assert k_only["rows_removed"] == 0 and k_only["keys_removed"] == pytest.approx(0.39, abs=0.03)
    assert both["rows_removed"] == both["keys_removed"] == k_only["keys_removed"]
    assert k_only["out_rel_l2_triton_vs_torch_path"] < 2e-2  # bfloat16 outputs of two accumulation orders
    for key in ("sdpa_flash", "timeripple-op1.5x:tokens_e2e_triton", "timeripple-op1.5x:tokens_kernel",
                "timeripple-op1.5x+q:tokens_e2e_torch"):
        assert res["timings"][key]["median_ms"] > 0


def test_kernel_rejects_inputs_past_int32_offsets(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    big = torch.empty_strided((1, 2, 1, 16), (0, 2**31, 16, 1), device="meta")  # 2nd row 2**31 elements away
    small = torch.empty(1, 2, 1, 16, device="meta")
    with pytest.raises(ConfigError, match="2\\*\\*31") as info:
        biased_attention_triton(big, small, small)
    assert not isinstance(info.value, TritonUnavailableError)


@needs_triton
@pytest.mark.slow  # one real compile to a Hopper cubin with triton's bundled ptxas (~7-20 s)
@pytest.mark.parametrize("dtype,head_dim", [("bf16", 128)])
def test_kernel_compiles_for_sm90_without_a_gpu(monkeypatch, dtype, head_dim):
    """The GPU code path (not the interpreter's): front end, TTGIR, PTX and cubin for sm_90 with the default blocks."""
    import triton
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in backends:
        pytest.skip("this triton build has no NVIDIA backend")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kern = tri._kernel(False)
    ints = ("sqb", "sqm", "sqh", "skb", "skn", "skh", "svb", "svn", "svh", "sbb", "sbn", "sob", "som", "soh", "slb",
            "slm", "slh", "H", "M", "N", "D", "DV")
    sig = {n: ("*fp32" if n in ("Bias", "Lse") else f"*{dtype}") for n in ("Q", "K", "V", "Bias", "Out", "Lse")}
    sig.update({n: "i32" for n in ints}, qk_scale="fp32")
    bm, bn, warps, stages = tri.default_blocks(head_dim, {"bf16": torch.bfloat16}[dtype])
    const = dict(HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=head_dim, BLOCK_DV=head_dim, PRECISION="tf32",
                 DOT_FP32=False, INTERPRET=False)
    sig.update(dict.fromkeys(const, "constexpr"))
    assert set(sig) == set(kern.arg_names)
    cc = triton.compile(ASTSource(fn=kern, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                        options=dict(num_warps=warps, num_stages=stages))
    assert "wgmma" in cc.asm["ptx"] and len(cc.asm["cubin"]) > 0  # Hopper tensor-core MMAs, and ptxas succeeded
    assert cc.metadata.shared <= 227 * 1024  # fits an H100/H200 SM's shared memory


def test_auto_falls_back_to_sdpa_when_the_kernel_fails(monkeypatch, caplog):
    monkeypatch.setattr(tokens_mod, "_failed", set())
    monkeypatch.setattr(tokens_mod, "_warned", set())
    calls = []

    def broken(*a, **kw):
        calls.append(1)
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setattr(tokens_mod, "biased_attention_triton", broken)
    qb, kb, vb = (torch.randn(6, 2, 16) for _ in range(3))
    bias = torch.tensor([0.0, math.log(2.0), 0.0, 0.0, math.log(3.0), 0.0])
    want = F.scaled_dot_product_attention(qb.transpose(0, 1), kb.transpose(0, 1), vb.transpose(0, 1),
                                          attn_mask=bias.view(1, 1, -1)).transpose(0, 1)
    with caplog.at_level("WARNING"):
        got = tokens_mod._attend_unique(qb, kb, vb, bias, None, True, False)  # "auto" chose Triton
    torch.testing.assert_close(got, want)
    assert len(calls) == 1 and "Triton kernel failed" in caplog.text
    tokens_mod._attend_unique(qb, kb, vb, bias, None, True, False)  # remembered: no second try
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="no kernel image"):  # forced: the error surfaces
        tokens_mod._attend_unique(qb, kb, vb, bias, None, True, True)
