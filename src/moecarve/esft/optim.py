"""Freezing per expert slice inside fused [E, ...] tensors, exactly.

A zero gradient is not enough with AdamW: decoupled weight decay still shrinks the weights of
frozen experts. So frozen slices are handled twice: a gradient hook zeroes their gradient (so
gradient clipping and all-reduce see only trained experts), and `SliceAdamW` keeps moments only
for the selected rows and writes back only those rows: frozen slices stay bit-identical and
carry no optimiser state.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def mask_gradient(param: nn.Parameter, rows: torch.Tensor) -> torch.utils.hooks.RemovableHandle:
    """Zero the gradient of every expert slice of `param` outside `rows` (NaN/inf-safe)."""
    keep = torch.zeros(param.shape[0], dtype=torch.bool, device=param.device)
    keep[rows.to(param.device)] = True
    keep = keep.view(-1, *([1] * (param.dim() - 1)))
    return param.register_hook(lambda grad: torch.where(keep.to(grad.device), grad, torch.zeros_like(grad)))


class SliceAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) whose groups may carry `rows`: then
    only `param[rows]` is updated, decayed and given moments. Groups without rows update whole
    tensors."""

    def __init__(self, groups: list[dict], lr: float = 1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "rows": None}
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                rows = group["rows"]
                rows = None if rows is None else rows.to(param.device)
                grad = param.grad if rows is None else param.grad.index_select(0, rows)
                value = param.data if rows is None else param.data.index_select(0, rows)
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                state["step"] += 1
                step, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
                value.mul_(1 - group["lr"] * group["weight_decay"])
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
                value.addcdiv_(exp_avg, denom, value=-group["lr"] / (1 - beta1**step))
                if rows is not None:
                    param.data.index_copy_(0, rows, value)
        return loss
