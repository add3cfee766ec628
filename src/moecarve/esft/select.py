"""ESFT step 3: per layer, the fewest experts whose cumulative score reaches p (at least one).

The experts file it writes is what `train` reads: the layer -> experts map, the model layout it
was made for (checked against the model at train time) and the trainable-parameter count.
"""

from __future__ import annotations

import math
from pathlib import Path

from moecarve.carve.calib import read_json
from moecarve.carve.writer import check_apart, check_output_file
from moecarve.esft.score import FORMAT as SCORES_FORMAT
from moecarve.esft.score import SCORES, check_own_output, write_json

FORMAT = "moecarve-esft-experts/1"
TOLERANCE = 1e-9  # normalised scores summing to p up to rounding still reach p


# what select reads from a scores record
SCORES_FIELDS = (
    "scores", "model_type", "num_layers", "moe_layers", "num_experts", "top_k", "expert_parameters", "total_parameters",
)  # fmt: skip


def read_scores(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"scores file {path} is a directory: give the JSON `esft score` wrote")
    if not path.is_file():
        raise FileNotFoundError(f"scores file not found: {path}")
    record = read_json(path)
    if not isinstance(record, dict) or record.get("format") != SCORES_FORMAT:
        raise ValueError(f"{path} is not an `esft score` output ({SCORES_FORMAT})")
    missing = [key for key in SCORES_FIELDS if key not in record]
    if missing:
        raise ValueError(f"{path}: this `esft score` output lacks {', '.join(missing)}")
    damaged = _damaged_scores(record)
    if damaged:
        raise ValueError(f"{path}: this `esft score` output is damaged ({damaged})")
    return record


def _damaged_scores(record: dict) -> str | None:
    """What in a scores record is not as `esft score` writes it, or None."""
    scores = record["scores"]
    if not isinstance(scores, dict) or set(scores) != set(SCORES):
        return f"scores must map {', '.join(SCORES)} to their layers"
    for kind, layers in scores.items():
        if not isinstance(layers, dict):
            return f"scores.{kind} must map layers to scores"
        for index, values in layers.items():
            if not isinstance(values, list) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in values
            ):
                return f"scores.{kind}.{index} must be a list of numbers"
    if not isinstance(record.get("model"), str | None):
        return "model must be a path"
    if not isinstance(record["expert_parameters"], int) or not isinstance(record["total_parameters"], int):
        return "expert_parameters and total_parameters must be whole numbers"
    return None


def choose(scores: list[float], p: float) -> list[int]:
    """Experts by descending score (ties: lower id first) until the cumulative score reaches p."""
    order = sorted(range(len(scores)), key=lambda e: (-scores[e], e))
    chosen, total = [], 0.0
    for expert in order:
        chosen.append(expert)
        total += scores[expert]
        if total >= p - TOLERANCE:
            break
    return sorted(chosen)


def select(
    scores: dict | str | Path, score: str = "token", p: float = 0.2, out: str | Path | None = None
) -> dict:
    """The experts record for a scores record (or file); written to `out` when given."""
    if score not in SCORES:
        raise ValueError(f"--score must be one of {', '.join(SCORES)}, got {score!r}")
    if isinstance(p, bool) or not (isinstance(p, (int, float)) and 0 < p <= 1):  # True would be 1.0
        raise ValueError(f"--p must be a number in (0, 1], got {p!r}")
    record = scores if isinstance(scores, dict) else read_scores(scores)
    if out is not None:  # never over the scores, nor into the model they were made on
        out = check_output_file(out)
        scores_file = None if isinstance(scores, dict) else scores
        check_apart({"--out": out}, {"the scores file": scores_file, "the scored model": record.get("model")})
        check_own_output(out, FORMAT)
    layers = record["scores"][score]
    expected = [str(i) for i in record["moe_layers"]]
    if sorted(layers, key=int) != expected:
        raise ValueError(
            f"scores cover layers {sorted(layers, key=int)}, the model has MoE layers {expected}"
        )
    for index, values in layers.items():
        if len(values) != record["num_experts"] or not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError(f"layer {index}: expected {record['num_experts']} finite non-negative scores")
    experts = {index: choose(layers[index], p) for index in expected}
    selected = sum(len(v) for v in experts.values())
    trainable = selected * record["expert_parameters"]
    result = {
        "format": FORMAT,
        **{key: record[key] for key in ("model_type", "num_layers", "moe_layers", "num_experts", "top_k")},
        **{key: record[key] for key in ("expert_parameters", "total_parameters")},
        "score": score,
        "p": p,
        "scores_file": None if isinstance(scores, dict) else str(Path(scores).expanduser().resolve()),
        "experts": experts,
        "selected": selected,
        "routed_total": len(expected) * record["num_experts"],
        "trainable_parameters": trainable,
        "fraction_of_model": trainable / record["total_parameters"],
    }
    if out is not None:
        write_json(out, result)
    return result


def read_experts(path: str | Path) -> dict:
    """An experts file, checked for shape (the model check is `ModelShape.check`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"experts file not found: {path}")
    record = read_json(path)
    if not isinstance(record, dict) or not isinstance(record.get("experts"), dict):
        raise ValueError(f'{path} is not an `esft select` output (no "experts" map)')
    if not record["experts"]:
        raise ValueError(f"{path} selects no experts in any layer")
    return record


def validate_experts(
    record: dict, num_experts: int, moe_layers: tuple[int, ...], what: str
) -> dict[int, list[int]]:
    """layer -> sorted expert ids, refusing layers that are not MoE layers and experts that do not exist."""
    experts = {}
    for key, ids in record["experts"].items():
        if not str(key).isdigit() or int(key) not in moe_layers:
            raise ValueError(
                f"{what} names layer {key}, which is not a MoE layer of the model {list(moe_layers)}"
            )
        if not isinstance(ids, list):
            raise ValueError(f"{what}: layer {key} must list its experts, got {ids!r}")
        if not ids:
            raise ValueError(f"{what}: layer {key} selects no experts")
        bad = [e for e in ids if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < num_experts]
        if bad:
            raise ValueError(f"{what}: layer {key} names experts {bad}, the model has 0..{num_experts - 1}")
        experts[int(key)] = sorted(set(ids))
    return experts
