"""carve(): dense checkpoint -> glm4_moe checkpoint, one decoder layer at a time.

Sequential calibration: the calibration tokens are embedded once, then pushed through one
layer at a time; layer l is profiled on the outputs of the already-carved layers 0..l-1.
Only the current layer's weights are in memory; output shards are written as layers finish.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from moecarve import MoecarveWarning
from moecarve.carve.calib import calibration, calibration_text
from moecarve.carve.config import CarveConfig, settings_of
from moecarve.carve.families import family_for
from moecarve.carve.layer import carve_ffn, pad_neurons, timed
from moecarve.carve.source import TOKENIZER_FILES, SourceError, TensorSource, check_source, resolve_source
from moecarve.carve.target import glm4_moe_config, write_rotary_at_top_level
from moecarve.carve.writer import ShardWriter, atomic_directory, check_apart, check_output
from moecarve.devices import resolve_device
from moecarve.isolation import kept_random_state

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENS_PER_PASS = 4096  # calibration tokens pushed through a layer at once (whole sequences, at least one)


@dataclass
class CarveResult:
    out: Path
    record: dict = field(default_factory=dict)


class _CaptureInput(torch.nn.Module):
    """Stands in for the MLP: records its input and adds nothing, so the layer returns the residual."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.detach())
        return torch.zeros_like(x)


def neurons_per_expert(intermediate: int, experts: int) -> int:
    """d_h / N rounded up to a multiple of 8, zero neurons padding the rest (exact): a down
    projection's rows must be 16-byte aligned in bf16 for grouped-GEMM kernels, transformers' own
    among them (it refuses 11008 / 64 = 172 neurons per expert)."""
    return math.ceil(intermediate / experts / 8) * 8


def check_padding(intermediate: int, config: CarveConfig) -> None:
    """The zero neurons that round each expert up to a multiple of 8 all go to routed experts (the
    shared ones are chosen neurons): refused where a routed expert would hold nothing else (never
    useful, never chosen) or the shared experts every neuron; warned of where they are over a tenth
    of the FFN, since the active fraction counts them as neurons."""
    m = neurons_per_expert(intermediate, config.experts)
    real_routed = intermediate - config.shared * m
    if real_routed < config.routed:
        raise ValueError(
            f"{config.name}: experts of {m} neurons (d_h {intermediate} / {config.experts}, rounded up to a "
            f"multiple of 8) leave {max(real_routed, 0)} neuron(s) for {config.routed} routed experts, so "
            "some would hold only zero padding: use fewer --experts or fewer --shared"
        )
    padding = m * config.experts - intermediate
    if padding > intermediate / 10:
        warnings.warn(
            f"{config.name}: {padding} of the {m * config.experts} expert neurons are zero padding (d_h "
            f"{intermediate} / {config.experts} rounded up to {m}); the {config.active_fraction:.1%} active "
            "fraction counts them, so the carve keeps more of the real FFN than it says: use --experts "
            f"that divide {intermediate} into multiples of 8",
            MoecarveWarning,
            stacklevel=3,
        )


def calibration_dtype(setting: str, device: str = "cpu") -> torch.dtype:
    """`calib_dtype`: bfloat16 on "auto" where the device multiplies it natively (a GPU from Ampere
    on; a CPU with AVX512-BF16 or AMX, where a calibration pass took half float32's time,
    results/carve/floor.json); elsewhere float32, since emulated bfloat16 is slower than float32."""
    if setting != "auto":
        return DTYPES[setting]
    from moecarve.devices import native_bf16

    return torch.bfloat16 if native_bf16(device) is True else torch.float32  # unknown: float32


@contextlib.contextmanager
def reused_heap():
    """While carving, glibc serves large blocks from its heap, reusing freed ones, instead of mapping
    fresh pages for each of the many [T, I] temporaries (first-touch page faults cost about as much
    as the arithmetic on them). Process-wide while it lasts; afterwards both settings go back to
    glibc's defaults and the free memory is returned, but glibc's dynamic mmap threshold, which
    either setting turns off, stays off (glibc cannot turn it back on). A no-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        yield
        return
    m_trim_threshold, m_mmap_max = -1, -4
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 256 << 20)
    try:
        yield
    finally:
        mallopt(m_mmap_max, 65536)
        mallopt(m_trim_threshold, 128 * 1024)
        trim(0)


def plan(model, config: CarveConfig, out: Path | None, overwrite: bool, calib=None):
    """Everything checkable without reading weights, and the calibration text read (not tokenized):
    raises before any expensive work. The text is read first where the source is not a local
    directory (a GGUF conversion, a download), last otherwise. Returns (source dir, its config,
    family, out, text)."""
    local = Path(str(model)).expanduser()
    label = "--out"
    if out is None:  # NAME-S1A2E8 in the current directory; a dotted name (Qwen2.5-0.5B) kept whole
        name = (local.resolve().name if local.exists() else local.name).removesuffix(".gguf")
        out, label = Path(f"{name}-{config.name}"), "the default output (no --out given)"
    out = Path(out).expanduser()
    # also refuses `--out .`, the current directory; a --calib file inside --out would go with it
    check_apart({label: out}, {"model": local, "--calib": calib or None})
    check_output(out, local if local.exists() else None, overwrite)  # before any download or conversion
    check_source(model)
    text = None if local.is_dir() else calibration_text(calib, config.calib_tokens, config.calib_length)
    src = resolve_source(model)
    check_output(out, src, overwrite)
    source_config = AutoConfig.from_pretrained(src)
    family = family_for(source_config)
    intermediate = source_config.intermediate_size
    if config.experts > intermediate:
        raise ValueError(
            f"--experts {config.experts} would hold < 1 neuron each (the FFN has {intermediate})"
        )
    check_padding(intermediate, config)
    if config.top_k_activation > intermediate:
        raise ValueError(
            f"top_k_activation {config.top_k_activation:g} exceeds the FFN's {intermediate} neurons"
        )
    layers = source_config.num_hidden_layers
    if config.dense_layers >= layers:
        raise ValueError(
            f"--dense-layers {config.dense_layers} leaves no MoE layer of the model's {layers}: give at most {layers - 1}"
        )
    if config.calib_length > source_config.max_position_embeddings:
        raise ValueError(
            f"--calib-length {config.calib_length} exceeds the model's "
            f"{source_config.max_position_embeddings} positions"
        )
    if not any((src / name).is_file() for name in TOKENIZER_FILES):
        raise SourceError(f"{src} holds no tokenizer (any of {', '.join(TOKENIZER_FILES)})")
    text = text or calibration_text(calib, config.calib_tokens, config.calib_length)
    return src, source_config, family, out, text


def expected_tensors(source_config, family, tensors: TensorSource) -> None:
    """Every tensor the carve will read is in the checkpoint: a missing one fails now, not at layer 20."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not source_config.tie_word_embeddings:
        names.append("lm_head.weight")
    per_layer = family.source_tensors(source_config)
    names += [f"model.layers.{i}.{n}" for i in range(source_config.num_hidden_layers) for n in per_layer]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SourceError(f"checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[0]}")
    from moecarve.moe import meta_model

    skeleton = meta_model(source_config).state_dict()
    for name in names:  # a config edited apart from its weights: refused by name, not mid-carve
        if name in skeleton and list(skeleton[name].shape) != tensors.shape(name):
            raise SourceError(
                f"{name} has shape {tensors.shape(name)} in the checkpoint, {list(skeleton[name].shape)} "
                "by its config.json: the config does not describe these weights"
            )


def carve(
    model: str | Path,
    config: CarveConfig | dict | None = None,
    calib: str | Path | None = None,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    evaluate: bool = False,
    progress: bool = True,
    device: str | torch.device | None = "cpu",
) -> CarveResult:
    """Carve `model` into a glm4_moe checkpoint at `out`; see CarveConfig for the options. `device`
    (cpu, cuda, cuda:N; None: CUDA where present) is where the calibration and the fits run; weights
    are read and written on the CPU, one layer at a time either way."""
    device = resolve_device(device, "carve")
    # cuda:N made current: the stage timings' synchronize and the bf16 probe act on that GPU
    cuda_current = (
        torch.cuda.device(device) if torch.device(device).type == "cuda" else contextlib.nullcontext()
    )
    with cuda_current, kept_random_state():  # the seed is the carve's; the caller's generators come back
        return _carve(model, config, calib, out, overwrite, evaluate, progress, device)


def _carve(model, config, calib, out, overwrite: bool, evaluate: bool, progress: bool, device: str):
    config = settings_of(CarveConfig, config)
    started = time.perf_counter()
    src, source_config, family, out, text = plan(model, config, out, overwrite, calib)
    if evaluate:
        from moecarve.eval.ppl import check_eval_ppl_positions

        check_eval_ppl_positions(src)
    tensors = TensorSource(src)
    expected_tensors(source_config, family, tensors)
    tokenizer = AutoTokenizer.from_pretrained(src)
    calib_data = calibration(tokenizer, calib, config.calib_tokens, config.calib_length, text)
    rows, largest = tensors.shape("model.embed_tokens.weight")[0], calib_data.input_ids.max().item()
    if largest >= rows:
        raise SourceError(
            f"the tokenizer gives token id {largest}, the embeddings have {rows} rows: {src}'s tokenizer "
            "does not match its weights"
        )
    source_dtype = source_config.dtype if isinstance(source_config.dtype, torch.dtype) else None
    dtype = DTYPES.get(config.dtype) or source_dtype or tensors.dtype("model.embed_tokens.weight")
    intermediate = source_config.intermediate_size
    m = neurons_per_expert(intermediate, config.experts)
    target_config = glm4_moe_config(source_config, family, config, m, dtype)
    torch.manual_seed(config.seed)

    source_config._attn_implementation = "sdpa"
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(source_config, dtype=torch.float32)
    rotary = type(skeleton.model.rotary_emb)(config=source_config).to(device)
    # From here to the last layer's shard is what the CMoE reference's own timer covers (its
    # "training-free construction": model and calibration data already loaded, libraries imported).
    construction_started = time.perf_counter()
    embed = tensors.get("model.embed_tokens.weight")
    if family.embedding_scale(source_config) != 1.0:  # scaled in float32: one rounding, at the write
        embed = embed.float() * family.embedding_scale(source_config)
    hidden = embed[calib_data.input_ids].float().to(device)  # [B, L, H]
    positions = torch.arange(hidden.shape[1], device=device)[None]
    calib_dtype = calibration_dtype(config.calib_dtype, device)
    position_embeddings = rotary(hidden[:1].to(calib_dtype), positions)

    per_pass = max(1, TOKENS_PER_PASS // config.calib_length)

    def run(layer, stream):  # the stream is passed between layers in float32, run in calib_dtype
        return torch.cat(
            [
                layer(
                    chunk.to(calib_dtype), position_embeddings=position_embeddings, position_ids=positions
                ).float()
                for chunk in stream.split(per_pass)
            ]
        )

    stream = config.refit_ridge is not None and config.refit_target == "stream"
    # The residual streams between layers; only this dict holds them, so each layer's carve frees
    # the old stream as soon as it has the new one.
    streams = {"carved": hidden, "dense": hidden if stream else None}
    del hidden
    layer_setup = _LayerSetup(config, family, source_config, calib_dtype, dtype, m, device)
    layers = []
    with atomic_directory(out) as tmp, reused_heap():
        writer = ShardWriter(tmp, config.max_shard_size)
        embed = embed.to(dtype)  # the source's copy freed here, not held while the head is made
        _write_vocabulary_tensors(writer, embed, tensors, family, source_config, dtype)
        del embed  # written and freed before any layer is loaded
        bar = tqdm(range(source_config.num_hidden_layers), desc=f"carve {config.name}", disable=not progress)
        for index in bar:
            # In a function so that the layer's tensors are freed before the next layer is loaded.
            out_tensors, stats = _carve_layer(index, skeleton, tensors, streams, run, layer_setup)
            writer.add(out_tensors)
            del out_tensors
            layers.append(stats)
            if "relative_error" in stats:
                bar.set_postfix(err=f"{stats['relative_error']:.3f}")
        writer.close()
        construction_seconds = time.perf_counter() - construction_started
        _save_target_config(target_config, tmp)
        _copy_generation_config(src, tmp)
        tokenizer.save_pretrained(tmp)
        record = _record(
            model,
            src,
            config,
            calib_data,
            layers,
            m,
            intermediate,
            calib_dtype,
            device,
            time.perf_counter() - started,
            construction_seconds,
        )
        if evaluate:
            from moecarve.eval.ppl import protocol_ppl

            record["quality"] = {
                "protocol_ppl": {
                    key: protocol_ppl(path, device=device) for key, path in (("dense", src), ("carved", tmp))
                }
            }
        (tmp / "carve.json").write_text(json.dumps(record, indent=2) + "\n")
    return CarveResult(out=out.resolve(), record=record)


def _write_vocabulary_tensors(writer, embed, tensors, family, source_config, dtype) -> None:
    """The embeddings (`embed`, in `dtype`, already scaled where the family scales them), the LM
    head and the final norm."""
    writer.add({"model.embed_tokens.weight": embed})
    tied = source_config.tie_word_embeddings
    if (family.embedding_scale(source_config), family.logits_scale(source_config)) == (1.0, 1.0):
        lm_head = embed if tied else tensors.get("lm_head.weight").to(dtype)
    else:  # the source's head, scaled in float32 (a tied one is the embeddings before their scale)
        head = tensors.get("model.embed_tokens.weight" if tied else "lm_head.weight").float()
        lm_head = (head * family.logits_scale(source_config)).to(dtype)
    writer.add(
        {
            "lm_head.weight": lm_head,  # explicit: vLLM's glm4_moe does not tie
            "model.norm.weight": tensors.get("model.norm.weight").to(dtype),
        }
    )


@dataclass(frozen=True)
class _LayerSetup:
    """What every layer's carve shares."""

    config: CarveConfig
    family: object
    source_config: object
    calib_dtype: torch.dtype
    dtype: torch.dtype
    m: int
    device: str


def _carve_layer(index, skeleton, tensors, streams: dict, run, setup: _LayerSetup):
    """Load layer `index`, carve its FFN on `streams["carved"]`, and drop its weights from the skeleton.
    Replaces the streams with the next layer's (`streams["dense"]`, the dense model's own, is kept
    only with refit_target=stream). Returns the layer's output tensors and its statistics."""
    config, calib_dtype, dtype = setup.config, setup.calib_dtype, setup.dtype
    prefix = f"model.layers.{index}."
    layer = skeleton.model.layers[index]
    skeleton.model.layers[index] = torch.nn.Identity()  # the skeleton keeps none of its weights
    tensors.load_into(layer, prefix, torch.float32)
    state = setup.family.to_target(layer.state_dict(), setup.source_config)  # float32: what is written
    if calib_dtype != torch.float32:  # a second copy, for the calibration forward
        tensors.load_into(layer, prefix, calib_dtype)
    layer.to(setup.device)
    mlp, capture, timing = layer.mlp, _CaptureInput(), {}
    dense_hidden = streams.pop("dense")
    if dense_hidden is not None:  # the dense model's own residual stream after this layer
        with torch.no_grad(), timed(timing, "dense_stream"):
            dense_hidden = run(layer, dense_hidden)
    streams["dense"] = dense_hidden
    layer.mlp = capture
    with torch.no_grad(), timed(timing, "attention"):
        residual = run(layer, streams.pop("carved"))
    x = torch.cat(capture.inputs).flatten(0, 1).float()  # [T, H] FFN inputs
    del capture
    attention = setup.family.attention_tensors(setup.source_config)
    out_tensors = {prefix + n: state.pop(n).to(dtype) for n in attention}
    weights = tuple(state.pop(f"mlp.{name}_proj.weight") for name in ("gate", "up", "down"))  # on the CPU
    del state, layer
    if index < config.dense_layers:
        with torch.no_grad():  # the source module, with the block's scale as the source applies it
            ffn = mlp(x.to(calib_dtype)).float() * setup.family.residual_scale(setup.source_config)
        for name, w in zip(("gate_proj", "up_proj", "down_proj"), weights, strict=True):
            out_tensors[f"{prefix}mlp.{name}.weight"] = w.to(dtype)
        streams["carved"] = residual + ffn.view_as(residual)
        return out_tensors, {"layer": index, "dense": True, **timing}
    del mlp
    padded = pad_neurons(*(w.to(setup.device) for w in weights), setup.m * config.experts)
    del weights
    target = (dense_hidden - residual).flatten(0, 1) if dense_hidden is not None else None
    carved, ffn = carve_ffn(x, *padded, config, setup.m, dtype, target, calib_dtype)
    out_tensors.update(carved.tensors(f"{prefix}mlp.", dtype))
    carved.stats["seconds"] = {**timing["seconds"], **carved.stats["seconds"]}
    streams["carved"] = residual + ffn.view_as(residual)
    return out_tensors, {"layer": index, **carved.stats}


def _save_target_config(config, directory: Path) -> None:
    config.save_pretrained(directory)
    write_rotary_at_top_level(directory)


def _copy_generation_config(src: Path, out: Path) -> None:
    """The source's generation_config.json; none where it has none (an empty one would hide
    config.json's token ids, from which transformers derives it) or one transformers cannot read
    (as transformers loads such a source: from config.json, with a warning here)."""
    if not (src / "generation_config.json").is_file():
        return
    try:
        generation = GenerationConfig.from_pretrained(src)
    except (OSError, TypeError, ValueError) as err:
        warnings.warn(
            f"{src}'s generation_config.json is unreadable ({err}); the carve has none, so transformers "
            "derives one from config.json",
            MoecarveWarning,
            stacklevel=2,
        )
        return
    generation.save_pretrained(out)


def _record(
    model, src, config, calib_data, layers, m, intermediate, calib_dtype, device, seconds, construction
) -> dict:
    from moecarve.carve.source import model_identity
    from moecarve.eval.common import versions

    return {
        "source": str(model),
        "source_path": str(Path(src).resolve()),
        "source_identity": model_identity(Path(src)),  # path, sha256 of config and (sampled) weights
        "config": config.model_dump(),
        "resolved": {
            "name": config.name,
            "neurons_per_expert": m,
            "intermediate_size": intermediate,
            "padding_neurons": m * config.experts - intermediate,
            # of all the FFN neurons per token, dense layers counted whole (the routed layers' alone
            # is config.active_fraction)
            "active_fraction": config.overall_fraction(len(layers)),
            "calib_dtype": str(calib_dtype).removeprefix("torch."),
            "device": device,
        },
        "calibration": {
            "source": calib_data.source,
            "sha256": calib_data.sha256,
            "tokens": calib_data.tokens,
            "sequences": list(calib_data.input_ids.shape),
        },
        "seed": config.seed,
        "carve_seconds": round(seconds, 2),  # the whole call: imports, loading, writing
        "construction_seconds": round(construction, 2),  # the layers' carve, streamed reads and writes
        "versions": versions(),
        "layers": layers,
    }
