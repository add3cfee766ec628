"""Expert load during training and the auxiliary-loss-free balancing rule (DeepSeek-V3).

After each optimiser step every router's `e_score_correction_bias` moves by `rate` towards
balance: up for experts that took fewer tokens than the mean, down for those that took more.
The bias only shifts which experts are selected; the gate values never include it.
"""

from __future__ import annotations

import torch
from torch import nn


def routers(model: nn.Module) -> list[nn.Module]:
    """Modules that own a routing correction bias (glm4_moe's router; also DeepSeek-V3 style).

    Owned, not reached through attribute forwarding: peft's modules_to_save wrapper forwards
    `e_score_correction_bias` to its active copy, whose tokens would otherwise count twice."""
    return [m for m in model.modules() if "e_score_correction_bias" in m._buffers]


class LoadTracker:
    """Counts the tokens each router sends to each expert, between two `step()` calls.

    The routers return (logits, gate values, selected expert ids); a forward hook reads the ids.
    Under peft's `modules_to_save` a layer has two router copies and only the active one runs, so
    the bias updated is always that of the router that actually routed.
    """

    def __init__(self, model: nn.Module, rate: float):
        self.rate = rate
        self.counts: dict[nn.Module, torch.Tensor] = {}
        self.last_imbalance = float("nan")
        self._handles = [router.register_forward_hook(self._record) for router in routers(model)]
        if not self._handles:
            raise ValueError("the model has no router with a balancing bias (is it a carved checkpoint?)")

    def _record(self, module, args, output) -> None:
        if not module.training:  # evaluations during training must not steer the bias
            return
        if torch._C._current_graph_task_id() != -1:  # gradient checkpointing's recompute, in backward
            return
        selected = output[-1].detach().reshape(-1)
        experts = module.e_score_correction_bias.numel()
        count = torch.bincount(selected, minlength=experts).float()
        if module in self.counts:
            self.counts[module] += count
        else:
            self.counts[module] = count

    def imbalance(self) -> float:
        """Max over mean tokens per expert, worst layer, since the last step (1.0 = balanced)."""
        loads = [c for c in self.counts.values() if c.sum() > 0]
        if not loads:
            return self.last_imbalance
        return max((c.max() / c.mean()).item() for c in loads)

    @torch.no_grad()
    def step(self) -> None:
        """Apply the balancing rule with this step's loads (summed over processes), then reset."""
        self.last_imbalance = self.imbalance()
        for router, count in self.counts.items():
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                count = count.to(router.e_score_correction_bias.device)
                torch.distributed.all_reduce(count)
            if self.rate:
                direction = torch.sign(count.mean() - count).to(router.e_score_correction_bias)
                router.e_score_correction_bias.add_(direction, alpha=self.rate)
        self.counts.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
