"""Prefill and decode tokens/s of a model and its dense baseline, measured side by side.

For each batch size both models run in alternation on the same prompts (real text, so the MoE
routes as it would in use) and the median of the repeats is kept: slow drift of a shared machine
hits both alike, and the ratio MoE/dense is what is reported. Decode is greedy with transformers'
KV cache, one token per step for every sequence of the batch; with `compile`, through `generate`
with a static cache, whose decode step transformers compiles (CUDA graphs on a GPU), as fast
decoding from transformers runs. CPU figures are marked as such.
"""

from __future__ import annotations

import contextlib
import inspect
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moecarve.carve.calib import read_text, text_sha256, tokenize_prefix
from moecarve.devices import resolve_device
from moecarve.eval import common
from moecarve.eval.ppl import tokenizer_fingerprint
from moecarve.isolation import kept_environ


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_kwarg(model) -> str:
    """The forward's keyword for the KV cache: `cache` in newer transformers, where the older
    `past_key_values` warns as deprecated (removal announced for 5.40). Read from the transformers
    model under a torch.compile or peft wrapper, whose own forward takes **kwargs."""
    base = getattr(model, "_orig_mod", model)
    if hasattr(base, "get_base_model"):
        base = base.get_base_model()
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def returned_cache(out):
    """The KV cache a forward returned, under either name."""
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


# torch.compile backend for `compile=True`; tests swap in a cheaper one
COMPILE_BACKEND = "inductor"


class _StepClock:
    """A `generate` streamer that notes when each output is ready: the prompt (before the prefill),
    then each new token (the device is synchronised first, so each time is the step's end)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def put(self, value) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def static_cache(model, max_len: int):
    """A static KV cache for `time_compiled_generation`: keep one per model and batch size, so every
    run reuses the same buffers (a CUDA graph records its inputs' addresses; new ones re-record)."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


@torch.no_grad()
def time_compiled_generation(model, prompt: torch.Tensor, decode_tokens: int, cache=None) -> dict:
    """As `time_generation`, through transformers' `generate` with a static KV cache (`cache`, from
    `static_cache`, reset here; a new one if None), whose decode step transformers compiles
    (torch.compile, mode reduce-overhead: CUDA graphs on a GPU); the prefill runs eagerly and is
    timed to the first token, generate's setup included. A shape's first calls compile and record
    it: warm up before timing. Plain greedy: the model's repetition penalties are off."""
    from transformers import CompileConfig, GenerationConfig

    device = next(model.parameters()).device
    prompt = prompt.to(device)
    steps = decode_tokens + 1  # the prefill's token, then one per decode step
    if cache is None:
        cache = static_cache(model, prompt.shape[1] + steps)
    cache.reset()
    compile_config = CompileConfig(backend=COMPILE_BACKEND, dynamic=False)  # one graph per batch size
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only unless asked
    config = GenerationConfig(
        max_new_tokens=steps, min_new_tokens=steps, do_sample=False, compile_config=compile_config,
        repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=model.generation_config.eos_token_id,
        pad_token_id=model.generation_config.pad_token_id or 0,
    )  # fmt: skip
    clock = _StepClock(device)
    with kept_environ("TOKENIZERS_PARALLELISM"):  # which a compiling `generate` sets
        model.generate(
            prompt, attention_mask=torch.ones_like(prompt), generation_config=config, streamer=clock,
            **{cache_kwarg(model): cache},
        )  # fmt: skip
    if len(clock.times) != steps + 1:
        raise RuntimeError(f"generate produced {len(clock.times) - 1} tokens, {steps} were asked for")
    return {"prefill_s": clock.times[1] - clock.times[0], "decode_s": clock.times[-1] - clock.times[1]}


@torch.no_grad()
def time_generation(model, prompt: torch.Tensor, decode_tokens: int) -> dict:
    """Seconds for the prefill of `prompt` [B, P] and for `decode_tokens` greedy steps after it."""
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    _sync(device)
    start = time.perf_counter()
    out = model(prompt, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    prefill = time.perf_counter() - start
    name = cache_kwarg(model)
    past = returned_cache(out)
    start = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(token, **{name: past}, use_cache=True)
        past, token = returned_cache(out), out.logits[:, -1:].argmax(-1)
    _sync(device)
    return {"prefill_s": prefill, "decode_s": time.perf_counter() - start}


def evaluate_speed(
    model: str | Path,
    baseline: str | Path | None = None,
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8),
    prompt_length: int = 128,
    decode_tokens: int = 32,
    repeats: int = 3,
    dtype: str = "float32",
    device: str | None = None,
    kernels: bool = False,
    data: str | Path | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    compile: bool = False,
) -> dict:
    """Tokens/s of `model` (and `baseline`, alternating) per batch size, and MoE/dense ratios.

    kernels: route the MoE blocks through moecarve.kernels (Triton on CUDA; elsewhere the kernels
    fall back to their float32 reference, which is slower than transformers' own path).
    compile: time both through `generate` with a static cache and a compiled decode step
    (`time_compiled_generation`); each batch size runs once untimed first, which compiles it.
    """
    if not batch_sizes or min(batch_sizes) < 1 or prompt_length < 1 or decode_tokens < 1 or repeats < 1:
        raise ValueError("batch sizes, --prompt-length, --decode-tokens and --repeats must be >= 1")
    if len(set(batch_sizes)) < len(batch_sizes):
        raise ValueError(f"--batch-sizes repeats a size: {','.join(map(str, batch_sizes))}")
    named = {"model": common.resolve_model(model)}
    if baseline is not None:
        named["baseline"] = common.resolve_model(baseline)
    from moecarve.eval.ppl import check_positions

    for path in named.values():  # a prompt and its decoded tokens within the positions it was trained on
        check_positions(path, prompt_length + decode_tokens, "--prompt-length + --decode-tokens")
    out = common.check_output(out, "speed", data)
    torch_dtype = common.parse_dtype(dtype)
    device = resolve_device(device)
    if kernels:
        _check_kernels_can_time(named["model"], device)
    text, description = read_text(data, "--data")
    streams = _prompt_streams(named, text, max(batch_sizes) * prompt_length, description)
    loaded = {role: common.load_model(path, torch_dtype, device)[0] for role, path in named.items()}
    if kernels:
        import moecarve.kernels

        moecarve.kernels.enable(loaded["model"])
    rows = _timed_rows(loaded, streams, batch_sizes, prompt_length, decode_tokens, repeats, compile, progress)
    record = {
        "kind": "speed",
        "cpu_figures": not device.startswith("cuda"),
        "models": {role: common.describe_model(path) for role, path in named.items()},
        "rows": rows,
        "ratios": _ratios(rows),
        "prompt_length": prompt_length,
        "decode_tokens": decode_tokens,
        "repeats": repeats,
        "statistic": "median over repeats",
        "dtype": dtype,
        "kernels": kernels,
        "compiled": compile,
        "kernel_tables": _kernel_tables(device) if kernels else [],
        "prompts": f"first batch x prompt_length tokens of {description}",
        "prompts_sha256": text_sha256(text),
        "versions": common.versions(),
        "machine": common.machine(device),
    }
    common.write_json(record, out)
    return record


def _check_kernels_can_time(path: Path, device: str) -> None:
    """--kernels: blocks the kernels take, and kernels that would run compiled, not interpreted."""
    _check_kernel_blocks(path)
    from moecarve.kernels._env import triton_interpreting

    if triton_interpreting() and not str(device).startswith("cuda"):
        raise ValueError(
            "--kernels under TRITON_INTERPRET=1 would time Triton's Python interpreter (for tests, "
            "minutes a token), not the kernels: unset it (on a CPU the kernels then take their "
            "PyTorch reference)"
        )


def _prompt_streams(named: dict[str, Path], text: str, need: int, description: str) -> dict:
    """Each model's prompt tokens, `need` of them, in its own tokenizer's ids (tokenized once per
    distinct tokenizer)."""
    from transformers import AutoTokenizer

    by_tokenizer, streams = {}, {}
    for role, path in named.items():
        tokenizer = AutoTokenizer.from_pretrained(path)
        key = tokenizer_fingerprint(tokenizer)
        if key not in by_tokenizer:
            by_tokenizer[key] = tokenize_prefix(tokenizer, text, need)
            if by_tokenizer[key].numel() < need:
                raise ValueError(
                    f"text has {by_tokenizer[key].numel()} tokens in {path.name}'s tokenizer, {need} "
                    f"needed for the largest batch ({description})"
                )
        streams[role] = by_tokenizer[key]
    return streams


def _timed_rows(loaded, streams, batch_sizes, prompt_length, decode_tokens, repeats, compile, progress):
    """Median prefill and decode tokens/s per model and batch size, the models in alternation."""
    if not compile:  # warm-up: allocations, kernels (compiled runs warm up per batch size, below)
        for role, net in loaded.items():
            time_generation(net, streams[role][:prompt_length][None], 2)
    rows = []
    # compiled: a decode graph per batch size for each model (both share the code when of one class)
    limit = max(torch._dynamo.config.recompile_limit, 4 * len(batch_sizes))
    with torch._dynamo.config.patch(recompile_limit=limit) if compile else contextlib.nullcontext():
        for batch in tqdm(batch_sizes, desc="speed", disable=not progress, leave=False):
            prompts = {
                role: streams[role][: batch * prompt_length].view(batch, prompt_length) for role in loaded
            }
            timings = {role: [] for role in loaded}
            caches = {}
            if compile:  # compiles this batch size and records its CUDA graphs (which take 3 steps)
                warm = max(decode_tokens, 3)
                for role, net in loaded.items():
                    caches[role] = static_cache(net, prompt_length + warm + 1)
                    time_compiled_generation(net, prompts[role], warm, caches[role])
            for _ in range(repeats):
                for role, net in loaded.items():
                    if compile:
                        timings[role].append(
                            time_compiled_generation(net, prompts[role], decode_tokens, caches[role])
                        )
                    else:
                        timings[role].append(time_generation(net, prompts[role], decode_tokens))
            for role, runs in timings.items():
                prefill = statistics.median(r["prefill_s"] for r in runs)
                decode = statistics.median(r["decode_s"] for r in runs)
                rows.append(
                    {
                        "role": role,
                        "batch": batch,
                        "prefill_tokens_per_s": batch * prompt_length / prefill,
                        "decode_tokens_per_s": batch * decode_tokens / decode,
                    }
                )
    return rows


def _check_kernel_blocks(path: Path) -> None:
    """--kernels needs MoE blocks the kernels take: checked on the config's skeleton, before loading."""
    from transformers import AutoConfig

    from moecarve.kernels.integration import is_moe_block, unsupported_block_reason
    from moecarve.moe import meta_model

    blocks = [m for m in meta_model(AutoConfig.from_pretrained(path)).modules() if is_moe_block(m)]
    if not blocks:
        raise ValueError(f"--kernels: {path} has no MoE block for the kernels (a carved glm4_moe model has)")
    reasons = [unsupported_block_reason(block) for block in blocks]
    if all(reasons):
        raise ValueError(f"--kernels: the kernels take none of {path}'s MoE blocks: {reasons[0]}")


def _ratios(rows: list[dict]) -> list[dict]:
    """model / baseline tokens/s per batch size (> 1: the model is faster)."""
    by_key = {(r["role"], r["batch"]): r for r in rows}
    ratios = []
    for (role, batch), row in by_key.items():
        base = by_key.get(("baseline", batch))
        if role == "model" and base is not None:
            ratios.append(
                {
                    "batch": batch,
                    "prefill": row["prefill_tokens_per_s"] / base["prefill_tokens_per_s"],
                    "decode": row["decode_tokens_per_s"] / base["decode_tokens_per_s"],
                }
            )
    return ratios


def _kernel_tables(device: str) -> list[str]:
    """The tuned tables (`moecarve kernels tune`) the kernels could follow on this device."""
    import torch

    from moecarve.kernels.tuning import device_name, table_files

    return table_files(device_name(torch.device(device)))
