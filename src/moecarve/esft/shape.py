"""The expert layout of a model, read from its config alone, so bad input fails before weights load.

Scores and expert files carry this layout; each later stage checks it against its model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from moecarve import moe


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int  # routed experts per MoE layer
    top_k: int
    expert_parameters: int  # parameters of one routed expert
    total_parameters: int

    def record(self) -> dict:
        return {**asdict(self), "moe_layers": list(self.moe_layers)}

    def check(self, record: dict, what: str) -> None:
        """Refuse a scores/experts record made for a model with another expert layout."""
        for key in ("model_type", "moe_layers", "num_experts"):
            theirs, ours = record.get(key), self.record()[key]
            if theirs != ours:
                raise ValueError(f"{what} is for another model: {key} {theirs} there, {ours} in this model")


def model_shape(model_dir: str | Path) -> ModelShape:
    """The layout of a local model directory (config.json only; raises for dense models)."""
    from transformers import AutoConfig

    from moecarve.resources import refuse_bundled

    refuse_bundled(model_dir, "esft")
    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path} (config.json missing)")
    config = AutoConfig.from_pretrained(path)
    moe.family_of(config)  # dense or unsupported: a clear error here
    return shape_of(moe.meta_model(config))


def shape_of(model) -> ModelShape:
    layers = moe.moe_layers(model)
    return ModelShape(
        model_type=model.config.model_type,
        num_layers=len(moe.decoder_layers(model)),
        moe_layers=tuple(layer.index for layer in layers),
        num_experts=layers[0].num_experts,
        top_k=layers[0].top_k,
        expert_parameters=layers[0].expert_parameter_count(),
        total_parameters=sum(p.numel() for p in model.parameters()),
    )
