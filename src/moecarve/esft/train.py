"""ESFT step 4-5: train only the selected experts, save only what was trained.

Everything else (attention, norms, embeddings, routers, unselected experts, and by default the
shared experts) has requires_grad off; fused expert tensors are frozen per slice (esft/optim.py).
Training runs in the transformers Trainer, so `accelerate launch` scales it (DDP; sharded
FSDP/DeepSpeed are not supported: the slice optimiser indexes whole tensors).
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import ConfigDict, Field, model_validator
from safetensors.torch import save_file

from moecarve import moe
from moecarve.carve.config import Settings, settings_of
from moecarve.esft.data import (
    Collator,
    as_dataset,
    file_sha256,
    load_examples,
    pad_id,
    text_examples,
    token_examples,
)
from moecarve.esft.merge import base_digest
from moecarve.esft.optim import SliceAdamW, mask_gradient
from moecarve.esft.score import length_cap
from moecarve.esft.select import read_experts, validate_experts
from moecarve.esft.shape import model_shape
from moecarve.eval.common import versions
from moecarve.isolation import kept_random_state, released_accelerate_state
from moecarve.resources import is_protocol_text

FORMAT = "moecarve-esft-adapter/1"
CONFIG_FILE, TENSORS_FILE = "esft_config.json", "esft.safetensors"


class EsftConfig(Settings):
    """Training settings (paper: lr 1e-5, AdamW (0.9, 0.95), weight decay 0.1)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # an inf lr trains NaN weights

    steps: int = Field(100, ge=1, description="optimiser steps")
    lr: float = Field(1e-5, gt=0, description="peak learning rate")
    batch_size: int = Field(4, ge=1, description="sequences per device per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimiser step")
    max_length: int = Field(512, ge=2, description="tokens per sequence (longer prompts lose their start)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW's decoupled weight decay")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW's first-moment decay")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW's second-moment decay")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="how the learning rate moves after the warm-up"
    )
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm (0: none)")
    train_shared: bool = Field(False, description="also train the shared experts")
    train_non_expert: bool = Field(False, description="also train attention, norms, embeddings, routers")
    mix_general: str | None = Field(None, description="general text mixed into training (file or 'protocol')")
    mix_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of training sequences from mix_general")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: autocast to bfloat16 over fp32 weights (on GPUs from Ampere on; fast on CPUs with AVX512-BF16)",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: less memory, more time"
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds the order of the training sequences")

    @model_validator(mode="after")
    def _mix_needs_both(self):
        if bool(self.mix_general) != (self.mix_ratio > 0):
            raise ValueError("--mix-general needs a text source and a ratio in (0, 1): TEXT:RATIO")
        return self


def trainable_parameters(model, experts: dict[int, list[int]], config: EsftConfig) -> list[dict]:
    """Optimiser groups: each trained tensor with `rows` (selected expert slices) or None (whole).

    Sets requires_grad accordingly and masks gradients of unselected slices; each sliced group's
    `mask` is the handle that removes its mask (train_experts removes them once trained).
    """
    layers = {layer.index: layer for layer in moe.moe_layers(model)}
    for param in model.parameters():
        param.requires_grad_(config.train_non_expert)
    groups = []
    for layer in layers.values():
        expert_params = layer.expert_parameters()
        for param in expert_params.values():
            param.requires_grad_(False)
        for param in layer.shared_parameters().values():
            param.requires_grad_(config.train_shared)
        if layer.index not in experts:
            continue
        rows = torch.tensor(experts[layer.index], dtype=torch.long)
        for name, param in expert_params.items():
            param.requires_grad_(True)
            mask = mask_gradient(param, rows)
            groups.append({"params": [param], "rows": rows, "name": name, "mask": mask})
    names = {id(p): n for n, p in model.named_parameters()}
    sliced = {id(g["params"][0]) for g in groups}
    groups += [
        {"params": [p], "rows": None, "name": names[id(p)]}
        for p in model.parameters()
        if p.requires_grad and id(p) not in sliced
    ]
    return groups


def count_trainable(groups: list[dict]) -> int:
    return sum(
        p.numel() if g["rows"] is None else p[0].numel() * len(g["rows"]) for g in groups for p in g["params"]
    )


def fit(
    model, dataset: list[dict], collator, config: EsftConfig, optimizer=None, device: str | None = None
) -> dict:
    """Run the transformers Trainer for config.steps on `device` (None: transformers' choice);
    returns time, losses and steps.

    `optimizer` None lets the Trainer build its AdamW (used by the full and LoRA baselines).
    """
    from accelerate.utils import extract_model_from_parallel
    from transformers import Trainer

    # imports transformers' Trainer
    from moecarve.tune.trainer import (
        OneDeviceArguments,
        check_trained_weights,
        overflow_as_divergence,
        shared_arguments,
        trained_on,
        warn_if_loss_rose,
    )

    with tempfile.TemporaryDirectory(prefix="esft-trainer-") as work:
        args = OneDeviceArguments(
            output_dir=work,
            max_steps=config.steps,
            per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.grad_accum,
            learning_rate=config.lr,
            weight_decay=config.weight_decay,
            adam_beta1=config.beta1,
            adam_beta2=config.beta2,
            warmup_steps=config.warmup_steps,
            lr_scheduler_type=config.schedule,
            max_grad_norm=config.max_grad_norm,
            logging_steps=max(1, config.steps // 20),
            save_strategy="no",
            **shared_arguments(config, device),
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=collator,
            optimizers=(optimizer, None),
        )
        start = time.perf_counter()
        with (
            overflow_as_divergence(),
            moe.routers_in_fp32(model) if config.precision == "bf16" else contextlib.nullcontext(),
        ):
            output = trainer.train()
        extract_model_from_parallel(model, keep_fp32_wrapper=False)  # the forward accelerate autocast
        seconds = time.perf_counter() - start
        check_trained_weights(model)
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        warn_if_loss_rose(losses)
    return {
        "seconds": seconds,
        "train_loss": output.training_loss,
        "losses": losses,
        "steps": config.steps,
        "device": trained_on(args),
    }


def training_set(model_dir, data, tokenizer, config: EsftConfig) -> list[dict]:
    """Task examples plus, with mix_general, general-text pieces making up mix_ratio of the set."""
    examples = load_examples(data, tokenizer, config.max_length)
    if config.mix_general:
        from moecarve.carve.calib import read_text
        from moecarve.tune.data import usable_stream

        source = None if is_protocol_text(config.mix_general) else Path(config.mix_general).expanduser()
        if source is not None and not source.exists():
            raise FileNotFoundError(
                f"--mix-general {config.mix_general}: no such file or directory "
                "(a text or JSONL file, a directory of .txt files, or 'protocol')"
            )
        wanted = math.ceil(len(examples) * config.mix_ratio / (1 - config.mix_ratio))
        if source is None:  # the passages without the tail the perplexity protocol scores
            ids, *_ = usable_stream(tokenizer, None, "--mix-general")
            general = token_examples(ids.tolist(), config.max_length)
        else:  # the start of the text, cut before tokenizing: a general corpus can be large
            text, _ = read_text(source, "--mix-general")
            general = text_examples(text[: 8 * wanted * config.max_length], tokenizer, config.max_length)
        if len(general) < wanted:
            raise ValueError(
                f"general text gives {len(general)} sequences, {wanted} needed for the mix ratio"
            )
        examples += general[:wanted]
    return as_dataset(examples)


def train_experts(
    model, experts: dict[int, list[int]], dataset, collator, config: EsftConfig, declared=None, device=None
):
    """Train a loaded model in place, only its selected slices (plus what config adds); returns
    the optimiser groups, the training stats and the digest of the base values they replaced
    (rounded to `declared`, the checkpoint's declared dtype, as merge will load them)."""
    groups = trainable_parameters(model, experts, config)
    digest = base_digest(model, plan(groups), declared)
    optimizer = SliceAdamW(
        [{"params": g["params"], "rows": g["rows"]} for g in groups],
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        weight_decay=config.weight_decay,
    )
    try:
        stats = fit(model, dataset, collator, config, optimizer, device)
    finally:  # a model trained again (or on) in this process must not keep this selection's masks
        for group in groups:
            if "mask" in group:
                group.pop("mask").remove()
    return groups, stats, digest


def plan(groups: list[dict]) -> dict[str, list[int] | None]:
    """What an adapter replaces: each trained tensor's rows, or None for the whole tensor."""
    return {g["name"]: None if g["rows"] is None else g["rows"].tolist() for g in groups}


def train(
    model_dir,
    experts_file,
    data,
    out,
    config: EsftConfig | None = None,
    *,
    overwrite: bool = False,
    device: str | None = None,
) -> dict:
    """ESFT: train the selected experts of MODEL on the task data, save the adapter to `out`.
    `device`: cpu, cuda or cuda:N (None: transformers' choice, CUDA where present)."""
    from transformers import AutoTokenizer

    from moecarve.carve.source import load_causal_lm
    from moecarve.carve.writer import atomic_directory, check_apart, check_output
    from moecarve.tune.trainer import training_device

    if out is None:
        raise ValueError("an output directory is needed for the adapter (--out)")
    model_dir = Path(model_dir).expanduser()
    config = settings_of(EsftConfig, config)
    device = training_device(device, "esft train", config.precision)
    out = Path(out).expanduser()
    check_output(out, model_dir, overwrite, marker="esft_config.json")
    check_apart(
        {"--out": out},
        {"model": model_dir, "--experts": experts_file, "--data": data, "--mix-general": config.mix_general},
    )
    shape = model_shape(model_dir)
    config = config.model_copy(update={"max_length": length_cap(model_dir, config.max_length)})
    record = read_experts(experts_file)
    shape.check(record, f"experts file {experts_file}")
    experts = validate_experts(record, shape.num_experts, shape.moe_layers, f"experts file {experts_file}")
    if config.train_shared and not moe.FAMILIES[shape.model_type].shared:
        raise ValueError(f"--train-shared: {shape.model_type} models have no shared experts")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset, data_sha256 = training_set(model_dir, data, tokenizer, config), file_sha256(data)
    per_step = config.batch_size * config.grad_accum
    if per_step > len(dataset):  # each step would see the whole set, more than once
        raise ValueError(
            f"one step takes {per_step} examples (--batch-size {config.batch_size} x --grad-accum "
            f"{config.grad_accum}), the training set has {len(dataset)}: lower them"
        )
    from moecarve.tune.trainer import warn_if_warmup_fills

    # said once every check has passed
    warn_if_warmup_fills(config.steps, config.warmup_steps, config.lr, ("steps", "warmup_steps", "lr"))

    with released_accelerate_state(), kept_random_state():  # given back as the caller had them
        torch.manual_seed(config.seed)
        model = load_causal_lm(model_dir, dtype=torch.float32)
        model.config.use_cache = False
        groups, stats, digest = train_experts(
            model,
            experts,
            dataset,
            Collator(pad_id(tokenizer)),
            config,
            moe.declared_dtype(model_dir),
            device,
        )
        tensors = {
            g["name"]: (p.detach() if g["rows"] is None else p.detach().index_select(0, g["rows"]))
            .contiguous()
            .cpu()
            for g in groups
            for p in g["params"]
        }
        result = {
            "format": FORMAT,
            "base_model": str(Path(model_dir).expanduser().resolve()),
            "base_digest": digest,
            **shape.record(),
            "experts": {str(k): v for k, v in experts.items()},
            "tensors": plan(groups),
            "trainable_parameters": count_trainable(groups),
            "examples": len(dataset),
            "data": str(Path(data).expanduser().resolve()),
            "data_sha256": data_sha256,
            "config": config.model_dump(),
            "training": stats,
            "versions": versions(),
        }
        from accelerate import PartialState

        if not PartialState().is_main_process:  # under `accelerate launch`, one process writes
            return result
        with atomic_directory(out) as tmp:
            save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": "pt"})
            (tmp / CONFIG_FILE).write_text(json.dumps(result, indent=1) + "\n")
        return result
