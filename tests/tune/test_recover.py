"""Recovery fine-tune on the tiny carved Llama: it learns, saves natively, trains the router, resumes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from moecarve import MoecarveWarning
from moecarve.eval.common import source_commit
from moecarve.tune import trainer as trainer_module
from moecarve.tune.data import training_blocks
from moecarve.tune.recover import RecoverConfig, recover

FAST = {"batch_size": 2, "length": 64, "save_every": 3, "lr": 3e-3}


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def nll(model, ids) -> float:
    return model(ids, labels=ids).loss.item()


@pytest.fixture
def fixed_batch(tiny_carved, calib_file):
    tokenizer = AutoTokenizer.from_pretrained(tiny_carved)
    return training_blocks(tokenizer, calib_file, 64, 8).blocks


def test_recovery_learns_saves_natively_and_trains_the_router(tiny_carved, calib_file, fixed_batch, tmp_path):
    config = RecoverConfig(steps=8, **FAST)
    result = recover(tiny_carved, config, calib_file, tmp_path / "out")
    before, after = load(tiny_carved), load(result.out)
    assert nll(after, fixed_batch) < nll(before, fixed_batch) - 0.05

    # Reloaded by stock transformers, it computes what the in-memory merged model computed.
    assert type(after).__name__ == "Glm4MoeForCausalLM"
    torch.testing.assert_close(after(fixed_batch).logits, result.model.eval()(fixed_batch).logits)

    old, new = tensors(before), tensors(after)
    for layer in range(before.config.num_hidden_layers):
        gate = f"model.layers.{layer}.mlp.gate"
        assert not torch.equal(old[f"{gate}.weight"], new[f"{gate}.weight"]), "router weights did not train"
        bias = new[f"{gate}.e_score_correction_bias"]
        assert bias.dtype == torch.float32
        assert not torch.equal(old[f"{gate}.e_score_correction_bias"], bias), "balancing bias not saved"
        torch.testing.assert_close(
            bias, result.model.model.layers[layer].mlp.gate.e_score_correction_bias, rtol=0, atol=0
        )
    record = json.loads((result.out / "carve.json").read_text())
    assert record["resolved"]["name"] == "S1A2E8"  # the carve's record is kept
    (tune,) = record["tune"]
    assert tune["stage"] == "recover" and tune["data"]["tokens"] == 8 * 2 * 64
    assert tune["data"]["sha256"] == hashlib.sha256(calib_file.read_bytes()).hexdigest()
    assert tune["versions"]["moecarve_commit"] == source_commit() and "peft" in tune["versions"]
    assert [h["step"] for h in tune["train_loss"]] == list(range(1, 9))
    assert tune["final_train_loss"] == tune["train_loss"][-1]["loss"]  # the last step's, not the mean
    assert tune["resumed_from_step"] is None and tune["teacher"] is None
    assert not (tmp_path / "out.checkpoints").exists()  # removed once the model is written
    written = json.loads((result.out / "config.json").read_text())  # where vLLM's glm4_moe reads it
    assert written["partial_rotary_factor"] == written["rope_parameters"]["partial_rotary_factor"] == 1.0
    # the carve's config otherwise: transformers' Trainer sets use_cache false on the model it trains
    carved = json.loads((tiny_carved / "config.json").read_text())
    assert carved["use_cache"] is True and {k: v for k, v in written.items() if k != "dtype"} == {
        k: v for k, v in carved.items() if k != "dtype"
    }


@pytest.mark.parametrize("train", ["router", "lora"])
def test_only_what_is_trained_changes(train, tiny_carved, calib_file, tmp_path):
    out = recover(tiny_carved, RecoverConfig(steps=3, train=train, **FAST), calib_file, tmp_path / "o").out
    old, new = tensors(load(tiny_carved)), tensors(load(out))
    changed = {name for name in old if not torch.equal(old[name], new[name])}
    routers = {name for name in old if name.endswith("mlp.gate.weight")}
    biases = {name for name in old if name.endswith("e_score_correction_bias")}
    assert biases <= changed  # the balancing rule runs in every mode
    if train == "router":
        assert changed == routers | biases
    else:
        assert not routers & changed
        for part in (
            "mlp.experts.",
            "shared_experts.gate_proj",
            "shared_experts.down_proj",
            "self_attn.o_proj",
        ):
            assert any(part in name for name in changed), part


def test_interrupted_run_resumes_to_the_same_model(tiny_carved, calib_file, tmp_path, monkeypatch):
    config = RecoverConfig(steps=6, **FAST)
    straight = recover(tiny_carved, config, calib_file, tmp_path / "straight").out

    class Interrupt(Exception):
        pass

    original = trainer_module.BalanceCallback.on_step_end

    def interrupt_at_step_5(self, args, state, control, **kwargs):
        original(self, args, state, control, **kwargs)
        if state.global_step == 5:
            raise Interrupt

    monkeypatch.setattr(trainer_module.BalanceCallback, "on_step_end", interrupt_at_step_5)
    with pytest.raises(Interrupt):
        recover(tiny_carved, config, calib_file, tmp_path / "resumed")
    assert not (tmp_path / "resumed").exists()  # no half-written final model
    assert (tmp_path / "resumed.checkpoints" / "checkpoint-3" / "trainer_state.json").is_file()
    with pytest.raises(ValueError, match="--resume"):  # never silently restarts over checkpoints
        recover(tiny_carved, config, calib_file, tmp_path / "resumed")
    monkeypatch.undo()

    steps_run = []

    def count(self, args, state, control, **kwargs):
        steps_run.append(state.global_step)
        original(self, args, state, control, **kwargs)

    monkeypatch.setattr(trainer_module.BalanceCallback, "on_step_end", count)
    resumed = recover(tiny_carved, config, calib_file, tmp_path / "resumed", resume=True).out
    assert steps_run == [4, 5, 6]  # continued from checkpoint-3, did not start over
    first, second = (
        json.loads((path / "carve.json").read_text())["tune"][-1] for path in (straight, resumed)
    )
    assert second["resumed_from_step"] == 3
    assert second["final_train_loss"] == pytest.approx(first["final_train_loss"])  # the whole run's last
    a, b = tensors(load(straight)), tensors(load(resumed))
    for name in a:
        if name.endswith("e_score_correction_bias"):  # one balancing step is 1e-5: compare exactly
            assert torch.equal(a[name], b[name]), name
        torch.testing.assert_close(a[name], b[name], msg=name)


def test_a_checkpoint_cut_short_is_passed_over_and_a_failed_write_leaves_no_lone_adapter(
    tiny_carved, calib_file, tmp_path, monkeypatch
):
    """A kill while the Trainer writes trainer_state.json (in place) left a checkpoint that stopped
    --resume with a bare JSON error; a kill while the merged model was written left the adapter,
    whose directory then refused the --resume."""
    from moecarve.tune import recover as recover_module

    config = RecoverConfig(steps=8, **FAST)

    def fail_at_step_7(self, args, state, control, **kwargs):
        if state.global_step == 7:
            raise RuntimeError("killed")

    monkeypatch.setattr(trainer_module.BalanceCallback, "on_step_end", fail_at_step_7)
    with pytest.raises(RuntimeError):
        recover(tiny_carved, config, calib_file, tmp_path / "o")
    monkeypatch.undo()
    state = tmp_path / "o.checkpoints" / "checkpoint-6" / "trainer_state.json"
    state.write_text(state.read_text()[:40])  # cut short mid-write
    with pytest.raises(ValueError, match="pass --resume"):  # a cut-short checkpoint is still refused
        recover(tiny_carved, config, calib_file, tmp_path / "o")
    monkeypatch.setattr(recover_module, "write_rotary_at_top_level", lambda path: 1 / 0)
    with pytest.warns(MoecarveWarning, match="checkpoint-6 was cut short"), pytest.raises(ZeroDivisionError):
        recover(tiny_carved, config, calib_file, tmp_path / "o", resume=True, adapter_out=tmp_path / "a")
    assert not (tmp_path / "a").exists() and not (tmp_path / "o").exists()
    monkeypatch.undo()
    recover(tiny_carved, config, calib_file, tmp_path / "o", resume=True, adapter_out=tmp_path / "a")
    assert (tmp_path / "a" / "adapter_config.json").is_file() and (tmp_path / "o" / "carve.json").is_file()


def fail_at_step_4(self, args, state, control, **kwargs):
    if state.global_step == 4:
        raise RuntimeError("killed")


def interrupted(model, config, data, out, monkeypatch) -> None:
    """A run of `config` killed at step 4, after its checkpoint at step 3."""
    monkeypatch.setattr(trainer_module.BalanceCallback, "on_step_end", fail_at_step_4)
    with pytest.raises(RuntimeError):
        recover(model, config, data, out)
    monkeypatch.undo()


def test_resume_refuses_other_configuration_and_restarts_after_an_early_failure(
    tiny_carved, calib_file, tmp_path, monkeypatch
):
    config = RecoverConfig(steps=6, **FAST)
    interrupted(tiny_carved, config, calib_file, tmp_path / "o", monkeypatch)
    other = RecoverConfig(steps=6, **{**FAST, "lr": 1e-4})
    with pytest.raises(ValueError, match=r"another model, data or configuration \(differs: --lr\)"):
        recover(tiny_carved, other, calib_file, tmp_path / "o", resume=True)

    # The same data file named another way resumes; an edited one is other data.
    monkeypatch.chdir(calib_file.parent)
    assert recover(tiny_carved, config, f"./{calib_file.name}", tmp_path / "o", resume=True).out.is_dir()
    edited = tmp_path / "edited.txt"
    edited.write_text(calib_file.read_text())
    interrupted(tiny_carved, config, edited, tmp_path / "e", monkeypatch)
    edited.write_text(calib_file.read_text().replace(" the ", " a "))
    with pytest.raises(ValueError, match="another model, data or configuration"):
        recover(tiny_carved, config, edited, tmp_path / "e", resume=True)

    # A run that died before its first checkpoint leaves nothing to resume and does not block a rerun.
    early = tmp_path / "early.checkpoints"
    early.mkdir()
    (early / "recover.json").write_text("{}")
    with pytest.raises(ValueError, match="no complete checkpoint"):
        recover(tiny_carved, config, calib_file, tmp_path / "early", resume=True)
    assert recover(tiny_carved, RecoverConfig(steps=1, **FAST), calib_file, tmp_path / "early").out.is_dir()


def test_a_second_run_to_the_same_output_is_refused_while_the_first_runs(tiny_carved, calib_file, tmp_path):
    """Two runs to one OUT shared OUT.checkpoints: one deleted the other's checkpoints under it and the
    other failed after training, naming a missing checkpoint."""
    import fcntl

    from moecarve.tune.recover import LOCK

    checkpoints = tmp_path / "o.checkpoints"
    checkpoints.mkdir()
    with (checkpoints / LOCK).open("a") as first:  # a first run's lock, as it holds it while it trains
        fcntl.flock(first, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another tune recover is running with the checkpoints"):
            recover(tiny_carved, RecoverConfig(steps=1, **FAST), calib_file, tmp_path / "o")
    assert not (tmp_path / "o").exists() and [p.name for p in checkpoints.iterdir()] == [LOCK]
    # a checkpoint directory holding only a lock is no foreign directory: taken, and the run goes on
    assert recover(tiny_carved, RecoverConfig(steps=1, **FAST), calib_file, tmp_path / "o").out.is_dir()
    assert not checkpoints.exists()
    # --resume with nothing to resume: refused, and what was made for the lock is gone again
    nested = tmp_path / "new" / "deeper"
    with pytest.raises(ValueError, match="no complete checkpoint"):
        recover(tiny_carved, RecoverConfig(steps=1, **FAST), calib_file, nested / "o", resume=True)
    assert not (tmp_path / "new").exists()


def test_resume_takes_a_new_save_interval_and_a_record_made_with_the_old_one(
    tiny_carved, calib_file, tmp_path, monkeypatch
):
    from transformers import TrainerCallback

    interrupted(tiny_carved, RecoverConfig(steps=6, **FAST), calib_file, tmp_path / "o", monkeypatch)
    identity = tmp_path / "o.checkpoints" / "recover.json"  # as runs recorded it before: save_every in
    saved = json.loads(identity.read_text())
    assert "save_every" not in saved["config"]
    identity.write_text(json.dumps({**saved, "config": {**saved["config"], "save_every": 3}}))
    saves = []

    class Saves(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            saves.append(state.global_step)

    every_2 = RecoverConfig(steps=6, **{**FAST, "save_every": 2})
    assert recover(
        tiny_carved, every_2, calib_file, tmp_path / "o", resume=True, callbacks=(Saves(),)
    ).out.is_dir()
    assert saves == [4, 6]  # the checkpoint's interval was 3: it would have saved at 6 alone


def test_resume_refuses_checkpoints_of_a_model_carved_again_at_the_same_path(
    tiny_carved, calib_file, tmp_path, monkeypatch
):
    import os
    import shutil

    from moecarve.carve.source import model_identity

    model = shutil.copytree(tiny_carved, tmp_path / "model")
    config = RecoverConfig(steps=6, **FAST)
    interrupted(model, config, calib_file, tmp_path / "o", monkeypatch)
    weights = next(model.glob("*.safetensors"))
    os.utime(weights, ns=(1, 1))  # touched, the same bytes: the same model, resumable
    saved = json.loads((tmp_path / "o.checkpoints" / "recover.json").read_text())
    assert saved["model"] == model_identity(model)
    data = bytearray(weights.read_bytes())  # the same path, new weights (as a carve --overwrite writes)
    data[-4:] = bytes(4)
    weights.write_bytes(data)
    with pytest.raises(ValueError, match=r"another model, data or configuration \(differs: model\)"):
        recover(model, config, calib_file, tmp_path / "o", resume=True)
    assert not (tmp_path / "o").exists()


def test_a_diverged_run_writes_nothing(tiny_carved, calib_file, tmp_path):
    from moecarve.tune.trainer import TrainingDiverged

    config = RecoverConfig(steps=3, train="full", **{**FAST, "lr": 1e6})
    with pytest.raises(TrainingDiverged, match="training diverged"):
        recover(tiny_carved, config, calib_file, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert not (tmp_path / "o.checkpoints").exists()  # nan checkpoints: a rerun starts clean
    assert recover(tiny_carved, RecoverConfig(steps=1, **FAST), calib_file, tmp_path / "o").out.is_dir()
    # the balancing bias, a buffer the bias rule moves: an overflowing rate leaves it inf
    with pytest.raises(TrainingDiverged, match="e_score_correction_bias"):
        recover(tiny_carved, RecoverConfig(steps=2, bias_rate=3e38, **FAST), calib_file, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    # a step too large for float32, which torch refuses with an overflow error mid-run
    with pytest.raises(TrainingDiverged, match="a step overflowed float32"):
        recover(tiny_carved, RecoverConfig(steps=2, lora_alpha=1e300, **FAST), calib_file, tmp_path / "c")
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.checkpoints").exists()


class RisingLoss(TrainerCallback):
    """Logs a loss that climbs step by step, as a run flattening its predictions to uniform does."""

    def on_log(self, args, state, control, **kwargs):
        state.log_history[-1]["loss"] = 5.0 + state.global_step


def test_a_run_whose_loss_rose_is_written_with_a_warning(tiny_carved, calib_file, tmp_path, recwarn):
    from moecarve.tune.trainer import warn_if_loss_rose

    result = recover(
        tiny_carved, RecoverConfig(steps=8, **FAST), calib_file, tmp_path / "o", callbacks=(RisingLoss(),)
    )
    rose = [w for w in recwarn if issubclass(w.category, MoecarveWarning)]
    assert len(rose) == 1 and "the training loss rose from 6.5000 to 13.0000" in str(rose[0].message)
    assert result.out.is_dir()  # finite weights: written, and the user told
    with pytest.warns(
        MoecarveWarning, match="--warmup 4 is not below --steps 2: the learning rate never"
    ) as said:
        recover(tiny_carved, RecoverConfig(steps=2, warmup=4, **FAST), calib_file, tmp_path / "w")
    assert said[0].filename == __file__  # pointed at the caller's line
    noise = [3.86, 3.5, 3.44, 3.6, 3.3, 3.5, 3.9, 3.97]  # a short run's batches, as a user met them
    for quiet in ([6.0 - i / 4 for i in range(8)], [6.0, 7.0, 8.0, 9.0, 10.0], noise):  # falling, too few
        warn_if_loss_rose(quiet)
    assert len([w for w in recwarn if issubclass(w.category, MoecarveWarning)]) == 1


def test_one_router_per_layer_under_peft_and_adapter_saved_alone(
    tiny_carved, calib_file, tmp_path, monkeypatch
):
    from peft import PeftModel

    from moecarve.tune.adapters import trainable_model
    from moecarve.tune.balance import LoadTracker

    model = trainable_model(load(tiny_carved), RecoverConfig(steps=1)).train()
    tracker = LoadTracker(model, rate=1e-5)
    model(torch.arange(30)[None])  # 30 tokens, each to top_k experts, counted once per layer
    top_k = model.config.num_experts_per_tok
    assert len(tracker.counts) == model.config.num_hidden_layers
    assert all(count.sum().item() == 30 * top_k for count in tracker.counts.values())
    model.eval()(torch.arange(30)[None])  # evaluations are not counted
    assert all(count.sum().item() == 30 * top_k for count in tracker.counts.values())
    tracker.counts.clear()
    base = model.train().get_base_model()
    enable = (
        getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    )  # 5.25 on
    enable({"use_reentrant": False})
    model(torch.arange(30)[None]).logits.sum().backward()  # the backward's recompute is not counted
    assert all(count.sum().item() == 30 * top_k for count in tracker.counts.values())

    config = RecoverConfig(steps=2, **FAST)
    monkeypatch.chdir(tiny_carved.parent)  # the model named relative to the working directory
    result = recover(tiny_carved.name, config, calib_file, tmp_path / "o", adapter_out=tmp_path / "adapter")
    # the adapter names its base absolutely: AutoPeftModel finds it from any directory, not on the hub
    base = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(tiny_carved.resolve())
    adapted = PeftModel.from_pretrained(load(tiny_carved), tmp_path / "adapter").eval()
    ids = torch.arange(40)[None] % 300
    torch.testing.assert_close(adapted(ids).logits, load(result.out)(ids).logits, rtol=1e-4, atol=1e-4)


def test_each_model_copy_takes_its_own_blocks(tiny_carved, calib_file):
    """DataParallel (several GPUs, no --device) takes batch x n_gpu blocks per micro-step: counting
    processes alone built 1/n_gpu of the blocks the steps need, and the Trainer cycled them."""
    from moecarve.tune.recover import replicas, training_text

    assert replicas(1, 0) == 1 and replicas(1, 1) == 1  # CPU; one GPU
    assert replicas(1, 4) == 4 and replicas(2, 1) == 2  # DataParallel over 4; accelerate launch of 2
    tokenizer = AutoTokenizer.from_pretrained(tiny_carved)
    config = RecoverConfig(steps=3, batch_size=2, length=32)
    one, four = (training_text(tokenizer, calib_file, config, replicas(1, n)) for n in (1, 4))
    assert one.blocks.shape[0] == 6 and four.blocks.shape[0] == 24


def test_recover_counts_the_trainers_gpus(tiny_carved, calib_file, tmp_path, monkeypatch):
    """recover asks for blocks per model copy with the Trainer's own n_gpu (0 on this CPU)."""
    from moecarve.tune import recover as recover_module

    class Asked(Exception):
        pass

    def record(processes, n_gpu):
        raise Asked((processes, n_gpu))

    monkeypatch.setattr(recover_module, "replicas", record)
    with pytest.raises(Asked) as asked:
        recover(tiny_carved, RecoverConfig(steps=1, **FAST), calib_file, tmp_path / "o")
    assert asked.value.args[0] == (1, 0)


def test_default_text_holds_out_the_protocol_windows(tiny_carved):
    from moecarve.carve.calib import read_text, tokenize_stream
    from moecarve.tune.data import PROTOCOL_TOKENS

    tokenizer = AutoTokenizer.from_pretrained(tiny_carved)
    stream = tokenize_stream(tokenizer, read_text(None)[0])
    for source in (None, "boolq-passages", "protocol"):  # the passages' two names, as everywhere
        assert read_text(source)[0] == read_text(None)[0]
        text = training_blocks(tokenizer, source, 4096, 10**6)
        assert text.held_out_tokens == PROTOCOL_TOKENS
        assert text.tokens <= stream.numel() - PROTOCOL_TOKENS
        assert torch.equal(text.blocks.flatten(), stream[: text.tokens])


def test_bad_input_fails_before_training(tiny_models, tiny_carved, calib_file, tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(trainer_module.RecoverTrainer, "train", no_training)
    config = RecoverConfig(steps=2, **FAST)
    with pytest.raises(ValueError, match="carve .* first"):
        recover(tiny_models["llama"], config, calib_file, tmp_path / "a")
    short = tmp_path / "short.txt"
    short.write_text("the router")
    with pytest.raises(ValueError, match="fewer than one block"):
        recover(tiny_carved, config, short, tmp_path / "b")
    not_empty = tmp_path / "c"
    not_empty.mkdir()
    (not_empty / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        recover(tiny_carved, config, calib_file, not_empty)
    assert (not_empty / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="matches no module"):
        recover(
            tiny_carved, RecoverConfig(steps=2, lora_targets=("qkv",), **FAST), calib_file, tmp_path / "d"
        )
    from moecarve.tune.adapters import _split_targets

    assert _split_targets(load(tiny_carved), ("lm_head",)) == (["lm_head"], [])  # a top-level module too
    with pytest.raises(ValueError, match="--lora-targets names no module"):
        recover(tiny_carved, RecoverConfig(steps=2, lora_targets=(), **FAST), calib_file, tmp_path / "d")
    with pytest.raises(ValueError, match="--teacher is the model --distill learns from"):
        recover(
            tiny_carved, RecoverConfig(steps=2, **FAST), calib_file, tmp_path / "d", teacher=tmp_path / "t"
        )
    with pytest.raises(ValidationError):
        RecoverConfig(steps=0)
    with pytest.raises(ValidationError, match="combines with nothing"):
        RecoverConfig(steps=1, train="full,router")
    with pytest.raises(ValidationError, match="unknown part 'lorax'"):  # by name: sorting moves them
        RecoverConfig(steps=1, train=["router", "lorax"])
    with pytest.raises(ValidationError, match="valid tuple"):
        RecoverConfig(steps=1, train=5)
    with pytest.raises(ValidationError, match="combines with nothing"):  # a set is checked as a list
        RecoverConfig(steps=1, train={"full", "router"}, lr=1e-4)
    with pytest.raises(ValidationError, match="give it a learning rate of its own"):  # 1e-3 is LoRA's
        RecoverConfig(steps=1, train="full")
    with pytest.raises(ValueError, match="--length 4096 exceeds the 256 positions of"):
        recover(tiny_carved, RecoverConfig(steps=2, **{**FAST, "length": 4096}), calib_file, tmp_path / "e")
    with pytest.raises(
        ValueError, match="--eval-ppl's protocol window length 2048 exceeds the 256 positions"
    ):
        recover(tiny_carved, RecoverConfig(steps=2, **FAST), calib_file, tmp_path / "e", evaluate=True)
    for rate in ("lr", "router_lr"):  # an infinite step trains NaN weights
        with pytest.raises(ValidationError, match="finite number"):
            RecoverConfig(steps=1, **{rate: float("inf")})
    locked = tmp_path / "c"  # as a directory this user cannot write (root could write any under chmod)
    access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: Path(p).resolve() != locked.resolve() and access(p, mode, **kw)
    )
    for out, adapter in ((locked / "f", None), (tmp_path / "f", locked / "adapter")):
        with pytest.raises(ValueError, match=f"cannot be written: {locked} is not writable by this user"):
            recover(tiny_carved, config, calib_file, out, adapter_out=adapter)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "short.txt"]  # nothing else written


def test_paths_that_overlap_are_refused_and_nothing_is_deleted(
    tiny_carved, calib_file, tmp_path, monkeypatch
):
    """The checkpoint directory is deleted when a run ends and the outputs are replaced: a path shared
    with the model, the data, another output, or someone else's directory is refused before training."""

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(trainer_module.RecoverTrainer, "train", no_training)
    config = RecoverConfig(steps=2, **FAST)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data = data_dir / "text.txt"
    data.write_text(calib_file.read_text())
    before = {p.name: p.read_bytes() for p in tiny_carved.iterdir() if p.is_file()}
    out = tmp_path / "out"
    cases = [
        ({"checkpoints": precious}, "holds no recover.json"),
        ({"checkpoints": tiny_carved}, "--checkpoints .* is model"),
        ({"checkpoints": data_dir}, "--checkpoints .* holds --data"),
        ({"checkpoints": out}, "--out .* is --checkpoints"),
        ({"checkpoints": out / "ckpt"}, "--out .* holds --checkpoints"),
        ({"adapter_out": out / "adapter"}, "--out .* holds --adapter-out"),
        ({"adapter_out": out}, "--out .* is --adapter-out"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            recover(tiny_carved, config, data, out, **kwargs)
    assert (precious / "notes.txt").read_text() == "mine" and data.exists()
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]  # no lock left in someone else's directory
    assert {p.name: p.read_bytes() for p in tiny_carved.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "precious"]


def test_cli_reports_a_dense_model_in_one_line(tiny_models, tmp_path):
    code = "from moecarve.cli import main; main()"
    for dense, message in [
        (str(tiny_models["llama"]), "not a carved MoE checkpoint"),
        ("bundled", "carve it first"),
    ]:
        args = ["tune", "recover", dense, "--steps", "1", "--out", str(tmp_path / "o")]
        result = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path
        )
        assert result.returncode == 2 and result.stdout == ""  # no announcement of a refused run
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("error: ") and message in line and "carve" in line


@torch.no_grad()
def kl_to(teacher, student, ids) -> float:
    target = teacher(ids).logits[:, :-1].log_softmax(-1).flatten(0, 1)
    return torch.nn.functional.kl_div(
        student(ids).logits[:, :-1].log_softmax(-1).flatten(0, 1),
        target,
        log_target=True,
        reduction="batchmean",
    ).item()


def test_the_default_teacher_is_the_source_where_it_was_carved_from_any_directory(
    tiny_models, calib_file, tmp_path, monkeypatch
):
    """A carve of a relative path distils from that source when tuned from another directory (it
    was looked up relative to the new one, as a hub id, or worse, another model lying there)."""
    from moecarve.carve.config import CarveConfig
    from moecarve.carve.pipeline import carve

    monkeypatch.chdir(tiny_models["llama"].parent)
    carve("llama", CarveConfig(experts=8, active=2, calib_tokens=512, calib_length=64), calib_file,
          tmp_path / "carved", progress=False)  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "llama").mkdir(parents=True)
    (elsewhere / "llama" / "config.json").write_text("{}")  # another "llama" where the tune runs
    monkeypatch.chdir(elsewhere)
    result = recover(
        tmp_path / "carved", RecoverConfig(steps=1, distill=1.0, **FAST), calib_file, tmp_path / "o"
    )
    assert result.record["teacher"] == str(tiny_models["llama"].resolve())


@pytest.mark.parametrize(("distill", "grad_accum"), [(1.0, 1), (0.25, 1), (1.0, 2)])
def test_distillation_loss_is_kl_to_the_dense_source(
    distill, grad_accum, tiny_models, tiny_carved, calib_file, fixed_batch, tmp_path
):
    # One step over all eight blocks: the logged loss is the loss of the untrained model on them.
    config = RecoverConfig(
        steps=1, distill=distill, batch_size=8 // grad_accum, grad_accum=grad_accum, length=64
    )
    result = recover(tiny_carved, config, calib_file, tmp_path / "out")  # teacher: carve.json's source
    dense, carved = load(tiny_models["llama"]), load(tiny_carved)
    expected = distill * kl_to(dense, carved, fixed_batch) + (1 - distill) * nll(carved, fixed_batch)
    assert result.record["train_loss"][0]["loss"] == pytest.approx(expected, abs=1e-4)
    assert json.loads((result.out / "carve.json").read_text())["tune"][0]["config"]["distill"] == distill

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 7}))
    with pytest.raises(ValueError, match="vocabulary"):
        recover(tiny_carved, config, calib_file, tmp_path / "o2", teacher=other)
    assert not (tmp_path / "o2").exists()


def test_the_carves_perplexity_stands_for_the_model_only_until_it_is_trained(tmp_path):
    """A recovered or ESFT-merged model copies the carve's record forward: its measured PPL is no
    longer this model's, so recover --eval-ppl scores the model before training instead."""
    from moecarve.tune.recover import carve_quality

    measured = {"ppl": 30.0, "tokens_scored": 32752}
    record = {"resolved": {"name": "S1A2E8"}, "quality": {"protocol_ppl": {"carved": measured}}}
    (tmp_path / "carve.json").write_text(json.dumps(record))
    assert carve_quality(tmp_path) == measured
    (tmp_path / "esft.json").write_text("{}")  # an ESFT merge made before merges joined the list
    assert carve_quality(tmp_path) is None
    (tmp_path / "esft.json").unlink()
    for stage in ("recover", "esft"):
        (tmp_path / "carve.json").write_text(json.dumps({**record, "tune": [{"stage": stage}]}))
        assert carve_quality(tmp_path) is None


def test_a_teacher_with_another_tokenizer_is_refused(tiny_models, tiny_carved, calib_file, tmp_path):
    """The same vocabulary size, another split of the text: the KL would compare unrelated ids."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_models["llama"], other)
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["model"]["merges"] = []  # the same 300 ids, the text split into bytes
    (other / "tokenizer.json").write_text(json.dumps(spec))
    config = RecoverConfig(steps=1, distill=1.0, **FAST)
    with pytest.raises(ValueError, match="splits the training text into other tokens"):
        recover(tiny_carved, config, calib_file, tmp_path / "o", teacher=other)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.checkpoints").exists()


def test_a_config_given_as_a_dict_or_of_the_wrong_type(tiny_carved, calib_file, tmp_path):
    result = recover(tiny_carved, {"steps": 1, **FAST}, calib_file, tmp_path / "o")
    assert result.record["config"]["steps"] == 1
    with pytest.raises(
        TypeError, match="config must be a RecoverConfig or a dict of its fields, got NoneType"
    ):
        recover(tiny_carved, None, calib_file, tmp_path / "p")
