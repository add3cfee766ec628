"""The least work any sequential carve of the bundled model does: one pass of the calibration
tokens through every dense decoder layer (attention + FFN, no LM head), as the carve runs them
(4,096 tokens at a time, 2 threads), in float32 and in bfloat16 (the carve's `calib_dtype`). A carve
that calibrates layer by layer in that dtype cannot take less.

    python benchmarks/carve_floor.py                      # the default calibration sequence length
    python benchmarks/carve_floor.py --calib-length 2048 --out results/carve/floor_2048.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "results"  # the repository's, from any directory

REPEATS = 3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calib-length", type=int, default=None, help="default: CarveConfig's")
    parser.add_argument("--out", default=str(RESULTS / "carve/floor.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moecarve.carve.calib import calibration
    from moecarve.carve.config import CarveConfig
    from moecarve.carve.pipeline import TOKENS_PER_PASS
    from moecarve.eval.common import machine, source_commit
    from moecarve.resources import bundled_model_dir

    config = CarveConfig() if args.calib_length is None else CarveConfig(calib_length=args.calib_length)
    source = bundled_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = calibration(tokenizer, None, config.calib_tokens, config.calib_length).input_ids
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        runs = seconds[str(dtype).removeprefix("torch.")] = []
        with torch.no_grad():
            for _ in range(REPEATS):
                started = time.perf_counter()
                for chunk in ids.split(max(1, TOKENS_PER_PASS // config.calib_length)):
                    model.model(chunk)
                runs.append(round(time.perf_counter() - started, 2))
    record = {
        "benchmark": "carve_floor",
        "what": "forward of the calibration tokens through the dense decoder layers (no LM head)",
        "tokens": ids.numel(),
        "sequences": list(ids.shape),
        "seconds": seconds,
        "median_seconds": {dtype: statistics.median(runs) for dtype, runs in seconds.items()},
        "reference_carve_seconds_S1A2E8": 97.4,  # BASELINES.md
        "machine": machine(),
        "commit": source_commit(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
