"""vLLM serves carved checkpoints as transformers runs them (needs the venv of scripts/vllm-venv.sh).

Carves here, serves in the vLLM venv through vllm_generate.py (a subprocess: vLLM pins an older
transformers), and compares on the same token ids: greedy continuations identical and logprobs
within 1e-3 in fp32, against this env's transformers and against vLLM's own. Every outcome goes
to results/serve/vllm_check.json. Run: python -m pytest -m vllm (add `and not slow` to leave out
the bundled model's 2-3 minute carve).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from moecarve.carve import pipeline
from moecarve.carve.config import CarveConfig
from tests.conftest import FAMILIES, ROPE_SCALING, make_tokenizer, sample_text
from tests.serve.vllm_generate import hf_scores

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("MOECARVE_VLLM_VENV", ROOT / ".venv-vllm"))
RUNNER = Path(__file__).with_name("vllm_generate.py")
RESULTS = ROOT / "results" / "serve" / "vllm_check.json"
TOLERANCE = 1e-3  # |logprob difference| in fp32
MAX_TOKENS = 16
LOGPROBS = 5
TINY_CALIB = {"calib_tokens": 1024, "calib_length": 128}

PHI4_MINI_ROPE = {
    "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75, "original_max_position_embeddings": 64,
    "short_factor": [1.0 + 0.1 * i for i in range(12)], "long_factor": [2.0 + 0.5 * i for i in range(12)],
}  # fmt: skip

# name: (family, CarveConfig fields, source options). Every case is sparse with a balancing bias;
# vLLM's CPU MoE kernel needs hidden % 32 == 0 and its attention head_dim >= 32, so these tiny
# sources are 64 wide with 2 heads of 32 (conftest's 48-wide ones are refused by vLLM).
CASES = {
    "llama-S1A2E8": ("llama", {"experts": 8, "active": 2, "balance": 0.5}, {}),
    "mistral-S1A2E8": ("mistral", {"experts": 8, "active": 2, "balance": 0.5}, {}),
    # 128 / 12 experts = 10.7 neurons: padded to 16, vLLM pads again to its kernel's 32
    "qwen2-S2A3E12": ("qwen2", {"experts": 12, "active": 3, "shared": 2, "balance": 0.5}, {}),
    "qwen3-S1A2E8": ("qwen3", {"experts": 8, "active": 2, "balance": 0.5}, {}),
    "llama-S1A2E8-dense1": ("llama", {"experts": 8, "active": 2, "dense_layers": 1, "balance": 0.5}, {}),
    "llama-tied-S1A3E8": ("llama", {"experts": 8, "active": 3, "balance": 0.5}, {"tied": True}),
    # Llama 3.1/3.2's rope scaling and Qwen2.5's long-context yarn carry over to the carve
    "llama-rope_llama3-S1A2E8": ("llama", {"experts": 8, "active": 2, "balance": 0.5}, {"rope": "llama3"}),
    "qwen2-rope_yarn-S1A2E8": ("qwen2", {"experts": 8, "active": 2, "balance": 0.5}, {"rope": "yarn"}),
    # Granite 3.x: its four multipliers folded into the weights; its embeddings tied
    "granite-tied-S1A2E8": ("granite", {"experts": 8, "active": 2, "balance": 0.5}, {"tied": True}),
    # Phi-3/Phi-4: fused q/k/v and gate/up split by the carve; Phi-4-mini rotates part of each head
    "phi3-S1A2E8": ("phi3", {"experts": 8, "active": 2, "balance": 0.5}, {}),
    "phi3-partial_rotary-S1A2E8": (
        "phi3",
        {"experts": 8, "active": 2, "balance": 0.5},
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
    ),
    # Phi-4-mini's combination, tied embeddings too: 3/4 of each head rotated by longrope (its
    # short factors and attention scaling: the prompts stay within the original 64 positions)
    "phi3-phi4mini_rope-S1A2E8": (
        "phi3",
        {"experts": 8, "active": 2, "balance": 0.5},
        {"tied": True, "rope_parameters": PHI4_MINI_ROPE},
    ),
}


def make_source(
    directory: Path,
    family: str,
    tied: bool = False,
    rope: str | None = None,
    rope_parameters: dict | None = None,
) -> Path:
    """A tiny random dense model vLLM's CPU kernels accept, perturbed like conftest's; `rope` names
    a scaled rope of ROPE_SCALING, `rope_parameters` gives one."""
    parameters = ROPE_SCALING[rope] if rope else rope_parameters
    # Phi3Config puts its own top-level original positions (default 4,096) into the rope's
    original = (parameters or {}).get("original_max_position_embeddings")
    extra = {"original_max_position_embeddings": original} if family == "phi3" and original else {}
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(directory)
    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        eos_token_id=tokenizer.eos_token_id,
        **{**FAMILIES[family], "head_dim": 32},
        **({"rope_parameters": parameters} if parameters else {}),
        **extra,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(directory)
    return directory


def serve(jobs: list[dict], workdir: Path) -> dict:
    """Runs vllm_generate.py in the vLLM venv; its log goes to a file, quoted on failure."""
    require_venv()
    python = VENV / "bin" / "python"
    request, result, log = workdir / "jobs.json", workdir / "result.json", workdir / "vllm.log"
    request.write_text(json.dumps(jobs))
    with log.open("w") as f:
        proc = subprocess.run(
            [python, RUNNER, request, result], stdout=f, stderr=subprocess.STDOUT, timeout=1800
        )
    if proc.returncode:
        return {"crash": f"vllm_generate.py exited {proc.returncode}", "log_tail": log.read_text()[-4000:]}
    return json.loads(result.read_text())


def compare(job: dict, served: dict) -> dict:
    """Greedy agreement and the largest logprob gap, vs vLLM's transformers and this env's."""
    if "error" in served:
        return {"carve": job["carve"], "error": served["error"], "passed": False}
    ours = hf_scores(job["model"], job["dtype"], job["prompts"], served["outputs"])
    record = {
        "carve": job["carve"],
        "prompts": len(job["prompts"]),
        "new_tokens": job["max_tokens"],
        "dtype": job["dtype"],
    }
    for name, hf in (
        ("transformers_vllm_venv", served["hf"]),
        ("transformers_main", ours),
    ):
        gaps = [
            abs(lp - hf_step[t])
            for out, hf_out in zip(served["outputs"], hf, strict=True)
            for step, hf_step in zip(out["vllm"], hf_out["logprobs"], strict=True)
            for t, lp in step.items()
        ]
        same = all(
            out["tokens"] == hf_out["argmax"] for out, hf_out in zip(served["outputs"], hf, strict=True)
        )
        record[name] = {"greedy_identical": same, "max_abs_logprob_diff": max(gaps)}
    record["passed"] = all(
        v["greedy_identical"] and v["max_abs_logprob_diff"] <= TOLERANCE
        for k, v in record.items()
        if k.startswith("transformers_")
    )
    record["vllm_tokens"] = [" ".join(map(str, out["tokens"])) for out in served["outputs"]]
    return record


def write_results(section: str, versions: dict, cases: dict, seconds: float) -> None:
    """Merges this run's section into results/serve/vllm_check.json."""
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data["command"] = "python -m pytest -m vllm tests/serve"
    data["tolerance_abs_logprob_fp32"] = TOLERANCE
    data[section] = {"versions": versions, "seconds": round(seconds, 1), "cases": cases}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")


def check(section: str, named_jobs: dict[str, dict], workdir: Path, started: float) -> dict:
    served = serve(list(named_jobs.values()), workdir)
    if "crash" in served:
        cases = {name: {"carve": job["carve"], "crash": served["crash"]} for name, job in named_jobs.items()}
        write_results(section, {}, cases, time.perf_counter() - started)
        pytest.fail(f"{served['crash']}:\n{served['log_tail']}")
    cases = {
        name: compare(job, out) for (name, job), out in zip(named_jobs.items(), served["jobs"], strict=True)
    }
    versions = {
        "vllm_venv": served["versions"],
        "main": {"torch": torch.__version__, "transformers": transformers.__version__},
        "python": sys.version.split()[0],
    }
    write_results(section, versions, cases, time.perf_counter() - started)
    return cases


def tiny_jobs(cases: dict, root: Path, calib_file: Path) -> dict[str, dict]:
    """Carves every case from its tiny source; each job prompts three token sequences."""
    jobs, sources = {}, {}
    for name, (family, fields, source_options) in cases.items():
        key = json.dumps([family, source_options], sort_keys=True)  # one source per distinct options
        if key not in sources:
            sources[key] = make_source(root / f"src-{len(sources)}", family, **source_options)
        out = root / name
        pipeline.carve(
            sources[key], CarveConfig(**fields, **TINY_CALIB), str(calib_file), out, progress=False
        )
        tokenizer = AutoTokenizer.from_pretrained(out)
        prompts = [tokenizer(sample_text(40, seed=s)).input_ids[:n] for s, n in ((3, 3), (4, 11), (5, 29))]
        jobs[name] = {
            "carve": {"family": family, **fields, **source_options},
            "model": str(out),
            "prompts": prompts,
            "max_tokens": MAX_TOKENS,
            "dtype": "float32",
            "logprobs": LOGPROBS,
        }
    return jobs


def require_venv() -> None:
    """Skips without the venv, unless MOECARVE_REQUIRE_VLLM=1 (CI): then a missing venv fails."""
    if not (VENV / "bin" / "python").exists():
        message = f"no vLLM venv at {VENV}: make it with `bash scripts/vllm-venv.sh`"
        if os.environ.get("MOECARVE_REQUIRE_VLLM") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def tiny_served(tmp_path_factory, calib_file) -> dict:
    started = time.perf_counter()
    require_venv()
    root = tmp_path_factory.mktemp("vllm")
    jobs = tiny_jobs(CASES, root, calib_file)
    return {"jobs": jobs, "cases": check("tiny", jobs, root, started)}


def live_routing(model_dir: Path) -> tuple[float, float]:
    """The largest |router weight| and the largest spread of a balancing bias, over MoE layers."""
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    router, spread = 0.0, 0.0
    for name, shard in index.items():
        if name.endswith("mlp.gate.weight") or name.endswith("e_score_correction_bias"):
            with safe_open(model_dir / shard, "pt") as f:
                t = f.get_tensor(name)
            if name.endswith("gate.weight"):
                router = max(router, t.abs().max().item())
            else:
                assert t.dtype == torch.float32, f"{name} is {t.dtype}: vLLM keeps the bias in fp32"
                spread = max(spread, (t.max() - t.min()).item())
    return router, spread


@pytest.mark.parametrize("name", list(CASES))
def test_vllm_matches_transformers(name, tiny_served):
    model_dir = Path(tiny_served["jobs"][name]["model"])
    router, spread = live_routing(model_dir)
    assert router > 0 and spread > 0, "the check needs a live router and a non-constant balancing bias"
    config = json.loads((model_dir / "config.json").read_text())
    assert config.get("architectures") == ["Glm4MoeForCausalLM"], (
        "config.json must name Glm4MoeForCausalLM: without `architectures` vLLM resolves "
        "Glm4MoeModel and serves the checkpoint as an embedding model (runner 'pooling')"
    )
    record = tiny_served["cases"][name]
    assert "error" not in record, record.get("error")
    assert record["passed"], json.dumps(record, indent=1)


@pytest.mark.slow
def test_bundled_carve_served_by_vllm(tmp_path):
    """SmolLM2-135M carved at S1A2E8 (a 2-3 minute carve), prompted with real text."""
    from moecarve.resources import bundled_model_dir

    started = time.perf_counter()
    require_venv()
    out = tmp_path / "smollm2-S1A2E8"
    pipeline.carve(bundled_model_dir(), CarveConfig(experts=8, active=2), None, out, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = [
        "The capital of France is",
        "Mixture-of-experts models route each token to",
        "Water boils at a temperature of",
    ]
    job = {
        "carve": {"family": "llama (SmolLM2-135M-Instruct, bundled)", "experts": 8, "active": 2},
        "model": str(out),
        "prompts": [tokenizer(t).input_ids for t in texts],
        "max_tokens": 32,
        "dtype": "float32",
        "logprobs": LOGPROBS,
    }
    record = check("bundled", {"smollm2-135m-S1A2E8": job}, tmp_path, started)["smollm2-135m-S1A2E8"]
    assert "error" not in record, record.get("error")
    assert record["passed"], json.dumps(record, indent=1)
