"""Scores sum to 1 per layer; selection respects p and the one-expert minimum; bad input refused."""

from __future__ import annotations

import hashlib
import json

import pytest

from moecarve.esft import score, select
from tests.esft.conftest import NATIVE

TOKENS = 256


@pytest.fixture(scope="module")
def carved_scores(tiny_carved, task_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("scores") / "scores.json"
    return score.score(tiny_carved, task_file, out, tokens=TOKENS), out


def check_sums(record):
    for kind in score.SCORES:
        layers = record["scores"][kind]
        assert sorted(layers, key=int) == [str(i) for i in record["moe_layers"]]
        for values in layers.values():
            assert len(values) == record["num_experts"]
            assert sum(values) == pytest.approx(1.0, abs=1e-9)
            assert min(values) >= 0


def test_carved_scores(carved_scores):
    record, out = carved_scores
    check_sums(record)
    assert TOKENS - 40 < record["tokens"] <= TOKENS
    assert out.with_suffix(".png").stat().st_size > 1000
    assert json.loads(out.read_text()) == record


@pytest.mark.parametrize("family", sorted(NATIVE))
def test_native_scores(native_models, task_file, tmp_path, family):
    check_sums(score.score(native_models[family], task_file, tmp_path / "s.json", tokens=64))


def test_sequence_scores_by_hand():
    import torch

    from moecarve.moe import Routing

    routing = Routing(torch.tensor([[0, 2], [2, 3]]), torch.tensor([[0.5, 0.25], [1.0, 0.5]]))
    got = score.sequence_scores(routing, 4)
    assert got["token"].tolist() == [0.25, 0.0, 0.5, 0.25]
    assert got["gate"].tolist() == [0.25, 0.0, 0.625, 0.25]


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("kind", ["token", "gate"])
def test_select_respects_p(carved_scores, p, kind):
    record, _ = carved_scores
    result = select.select(record, kind, p)
    for index, chosen in result["experts"].items():
        values = record["scores"][kind][index]
        assert chosen  # at least one per layer
        assert sum(values[e] for e in chosen) >= p - 1e-9
        # fewest: dropping the weakest chosen expert falls short of p
        rest = sum(values[e] for e in chosen) - min(values[e] for e in chosen)
        assert len(chosen) == 1 or rest < p - 1e-9
        # the chosen ones are the top scorers
        assert min(values[e] for e in chosen) >= max(
            (values[e] for e in range(len(values)) if e not in chosen), default=0
        )
    assert result["selected"] == sum(len(v) for v in result["experts"].values())
    assert result["trainable_parameters"] == result["selected"] * record["expert_parameters"]


def test_select_minimum_one():
    assert select.choose([0.0, 0.0, 1.0], 1e-12) == [2]
    assert select.choose([0.4, 0.3, 0.3], 0.5) == [0, 1]


@pytest.mark.parametrize("p", [0, -0.1, 1.5, True])  # True would be 1.0: every expert
def test_select_refuses_p(carved_scores, p):
    with pytest.raises(ValueError, match=r"--p must be a number in \(0, 1\]"):
        select.select(carved_scores[0], "token", p)


def test_select_refuses_other_files(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="not an `esft score` output"):
        select.select(bad, "token", 0.2)
    with pytest.raises(FileNotFoundError, match="scores file not found"):
        select.select(tmp_path / "missing.json", "token", 0.2)
    with pytest.raises(ValueError, match="is a directory: give the JSON `esft score` wrote"):
        select.select(tmp_path, "token", 0.2)
    bad.write_text(json.dumps({"format": score.FORMAT, "scores": {}}))
    with pytest.raises(ValueError, match="lacks model_type, .*expert_parameters"):
        select.select(bad, "token", 0.2)
    bad.write_bytes(b"\xff\xfe binary")
    with pytest.raises(ValueError, match="x.json is not UTF-8 text"):
        select.select(bad, "token", 0.2)


def test_select_refuses_a_damaged_scores_file_by_name(carved_scores, tmp_path):
    record, _ = carved_scores
    layer = str(record["moe_layers"][0])
    damaged = {
        "no gate scores": {**record, "scores": {"token": record["scores"]["token"]}},
        "scores as a list": {**record, "scores": []},
        "a layer of null": {
            **record,
            "scores": {**record["scores"], "token": {**record["scores"]["token"], layer: None}},
        },
        "a word among them": {
            **record,
            "scores": {**record["scores"], "gate": {**record["scores"]["gate"], layer: ["x"]}},
        },
        "a number for the model": {**record, "model": 5},
        "a word for a count": {**record, "expert_parameters": "x"},
    }
    for content in damaged.values():
        (tmp_path / "s.json").write_text(json.dumps(content))
        with pytest.raises(ValueError, match="s.json: this `esft score` output is damaged"):
            select.select(tmp_path / "s.json", "token", 0.2)


def test_score_refuses_dense_model_before_reading_data(tiny_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for dense in (tiny_models["llama"], "bundled"):  # the bundled model is dense too
        with pytest.raises(ValueError, match="carve it first"):
            score.score(dense, tmp_path / "no-such-task.jsonl", tmp_path / "s.json")
    assert not (tmp_path / "s.json").exists()


def test_score_refuses_a_directory_where_its_heatmap_goes_before_work(carved_scores, tiny_carved, tmp_path):
    import shutil

    shutil.copy(carved_scores[1], tmp_path / "s.json")  # an earlier output, replaceable
    (tmp_path / "s.png").mkdir()
    with pytest.raises(ValueError, match="s.png exists and is no earlier output's"):
        score.score(tiny_carved, tmp_path / "no-such-task.jsonl", tmp_path / "s.json")


def test_score_refuses_data_without_examples(tiny_carved, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no usable examples"):
        score.score(tiny_carved, empty, tmp_path / "s.json")
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize(
    "out, options, message",
    [
        ("s.png", {}, "the scores are JSON"),
        ("s.json", {"max_length": 0}, "--max-length must be a whole number of at least 2"),
        ("s.json", {"tokens": True}, "--tokens must be a whole number of at least 1, got True"),
        ("s.json", {"device": "mps"}, "--device mps: esft score runs on cpu or cuda"),
    ],
)
def test_score_refuses_bad_options_before_work(tiny_carved, tmp_path, out, options, message):
    with pytest.raises(ValueError, match=message):
        score.score(tiny_carved, tmp_path / "no-such-task.jsonl", tmp_path / out, **options)
    assert list(tmp_path.iterdir()) == []


def test_outputs_never_replace_inputs(tiny_carved, task_file, carved_scores, tmp_path):
    """An output named like the model's files, the task data or the scores it reads is refused before
    any work, and those inputs stay as they were; so are a directory or a path under a file."""
    inputs = [tiny_carved / "config.json", task_file, carved_scores[1]]
    before = [p.read_bytes() for p in inputs]
    (tmp_path / "a_file").write_text("x")
    for out, message in [
        (tiny_carved / "config.json", "--out .* is inside model"),
        (task_file, "--out .* is --data"),
        (tmp_path, "is a directory"),
        (tmp_path / "a_file" / "s.json", "is a file, not a directory"),
    ]:
        with pytest.raises(ValueError, match=message):
            score.score(tiny_carved, task_file, out, tokens=TOKENS)
    with pytest.raises(ValueError, match="--out .* is the scores file"):
        select.select(carved_scores[1], "token", 0.2, out=carved_scores[1])
    with pytest.raises(ValueError, match="--out .* is inside the scored model"):
        select.select(carved_scores[1], "token", 0.2, out=tiny_carved / "config.json")
    assert [p.read_bytes() for p in inputs] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_existing_files_that_are_not_earlier_outputs_are_refused(
    tiny_carved, task_file, carved_scores, tmp_path
):
    """score replaces only an earlier scores file (and its heatmap), select only an earlier experts file."""
    notes, picture = tmp_path / "notes.json", tmp_path / "notes.png"
    notes.write_text("mine")
    with pytest.raises(ValueError, match="notes.json exists and is not a moecarve-esft-scores/1 file"):
        score.score(tiny_carved, task_file, notes, tokens=TOKENS)
    with pytest.raises(ValueError, match="notes.json exists and is not a moecarve-esft-experts/1 file"):
        select.select(carved_scores[1], "token", 0.2, out=notes)
    notes.unlink()
    picture.write_text("a picture")
    with pytest.raises(ValueError, match="notes.png exists and is no earlier output's"):
        score.score(tiny_carved, task_file, notes, tokens=TOKENS)
    assert picture.read_text() == "a picture" and not notes.exists()
    picture.unlink()
    score.score(tiny_carved, task_file, notes, tokens=TOKENS)
    score.score(tiny_carved, task_file, notes, tokens=TOKENS)  # its own output: replaced
    select.select(notes, "token", 0.2, out=tmp_path / "experts.json")
    select.select(notes, "token", 0.2, out=tmp_path / "experts.json")


def test_max_length_above_the_positions_is_lowered_to_them(tiny_carved, task_file, tmp_path):
    with pytest.warns(UserWarning, match="--max-length 4096 is lowered to the 256 positions"):
        score.score(tiny_carved, task_file, tmp_path / "s.json", tokens=TOKENS, max_length=4096)


def test_models_with_unaligned_experts_load_with_the_eager_experts(tmp_path):
    """Carves made before every expert was padded to 8 neurons: grouped_mm refuses their bf16 rows."""
    import torch

    from moecarve.moe import experts_loading

    for width, dtype, expected in [(12, torch.bfloat16, {"experts_implementation": "eager"}),
                                   (16, torch.bfloat16, {}), (12, torch.float32, {}),
                                   (12, "auto", {"experts_implementation": "eager"})]:  # fmt: skip
        (tmp_path / "config.json").write_text(
            json.dumps({"moe_intermediate_size": width, "dtype": "bfloat16"})
        )
        assert experts_loading(tmp_path, dtype) == expected, (width, dtype)


def test_examples_are_sampled_whole_and_at_random_when_over_the_budget():
    """The paper scores a random sample of the task data. In file order a sorted file gave its first
    slice, and the example cut at the budget weighed as much as a whole one in the per-sequence mean."""
    from types import SimpleNamespace

    examples = [SimpleNamespace(input_ids=[i] * (10 + i)) for i in range(40)]  # sorted by length
    assert score.sample_examples(examples, 10_000, seed=0) == [e.input_ids for e in examples]
    drawn = score.sample_examples(examples, 200, seed=0)
    assert drawn == score.sample_examples(examples, 200, seed=0)  # the seed decides it
    assert drawn != score.sample_examples(examples, 200, seed=1)
    assert all(ids in [e.input_ids for e in examples] for ids in drawn)  # whole examples only
    assert sum(map(len, drawn)) <= 200 and drawn != [e.input_ids for e in examples[: len(drawn)]]
    (cut,) = score.sample_examples(examples[30:], 12, seed=0)  # one example over the budget by itself
    assert len(cut) == 12


def test_scores_are_per_sequence_means_normalised_per_layer(tiny_carved, task_file, tmp_path):
    """Each expert's score is its share of selections (or of gate mass) per token, averaged within
    each example, then over the examples, then normalised within its layer: recomputed here from
    every example's routing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moecarve import moe
    from moecarve.esft.data import load_examples

    record = score.score(
        tiny_carved, task_file, tmp_path / "s.json", tokens=10**6, max_length=64, progress=False
    )
    examples = load_examples(task_file, AutoTokenizer.from_pretrained(tiny_carved), 64)
    assert record["sequences"] == len(examples) > 1
    assert record["token_budget"] == 10**6 and record["max_length"] == 64 and record["device"] == "cpu"
    assert record["data_sha256"] == hashlib.sha256(task_file.read_bytes()).hexdigest()
    model = AutoModelForCausalLM.from_pretrained(tiny_carved, dtype=torch.float32).eval()
    num_experts = record["num_experts"]
    totals = {kind: {} for kind in score.SCORES}
    with torch.no_grad(), moe.record_routing(model) as log:
        for example in examples:
            log.clear()
            model(torch.tensor([example.input_ids]))
            for index, (routing,) in log.layers.items():
                picks = torch.nn.functional.one_hot(routing.indices, num_experts).double()  # [T, K, E]
                per_token = {
                    "token": picks.sum(1) / routing.indices.shape[1],
                    "gate": (picks * routing.weights.double()[..., None]).sum(1),
                }
                for kind, values in per_token.items():
                    totals[kind][index] = totals[kind].get(index, 0) + values.mean(0)
    for kind, layers in totals.items():
        assert sorted(layers) == record["moe_layers"]
        for index, values in layers.items():
            assert record["scores"][kind][str(index)] == pytest.approx(
                (values / values.sum()).tolist(), abs=1e-9
            )
    token_scores = torch.tensor(record["scores"]["token"][str(record["moe_layers"][0])])
    assert token_scores.max() > 1.5 * token_scores.min()  # unequal: a uniform vector would not pass
