"""Tests of deepep_megatron.routing: a per-token python reference, invariants, and megatron-core."""

from __future__ import annotations

import math

import pytest
import torch

from deepep_megatron.routing import node_limited_topk, random_routing, topk_routing

# ---------------------------------------------------------------------------------------------------
# Independent reference: one token at a time, python floats (float64), explicit sorting.

_TIE = 1e-5  # decisions closer than this are ambiguous between float32 and float64; such tokens are skipped


def _top(values: list[float], k: int, allowed: list[int]) -> tuple[list[int], bool]:
    """Indices of the k largest values among `allowed`, and whether the cut is clear of a near-tie."""
    order = sorted(allowed, key=lambda i: -values[i])
    clear = k >= len(order) or values[order[k - 1]] - values[order[k]] > _TIE
    return order[:k], clear


def _ref_token(
    logits: list[float],
    topk,
    score_function,
    bias,
    num_groups,
    topk_groups,
    scaling,
    normalize,
    group_reduce="sum",
):
    """Returns (set of experts, {expert: weight}) or None when the selection is too close to call."""
    e = len(logits)
    if score_function == "sigmoid":
        scores = [1 / (1 + math.exp(-v)) for v in logits]
        select = [s + (bias[i] if bias is not None else 0.0) for i, s in enumerate(scores)]
    elif normalize:
        scores = select = logits
    else:
        m = max(logits)
        z = sum(math.exp(v - m) for v in logits)
        scores = select = [math.exp(v - m) / z for v in logits]
    allowed = list(range(e))
    clear = True
    if num_groups is not None:
        per = e // num_groups
        gscore = []
        for grp in range(num_groups):
            members = sorted((select[i] for i in range(grp * per, (grp + 1) * per)), reverse=True)
            gscore.append(sum(members[: topk // topk_groups]) if group_reduce == "sum" else members[0])
        groups, clear = _top(gscore, topk_groups, list(range(num_groups)))
        allowed = [i for grp in groups for i in range(grp * per, (grp + 1) * per)]
    chosen, clear2 = _top(select, topk, allowed)
    if not (clear and clear2):
        return None
    if score_function == "sigmoid":
        w = [scores[i] for i in chosen]
        if normalize and topk > 1:
            total = sum(w)
            w = [v / total for v in w]
    elif normalize:
        m = max(logits[i] for i in chosen)
        z = sum(math.exp(logits[i] - m) for i in chosen)
        w = [math.exp(logits[i] - m) / z for i in chosen]
    else:
        w = [scores[i] for i in chosen]
    return set(chosen), {i: v * scaling for i, v in zip(chosen, w)}


def _check_against_reference(logits, idx, weights, topk, **kw):
    bias = kw.get("expert_bias")
    bias = bias.tolist() if bias is not None else None
    checked = 0
    for t in range(logits.shape[0]):
        ref = _ref_token(
            logits[t].double().tolist(),
            topk,
            kw.get("score_function", "sigmoid"),
            bias,
            kw.get("num_groups"),
            kw.get("topk_groups"),
            kw.get("scaling_factor", 1.0),
            kw.get("normalize", True),
        )
        if ref is None:
            continue
        chosen, ref_w = ref
        assert set(idx[t].tolist()) == chosen, f"token {t}"
        for i, w in zip(idx[t].tolist(), weights[t].tolist()):
            assert w == pytest.approx(ref_w[i], rel=1e-5, abs=1e-7), f"token {t} expert {i}"
        checked += 1
    # The skip must stay rare, or the comparison would be vacuous.
    assert checked >= 0.9 * logits.shape[0]


def _check_invariants(idx, weights, num_tokens, num_experts, topk):
    assert idx.dtype == torch.int64 and weights.dtype == torch.float32
    assert idx.shape == weights.shape == (num_tokens, topk)
    assert torch.all((idx >= 0) & (idx < num_experts)), "-1 or out-of-range expert"
    assert torch.all(idx.sort(dim=1).values.diff(dim=1) > 0), "duplicate expert in a row"


def _groups_per_token(idx, experts_per_group):
    return torch.tensor([len(set((row // experts_per_group).tolist())) for row in idx])


CONFIGS = [
    # (num_experts, topk, num_groups, topk_groups)
    (16, 1, None, None),
    (16, 4, None, None),
    (64, 8, None, None),
    (64, 8, 8, 4),  # DeepSeek-V3 shape scaled down: top-2 per group
    (64, 6, 4, 2),  # topk // topk_groups = 3
    (32, 4, 4, 1),  # one group only
    (32, 8, 8, 2),  # topk == every expert of the kept groups
    (24, 5, 3, 3),  # all groups kept; 5 // 3 == 1
]


def _logits(num_tokens, num_experts, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(num_tokens, num_experts, generator=gen) * 2).to(dtype)


def _bias(num_experts, seed):
    return torch.randn(num_experts, generator=torch.Generator().manual_seed(seed + 1)) * 0.3


# ---------------------------------------------------------------------------------------------------
# Reference comparison and invariants.


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize(
    "variant",
    ["sigmoid", "sigmoid_bias", "sigmoid_unnormalized", "sigmoid_scaled", "softmax", "softmax_pre"],
)
def test_matches_reference(config, variant):
    num_experts, topk, num_groups, topk_groups = config
    logits = _logits(200, num_experts, seed=topk * 31 + num_experts)
    kw = {"num_groups": num_groups, "topk_groups": topk_groups}
    if variant.startswith("sigmoid"):
        kw["score_function"] = "sigmoid"
        if variant == "sigmoid_bias":
            kw["expert_bias"] = _bias(num_experts, seed=topk)
        kw["normalize"] = variant != "sigmoid_unnormalized"
        kw["scaling_factor"] = 2.5 if variant == "sigmoid_scaled" else 1.0
    else:
        kw["score_function"] = "softmax"
        kw["normalize"] = variant == "softmax"
    idx, weights = topk_routing(logits, topk, **kw)
    _check_invariants(idx, weights, 200, num_experts, topk)
    _check_against_reference(logits, idx, weights, topk, **kw)
    if num_groups is not None:
        assert _groups_per_token(idx, num_experts // num_groups).max() <= topk_groups
    # Columns are sorted by descending selection score.
    sel = torch.sigmoid(logits) if variant.startswith("sigmoid") else logits
    if "expert_bias" in kw:
        sel = sel + kw["expert_bias"]
    assert torch.all(sel.gather(1, idx).diff(dim=1) <= 0)


def test_bias_affects_selection_only():
    logits = _logits(500, 32, seed=0)
    bias = torch.zeros(32)
    bias[[3, 17]] = 10.0  # far above any sigmoid gap: experts 3 and 17 are always chosen
    bias[5] = -10.0  # and 5 never
    idx, weights = topk_routing(logits, 4, expert_bias=bias, normalize=False)
    assert torch.all((idx == 3).any(1) & (idx == 17).any(1))
    assert not torch.any(idx == 5)
    # Weights are the unbiased sigmoid scores of the chosen experts.
    assert torch.equal(weights, torch.sigmoid(logits).gather(1, idx))
    # And the bias did change the selection (so this test can tell).
    plain_idx, _ = topk_routing(logits, 4, normalize=False)
    assert not torch.equal(plain_idx.sort(1).values, idx.sort(1).values)


def test_bias_steers_group_choice():
    # Group scores use biased scores: a bias on one group's experts makes that group always kept.
    logits = _logits(300, 32, seed=4)
    bias = torch.zeros(32)
    bias[8:16] = 5.0  # group 1 of 4
    idx, _ = topk_routing(logits, 4, expert_bias=bias, num_groups=4, topk_groups=2)
    assert torch.all(((idx >= 8) & (idx < 16)).any(1))


def test_group_limitation_is_binding():
    # Without the limit, many tokens would spread over more groups: the group check can fail.
    logits = _logits(400, 64, seed=9)
    plain_idx, _ = topk_routing(logits, 8)
    assert _groups_per_token(plain_idx, 8).max() > 4
    idx, _ = topk_routing(logits, 8, num_groups=8, topk_groups=4)
    assert _groups_per_token(idx, 8).max() <= 4
    nl_idx, nl_w = node_limited_topk(logits, 8, num_nodes=4, max_nodes_per_token=2)
    assert _groups_per_token(nl_idx, 16).max() <= 2
    ref_idx, ref_w = topk_routing(logits, 8, num_groups=4, topk_groups=2)
    assert torch.equal(nl_idx, ref_idx) and torch.equal(nl_w, ref_w)


@pytest.mark.parametrize("scaling_factor", [1.0, 2.5])
def test_normalization_and_scaling(scaling_factor):
    logits = _logits(100, 32, seed=2)
    sig = torch.sigmoid(logits)
    for fn in ("sigmoid", "softmax"):
        _, w = topk_routing(logits, 6, score_function=fn, scaling_factor=scaling_factor)
        torch.testing.assert_close(w.sum(1), torch.full((100,), scaling_factor), rtol=1e-6, atol=0)
    idx, w = topk_routing(logits, 6, normalize=False, scaling_factor=scaling_factor)
    torch.testing.assert_close(w, sig.gather(1, idx) * scaling_factor, rtol=1e-6, atol=0)
    assert torch.all(w.sum(1) != scaling_factor)
    idx, w = topk_routing(logits, 6, score_function="softmax", normalize=False, scaling_factor=scaling_factor)
    torch.testing.assert_close(
        w, torch.softmax(logits, -1).gather(1, idx) * scaling_factor, rtol=1e-6, atol=0
    )
    assert torch.all(w.sum(1) < scaling_factor)
    # top-1 sigmoid is not renormalised (it would always be 1); top-1 softmax-after-top-k is exactly 1.
    idx, w = topk_routing(logits, 1, scaling_factor=scaling_factor)
    torch.testing.assert_close(w, sig.gather(1, idx) * scaling_factor, rtol=1e-6, atol=0)
    _, w = topk_routing(logits, 1, score_function="softmax", scaling_factor=scaling_factor)
    assert torch.all(w == scaling_factor)


def test_bf16_logits_and_empty():
    logits = _logits(50, 32, seed=3, dtype=torch.bfloat16)
    idx, w = topk_routing(logits, 4, num_groups=4, topk_groups=2)
    ref_idx, ref_w = topk_routing(logits.float(), 4, num_groups=4, topk_groups=2)
    assert torch.equal(idx, ref_idx) and torch.equal(w, ref_w) and w.dtype == torch.float32
    for kw in ({}, {"num_groups": 4, "topk_groups": 2}, {"score_function": "softmax"}):
        idx, w = topk_routing(torch.empty(0, 32), 4, **kw)
        _check_invariants(idx, w, 0, 32, 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"topk": 0}, "topk"),
        ({"topk": 33}, "topk"),
        ({"score_function": "relu"}, "score_function"),
        ({"num_groups": 4}, "together"),
        ({"topk_groups": 2}, "together"),
        ({"num_groups": 5, "topk_groups": 2}, "divide"),
        ({"num_groups": 4, "topk_groups": 5}, "topk_groups"),
        ({"num_groups": 4, "topk_groups": 3, "topk": 2}, "topk"),  # fewer experts than groups
        ({"num_groups": 8, "topk_groups": 2, "topk": 9}, "topk"),  # more than 2 groups of 4 hold
        ({"score_function": "softmax", "expert_bias": torch.zeros(32)}, "expert_bias"),
        ({"expert_bias": torch.zeros(31)}, "expert_bias"),
        ({"scaling_factor": 0.0}, "scaling_factor"),
    ],
)
def test_argument_checks(kwargs, match):
    kwargs = {"topk": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        topk_routing(torch.zeros(3, 32), **kwargs)


def test_rejects_non_2d_or_integer_logits():
    with pytest.raises(ValueError):
        topk_routing(torch.zeros(32), 2)
    with pytest.raises(ValueError):
        topk_routing(torch.zeros(3, 32, dtype=torch.int64), 2)


# ---------------------------------------------------------------------------------------------------
# Benchmark routing.


@pytest.mark.parametrize("groups", [(None, None), (8, 4), (4, 1)])
def test_random_routing(groups):
    num_groups, topk_groups = groups
    idx, w = random_routing(
        300, 64, 8, num_groups=num_groups, topk_groups=topk_groups, generator=torch.Generator().manual_seed(5)
    )
    _check_invariants(idx, w, 300, 64, 8)
    assert torch.all(w > 0)
    # Reproducible from the generator; a different seed routes differently.
    idx2, w2 = random_routing(
        300, 64, 8, num_groups=num_groups, topk_groups=topk_groups, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(idx, idx2) and torch.equal(w, w2)
    idx3, _ = random_routing(
        300, 64, 8, num_groups=num_groups, topk_groups=topk_groups, generator=torch.Generator().manual_seed(6)
    )
    assert not torch.equal(idx, idx3)
    # The scores are the generator's first draw: |randn| + 1. Check the selection against the
    # reference, with DeepEP's group score (max over the group).
    scores = torch.randn(300, 64, generator=torch.Generator().manual_seed(5)).abs() + 1
    for t in range(300):
        ref = _ref_token(
            scores[t].double().tolist(),
            8,
            "softmax",
            None,
            num_groups,
            topk_groups,
            1.0,
            True,
            group_reduce="max",
        )
        if ref is not None:
            assert set(idx[t].tolist()) == ref[0]
    if num_groups is not None:
        assert _groups_per_token(idx, 64 // num_groups).max() <= topk_groups
    # Routing covers all experts roughly uniformly without groups (sanity, not a statistics test).
    if num_groups is None:
        assert torch.bincount(idx.flatten(), minlength=64).min() > 0


def test_random_routing_empty_and_checks():
    idx, w = random_routing(0, 16, 2)
    _check_invariants(idx, w, 0, 16, 2)
    with pytest.raises(ValueError):
        random_routing(4, 16, 17)
    with pytest.raises(ValueError):
        random_routing(4, 16, 2, num_groups=3, topk_groups=1)


# ---------------------------------------------------------------------------------------------------
# megatron-core 0.19's topk_routing_with_score_function.


def _megatron_topk():
    moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    return moe_utils.topk_routing_with_score_function


def _megatron_kwargs(kw):
    return {
        "use_pre_softmax": not kw.get("normalize", True),
        "num_groups": kw.get("num_groups"),
        "group_topk": kw.get("topk_groups"),
        "scaling_factor": kw.get("scaling_factor"),
        "score_function": kw.get("score_function", "sigmoid"),
        "expert_bias": kw.get("expert_bias"),
        "dense_output": True,
    }


@pytest.mark.megatron
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("variant", ["sigmoid", "sigmoid_bias_scaled", "softmax", "softmax_pre_scaled"])
def test_matches_megatron(config, variant):
    mg_topk = _megatron_topk()
    num_experts, topk, num_groups, topk_groups = config
    logits = _logits(256, num_experts, seed=num_experts + topk)
    kw = {"num_groups": num_groups, "topk_groups": topk_groups}
    kw["score_function"] = variant.split("_")[0]
    kw["normalize"] = "pre" not in variant
    if "bias" in variant:
        kw["expert_bias"] = _bias(num_experts, seed=7)
    if "scaled" in variant:
        kw["scaling_factor"] = 2.5
    idx, w = topk_routing(logits, topk, **kw)
    # With grad mode on, megatron sorts its top-k, so columns come in the same order and the
    # normalising sums see the same operands in the same order: bit-identical results.
    with torch.enable_grad():
        mg_w, mg_idx = mg_topk(logits, topk, **_megatron_kwargs(kw))
    assert torch.equal(idx, mg_idx)
    assert torch.equal(w, mg_w)
    # In inference mode megatron may return columns unsorted: the same routing up to column order.
    with torch.no_grad():
        mg_w, mg_idx = mg_topk(logits, topk, **_megatron_kwargs(kw))
    order, mg_order = idx.argsort(1), mg_idx.argsort(1)
    assert torch.equal(idx.gather(1, order), mg_idx.gather(1, mg_order))
    torch.testing.assert_close(w.gather(1, order), mg_w.gather(1, mg_order), rtol=1e-6, atol=0)


@pytest.mark.megatron
def test_matches_megatron_bf16_sigmoid():
    # megatron returns weights in the logits' dtype; ours stay float32 and round to the same bf16.
    mg_topk = _megatron_topk()
    logits = _logits(256, 64, seed=1, dtype=torch.bfloat16)
    bias = _bias(64, seed=1)
    kw = {"num_groups": 8, "topk_groups": 4, "expert_bias": bias, "scaling_factor": 2.5}
    idx, w = topk_routing(logits, 8, **kw)
    with torch.enable_grad():
        mg_w, mg_idx = mg_topk(logits, 8, **_megatron_kwargs(kw))
    assert mg_w.dtype == torch.bfloat16
    assert torch.equal(idx, mg_idx)
    assert torch.equal(w.to(torch.bfloat16), mg_w)


@pytest.mark.megatron
def test_matches_megatron_tiny_sigmoid_scores():
    # sigmoid(-60) ~ 1e-26: megatron's "+ 1e-20" in the normaliser then dominates, and so must ours.
    mg_topk = _megatron_topk()
    logits = _logits(64, 32, seed=8) - 60
    idx, w = topk_routing(logits, 4)
    with torch.enable_grad():
        mg_w, mg_idx = mg_topk(logits, 4, **_megatron_kwargs({}))
    assert torch.equal(idx, mg_idx) and torch.equal(w, mg_w)
    assert torch.all(w.sum(1) < 0.1)  # not normalised to 1
