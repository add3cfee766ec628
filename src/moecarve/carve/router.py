"""A linear router for the carved experts, fitted on the calibration tokens.

The target (glm4_moe) routes by top-k of sigmoid(W x) + bias, a linear score. CMoE's training-free
router scores |u.x * SiLU(g.x)| of one representative neuron per expert, which no linear layer
expresses. We instead fit W by ridge regression to each expert's usefulness for the token: the
drop in output error when the expert is added, 2 o_j.r - ||o_j||^2 (o_j the expert's output, r
the routed part of the dense output). Both are measured against the oracle choice per token.

Legend: T tokens, H hidden, R routed experts, m neurons per expert, A active routed experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Router:
    weight: torch.Tensor  # [R, H] linear scores (before the logit scale)
    bias: torch.Tensor  # [R] the fit's intercept, same units as weight @ x


def usefulness(
    routed: torch.Tensor, w_routed: torch.Tensor, dtype: torch.dtype = torch.float32, chunk: int = 2048
) -> torch.Tensor:
    """[T, R] error reduction of adding each expert alone: 2 o_j.r - ||o_j||^2, from the routed
    neurons' activations `routed` [T, R, m] and their down projections `w_routed` [H, R, m].

    o_j = W_j h_j is expert j's output for the token and r = sum_j o_j the routed part of the dense
    output. Computed as o_j.r = h_j.(W_j^T r) and ||o_j||^2 = h_j^T (W_j^T W_j) h_j, so no [T, R, H]
    tensor is formed. The products are taken in `dtype` (the ranking they feed tolerates bfloat16).
    """
    gram = torch.einsum("hrm,hrn->rmn", w_routed, w_routed).to(dtype)  # [R, m, m]
    w = w_routed.flatten(1).to(dtype)  # [H, R*m]
    parts = []
    for start in range(0, routed.shape[0], chunk):
        he = routed[start : start + chunk].to(dtype)  # [t, R, m]
        projected = (he.flatten(1) @ w.T @ w).view_as(he)  # [t, R, m]: W_j^T r
        dot = (he * projected).float().sum(-1)
        norm = (torch.bmm(he.transpose(0, 1), gram).float() * he.transpose(0, 1)).sum(-1).T  # [t, R]
        parts.append(2 * dot - norm)
    return torch.cat(parts)


class RidgeInputs:
    """The inputs x [T, H] of ridge fits (with an intercept) of per-token-centred targets [T, R].

    Every fit on the same tokens shares the gram and its Cholesky factor: the partition's selector
    fits once per refine step and the router twice per layer. The first `split` tokens are the
    training part (the router's agreement is measured on the rest). x is shifted by the training
    tokens' mean before the float32 products, so that channels whose mean dwarfs their spread keep
    their digits; sums are float64 for the solve.
    """

    def __init__(self, x: torch.Tensor, split: int, ridge: float):
        self.shift = x[:split].mean(0)
        self.xs = x.float() - self.shift  # [T, H]
        self.xs_t = self.xs.T.contiguous()  # [H, T]: products with the targets run 3x faster on it
        self.split, self.ridge = split, ridge
        train, rest = (_sum64(part) for part in (self.xs[:split], self.xs[split:]))
        self._sum = {"train": train, "all": train + rest}
        self._grams: dict[str, torch.Tensor] | None = None  # on first use: a selector-free carve needs none
        self._factor = {}

    def _cholesky_factor(self, part: str, n: int, mean_x: torch.Tensor) -> torch.Tensor:
        """[H, H] Cholesky factor of the part's centred, ridged gram, float64. Both uncentred grams
        are made on first use; each becomes its factor in place ([H, H] float64 is 128 MiB at H = 4096)."""
        if part not in self._factor:
            if self._grams is None:
                train = (self.xs_t[:, : self.split] @ self.xs[: self.split]).double()
                self._grams = {
                    "train": train,
                    "all": train + (self.xs_t[:, self.split :] @ self.xs[self.split :]).double(),
                }
            gram = self._grams.pop(part)
            gram -= n * torch.outer(mean_x, mean_x)
            gram.diagonal().add_(self.ridge * gram.diagonal().mean())
            self._factor[part] = torch.linalg.cholesky(gram, out=gram)
        return self._factor[part]

    def fit(self, target: torch.Tensor, part: str = "all") -> Router:
        """Router [R, H] fitted to `target` [T', R] on the "train" tokens or on "all" of them."""
        n = self.split if part == "train" else self.xs.shape[0]
        target = (target - target.mean(1, keepdim=True)).float()  # only the ranking within a token matters
        mean_x, mean_t = self._sum[part] / n, target.double().sum(0) / n
        factor = self._cholesky_factor(part, n, mean_x)
        cross = (self.xs_t[:, :n] @ target).double() - n * torch.outer(mean_x, mean_t)  # [H, R]
        weight = torch.cholesky_solve(cross, factor).T  # [R, H]
        bias = mean_t - weight @ (mean_x + self.shift.double())  # for the unshifted x
        return Router(weight=weight.float(), bias=bias.float())

    def scores(self, router: Router) -> torch.Tensor:
        """[T, R] the router's scores on these tokens."""
        return self.xs @ router.weight.T + (router.bias + router.weight @ self.shift)


def _sum64(x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """x.sum(0) in float64, from float32 sums of chunks of rows: 30x faster than a float64 copy."""
    return sum(
        (part.sum(0).double() for part in x.split(chunk)), x.new_zeros(x.shape[1], dtype=torch.float64)
    )


def representative_scores(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, representatives: torch.Tensor
) -> torch.Tensor:
    """CMoE's nonlinear router scores [T, R]: |(u.x) * SiLU(g.x)| with L2-normalised x and rows."""
    xn = F.normalize(x, dim=1)
    g = F.normalize(w_gate[representatives], dim=1)
    u = F.normalize(w_up[representatives], dim=1)
    return ((xn @ u.T) * F.silu(xn @ g.T)).abs()


def top_experts(scores: torch.Tensor, active: int) -> torch.Tensor:
    """[T, R] 0/1 in the scores' dtype: each token's `active` highest-scoring experts."""
    return F.one_hot(scores.topk(active, 1).indices, scores.shape[1]).sum(1).to(scores.dtype)


def agreement(scores: torch.Tensor, oracle: torch.Tensor, active: int) -> float:
    """Mean fraction of the oracle's top-A experts that `scores` also puts in its top-A."""
    chosen, best = top_experts(scores, active), top_experts(oracle, active)
    return ((chosen * best).sum(1).float() / active).mean().item()


def balancing_bias(scores: torch.Tensor, active: int, strength: float, steps: int = 200) -> torch.Tensor:
    """DeepSeek-V3's auxiliary-loss-free rule run on the calibration tokens: b_j -= g*sign(load_j - mean).

    Returns `strength` times the bias that balances the load, in the units of `scores` [T, R].
    """
    bias = scores.new_zeros(scores.shape[1])
    if strength == 0:
        return bias
    gamma = scores.std() * 0.05
    for step in range(steps):
        load = top_experts(scores + bias, active).sum(0).float()
        bias -= gamma * (1 - step / steps) * torch.sign(load - load.mean())
    return strength * bias
