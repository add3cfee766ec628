"""What a recovery run trains: peft LoRA targets, the router's parameters, and the frozen rest."""

from __future__ import annotations

import warnings

import torch

# Attention, the shared experts and dense-layer FFNs (modules), and the fused routed experts (parameters).
DEFAULT_LORA_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "experts.gate_up_proj",
    "experts.down_proj",
)
ROUTER_SUFFIX = "mlp.gate"


def trainable_model(model, config):
    """Freeze what is not trained; wrap LoRA with peft (the routers become trainable copies that
    peft saves with the adapter, so their balancing bias is checkpointed too)."""
    if config.uses_lora:
        from peft import LoraConfig, get_peft_model

        modules, parameters = _split_targets(model, config.lora_targets)
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            target_modules=modules or None,
            target_parameters=parameters or None,
            modules_to_save=["gate"],
        )
        with warnings.catch_warnings():  # peft's notes on nested parameter wrappers
            warnings.simplefilter("ignore", RuntimeWarning)
            # peft asks transformers 5.25+ for a property it deprecates; nothing a user can change
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            model = get_peft_model(model, lora)
    for name, param in model.named_parameters():
        is_router = is_router_weight(name)
        if config.train == ("full",):
            param.requires_grad_(True)
        elif is_router:
            param.requires_grad_("router" in config.train and "original_module" not in name)
        elif not config.uses_lora:
            param.requires_grad_(False)
    return model


def is_router_weight(name: str) -> bool:
    return f"{ROUTER_SUFFIX}.weight" in name or f"{ROUTER_SUFFIX}.modules_to_save" in name


# peft rewrites module targets with these names into the fused routed-expert parameters of
# transformers 5 MoE models, dropping the shared experts' Linears: those are targeted by weight.
FFN_NAMES = ("gate_proj", "up_proj", "down_proj")


def _split_targets(model, targets: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """LoRA targets as (module names, parameter names); a target matching nothing is refused."""
    if not targets:
        raise ValueError("--lora-targets names no module: give at least one, or train without lora")
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    fused = {name for name, p in model.named_parameters() if p.ndim == 3}
    modules, parameters = [], []

    def named(target: str, names: set[str]) -> bool:  # the whole dotted name, or its last parts
        return any(name == target or name.endswith(f".{target}") for name in names)

    for target in targets:
        matched = False
        if named(target, fused):
            parameters.append(target)
            matched = True
        if named(target, linears):
            if target.rsplit(".", 1)[-1] in FFN_NAMES:
                parameters.append(f"{target}.weight")
            else:
                modules.append(target)
            matched = True
        if not matched:
            raise ValueError(f"LoRA target {target!r} matches no module or expert parameter of the model")
    return modules, parameters
