"""Tuned tables: `moecarve kernels tune` writes one, `moe_ffn(path="auto")` follows it, bad ones are
refused by name. Timings under the interpreter mean nothing; what is checked is which path and
tiles run, that every candidate is checked against the reference, and the files."""

import dataclasses
import json
import sys

import pytest
import torch

from moecarve.kernels import moe_ffn, moe_ffn_reference, tuning
from moecarve.kernels.ops.configs import DecodeConfig, DenseConfig, GroupedConfig

E, I, SI, H, K = 5, 24, 24, 48, 2  # noqa: E741
SHAPE = tuning.MoeShape(E, I, SI, H, K, "float32")
TINY_DENSE = DenseConfig(block_m=16, block_n=16, block_k=16)
TINY_GROUPED = GroupedConfig(block_m=16, block_n=16, block_k=16)


@pytest.fixture
def tables(tmp_path, monkeypatch):
    """An empty table directory that is the only one `auto` reads."""
    monkeypatch.setenv("MOECARVE_KERNEL_CONFIGS", str(tmp_path / "tables"))
    tuning.clear_cache()
    yield tmp_path / "tables"
    tuning.clear_cache()


def table_json(batches: dict, shape=SHAPE) -> dict:
    return {"format": 1, "device": "cpu", "shape": dataclasses.asdict(shape), "batches": batches}


def write(tables, data) -> None:
    path = tables / "cpu" / SHAPE.file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else json.dumps(data))


def weights(T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    idx = torch.rand(T, E, generator=g).topk(K, dim=-1).indices
    w = torch.rand(T, K, generator=g)
    ws = [torch.randn(*s, generator=g) * 0.1 for s in ((E, 2 * I, H), (E, H, I), (SI, H), (SI, H), (H, SI))]
    return x, idx, w, *ws


@pytest.fixture
def spy(monkeypatch):
    """Records (path, tiles) of each kernel path moe_ffn runs."""
    from moecarve.kernels.ops import moe_ffn as ops

    calls = []
    for path in ("decode", "dense", "grouped"):
        real = getattr(ops, f"moe_ffn_{path}")

        def wrapped(*args, _real=real, _path=path):
            calls.append((_path, args[-1]))
            return _real(*args)

        monkeypatch.setattr(ops, f"moe_ffn_{path}", wrapped)
    return calls


def test_auto_follows_this_gpus_table(interp_device, tables, spy):
    write(tables, table_json({
        "1": {"path": "dense", "config": dataclasses.asdict(TINY_DENSE)},
        "8": {"path": "grouped", "config": dataclasses.asdict(TINY_GROUPED)},
    }))  # fmt: skip
    # the smallest tuned batch at or above T; above the largest, never timed: the built-in dispatch
    for T, want in ((1, ("dense", TINY_DENSE)), (3, ("grouped", TINY_GROUPED)), (8, ("grouped", TINY_GROUPED)),
                    (9, ("dense", None)), (70, ("dense", None))):  # fmt: skip
        args = weights(T)
        out = moe_ffn(*args)
        assert spy[-1] == want, T
        ref = moe_ffn_reference(*args)
        assert ((out - ref).norm() / ref.norm()).item() < 2e-5


def test_a_table_from_other_versions_is_followed_with_a_warning(interp_device, tables, spy):
    write(tables, {**table_json({"1": {"path": "dense", "config": {}}}), "versions": {"triton": "0.0.1"}})
    with pytest.warns(RuntimeWarning, match=r"tuned under triton 0\.0\.1 -> .*rerun `moecarve kernels tune`"):
        moe_ffn(*weights(1))
    assert spy[-1] == ("dense", DenseConfig())


def test_the_version_check_survives_triton_under_another_name(interp_device, tables, spy, monkeypatch):
    """Triton installed as a distribution the check does not know: no crash, no false warning."""
    import importlib.metadata
    import warnings

    def version(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    write(tables, {**table_json({"1": {"path": "dense", "config": {}}}), "versions": {"triton": "0.0.1"}})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        moe_ffn(*weights(1))
    assert spy[-1] == ("dense", DenseConfig())


def test_a_table_saved_here_is_not_stale_here(tables, monkeypatch):
    """What a table records is what the lookup compares, Triton under either distribution name."""
    import importlib.metadata
    import warnings

    from moecarve.kernels.tuner import save_table

    def version(name):
        if name == "pytorch-triton":
            return "9.9.9"
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    path = save_table({1: {"path": "dense", "config": {}}}, SHAPE, tables, torch.device("cpu"), "test")
    assert json.loads(path.read_text())["versions"]["triton"] == "9.9.9"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert tuning.load_table("cpu", SHAPE) == {1: ("dense", DenseConfig())}


@pytest.mark.parametrize("explicit", ["decode_config", "dense_config", "grouped_config"])
def test_explicit_tiles_skip_the_table(interp_device, tables, spy, explicit):
    """Tiles passed by the caller are the caller's choice: the table is not read, `auto` decides the path."""
    write(tables, table_json({"1": {"path": "grouped", "config": dataclasses.asdict(TINY_GROUPED)}}))
    tiles = {"decode_config": DecodeConfig(block_i=16, block_h=16, block_n=16, block_k=16),
             "dense_config": TINY_DENSE, "grouped_config": TINY_GROUPED}  # fmt: skip
    moe_ffn(*weights(1), **{explicit: tiles[explicit]})
    assert spy[-1][0] == "decode"


def test_without_a_table_auto_is_the_built_in_dispatch(interp_device, tables, spy, monkeypatch):
    write(tables, table_json({"1": {"path": "dense", "config": {}}}))
    moe_ffn(*weights(1)[:5])  # no shared expert: another shape, so no table
    assert spy[-1] == ("decode", None)
    moe_ffn(*weights(1))
    assert spy[-1] == ("dense", DenseConfig())
    monkeypatch.setenv("MOECARVE_KERNEL_CONFIGS", "")  # empty: tables off, for the same shape too
    moe_ffn(*weights(1))
    assert spy[-1] == ("decode", None)
    monkeypatch.setenv("MOECARVE_KERNEL_CONFIGS", str(tables))
    moe_ffn(*weights(1))
    assert spy[-1] == ("dense", DenseConfig())


@pytest.mark.parametrize(
    "data, message",
    [
        ("{not json", "cannot be read as JSON"),
        (b"\xff\xfe", "cannot be read as JSON"),
        ({"format": 2}, "format 1"),
        ({**table_json({"1": {"path": "dense"}}), "format": True}, "format 1"),
        (table_json({"\u00b2": {"path": "dense"}}), "positive integers"),
        (table_json({"1": {"path": "dense"}}, dataclasses.replace(SHAPE, top_k=3)), "its shape"),
        (table_json({}), "no batches"),
        (table_json({"0": {"path": "dense"}}), "positive integers"),
        (table_json({"one": {"path": "dense"}}), "positive integers"),
        (table_json({"1": {"path": "fast"}}), "path 'fast'"),
        (table_json({"1": {"path": "dense", "config": {"block_i": 16}}}), "keys from"),
        (table_json({"1": {"path": "dense", "config": {"block_m": 24}}}), "block_m=24"),
        (table_json({"1": {"path": "decode", "config": {"warps_up": 0}}}), "warps_up=0"),
        (table_json({"1": {"path": "decode", "config": {"use_dot": 1}}}), "use_dot=1"),
    ],
)
def test_a_bad_table_is_refused_by_name(interp_device, tables, data, message):
    write(tables, data)
    for _ in range(2):  # at every call, not only the first
        with pytest.raises(ValueError, match=message) as info:
            moe_ffn(*weights(1))
        assert SHAPE.file_name in str(info.value) and "moecarve kernels tune" in str(info.value)


def test_candidates_and_paths_per_batch():
    from moecarve.kernels.tuner import candidates, paths_for

    up = list(candidates("decode", 1, quick=False))
    tiles = {(i, h) for i in (16, 32, 64) for h in (128, 256)} | {(16, 512), (32, 512)}
    assert len(up) == 16 and {(c.block_i, c.block_h, c.warps_up) for c in up} == {
        (i, h, w) for i, h in tiles for w in (4, 8)
    }
    best_up = DecodeConfig(block_i=16, block_h=128, warps_up=8)
    down = list(candidates("decode", 1, quick=False, best_up=best_up))
    assert len(down) == 8 and all((c.block_i, c.block_h, c.warps_up) == (16, 128, 8) for c in down)
    assert len(set(down)) == 8
    assert len(set(candidates("dense", 16, quick=False))) == 24
    assert len(set(candidates("grouped", 64, quick=False))) == 8
    assert [len(list(candidates(p, 64, quick=True))) for p in ("decode", "dense", "grouped")] == [1, 1, 1]
    s2a2e16 = tuning.MoeShape(14, 688, 1376, 4096, 2, "bfloat16")
    assert (
        tuning.MoeShape.of_tensors(torch.empty(14, 1376, 4096), torch.empty(1376, 4096), 2).dtype == "float32"
    )
    assert [paths_for(s2a2e16, t, ("decode", "dense", "grouped")) for t in (1, 4, 8, 64, 65)] == [
        ["decode"], ["decode"], ["decode", "dense"], ["decode", "dense", "grouped"], ["dense", "grouped"]
    ]  # fmt: skip
    assert paths_for(s2a2e16, 64, ("dense",)) == ["dense"]


def test_tuner_takes_the_fastest_candidate(interp_device, monkeypatch):
    """Scripted timings: the decode down tiles are swept with the best up tiles kept, and the
    fastest path wins the batch; every candidate's row reaches `on_row`."""
    from moecarve.kernels import tuner

    def scripted_us(path, cfg):
        if path == "decode":
            return (100 + {16: 0, 32: 5, 64: 10}[cfg.block_i] + (cfg.block_h != 128) + 2 * (cfg.warps_up != 8)
                    + 3 * (cfg.block_n != 32) + 4 * (cfg.block_k != 256) + 0.5 * (cfg.warps_down != 8))  # fmt: skip
        return 90 + (cfg.block_m != 32) + (cfg.block_n != 128) + (cfg.block_k != 64) + (cfg.warps != 4)

    def kernel_us(self, path, cfg, log):
        return {"median_us": scripted_us(path, cfg), "graph": True}

    monkeypatch.setattr(tuner._Batch, "kernel_us", kernel_us)
    monkeypatch.setattr(tuner._Batch, "dense_ffn_us", lambda self: 200.0)
    rows = []
    table = tuner.tune(
        SHAPE, [1, 16], device="cpu", reps=3, flush_bytes=1, on_row=rows.append, log=lambda m: None
    )
    best_decode = DecodeConfig(block_i=16, block_h=128, warps_up=8, block_n=32, block_k=256, warps_down=8)
    assert table[1] == {"path": "decode", "config": dataclasses.asdict(best_decode), "median_us": 100,
                        "dense_ffn_us": 200.0}  # fmt: skip
    assert table[16]["path"] == "dense" and table[16]["median_us"] == 90
    assert table[16]["config"] == dataclasses.asdict(
        DenseConfig(block_m=32, block_n=128, block_k=64, warps=4)
    )
    assert len(rows) == 24 + 24 + 24 and all(r["dense_ffn_us"] == 200.0 for r in rows)


def test_tuner_never_picks_a_wrong_answer(interp_device, monkeypatch):
    """A path whose output is off is skipped however fast; if every one is, tuning fails loudly."""
    from moecarve.kernels import tuner

    real = tuner.moe_ffn

    def dense_is_wrong(*args, path, **kw):
        out = real(*args, path=path, **kw)
        return out + 1.0 if path == "dense" else out

    monkeypatch.setattr(tuner, "moe_ffn", dense_is_wrong)
    log = []
    table = tuner.tune(SHAPE, [16], device="cpu", quick=True, reps=3, flush_bytes=1, log=log.append)
    assert table[16]["path"] == "decode" and any(m.startswith("skip dense B=16") for m in log)
    with pytest.raises(RuntimeError, match="no kernel path ran correctly at batch 16"):
        tuner.tune(
            SHAPE, [16], device="cpu", paths=("dense",), quick=True, reps=3, flush_bytes=1, log=log.append
        )
    with pytest.raises(ValueError, match=r"none of the paths \['grouped'\] is timed at batch 16"):
        tuner.tune(SHAPE, [16], device="cpu", paths=("grouped",), log=log.append)


@pytest.mark.parametrize("failure", ["wrong", "raises"])
def test_tuner_checks_tiles_below_their_batch(interp_device, monkeypatch, failure):
    """An entry for 8 tokens also serves 5-7 (after one for 4): tiles right at 8 but wrong (or not
    running) below are passed over for the next fastest, however fast they are at 8."""
    from moecarve.kernels import tuner

    assert [tuner.served_counts(*r) for r in ((4, 8), (0, 1), (1, 2), (1, 64), (64, 256))] == [
        [5, 6], [], [], [2, 3, 5, 9, 17, 33], [65, 129, 160]
    ]  # fmt: skip
    real = tuner.moe_ffn

    def dense_wrong_below_8(x, *args, path, **kw):
        out = real(x, *args, path=path, **kw)
        if path == "dense" and x.shape[0] < 8:
            if failure == "raises":
                raise RuntimeError("out of resources")
            return out + 1.0
        return out

    monkeypatch.setattr(tuner, "moe_ffn", dense_wrong_below_8)
    monkeypatch.setattr(tuner._Batch, "dense_ffn_us", lambda self: 200.0)
    timings = {"dense": 50.0, "decode": 120.0}  # dense the fastest at 8 tokens
    real_kernel_us = tuner._Batch.kernel_us

    def kernel_us(self, path, cfg, log):
        t = real_kernel_us(self, path, cfg, log)  # the check at the timed count itself
        return None if t is None else {**t, "median_us": timings[path]}

    monkeypatch.setattr(tuner._Batch, "kernel_us", kernel_us)
    log = []
    table = tuner.tune(SHAPE, [4, 8], device="cpu", quick=True, reps=2, flush_bytes=1, log=log.append)
    assert table[8]["path"] == "decode" and table[8]["median_us"] == 120.0
    expected = (
        "at 5 tokens, which its entry also serves" if failure == "wrong" else "RuntimeError at 5 tokens"
    )
    assert any(m.startswith("skip dense") and expected in m for m in log), log
    with pytest.raises(RuntimeError, match=r"at batch 8 and the counts its entry serves \[1, 2, 3, 4, 5\]"):
        tuner.tune(
            SHAPE, [8], device="cpu", paths=("dense",), quick=True, reps=2, flush_bytes=1, log=log.append
        )


def test_saved_tables_are_readable_by_others(tmp_path):
    import os

    from moecarve.kernels.tuner import save_table

    path = save_table({1: {"path": "dense", "config": {}}}, SHAPE, tmp_path, torch.device("cpu"), "test")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == [SHAPE.file_name]


# ----------------------------------------------------------------------------- the command


@pytest.fixture
def tiny_model(tmp_path):
    from transformers import Glm4MoeConfig

    Glm4MoeConfig(
        vocab_size=96, hidden_size=H, intermediate_size=64, moe_intermediate_size=I, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, n_routed_experts=E, n_shared_experts=1,
        num_experts_per_tok=K, n_group=1, topk_group=1, first_k_dense_replace=0, num_mtp_layers=0,
        partial_rotary_factor=1.0,
    ).save_pretrained(tmp_path / "tiny")  # fmt: skip
    return tmp_path / "tiny"


def run_cli(monkeypatch, capsys, *args):
    from moecarve import cli
    from moecarve.kernels.cli import group

    monkeypatch.setattr(sys, "argv", ["moecarve kernels", *map(str, args)])
    try:
        cli._run(group)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr()


def test_tune_command_writes_the_table_auto_follows(
    interp_device, tiny_model, tables, spy, monkeypatch, capsys
):
    code, out = run_cli(monkeypatch, capsys, "tune", tiny_model, "--device", "cpu", "--quick", "--batches",
                        "16,1,4", "--dtype", "float32", "--reps", "3")  # fmt: skip
    assert code == 0, out.err
    written = tables / "cpu" / SHAPE.file_name  # the first table directory, by default
    assert f"wrote {written}" in out.out and [p.name for p in written.parent.iterdir()] == [SHAPE.file_name]
    data = json.loads(written.read_text())
    assert list(data["batches"]) == ["1", "4", "16"] and data["made_by"].endswith(
        "--dtype float32 --reps 3 --quick"
    )
    assert data["batches"]["1"]["path"] == "decode"  # the only candidate at one token
    for entry in data["batches"].values():
        assert entry["median_us"] > 0 and entry["dense_ffn_us"] > 0
    moe_ffn(*weights(16))
    chosen = data["batches"]["16"]
    assert spy[-1] == (chosen["path"], tuning.CONFIG_CLASSES[chosen["path"]](**chosen["config"]))


def test_tune_command_tunes_the_experts_interface_shape_too(interp_device, tiny_model, tables, spy, monkeypatch,
                                                            capsys):  # fmt: skip
    code, out = run_cli(monkeypatch, capsys, "tune", tiny_model, "--device", "cpu", "--quick", "--batches", "1",
                        "--dtype", "float32", "--reps", "3", "--experts-interface")  # fmt: skip
    assert code == 0, out.err
    routed_only = dataclasses.replace(SHAPE, shared_intermediate=0)
    assert sorted(p.name for p in (tables / "cpu").iterdir()) == sorted(
        [SHAPE.file_name, routed_only.file_name]
    )
    data = json.loads((tables / "cpu" / routed_only.file_name).read_text())
    assert data["shape"] == dataclasses.asdict(routed_only) and data["made_by"].endswith(
        "--experts-interface"
    )
    x, idx, w, w13, w2, *_ = weights(1)
    moe_ffn(x, idx, w, w13, w2)  # the experts interface's call: no shared expert
    chosen = data["batches"]["1"]
    assert spy[-1] == (chosen["path"], tuning.CONFIG_CLASSES[chosen["path"]](**chosen["config"]))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batches", "1,x"], "integers from 1 to 65536"),
        (["--batches", "0,4"], "integers from 1 to 65536"),
        (["--batches", "1,70000"], "integers from 1 to 65536"),
        (["--device", "cuda"], "this machine has no CUDA GPU"),
        (["--device", "gpu"], "--device 'gpu': expected cpu, cuda or cuda:N"),
        (["--device", "cpu", "--out", "{tmp}/file/tables"], "is a file, not a directory"),
        (["--device", "cpu", "--out", "{tmp}/tiny/tables"], "is in the model directory"),
        (["--device", "cpu", "--out", "{tmp}/other"], "is in the model directory"),  # another model's
    ],
)
def test_tune_command_refuses_before_any_work(tiny_model, tmp_path, monkeypatch, capsys, args, message):
    if torch.cuda.is_available() and args[1] == "cuda":
        pytest.skip("a GPU is present")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    (tmp_path / "file").write_text("")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    (tmp_path / "other" / "model.safetensors").write_text("")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, out = run_cli(monkeypatch, capsys, "tune", tiny_model, "--out", tmp_path / "out", *args)
    assert code == 2 and message in out.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "other", "tiny"]  # nothing made
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["config.json", "model.safetensors"]


def test_cpu_is_refused_without_the_interpreter(monkeypatch):
    from moecarve.kernels.tuner import check_device

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"cannot tune on cpu: .*TRITON_INTERPRET=1"):
        check_device("cpu", "float32")
    for device in ("mps", "xpu", "meta"):  # no probe tensor is made on them: the same one line
        with pytest.raises(
            ValueError, match=f"--device {device}: kernels tune runs on cpu or cuda \\(a CUDA GPU"
        ):
            check_device(device, "float32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: this machine has no CUDA GPU"):
        check_device("cuda", "float32")


def test_tune_command_refuses_models_it_cannot_tune(tmp_path, monkeypatch, capsys):
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    ).save_pretrained(tmp_path / "dense")
    code, out = run_cli(monkeypatch, capsys, "tune", tmp_path / "dense", "--out", tmp_path / "out")
    assert code == 2 and "no MoE block the kernels run" in out.err
    (tmp_path / "empty").mkdir()
    for missing in (tmp_path / "empty", "./no/such-model", "/no-such-dir/model"):
        code, out = run_cli(monkeypatch, capsys, "tune", missing, "--out", tmp_path / "out")
        assert code == 2 and "config.json missing" in out.err, missing
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub ID's lookup fails as it does without a network
    monkeypatch.chdir(tmp_path)
    code, out = run_cli(monkeypatch, capsys, "tune", "bundled", "--out", tmp_path / "out")
    assert code == 2 and "`bundled` is the dense SmolLM2-135M; carve it first" in out.err
    code, out = run_cli(monkeypatch, capsys, "tune", "no-such-model", "--out", tmp_path / "out")
    assert code == 2 and "model not found: no-such-model is no local directory" in out.err
    from transformers import Glm4MoeConfig

    Glm4MoeConfig(hidden_size=32, moe_intermediate_size=8, n_routed_experts=4, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=4, hidden_act="gelu").save_pretrained(tmp_path / "gelu")  # fmt: skip
    code, out = run_cli(monkeypatch, capsys, "tune", tmp_path / "gelu", "--out", tmp_path / "out")
    assert code == 2 and "no MoE block the kernels run" in out.err  # enable leaves GELU blocks as they are
    assert not (tmp_path / "out").exists()
