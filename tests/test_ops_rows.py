"""Row gathers and scatters (``ops/rows.py``) against their ``torch.gather`` / ``scatter_`` twins."""

import pytest
import torch

from vdit_accel.errors import ConfigError
from vdit_accel.ops.rows import gather_rows, gather_rows_reference, scatter_rows_, scatter_rows_reference_


def _idx(b: int, n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(b)])


@pytest.mark.parametrize("shape", [(1, 9, 4), (3, 9, 4), (3, 9, 2, 5), (3, 9)])
@pytest.mark.parametrize("k", [0, 1, 4, 9])
def test_gather_rows_matches_torch_gather(shape, k):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(k))
    idx = _idx(shape[0], shape[1], k, seed=k)
    out = gather_rows(x, idx)
    assert torch.equal(out, gather_rows_reference(x, idx)) and out.shape == (shape[0], k, *shape[2:])
    assert out.is_contiguous()


def test_gather_rows_broadcasts_one_source_over_the_batch_and_takes_strided_inputs():
    table = torch.randn(1, 9, 1, 6)  # a rotary table: [1, S, 1, D]
    idx = _idx(3, 9, 4, seed=1)
    assert torch.equal(gather_rows(table, idx), gather_rows_reference(table, idx))
    assert torch.equal(gather_rows(table, idx)[1], table[0, idx[1]])
    strided = torch.randn(3, 4, 9).transpose(1, 2)  # [3, 9, 4], not contiguous: the twin runs
    assert torch.equal(gather_rows(strided, idx), gather_rows_reference(strided, idx))


@pytest.mark.parametrize("shape", [(1, 9, 4), (3, 9, 4), (2, 9, 2, 3), (3, 9)])
def test_scatter_rows_matches_scatter_and_writes_in_place(shape):
    g = torch.Generator().manual_seed(2)
    dst, idx = torch.randn(shape, generator=g), _idx(shape[0], shape[1], 5, seed=3)
    rows = torch.randn((shape[0], 5, *shape[2:]), generator=g, dtype=torch.float64)  # cast to dst's dtype
    ref = scatter_rows_reference_(dst.clone(), idx, rows)
    ptr = dst.data_ptr()
    out = scatter_rows_(dst, idx, rows)
    assert out is dst and dst.data_ptr() == ptr and torch.equal(dst, ref) and dst.dtype == torch.float32
    strided = torch.randn(shape[0], *shape[2:], shape[1]).movedim(-1, 1)  # not contiguous: the twin runs
    assert torch.equal(scatter_rows_(strided.clone(), idx, rows), scatter_rows_reference_(strided.clone(), idx, rows))


def test_bad_rows_inputs_raise_naming_the_shapes():
    with pytest.raises(ConfigError, match=r"idx.shape=\(2, 3\)"):
        gather_rows(torch.zeros(3, 5, 2), torch.zeros(2, 3, dtype=torch.long))  # batch 3 vs 2
    with pytest.raises(ConfigError, match="torch.long"):
        gather_rows(torch.zeros(1, 5, 2), torch.zeros(1, 3, dtype=torch.int32))
    with pytest.raises(ConfigError, match=r"rows.shape=\(1, 2, 2\)"):
        scatter_rows_(torch.zeros(1, 5, 2), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 2, 2))
