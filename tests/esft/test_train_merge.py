"""Train changes only the selected expert slices (every tensor compared); merge reloads natively."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from moecarve import MoecarveWarning, moe
from moecarve.esft import merge, select, train
from moecarve.esft.data import Collator, pad_id
from moecarve.esft.optim import SliceAdamW, mask_gradient
from moecarve.esft.shape import model_shape
from moecarve.eval.common import describe_model
from tests.esft.test_data_cli import run_cli

# lr large enough that every trained slice moves in fp32 after a few steps; weight decay on, so a
# frozen slice that were decayed would differ too.
CONFIG = train.EsftConfig(steps=3, lr=1e-2, batch_size=4, weight_decay=0.1, max_length=64)


def experts_file(model_dir, path, experts):
    shape = model_shape(model_dir)
    record = {**shape.record(), "experts": {str(k): v for k, v in experts.items()}}
    path.write_text(json.dumps(record))
    return path


def state(model_dir):
    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()}


def expected_changes(model_dir, experts, shared=False):
    """name -> expert rows that must change (None: whole tensor); everything else must not."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    out = {}
    for layer in moe.moe_layers(model):
        if layer.index in experts:
            out.update(dict.fromkeys(layer.expert_parameters(), experts[layer.index]))
        if shared:
            out.update(dict.fromkeys(layer.shared_parameters()))
    return out


def compare_every_tensor(before, after, changes):
    assert before.keys() == after.keys()
    for name, old in before.items():
        new = after[name]
        rows = changes.get(name, "frozen")
        if rows == "frozen":
            assert torch.equal(old, new), f"{name} changed"
        elif rows is None:
            assert not torch.equal(old, new), f"{name} did not train"
        else:
            for e in range(old.shape[0]):
                same = torch.equal(old[e], new[e])
                assert same != (e in rows), f"{name}[{e}] {'changed' if same is False else 'did not train'}"


def test_train_and_merge_carved(tiny_carved, task_file, tmp_path):
    experts = {0: [1, 4], 1: [6]}
    efile = experts_file(tiny_carved, tmp_path / "experts.json", experts)
    result = train.train(tiny_carved, efile, task_file, tmp_path / "adapter", CONFIG)
    saved = load_file(str(tmp_path / "adapter" / train.TENSORS_FILE))
    changes = expected_changes(tiny_carved, experts)
    assert set(saved) == set(changes)  # only trained tensors saved, as selected slices
    assert all(saved[n].shape[0] == len(rows) for n, rows in changes.items())
    assert result["trainable_parameters"] == sum(t.numel() for t in saved.values())
    merged = merge.merge(tiny_carved, tmp_path / "adapter", tmp_path / "merged")
    compare_every_tensor(state(tiny_carved), state(merged), changes)
    assert (merged / "tokenizer.json").is_file()
    carve = json.loads((merged / "carve.json").read_text())  # the carve's record, this training appended
    assert carve["resolved"] == json.loads((tiny_carved / "carve.json").read_text())["resolved"]
    entry = carve["tune"][-1]
    assert entry["stage"] == "esft" and entry["model"] == str(tiny_carved.resolve())
    assert entry["adapter"] == str((tmp_path / "adapter").resolve())
    adapter_record = json.loads((tmp_path / "adapter" / "esft_config.json").read_text())
    assert adapter_record["data_sha256"] == hashlib.sha256(task_file.read_bytes()).hexdigest()
    for key in ("data", "data_sha256", "base_digest", "experts", "config", "training", "versions"):
        assert entry[key] == adapter_record[key]  # what trained it, kept
    assert json.loads((merged / "esft.json").read_text())["data"] == adapter_record["data"]
    reloaded = AutoModelForCausalLM.from_pretrained(merged)  # stock transformers, no remote code
    assert reloaded.config.model_type == "glm4_moe"
    assert json.loads((merged / "config.json").read_text())["partial_rotary_factor"] == 1.0  # for vLLM


@pytest.mark.parametrize(
    ("family", "expected_layout"),
    [("qwen2_moe", "A2E8"), ("qwen3_moe", "A2E8"), ("mixtral", "A2E8"), ("deepseek_v2", "S1A2E9")],
)
def test_train_and_merge_native(native_models, task_file, tmp_path, family, expected_layout):
    model_dir = native_models[family]
    layers = model_shape(model_dir).moe_layers
    experts = {layers[0]: [0, 7], layers[-1]: [3]}
    shared = bool(moe.FAMILIES[family].shared)  # --train-shared is refused where there are none
    config = CONFIG.model_copy(update={"steps": 2, "train_shared": shared})
    train.train(
        model_dir, experts_file(model_dir, tmp_path / "e.json", experts), task_file, tmp_path / "a", config
    )
    merged = merge.merge(model_dir, tmp_path / "a", tmp_path / "m")
    compare_every_tensor(state(model_dir), state(merged), expected_changes(model_dir, experts, shared=shared))
    # no carve made it: its record holds its stages alone, and eval names it by its layout
    (entry,) = json.loads((merged / "carve.json").read_text())["tune"]
    assert entry["stage"] == "esft" and entry["data"] == str(task_file.resolve())
    named = describe_model(merged)
    assert named["name"] == f"{family}-{expected_layout}+esft" and named["active_fraction"] is None


@pytest.mark.parametrize(
    "family, options",
    [("carved", {}), ("glm4_moe", {"train_shared": True}), ("qwen3_moe", {"train_non_expert": True})],
)
def test_training_changes_only_what_it_trains(tiny_carved, native_models, task_file, family, options):
    """The trained model itself, every tensor before vs after (merge copies only the adapter)."""

    model_dir = tiny_carved if family == "carved" else native_models[family]
    layers = model_shape(model_dir).moe_layers
    experts = {layers[0]: [0, 5], layers[-1]: [2]}
    config = CONFIG.model_copy(update=options)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dataset = train.training_set(model_dir, task_file, tokenizer, config)
    train.train_experts(model, experts, dataset, Collator(pad_id(tokenizer)), config)
    changes = expected_changes(model_dir, experts, shared=config.train_shared)
    if config.train_non_expert:  # every other parameter trains whole; unselected experts stay frozen
        fused = {n for layer in moe.moe_layers(model) for n in layer.expert_parameters()}
        shared = {n for layer in moe.moe_layers(model) for n in layer.shared_parameters()}
        changes.update({n: None for n, _ in model.named_parameters() if n not in fused | shared})
    compare_every_tensor(before, model.state_dict(), changes)


def test_a_model_trained_twice_trains_its_second_selection(tiny_carved, task_file):
    """Python API: the gradient masks of a first training are removed with it. Kept, they zeroed the
    second selection's gradients (weight decay alone still moved its rows: it is off here)."""
    config = CONFIG.model_copy(update={"weight_decay": 0.0})
    layer = model_shape(tiny_carved).moe_layers[0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_carved)
    model = AutoModelForCausalLM.from_pretrained(tiny_carved)
    dataset = train.training_set(tiny_carved, task_file, tokenizer, config)
    train.train_experts(model, {layer: [0]}, dataset, Collator(pad_id(tokenizer)), config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train.train_experts(model, {layer: [3]}, dataset, Collator(pad_id(tokenizer)), config)
    compare_every_tensor(
        before, model.state_dict(), expected_changes(tiny_carved, {layer: [3]}, shared=False)
    )


def test_cli_train_and_merge(tiny_carved, task_file, tmp_path, monkeypatch, capsys):
    efile = experts_file(tiny_carved, tmp_path / "e.json", {0: [3]})
    args = ["train", tiny_carved, "--experts", efile, "--data", task_file, "--steps", 1, "--max-length", 32]
    code, out = run_cli(monkeypatch, capsys, *args, "--out", tmp_path / "a")
    assert code == 0 and "trained" in out.out, out.err[-300:]
    code, out = run_cli(monkeypatch, capsys, "merge", tiny_carved, tmp_path / "a", "--out", tmp_path / "m")
    assert code == 0 and AutoModelForCausalLM.from_pretrained(tmp_path / "m").config.model_type == "glm4_moe"
    for ratio in ("0", "2", "nan"):
        code, out = run_cli(
            monkeypatch, capsys, *args, "--out", tmp_path / "b", "--mix-general", f"t.txt:{ratio}"
        )
        assert code != 0 and "--mix-general: RATIO is the general text's share" in out.err, out.err
    assert not (tmp_path / "b").exists()


def test_a_diverged_run_writes_no_adapter(tiny_carved, task_file, tmp_path):
    from moecarve.tune.trainer import TrainingDiverged

    efile = experts_file(tiny_carved, tmp_path / "experts.json", {0: [1, 4], 1: [6]})
    for lr, message in ((1e8, "training diverged"), (1e300, "a step overflowed float32")):
        with pytest.raises(TrainingDiverged, match=message):
            train.train(
                tiny_carved, efile, task_file, tmp_path / "adapter", CONFIG.model_copy(update={"lr": lr})
            )
        assert not (tmp_path / "adapter").exists()


def test_mix_general(tiny_carved, task_file, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_carved)
    general = tmp_path / "general.txt"
    general.write_text("the expert router " * 400)
    task_only = train.training_set(tiny_carved, task_file, tokenizer, CONFIG)
    mixed = train.training_set(
        tiny_carved,
        task_file,
        tokenizer,
        CONFIG.model_copy(update={"mix_general": str(general), "mix_ratio": 0.25}),
    )
    assert len(mixed) == len(task_only) + len(task_only) // 3  # a quarter of the set is general text
    with pytest.raises(ValueError, match="TEXT:RATIO"):
        train.EsftConfig(mix_general=str(general))  # no ratio
    with pytest.raises(ValueError, match="finite number"):
        train.EsftConfig(lr=float("inf"))  # would train NaN weights
    with pytest.raises(FileNotFoundError, match="--mix-general"):
        train.training_set(
            tiny_carved,
            task_file,
            tokenizer,
            train.EsftConfig(mix_general=str(tmp_path / "no"), mix_ratio=0.2),
        )


@pytest.mark.parametrize("name", ["protocol", "boolq-passages"])
def test_protocol_general_text_holds_out_the_scored_tail(tiny_carved, task_file, name):
    """`--mix-general protocol` (or the passages' other name) reads the BoolQ passages as recovery does: never the last 16 x 2,048
    tokens, which the perplexity protocol scores."""
    from moecarve.carve.calib import read_text, tokenize_stream
    from moecarve.tune.data import PROTOCOL_TOKENS

    tokenizer = AutoTokenizer.from_pretrained(tiny_carved)
    usable = tokenize_stream(tokenizer, read_text(None)[0])[:-PROTOCOL_TOKENS]
    task = train.training_set(tiny_carved, task_file, tokenizer, CONFIG)
    mixed = train.training_set(
        tiny_carved,
        task_file,
        tokenizer,
        CONFIG.model_copy(update={"mix_general": name, "mix_ratio": 0.5}),
    )
    general = [row["input_ids"] for row in mixed[len(task) :]]
    assert len(general) == len(task)
    assert torch.equal(torch.tensor(general).flatten(), usable[: len(general) * 64])  # from the start
    # all the passages but the tail, in pieces of 64 tokens (a last piece of one token dropped)
    pieces = len([start for start in range(0, usable.numel(), 64) if usable.numel() - start > 1])
    ratio = (pieces + 0.5) / (pieces + 0.5 + len(task))  # wants one sequence more than it holds
    more = CONFIG.model_copy(update={"mix_general": name, "mix_ratio": ratio})
    with pytest.raises(ValueError, match=rf"general text gives {pieces} sequences, {pieces + 1} needed"):
        train.training_set(tiny_carved, task_file, tokenizer, more)


def test_slice_adamw_matches_adamw_and_keeps_frozen_slices():
    torch.manual_seed(0)
    weight = torch.randn(5, 3, 4)
    grads = [torch.randn(5, 3, 4) for _ in range(3)]
    rows = torch.tensor([1, 3])
    ours = torch.nn.Parameter(weight.clone())
    reference = torch.nn.Parameter(weight.clone())
    plain = torch.nn.Parameter(weight.clone())
    mask_gradient(ours, rows)
    mask_gradient(plain, rows)
    opt = SliceAdamW([{"params": [ours], "rows": rows}], lr=0.1, weight_decay=0.1)
    ref = torch.optim.AdamW([reference], lr=0.1, betas=(0.9, 0.95), weight_decay=0.1)
    naive = torch.optim.AdamW([plain], lr=0.1, betas=(0.9, 0.95), weight_decay=0.1)
    for g in grads:
        for p, o in ((ours, opt), (reference, ref), (plain, naive)):
            o.zero_grad()
            (p * g).sum().backward()
            o.step()
    frozen = [0, 2, 4]
    assert torch.equal(ours.data[frozen], weight[frozen])  # bit-identical
    torch.testing.assert_close(ours.data[rows], reference.data[rows])  # AdamW on the trained rows
    assert opt.state[ours]["exp_avg"].shape == (2, 3, 4)  # moments only for selected slices
    assert not torch.equal(plain.data[frozen], weight[frozen])  # why: masked grads alone still decay


def test_wrong_experts_file_refused(tiny_carved, task_file, tmp_path):
    shape = model_shape(tiny_carved)
    cases = {
        "names experts \\[9\\]": {**shape.record(), "experts": {"0": [9]}},
        "not a MoE layer": {**shape.record(), "experts": {"7": [1]}},
        "selects no experts": {**shape.record(), "experts": {"0": []}},
        "for another model: num_experts": {**shape.record(), "num_experts": 15, "experts": {"0": [1]}},
        "for another model: moe_layers": {**shape.record(), "moe_layers": [0, 1, 2], "experts": {"0": [1]}},
        "names experts \\[True\\]": {**shape.record(), "experts": {"0": [True]}},
    }
    for message, record in cases.items():
        path = tmp_path / "e.json"
        path.write_text(json.dumps(record))
        with pytest.raises(ValueError, match=message):
            train.train(tiny_carved, path, task_file, tmp_path / "out", CONFIG)
        assert not (tmp_path / "out").exists()


def test_scores_of_another_model_refused(native_models, tiny_carved, task_file, tmp_path):
    from moecarve.esft import score

    score.score(native_models["mixtral"], task_file, tmp_path / "s.json", tokens=32)
    select.select(tmp_path / "s.json", "token", 0.2, tmp_path / "e.json")
    with pytest.raises(ValueError, match="is for another model: model_type"):
        train.train(tiny_carved, tmp_path / "e.json", task_file, tmp_path / "out", CONFIG)


def test_merge_refuses_adapter_of_another_model(native_models, tiny_carved, task_file, tmp_path):
    model_dir = native_models["qwen3_moe"]
    efile = experts_file(model_dir, tmp_path / "e.json", {0: [1]})
    train.train(model_dir, efile, task_file, tmp_path / "a", CONFIG.model_copy(update={"steps": 1}))
    with pytest.raises(ValueError, match="for another model"):
        merge.merge(tiny_carved, tmp_path / "a", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def copy_with_changed_expert(model_dir, out, layer: int, expert: int):
    """A copy of a checkpoint that differs only in one expert's weights (another carve's layout)."""
    from safetensors.torch import save_file

    shutil.copytree(model_dir, out)
    marker = f"layers.{layer}.mlp.experts.{expert}."
    changed = 0
    for shard in out.glob("*.safetensors"):
        tensors = load_file(str(shard))
        for name in tensors:
            if marker in name:
                tensors[name] = tensors[name] + 1e-2
                changed += 1
        save_file(tensors, str(shard), metadata={"format": "pt"})
    assert changed
    return out


def test_merge_refuses_adapter_of_another_model_of_the_same_layout(tiny_carved, task_file, tmp_path):
    """Same layout, other weights (e.g. another carve of the same source): the adapter's slices
    would silently replace weights it never saw, so merge refuses before writing anything."""
    efile = experts_file(tiny_carved, tmp_path / "e.json", {0: [1]})
    train.train(tiny_carved, efile, task_file, tmp_path / "a", CONFIG.model_copy(update={"steps": 1}))
    other = copy_with_changed_expert(tiny_carved, tmp_path / "other", layer=0, expert=1)
    with pytest.raises(ValueError, match="was trained on another model .*merge it into the model it was"):
        merge.merge(other, tmp_path / "a", tmp_path / "m")
    assert not (tmp_path / "m").exists()
    # weights the adapter does not replace may differ (another adapter merged first, say)
    elsewhere = copy_with_changed_expert(tiny_carved, tmp_path / "elsewhere", layer=0, expert=2)
    assert merge.merge(elsewhere, tmp_path / "a", tmp_path / "m2").is_dir()
    # adapters written before the digest was recorded still merge (their base is not checked)
    record = json.loads((tmp_path / "a" / train.CONFIG_FILE).read_text())
    del record["base_digest"]
    (tmp_path / "a" / train.CONFIG_FILE).write_text(json.dumps(record))
    assert merge.merge(other, tmp_path / "a", tmp_path / "m").is_dir()


def test_adapter_rows_outside_the_tensor_are_refused(tiny_carved, task_file, tmp_path):
    efile = experts_file(tiny_carved, tmp_path / "e.json", {0: [1]})
    train.train(tiny_carved, efile, task_file, tmp_path / "a", CONFIG.model_copy(update={"steps": 1}))
    record = json.loads((tmp_path / "a" / train.CONFIG_FILE).read_text())
    name = next(n for n, rows in record["tensors"].items() if rows is not None)
    record["tensors"][name] = [99]
    (tmp_path / "a" / train.CONFIG_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=f"adapter tensor {name} names rows outside 0..6"):
        merge.merge(tiny_carved, tmp_path / "a", tmp_path / "m")
    for rows, message in (([6.0], "its rows must be whole numbers"),):
        record["tensors"][name] = rows
        (tmp_path / "a" / train.CONFIG_FILE).write_text(json.dumps(record))
        with pytest.raises(ValueError, match=message):
            merge.merge(tiny_carved, tmp_path / "a", tmp_path / "m")
    (tmp_path / "a" / train.CONFIG_FILE).write_text(json.dumps({**record, "tensors": [1]}))
    with pytest.raises(ValueError, match="is damaged: its tensors must map names to rows"):
        merge.merge(tiny_carved, tmp_path / "a", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_an_adapter_whose_weights_went_non_finite_since_is_not_merged(tiny_carved, task_file, tmp_path):
    from safetensors.torch import load_file, save_file

    efile = experts_file(tiny_carved, tmp_path / "e.json", {0: [1]})
    train.train(tiny_carved, efile, task_file, tmp_path / "a", CONFIG.model_copy(update={"steps": 1}))
    tensors = load_file(str(tmp_path / "a" / train.TENSORS_FILE))
    name = next(iter(tensors))
    tensors[name][0] = float("nan")
    save_file(tensors, str(tmp_path / "a" / train.TENSORS_FILE), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{name} holds nan or inf"):
        merge.merge(tiny_carved, tmp_path / "a", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_a_step_larger_than_the_task_data_is_refused_before_loading(tiny_carved, task_file, tmp_path):
    efile = experts_file(tiny_carved, tmp_path / "e.json", {0: [1]})
    with pytest.raises(ValueError, match="one step takes 4000 examples .* the training set has 24"):
        train.train(
            tiny_carved, efile, task_file, tmp_path / "a", CONFIG.model_copy(update={"grad_accum": 1000})
        )
    assert not (tmp_path / "a").exists()


def test_a_warmup_as_long_as_the_run_is_warned_of_before_loading(
    tiny_carved, task_file, tmp_path, monkeypatch
):
    def no_loading(*args, **kwargs):
        raise RuntimeError("model loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    efile = experts_file(tiny_carved, tmp_path / "e.json", {0: [1]})
    config = CONFIG.model_copy(update={"steps": 2, "warmup_steps": 2})
    with (
        pytest.warns(
            MoecarveWarning, match="warmup_steps 2 is not below steps 2: the learning rate never"
        ) as said,
        pytest.raises(RuntimeError),
    ):
        train.train(tiny_carved, efile, task_file, tmp_path / "a", config)
    assert said[0].filename == __file__  # pointed at the caller's line


def test_task_data_as_json_is_refused_and_jsonl_read_whatever_its_case(tiny_carved, task_file, tmp_path):
    from moecarve.esft.data import load_examples

    tokenizer = AutoTokenizer.from_pretrained(tiny_carved)
    upper = tmp_path / "TASK.JSONL"
    upper.write_text(task_file.read_text())
    assert len(load_examples(upper, tokenizer)) == len(load_examples(task_file, tokenizer))
    with pytest.raises(ValueError, match="is a .json file: give a JSONL file"):
        load_examples(upper.rename(tmp_path / "task.json"), tokenizer)


def test_digest_of_a_bf16_checkpoint_matches_between_train_and_merge(native_models, task_file, tmp_path):
    """train loads in float32, merge in what dtype="auto" picks: both hash the same base values,
    whether the weights are stored in bf16 or stored in float32 under a config that says bf16."""
    source = native_models["qwen3_moe"]
    stored_bf16, declared_bf16 = tmp_path / "stored", tmp_path / "declared"
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(stored_bf16)
    shutil.copytree(source, declared_bf16)
    config = json.loads((declared_bf16 / "config.json").read_text())
    (declared_bf16 / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    AutoTokenizer.from_pretrained(source).save_pretrained(stored_bf16)
    for model_dir in (stored_bf16, declared_bf16):
        efile = experts_file(model_dir, tmp_path / "e.json", {0: [2, 5]})
        adapter, out = tmp_path / f"a-{model_dir.name}", tmp_path / f"m-{model_dir.name}"
        train.train(model_dir, efile, task_file, adapter, CONFIG.model_copy(update={"steps": 1}))
        merged = merge.merge(model_dir, adapter, out)
        assert AutoModelForCausalLM.from_pretrained(merged).dtype == torch.bfloat16


def test_train_shared_refused_without_shared_experts(native_models, task_file, tmp_path):
    model_dir = native_models["mixtral"]
    efile = experts_file(model_dir, tmp_path / "e.json", {0: [1]})
    with pytest.raises(ValueError, match="mixtral models have no shared experts"):
        train.train(
            model_dir, efile, task_file, tmp_path / "a", CONFIG.model_copy(update={"train_shared": True})
        )
    assert not (tmp_path / "a").exists()


def test_a_damaged_model_is_named(tiny_carved, task_file, tmp_path):
    """safetensors' own error names no file: score, train and merge name the model, and write nothing."""
    from moecarve.esft import score

    efile = experts_file(tiny_carved, tmp_path / "experts.json", {0: [1]})
    train.train(tiny_carved, efile, task_file, tmp_path / "adapter", CONFIG)
    damaged = shutil.copytree(tiny_carved, tmp_path / "damaged")
    for weights in damaged.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])
    message = f"{damaged}: a weights file is damaged"
    with pytest.raises(ValueError, match=message):
        score.score(damaged, task_file, tmp_path / "scores.json")
    with pytest.raises(ValueError, match=message):
        train.train(damaged, efile, task_file, tmp_path / "adapter2", CONFIG)
    with pytest.raises(ValueError, match=message):
        merge.merge(damaged, tmp_path / "adapter", tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "damaged", "experts.json"]


def test_the_python_api_asks_for_an_output(tiny_carved, task_file, tmp_path):
    from moecarve.esft import score

    efile = experts_file(tiny_carved, tmp_path / "experts.json", {0: [1], 1: [6]})
    for call, what in ((lambda: score.score(tiny_carved, task_file, None), "output file is needed"),
                       (lambda: train.train(tiny_carved, efile, task_file, None), "output directory is needed"),
                       (lambda: merge.merge(tiny_carved, tmp_path / "a", None), "output directory is needed")):  # fmt: skip
        with pytest.raises(ValueError, match=what):
            call()


def test_a_model_named_with_a_tilde_and_a_config_given_as_a_dict(
    tiny_carved, task_file, tmp_path, monkeypatch
):
    from moecarve.esft import score

    monkeypatch.setenv("HOME", str(tiny_carved.parent))
    home_model = f"~/{tiny_carved.name}"
    record = score.score(home_model, task_file, tmp_path / "s.json", tokens=64, max_length=32, progress=False)
    assert record["model"] == str(tiny_carved.resolve())
    efile = experts_file(tiny_carved, tmp_path / "experts.json", {0: [1], 1: [6]})
    result = train.train(home_model, efile, task_file, tmp_path / "a", {**CONFIG.model_dump(), "steps": 1})
    assert result["config"]["steps"] == 1 and (tmp_path / "a" / "esft_config.json").is_file()
    with pytest.raises(TypeError, match="config must be an EsftConfig or a dict of its fields, got str"):
        train.train(tiny_carved, efile, task_file, tmp_path / "b", "fast")
