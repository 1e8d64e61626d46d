"""Top-k routing: DeepSeek-V3 gating (matching megatron-core) and DeepEP-style benchmark routing.

Experts are numbered so that a contiguous run of ``num_experts / num_groups`` experts forms a group.
With DeepEP's layout (expert ``e`` lives on rank ``e // experts_per_rank``, a node is a run of
consecutive ranks) the experts of one node are such a run, so node-limited routing is group-limited
routing with one group per node (:func:`node_limited_topk`).

Every function returns ``topk_idx`` ``[num_tokens, topk]`` int64 (never -1) and ``topk_weights``
``[num_tokens, topk]`` float32, the inputs of ``Buffer.get_dispatch_layout`` / ``Buffer.dispatch``.
"""

from __future__ import annotations

import torch

__all__ = ["topk_routing", "node_limited_topk", "random_routing"]

_SCORE_FUNCTIONS = ("sigmoid", "softmax")


def _check_groups(num_experts: int, topk: int, num_groups: int | None, topk_groups: int | None) -> bool:
    """Validate the group-limiting arguments; return whether group limiting is on."""
    if not 1 <= topk <= num_experts:
        raise ValueError(f"topk must be in [1, num_experts={num_experts}], got {topk}")
    if num_groups is None and topk_groups is None:
        return False
    if num_groups is None or topk_groups is None:
        raise ValueError("num_groups and topk_groups must be given together")
    if num_groups < 1 or num_experts % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} must be positive and divide num_experts={num_experts}")
    if not 1 <= topk_groups <= num_groups:
        raise ValueError(f"topk_groups must be in [1, num_groups={num_groups}], got {topk_groups}")
    # Fewer experts than groups would rank groups by an empty sum; more than the kept groups hold
    # would have to pick masked experts.
    if not topk_groups <= topk <= topk_groups * (num_experts // num_groups):
        raise ValueError(
            f"topk={topk} must be in [topk_groups, topk_groups * experts_per_group] = "
            f"[{topk_groups}, {topk_groups * (num_experts // num_groups)}]"
        )
    return True


def _keep_groups_mask(group_scores: torch.Tensor, topk_groups: int, experts_per_group: int) -> torch.Tensor:
    """``[T, G]`` group scores -> ``[T, G * experts_per_group]`` bool mask of the best groups' experts."""
    best = group_scores.topk(topk_groups, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return keep.repeat_interleave(experts_per_group, dim=1)


def _select(scores: torch.Tensor, topk: int, num_groups: int | None, topk_groups: int | None) -> torch.Tensor:
    """Top-k expert ids by ``scores`` [T, E], optionally group-limited (DeepSeek-V3 group score)."""
    if num_groups is not None:
        t, e = scores.shape
        per_group = e // num_groups
        # A group's score is the sum of its best topk // topk_groups experts (sorted, so the sum's
        # order, hence its rounding, is fixed).
        group_scores = scores.view(t, num_groups, per_group).topk(topk // topk_groups, dim=-1).values.sum(-1)
        keep = _keep_groups_mask(group_scores, topk_groups, per_group)
        # _check_groups guarantees topk <= kept experts, so no masked expert can be picked.
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.topk(topk, dim=-1).indices


def topk_routing(
    logits: torch.Tensor,
    topk: int,
    *,
    score_function: str = "sigmoid",
    expert_bias: torch.Tensor | None = None,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    scaling_factor: float | None = 1.0,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 top-k gating, with megatron-core's semantics.

    Gives the same experts and weights as megatron-core 0.19's
    ``topk_routing_with_score_function(logits, topk, use_pre_softmax=not normalize, num_groups,
    group_topk=topk_groups, scaling_factor, score_function, expert_bias, dense_output=True)`` (up to
    the order of the k columns, which is ours descending by selection score, and the dtype: our
    weights stay float32 while megatron casts them to ``logits.dtype``).

    ``score_function="sigmoid"`` (DeepSeek-V3):
        ``scores = sigmoid(logits)``; experts are selected by ``scores + expert_bias`` (the bias
        affects selection only); weights are the unbiased ``scores`` of the selected experts, divided
        by their sum (``+ 1e-20``) when ``normalize`` and ``topk > 1``.
    ``score_function="softmax"``:
        ``normalize=True`` (megatron's default ``use_pre_softmax=False``): select by the logits,
        weights are the softmax over the k selected logits (they sum to 1).
        ``normalize=False`` (``use_pre_softmax=True``): weights are the softmax over all experts at the
        selected experts, selected by that softmax (not renormalised).
        ``expert_bias`` is not supported (megatron-core silently ignores it here).

    Group-limited selection (``num_groups`` and ``topk_groups``): the experts form ``num_groups``
    contiguous groups; a group's score is the sum of its top ``topk // topk_groups`` selection scores
    (biased scores for sigmoid; logits or full softmax for softmax); only the best ``topk_groups``
    groups stay eligible, and the top-k is taken among their experts.

    Finally the weights are multiplied by ``scaling_factor`` (``None`` means 1).

    Args:
        logits: ``[num_tokens, num_experts]`` float (any float dtype; scores are computed in float32).
            Finite values. For bf16 logits with softmax and groups, megatron ranks groups by bf16 sums
            of logits, so its group choice can differ from ours where that rounding reorders groups.
        topk: experts per token, ``1 <= topk <= num_experts``.
        score_function: ``"sigmoid"`` or ``"softmax"``.
        expert_bias: ``[num_experts]`` float32 load-balancing bias (sigmoid only).
        num_groups: number of expert groups; must divide ``num_experts``.
        topk_groups: groups kept per token, ``topk_groups <= topk <= topk_groups * experts_per_group``.
        scaling_factor: multiplier of the weights (DeepSeek-V3 uses 2.5), positive.
        normalize: see above.

    Returns:
        ``(topk_idx [num_tokens, topk] int64, topk_weights [num_tokens, topk] float32)``; ``topk_idx``
        has distinct, valid expert ids (never -1), sorted by descending selection score.
    """
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a 2-D float tensor [num_tokens, num_experts], got {logits.dtype} "
            f"{tuple(logits.shape)}"
        )
    num_experts = logits.shape[1]
    if score_function not in _SCORE_FUNCTIONS:
        raise ValueError(f"score_function must be one of {_SCORE_FUNCTIONS}, got {score_function!r}")
    grouped = _check_groups(num_experts, topk, num_groups, topk_groups)
    if not grouped:
        num_groups = topk_groups = None
    if scaling_factor is None:
        scaling_factor = 1.0
    if not scaling_factor > 0:
        raise ValueError(f"scaling_factor must be positive, got {scaling_factor}")
    if expert_bias is not None:
        if score_function != "sigmoid":
            raise ValueError("expert_bias is only supported with score_function='sigmoid'")
        if tuple(expert_bias.shape) != (num_experts,):
            raise ValueError(f"expert_bias must be [{num_experts}], got {tuple(expert_bias.shape)}")

    logits = logits.float()
    if score_function == "sigmoid":
        scores = torch.sigmoid(logits)
        selection = scores if expert_bias is None else scores + expert_bias.float()
        topk_idx = _select(selection, topk, num_groups, topk_groups)
        weights = scores.gather(1, topk_idx)
        if normalize and topk > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    elif normalize:
        topk_idx = _select(logits, topk, num_groups, topk_groups)
        weights = torch.softmax(logits.gather(1, topk_idx), dim=-1)
    else:
        probs = torch.softmax(logits, dim=-1)
        topk_idx = _select(probs, topk, num_groups, topk_groups)
        weights = probs.gather(1, topk_idx)
    if scaling_factor != 1.0:
        weights = weights * scaling_factor
    return topk_idx, weights


def node_limited_topk(
    logits: torch.Tensor,
    topk: int,
    *,
    num_nodes: int,
    max_nodes_per_token: int,
    score_function: str = "sigmoid",
    expert_bias: torch.Tensor | None = None,
    scaling_factor: float | None = 1.0,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Node-limited routing (DeepSeek-V3): each token's experts lie on at most ``max_nodes_per_token`` nodes.

    The experts of node ``n`` are ``[n * E / num_nodes, (n + 1) * E / num_nodes)`` (DeepEP's
    rank-major expert layout), so this is :func:`topk_routing` with ``num_groups=num_nodes`` and
    ``topk_groups=max_nodes_per_token``. A token then crosses the network once per selected node.

    Returns:
        ``(topk_idx [num_tokens, topk] int64, topk_weights [num_tokens, topk] float32)``.
    """
    return topk_routing(
        logits,
        topk,
        score_function=score_function,
        expert_bias=expert_bias,
        num_groups=num_nodes,
        topk_groups=max_nodes_per_token,
        scaling_factor=scaling_factor,
        normalize=normalize,
    )


def random_routing(
    num_tokens: int,
    num_experts: int,
    topk: int,
    *,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random routing for benchmarks, following DeepEP's test convention.

    Scores are ``|randn| + 1`` per (token, expert). Without groups, each token takes its top-k experts.
    With ``num_groups`` / ``topk_groups``, a group's score is the *max* score of its experts (DeepEP's
    convention, not DeepSeek-V3's sum), the best ``topk_groups`` groups are kept, and the top-k is
    taken among their experts. Weights are ``|randn|`` (positive float32; their values matter only
    for checking combine). The scores are drawn first, then the weights, so a run can be reproduced
    from the generator's seed.

    Args:
        num_tokens, num_experts, topk: sizes; ``1 <= topk <= num_experts``.
        num_groups, topk_groups: optional group limiting (see :func:`topk_routing` for the
            constraints).
        generator: random source (its device must match ``device``); default torch's global one.
        device: where to create the tensors; default the generator's device, else CPU.

    Returns:
        ``(topk_idx [num_tokens, topk] int64, topk_weights [num_tokens, topk] float32)``.
    """
    grouped = _check_groups(num_experts, topk, num_groups, topk_groups)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    scores = torch.randn((num_tokens, num_experts), generator=generator, device=device).abs() + 1
    if grouped:
        per_group = num_experts // num_groups
        group_scores = scores.view(num_tokens, num_groups, per_group).amax(dim=-1)
        # Scores are >= 1, so zeroing the other groups' experts excludes them.
        scores = scores * _keep_groups_mask(group_scores, topk_groups, per_group)
    topk_idx = scores.topk(topk, dim=-1).indices
    topk_weights = torch.randn((num_tokens, topk), generator=generator, device=device).abs()
    return topk_idx, topk_weights
