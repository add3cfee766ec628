"""ESFT step 5: put an adapter's trained tensors back into a full native checkpoint.

The base model is loaded with stock transformers (fused experts), the trained expert slices are
copied in, and `save_pretrained` writes the per-expert names back; only selected slices (and any
whole tensors trained with --train-shared / --train-non-expert) differ from the base.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from moecarve.carve.calib import read_json
from moecarve.carve.source import damaged_weights_named, load_causal_lm
from moecarve.carve.target import write_rotary_at_top_level
from moecarve.carve.writer import atomic_directory, check_apart, check_output
from moecarve.esft.select import validate_experts
from moecarve.esft.shape import model_shape
from moecarve.moe import declared_dtype

ADAPTER_FORMAT = "moecarve-esft-adapter/1"
COPIED = ("generation_config.json",)  # and carve.json, with this training appended to its record
# what a merge records of its adapter
TRAINING_RECORD = (
    "data", "data_sha256", "examples", "base_digest", "experts", "trainable_parameters", "config", "training",
    "versions",
)  # fmt: skip


def read_adapter(adapter: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from moecarve.esft.train import CONFIG_FILE, TENSORS_FILE

    adapter = Path(adapter).expanduser()
    if not (adapter / CONFIG_FILE).is_file() or not (adapter / TENSORS_FILE).is_file():
        raise FileNotFoundError(f"no ESFT adapter at {adapter} ({CONFIG_FILE} and {TENSORS_FILE} expected)")
    record = read_json(adapter / CONFIG_FILE)
    if not isinstance(record, dict) or record.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{adapter} is not an `esft train` output ({ADAPTER_FORMAT})")
    if not isinstance(record.get("tensors"), dict):
        raise ValueError(f"{adapter / CONFIG_FILE} is damaged: its tensors must map names to rows")
    with damaged_weights_named(adapter):
        tensors = load_file(str(adapter / TENSORS_FILE))
    bad = [
        name
        for name, value in tensors.items()
        if value.is_floating_point() and not torch.isfinite(value).all()
    ]
    if bad:  # training refuses such weights; a file changed since is not merged either
        raise ValueError(f"adapter {adapter}: {bad[0]} holds nan or inf")
    return record, tensors


def base_digest(model, plan: dict[str, list[int] | None], dtype: torch.dtype | None) -> str:
    """sha256 of the base values an adapter replaces (each tensor's trained rows, or all of it).

    Rounded to `dtype` (the checkpoint's declared dtype) and taken in float32, so training (which
    loads float32) and merging (which loads what transformers' `dtype="auto"` picks) of the same
    checkpoint agree bit for bit.
    """
    params = dict(model.named_parameters())
    digest = hashlib.sha256()
    for name in sorted(plan):
        value = params[name].detach()
        if plan[name] is not None:
            value = value.index_select(0, torch.tensor(plan[name], device=value.device))
        value = value.to(dtype) if dtype is not None else value
        digest.update(name.encode())
        digest.update(value.to("cpu", torch.float32).contiguous().numpy())
    return digest.hexdigest()


def copy_plan(model, record: dict, tensors: dict[str, torch.Tensor]) -> list:
    """(parameter, rows, value) per adapter tensor; names, shapes and rows checked before any copy."""
    params = dict(model.named_parameters())
    plan = []
    for name, rows in record["tensors"].items():
        if name not in params or name not in tensors:
            raise ValueError(f"adapter tensor {name} is missing from the model or the adapter file")
        param, value = params[name], tensors[name]
        expected = param.shape if rows is None else (len(rows), *param.shape[1:])
        if tuple(value.shape) != tuple(expected):
            raise ValueError(
                f"adapter tensor {name} has shape {tuple(value.shape)}, {tuple(expected)} expected"
            )
        if rows is not None and not all(isinstance(r, int) and not isinstance(r, bool) for r in rows):
            raise ValueError(f"adapter tensor {name}: its rows must be whole numbers")
        if rows is not None and not all(0 <= r < param.shape[0] for r in rows):
            raise ValueError(f"adapter tensor {name} names rows outside 0..{param.shape[0] - 1}")
        plan.append((param, rows, value))
    return plan


def check_base(model, record: dict, adapter, base) -> None:
    """Refuse an adapter trained on another model of the same layout: its slices would silently
    replace weights it never saw. Adapters from before the digest was recorded are not checked."""
    if "base_digest" not in record:
        return
    if base_digest(model, record["tensors"], declared_dtype(base)) != record["base_digest"]:
        trained_on = record.get("base_model")
        where = f" ({trained_on})" if trained_on and Path(trained_on) != Path(base).resolve() else ""
        raise ValueError(
            f"adapter {adapter} was trained on another model{where}: the weights it replaces in "
            f"{base} differ from those it was trained on; merge it into the model it was trained on"
        )


def apply_adapter(plan: list) -> None:
    """Copy the trained tensors of a checked copy plan into the loaded model."""
    with torch.no_grad():
        for param, rows, value in plan:
            value = value.to(device=param.device, dtype=param.dtype)
            if rows is None:
                param.copy_(value)
            else:
                param.index_copy_(0, torch.tensor(rows, device=param.device), value)


def merge(model_dir: str | Path, adapter: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write base + adapter as a full checkpoint that stock transformers loads."""
    from transformers import AutoTokenizer

    if out is None:
        raise ValueError("an output directory is needed for the merged model (--out)")
    out = Path(out).expanduser()
    base = Path(model_dir).expanduser()
    if out.resolve() == base.resolve():
        raise ValueError(f"output {out} is the base model itself")
    check_output(out, base, overwrite, marker="esft.json")
    check_apart({"--out": out}, {"model": base, "the adapter": adapter})
    shape = model_shape(base)
    record, tensors = read_adapter(adapter)
    shape.check(record, f"adapter {adapter}")
    validate_experts(record, shape.num_experts, shape.moe_layers, f"adapter {adapter}")
    model = load_causal_lm(base, dtype="auto")
    plan = copy_plan(model, record, tensors)
    check_base(model, record, adapter, base)
    apply_adapter(plan)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        write_rotary_at_top_level(tmp)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
        for name in COPIED:
            if (base / name).is_file():
                shutil.copy2(base / name, tmp / name)
        # the carve's record (a model no carve made: a record of its stages alone), with this
        # training appended: the task data, the experts and how they were trained
        carve = read_json(base / "carve.json") if (base / "carve.json").is_file() else {}
        trained = {key: record[key] for key in TRAINING_RECORD if key in record}
        entry = {
            "stage": "esft",
            "model": str(base.resolve()),
            "adapter": str(Path(adapter).resolve()),
            **trained,
        }
        if isinstance(carve, dict):
            carve.setdefault("tune", []).append(entry)
            (tmp / "carve.json").write_text(json.dumps(carve, indent=2) + "\n")
        else:  # not a record of ours: copied as it is
            shutil.copy2(base / "carve.json", tmp / "carve.json")
        (tmp / "esft.json").write_text(
            json.dumps({"base_model": record["base_model"], **entry}, indent=1) + "\n"
        )
    return out
