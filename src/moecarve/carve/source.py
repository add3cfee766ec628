"""Opening a dense source model without loading it: config, tokenizer and a lazy tensor reader.

A source is a local Hugging Face directory, a hub id (downloaded when the hub is reachable)
or a `.gguf` file (dequantized once through transformers' GGUF loader into a cached directory).
Tensors are read one at a time from the safetensors shards, so peak memory stays at one layer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")  # any one


class SourceError(ValueError):
    """The source model cannot be read."""


@contextmanager
def damaged_weights_named(path: str | Path) -> Iterator[None]:
    """safetensors' errors do not say which file: name the model or adapter they came from."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as err:
        raise SourceError(f"{path}: a weights file is damaged ({err})") from None


def load_causal_lm(path: str | Path, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)` that refuses a checkpoint lacking a
    weight its config needs (transformers would initialise it at random, with a note among the
    progress output, and every figure made with it would be wrong), and names a config.json that
    does not match the weights in one line instead of a traceback."""
    from transformers import AutoModelForCausalLM

    try:
        with damaged_weights_named(path):
            model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    except RuntimeError as err:
        if "ignore_mismatched_sizes" not in str(err):
            raise
        raise SourceError(  # an edited config.json, say n_routed_experts
            f"{path}: its weights' shapes do not match its config.json (transformers' load report above "
            "names them); restore the config the checkpoint was saved with"
        ) from None
    if missing := sorted(info["missing_keys"]):
        raise SourceError(
            f"{path} lacks {len(missing)} weight(s) its config.json needs, e.g. {missing[0]}: the "
            "checkpoint is incomplete; save, carve or download it again"
        )
    return model


def check_source(model: str | Path) -> None:
    """Refuse a MODEL argument that names no model, without converting or downloading anything."""
    from moecarve import resources

    if not isinstance(model, str | Path):  # a loaded model's repr would be taken as a file name
        raise TypeError(f"model must be a directory, a .gguf file or a hub id, got a {type(model).__name__}")
    text = str(model)
    if text == resources.BUNDLED_MODEL:
        return
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SourceError(f"{path} has no config.json: not a Hugging Face model directory")
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise SourceError(f"model file not found: {path}")
    elif path.exists():
        raise SourceError(f"{text} is a file, not a model directory or a .gguf file")
    elif text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise SourceError(f"model not found: {text} (expected a model directory, a .gguf file or a hub id)")


def resolve_source(model: str | Path) -> Path:
    """Local Hugging Face directory for `model` (a directory, a .gguf file, `bundled` or a hub id)."""
    from moecarve import resources

    check_source(model)
    text = str(model)
    path = Path(text).expanduser()
    if text == resources.BUNDLED_MODEL:
        return resources.bundled_model_dir()
    if path.is_dir():
        return path
    if path.suffix == ".gguf":
        return cached_gguf_dir(path)
    return download_hub_model(text)


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached from here, or None where it may be.

    A hub host name that does not resolve (no network, or only a package mirror) fails at once
    here; huggingface_hub would retry it for about 25 s. Behind a proxy the name is the proxy's to
    resolve, so nothing is concluded there."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    proxies = [
        name for kind in ("https", "http", "all") for name in (f"{kind}_proxy", f"{kind.upper()}_PROXY")
    ]
    if any(os.environ.get(name) for name in proxies):
        return None
    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    try:
        socket.getaddrinfo(host, 443)
    except OSError as err:
        return f"{host}: {err.strerror or err}"
    return None


def download_hub_model(repo_id: str) -> Path:
    """Fetch a hub model's config, checks it can be carved, then its tokenizer and safetensors;
    from the local hub cache alone where the hub is unreachable."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from transformers import AutoConfig

    from moecarve.carve.families import family_for

    offline = hub_unreachable()

    def failed(err) -> SourceError:
        if offline:
            return SourceError(
                f"cannot fetch {repo_id!r}: the Hugging Face hub is unreachable ({offline}), the model "
                "is not in the local hub cache, and it is no local path"
            )
        return SourceError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub (and it is no local path): {err}"
        )

    try:
        config_dir = Path(hf_hub_download(repo_id, "config.json", local_files_only=bool(offline))).parent
    except Exception as err:  # the hub raises many types; one clear line for all of them
        raise failed(err) from err
    family_for(AutoConfig.from_pretrained(config_dir))  # refuse before downloading the weights
    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
                ignore_patterns=["consolidated*"],  # Mistral's duplicate single-file weights
                local_files_only=bool(offline),
            )
        )
    except Exception as err:
        raise failed(err) from err


GGUF_KEY = 16  # hex digits of the content hash in a cached GGUF copy's name, FILE-KEY


def gguf_file_of(cached: Path) -> str | None:
    """The GGUF file name a cached dequantized copy (gguf/FILE-KEY) was made from, else None."""
    stem, _, key = cached.name.rpartition("-")
    if (
        cached.parent.name == "gguf"
        and stem
        and len(key) == GGUF_KEY
        and all(c in "0123456789abcdef" for c in key)
    ):
        return f"{stem}.gguf"
    return None


def cached_gguf_dir(path: Path) -> Path:
    """Dequantize a GGUF file once into a cached fp32 Hugging Face directory.

    transformers' GGUF loader dequantizes the whole model in memory: GGUF sources are not streamed.
    """
    from transformers import AutoConfig

    from moecarve.carve.families import family_for
    from moecarve.carve.writer import atomic_directory
    from moecarve.resources import cache_dir

    with path.open("rb") as file:  # keyed by content: a reinstalled copy of the same file hits
        key = hashlib.file_digest(file, "sha256").hexdigest()[:GGUF_KEY]
    out = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (out / "config.json").exists():
        return out
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:
        raise SourceError(f"cannot read GGUF file {path}: {err}") from err
    family = family_for(config)  # refuse before dequantizing
    if family.gguf_refusal:
        raise SourceError(
            f"cannot carve {path} exactly: {family.gguf_refusal}; carve its Hugging Face checkpoint"
        )
    with atomic_directory(out, exclusive=False) as tmp:  # every converter of this file writes the same
        gguf_to_hf_dir(path, tmp)
    return out


def gguf_to_hf_dir(gguf_path: Path, out: Path) -> None:
    """Write a GGUF model as a plain fp32 safetensors directory (save_pretrained refuses GGUF models)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    except Exception as err:
        raise SourceError(f"cannot read GGUF file {gguf_path}: {err}") from err
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    config.architectures = [type(model).__name__]  # servers (vLLM) pick the model class from it
    config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


FINITE_CHECKED = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
FINITE_CHUNK = 1 << 24  # values per isfinite pass: its mask never a second copy of a large tensor


class TensorSource:
    """Lazy reader of a safetensors checkpoint (single file or sharded with an index)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.finite: set[str] = set()  # tensors found free of nan and inf (a layer is read twice)
        index = self.directory / "model.safetensors.index.json"
        if (self.directory / "model.safetensors").exists():  # first, as transformers reads it: an index
            weight_map = None  # left beside it from an earlier sharded save is not read
        elif index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            raise SourceError(
                f"{self.directory} has no model.safetensors or model.safetensors.index.json "
                "(only safetensors checkpoints are read; convert .bin files first)"
            )
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.file_of: dict[str, str] = {}
        for name in files:
            path = self.directory / name
            if not path.exists():
                raise SourceError(f"missing shard {path}")
            keys = self._check_shard(path)
            self.file_of.update(dict.fromkeys(keys, name))
        if weight_map:
            absent = sorted(set(weight_map) - set(self.file_of))
            if absent:
                raise SourceError(f"index names tensors no shard holds, e.g. {absent[0]}")

    @staticmethod
    def _check_shard(path: Path) -> list[str]:
        """Open the shard's header and check every tensor lies inside the file (catches truncation)."""
        try:
            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
            header_len = int.from_bytes(path.open("rb").read(8), "little")
            header = json.loads((path.open("rb").read(8 + header_len))[8:])
        except Exception as err:
            raise SourceError(f"corrupt safetensors file {path}: {err}") from err
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > path.stat().st_size:
            raise SourceError(f"truncated safetensors file {path}: tensors end past the end of the file")
        return keys

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def get(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            raise SourceError(f"tensor {name} not found in {self.directory}")
        with safe_open(str(self.directory / self.file_of[name]), framework="pt") as handle:
            tensor = handle.get_tensor(name)
        if name not in self.finite and tensor.dtype in FINITE_CHECKED:  # carved on, or copied out
            if not all(torch.isfinite(part).all() for part in tensor.reshape(-1).split(FINITE_CHUNK)):
                raise SourceError(
                    f"tensor {name} in {self.directory / self.file_of[name]} holds nan or inf values: the "
                    "source's weights are damaged; download or convert it again"
                )
            self.finite.add(name)
        return tensor

    def shape(self, name: str) -> list[int]:
        """A tensor's shape, read from the shard header without loading the tensor."""
        with safe_open(str(self.directory / self.file_of[name]), framework="pt") as handle:
            return list(handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """A tensor's dtype, read from the shard header without loading the tensor."""
        with safe_open(str(self.directory / self.file_of[name]), framework="pt") as handle:
            code = handle.get_slice(name).get_dtype()
        return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(code, torch.float32)

    def load_into(self, module: torch.nn.Module, prefix: str, dtype: torch.dtype) -> None:
        """Materialise a (meta) module's parameters from the checkpoint, in `dtype`."""
        state = {}
        for key, value in list(module.state_dict(keep_vars=True).items()):
            if isinstance(value, torch.nn.Parameter) or f"{prefix}{key}" in self:
                state[key] = self.get(f"{prefix}{key}").to(dtype)
        module.load_state_dict(state, strict=False, assign=True)


IDENTITY_SAMPLES = 16  # 1 MiB pieces of a weights file larger than 64 MiB that its identity reads


def model_identity(src: Path) -> str:
    """A local model as `tune recover --resume` and batch reruns compare it: its resolved path and
    the sha256 of its config, its carve record and its weights, so that a model carved again at
    the same path with other settings or weights is another model, and a copy is the same. A
    weights file over 64 MiB is read in 16 evenly spaced pieces of 1 MiB (a 7B model's shards: a
    few seconds), which tell two carves apart: a carve rewrites every tensor."""
    digest = hashlib.sha256()
    for name in ("config.json", "carve.json"):
        if (src / name).is_file():
            digest.update(name.encode() + (src / name).read_bytes())
    piece = 1 << 20
    for weights in sorted(src.glob("*.safetensors")):
        size = weights.stat().st_size
        digest.update(f"{weights.name} {size}".encode())
        with weights.open("rb") as file:
            if size <= 64 * piece:
                digest.update(file.read())
                continue
            for i in range(IDENTITY_SAMPLES):
                file.seek((size - piece) * i // (IDENTITY_SAMPLES - 1))
                digest.update(file.read(piece))
    return f"{src.resolve()} sha256:{digest.hexdigest()}"
