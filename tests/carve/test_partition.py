"""The exact pieces of the carve: balanced assignment, k-means stopping, the down-projection refit."""

import importlib
from functools import partial
from itertools import pairwise

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

partition = importlib.import_module("moecarve.carve.partition")
layer = importlib.import_module("moecarve.carve.layer")
router = importlib.import_module("moecarve.carve.router")


def jonker_volgenant_cost(cost: np.ndarray, size: int) -> float:
    _, cols = linear_sum_assignment(np.repeat(cost, size, axis=1))
    return cost[np.arange(len(cost)), cols // size].sum()


@pytest.mark.parametrize("seed", range(40))
def test_balanced_assignment_is_optimal_and_balanced(seed):
    rng = np.random.default_rng(seed)
    columns, size = int(rng.integers(2, 17)), int(rng.integers(1, 13))
    cost = rng.standard_normal((columns * size, 1)) + 0.3 * rng.standard_normal((columns * size, columns))
    if seed % 2:
        cost = np.round(cost, 1)  # many ties
    cold = partition.balanced_assignment(cost, size)
    warm = partition.balanced_assignment(cost, size, rng.permutation(np.arange(len(cost)) // size))
    best = jonker_volgenant_cost(cost, size)
    for labels in (cold, warm):
        assert np.all(np.bincount(labels, minlength=columns) == size)
        assert cost[np.arange(len(cost)), labels].sum() == pytest.approx(best, abs=1e-9)


def test_balanced_assignment_keeps_an_optimal_start_and_its_input():
    rng = np.random.default_rng(0)
    cost = rng.standard_normal((60, 5))
    optimum = partition.balanced_assignment(cost, 12)
    start = optimum.copy()
    assert np.array_equal(partition.balanced_assignment(cost, 12, start), optimum)
    assert np.array_equal(start, optimum)  # the caller's labels are not modified


def test_kmeans_stops_when_an_iteration_gains_less_than_tol():
    torch.manual_seed(0)
    feats = torch.randn(8 * 24, 64)
    exact, ran_exact = partition.balanced_kmeans(feats, 8, 24, iters=30, tol=0.0)
    loose, ran_loose = partition.balanced_kmeans(feats, 8, 24, iters=30, tol=0.5)
    # single-neuron starting centroids: step 2 roughly halves step 1's objective, step 3 cannot
    assert ran_loose == 3 < ran_exact
    for labels in (exact, loose):
        assert torch.equal(torch.bincount(labels, minlength=8), torch.full((8,), 24))


@pytest.mark.parametrize("active", [1, 2, 4])  # no pair of routed experts shares a token at A = 1
@pytest.mark.parametrize("tokens", [600, 16])  # more tokens than neurons, and fewer (token space)
def test_refit_uses_only_selecting_tokens_and_matches_the_dense_normal_equations(tokens, active):
    torch.manual_seed(0)
    hidden, routed, m = 12, 5, 4
    neurons = (routed + 1) * m
    order = torch.randperm(neurons)
    shared, experts = order[:m].sort().values, order[m:].view(routed, m)
    top = torch.randn(tokens, routed).topk(active, 1).indices
    gates = torch.zeros(tokens, routed).scatter_(1, top, 1 + 0.01 * torch.rand(tokens, active))
    carved = layer.CarvedFFN(
        None, None, torch.zeros(hidden, neurons), shared, experts, None, None, active, {}
    )
    h = torch.randn(tokens, neurons)
    kept = layer.kept_activations(h[:, carved.neuron_order], gates, carved)  # shared, then each expert's
    assert torch.equal(kept[:, :m], h[:, shared])
    torch.testing.assert_close(kept[:, m : 2 * m], h[:, experts[0]] * gates[:, :1])
    assert torch.all(kept[:, m : 2 * m][gates[:, 0] == 0] == 0)  # unselected experts feed nothing
    target, prior = torch.randn(tokens, hidden), torch.randn(hidden, neurons)
    gram = (kept.T @ kept).double()
    penalty = 0.1 * gram.diagonal().mean()
    gram += penalty * torch.eye(neurons, dtype=gram.dtype)
    cross = (kept.T @ target).double() + penalty * prior[:, carved.neuron_order].T.double()
    dense = torch.empty(hidden, neurons)  # the normal equations over every token, in neuron order
    dense[:, carved.neuron_order] = torch.linalg.solve(gram, cross).T.float()
    torch.testing.assert_close(layer.refit_down(kept, gates, carved, target, 0.1, prior), dense)


@pytest.mark.parametrize("tokens", [50, 10])
def test_refit_ridge_pulls_towards_the_source_not_towards_zero(tokens):
    """A huge ridge (few tokens per neuron under "auto") gives back the source's down projections."""
    torch.manual_seed(0)
    hidden, m = 8, 4
    order = torch.randperm(4 * m)  # the source is in neuron order, the equations in block order
    shared, experts = order[:m].sort().values, order[m:].view(3, m)
    gates = torch.zeros(tokens, 3).scatter_(1, torch.randint(0, 3, (tokens, 1)), 1.0)
    carved = layer.CarvedFFN(None, None, None, shared, experts, None, None, 1, {})
    h, source = torch.randn(tokens, 4 * m), torch.randn(hidden, 4 * m)
    kept = layer.kept_activations(h[:, carved.neuron_order], gates, carved)
    target = torch.randn(tokens, hidden)
    torch.testing.assert_close(
        layer.refit_down(kept, gates, carved, target, 1e6, source), source, atol=1e-4, rtol=0
    )
    assert layer.refit_ridge("auto", neurons=1536, tokens=16384) == (1536 / 16384) ** 2
    assert layer.refit_ridge(0.01, neurons=1536, tokens=2048) == 0.01


def test_skinny_product_sums_every_chunk():
    torch.manual_seed(0)
    a, b = torch.randn(10, 3), torch.randn(10, 5)
    for chunk in (1, 3, 10, 64):  # chunks that divide T, that do not, and one chunk
        torch.testing.assert_close(partition._skinny_product(a, b, chunk), a.T @ b)


def test_balanced_assignment_refuses_bad_costs_and_starts():
    cost = np.random.default_rng(0).standard_normal((6, 3))
    with pytest.raises(ValueError, match="finite"):
        partition.balanced_assignment(np.where(np.eye(6, 3) > 0, np.inf, cost), 2)
    with pytest.raises(ValueError, match="cannot fill"):
        partition.balanced_assignment(cost[:5], 2)
    with pytest.raises(ValueError, match="exactly 2 rows"):
        partition.balanced_assignment(cost, 2, np.array([0, 0, 0, 1, 1, 2]))


def test_balanced_assignment_ignores_a_constant_offset():
    cost = np.random.default_rng(3).standard_normal((400, 8))
    labels = partition.balanced_assignment(cost + 1e8, 50)  # the tolerance follows the cost range
    rows = np.arange(400)
    assert cost[rows, labels].sum() == pytest.approx(jonker_volgenant_cost(cost, 50), abs=1e-9)


def test_refining_for_the_best_experts_never_lowers_what_they_capture():
    torch.manual_seed(0)
    tokens, routed, m, active = 400, 5, 6, 2
    planted = torch.randperm(routed * m) // m  # neurons that fire together
    groups = torch.rand(tokens, routed).topk(active, 1).indices  # each token uses `active` groups
    fires = F.one_hot(groups, routed).sum(1)[:, planted].float()  # [T, n]
    score = fires + 0.3 * torch.rand(tokens, routed * m)
    labels = torch.arange(routed * m) // m  # a start that mixes the groups
    select = partial(router.top_experts, active=active)
    captured = []
    for _ in range(6):
        per_expert = score @ F.one_hot(labels, routed).float()
        captured.append(per_expert.topk(active, 1).values.sum().item())
        labels, _ = partition.refine_for_routing(score, labels, routed, m, select, iters=1)
        assert torch.equal(torch.bincount(labels, minlength=routed), torch.full((routed,), m))
    assert all(later >= earlier - 1e-3 for earlier, later in pairwise(captured))
    assert captured[-1] > captured[0]


def test_linear_selector_chooses_what_a_linear_router_predicts():
    torch.manual_seed(0)
    x = torch.randn(500, 8)
    per_expert = x[:, :4] @ torch.randn(4, 4) + torch.tensor([3.0, 0.0, 1.0, -2.0])  # linear in x
    chosen = partition.linear_selector(router.RidgeInputs(x, 400, ridge=1e-9), 2)(per_expert)
    assert torch.equal(chosen, router.top_experts(per_expert, 2))
    assert torch.equal(chosen.sum(1), torch.full((500,), 2.0))


def test_balancing_bias_evens_a_skewed_load_in_proportion_to_its_strength():
    torch.manual_seed(0)
    scores = torch.randn(2000, 8) + torch.tensor([2.0, 1.0, 0.5, 0, 0, 0, -0.5, -1.0])  # expert 0 favoured
    assert torch.equal(router.balancing_bias(scores, 2, 0.0), torch.zeros(8))
    full = router.balancing_bias(scores, 2, 1.0)
    assert torch.allclose(router.balancing_bias(scores, 2, 0.5), 0.5 * full)
    before = router.top_experts(scores, 2).sum(0)
    after = router.top_experts(scores + full, 2).sum(0)
    assert before.max() / before.mean() > 2  # skewed: expert 0 takes over twice its share
    assert after.max() / after.mean() < 1.1
    assert full[0] < 0 < full[-1]  # the favoured expert is pushed down, the shunned one up


def ridge_fit_float64(x: torch.Tensor, target: torch.Tensor, ridge: float) -> torch.Tensor:
    """The router's ridge fit of per-token-centred targets, float64 throughout: [T, R] scores on x."""
    x64 = x.double() - x.double().mean(0)
    t64 = target.double() - target.double().mean(1, keepdim=True)
    gram = x64.T @ x64
    gram += ridge * gram.diagonal().mean() * torch.eye(x.shape[1], dtype=torch.float64)
    weight = torch.linalg.solve(gram, x64.T @ (t64 - t64.mean(0))).T
    return x64 @ weight.T + t64.mean(0)


@pytest.mark.parametrize("ridge", [1e-3, 1.0])
def test_router_fits_on_train_and_all_tokens_are_exact_with_a_large_mean_channel(ridge):
    torch.manual_seed(0)
    x = torch.randn(4000, 16)
    x[:, 0] += 1000.0  # a channel whose mean dwarfs its spread, as LLM hidden states have
    target = x @ torch.randn(16, 5) + 0.1 * torch.randn(4000, 5)
    inputs = router.RidgeInputs(x, 3000, ridge)
    for fitted, tokens in (
        (inputs.fit(target), slice(None)),
        (inputs.fit(target[:3000], "train"), slice(3000)),
    ):
        expected = ridge_fit_float64(x[tokens], target[tokens], ridge)
        torch.testing.assert_close(
            (x[tokens] @ fitted.weight.T + fitted.bias).double(), expected, rtol=0, atol=1e-3
        )
        torch.testing.assert_close(inputs.scores(fitted)[tokens].double(), expected, rtol=0, atol=1e-3)


def test_the_router_refine_moves_routed_neurons_only_and_keeps_each_once():
    from moecarve import CarveConfig

    torch.manual_seed(0)
    x = torch.randn(512, 12)
    h = F.silu(x @ torch.randn(12, 48)) * (x @ torch.randn(12, 48))
    down_norms = torch.rand(48) + 0.5
    config = CarveConfig(experts=8, active=2, shared=1, refine_iters=3)
    inputs = router.RidgeInputs(x, 448, ridge=1.0)
    refined = partition.partition_neurons(h, down_norms, config, 6, inputs)
    kmeans = partition.partition_neurons(
        h, down_norms, config.model_copy(update={"refine_iters": 0}), 6, inputs
    )
    assert torch.equal(refined.shared, kmeans.shared)
    assert not torch.equal(refined.experts, kmeans.experts)
    assert torch.equal(torch.cat([refined.shared, refined.experts.flatten()]).sort().values, torch.arange(48))
    assert 1 <= refined.refine_iterations <= 3 and kmeans.refine_iterations == 0


def test_usefulness_is_the_error_drop_of_adding_each_expert_alone():
    torch.manual_seed(0)
    tokens, hidden, routed, m = 300, 10, 4, 5
    h, w_down = torch.randn(tokens, routed * m + 3), torch.randn(hidden, routed * m + 3)
    experts = torch.randperm(routed * m + 3)[: routed * m].view(routed, m)  # 3 neurons left out
    outputs = torch.einsum("trm,hrm->trh", h[:, experts], w_down[:, experts])  # [T, R, H] o_j
    r = outputs.sum(1, keepdim=True)  # what the routed experts give together
    expected = (r.square() - (r - outputs).square()).sum(-1)  # ||r||^2 - ||r - o_j||^2
    torch.testing.assert_close(
        router.usefulness(h[:, experts], w_down[:, experts], chunk=128), expected, rtol=1e-4, atol=1e-3
    )


def test_the_representative_is_the_member_nearest_its_cluster_centroid():
    torch.manual_seed(0)
    feats = torch.randn(24, 10)
    labels = torch.randperm(24) % 4
    members = torch.stack([torch.nonzero(labels == j).squeeze(1) for j in range(4)])  # [4, 6]
    chosen = partition.nearest_to_centroid(feats, labels, members)
    for j in range(4):
        rows = feats[members[j]]
        assert chosen[j] == members[j][(rows - rows.mean(0)).norm(dim=1).argmin()]
