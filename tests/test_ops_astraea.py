"""Astraea token-selection math: hand-computed oracles, the staleness refresh, reference twins, bad inputs."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

from vdit_accel.errors import ConfigError
from vdit_accel.ops import astraea as astraea_mod
from vdit_accel.ops.astraea import (
    LSE_REDUCTIONS,
    MAX_SKIP_EXPONENT,
    NORMS,
    SIGNAL_NORMALISATIONS,
    budget_to_count,
    input_delta,
    reduce_head_lse,
    select_topk,
    select_topk_reference,
    token_scores,
    token_scores_reference,
    update_skips,
)


# ------------------------------------------------------------------------------------------------ input_delta
def test_input_delta_hand_computed():
    x_prev = torch.tensor([[[1.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])  # [B=1, N=2, C=4]
    x = x_prev + torch.tensor([[[1.0, -1.0, 3.0, -3.0], [0.0, 0.0, 0.0, 2.0]]])
    torch.testing.assert_close(input_delta(x, x_prev, "l1"), torch.tensor([[2.0, 0.5]]))
    torch.testing.assert_close(input_delta(x, x_prev, "l2"), torch.tensor([[math.sqrt(5.0), 1.0]]))
    # ||dx|| = sqrt(20), ||x_prev|| = 3; the second token has ||x_prev|| = 0 -> 2 / eps.
    rel = input_delta(x, x_prev, "rel_l2", eps=1e-3)
    torch.testing.assert_close(rel, torch.tensor([[math.sqrt(20.0) / 3.001, 2.0 / 1e-3]]))
    assert input_delta(x, x, "l2").abs().max().item() == 0.0


def test_input_delta_dtype_and_default():
    x, x_prev = torch.randn(2, 3, 5, dtype=torch.bfloat16), torch.randn(2, 3, 5, dtype=torch.bfloat16)
    out = input_delta(x, x_prev)
    assert out.shape == (2, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out, input_delta(x, x_prev, "l2"))
    assert input_delta(x.double(), x_prev.double()).dtype == torch.float64


# ------------------------------------------------------------------------------------------------ reduce_head_lse
def test_reduce_head_lse_hand_computed():
    lse = torch.tensor([[[1.0, 3.0], [0.0, 0.0]]])  # [B=1, N=2, H=2]
    assert reduce_head_lse(lse).tolist() == [[2.0, 0.0]]
    assert reduce_head_lse(lse, "max").tolist() == [[3.0, 0.0]]
    torch.testing.assert_close(
        reduce_head_lse(lse, "logsumexp"), torch.tensor([[math.log(math.e + math.e**3), math.log(2.0)]])
    )


# ------------------------------------------------------------------------------------------------ token_scores
def test_token_scores_hand_computed_normalisations():
    lse = torch.tensor([[2.0, 2.0, -1.0, 4.0]])
    delta = torch.tensor([[1.0, 0.5, 2.0, 0.0]])
    skips = torch.tensor([[0, 1, 0, 2]])
    sig = [2.0, 1.0, -2.0, 0.0]  # lse * delta; mean |sig| = 1.25, max |sig| = 2
    pen = [0.5 * math.exp(n) for n in (0, 1, 0, 2)]
    expected = {
        "mean": [s / 1.25 + p for s, p in zip(sig, pen)],
        "max": [s / 2.0 + p for s, p in zip(sig, pen)],
        "none": [s + p for s, p in zip(sig, pen)],
    }
    for how in SIGNAL_NORMALISATIONS:
        got = token_scores(lse, delta, skips, normalize=how)
        torch.testing.assert_close(got, torch.tensor([expected[how]]))
    torch.testing.assert_close(
        token_scores(lse, delta, skips, w_alpha=2.0, w_beta=0.0, normalize="none"), torch.tensor([[4.0, 2, -4, 0]])
    )


def test_token_scores_all_zero_signal_is_penalty_only():
    skips = torch.tensor([[0, 3]])
    for how in SIGNAL_NORMALISATIONS:
        got = token_scores(torch.ones(1, 2), torch.zeros(1, 2), skips, normalize=how)
        torch.testing.assert_close(got, torch.tensor([[0.5, 0.5 * math.exp(3)]]))


def test_token_scores_saturate_instead_of_overflowing():
    got = token_scores(torch.ones(1, 2), torch.ones(1, 2), torch.tensor([[10_000, MAX_SKIP_EXPONENT]]))
    assert torch.isfinite(got).all() and got[0, 0] == got[0, 1]


@pytest.mark.parametrize("how", SIGNAL_NORMALISATIONS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_scores_match_reference(how, seed):
    gen = torch.Generator().manual_seed(seed)
    lse = torch.randn(3, 17, generator=gen) * 3 + 2
    delta = torch.rand(3, 17, generator=gen)
    skips = torch.randint(0, 6, (3, 17), generator=gen)
    kw = {"w_alpha": 1.3, "w_beta": 0.4, "normalize": how}
    torch.testing.assert_close(token_scores(lse, delta, skips, **kw), token_scores_reference(lse, delta, skips, **kw))


# ------------------------------------------------------------------------------------------------ select_topk
def test_select_topk_hand_made_with_ties():
    scores = torch.tensor([[0.5, 2.0, 0.5, 2.0, 1.0, 2.0], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]])
    assert select_topk(scores, 2).tolist() == [[1, 3], [0, 1]]  # the third 2.0 (index 5) loses the tie
    assert select_topk(scores, 4).tolist() == [[1, 3, 4, 5], [0, 1, 2, 3]]
    assert select_topk(scores, 5).tolist() == [[0, 1, 3, 4, 5], [0, 1, 2, 3, 4]]  # 0.5 tie: index 0 beats 2
    assert select_topk(scores, 0).shape == (2, 0)
    assert select_topk(scores, 6).tolist() == [list(range(6))] * 2
    assert select_topk(scores, 3).dtype == torch.long


def test_select_topk_nan_ranks_first_and_inf_last():
    scores = torch.tensor([[1.0, float("nan"), -float("inf"), 5.0]])
    assert select_topk(scores, 2).tolist() == [[1, 3]]
    assert select_topk_reference(scores, 2).tolist() == [[1, 3]]
    assert select_topk(scores, 3).tolist() == [[0, 1, 3]]


@pytest.mark.parametrize("seed", range(5))
def test_select_topk_matches_reference_with_many_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (3, 23), generator=gen).float()  # few distinct values: ties everywhere
    for k in (0, 1, 7, 22, 23):
        assert torch.equal(select_topk(scores, k), select_topk_reference(scores, k))


def test_update_skips():
    skips = torch.tensor([[0, 4, 1], [2, 2, 2]])
    assert update_skips(skips, torch.tensor([[1], [0]])).tolist() == [[1, 0, 2], [0, 3, 3]]
    assert update_skips(skips, torch.zeros(2, 0, dtype=torch.long)).tolist() == [[1, 5, 2], [3, 3, 3]]


# ------------------------------------------------------------------------------------------------ staleness refresh
def _max_staleness(lse, delta, k, steps, **kw) -> tuple[int, set[int]]:
    """Run the selection loop with fixed signals; return the longest gap between selections and the never-selected."""
    n = lse.shape[1]
    skips = torch.zeros(1, n, dtype=torch.long)
    last, gap = [-1] * n, 0
    for t in range(steps):
        idx = select_topk(token_scores(lse, delta, skips, **kw), k)
        skips = update_skips(skips, idx)
        for i in idx[0].tolist():
            gap, last[i] = max(gap, t - last[i]), t
    gap = max([gap] + [steps - 1 - t for t in last])
    return gap, {i for i in range(n) if last[i] < 0}


@pytest.mark.parametrize("normalize", SIGNAL_NORMALISATIONS)
@pytest.mark.parametrize(("n", "k"), [(12, 1), (12, 2), (16, 3), (32, 4)])
def test_staleness_penalty_forces_every_token_to_refresh(normalize, n, k):
    gen = torch.Generator().manual_seed(n + k)
    lse = torch.rand(1, n, generator=gen) * 5 + 1
    delta = torch.rand(1, n, generator=gen) ** 4 * 3
    delta[0, 0] = 1e-6  # a token with a tiny signal: the literal LSE·Δ ranking would never pick it
    w_alpha, w_beta = 1.0, 0.5
    sig = lse * delta
    m = {"mean": (sig / sig.abs().mean()).abs().max().item(), "max": 1.0, "none": sig.abs().max().item()}[normalize]
    bound = math.ceil(n / k) + math.ceil(math.log(1 + 2 * w_alpha * m / w_beta)) + 1  # documented bound, in steps
    gap, never = _max_staleness(lse, delta, k, steps=4 * bound, w_alpha=w_alpha, w_beta=w_beta, normalize=normalize)
    assert not never and gap <= bound
    # Without the penalty the tiny-signal token starves.
    _, never = _max_staleness(lse, delta, k, steps=4 * bound, w_alpha=w_alpha, w_beta=0.0, normalize=normalize)
    assert 0 in never


# ------------------------------------------------------------------------------------------------ budget_to_count
def test_budget_to_count_rounds_half_up_and_clamps():
    assert [budget_to_count(b, 10) for b in (0.0, 0.04, 0.05, 0.15, 0.35, 0.45, 0.7, 1.0)] == [0, 0, 1, 2, 4, 5, 7, 10]
    assert budget_to_count(0.5, 3) == 2 and budget_to_count(0.5, 1) == 1 and budget_to_count(0.3, 0) == 0
    assert budget_to_count(0.05, 50) == 3 and budget_to_count(1, 7) == 7


# ------------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("budget", [1.5, -0.1, float("nan"), True, "0.5"])
def test_budget_out_of_range_raises(budget):
    with pytest.raises(ConfigError, match=r"budget=.* is out of range: accepted \[0, 1\]"):
        budget_to_count(budget, 10)
    with pytest.raises(ConfigError, match=r"n=-1 is out of range"):
        budget_to_count(0.5, -1)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"w_alpha": -1.0}, "w_alpha=-1.0"),
        ({"w_beta": -0.5}, "w_beta=-0.5"),
        ({"w_beta": float("inf")}, "w_beta=inf"),
        ({"w_alpha": None}, "w_alpha=None"),
    ],
)
@pytest.mark.parametrize("fn", [token_scores, token_scores_reference])
def test_negative_weights_raise(fn, kw, match):
    with pytest.raises(ConfigError, match=match + r" is out of range: accepted \[0.0, inf\)"):
        fn(torch.ones(1, 3), torch.ones(1, 3), torch.zeros(1, 3, dtype=torch.long), **kw)


def test_unknown_names_list_the_accepted_ones():
    x = torch.zeros(1, 2, 3)
    with pytest.raises(ConfigError, match=r"norm='l3' is not accepted: choose one of \['l1', 'l2', 'rel_l2'\]"):
        input_delta(x, x, "l3")
    with pytest.raises(ConfigError, match=r"how='sum' is not accepted: choose one of \['mean', 'max', 'logsumexp'\]"):
        reduce_head_lse(x, "sum")
    with pytest.raises(ConfigError, match=r"normalize='l2' is not accepted: choose one of \['mean', 'max', 'none'\]"):
        token_scores(torch.ones(1, 2), torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.long), normalize="l2")
    assert NORMS == ("l1", "l2", "rel_l2") and LSE_REDUCTIONS == ("mean", "max", "logsumexp")


def test_bad_shapes_and_k_raise():
    with pytest.raises(ConfigError, match=r"k=4 is out of range: accepted an int in \[0, 3\]"):
        select_topk(torch.zeros(1, 3), 4)
    with pytest.raises(ConfigError, match=r"k=-1 is out of range"):
        select_topk_reference(torch.zeros(1, 3), -1)
    with pytest.raises(ConfigError, match="expected one shape"):
        input_delta(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))
    with pytest.raises(ConfigError, match="expected one shape"):
        token_scores(torch.ones(1, 2), torch.ones(1, 3), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"skips.dtype=torch.float32 is not accepted"):
        token_scores(torch.ones(1, 2), torch.ones(1, 2), torch.zeros(1, 2))


def test_docstring_examples():
    result = doctest.testmod(astraea_mod, extraglobs={"torch": torch})
    assert result.attempted >= 9 and result.failed == 0
