"""eval report: tables and plots rendered from the JSON records the other commands wrote."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from moecarve.eval.load import evaluate_load
from moecarve.eval.ppl import evaluate_ppl
from moecarve.eval.report import render_report
from moecarve.eval.speed import evaluate_speed

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_from_real_records(tiny_models, tiny_carved, calib_file, tiny_tasks_record, tmp_path):
    results = tmp_path / "results"
    dense, carved = tiny_models["llama"], tiny_carved
    ppl = evaluate_ppl([dense, carved], calib_file, 2, 32, out=results / "ppl.json", progress=False)
    load = evaluate_load(carved, calib_file, 1, 32, out=results / "load.json", progress=False)
    evaluate_speed(
        carved,
        dense,
        (1, 2),
        8,
        2,
        1,
        device="cpu",
        data=calib_file,
        out=results / "speed.json",
        progress=False,
    )
    shutil.copy(tiny_tasks_record[0], results / "tasks.json")
    (results / "other.json").write_text(json.dumps({"not": "an eval record"}))

    written = render_report(results, tmp_path / "report")
    names = {p.name for p in written}
    assert {
        "report.md",
        "ppl.csv",
        "ppl_vs_active.png",
        "tasks.csv",
        "speed.csv",
        "speed_vs_batch.png",
    } <= names
    for png in (p for p in written if p.suffix == ".png"):
        assert png.read_bytes()[:8] == PNG
    markdown = (tmp_path / "report" / "report.md").read_text()
    for result in ppl["results"]:
        assert f"| {result['name']} | {result['active_fraction']:.3f} | {result['ppl']:.3f} |" in markdown
    arc = tiny_tasks_record[1]["tasks"]["arc_easy"]
    assert f"{arc['acc']:.3f} / {arc['acc_norm']:.3f} (4)" in markdown
    with (tmp_path / "report" / "ppl.csv").open() as handle:
        assert sorted(float(r["ppl"]) for r in csv.DictReader(handle)) == sorted(
            r["ppl"] for r in ppl["results"]
        )
    heatmap = next(p for p in written if p.name.startswith("load_") and p.suffix == ".csv")
    with heatmap.open() as handle:
        rows = list(csv.reader(handle))[1:]
    assert [[int(v) for v in row[1:]] for row in rows] == [
        layer["tokens_per_expert"] for layer in load["layers"]
    ]


LOAD = {"kind": "load", "name": "S1A2E8", "model": "/m/c", "tokens": 4, "top_k": 2, "routed_experts": 2,
        "summary": {"mean_max_over_mean": 1.0, "worst_max_over_mean": 1.0},
        "layers": [{"layer": 0, "tokens_per_expert": [4, 4]}]}  # fmt: skip


def test_report_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="results directory not found"):
        render_report(tmp_path / "nope")
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(ValueError, match="a.txt is a file: give the directory"):
        render_report(tmp_path / "a.txt")
    (tmp_path / "a.txt").unlink()
    with pytest.raises(ValueError, match="no eval results"):
        render_report(tmp_path)
    for record in (  # records of another shape: each named, before anything is written
        {"kind": "ppl"},
        {"kind": "ppl", "protocol": {}, "results": [["a"]]},
        {"kind": "tasks", "tasks": []},
        {"kind": "load", "name": "x", "layers": [{"layer": 0, "tokens_per_expert": ["many"]}]},
        {**LOAD, "layers": []},  # no layer to draw
        {
            **LOAD,
            "layers": [{"layer": 0, "tokens_per_expert": [1, 1]}, {"layer": 1, "tokens_per_expert": [2]}],
        },
    ):
        (tmp_path / "r.json").write_text(json.dumps(record))
        with pytest.raises(ValueError, match=f"r.json: a {record['kind']} record of another shape"):
            render_report(tmp_path, tmp_path / "report")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_report_never_writes_into_a_model(tiny_models, calib_file, tmp_path, monkeypatch):
    evaluate_ppl([tiny_models["llama"]], calib_file, 2, 32, out=tmp_path / "ppl.json", progress=False)
    model = shutil.copytree(tiny_models["llama"], tmp_path / "model")
    (model / "sub").mkdir()
    (tmp_path / "link").symlink_to(model / "sub")
    before = sorted(p.name for p in model.rglob("*"))
    monkeypatch.chdir(model / "sub")
    for out in (
        model,
        model / "report",
        model / "r.md",
        "rep",
        tmp_path / "link" / "rep",
    ):  # relative, symlinked
        with pytest.raises(ValueError, match="is in the model directory"):
            render_report(tmp_path, out)
    assert sorted(p.name for p in model.rglob("*")) == before


def test_report_to_markdown_file_with_batch_carve_times(tiny_models, tiny_carved, calib_file, tmp_path):
    """A batch job keeps carve.json beside ppl.json: its carve time joins the table; a .md target
    (docs/results.md) gets the plots in the directory of its name, linked relatively."""
    job = tmp_path / "sweep" / "jobs" / "tiny-S1A2E8"
    job.mkdir(parents=True)
    evaluate_ppl([tiny_carved], calib_file, 2, 32, out=job / "ppl.json", progress=False)
    evaluate_ppl(
        [tiny_models["llama"]], calib_file, 2, 32, out=tmp_path / "sweep" / "dense.json", progress=False
    )
    carve = json.loads((tiny_carved / "carve.json").read_text())
    carve["carve_seconds"] = 12.5
    (job / "carve.json").write_text(json.dumps(carve))
    # a killed batch's temporary job directory is not read
    stale = shutil.copytree(job, job.parent / ".tiny-S1A2E8.tmp-1") / "ppl.json"
    record = json.loads(stale.read_text())
    record["results"][0]["ppl"] = 999.0
    stale.write_text(json.dumps(record))
    # a carve.json of another configuration beside a record does not lend it its time
    other = tmp_path / "sweep" / "other"
    other.mkdir()
    evaluate_ppl([tiny_carved], calib_file, 3, 32, out=other / "ppl.json", progress=False)
    (other / "carve.json").write_text(json.dumps({**carve, "resolved": {"name": "S2A2E16"}}))

    target = tmp_path / "docs" / "results.md"
    written = render_report(tmp_path / "sweep", target)
    assert target in written
    assert (tmp_path / "docs" / "results" / "ppl_vs_active.png").read_bytes()[:8] == PNG
    markdown = target.read_text()
    assert "![PPL vs active fraction](results/ppl_vs_active.png)" in markdown
    assert f"--out {target}" in markdown
    assert "| carve s |" in markdown
    lines = markdown.splitlines()
    carved = [line for line in lines if line.startswith("| S1A2E8 |")]
    assert len(carved) == 2  # the job's record (2 windows) and the other one (3 windows)
    assert sorted(line.rsplit("|", 2)[1].strip() for line in carved) == ["-", "12.500"]
    assert next(line for line in lines if line.startswith("| dense |")).endswith("| - |")
    assert "999.000" not in markdown
    assert not (tmp_path / "docs" / "report.md").exists()


def test_gguf_sources_group_by_file_name(tmp_path):
    """A dequantized GGUF is cached as gguf/FILE-KEY; the key must not split one model in two."""
    from moecarve.eval.report import _source_id

    cache = tmp_path / "gguf"
    assert _source_id(str(cache / "Model.Q4_1-b9b8f18827a5d525")) == "Model.Q4_1.gguf"
    assert _source_id(str(cache / "Model.Q4_1-4b1a0fbae7e6850c")) == "Model.Q4_1.gguf"
    assert _source_id(str(tmp_path / "my-model")) == str((tmp_path / "my-model").resolve())


def test_report_keeps_eager_and_compiled_speed_apart(tmp_path):
    """Eager, compiled and kernel runs of one model in one folder stay separate rows and lines."""
    results = tmp_path / "results"
    results.mkdir()

    def record(compiled, kernels, rate):
        rows = [
            {"role": role, "batch": 1, "prefill_tokens_per_s": rate, "decode_tokens_per_s": rate}
            for role in ("model", "baseline")
        ]
        models = {"model": {"name": "S1A2E8"}, "baseline": {"name": "dense"}}
        base = {"kind": "speed", "cpu_figures": True, "machine": {"device": "cpu"}, "dtype": "float32"}
        return {
            **base,
            "models": models,
            "rows": rows,
            "ratios": [],
            "kernels": kernels,
            "compiled": compiled,
        }

    old_eager = record(False, False, 10.0)
    del old_eager["compiled"]  # written before --compile existed
    for name, rec in {"eager": old_eager, "compiled": record(True, True, 20.0)}.items():
        (results / f"speed_{name}.json").write_text(json.dumps(rec))
    render_report(results, tmp_path / "report")
    markdown = (tmp_path / "report" / "report.md").read_text()
    for row in (
        "| S1A2E8 | CPU | float32 | eager | 1 | 10.0 | 10.0 |",
        "| dense | CPU | float32 | eager | 1 | 10.0 | 10.0 |",
        "| S1A2E8 | CPU | float32 | compiled + kernels | 1 | 20.0 | 20.0 |",
        "| dense | CPU | float32 | compiled | 1 | 20.0 | 20.0 |",
    ):
        assert row in markdown


def test_report_keeps_texts_dtypes_and_sources_apart(tiny_models, tiny_carved, calib_file, tmp_path):
    """Records of other texts, dtypes or source models are rows (and lines) of their own, labelled;
    none replaces another."""
    results = tmp_path / "results"
    other = tmp_path / "other.txt"
    other.write_text(calib_file.read_text()[::-1])
    dense, qwen = tiny_models["llama"], tiny_models["qwen2"]
    runs = {
        "a": ([dense, tiny_carved], calib_file, "float32"),
        "b": ([dense, tiny_carved], other, "float32"),
        "c": ([dense], calib_file, "bfloat16"),
        "d": ([qwen], calib_file, "float32"),
    }
    scored = {}
    for name, (models, data, dtype) in runs.items():
        record = evaluate_ppl(models, data, 1, 32, dtype=dtype, out=results / f"{name}.json", progress=False)
        scored[name] = [r["ppl"] for r in record["results"]]
    render_report(results, tmp_path / "report")
    markdown = (tmp_path / "report" / "report.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| source |"))
    assert header == "| source | config | active fraction | PPL | tokens scored | windows | text | dtype |"
    for name, (models, data, dtype) in runs.items():
        for model, ppl in zip(models, scored[name], strict=True):
            source = "llama" if model == tiny_carved else model.name  # a carve's row names its source
            config = "S1A2E8" if model == tiny_carved else "dense"
            row = f"| {source} | {config} | " + ("0.375" if model == tiny_carved else "1.000")
            assert f"{row} | {ppl:.3f} | 31 | 1x32 | {data} | {dtype} |" in markdown  # 31 predicted tokens
    with (tmp_path / "report" / "ppl.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 6


def test_report_of_two_sources_keeps_their_load_and_speed_apart(tmp_path):
    results = tmp_path / "results"

    def model(source, name="S1A2E8"):
        return {"model": f"/m/{source}-{name}", "name": name, "carve": {"source_path": f"/m/{source}"}}

    def speed(source, rate):
        rows = [{"role": "model", "batch": 1, "prefill_tokens_per_s": rate, "decode_tokens_per_s": rate}]
        return {"kind": "speed", "cpu_figures": True, "machine": {"device": "cpu"}, "dtype": "float32",
                "models": {"model": model(source)}, "rows": rows, "ratios": [], "prompt_length": 8,
                "decode_tokens": 2}  # fmt: skip

    def load(source, tokens):
        return {"kind": "load", "name": "S1A2E8", **model(source), "tokens": tokens, "top_k": 2,
                "routed_experts": 2, "summary": {"mean_max_over_mean": 1.0, "worst_max_over_mean": 1.0},
                "layers": [{"layer": 0, "tokens_per_expert": [tokens, tokens]}]}  # fmt: skip

    for source, rate in (("llama", 10.0), ("qwen2", 20.0)):
        (results / source).mkdir(parents=True)
        (results / source / "speed.json").write_text(json.dumps(speed(source, rate)))
        (results / source / "load.json").write_text(json.dumps(load(source, int(rate))))
    (results / "llama" / "speed_again.json").write_text(json.dumps(speed("llama", 30.0)))

    written = render_report(results, tmp_path / "report")
    markdown = (tmp_path / "report" / "report.md").read_text()
    speed_rows = [line for line in markdown.splitlines() if "| CPU | float32 | eager |" in line]
    assert speed_rows == [  # the later llama measurement replaced the earlier one, and the report says so
        "| llama | S1A2E8 | CPU | float32 | eager | 1 | 30.0 | 30.0 |",
        "| qwen2 | S1A2E8 | CPU | float32 | eager | 1 | 20.0 | 20.0 |",
    ]
    assert "1 measurement(s) repeated in a record whose path sorts later" in markdown
    heatmaps = sorted(p.name for p in written if p.name.startswith("load_") and p.suffix == ".csv")
    assert heatmaps == ["load_llama_load.csv", "load_qwen2_load.csv"]
    for source, tokens in (("llama", 10), ("qwen2", 20)):
        with (tmp_path / "report" / f"load_{source}_load.csv").open() as handle:
            assert list(csv.reader(handle))[1] == ["0", str(tokens), str(tokens)]


def test_report_draws_a_record_without_an_active_fraction(tiny_carved, calib_file, tmp_path):
    record = evaluate_ppl([tiny_carved], calib_file, 1, 32, progress=False)
    record["results"][0]["active_fraction"] = None  # a carve.json without resolved.active_fraction
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "ppl.json").write_text(json.dumps(record))
    render_report(tmp_path / "results", tmp_path / "report")
    assert "| S1A2E8 | - |" in (tmp_path / "report" / "report.md").read_text()


def test_texts_of_one_name_in_two_directories_stay_apart(tiny_models, calib_file, tmp_path, monkeypatch):
    """Records name a text by its absolute path, so `--data text.txt` run from two directories is two texts."""
    results = tmp_path / "results"
    for name, text in (("a", calib_file.read_text()), ("b", calib_file.read_text()[::-1])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "text.txt").write_text(text)
        monkeypatch.chdir(tmp_path / name)
        evaluate_ppl([tiny_models["llama"]], "text.txt", 1, 32, out=results / f"{name}.json", progress=False)
    render_report(results, tmp_path / "report")
    markdown = (tmp_path / "report" / "report.md").read_text()
    for name in ("a", "b"):
        assert f"| {tmp_path / name / 'text.txt'} |" in markdown
    assert "repeated in a record" not in markdown


def test_a_carve_and_what_was_trained_from_it_stay_apart(tiny_carved, calib_file, tmp_path):
    """A recovered and an ESFT-merged model keep the carve's carve.json: they are named by the
    training since (rows of their own) and drawn as lines of their own, not as one with the carve."""
    from moecarve.eval import plots
    from moecarve.eval.report import collect, ppl_rows

    recovered = shutil.copytree(tiny_carved, tmp_path / "recovered")
    record = json.loads((recovered / "carve.json").read_text())
    record["tune"] = [{"stage": "recover"}]
    (recovered / "carve.json").write_text(json.dumps(record))
    merged = shutil.copytree(recovered, tmp_path / "merged")
    (merged / "esft.json").write_text("{}")  # a merge made before carve.json's list recorded merges
    results = tmp_path / "results"
    evaluate_ppl(
        [tiny_carved, recovered, merged], calib_file, 1, 32, out=results / "ppl.json", progress=False
    )
    rows = ppl_rows(collect(results)["ppl"])
    assert sorted(r["config"] for r in rows) == ["S1A2E8", "S1A2E8+recover", "S1A2E8+recover+esft"]
    drawn = plots.lines(rows, ("source", "trained", "text", "dtype"), always=("source",))
    assert sorted(label for label, _ in drawn) == [
        "llama (none)",
        "llama (recover)",
        "llama (recover+esft)",
    ]


def test_a_carve_with_dense_layers_counts_them_in_its_active_fraction(tiny_carved, tmp_path):
    """Carves made before the record counted dense layers hold the MoE layers' fraction: eval
    computes it from their settings (S1A2E8 with 1 of 2 layers dense: 11/16)."""
    from moecarve.eval.common import describe_model

    model = shutil.copytree(tiny_carved, tmp_path / "model")
    record = json.loads((model / "carve.json").read_text())
    record["config"]["dense_layers"] = 1
    record["resolved"]["active_fraction"] = 0.375  # as such a carve recorded it
    (model / "carve.json").write_text(json.dumps(record))
    assert describe_model(model)["active_fraction"] == 11 / 16
    assert describe_model(tiny_carved)["active_fraction"] == 0.375  # no dense layers: as recorded


def test_report_names_alike_measurements_apart(tmp_path):
    """Two carves both named S1A2E8 get a model column; one task measured twice shows once, said so;
    speed at two prompt settings gets a column; load records whose names would collide do not."""
    results = tmp_path / "results"
    (results / "a").mkdir(parents=True)

    def ppl(model, value):
        return {"model": model, "name": "S1A2E8", "active_fraction": 0.375, "ppl": value, "tokens_scored": 8,
                "carve": {"source_path": "/m/dense"}}  # fmt: skip

    protocol = {"data": "t.txt", "windows": 2, "length": 4}
    record = {
        "kind": "ppl",
        "protocol": protocol,
        "results": [ppl("/m/carve-a", 30.0), ppl("/m/carve-b", 31.0),  # and two batch jobs' models
                    ppl("/run/jobs/S1A2E8/model", 32.0), ppl("/run/jobs/S1A2E8-bal/model", 33.0)],
    }  # fmt: skip
    (results / "ppl.json").write_text(json.dumps(record))
    tasks = {"kind": "tasks", "model": "/m/carve-a", "name": "S1A2E8", "active_fraction": 0.375}
    for name, questions, acc in (("t1", 2, 0.5), ("t2", 3, 1.0)):
        metrics = {"arc_easy": {"acc": acc, "questions": questions}}
        (results / f"{name}.json").write_text(json.dumps({**tasks, "tasks": metrics}))
    for name, prompt in (("s1", 16), ("s2", 8)):
        rows = [{"role": "model", "batch": 1, "prefill_tokens_per_s": prompt, "decode_tokens_per_s": 1.0}]
        speed = {"kind": "speed", "cpu_figures": True, "machine": {"device": "cpu"}, "dtype": "float32",
                 "models": {"model": {"model": "/m/carve-a", "name": "S1A2E8"}}, "rows": rows, "ratios": [],
                 "prompt_length": prompt, "decode_tokens": 2}  # fmt: skip
        (results / f"{name}.json").write_text(json.dumps(speed))
    (results / "a" / "b.json").write_text(json.dumps(LOAD))
    (results / "a_b.json").write_text(json.dumps({**LOAD, "tokens": 8}))

    written = render_report(results, tmp_path / "report")
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert (
        "| carve-a | S1A2E8 | 0.375 | 30.000 |" in markdown
        and "| carve-b | S1A2E8 | 0.375 | 31.000 |" in markdown
        and "| S1A2E8-bal/model | S1A2E8 | 0.375 | 33.000 |" in markdown
    )
    assert "| S1A2E8 | 0.375 | 1.000 (3) |" in markdown and "(2) |" not in markdown
    assert "1 measurement(s) repeated" in markdown
    assert "| S1A2E8 | CPU | 16+2 | float32 | eager | 1 | 16.0 | 1.0 |" in markdown
    assert "| S1A2E8 | CPU | 8+2 | float32 | eager | 1 | 8.0 | 1.0 |" in markdown
    heatmaps = sorted(p.name for p in written if p.name.startswith("load_") and p.suffix == ".png")
    assert heatmaps == ["load_a_b-2.png", "load_a_b.png"]
    assert markdown.count("load_a_b") == 2 and "load_a_b-2.png" in markdown


def test_sources_of_one_name_in_two_directories_are_named_apart(tmp_path):
    """Two source models both called `llama` (in a/ and b/) were both shown as `llama`: two rows of
    one name and configuration, and nothing to tell which figure is whose."""
    results = tmp_path / "results"
    results.mkdir()
    rows = [
        {
            "model": f"/m/{where}/llama",
            "name": "dense",
            "active_fraction": 1.0,
            "ppl": ppl,
            "tokens_scored": 8,
        }
        for where, ppl in (("a", 30.0), ("b", 31.0))
    ]
    record = {"kind": "ppl", "protocol": {"data": "t.txt", "windows": 2, "length": 4}, "results": rows}
    (results / "ppl.json").write_text(json.dumps(record))
    render_report(results, tmp_path / "report")
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert (
        "| a/llama | dense | 1.000 | 30.000 |" in markdown
        and "| b/llama | dense | 1.000 | 31.000 |" in markdown
    )


def test_report_refuses_a_place_it_cannot_write_before_writing(tmp_path):
    """A non-markdown --out that is a file, a report.md that is a directory, and a markdown file that
    is no earlier report are refused before any plot is written; an earlier report is replaced."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "load.json").write_text(json.dumps(LOAD))
    (tmp_path / "notes.md").write_text("# my notes\n")
    (tmp_path / "file").write_text("")
    (tmp_path / "rep" / "report.md").mkdir(parents=True)
    cases = {
        "notes.md": "exists and is no earlier report",
        "file": "exists and is not a directory",
        "file/r.md": "is a file, not a directory",
        "rep": "report.md is a directory",
    }
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for out, message in cases.items():
        with pytest.raises(ValueError, match=message):
            render_report(results, tmp_path / out)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "notes.md").read_text() == "# my notes\n"
    render_report(results, tmp_path / "r.md")
    render_report(results, tmp_path / "r.md")  # its own earlier report: replaced
    assert (tmp_path / "r.md").read_text().startswith("# Evaluation report")


def test_plots_leave_the_process_matplotlib_backend_as_it_is(tmp_path):
    """A notebook's backend stays its own: the plots are drawn without pyplot."""
    import matplotlib

    from moecarve.esft.score import SCORES, heatmap

    (tmp_path / "load.json").write_text(json.dumps(LOAD))
    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        written = render_report(tmp_path, tmp_path / "report")
        heatmap(
            {"moe_layers": [0], "scores": {kind: {"0": [0.5, 0.5]} for kind in SCORES}}, tmp_path / "h.png"
        )
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)
    assert any(p.suffix == ".png" and p.read_bytes().startswith(b"\x89PNG") for p in written)
