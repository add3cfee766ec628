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
from moecarve.carve.source import damaged_weights_named
from moecarve.carve.writer import atomic_directory, check_apart, check_output
from moecarve.esft.select import validate_experts
from moecarve.esft.shape import model_shape

ADAPTER_FORMAT = "moecarve-esft-adapter/1"
COPIED = ("carve.json", "generation_config.json")


def read_adapter(adapter: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from moecarve.esft.train import CONFIG_FILE, TENSORS_FILE

    adapter = Path(adapter).expanduser()
    if not (adapter / CONFIG_FILE).is_file() or not (adapter / TENSORS_FILE).is_file():
        raise FileNotFoundError(f"no ESFT adapter at {adapter} ({CONFIG_FILE} and {TENSORS_FILE} expected)")
    record = read_json(adapter / CONFIG_FILE)
    if not isinstance(record, dict) or record.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{adapter} is not an `esft train` output ({ADAPTER_FORMAT})")
    with damaged_weights_named(adapter):
        return record, load_file(str(adapter / TENSORS_FILE))


def base_digest(model, plan: dict[str, list[int] | None]) -> str:
    """sha256 of the base values an adapter replaces (each tensor's trained rows, or all of it).

    Taken in float32, which holds bf16 and fp16 values exactly, so training (float32) and merging
    (the checkpoint's dtype) of the same checkpoint agree bit for bit.
    """
    params = dict(model.named_parameters())
    digest = hashlib.sha256()
    for name in sorted(plan):
        if name not in params:
            raise ValueError(f"adapter tensor {name} is missing from the model")
        value = params[name].detach()
        if plan[name] is not None:
            value = value.index_select(0, torch.tensor(plan[name], device=value.device))
        digest.update(name.encode())
        digest.update(value.to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_base(model, record: dict, adapter, base) -> None:
    """Refuse an adapter trained on another model of the same layout: its slices would silently
    replace weights it never saw. Adapters from before the digest was recorded are not checked."""
    if "base_digest" in record and base_digest(model, record["tensors"]) != record["base_digest"]:
        raise ValueError(
            f"adapter {adapter} was trained on another model ({record.get('base_model')}): the weights "
            f"it replaces differ from {base}'s; merge it into the model it was trained on"
        )


def apply_adapter(model, record: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Copy trained tensors into a loaded model; shapes and slices are checked before any copy."""
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
        plan.append((param, rows, value))
    with torch.no_grad():
        for param, rows, value in plan:
            value = value.to(device=param.device, dtype=param.dtype)
            if rows is None:
                param.copy_(value)
            else:
                param.index_copy_(0, torch.tensor(rows, device=param.device), value)


def merge(model_dir: str | Path, adapter: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write base + adapter as a full checkpoint that stock transformers loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    check_base(model, record, adapter, base)
    apply_adapter(model, record, tensors)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
        for name in COPIED:
            if (base / name).is_file():
                shutil.copy2(base / name, tmp / name)
        merged = {key: record[key] for key in ("base_model", "experts", "trainable_parameters", "config")}
        (tmp / "esft.json").write_text(
            json.dumps({**merged, "adapter": str(Path(adapter).resolve())}, indent=1) + "\n"
        )
    return out
