"""End-to-end greedy decode tokens/s: a 7B-shaped carved glm4_moe model vs its dense Llama source.

One command (GPU):  PYTHONPATH=src python benchmarks/decode_e2e.py
Writes results/kernels/decode_e2e.{jsonl,csv}: one row per (config, batch, model) with tokens/s.
Both models get random weights (speed only), the same static KV cache and harness, and one CUDA
graph per decode step where the forward can be captured (all but transformers' eager experts).
`--models` picks which of the carve's runs to time beside the dense one (transformers' grouped_mm
and eager experts, and ours). `--compile` also runs each capturable decode step through
`torch.compile(fullgraph=True)` (inductor fuses the norms, rotary and the dense FFN's SiLU*up;
moecarve's kernels are opaque ops in the graph) before capturing it, for dense and carved alike.
Rows record `setup_s`, the prefill and warm-up (the compile and the capture), and the dense row of
a batch is written before the carve's runs, so a run cut short in a compile keeps it. `--profile`
also splits an eager decode step of each model into its kernels' device times (rows in
results/kernels/profile.{jsonl,csv}, beside ffn_kernels.py --profile's), to say where a carve's
step loses to the dense one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from moecarve.eval.speed import cache_kwarg
from moecarve.kernels import disable, enable
from moecarve.kernels.benchutil import env_info, kernel_times, write_rows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ffn_kernels import config_problem, parse_config  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"  # the repository's, from any directory

MODELS = ("hf_grouped_mm", "hf_eager", "moecarve")  # the carve's experts: transformers' two, and ours


def build(kind: str, args, s: int, a: int, n: int):
    from transformers import AutoModelForCausalLM, Glm4MoeConfig, LlamaConfig

    common = dict(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
        num_key_value_heads=args.hidden // 128, vocab_size=args.vocab, max_position_embeddings=4096,
        tie_word_embeddings=False,
    )  # fmt: skip
    if kind == "dense":
        cfg = LlamaConfig(intermediate_size=args.intermediate, **common)
    else:
        cfg = Glm4MoeConfig(
            moe_intermediate_size=args.intermediate // n, n_routed_experts=n - s, n_shared_experts=s,
            num_experts_per_tok=a, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=float(a),
            first_k_dense_replace=0, num_mtp_layers=0, partial_rotary_factor=1.0, head_dim=128, **common,
        )  # fmt: skip
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return model.eval()


class Decoder:
    """Greedy decode with a static cache; one decode step replayed as a CUDA graph when capturable."""

    def __init__(self, model, batch: int, max_len: int, graph: bool, compiled: bool = False):
        from transformers import StaticCache

        self.model, self.batch = model, batch
        self.forward = torch.compile(model, fullgraph=True) if compiled else model
        dev = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.cache_kwarg = cache_kwarg(model)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.graph = None
        self.want_graph = graph and dev.type == "cuda"

    def _step(self):
        out = self.forward(
            input_ids=self.ids, **{self.cache_kwarg: self.cache}, cache_position=self.pos,
            position_ids=self.pos.expand(self.batch, 1), use_cache=True,
        )  # fmt: skip
        return out.logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> None:
        n = prompt.shape[1]
        cp = torch.arange(n, device=prompt.device)
        out = self.model(input_ids=prompt, **{self.cache_kwarg: self.cache}, cache_position=cp,
                         position_ids=cp.expand(self.batch, n), use_cache=True)  # fmt: skip
        self.ids.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        self.pos.fill_(n)

    @torch.no_grad()
    def step(self) -> None:
        if self.want_graph and self.graph is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            self.ids.copy_(self.next_ids)
        else:
            self.ids.copy_(self._step())
        self.pos += 1

    def _capture(self) -> None:
        pos0 = self.pos.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm-up writes the cache at pos0, rewritten identically below
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                self.next_ids = self._step()
            self.graph = g
        except Exception as exc:
            print(f"  no CUDA graph ({type(exc).__name__}: {str(exc)[:120]}); eager steps", flush=True)
            self.want_graph = False
            torch.cuda.synchronize()
        self.pos.copy_(pos0)


def tokens_per_s(model, args, batch: int, graph: bool) -> tuple[float, bool, bool, float]:
    """(tokens/s, whether the steps ran as a CUDA graph, whether they were compiled, seconds of
    prefill and warm-up: the compile and the capture, when there are)."""
    dev = next(model.parameters()).device
    t_setup = time.perf_counter()
    prompt = torch.randint(0, args.vocab, (batch, args.prompt), device=dev)
    compiled = args.compile and graph
    dec = Decoder(model, batch, args.prompt + args.warmup + args.tokens + 4, graph, compiled)
    dec.prefill(prompt)
    for _ in range(args.warmup):
        dec.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.tokens):
        dec.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    tps = batch * args.tokens / (time.perf_counter() - t0)
    return tps, dec.graph is not None, compiled, t0 - t_setup


def step_kernels(model, args, batch: int) -> dict[str, tuple[float, float]]:
    """{kernel: (launches, device microseconds)} per eager decode step (torch.profiler), summed over
    the layers: what each kind of kernel costs a step, launch gaps left out."""
    dev = next(model.parameters()).device
    steps, warmup = 8, 3
    dec = Decoder(model, batch, args.prompt + warmup + steps + 4, graph=False)
    dec.prefill(torch.randint(0, args.vocab, (batch, args.prompt), device=dev))
    return kernel_times(dec.step, calls=steps, warmup=warmup)


def profile_rows(env, name, args, batch, profiles, runs) -> list[dict]:
    """One row per (model, kernel): launches and device microseconds per decode step, beside the
    step's CUDA-graph time from the tokens/s run and the step's kernel total."""
    rows = []
    for model, kernels in profiles.items():
        total = sum(us for _, us in kernels.values())
        step_us = 1e6 * batch / runs[model][0]
        top = sorted(kernels.items(), key=lambda kv: -kv[1][1])
        for kernel, (launches, us) in top:
            rows.append({**env, "bench": "decode_profile", "config": name, "hidden": args.hidden,
                         "intermediate": args.intermediate, "layers": args.layers, "batch": batch, "model": model,
                         "kernel": kernel, "launches_per_step": launches, "device_us": us,
                         "kernels_total_us": total, "step_us": step_us, "graph": runs[model][1]})  # fmt: skip
        print(f"{name} B={batch:<3} {model:<9} kernels {total:8.1f} us per step, step {step_us:8.1f} us; top: "
              + ", ".join(f"{kernel[:40]} {us:.0f}" for kernel, (_, us) in top[:4]), flush=True)  # fmt: skip
    return rows


def e2e_row(env, args, name, batch, model, run, dense_tps) -> dict:
    """One tokens/s row (printed as well) from a `tokens_per_s` result."""
    tps, graphed, compiled, setup_s = run
    print(f"{name} B={batch:<3} {model:<14} {tps:9.1f} tok/s x{tps / dense_tps:.2f} graph={graphed} "
          f"compiled={compiled} setup {setup_s:.1f} s", flush=True)  # fmt: skip
    return {**env, "bench": "decode_e2e", "config": name, "hidden": args.hidden, "intermediate": args.intermediate,
            "layers": args.layers, "batch": batch, "model": model, "graph": graphed, "compiled": compiled,
            "tokens_per_s": tps, "speedup_vs_dense": tps / dense_tps, "prompt": args.prompt, "tokens": args.tokens,
            "setup_s": setup_s}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--configs", nargs="+", default=["S2A2E16"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument(
        "--eager-batches", type=int, nargs="*", default=[1], help="batches that also time HF eager experts"
    )
    p.add_argument(
        "--models", nargs="+", choices=MODELS, default=list(MODELS),
        help="which carved-model runs to time beside the dense one (hf_eager only at --eager-batches)",
    )  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile each capturable decode step first")
    p.add_argument("--profile", action="store_true", help="also each model's decode step split into kernels")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run; its timings mean nothing")
    p.add_argument("--out", type=Path, default=RESULTS / "kernels")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("decode_e2e.py needs a CUDA GPU (--device cpu only checks that it runs)")
    if args.device == "cpu" and args.out.resolve() == (RESULTS / "kernels").resolve():
        p.error("--device cpu times nothing worth keeping: give an --out outside results/kernels")
    for name in args.configs:
        if problem := config_problem(name, [args.intermediate]):
            p.error(problem)
    if args.profile and "moecarve" not in args.models:
        p.error(
            "--profile splits the carve's decode step beside the dense one: --models must include moecarve"
        )
    if args.compile:  # one graph per (model, experts implementation, batch) of the same forward code
        torch._dynamo.config.recompile_limit = max(
            torch._dynamo.config.recompile_limit, 4 * len(args.batches)
        )
    env = env_info()
    print(env, flush=True)
    torch.manual_seed(0)
    dense = build("dense", args, 0, 0, 1)
    base = {b: tokens_per_s(dense, args, b, graph=True) for b in args.batches}
    if not args.profile:  # else kept to profile beside each carve
        del dense
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    dense_profiles = {}  # by batch: the same dense model beside every configuration
    for name in args.configs:
        s, a, n = parse_config(name)
        moe = build("moe", args, s, a, n)
        for b in args.batches:
            # the dense row first: a run cut short in the carve's compile still leaves it in the file
            write_rows([e2e_row(env, args, name, b, "dense", base[b], base[b][0])], args.out / "decode_e2e")
            runs = {}
            if "hf_grouped_mm" in args.models:
                moe.set_experts_implementation("grouped_mm")
                runs["hf_grouped_mm"] = tokens_per_s(moe, args, b, graph=True)
            if "hf_eager" in args.models and b in args.eager_batches:
                moe.set_experts_implementation("eager")
                runs["hf_eager"] = tokens_per_s(moe, args, b, graph=False)
            if "moecarve" in args.models:
                enable(moe)
                runs["moecarve"] = tokens_per_s(moe, args, b, graph=True)
                disable(moe)
            rows = [e2e_row(env, args, name, b, model, run, base[b][0]) for model, run in runs.items()]
            write_rows(rows, args.out / "decode_e2e")
            runs["dense"] = base[b]
            # after the tokens/s rows are written: a profiler failure loses only its own
            if args.profile:
                enable(moe)
                try:
                    if b not in dense_profiles:
                        dense_profiles[b] = step_kernels(dense, args, b)
                    profiles = {"dense": dense_profiles[b], "moecarve": step_kernels(moe, args, b)}
                    write_rows(profile_rows(env, name, args, b, profiles, runs), args.out / "profile")
                except Exception as exc:  # reported; the next batch still runs
                    print(f"{name} B={b}: no profile ({type(exc).__name__}: {exc})", flush=True)
                finally:
                    disable(moe)
        del moe


if __name__ == "__main__":
    main()
