"""Where and how recovery and ESFT train: `--device` reaches transformers' Trainer, one device alone,
and a device this machine lacks is refused before any model loads or output is written;
`--precision bf16` and `--gradient-checkpointing`."""

from __future__ import annotations

import contextlib
import json
import sys
import warnings

import pytest
import torch
from accelerate.state import AcceleratorState
from transformers import Trainer

from moecarve.devices import DeviceError
from moecarve.esft import train as esft_train
from moecarve.tune import trainer as trainer_module
from moecarve.tune.recover import RecoverConfig, recover

RECOVER = RecoverConfig(steps=1, batch_size=2, length=64, lr=1e-3)
ESFT = esft_train.EsftConfig(steps=1, batch_size=4, max_length=64)


@pytest.fixture
def experts_file(tiny_carved, tmp_path):
    from moecarve.esft.shape import model_shape

    path = tmp_path / "experts.json"
    path.write_text(json.dumps({**model_shape(tiny_carved).record(), "experts": {"0": [1], "1": [2]}}))
    return path


def run_both(tiny_carved, calib_file, task_file, experts_file, out, device):
    """The recovery and the ESFT training of the tiny carve on `device`; their recorded devices."""
    recovered = recover(tiny_carved, RECOVER, calib_file, out / "recovered", device=device)
    trained = esft_train.train(tiny_carved, experts_file, task_file, out / "adapter", ESFT, device=device)
    return recovered.record["device"], trained["training"]["device"]


def test_cpu_is_where_training_runs_when_asked(tiny_carved, calib_file, task_file, experts_file, tmp_path):
    """On a CUDA machine too: the Trainer would otherwise take the GPU."""
    assert run_both(tiny_carved, calib_file, task_file, experts_file, tmp_path, "cpu") == ("cpu", "cpu")
    args = trainer_module.training_arguments(RECOVER, tmp_path / "c", "cpu")
    assert args.device == torch.device("cpu") and args.n_gpu == 0


def test_on_a_machine_of_two_gpus_the_trainer_gets_one(tmp_path, monkeypatch):
    """CUDA mocked as two GPUs: transformers' own choice is DataParallel over both from cuda:0;
    `cuda` keeps cuda:0 alone, `cuda:1` moves the Trainer (and accelerate's current GPU) to GPU 1."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(str(device)))
    seen = {}
    try:
        for device in (None, "cuda", "cuda:1"):
            calls.clear()
            args = trainer_module.training_arguments(RECOVER, tmp_path / "c", device)
            seen[device] = (str(args.device), args.n_gpu, calls[-1], trainer_module.trained_on(args))
    finally:  # accelerate's process-wide state, made while CUDA was mocked
        AcceleratorState._reset_state(reset_partial_state=True)
    assert seen == {
        None: ("cuda:0", 2, "cuda:0", "2 GPUs (DataParallel)"),
        "cuda": ("cuda:0", 1, "cuda:0", "cuda:0"),
        "cuda:1": ("cuda:1", 1, "cuda:1", "cuda:1"),
    }


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("meta", "runs on cpu or cuda"),
        ("cuda", "CUDA is not available"),
        ("tpu", "expected cpu, cuda or cuda:N"),
    ],
)
def test_a_device_it_cannot_use_is_refused_before_any_work(
    device, message, tiny_carved, calib_file, task_file, experts_file, tmp_path, monkeypatch
):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(Trainer, "train", no_training)
    with pytest.raises(DeviceError, match=message):
        recover(tiny_carved, RECOVER, calib_file, tmp_path / "recovered", device=device)
    with pytest.raises(DeviceError, match=message):
        esft_train.train(tiny_carved, experts_file, task_file, tmp_path / "adapter", ESFT, device=device)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experts.json"]  # nothing written


def test_a_device_under_accelerate_launch_is_refused(tiny_carved, calib_file, tmp_path, monkeypatch):
    """There the launcher gives each process its GPU; a --device would put them all on one."""
    import accelerate

    class Launched:  # torchrun with one process is distributed too
        distributed_type = accelerate.utils.DistributedType.MULTI_GPU

    monkeypatch.setattr(accelerate, "PartialState", Launched)
    with pytest.raises(DeviceError, match="under accelerate launch each process trains on its own GPU"):
        recover(tiny_carved, RECOVER, calib_file, tmp_path / "recovered", device="cpu")
    assert not (tmp_path / "recovered").exists()


def test_cli_takes_the_device(
    tiny_carved, calib_file, task_file, experts_file, tmp_path, monkeypatch, capsys
):
    from moecarve import cli

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["moecarve", *map(str, args)])
        try:
            cli._run(cli.cli)
        except SystemExit as exit_info:
            return exit_info.code, capsys.readouterr()
        return 0, capsys.readouterr()

    code, out = run("tune", "recover", tiny_carved, "--data", calib_file, "--steps", 1, "--length", 64,
                    "--out", tmp_path / "r", "--device", "meta")  # fmt: skip
    assert (
        code == 2 and out.out == "" and out.err == "error: --device meta: tune recover runs on cpu or cuda\n"
    )
    code, out = run("esft", "train", tiny_carved, "--experts", experts_file, "--data", task_file, "--steps", 1,
                    "--max-length", 64, "--out", tmp_path / "a", "--device", "cpu")  # fmt: skip
    assert code == 0, out.err
    assert json.loads((tmp_path / "a" / esft_train.CONFIG_FILE).read_text())["training"]["device"] == "cpu"


@pytest.mark.gpu
def test_cuda_trains_on_one_gpu(tiny_carved, calib_file, task_file, experts_file, tmp_path):
    """`cuda` and `cuda:0` train on that GPU alone (no DataParallel over the others)."""
    for device in ("cuda", "cuda:0"):
        out = tmp_path / device.replace(":", "-")
        assert run_both(tiny_carved, calib_file, task_file, experts_file, out, device) == ("cuda:0", "cuda:0")
        args = trainer_module.training_arguments(RECOVER, out / "c", device)
        assert args.device == torch.device("cuda:0") and args.n_gpu == 1


@pytest.fixture
def training_steps(monkeypatch):
    """What each training step of recover's and ESFT's Trainer ran with: gradient checkpointing, and
    the class of every router (`...OutsideAutocast` while bf16 keeps it out of autocast)."""
    from moecarve import moe

    seen = []
    step = Trainer.training_step

    def recording(self, model, *args, **kwargs):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        gates = {type(layer.block.gate).__name__ for layer in moe.moe_layers(base)}
        checkpointing = getattr(type(base), "is_activation_checkpointing", None)  # transformers 5.25 on
        seen.append(((checkpointing or type(base).is_gradient_checkpointing).fget(base), gates))
        return step(self, model, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", recording)
    return seen


def test_gradient_checkpointing_trains_the_same_weights(
    tiny_carved, calib_file, task_file, experts_file, tmp_path, training_steps
):
    """It recomputes the forward in the backward pass: the same values, so the same training."""
    from safetensors.torch import load_file

    runs = {}
    for on in (False, True):
        update = {"gradient_checkpointing": on}
        out = tmp_path / str(on)
        with warnings.catch_warnings():  # transformers 5.25's, for a property peft asks for
            warnings.filterwarnings("error", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            recovered = recover(tiny_carved, RECOVER.model_copy(update=update), calib_file, out / "r")
            esft_train.train(tiny_carved, experts_file, task_file, out / "a", ESFT.model_copy(update=update))
        runs[on] = (recovered.model.state_dict(), load_file(out / "a" / esft_train.TENSORS_FILE))
    assert [on for on, _ in training_steps] == [False, False, True, True]  # recover's step, ESFT's step
    for without, with_ in zip(runs[False], runs[True], strict=True):
        assert without.keys() == with_.keys() and all(torch.equal(without[k], with_[k]) for k in without)


@pytest.mark.parametrize("train", ["router,lora", "router"])
def test_bf16_autocasts_with_the_routers_outside(
    train, tiny_carved, calib_file, task_file, experts_file, tmp_path, training_steps, monkeypatch
):
    """bf16 changes the losses a little (the products are rounded), keeps the routers outside
    autocast while training, and hands back a model that computes in fp32 as the one saved."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr("moecarve.devices.native_bf16", lambda device: True)  # emulated on CPUs without
    losses = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        config = RecoverConfig.model_validate(
            {**RECOVER.model_dump(), "precision": precision, "train": train}
        )
        recovered = recover(tiny_carved, config, calib_file, out / "r")
        trained = esft_train.train(
            tiny_carved, experts_file, task_file, out / "a", ESFT.model_copy(update={"precision": precision})
        )
        losses[precision] = (recovered.record["final_train_loss"], trained["training"]["train_loss"])
    for fp32, bf16 in zip(losses["fp32"], losses["bf16"], strict=True):
        assert fp32 != bf16 and bf16 == pytest.approx(fp32, rel=0.05)
    outside = [all(name.endswith("OutsideAutocast") for name in gates) for _, gates in training_steps]
    assert outside == [False, False, True, True]  # fp32's recover and ESFT steps, then bf16's
    ids = torch.arange(40)[None] % 300
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16" / "r", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            recovered.model.eval()(ids).logits, saved(ids).logits, rtol=1e-5, atol=1e-5
        )


def test_under_bf16_the_distillation_teacher_computes_in_bf16_too(
    tiny_carved, calib_file, tmp_path, monkeypatch
):
    from moecarve.tune import recover as recover_module

    monkeypatch.setattr("moecarve.devices.native_bf16", lambda device: True)  # emulated on CPUs without
    load, seen = recover_module._load_teacher, []

    def recording(path):
        teacher = load(path)
        teacher.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        return teacher

    monkeypatch.setattr(recover_module, "_load_teacher", recording)
    for precision in ("fp32", "bf16"):
        config = RECOVER.model_copy(update={"precision": precision, "distill": 0.5, "steps": 1})
        recover(tiny_carved, config, calib_file, tmp_path / precision)
    assert seen == [torch.float32, torch.bfloat16]


def test_bf16_where_the_trainer_cannot_autocast_it_is_refused_before_any_work(
    tiny_carved, calib_file, tmp_path, monkeypatch
):
    """A GPU or CPU without native bf16 (it would be emulated), and DataParallel over several GPUs
    (no --device), which the Trainer does not autocast."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    bf16 = RECOVER.model_copy(update={"precision": "bf16"})
    for gpus, device, message in [
        (1, None, "Tesla V100-SXM2-16GB has no native bfloat16 .*; use fp32"),
        (1, "cuda", "Tesla V100-SXM2-16GB has no native bfloat16 .*; use fp32"),
        (2, None, "DataParallel, which it does not autocast; give --device cuda"),
    ]:
        monkeypatch.setattr(torch.cuda, "device_count", lambda gpus=gpus: gpus)
        with pytest.raises(ValueError, match=rf"--precision bf16: .*{message}"):
            recover(tiny_carved, bf16, calib_file, tmp_path / "r", device=device)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    with pytest.raises(ValueError, match="--precision bf16: this CPU has no native bfloat16 .*; use fp32"):
        recover(tiny_carved, bf16, calib_file, tmp_path / "r", device="cpu")
    monkeypatch.setattr("platform.machine", lambda: "aarch64")  # torch has no probe there: not refused
    assert trainer_module.training_device("cpu", "tune recover", "bf16") == "cpu"
    assert not (tmp_path / "r").exists()


def test_under_bf16_autocast_the_routers_choose_as_in_fp32(tiny_carved):
    """A carve's router scores every expert 0.5 +- 0.0025: in bf16 (autocast overrides the router's
    own fp32) the top-k would choose among ties; bf16 training keeps the routers out of autocast,
    in the copies DataParallel makes of them too."""
    from transformers import AutoModelForCausalLM

    from moecarve import moe

    model = AutoModelForCausalLM.from_pretrained(tiny_carved, dtype=torch.float32)
    gate = model.model.layers[1].mlp.gate
    router = type(gate)
    x = torch.randn(200, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    chosen = gate(x)[2].sort(-1).values
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = gate(x)[2].sort(-1).values
        with moe.routers_in_fp32(model):
            kept = gate(x)[2].sort(-1).values
            replica = gate._replicate_for_data_parallel()  # what DataParallel's replicate makes
            replica._parameters = gate._parameters
            copied = replica(x)[2].sort(-1).values
    assert (rounded != chosen).any(-1).float().mean() > 0.2  # what bf16 training would have routed
    assert torch.equal(kept, chosen) and torch.equal(copied, chosen)
    assert type(gate) is router and not gate.__dict__.get("forward")  # as it was


def test_a_recovery_resumes_across_settings_that_decide_no_result(tiny_carved):
    """Checkpoints written before precision and gradient checkpointing were settings, or with
    checkpointing toggled (the fix for running out of memory) or saved at another interval, are the
    same run's; bf16's are not. (save_every, which those records hold, is dropped from a saved record
    before the comparison: tests/tune/test_recover.py.)"""
    from moecarve.tune.recover import _identity

    plain = _identity(tiny_carved, RECOVER)
    before = {key: value for key, value in RECOVER.model_dump(mode="json").items()
              if key not in ("precision", "gradient_checkpointing", "save_every")}  # fmt: skip
    assert plain["config"] == before
    assert _identity(tiny_carved, RECOVER.model_copy(update={"gradient_checkpointing": True})) == plain
    assert _identity(tiny_carved, RECOVER.model_copy(update={"save_every": 7})) == plain
    assert _identity(tiny_carved, RECOVER.model_copy(update={"precision": "bf16"})) != plain
