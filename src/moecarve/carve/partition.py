"""Which neurons become the shared expert and how the routed ones group into equal experts.

Legend: T calibration tokens, H hidden size, I intermediate size (padded to N * m), n routed
neurons, R routed experts, m neurons per expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from moecarve.carve.config import CarveConfig
from moecarve.carve.router import RidgeInputs, top_experts


@dataclass
class Partition:
    shared: torch.Tensor  # [S*m] neuron indices, always active
    experts: torch.Tensor  # [R, m] neuron indices of each routed expert
    representatives: torch.Tensor  # [R] the member nearest each cluster centre (CMoE's router neuron)
    iterations: int  # clustering iterations run
    refine_iterations: int = 0  # refine steps run (stops early once the assignment repeats)


def activations(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """h = SiLU(x W_gate^T) * (x W_up^T): [T, I] neuron activations of the FFN inputs x [T, H]."""
    return F.silu(x @ w_gate.T) * (x @ w_up.T)


def top_k_markers(h: torch.Tensor, k: int) -> torch.Tensor:
    """CMoE's ATopK: [T, I] 0/1 float32, 1 where |h| is among the token's k largest."""
    idx = h.abs().topk(k, dim=1).indices
    return torch.zeros_like(h, dtype=torch.float32).scatter_(1, idx, 1.0)


def resolve_k(top_k_activation: float, intermediate: int) -> int:
    k = int(top_k_activation) if top_k_activation >= 1 else round(top_k_activation * intermediate)
    return max(1, min(k, intermediate))


def partition_neurons(
    h: torch.Tensor,
    down_norms: torch.Tensor,
    config: CarveConfig,
    m: int,
    inputs: RidgeInputs,
) -> Partition:
    """Shared neurons by score; routed neurons by balanced k-means into R experts of exactly m, then
    refined towards what a linear router on the FFN inputs can pick (`refine_for_routing`)."""
    markers = None
    if config.shared_score == "rate" or config.features == "binary":
        markers = top_k_markers(h, resolve_k(config.top_k_activation, h.shape[1]))
    if config.shared_score == "rate":
        score = markers.mean(0)
    else:  # mean squared contribution, summed in float32 over chunks of tokens (no float32 copy of h)
        squares = sum(chunk.to(torch.float32, copy=True).square_().sum(0) for chunk in h.split(2048))
        score = squares / h.shape[0] * down_norms.square()
    order = torch.argsort(score, descending=True, stable=True)
    n_shared = config.shared * m
    shared, routed = order[:n_shared], order[n_shared:]  # routed: in decreasing score
    # [T, n] squared size of each routed neuron's share of the output. Passes over [T, I] tensors
    # are most of the partition's time, so this is the only one made.
    energy = h.index_select(1, routed).float().mul_(down_norms[routed]).square_()
    # Features over an evenly spaced subset of the tokens: as good a partition, measured, and
    # the k-means products shrink with it (docs/carve.md).
    stride = max(1, h.shape[0] // config.cluster_tokens)
    if config.features == "magnitude":  # |h_i| ||W_down[:, i]||, normalised per neuron
        feats = F.normalize(energy[::stride].T.sqrt(), dim=1)  # [n, T']
    else:
        feats = markers[::stride, routed].T
    feats = feats.contiguous()
    labels, iterations = balanced_kmeans(feats, config.routed, m, config.cluster_iters, config.cluster_tol)
    refined = 0
    if config.refine_iters:
        select = linear_selector(inputs, config.active)
        labels, refined = refine_for_routing(energy, labels, config.routed, m, select, config.refine_iters)
    labels = spread_padding(labels, down_norms[routed] == 0, energy.sum(0), config.routed)
    members = torch.stack([torch.nonzero(labels == j).squeeze(1) for j in range(config.routed)])  # [R, m]
    representatives = routed[nearest_to_centroid(feats, labels, members)]
    # Sort members inside each expert so the written layout does not depend on solver order.
    experts = routed[members].sort(dim=1).values
    return Partition(shared.sort().values, experts, representatives, iterations, refined)


def spread_padding(
    labels: torch.Tensor, padding: torch.Tensor, energy: torch.Tensor, clusters: int
) -> torch.Tensor:
    """Move the zero neurons that pad the FFN to N * m out of experts they fill more than half of.

    They have no activations, so k-means and the refine put them anywhere, often all into one
    expert, which may then compute (almost) nothing and which no recovery or ESFT can train. Each
    move swaps a zero of the most padded expert with the least energetic neuron of the least padded
    one. Only that far: spreading them evenly measured worse (carve-experiments.md)."""
    labels = labels.clone()
    cap = len(labels) // clusters // 2
    while True:
        counts = torch.bincount(labels[padding], minlength=clusters)
        most, least = int(counts.argmax()), int(counts.argmin())
        if counts[most] <= cap or counts[most] - counts[least] <= 1:
            return labels
        zero = torch.nonzero(padding & (labels == most))[0, 0]
        candidates = torch.nonzero(~padding & (labels == least)).squeeze(1)
        real = candidates[energy[candidates].argmin()]
        labels[zero], labels[real] = least, most


def nearest_to_centroid(feats: torch.Tensor, labels: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """[R] the row of `feats` [n, T] nearest its cluster's centroid, for each cluster of `members` [R, m].

    Distances from products (||f||^2 - 2 f.c): gathering each cluster's rows would copy `feats` twice.
    """
    onehot = F.one_hot(labels, len(members)).to(feats.dtype)  # [n, R]
    centroids = onehot.T @ feats / members.shape[1]  # [R, T]
    distance = feats.pow(2).sum(1) - 2 * (feats @ centroids.T).gather(1, labels[:, None]).squeeze(1)  # [n]
    return members.gather(1, distance[members].argmin(1, keepdim=True)).squeeze(1)


def balanced_kmeans(
    feats: torch.Tensor, clusters: int, size: int, iters: int, tol: float = 0.0
) -> tuple[torch.Tensor, int]:
    """Equal-size k-means: each step is an exact transportation problem (balanced assignment).

    feats [n, T] with n = clusters * size; initial centroids are the first `clusters` rows (the
    highest-scoring neurons). Stops when the assignment repeats, when a step lowers the objective
    (sum of squared distances to the centroids) by less than `tol` of it, or after `iters` steps.
    Returns labels [n] and the iterations run.
    """
    centroids = feats[:clusters].clone()  # [R, T]
    norms = feats.pow(2).sum(1)  # [n]
    labels, objective = None, None
    for step in range(1, iters + 1):
        # ||f - c||^2 = ||f||^2 - 2 f.c + ||c||^2; the first term is the same for every column of a row.
        cost = centroids.pow(2).sum(1)[None, :] - 2 * feats @ centroids.T  # [n, R]
        new = _assign(cost, size, labels)
        new_objective = (norms + cost.gather(1, new[:, None]).squeeze(1)).sum().item()
        if labels is not None and (
            torch.equal(new, labels) or objective - new_objective < tol * abs(new_objective)
        ):
            return new, step
        labels, objective = new, new_objective
        onehot = F.one_hot(labels, clusters).to(feats.dtype)  # [n, R]
        centroids = onehot.T @ feats / size
    return labels, iters


def linear_selector(inputs: RidgeInputs, active: int):
    """A selection rule, per-expert score [T, R] -> chosen [T, R] 0/1: the top `active` experts of
    the ridge regression of the scores on the FFN inputs (all tokens), as the fitted router picks."""
    return lambda per_expert: top_experts(inputs.scores(inputs.fit(per_expert)), active)


def refine_for_routing(
    score: torch.Tensor, labels: torch.Tensor, clusters: int, size: int, select, iters: int
) -> tuple[torch.Tensor, int]:
    """Reassign neurons (the columns of `score` [T, n], each neuron's value at each token) to what
    each token's chosen experts capture, from `labels` [n].

    Alternates the experts `select` chooses per token ([T, R] per-expert score -> [T, R] 0/1) and
    the balanced assignment of neurons that captures the most score under those choices, for at
    most `iters` steps or until the assignment repeats. With the oracle choice (`top_experts`)
    neither step lowers the captured score; a linear router's choice gives no such guarantee, so
    the labels that captured the most are returned, with the steps run.
    """
    best, best_captured = labels, -float("inf")
    for step in range(1, iters + 2):
        per_expert = _expert_sums(score, labels, clusters)  # [T, R]
        chosen = select(per_expert)  # [T, R]
        captured = (per_expert * chosen).sum().item()
        if captured > best_captured:
            best, best_captured = labels, captured
        if step > iters:
            break
        gain = _skinny_product(chosen, score).T  # [n, R] what neuron i adds to expert j
        new = _assign(-gain, size, labels)
        if torch.equal(new, labels):
            return best, step
        labels = new
    return best, iters


def _expert_sums(score: torch.Tensor, labels: torch.Tensor, clusters: int) -> torch.Tensor:
    """[T, R] each expert's sum of its neurons' columns of `score` [T, n]. On CPU an index_add (a
    [T, n] x [n, R] one-hot product takes twice as long there); elsewhere the product, since CUDA's
    index_add adds in no fixed order and the carve must be deterministic."""
    if score.device.type == "cpu":
        return score.new_zeros(score.shape[0], clusters).index_add_(1, labels, score)
    return score @ F.one_hot(labels, clusters).to(score.dtype)


def _assign(cost: torch.Tensor, size: int, start: torch.Tensor | None) -> torch.Tensor:
    """`balanced_assignment` of torch tensors on any device (the solver runs on the CPU)."""
    start = None if start is None else start.cpu().numpy()
    labels = balanced_assignment(cost.double().cpu().numpy(), size, start)
    return torch.from_numpy(labels).to(cost.device)


def _skinny_product(a: torch.Tensor, b: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """a.T @ b for a [T, R] with few columns and b [T, n], summed over chunks of T: one long
    reduction over all tokens runs at half the speed on CPU (oneDNN/MKL pick a poor blocking)."""
    out = a.new_zeros(a.shape[1], b.shape[1])
    for start in range(0, a.shape[0], chunk):
        out.addmm_(a[start : start + chunk].T, b[start : start + chunk])
    return out


def balanced_assignment(cost: np.ndarray, size: int, start: np.ndarray | None = None) -> np.ndarray:
    """Optimal assignment of n rows to R columns of finite `cost` [n, R], each column taking exactly
    `size` rows (n = R * size).

    Min-cost flow by cycle cancelling on the R-column graph whose edge k -> l is the cheapest move
    of one row from column k to column l: from a feasible assignment (`start`, e.g. the previous
    k-means step's; else rows in order), rows move around negative cycles until none is left,
    which is the optimality condition of the flow (up to a tolerance of 1e-12 x n x the cost
    range). The same optimum as Jonker-Volgenant on the column-repeated n x n matrix at a
    fraction of the time (tested; benchmarks/assignment_solvers.py).
    """
    cost = np.asarray(cost, dtype=np.float64)
    n, columns = cost.shape
    if n != columns * size:
        raise ValueError(f"{n} rows cannot fill {columns} columns of {size} exactly")
    if not np.isfinite(cost).all():
        raise ValueError("assignment costs must be finite (NaN or inf in the clustering features?)")
    labels = np.arange(n) // size if start is None else np.array(start, dtype=np.int64)  # a copy
    if labels.shape != (n,) or not np.array_equal(np.bincount(labels, minlength=columns), [size] * columns):
        raise ValueError(f"start must give each of the {columns} columns exactly {size} rows")
    every = np.arange(n)
    tol = 1e-12 * n * (cost.max() - cost.min())
    while True:
        moves = cost - cost[every, labels][:, None]  # [n, R] cost change of moving each row
        members = np.argsort(labels, kind="stable").reshape(columns, size)  # rows of each column
        best = moves[members].argmin(1)  # [R, R] the member of k that moves to l most cheaply
        edges = moves[members[np.arange(columns)[:, None], best], np.arange(columns)]  # [R, R]
        np.fill_diagonal(edges, np.inf)
        cycle = _negative_cycle(edges, tol)
        if cycle is None:
            return labels
        # Move the i-th cheapest member along every edge at once, for each i whose round still
        # lowers the cost: the rounds move distinct rows, so each is a negative cycle of its own.
        dests = np.roll(cycle, -1)
        costs = moves[members[cycle], dests[:, None]]  # [c, size] each member's move along its edge
        ranked = np.argsort(costs, axis=1, kind="stable")
        rounds = np.take_along_axis(costs, ranked, axis=1).sum(0)  # [size] non-decreasing
        count = max(1, int((rounds < -tol).sum()))
        for edge, dest in enumerate(dests):
            labels[members[cycle[edge], ranked[edge, :count]]] = dest


def _negative_cycle(edges: np.ndarray, tol: float) -> np.ndarray | None:
    """The columns of a cycle of weight < -tol in the complete graph `edges` [R, R], or None.

    Bellman-Ford from a virtual source. A column still relaxing after R rounds was relaxed from one
    that relaxed the round before, so R steps back along the predecessors land on a cycle of them,
    and such a cycle is negative.
    """
    columns = len(edges)
    dist, pred = np.zeros(columns), np.arange(columns)  # the virtual source reaches every column at 0
    for _ in range(columns):
        through = dist[:, None] + edges  # [k, l]: reach l through k
        via = through.argmin(0)
        new = through[via, np.arange(columns)]
        better = new < dist - tol
        if not better.any():
            return None
        dist, pred = np.where(better, new, dist), np.where(better, via, pred)
    node = np.flatnonzero(better)[0]
    for _ in range(columns):
        node = pred[node]
    cycle = [node]
    while (node := pred[node]) != cycle[0]:
        cycle.append(node)
    cycle = np.array(cycle[::-1])  # predecessor order reversed: edges run cycle[i] -> cycle[i+1]
    return cycle if edges[cycle, np.roll(cycle, -1)].sum() < -tol else None
