"""The carve configuration: one validated model that the CLI mirrors and `carve.json` records."""

from __future__ import annotations

import math
import typing
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticKnownError

# Named sets of defaults for the fields not given explicitly. "fast" calibrates on an eighth of the
# default tokens in short sequences, with one k-means step and two refine steps: on the bundled
# model its construction is 6.3-11.9x faster than the CMoE reference's and it stays below the
# reference's PPL at every configuration, at 1.2-2.8x the defaults' PPL (docs/carve.md,
# results/carve/bundled_fast.json).
PRESETS: dict[str, dict] = {
    "quality": {},
    "fast": {"calib_tokens": 2048, "calib_length": 256, "cluster_iters": 1, "refine_iters": 2},
}


def expand_preset(settings: dict) -> dict:
    """`settings` with its `preset` spelled out: for every field some preset sets, the named preset's
    value or the field's default, unless `settings` gives the field itself. Spelling out the default
    too lets a later `preset: quality` undo an earlier `preset: fast` (batch recipes merge levels)."""
    name = settings.get("preset")
    if not isinstance(name, str) or name not in PRESETS:
        return settings  # no preset, or a bad one: the field's own validation refuses it
    fields = {key for values in PRESETS.values() for key in values}
    spelled = {key: PRESETS[name].get(key, CarveConfig.model_fields[key].default) for key in fields}
    return {**spelled, **settings}


def settings_of(model: type[BaseModel], given, defaults: bool = True):
    """A stage's settings given as `model`, a dict of its fields, or None for `model`'s defaults
    (where it has them); anything else is refused by type. carve, tune recover and esft train take
    their configs so."""
    if given is None and defaults:
        return model()
    given = model.model_validate(given) if isinstance(given, dict) else given
    if not isinstance(given, model):
        article = "an" if model.__name__[0] in "AEIOU" else "a"
        raise TypeError(
            f"config must be {article} {model.__name__} or a dict of its fields, got {type(given).__name__}"
        )
    return given


def field_types(annotation) -> set:
    """The plain types an annotation admits (through unions and Literal's values' types)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return {type(arg) for arg in args}
    return set().union(*map(field_types, args)) if args else {annotation}


class Settings(BaseModel):
    """A stage's settings: a true/false given for a number is refused (pydantic's lax mode takes
    `active=True` as 1, carving one routed expert), and so is anything but true/false for a switch
    (it takes `"no"` as false). Numbers written as strings (YAML reads `1e-4` as one) and whole
    floats stay accepted, as the CLI takes them."""

    @field_validator("*", mode="before")
    @classmethod
    def _flags_and_numbers_apart(cls, value, info: ValidationInfo):
        admitted = field_types(cls.model_fields[info.field_name].annotation)
        if isinstance(value, bool) and admitted & {int, float} and bool not in admitted:
            raise PydanticKnownError("int_type" if int in admitted else "float_type")
        if admitted == {bool} and not isinstance(value, bool):
            raise PydanticKnownError("bool_type")
        return value


class CarveConfig(Settings):
    """S{shared}A{active}E{experts}: `experts` counts every expert of d_h / experts neurons, shared included."""

    # allow_inf_nan: an infinite ridge or K_a fails mid-carve or writes a router of zeros
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    preset: Literal[tuple(PRESETS)] = Field(
        "quality",
        description="named defaults for the fields not given: quality (the measured best) or fast "
        "(an eighth of the calibration tokens, fewer clustering steps: several times faster, worse PPL)",
    )

    experts: int = Field(8, description="total experts N (shared included); each holds d_h / N neurons")
    active: int = Field(2, description="routed experts chosen per token (A)")
    shared: int = Field(1, description="always-active shared experts (S)")
    dense_layers: int = Field(0, ge=0, description="keep the first K decoder layers dense")
    calib_tokens: int = Field(8 * 2048, ge=1, description="calibration tokens (sequences x length)")
    calib_length: int = Field(
        512,
        ge=8,
        description="tokens per calibration sequence: shorter ones cut the attention's quadratic cost "
        "but calibrate on early positions only (on SmolLM2-135M 512 measured as good as 2,048, "
        "docs/carve.md)",
    )
    seed: int = Field(0, ge=-(2**63), le=2**64 - 1)  # what torch.manual_seed takes
    # Statistics and partition: measured choices, see docs/carve.md.
    shared_score: Literal["rate", "energy"] = Field(
        "energy",
        description="rank shared neurons by top-K activation rate (CMoE) or mean squared contribution",
    )
    top_k_activation: float = Field(
        0.1,
        gt=0,
        description="K_a of the activation rate: a count (>= 1) or a fraction of d_h (< 1)",
    )
    features: Literal["binary", "magnitude"] = Field(
        "magnitude", description="neuron features for clustering: CMoE's top-K markers or output magnitudes"
    )
    cluster_tokens: int = Field(
        4096, ge=1, description="calibration tokens (evenly spaced) in the clustering features"
    )
    cluster_iters: int = Field(
        2, ge=1, description="balanced k-means iterations at most (stops early on convergence)"
    )
    cluster_tol: float = Field(
        1e-3,
        ge=0,
        description="stop k-means once an iteration lowers its objective by less than this fraction",
    )
    refine_iters: int = Field(
        6,
        ge=0,
        description="after k-means, steps moving neurons to the experts a linear router picks for "
        "the tokens they serve (0: k-means only)",
    )
    router_ridge: float = Field(
        1.0,
        gt=0,
        description="ridge of the linear router's fit (and of the refine's selector), as a fraction of "
        "the FFN inputs' mean variance",
    )
    balance: float = Field(
        0.0,
        ge=0,
        le=1,
        description="strength of the load-balancing bias (0: none, 1: fully balanced)",
    )
    refit_ridge: float | Literal["auto"] | None = Field(
        "auto",
        description="ridge of a least-squares refit of the down projections to the routing, pulling "
        "them towards the source's, as a fraction of the activations' mean square (auto: "
        "(neurons / tokens)^2; None: keep the source's)",
    )
    refit_target: Literal["layer", "stream"] = Field(
        "layer",
        description="what the refit aims at: the dense FFN output on the carved inputs (layer), or "
        "what takes the carved residual stream back to the dense model's (stream)",
    )
    calib_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="dtype of the calibration forward passes and neuron activations (auto: bfloat16 "
        "where the device multiplies it natively, a CPU with AVX512-BF16 or AMX or a GPU from Ampere on, "
        "else float32); the router fit and refit stay float32",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the written checkpoint (auto: the source's)"
    )
    max_shard_size: int = Field(512 * 1024**2, ge=1024, description="bytes per output safetensors shard")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, values):
        return expand_preset(values) if isinstance(values, dict) else values

    @field_validator("top_k_activation")
    @classmethod
    def _check_top_k(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError(f"top_k_activation {value}: a count (a whole number >= 1) or a fraction (< 1)")
        return value

    @field_validator("refit_ridge", mode="before")
    @classmethod
    def _check_refit_ridge(cls, value):
        if value is None or value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
            raise ValueError(f"refit_ridge must be a number > 0, auto or null, got {value!r}")
        return float(value)

    @model_validator(mode="after")
    def _check_counts(self) -> CarveConfig:
        if self.experts < 2:
            raise ValueError(f"--experts must be at least 2, got {self.experts}")
        if self.shared < 1:
            raise ValueError(
                f"--shared must be >= 1, got {self.shared}: glm4_moe has no shared-expert-free form that both "
                "vLLM (fails on n_shared_experts 0) and transformers (refuses null) load"
            )
        if self.active < 1:
            raise ValueError(f"--active must be >= 1, got {self.active}")
        routed = self.experts - self.shared
        if self.shared + self.active > self.experts:
            raise ValueError(
                f"--shared {self.shared} + --active {self.active} exceeds --experts {self.experts}: "
                f"at most {routed} routed experts can be active"
            )
        if routed < 2:
            fix = f"use --shared <= {self.experts - 2}" if self.experts >= 3 else "use --experts >= 3"
            raise ValueError(
                f"{routed} routed expert(s) is not a mixture: {fix} (glm4_moe routing needs at least "
                "2 routed experts beside at least 1 shared one)"
            )
        if self.calib_tokens < self.calib_length:
            raise ValueError(
                f"calib_tokens {self.calib_tokens} is less than one sequence of {self.calib_length}"
            )
        return self

    @property
    def routed(self) -> int:
        return self.experts - self.shared

    @property
    def name(self) -> str:
        return f"S{self.shared}A{self.active}E{self.experts}"

    @property
    def active_fraction(self) -> float:
        """Of each MoE layer's FFN neurons, per token."""
        return (self.shared + self.active) / self.experts

    def overall_fraction(self, layers: int) -> float:
        """Of all the model's FFN neurons, per token: the dense layers counted whole."""
        return (self.dense_layers + (layers - self.dense_layers) * self.active_fraction) / layers
