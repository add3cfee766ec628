"""Training text for recovery: the `--calib` sources, cut into fixed-length blocks.

The default text is the protocol's own BoolQ passage stream; its last 16 x 2048 tokens are the
protocol's evaluation windows, so they are cut off before training and never seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moecarve import resources
from moecarve.carve.calib import read_text, text_sha256, tokenize_stream

# The protocol's evaluation windows (EVAL_PROTOCOL.md; moecarve.eval.ppl defaults): the tail of
# the default stream that training must not see.
PROTOCOL_TOKENS = 16 * 2048


@dataclass
class TrainingText:
    blocks: torch.Tensor  # [count, length]
    source: str
    held_out_tokens: int  # tokens cut from the end of the stream (the protocol's windows)
    sha256: str  # of the whole text read

    @property
    def tokens(self) -> int:
        return self.blocks.numel()


def usable_stream(tokenizer, source, what: str = "--data") -> tuple[torch.Tensor, str, int, str]:
    """The source's tokens that training may read, its description, how many were held out (of
    the protocol's passages, the scored tail; of any other text, none) and the text's sha256."""
    text, description = read_text(source, what)
    stream = tokenize_stream(tokenizer, text)
    held_out = PROTOCOL_TOKENS if resources.is_protocol_text(source) else 0
    usable = stream[: stream.numel() - held_out] if held_out else stream
    return usable, description, held_out, text_sha256(text)


def training_blocks(tokenizer, source, length: int, count: int) -> TrainingText:
    """`count` blocks of `length` tokens from the start of the source; fewer when it is short, an
    error when not even one block fits."""
    usable, description, held_out, sha256 = usable_stream(tokenizer, source)
    available = usable.numel() // length
    if available < 1:
        raise ValueError(
            f"training text has {usable.numel()} usable tokens, fewer than one block of {length} "
            f"({description}); give more text or a shorter --length"
        )
    count = min(count, available)
    return TrainingText(usable[: count * length].view(count, length), description, held_out, sha256)
