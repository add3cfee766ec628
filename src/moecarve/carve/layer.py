"""Carving one FFN: partition its neurons, build the router, and run the result as glm4_moe does.

Legend: T tokens, H hidden, I intermediate (padded to N * m), R routed experts, m neurons per expert.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import scipy.linalg
import torch
import torch.nn.functional as F

from moecarve.carve import router as routing
from moecarve.carve.config import CarveConfig
from moecarve.carve.partition import activations, partition_neurons
from moecarve.carve.target import LOGIT_SCALE, moe_tensors

HELD_OUT = 8  # the last 1/HELD_OUT of the tokens measures the routers before the final fit


@dataclass
class CarvedFFN:
    w_gate: torch.Tensor  # [I, H]
    w_up: torch.Tensor  # [I, H]
    w_down: torch.Tensor  # [H, I]
    shared: torch.Tensor  # [S*m]
    experts: torch.Tensor  # [R, m]
    router_weight: torch.Tensor  # [R, H], scaled as written
    router_bias: torch.Tensor  # [R] fp32 e_score_correction_bias as written
    active: int
    stats: dict

    def tensors(self, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The layer's glm4_moe tensors in `dtype`; the balancing bias stays fp32 as the target keeps it."""
        tensors = moe_tensors(
            prefix, self.w_gate, self.w_up, self.w_down, self.shared, self.experts, self.router_weight
        )
        tensors = {name: t.to(dtype) for name, t in tensors.items()}
        tensors[f"{prefix}gate.e_score_correction_bias"] = self.router_bias.float()
        return tensors

    @property
    def neuron_order(self) -> torch.Tensor:
        """[I] the neurons in block order: the shared ones, then each routed expert's."""
        return torch.cat([self.shared, self.experts.flatten()])

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """glm4_moe's router: [T, R] gate of each routed expert for each token (0 where not selected)."""
        scores = torch.sigmoid(x.float() @ self.router_weight.float().T)  # [T, R]
        top = (scores + self.router_bias).topk(self.active, dim=1).indices  # [T, A]
        gates = scores.gather(1, top)
        gates = gates / (gates.sum(1, keepdim=True) + 1e-20) * self.active
        return torch.zeros_like(scores).scatter_(1, top, gates)


@contextmanager
def timed(stats: dict, stage: str):
    """Add the block's wall seconds to stats["seconds"][stage]: carve.json says where the time went."""
    _synchronize()
    started = time.perf_counter()
    yield
    _synchronize()
    seconds = stats.setdefault("seconds", {})
    seconds[stage] = round(seconds.get(stage, 0.0) + time.perf_counter() - started, 3)


def _synchronize() -> None:
    """Wait for queued CUDA work, so that a stage's seconds are its own, not the next stage's."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def carve_ffn(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    config: CarveConfig,
    m: int,
    dtype: torch.dtype = torch.float32,
    target: torch.Tensor | None = None,
    calib_dtype: torch.dtype = torch.float32,
) -> tuple[CarvedFFN, torch.Tensor]:
    """Carve the FFN (weights padded to N * m neurons) using its inputs x [T, H] on calibration text.

    Returns the carved FFN and its output on x, which the next layer is calibrated on. The router
    weight is rounded to the checkpoint's `dtype` first, so the routing computed here is the one
    the written model makes. `target` [T, H], what the refit aims the output at, defaults to the
    dense FFN's output. The activations and the outputs are multiplied in `calib_dtype`.
    """
    stats: dict = {}
    with timed(stats, "activations"):
        # [T, I] kept in calib_dtype, whose values these are: each later pass converts only the
        # columns or chunks it takes to float32
        h = activations(x.to(calib_dtype), w_gate.to(calib_dtype), w_up.to(calib_dtype))
        dense = linear(h, w_down, calib_dtype)
    with timed(stats, "partition"):
        inputs = routing.RidgeInputs(x, x.shape[0] - x.shape[0] // HELD_OUT, config.router_ridge)
        part = partition_neurons(h, w_down.norm(dim=0), config, m, inputs)
        # [T, I] the activations in block order (the shared neurons, then each routed expert's):
        # one gather serves the router's fit, the carved forward and the refit
        blocks = h.index_select(1, torch.cat([part.shared, part.experts.flatten()]))
        del h
    stats["cluster_iterations"], stats["refine_iterations"] = part.iterations, part.refine_iterations
    R, A = config.routed, config.active
    if A == R:  # every routed expert is selected: zero router, gates exactly 1, the dense FFN exactly
        weight, bias = x.new_zeros(R, x.shape[1]), x.new_zeros(R)
    else:
        with timed(stats, "router"):
            weight, bias = _fit_router(
                x, inputs, blocks, w_gate, w_up, w_down, part, config, dtype, stats, calib_dtype
            )
    del inputs  # two [T, H] copies of x, not needed by the refit
    carved = CarvedFFN(w_gate, w_up, w_down, part.shared, part.experts, weight, bias.float(), A, stats)
    with timed(stats, "forward"):  # glm4_moe's forward: shared + gated sum of the top-A routed experts
        gates = carved.routing(x)
        kept = kept_activations(blocks, gates, carved)
        del blocks
    if A < R:
        load = (gates > 0).sum(0).float()
        stats["load_imbalance"] = (load.max() / load.mean()).item()
        if config.refit_ridge is not None:
            with timed(stats, "refit"):
                target = dense if target is None else target
                ridge = refit_ridge(config.refit_ridge, neurons=kept.shape[1], tokens=x.shape[0])
                stats["refit_ridge"] = ridge
                carved.w_down = refit_down(kept, gates, carved, target, ridge, w_down).to(w_down.dtype)
    with timed(stats, "forward"):
        out = linear(kept, carved.w_down[:, carved.neuron_order], calib_dtype)
    stats["relative_error"] = _relative_error(out, dense)
    return carved, out


def _fit_router(
    x, inputs, blocks, w_gate, w_up, w_down, part, config: CarveConfig, dtype, stats: dict, calib_dtype
):
    """The linear router (weight [R, H], bias [R], as written) fitted to each expert's usefulness;
    records its agreement with the best experts, and CMoE's, on held-out tokens in `stats`."""
    R, A = config.routed, config.active
    routed = blocks[:, part.shared.numel() :].view(blocks.shape[0], *part.experts.shape)  # [T, R, m]
    useful = routing.usefulness(routed, w_down[:, part.experts], calib_dtype)  # [T, R]
    split = inputs.split
    fitted = inputs.fit(useful[:split], "train")
    held_x, held_useful = x[split:], useful[split:]
    cmoe = routing.representative_scores(held_x, w_gate, w_up, part.representatives)
    stats["router_agreement"] = {
        "fitted_linear": routing.agreement(held_x @ fitted.weight.T + fitted.bias, held_useful, A),
        "cmoe_representative": routing.agreement(cmoe, held_useful, A),
        "chance": A / R,
    }
    fitted = inputs.fit(useful)
    scores = x @ fitted.weight.T  # [T, R]
    balance = routing.balancing_bias(scores + fitted.bias, A, config.balance)
    scale = LOGIT_SCALE / scores.abs().max().clamp_min(1e-12)
    # sigmoid(s z) = 0.5 + s z / 4 + O((s z)^3): a score offset b becomes s b / 4 after the sigmoid.
    return (fitted.weight * scale).to(dtype).float(), (fitted.bias + balance) * scale / 4


def linear(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x @ weight.T multiplied in `dtype`, returned float32."""
    return (x.to(dtype) @ weight.to(dtype).T).float()


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm()).item()


def kept_activations(blocks: torch.Tensor, gates: torch.Tensor, carved: CarvedFFN) -> torch.Tensor:
    """[T, I] float32 what each neuron feeds the down projection in the carved layer, from its
    activations `blocks` [T, I] in block order (the shared neurons, then each routed expert's,
    `CarvedFFN.neuron_order`): the activation for shared neurons, times its expert's gate for routed
    ones (0 where the expert is not selected)."""
    kept = blocks.to(torch.float32, copy=True)
    routed = kept[:, carved.shared.numel() :].view(kept.shape[0], *carved.experts.shape)  # [T, R, m]
    routed.mul_(gates[:, :, None])
    return kept


def refit_ridge(setting: float | str, neurons: int, tokens: int) -> float:
    """The refit's ridge: `setting`, or on "auto" (neurons / tokens)^2. Few tokens per neuron need a
    strong pull towards the source's weights, many almost none (docs/carve.md: on SmolLM2-135M the
    best ridges tried were 0.5-1 at 2,048 tokens and 0.01 or less at 16,384)."""
    return (neurons / tokens) ** 2 if setting == "auto" else float(setting)


def refit_down(
    kept: torch.Tensor,
    gates: torch.Tensor,
    carved: CarvedFFN,
    target: torch.Tensor,
    ridge: float,
    prior: torch.Tensor,
) -> torch.Tensor:
    """Least-squares down projections [H, I] that best give `target` [T, H] from `kept` [T, I].

    The carved output is linear in W_down once the routing is fixed, so the dropped neurons' share
    is partly recovered from the kept ones they correlate with. The ridge pulls the solution towards
    `prior` [H, I], the source's W_down (neuron order), not towards zero: with few tokens per neuron
    a strong ridge then falls back to the uncorrected carve instead of shrinking the output.
    `kept` is in block order and zero wherever an expert is not selected (`kept_activations`).
    With fewer tokens than neurons the same solution is found in token space ([T, T] equations
    instead of [I, I]). Returns W_down in the original neuron order.
    """
    prior = prior[:, carved.neuron_order]  # [H, I], block order
    tokens, neurons = kept.shape
    if tokens < neurons:
        solution = _refit_in_token_space(kept, target, ridge, prior)  # [I, H], block order
    else:
        solution = _refit_in_neuron_space(kept, gates, carved, target, ridge, prior)
    w_down = target.new_empty(target.shape[1], neurons)
    w_down[:, carved.neuron_order] = solution.T.float()
    return w_down


def _refit_in_neuron_space(kept, gates, carved, target, ridge, prior) -> torch.Tensor:
    """(K^T K + p I) W^T = K^T Y + p P^T. K is zero wherever an expert is not selected, so a routed
    expert's blocks of K^T K need only the tokens that select it, and its block against another
    routed expert only the tokens that select both (none at A = 1)."""
    neurons, shared, m = kept.shape[1], carved.shared.numel(), carved.experts.shape[1]
    gram = kept.new_zeros(neurons, neurons, dtype=torch.float64)  # [I, I], block order
    # [I, H], column-major for LAPACK
    cross = target.new_empty(target.shape[1], neurons, dtype=torch.float64).T
    rows = kept[:, :shared]
    gram[:shared, :shared] = rows.T @ rows
    cross[:shared] = rows.T @ target
    selected = gates > 0  # [T, R]
    blocks = [slice(start, start + m) for start in range(shared, neurons, m)]
    for j, own in enumerate(blocks):
        tokens = selected[:, j].nonzero().squeeze(1)  # the tokens that select expert j
        block = kept[tokens, own]  # [t, m]; only the columns each product needs are gathered
        gram[:shared, own] = kept[tokens, :shared].T @ block
        gram[own, :shared] = gram[:shared, own].T
        gram[own, own] = block.T @ block
        cross[own] = block.T @ target[tokens]
        for k in range(j + 1, len(blocks)):
            both = selected[tokens, k].nonzero().squeeze(1)
            if both.numel():
                gram[own, blocks[k]] = block[both].T @ kept[tokens[both], blocks[k]]
                gram[blocks[k], own] = gram[own, blocks[k]].T
    penalty = (ridge * gram.diagonal().mean()).item()
    gram.diagonal().add_(penalty)
    cross.add_(prior.T, alpha=penalty)
    # LAPACK takes column-major arrays: the gram's transpose is itself, `cross` is made column-major above.
    return _solve_positive_definite(gram.T, cross)


def _refit_in_token_space(kept, target, ridge, prior) -> torch.Tensor:
    """The same solution by the push-through identity: W^T = P^T + K^T (K K^T + p I)^-1 (Y - K P^T).
    Its equations are [T, T], so with few tokens per neuron (a large model at a small calibration
    budget) this is far cheaper in time and memory than the [I, I] ones."""
    gram = (kept @ kept.T).double()  # [T, T]
    penalty = (ridge * gram.diagonal().sum() / kept.shape[1]).item()  # the same p: trace(K^T K) / I
    gram.diagonal().add_(penalty)
    residual = (target - kept @ prior.T).double()  # [T, H]
    weights = _solve_positive_definite(gram, residual)
    return prior.T + kept.T @ weights.float()  # [I, H]


def _solve_positive_definite(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """gram^-1 rhs by Cholesky, for a symmetric positive definite float64 `gram`; both may be
    overwritten. On CPU LAPACK factors and solves in place, with no second copy of either (the [I, I]
    gram is 0.9 GiB at I = 11,008); on a GPU torch's Cholesky does it."""
    if gram.device.type != "cpu":
        return torch.cholesky_solve(rhs, torch.linalg.cholesky(gram))
    factor = scipy.linalg.cho_factor(gram.numpy(), overwrite_a=True, check_finite=False)
    return torch.from_numpy(scipy.linalg.cho_solve(factor, rhs.numpy(), overwrite_b=True, check_finite=False))


def pad_neurons(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, total: int):
    """Pad the FFN with zero neurons to `total` (they contribute exactly nothing)."""
    extra = total - w_gate.shape[0]
    if extra == 0:
        return w_gate, w_up, w_down
    return F.pad(w_gate, (0, 0, 0, extra)), F.pad(w_up, (0, 0, 0, extra)), F.pad(w_down, (0, extra))
