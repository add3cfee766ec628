"""Which neurons become the shared expert and how the routed ones group into equal experts.

Legend: T calibration tokens, H hidden size, I intermediate size (padded to N * m), n routed
neurons, R routed experts, m neurons per expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from moecarve.carve.config import CarveConfig


@dataclass
class Partition:
    shared: torch.Tensor  # [S*m] neuron indices, always active
    experts: torch.Tensor  # [R, m] neuron indices of each routed expert
    representatives: torch.Tensor  # [R] the member nearest each cluster centre (CMoE's router neuron)
    iterations: int  # clustering iterations run


def activations(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """h = SiLU(x W_gate^T) * (x W_up^T): [T, I] neuron activations of the FFN inputs x [T, H]."""
    return F.silu(x @ w_gate.T) * (x @ w_up.T)


def top_k_markers(h: torch.Tensor, k: int) -> torch.Tensor:
    """CMoE's ATopK: [T, I] 0/1 float, 1 where |h| is among the token's k largest."""
    idx = h.abs().topk(k, dim=1).indices
    return torch.zeros_like(h).scatter_(1, idx, 1.0)


def resolve_k(top_k_activation: float, intermediate: int) -> int:
    k = int(top_k_activation) if top_k_activation >= 1 else round(top_k_activation * intermediate)
    return max(1, min(k, intermediate))


def partition_neurons(h: torch.Tensor, down_norms: torch.Tensor, config: CarveConfig, m: int) -> Partition:
    """Shared neurons by score, routed neurons by balanced k-means into R experts of exactly m."""
    contribution = h.abs() * down_norms  # [T, I] size of each neuron's share of the output
    markers = None
    if config.shared_score == "rate" or config.features == "binary":
        markers = top_k_markers(h, resolve_k(config.top_k_activation, h.shape[1]))
    score = markers.mean(0) if config.shared_score == "rate" else contribution.pow(2).mean(0)
    order = torch.argsort(score, descending=True, stable=True)
    n_shared = config.shared * m
    shared, routed = order[:n_shared], order[n_shared:]  # routed: in decreasing score
    # Features over an evenly spaced subset of the tokens: as good a partition, measured, and
    # the k-means products shrink with it (docs/carve.md).
    stride = max(1, h.shape[0] // config.cluster_tokens)
    feats = (markers if config.features == "binary" else contribution)[::stride, routed].T  # [n, T']
    if config.features == "magnitude":
        feats = F.normalize(feats, dim=1)
    feats = feats.contiguous()
    labels, iterations = balanced_kmeans(feats, config.routed, m, config.cluster_iters)
    members = torch.stack([torch.nonzero(labels == j).squeeze(1) for j in range(config.routed)])  # [R, m]
    centroids = feats[members].mean(1)  # [R, T]
    nearest = (feats[members] - centroids[:, None]).pow(2).sum(-1).argmin(1)  # [R]
    representatives = routed[members.gather(1, nearest[:, None]).squeeze(1)]
    # Sort members inside each expert so the written layout does not depend on solver order.
    experts = routed[members].sort(dim=1).values
    return Partition(shared.sort().values, experts, representatives, iterations)


def balanced_kmeans(feats: torch.Tensor, clusters: int, size: int, iters: int) -> tuple[torch.Tensor, int]:
    """Equal-size k-means: each step is an exact transportation problem solved as an assignment.

    feats [n, T] with n = clusters * size; initial centroids are the first `clusters` rows (the
    highest-scoring neurons). Returns labels [n] and the iterations run.
    """
    centroids = feats[:clusters].clone()  # [R, T]
    labels = None
    for step in range(1, iters + 1):
        # ||f - c||^2 = ||f||^2 - 2 f.c + ||c||^2; the first term is the same for every column of a row.
        cost = centroids.pow(2).sum(1)[None, :] - 2 * feats @ centroids.T  # [n, R]
        new = balanced_assignment(cost.numpy(), size)
        if labels is not None and torch.equal(new, labels):
            return labels, step
        labels = new
        onehot = F.one_hot(labels, clusters).to(feats.dtype)  # [n, R]
        centroids = onehot.T @ feats / size
    return labels, iters


def balanced_assignment(cost: np.ndarray, size: int) -> torch.Tensor:
    """Exact min-cost assignment of n rows to R columns, each column taking exactly `size` rows."""
    _, cols = linear_sum_assignment(np.repeat(cost, size, axis=1))
    return torch.from_numpy(cols // size)
