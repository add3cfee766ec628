"""The transformers Trainer as recovery runs it: a router step scaled to each router's weights,
distillation from the dense source, and the balancing rule after every optimiser step."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from moecarve import MoecarveWarning
from moecarve.tune.adapters import is_router_weight
from moecarve.tune.balance import LoadTracker


class Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self):
        return self.blocks.shape[0]

    def __getitem__(self, index):
        ids = self.blocks[index]
        return {"input_ids": ids, "labels": ids}


class TrainingDiverged(ValueError):
    """The loss went to nan/inf: the trained weights are not a model to write."""


def check_trained_weights(model) -> None:
    """Refuse, before any output is written, the weights of a run whose loss went to nan/inf
    (transformers' Trainer would log such a loss as the mean of the finite ones)."""
    bad = [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    bad += [  # the routers' balancing bias, which the bias rule moves outside the optimiser
        name
        for name, b in model.named_buffers()
        if name.endswith("e_score_correction_bias") and not torch.isfinite(b).all()
    ]
    if bad:
        raise TrainingDiverged(
            f"training diverged: {len(bad)} trained tensor(s) hold nan or inf (first {bad[0]}); "
            "lower --lr and rerun (nothing was written)"
        )


def warn_if_warmup_fills(steps: int, warmup: int, lr: float, names: tuple[str, str, str]) -> None:
    """Warn of a warm-up as long as the run: its learning rate never reaches the one asked for.
    `names` are how the caller's user spells steps, warm-up and learning rate."""
    if 0 < steps <= warmup:
        steps_name, warmup_name, lr_name = names
        warnings.warn(
            f"{warmup_name} {warmup} is not below {steps_name} {steps}: the learning rate never reaches "
            f"{lr_name} {lr:g} (the first step runs at 0); lower {warmup_name}",
            MoecarveWarning,
            stacklevel=3,
        )


def warn_if_loss_rose(losses: list[float]) -> None:
    """Warn when a run ends well above where it began (the mean of its last quarter of logged losses
    10% over that of its first): a learning rate too high can flatten a model's predictions towards
    uniform (loss ln(vocab)) with every weight finite, which no divergence check refuses. Quarters
    and the margin keep one batch's noise in a short run from setting it off."""
    if len(losses) < 8:
        return
    quarter = len(losses) // 4
    first, last = (sum(part) / quarter for part in (losses[:quarter], losses[-quarter:]))
    if last > 1.1 * first:
        warnings.warn(
            f"the training loss rose from {first:.4f} to {last:.4f} (means of the first and last {quarter} "
            "logged): the run may have diverged; evaluate the model before using it, or rerun with a "
            "lower learning rate",
            MoecarveWarning,
            stacklevel=2,
        )


class Announce(TrainerCallback):
    """Print `line` once training begins: after every check and load, so a refused run prints only
    its error (one process of several)."""

    def __init__(self, line: str):
        self.line = line

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            print(self.line, flush=True)


@contextlib.contextmanager
def overflow_as_divergence():
    """A step too large for float32 (a huge --lr or LoRA alpha) makes torch refuse it with an
    overflow RuntimeError: that run diverged too."""
    try:
        yield
    except RuntimeError as err:
        if "without overflow" not in str(err):
            raise
        raise TrainingDiverged(
            "training diverged: a step overflowed float32; lower the learning rates (or the LoRA alpha) "
            "and rerun (nothing was written)"
        ) from err


@dataclass
class OneDeviceArguments(TrainingArguments):
    """TrainingArguments that train on `train_device` (cpu, cuda or cuda:N) alone. Left to itself
    the Trainer takes cuda:0 and, seeing several GPUs, wraps the model in DataParallel over them all."""

    train_device: str | None = None

    def __post_init__(self):
        from transformers.utils.logging import is_progress_bar_enabled

        if self.disable_tqdm is None and not is_progress_bar_enabled():  # a quiet batch's jobs
            self.disable_tqdm = True
        super().__post_init__()

    @cached_property
    def _setup_devices(self) -> torch.device:
        device = TrainingArguments._setup_devices.func(self)
        if self.train_device is None or device.type != "cuda":
            return device
        self._n_gpu = 1  # no DataParallel: as transformers does for a model placed across GPUs
        target = torch.device(self.train_device)
        if target.index is None:
            return device
        torch.cuda.set_device(target)  # accelerate places the model and the batches on the current GPU
        return target


def training_device(device, stage: str, precision: str = "fp32") -> str | None:
    """`device` checked before any model loads; None stays None (transformers' choice). Refused
    under `accelerate launch`, where each process trains on the GPU the launcher gave it. bf16 is
    refused on a GPU or CPU without it (it would be emulated, slower than fp32) and under
    DataParallel (no --device on a machine of several GPUs), where the Trainer would not autocast."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    from moecarve.devices import DeviceError, default_device, native_bf16, resolve_device
    from moecarve.isolation import released_accelerate_state

    resolved = None if device is None else resolve_device(device, stage)
    with released_accelerate_state():  # a check leaves accelerate's process-wide state as it was
        distributed = PartialState().distributed_type != DistributedType.NO  # torchrun's one process too
    if resolved is not None and distributed:
        raise DeviceError(device, "under accelerate launch each process trains on its own GPU; leave it out")
    if precision != "bf16":
        return resolved
    target = resolved or default_device()
    if resolved is None and not distributed and torch.cuda.device_count() > 1:
        raise ValueError(
            "--precision bf16: without --device the Trainer spreads training over every GPU with "
            "DataParallel, which it does not autocast; give --device cuda (one GPU) or use accelerate launch"
        )
    if native_bf16(target) is False:  # where torch cannot tell (ARM), not refused
        name = torch.cuda.get_device_name(torch.device(target)) if target.startswith("cuda") else "this CPU"
        raise ValueError(f"--precision bf16: {name} has no native bfloat16 (it would be emulated); use fp32")
    return resolved


def trained_on(args: TrainingArguments) -> str:
    """Where a Trainer with these arguments trained, as its record says: a device, or DataParallel's GPUs."""
    return f"{args.n_gpu} GPUs (DataParallel)" if args.n_gpu > 1 else str(args.device)


def device_arguments(device: str | None) -> dict:
    """TrainingArguments' fields for a device resolved by `moecarve.devices.resolve_device`; None
    keeps transformers' choice (CUDA where present, every GPU the process sees)."""
    if device is None:
        return {"use_cpu": not torch.cuda.is_available()}
    return {"use_cpu": torch.device(device).type == "cpu", "train_device": device}


def compute_arguments(config) -> dict:
    """TrainingArguments' fields for a config's `precision` and `gradient_checkpointing` (recover's
    and ESFT's): bf16 autocast over fp32 weights, and recomputing each layer's activations in the
    backward pass (non-reentrant, so frozen inputs need no gradient)."""
    compute = {"bf16": config.precision == "bf16"}
    if config.gradient_checkpointing:  # only when on: transformers warns of an explicit False
        compute.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    return compute


def result_settings(settings: dict) -> dict:
    """A training's settings (recover's or ESFT's, as plain data) without those that decide no
    result, as runs before them recorded theirs: gradient checkpointing (it recomputes the same
    values), how often it checkpoints, and the precision when it is fp32 (what every run trained in
    before it was a setting); recover's `train` parts in sorted order (its default was once
    router, lora). Batch fingerprints and recover's resume identity take them so."""
    settings = {
        key: value for key, value in settings.items() if key not in ("gradient_checkpointing", "save_every")
    }
    if isinstance(settings.get("train"), list | tuple):
        settings["train"] = sorted(settings["train"])
    if settings.get("precision") == "fp32":
        del settings["precision"]
    return settings


def shared_arguments(config, device: str | None) -> dict:
    """The TrainingArguments that recover and esft train share: seeded data order, no reporting, a
    diverged loss logged as nan (not hidden), the device and the compute settings."""
    return {
        "seed": config.seed,
        "data_seed": config.seed,
        "logging_nan_inf_filter": False,
        "report_to": [],
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        **device_arguments(device),
        **compute_arguments(config),
    }


def training_arguments(config, checkpoints: Path, device: str | None = None) -> TrainingArguments:
    return OneDeviceArguments(
        output_dir=str(checkpoints),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        warmup_steps=config.warmup,
        lr_scheduler_type="cosine",
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.0,
        logging_steps=max(1, min(10, config.steps // 10)),
        save_steps=config.save_every,
        save_total_limit=2,
        **shared_arguments(config, device),
    )


class RecoverTrainer(Trainer):
    """The Trainer with one optimiser group per router (its step scaled to that router's weights)."""

    def __init__(self, *args, router_lr: float, teacher=None, distill: float = 0.0, **kwargs):
        self.router_lr, self.teacher, self.distill = router_lr, teacher, distill
        super().__init__(*args, **kwargs)
        if teacher is not None:
            teacher.to(self.args.device)
            # compute_loss returns a per-micro-batch mean: let the Trainer divide by grad_accum.
            self.loss_is_scaled_for_ga = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Language-modelling loss, mixed with KL(dense || carved) per token when distilling."""
        if self.teacher is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**inputs)
        # Under bf16 the Trainer autocasts only the model it prepared, the student: the teacher here
        bf16 = torch.autocast(self.args.device.type, dtype=torch.bfloat16, enabled=self.args.bf16)
        with torch.no_grad(), bf16:
            target = self.teacher(input_ids=inputs["input_ids"]).logits[:, :-1].float().log_softmax(-1)
        student = outputs.logits[:, :-1].float().log_softmax(-1)
        kl = torch.nn.functional.kl_div(
            student.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean"
        )
        loss = (1 - self.distill) * outputs.loss + self.distill * kl
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = model or self.model
            others, groups = [], []
            for name, param in model.named_parameters():
                if not param.requires_grad:
                    continue
                if is_router_weight(name):
                    scale = param.detach().float().pow(2).mean().sqrt().item()
                    groups.append({"params": [param], "lr": self.router_lr * max(scale, 1e-12)})
                else:
                    others.append(param)
            groups.insert(0, {"params": others, "lr": self.args.learning_rate})  # the logged lr
            self.optimizer = torch.optim.AdamW(
                [g for g in groups if g["params"]],
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                weight_decay=self.args.weight_decay,
            )
        return self.optimizer

    def log(self, logs, *args, **kwargs):
        tracker = next(
            cb.tracker for cb in self.callback_handler.callbacks if isinstance(cb, BalanceCallback)
        )
        if "loss" in logs:
            logs["load_imbalance"] = round(tracker.last_imbalance, 3)
        super().log(logs, *args, **kwargs)


class CurrentSaveInterval(TrainerCallback):
    """A resumed run takes the checkpoint's save interval with the Trainer's state; the one this run
    was given (its `save_every`, which decides no result) is the one it keeps."""

    def on_train_begin(self, args, state, control, **kwargs):
        state.save_steps = args.save_steps


class BalanceCallback(TrainerCallback):
    def __init__(self, tracker: LoadTracker):
        self.tracker = tracker

    def on_step_end(self, args, state, control, **kwargs):
        self.tracker.step()
