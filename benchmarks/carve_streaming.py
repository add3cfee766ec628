r"""Carving streams: a synthetic random Llama of ~1.2B parameters (bf16 shards on disk) is carved
with peak RSS well under the checkpoint's size. Writes both figures to a JSON file, with the
seconds per stage summed over layers.

    python benchmarks/carve_streaming.py    # about 10 minutes on 2 cores, 2.4 GB of disk
    # two Llama-2-7B-shaped layers at the default calibration budget: what one such layer costs
    python benchmarks/carve_streaming.py --hidden 4096 --intermediate 11008 --layers 2 --heads 32 \
        --kv-heads 32 --calib-tokens 16384 --out results/carve/scale_7b_layers.json
    # the same with the fast preset
    python benchmarks/carve_streaming.py --hidden 4096 --intermediate 11008 --layers 2 --heads 32 \
        --kv-heads 32 --preset fast --out results/carve/scale_7b_layers_fast.json
    # on a GPU, without the bundled packages (a tiny tokenizer and made-up text: the timing does not
    # depend on the words): scripts/gpu-carve-check.sh runs it there beside --device cpu
    python benchmarks/carve_streaming.py ... --calib-tokens 16384 --device cuda --synthetic-text
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from moecarve.carve.config import PRESETS

RESULTS = Path(__file__).resolve().parents[1] / "results"  # the repository's, from any directory

SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 49152,
}
# The carve settings the report names (the rest are CarveConfig's defaults).
RECORDED = ("preset", "calib_tokens", "calib_length", "cluster_iters", "refine_iters", "refit_ridge")


def write_random_llama(directory: Path, shape: dict, synthetic_text: bool = False) -> int:
    """A random bf16 Llama of `shape` written tensor by tensor (never whole in memory), with the
    bundled model's tokenizer or (`synthetic_text`) the tiny test one; returns its parameter count."""
    from transformers import AutoTokenizer, LlamaConfig

    from moecarve.batch.tiny import make_tokenizer
    from moecarve.carve.writer import ShardWriter
    from moecarve.resources import bundled_model_dir

    config = LlamaConfig(
        **shape, max_position_embeddings=4096, tie_word_embeddings=False, dtype=torch.bfloat16
    )
    config.save_pretrained(directory)
    if synthetic_text:
        make_tokenizer(directory)
    else:
        AutoTokenizer.from_pretrained(bundled_model_dir()).save_pretrained(directory)
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)  # k/v projection rows
    writer = ShardWriter(directory, 500 * 1024**2)
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    count = 0
    tensors = {
        "model.embed_tokens.weight": rand(config.vocab_size, h),
        "lm_head.weight": rand(config.vocab_size, h),
        "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
    }
    writer.add(tensors)
    count += sum(t.numel() for t in tensors.values())
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        tensors = {
            p + "self_attn.q_proj.weight": rand(h, h),
            p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h),
            p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(i, h),
            p + "mlp.up_proj.weight": rand(i, h),
            p + "mlp.down_proj.weight": rand(h, i),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        }
        writer.add(tensors)
        count += sum(t.numel() for t in tensors.values())
    writer.close()
    return count


def _carve(src, out, settings, queue, calib=None, device="cpu", threads=2):
    torch.set_num_threads(threads)
    from moecarve import CarveConfig, carve
    from moecarve.eval.common import peak_rss_gib

    config = CarveConfig(experts=8, active=2, max_shard_size=256 * 1024**2, **settings)
    started = time.perf_counter()
    result = carve(src, config, calib, out, progress=True, device=device)
    queue.put(
        {
            "resolved_config": {k: result.record["config"][k] for k in RECORDED},
            "carve_seconds": round(time.perf_counter() - started, 1),
            "construction_seconds": result.record["construction_seconds"],
            "calib_dtype": result.record["resolved"]["calib_dtype"],
            "peak_rss_gib": round(peak_rss_gib(), 2),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 1024**3, 2)
            if device != "cpu"
            else None,
            "stage_seconds": stage_seconds(result.record["layers"]),
        }
    )


def stage_seconds(layers: list[dict]) -> dict[str, float]:
    """Each stage's seconds summed over the carved layers (carve.json's `layers[i].seconds`)."""
    total: dict[str, float] = {}
    for layer in layers:
        for stage, seconds in layer.get("seconds", {}).items():
            total[stage] = round(total.get(stage, 0.0) + seconds, 2)
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(RESULTS / "carve/streaming.json"))
    parser.add_argument("--hidden", type=int, default=SHAPE["hidden_size"])
    parser.add_argument("--intermediate", type=int, default=SHAPE["intermediate_size"])
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument("--heads", type=int, default=SHAPE["num_attention_heads"])
    parser.add_argument("--kv-heads", type=int, default=SHAPE["num_key_value_heads"])
    parser.add_argument(
        "--calib-tokens",
        type=int,
        default=None,
        help="calibration tokens (default: 2 x 512 with the quality preset, the preset's own otherwise)",
    )
    parser.add_argument("--preset", default="quality", choices=list(PRESETS), help="CarveConfig preset")
    parser.add_argument(
        "--workdir", default=None, help="where the 2.4 GB synthetic model goes (default: a temp dir)"
    )
    parser.add_argument("--device", default="cpu", help="where the carve runs: cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the carve")
    parser.add_argument(
        "--synthetic-text",
        action="store_true",
        help="calibrate on made-up text with a tiny tokenizer: no bundled packages needed (a GPU machine)",
    )
    args = parser.parse_args(argv)
    shape = {
        **SHAPE,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
    }
    from moecarve.devices import resolve_device
    from moecarve.eval.common import child_result, source_commit

    resolve_device(args.device, "carve")  # before the model is written
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        params = write_random_llama(work / "dense", shape, args.synthetic_text)
        calib = None
        if args.synthetic_text:  # at least a token a word: enough for --calib-tokens up to 80k
            from moecarve.batch.tiny import sample_text

            calib = work / "calib.txt"
            calib.write_text(sample_text(80_000, seed=0))
        size = sum(f.stat().st_size for f in (work / "dense").glob("*.safetensors"))
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        settings = {"preset": args.preset}
        if args.calib_tokens is not None or args.preset == "quality":
            settings["calib_tokens"] = args.calib_tokens or 2 * 512
        child = ctx.Process(
            target=_carve,
            args=(work / "dense", work / "moe", settings, queue, calib, args.device, args.threads),
        )
        child.start()
        stats = child_result(child, queue)
        child.join()
        out_size = sum(f.stat().st_size for f in (work / "moe").glob("*.safetensors"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "benchmark": "carve_streaming",
        "shape": shape,
        "parameters": params,
        "dtype": "bfloat16",
        "checkpoint_gib": round(size / 1024**3, 3),
        "carved_checkpoint_gib": round(out_size / 1024**3, 3),
        "config": "S1A2E8 on the text that `text` names, 256 MiB output shards, the rest of "
        "the preset's settings as resolved_config shows",
        "calib_dtype": stats.pop("calib_dtype"),
        **stats,
        "peak_rss_over_checkpoint": round(stats["peak_rss_gib"] / (size / 1024**3), 3),
        "machine": platform.platform(),
        "device": args.device,
        "gpu": torch.cuda.get_device_name(args.device) if args.device != "cpu" else None,
        "threads": args.threads,
        "text": "made-up words, tiny tokenizer" if args.synthetic_text else "the default calibration text",
        "torch": torch.__version__,
        "commit": source_commit(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
