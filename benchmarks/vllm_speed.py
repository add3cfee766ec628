"""Tokens/s of the bundled model, dense and carved (S1A2E8 by default), served by vLLM's CPU build.

Both run in one vLLM process (the venv of scripts/vllm-venv.sh), taking turns (dense, carved,
dense, carved) so that drift in the shared CPU hits both, at batch 1 and 8: greedy, fp32, eager
mode, fixed prompts, a fixed number of new tokens (EOS ignored). Each figure is generated tokens
over the wall time of `LLM.generate` (prefill included), best and median of all repeats; the CPU
is shared, so the load average is recorded beside them.

    python benchmarks/vllm_speed.py [--carved DIR]    # -> results/serve/vllm_speed.json

Without --carved the bundled model is carved first (S1A2E8, default calibration: 2-3 minutes).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("MOECARVE_VLLM_VENV", ROOT / ".venv-vllm"))
OUT = ROOT / "results" / "serve" / "vllm_speed.json"
BATCHES = (1, 8)
PROMPT_TOKENS = 32
NEW_TOKENS = 32
REPEATS = 3
ROUNDS = 2
# A config.json without `architectures` (GGUF conversions made by older code) makes vLLM serve
# the model as an embedding model: used only where config.json has none.
CAUSAL_LM = {"llama": "LlamaForCausalLM", "glm4_moe": "Glm4MoeForCausalLM"}


def worker(request_path: str, result_path: str) -> None:
    """Runs in the vLLM venv: times every model of the request at every batch size."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import importlib.metadata as md

    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    request = json.loads(Path(request_path).read_text())
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, detokenize=False)
    seconds: dict[tuple[str, int], list[float]] = {}
    loads: dict[tuple[str, int], list[float]] = {}
    overrides = {}
    for _ in range(ROUNDS):  # dense, carved, dense, carved...: drift in the shared CPU hits both
        for name, model in request["models"].items():
            config = json.loads((Path(model) / "config.json").read_text())
            override = (
                None if config.get("architectures") else {"architectures": [CAUSAL_LM[config["model_type"]]]}
            )
            overrides[name] = override is not None
            llm = LLM(
                model=model,
                dtype="float32",
                max_model_len=PROMPT_TOKENS + NEW_TOKENS + 8,
                enforce_eager=True,
                distributed_executor_backend="uni",
                hf_overrides=override,
                seed=0,
            )
            llm.generate(
                [TokensPrompt(prompt_token_ids=request["prompts"][0])], params, use_tqdm=False
            )  # warm-up
            for batch in BATCHES:
                prompts = [TokensPrompt(prompt_token_ids=p) for p in request["prompts"][:batch]]
                for _ in range(REPEATS):
                    started = time.perf_counter()
                    outs = llm.generate(prompts, params, use_tqdm=False)
                    seconds.setdefault((name, batch), []).append(time.perf_counter() - started)
                    assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in outs)
                loads.setdefault((name, batch), []).append(round(os.getloadavg()[0], 2))
            del llm
            gc.collect()
    rows = []
    for (name, batch), times in seconds.items():
        rate = [batch * NEW_TOKENS / s for s in times]
        rows.append(
            {
                "model": name,
                "batch": batch,
                "tokens_per_s_best": round(max(rate), 2),
                "tokens_per_s_median": round(statistics.median(rate), 2),
                "seconds": [round(s, 3) for s in times],
                "architectures_override": overrides[name],
                "loadavg_1min": loads[(name, batch)],
            }
        )
    versions = {p: md.version(p) for p in ("vllm-cpu", "torch", "transformers")}
    result = {"rows": rows, "versions": versions, "torch_threads": torch.get_num_threads()}
    Path(result_path).write_text(json.dumps(result))


def prompts(tokenizer_dir: Path) -> list[list[int]]:
    """Eight different real-text prompts of PROMPT_TOKENS tokens (BoolQ passages)."""
    from transformers import AutoTokenizer

    from moecarve.resources import boolq_passages

    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(boolq_passages()[:20000]).input_ids
    return [ids[i * PROMPT_TOKENS : (i + 1) * PROMPT_TOKENS] for i in range(max(BATCHES))]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--carved", type=Path, help="a carve of the bundled model (default: carve one at S1A2E8)"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.carved is not None:
        record = args.carved / "carve.json"
        if not record.is_file() or '"resolved"' not in record.read_text():
            parser.error(f"--carved {args.carved}: not a carve (no carve record in carve.json)")
    python = VENV / "bin" / "python"
    if not python.exists():
        sys.exit(f"no vLLM venv at {VENV}: make it with `bash scripts/vllm-venv.sh`")

    from moecarve import CarveConfig, carve
    from moecarve.resources import bundled_model_dir

    dense = bundled_model_dir()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        carved = args.carved or carve(dense, CarveConfig(experts=8, active=2), None, tmp / "carved").out
        carve_record = json.loads((Path(carved) / "carve.json").read_text())
        name = carve_record["resolved"]["name"]
        request = {"models": {"dense": str(dense), name: str(carved)}, "prompts": prompts(dense)}
        (tmp / "request.json").write_text(json.dumps(request))
        load_before = os.getloadavg()[0]
        with (tmp / "vllm.log").open("w") as log:
            proc = subprocess.run(
                [python, __file__, "--worker", tmp / "request.json", tmp / "result.json"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if proc.returncode:
            sys.exit(f"vLLM worker exited {proc.returncode}:\n{(tmp / 'vllm.log').read_text()[-4000:]}")
        result = json.loads((tmp / "result.json").read_text())

    by = {(r["model"], r["batch"]): r for r in result["rows"]}
    data = {
        "label": "CPU figures: vLLM's CPU backend (vllm-cpu), not a GPU; shared 2-core machine",
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": result["torch_threads"]},
        "loadavg_1min_before": round(load_before, 2),
        "niceness": os.nice(0),
        "versions": {"vllm_venv": result["versions"], "python": platform.python_version()},
        "setup": {
            "dtype": "float32",
            "enforce_eager": True,
            "prompt_tokens": PROMPT_TOKENS,
            "new_tokens": NEW_TOKENS,
            "repeats": REPEATS,
            "rounds": ROUNDS,
            "greedy": True,
            "dense": "SmolLM2-135M-Instruct (bundled, dequantized fp32)",
            "carved": {"config": carve_record["config"], "resolved": carve_record["resolved"]},
        },
        "rows": result["rows"],
        "carved_over_dense_best": {
            str(b): round(by[name, b]["tokens_per_s_best"] / by["dense", b]["tokens_per_s_best"], 3)
            for b in BATCHES
        },
        "carved_over_dense_median": {
            str(b): round(by[name, b]["tokens_per_s_median"] / by["dense", b]["tokens_per_s_median"], 3)
            for b in BATCHES
        },
        "command": " ".join(["python", "benchmarks/vllm_speed.py", *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data["rows"], indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
