"""Recovery fine-tune of a carved checkpoint (CMoE's lightweight fine-tune, with its defects fixed).

LoRA (peft) on attention and every expert, the router trained with its own step size, and the
balancing bias updated by the auxiliary-loss-free rule; the loop is the transformers Trainer,
so `accelerate launch` runs the same code on many GPUs. The result is a native glm4_moe
checkpoint with the LoRA merged, written atomically; checkpoints live beside it until the end.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from accelerate import PartialState
from accelerate.utils import extract_model_from_parallel
from pydantic import ConfigDict, Field, field_validator, model_validator
from transformers import AutoTokenizer, TrainerCallback, set_seed

from moecarve import MoecarveWarning
from moecarve.carve.calib import read_json, text_identity
from moecarve.carve.config import Settings, settings_of
from moecarve.carve.source import load_causal_lm, model_identity
from moecarve.carve.target import write_rotary_at_top_level
from moecarve.carve.writer import atomic_directory, check_apart, check_output
from moecarve.eval.common import versions
from moecarve.eval.ppl import check_eval_ppl_positions, check_positions
from moecarve.isolation import kept_random_state, released_accelerate_state
from moecarve.moe import declared_dtype, routers_in_fp32
from moecarve.tune.adapters import DEFAULT_LORA_TARGETS, trainable_model
from moecarve.tune.balance import LoadTracker
from moecarve.tune.data import TrainingText, training_blocks
from moecarve.tune.trainer import (
    BalanceCallback,
    Blocks,
    CurrentSaveInterval,
    RecoverTrainer,
    TrainingDiverged,
    check_trained_weights,
    overflow_as_divergence,
    result_settings,
    trained_on,
    training_arguments,
    training_device,
    warn_if_loss_rose,
    warn_if_warmup_fills,
)


class RecoverConfig(Settings):
    """What `moecarve tune recover` trains, and how."""

    # allow_inf_nan: an infinite learning rate would train NaN weights
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    steps: int = Field(ge=1, description="optimiser steps")
    train: tuple[Literal["router", "lora", "full"], ...] = Field(
        ("lora", "router"),
        description="router, lora (both by default), or full",  # sorted, as given ones are
    )
    lora_rank: int = Field(
        32, ge=1, description="rank 32 reaches in 100 steps what 8 does in 200 (docs/tune.md)"
    )
    lora_alpha: float = Field(128.0, gt=0, description="LoRA scale: updates are multiplied by alpha / rank")
    lora_targets: tuple[str, ...] = Field(DEFAULT_LORA_TARGETS, description="module or fused-parameter names")
    lr: float = Field(
        1e-3, gt=0, description="learning rate of LoRA (measured, docs/tune.md); --train full needs its own"
    )
    router_lr: float = Field(
        1e-2,
        ge=0,
        description="router step as a fraction of its weights' RMS (Adam steps are ~lr per weight)",
    )
    bias_rate: float = Field(
        1e-5, ge=0, description="balancing-bias change per step (router scores are ~0.5)"
    )
    batch_size: int = Field(4, ge=1, description="sequences per step and device")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimiser step")
    length: int = Field(512, ge=8, description="tokens per training sequence")
    warmup: int = Field(4, ge=0, description="linear warm-up steps")
    save_every: int = Field(50, ge=1, description="checkpoint every this many steps")
    distill: float = Field(
        0.0,
        ge=0,
        le=1,
        description="weight of distillation (KL to the dense source's next-token distribution) in the loss",
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: autocast to bfloat16 over fp32 weights (on GPUs from Ampere on; fast on CPUs with AVX512-BF16)",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: less memory, more time"
    )
    seed: int = Field(
        0,
        ge=0,
        le=2**32 - 1,
        description="seeds LoRA's initialisation and the order of the training sequences",
    )

    @field_validator("train", mode="before")
    @classmethod
    def _split(cls, value):
        given = value.split(",") if isinstance(value, str) else value
        if not isinstance(given, list | tuple | set | frozenset):
            return value  # the field's own check refuses it
        unknown = [name for name in given if name not in ("router", "lora", "full")]
        if unknown:  # named before they are sorted, which moves them
            raise ValueError(f"unknown part {unknown[0]!r}: give router, lora (or both), or full")
        names = tuple(sorted(set(given)))
        if "full" in names and len(names) > 1:
            raise ValueError("full trains every weight: it combines with nothing")
        return names

    @model_validator(mode="after")
    def _full_has_its_own_lr(self):
        if self.train == ("full",) and "lr" not in self.model_fields_set:
            raise ValueError(
                "--train full trains every weight: give it a learning rate of its own (--lr, or lr in a "
                "recipe's recover section); the default 1e-3 is LoRA's"
            )
        return self

    @property
    def uses_lora(self) -> bool:
        return "lora" in self.train


@dataclass
class RecoverResult:
    out: Path
    record: dict
    model: torch.nn.Module  # the merged model as saved


def replicas(processes: int, n_gpu: int) -> int:
    """Model copies that each take a batch per micro-step: the processes of `accelerate launch`,
    times the GPUs DataParallel spreads one process over (no --device on a machine of several; the
    Trainer's n_gpu, 0 on CPU). Counting the processes alone, DataParallel ran out of blocks after
    1/n_gpu of the steps and cycled them."""
    return processes * max(1, n_gpu)


def training_text(tokenizer, data, config: RecoverConfig, processes: int = 1) -> TrainingText:
    """The blocks `config` trains on (`processes` of them each taking a share of a step); refuses a
    text without one step's worth."""
    per_step = config.batch_size * config.grad_accum * processes
    text = training_blocks(tokenizer, data, config.length, config.steps * per_step)
    if text.blocks.shape[0] < per_step:
        raise ValueError(
            f"training text gives {text.blocks.shape[0]} sequences of {config.length} tokens, one step needs "
            f"{per_step}: give more text or lower --batch-size/--length"
        )
    return text


def check_carved(model_dir: Path) -> dict:
    """The model's config.json, refusing anything that is not a carved (glm4_moe) checkpoint."""
    from moecarve.resources import refuse_bundled

    refuse_bundled(model_dir, "tune recover")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no model at {model_dir} (config.json missing)")
    config = read_json(config_path)
    if not isinstance(config, dict) or config.get("model_type") != "glm4_moe":
        kind = config.get("model_type", "unknown") if isinstance(config, dict) else "unknown"
        from moecarve.carve.families import FAMILIES

        advice = (
            f": run `carve {model_dir} --experts 8 --active 2 --out DIR` first and recover DIR"
            if kind in FAMILIES
            else " (nor a dense model carve takes)"
        )
        raise ValueError(f"{model_dir} is a {kind} model, not a carved MoE checkpoint{advice}")
    return config


def recover(
    model: str | Path,
    config: RecoverConfig,
    data: str | Path | None = None,
    out: str | Path | None = None,
    *,
    checkpoints: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    evaluate: bool = False,
    adapter_out: str | Path | None = None,
    teacher: str | Path | None = None,
    callbacks: tuple[TrainerCallback, ...] = (),
    device: str | None = None,
) -> RecoverResult:
    """Fine-tune the carved checkpoint `model` on `data` and write the merged model to `out`.
    `device`: cpu, cuda or cuda:N (None: transformers' choice, CUDA where present)."""
    started = time.perf_counter()
    config = settings_of(RecoverConfig, config, defaults=False)  # steps has none
    device = training_device(device, "tune recover", config.precision)
    src = Path(model).expanduser()
    carved_config = check_carved(src)
    check_positions(src, config.length)  # blocks of exactly --length tokens
    if evaluate:  # scored after training, but refused now
        check_eval_ppl_positions(src)
    if out is None:
        raise ValueError("an output directory is needed (--out)")
    out = Path(out).expanduser()
    check_output(out, src, overwrite)
    if adapter_out is not None:
        adapter_out = Path(adapter_out).expanduser()
        if not config.uses_lora:
            raise ValueError("--adapter-out needs LoRA in --train")
        check_output(adapter_out, src, overwrite, marker="adapter_config.json")
    if teacher is not None and not config.distill:
        raise ValueError("--teacher is the model --distill learns from: give --distill too, or leave it out")
    checkpoints = Path(checkpoints or f"{out}.checkpoints").expanduser()
    local_teacher = Path(teacher).expanduser() if teacher is not None else None
    check_apart(
        {"--out": out, "--checkpoints": checkpoints, "--adapter-out": adapter_out},
        {"model": src, "--data": data, "--teacher": local_teacher},
    )  # the checkpoints are deleted at the end, the outputs replaced; before any teacher download
    teacher_dir = _teacher_dir(src, teacher, carved_config) if config.distill else None
    identity = {**_identity(src, config), "data": text_identity(data), "teacher": str(teacher_dir)}
    with released_accelerate_state(), kept_random_state():  # given back as the caller had them
        state = PartialState()  # under `accelerate launch`: every process reads its share, one writes
        with _running_alone(checkpoints, state.is_main_process):
            _check_checkpoints(checkpoints, identity, resume)

            tokenizer = AutoTokenizer.from_pretrained(src)
            args = training_arguments(config, checkpoints, device)
            text = training_text(tokenizer, data, config, replicas(state.num_processes, args.n_gpu))
            if teacher_dir is not None:
                _check_teacher_tokenizer(teacher_dir, tokenizer, text.blocks[0], src)

            base = load_causal_lm(src.resolve(), dtype=torch.float32)
            set_seed(config.seed)  # LoRA's initialisation: a resumed run rebuilds the same adapter
            save_dtype = declared_dtype(src) or torch.float32
            model_ = trainable_model(base, config)
            tracker = LoadTracker(model_, config.bias_rate)
            trainable = sum(p.numel() for p in model_.parameters() if p.requires_grad)

            teacher_model = _load_teacher(teacher_dir) if teacher_dir else None  # a damaged one fails here
            state.wait_for_everyone()  # every process has checked the checkpoints before one writes
            if state.is_main_process:
                checkpoints.mkdir(parents=True, exist_ok=True)
                (checkpoints / IDENTITY).write_text(json.dumps(identity, indent=2) + "\n")
            # said once every check and load has passed: a refused run prints its error alone
            warn_if_warmup_fills(config.steps, config.warmup, config.lr, ("--steps", "--warmup", "--lr"))
            trainer = RecoverTrainer(
                model=model_,
                args=args,
                train_dataset=Blocks(text.blocks),
                callbacks=[BalanceCallback(tracker), CurrentSaveInterval(), *callbacks],
                router_lr=config.router_lr,
                teacher=teacher_model,
                distill=config.distill,
            )
            last = _last_checkpoint(checkpoints) if resume else None
            output = _train(trainer, model_, tracker, config.precision, last, checkpoints, state)

            # the adapter is renamed into place just after OUT: a kill while the model is merged and written
            # left a lone adapter, whose directory then refused the --resume that the checkpoints allowed
            with contextlib.ExitStack() as outputs:
                if adapter_out is not None and state.is_main_process:
                    adapter_tmp = outputs.enter_context(atomic_directory(adapter_out))
                    model_.save_pretrained(adapter_tmp)  # before merging, which removes the adapters
                trained = model_.merge_and_unload() if config.uses_lora else model_
                if not state.is_main_process:
                    return RecoverResult(out=out.resolve(), record={}, model=trained)
                _cast_parameters(trained, save_dtype)
                trained.config.use_cache = carved_config.get("use_cache", True)  # the Trainer turns it off
                resumed_from = int(last.name.split("-")[1]) if last else None
                record = _record(
                    src, config, text, trainable, trainer, output, started, resumed_from, teacher_dir
                )
                warn_if_loss_rose([row["loss"] for row in record["train_loss"]])
                with atomic_directory(out) as tmp:
                    trained.save_pretrained(tmp)
                    write_rotary_at_top_level(tmp)
                    tokenizer.save_pretrained(tmp)
                    if evaluate:
                        from moecarve.eval.ppl import protocol_ppl

                        before = record["source_quality"] or protocol_ppl(src)
                        record["protocol_ppl"] = {"before": before, "after": protocol_ppl(tmp)}
                    (tmp / "carve.json").write_text(json.dumps(_carve_json(src, record), indent=2) + "\n")
            shutil.rmtree(checkpoints)
            return RecoverResult(out=out.resolve(), record=record, model=trained)


def _train(trainer, model_, tracker, precision: str, last: Path | None, checkpoints: Path, state) -> object:
    """trainer.train, from `last` where resumed; a run that diverges removes its checkpoints (nan
    weights: nothing to resume, and a rerun must start clean)."""
    try:
        with (
            overflow_as_divergence(),
            routers_in_fp32(model_) if precision == "bf16" else contextlib.nullcontext(),
        ):
            output = trainer.train(resume_from_checkpoint=str(last) if last else None)
        extract_model_from_parallel(model_, keep_fp32_wrapper=False)  # the forward accelerate autocast
        tracker.remove()
        check_trained_weights(model_)
    except TrainingDiverged:
        state.wait_for_everyone()
        if state.is_main_process:
            shutil.rmtree(checkpoints, ignore_errors=True)
        raise
    return output


def _teacher_dir(src: Path, teacher, carved_config: dict) -> Path:
    """The dense model to distil from: `teacher`, else the carve's recorded source."""
    from moecarve.carve.source import resolve_source

    recorded = _source_record(src)
    if teacher is None:  # the source's absolute path where it still lies there; else its hub id
        path = recorded.get("source_path")
        local = path is not None and Path(path).is_absolute() and (Path(path) / "config.json").is_file()
        teacher = path if local else recorded.get("source")
        if teacher is None:
            raise ValueError(
                f"{src} records no dense source (no carve record in a carve.json): pass --teacher"
            )
    try:
        path = resolve_source(teacher)
    except (ValueError, OSError) as err:
        raise ValueError(f"distillation teacher {teacher}: {err} (pass --teacher DIR)") from err
    vocab = json.loads((path / "config.json").read_text()).get("vocab_size")
    if vocab != carved_config.get("vocab_size"):
        raise ValueError(
            f"teacher {path} has vocabulary {vocab}, the carved model {carved_config.get('vocab_size')}"
        )
    return path.resolve()


def _check_teacher_tokenizer(teacher_dir: Path, tokenizer, block: torch.Tensor, src: Path) -> None:
    """Distillation compares next-token distributions id by id: the teacher must split the training
    text into the same tokens (a teacher of the same vocabulary size may not)."""
    from moecarve.carve.source import TOKENIZER_FILES

    if not any((teacher_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"teacher {teacher_dir} holds no tokenizer to check against {src}'s")
    probe = tokenizer.decode(block.tolist())
    theirs = AutoTokenizer.from_pretrained(teacher_dir)(probe, add_special_tokens=False)["input_ids"]
    if theirs != tokenizer(probe, add_special_tokens=False)["input_ids"]:
        raise ValueError(
            f"teacher {teacher_dir} splits the training text into other tokens than {src}: distillation "
            "needs the carve's own tokenizer (give the dense model it was carved from)"
        )


def _load_teacher(path: Path):
    teacher = load_causal_lm(path, dtype=torch.float32).eval()
    teacher.requires_grad_(False)
    return teacher


IDENTITY = "recover.json"  # in the checkpoint directory: what the checkpoints are of
LOCK = ".lock"  # in it too, while a run holds it


@contextlib.contextmanager
def _running_alone(checkpoints: Path, main: bool):
    """One run at a time per checkpoint directory (that is, per --out): a second run would take the
    first's checkpoints for an interrupted run's, resume them or delete them under it. An flock on a
    lock file in it (the kernel drops it when its process dies; a file system without flock runs
    unlocked, as before). Directories made here for it go again when the run leaves nothing in them.
    One process of `accelerate launch` locks."""
    if not main or _foreign(checkpoints):  # the latter: refused next, with nothing written into it
        yield
        return
    made = [p for p in (checkpoints, *checkpoints.parents) if not p.exists()]  # deepest first
    checkpoints.mkdir(parents=True, exist_ok=True)
    lock = checkpoints / LOCK
    try:
        handle = lock.open("a")
    except OSError:  # a directory this run cannot write: its first checkpoint says so
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"another tune recover is running with the checkpoints {checkpoints} (the same --out "
                "or --checkpoints): let it finish, or name another"
            ) from None
        except OSError:  # no flock on this file system (some NFS, Lustre)
            pass
        try:
            yield
        finally:  # ours only: the lock of a run still going is never removed
            _remove_made(checkpoints, lock, made)


def _remove_made(checkpoints: Path, lock: Path, made: list[Path]) -> None:
    """The lock and the directories made for it, where the run left nothing else in them."""
    if checkpoints.is_dir() and [p.name for p in checkpoints.iterdir()] == [LOCK]:
        lock.unlink()
    for directory in made:
        if not directory.exists():  # removed with the finished run's checkpoints
            continue
        try:
            directory.rmdir()  # only while empty
        except OSError:
            break


def _foreign(checkpoints: Path) -> bool:
    """A --checkpoints path that is no recover run's directory (it is deleted when the run ends)."""
    return checkpoints.exists() and (
        not checkpoints.is_dir()
        or (any(p.name != LOCK for p in checkpoints.iterdir()) and not (checkpoints / IDENTITY).is_file())
    )


def _check_checkpoints(checkpoints: Path, identity: dict, resume: bool) -> None:
    """A run resumes only its own checkpoints, never silently restarts over them, and never takes
    (and at its end deletes) a directory that is not its checkpoints'."""
    if _foreign(checkpoints):
        raise ValueError(
            f"--checkpoints {checkpoints} exists and holds no {IDENTITY}: it is not a recover run's "
            "checkpoint directory (it is deleted when the run ends); name a new one"
        )
    if not resume:
        if checkpoints.is_dir() and _written_checkpoints(checkpoints):
            raise ValueError(
                f"{checkpoints} holds checkpoints of an interrupted run: pass --resume, or remove it"
            )
        return
    if not checkpoints.is_dir() or _last_checkpoint(checkpoints, warn=False) is None:
        raise ValueError(f"--resume: no complete checkpoint in {checkpoints}")
    saved = json.loads((checkpoints / IDENTITY).read_text())
    if isinstance(saved.get("config"), dict):  # as recorded before some settings were left out of it
        saved["config"] = result_settings(saved["config"])
    if saved != identity:
        settings = saved.get("config") if isinstance(saved.get("config"), dict) else {}
        differ = [k for k in identity if k != "config" and saved.get(k) != identity[k]]
        differ += [f"--{k.replace('_', '-')}" for k in sorted(set(settings) | set(identity["config"]))
                   if settings.get(k) != identity["config"].get(k)]  # fmt: skip
        differ = ", ".join(differ) or "the record"
        raise ValueError(
            f"--resume: the checkpoints in {checkpoints} are of another model, data or configuration "
            f"(differs: {differ})"
        )


def _identity(src: Path, config: RecoverConfig) -> dict:
    return {"model": model_identity(src), "config": result_settings(config.model_dump(mode="json"))}


def _written_checkpoints(checkpoints: Path) -> list[Path]:
    """Checkpoints the Trainer got as far as writing trainer_state.json into (it writes it last), newest first."""
    written = [p for p in checkpoints.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return sorted(written, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def _last_checkpoint(checkpoints: Path, warn: bool = True) -> Path | None:
    """The newest complete checkpoint. trainer_state.json is written in place: a kill while writing it
    leaves a checkpoint that cannot resume, passed over (with a warning where `warn`)."""
    for checkpoint in _written_checkpoints(checkpoints):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
        except (ValueError, OSError):
            if warn:
                warnings.warn(
                    f"{checkpoint} was cut short (its trainer_state.json does not parse): passed over",
                    MoecarveWarning,
                    stacklevel=2,
                )
            continue
        return checkpoint
    return None


def _cast_parameters(model, dtype: torch.dtype) -> None:
    """Weights back to the carve's dtype; buffers (the fp32 balancing bias) stay as they are."""
    for param in model.parameters():
        param.data = param.data.to(dtype)


def _record(src, config, text, trainable, trainer, output, started, resumed_from, teacher) -> dict:
    history = [h for h in trainer.state.log_history if "loss" in h]  # a resumed run's includes the first's
    return {
        "config": config.model_dump(mode="json"),
        "data": {
            "source": text.source,
            "sha256": text.sha256,
            "tokens": text.tokens,
            "held_out_tail_tokens": text.held_out_tokens,
        },
        "trainable_parameters": trainable,
        "train_loss": [
            {"step": h["step"], "loss": h["loss"], "load_imbalance": h.get("load_imbalance")} for h in history
        ],
        # the last logged step's (a mean over logging_steps steps), not the mean of the whole run
        "final_train_loss": history[-1]["loss"] if history else output.training_loss,
        "seconds": round(time.perf_counter() - started, 2),  # this process's: a resumed run's only
        "device": trained_on(trainer.args),
        "resumed_from_step": resumed_from,
        "teacher": str(teacher) if teacher else None,
        "source_quality": carve_quality(src),
        "versions": versions(),
    }


def carve_quality(src: Path) -> dict | None:
    """The protocol PPL its carve measured, while it is still this model's: None once anything
    (a recovery, an ESFT merge) has trained the model since, as its carve.json's `tune` list says."""
    record = _source_record(src)
    if record.get("tune") or (src / "esft.json").is_file():  # merges before the list recorded them
        return None
    return record.get("quality", {}).get("protocol_ppl", {}).get("carved")


def _source_record(src: Path) -> dict:
    path = src / "carve.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _carve_json(src: Path, record: dict) -> dict:
    """The source's carve.json with this recovery appended to its `tune` list."""
    carved = _source_record(src)
    carved.setdefault("tune", []).append({"stage": "recover", "model": str(src.resolve()), **record})
    return carved
