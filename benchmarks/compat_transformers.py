"""The carve output loads and computes the same logits in other transformers releases.

Carves a tiny random Llama with this environment's transformers, then, for each requested
release, makes a venv (torch 2.13.0 CPU + that transformers), loads the checkpoint there with
AutoModelForCausalLM (no remote code), generates, and compares logits with this environment's.

    python benchmarks/compat_transformers.py 5.17.0 5.19.0    # -> results/carve/compat_transformers.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

RESULTS = Path(__file__).resolve().parents[1] / "results"  # the repository's, from any directory

CHECK = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, trust_remote_code=False).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(ids).logits
    generated = model.generate(ids[:1, :5], max_new_tokens=8, do_sample=False)
torch.save(logits, sys.argv[3])
print(json.dumps({"transformers": transformers.__version__, "class": type(model).__name__,
                  "generated": generated[0].tolist()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "versions", nargs="*", default=["5.17.0"], help="transformers releases (default 5.17.0)"
    )
    parser.add_argument("--out", default=str(RESULTS / "carve/compat_transformers.json"))
    args = parser.parse_args()
    versions = args.versions
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from moecarve import CarveConfig, carve
    from tests.conftest import make_model, sample_text

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = make_model(tmp / "src", "qwen3", intermediate=96, layers=3)
        (tmp / "calib.txt").write_text(sample_text(3000))
        config = CarveConfig(experts=8, active=2, dense_layers=1, calib_tokens=512, calib_length=64)
        out = carve(src, config, tmp / "calib.txt", tmp / "moe", progress=False).out
        ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
        torch.save(ids, tmp / "ids.pt")
        (tmp / "check.py").write_text(CHECK)
        here = subprocess.run(
            [sys.executable, tmp / "check.py", out, tmp / "ids.pt", tmp / "here.pt"],
            capture_output=True,
            text=True,
            check=True,
        )
        reference = json.loads(here.stdout.splitlines()[-1])
        for version in versions:
            venv = tmp / f"venv-{version}"
            subprocess.run([sys.executable, "-m", "venv", venv], check=True)
            pip = [venv / "bin/python", "-m", "pip", "install", "-q"]
            subprocess.run([*pip, "torch==2.13.0", f"transformers=={version}"], check=True)
            there = subprocess.run(
                [venv / "bin/python", tmp / "check.py", out, tmp / "ids.pt", tmp / "there.pt"],
                capture_output=True,
                text=True,
            )
            row = {"transformers": version, "loads": there.returncode == 0}
            if there.returncode == 0:
                result = json.loads(there.stdout.splitlines()[-1])
                diff = (torch.load(tmp / "there.pt") - torch.load(tmp / "here.pt")).abs().max().item()
                row.update(
                    {
                        "class": result["class"],
                        "max_logit_diff": diff,
                        "same_greedy": result["generated"] == reference["generated"],
                    }
                )
            else:
                row["error"] = there.stderr.strip().splitlines()[-1]
            rows.append(row)
            print(row, flush=True)
    report = {
        "benchmark": "compat_transformers",
        "carved_with": transformers.__version__,
        "config": config.name,
        "rows": rows,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
