"""Task data for ESFT: token sequences with labels, loss only where the model should answer.

Accepted files:
- JSONL, one object per line, each either `{"prompt": ..., "response": ...}` (loss on the
  response, which gets an EOS), `{"messages": [{"role": ..., "content": ...}, ...]}` (rendered
  with the tokenizer's chat template; loss on the final assistant message), or `{"text": ...}`
  (loss on every token, cut into `max_length` pieces);
- any other file: plain text, loss on every token, cut into `max_length` pieces.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from moecarve.carve.calib import jsonl_records, read_utf8

IGNORE = -100  # label of tokens without loss (transformers' convention)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where there is no loss


def file_sha256(path: str | Path) -> str:
    """A task file's sha256, for the records: its path alone would not tell an edited file."""
    digest = hashlib.sha256()
    with Path(path).expanduser().open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_examples(path: str | Path, tokenizer, max_length: int = 512) -> list[Example]:
    """Every usable example of a task file; raises on a malformed file or one with none usable."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"task data {path} is a directory: give a JSONL or text file")
    if not path.is_file():
        raise FileNotFoundError(f"task data not found: {path}")
    if path.suffix.lower() == ".json":  # read as text it would train on the markup
        raise ValueError(
            f"task data {path} is a .json file: give a JSONL file (one record per line) or a text file"
        )
    if path.suffix.lower() == ".jsonl":
        examples = []
        for number, record in jsonl_records(path):
            examples.extend(_from_record(record, tokenizer, max_length, f"{path}:{number}"))
    else:
        examples = text_examples(read_utf8(path), tokenizer, max_length)
    if not examples:
        raise ValueError(f"task data {path} has no usable examples (empty, or no response tokens left)")
    return examples


def _from_record(record: dict, tokenizer, max_length: int, where: str) -> list[Example]:
    if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        return _pair(tokenizer, record["prompt"], record["response"], max_length, add_eos=True)
    if isinstance(record.get("messages"), list):
        prompt, response = render_chat(tokenizer, record["messages"], where)
        return _pair(tokenizer, prompt, response, max_length, add_eos=False, special=False)
    if isinstance(record.get("text"), str):
        return text_examples(record["text"], tokenizer, max_length)
    raise ValueError(f'{where}: expected "prompt"+"response", "messages" or "text" strings')


def render_chat(tokenizer, messages: list, where: str) -> tuple[str, str]:
    """(prompt text up to the assistant's turn, the final assistant message as the template renders it)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: chat messages need a tokenizer with a chat template")
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(f"{where}: the chat template does not render the prompt as a prefix")
    return prompt, full[len(prompt) :]


def _pair(tokenizer, prompt, response, max_length, add_eos: bool, special: bool = True) -> list[Example]:
    prompt_ids = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    # Too long: the prompt keeps at least half the room (all of itself if shorter), its end, where
    # the question usually is; the response keeps the beginning of the rest.
    response_ids = response_ids[: max_length - min(len(prompt_ids), max_length // 2)]
    prompt_ids = prompt_ids[len(prompt_ids) - min(len(prompt_ids), max_length - len(response_ids)) :]
    if not response_ids or not prompt_ids:
        return []
    return [Example(prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids)]


def text_examples(text: str, tokenizer, max_length: int) -> list[Example]:
    """Plain text cut into max_length pieces, loss on every token (pieces of < 2 tokens dropped)."""
    return token_examples(tokenizer(text, add_special_tokens=False)["input_ids"], max_length)


def token_examples(ids: list[int], max_length: int) -> list[Example]:
    pieces = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return [Example(piece, list(piece)) for piece in pieces if len(piece) > 1]


class Collator:
    """Right-pads a batch; padding has attention 0 and no loss."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in batch)
        out = {"input_ids": [], "labels": [], "attention_mask": []}
        for item in batch:
            pad = width - len(item["input_ids"])
            out["input_ids"].append(item["input_ids"] + [self.pad_id] * pad)
            out["labels"].append(item["labels"] + [IGNORE] * pad)
            out["attention_mask"].append([1] * len(item["input_ids"]) + [0] * pad)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in out.items()}


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def as_dataset(examples: list[Example]) -> list[dict]:
    """A list the Trainer can index: one dict per example."""
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
