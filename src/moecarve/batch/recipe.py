"""Batch recipes: models x configurations x stages, validated in full before any work starts.

A recipe is YAML. Errors name the recipe file, the line and the bad key, so that a typo in the
tenth configuration fails in a second, not after nine carves.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moecarve import resources
from moecarve.carve.calib import read_utf8
from moecarve.carve.config import CarveConfig, expand_preset

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # a plain file name: job directories are named after it
STAGE_ORDER = ("carve", "recover", "esft", "eval_ppl", "eval_tasks")
TRAINING_STAGES = ("carve", "recover", "esft")  # what the dense jobs skip: they evaluate the source
TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "granite")


class RecipeError(ValueError):
    """The recipe is malformed; the message names the file, line and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # `windows: true` is no 1


class ModelSpec(_Strict):
    """A source model: `path` (directory, .gguf, hub id or `bundled`) or `tiny` (a random test model)."""

    name: str = Field(pattern=NAME_PATTERN)
    path: str | None = None
    tiny: Literal[TINY_FAMILIES] | None = None  # type: ignore[valid-type]
    carve: dict[str, Any] = Field(default_factory=dict, description="carve settings for this model only")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.path is None) == (self.tiny is None):
            raise ValueError("give exactly one of `path` or `tiny`")
        return self


class PplOptions(_Strict):
    """Perplexity stage: the protocol (last windows x length tokens of `data`, BoolQ passages by default)."""

    windows: int = Field(16, ge=1)
    length: int = Field(2048, ge=2)
    data: str | None = None


class TasksOptions(_Strict):
    """Zero-shot tasks stage (moecarve.eval.tasks): accuracy per task, `limit` questions each."""

    tasks: list[str] = Field(min_length=1)
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)

    @field_validator("tasks")
    @classmethod
    def _known(cls, tasks: list[str]) -> list[str]:
        from moecarve.eval.tasks import parse_tasks  # its table of tasks with local data

        return parse_tasks(tasks)


class Recipe(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    output: str = Field(description="output directory, relative to the recipe file")
    models: list[ModelSpec] = Field(min_length=1)
    configs: list[dict[str, Any]] = Field(default_factory=list, description="CarveConfig fields + name")
    dense: bool = Field(False, description="also run the eval stages on each source model")
    stages: list[Literal[STAGE_ORDER]] = Field(min_length=1)  # type: ignore[valid-type]
    carve: dict[str, Any] = Field(default_factory=dict, description="carve settings shared by all")
    recover: dict[str, Any] | None = Field(
        None, description="`moecarve tune recover`'s settings (RecoverConfig fields) and its `data`"
    )
    esft: dict[str, Any] | None = Field(
        None,
        description="ESFT of each model: its task `data` (required), `score` (token|gate), `p`, `tokens` "
        "and EsftConfig fields",
    )
    eval_ppl: PplOptions | None = None
    eval_tasks: TasksOptions | None = None
    keep_models: bool = Field(
        True,
        description="keep each job's checkpoints (carved, recovered, ESFT) in its directory; false deletes "
        "them once its evals are done",
    )
    device: str | None = Field(
        None,
        description="where every stage runs: cpu, cuda, cuda:N (default: carves on the CPU, the rest on "
        "CUDA where present); not in a job's fingerprint, so moving a recipe reruns nothing",
    )

    @model_validator(mode="before")
    @classmethod
    def _eval_ppl_defaults(cls, data):
        """The eval_ppl stage without its section takes its defaults, as an empty section gives."""
        stages = data.get("stages") if isinstance(data, dict) else None
        if isinstance(stages, list) and "eval_ppl" in stages and data.get("eval_ppl") is None:
            data = {**data, "eval_ppl": {}}
        return data

    @field_validator("device")
    @classmethod
    def _a_device(cls, value: str | None) -> str | None:
        """Its form only: whether this machine has it is checked when jobs run (`check_device`), so
        that a GPU recipe's --dry-run works on a login node."""
        from moecarve.devices import DeviceError, parse_device

        if value is None:
            return None
        try:
            return str(parse_device(value, "a batch"))
        except DeviceError as err:
            raise ValueError(err.why) from None

    @model_validator(mode="after")
    def _check_stages(self) -> Recipe:
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages repeat: {self.stages}")
        if list(self.stages) != sorted(self.stages, key=STAGE_ORDER.index):
            raise ValueError(f"stages run in the order {list(STAGE_ORDER)}; got {self.stages}")
        for section in ("recover", "esft", "eval_ppl", "eval_tasks"):
            if getattr(self, section) is not None and section not in self.stages:
                raise ValueError(f"`{section}` settings are given but {section} is not in stages")
        if "eval_tasks" in self.stages and self.eval_tasks is None:
            raise ValueError("stage eval_tasks needs an `eval_tasks:` section with its `tasks`")
        for section in ("recover", "esft"):
            if section in self.stages and (getattr(self, section) is None or "carve" not in self.stages):
                raise ValueError(
                    f"stage {section} trains each carve: it needs carve in stages and its `{section}:` section"
                )
        if self.configs and "carve" not in self.stages:
            raise ValueError("configs are carve configurations: add carve to stages (or drop configs)")
        if not self.configs and not self.dense:
            raise ValueError("nothing to run: give configs, or dense: true")
        if self.dense and not any(stage.startswith("eval") for stage in self.stages):
            raise ValueError("dense: true evaluates the source models: add an eval stage")
        return self


@dataclass(frozen=True)
class Job:
    """One model x configuration: its stages run in order inside one directory."""

    name: str
    model: ModelSpec
    config_name: str
    carve: CarveConfig | None  # None: the dense source model itself
    calib: str | None
    stages: tuple[str, ...]
    options: dict = field(default_factory=dict)  # stage name -> its options (plain data)

    @property
    def keep_model(self) -> bool:
        """The recipe's keep_models, held with the carve's options: whether the job's checkpoints stay."""
        return self.options.get("carve", {}).get("keep_model", True)

    @property
    def fingerprint(self) -> str:
        """Hash of everything that decides the job's results: a finished job with another is stale.
        Keeping the checkpoint decides no result: it is hashed as kept, so changing it reruns nothing."""
        return self._hash(keep_model=True)

    @property
    def fingerprints(self) -> set[str]:
        """The fingerprints a finished job of these settings may carry: before keep_models was
        hashed as kept, a job run with `keep_models: false` recorded it as such; before recover's
        save_every was left out, it was hashed; before recover's default `train` was sorted as
        given ones are, it was router, lora."""
        flags = (True, False)
        return {self._hash(keep, every, old) for keep in flags for every in flags for old in flags}

    @property
    def settings(self) -> dict:
        """What the fingerprint hashes, as plain data: a finished job records it, so that a refusal
        can name the settings that changed."""
        return json.loads(json.dumps(self._spec(keep_model=True)))  # tuples as the record has them

    def _hash(self, keep_model: bool, save_every: bool = False, old_train_order: bool = False) -> str:
        spec = self._spec(keep_model, save_every, old_train_order)
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def _spec(self, keep_model: bool, save_every: bool = False, old_train_order: bool = False) -> dict:
        from moecarve.tune.trainer import result_settings

        options = dict(self.options)
        for stage in {"recover", "esft"} & set(options):  # without settings that decide no result
            options[stage] = result_settings(options[stage])
        if old_train_order and options.get("recover", {}).get("train") == ["lora", "router"]:
            options["recover"] = {**options["recover"], "train": ["router", "lora"]}
        if save_every and "recover" in options:
            options["recover"] = {**options["recover"], "save_every": self.options["recover"]["save_every"]}
        if "carve" in options:
            options = {**options, "carve": {**options["carve"], "keep_model": keep_model}}
        return {
            "model": self.model.model_dump(exclude={"name", "carve"}),
            # the preset is resolved into the other fields: its name alone decides nothing
            "carve": self.carve.model_dump(exclude={"preset"}) if self.carve else None,
            "calib": self.calib,
            "stages": self.stages,
            "options": options,
        }


@dataclass(frozen=True)
class LoadedRecipe:
    recipe: Recipe
    path: Path
    jobs: tuple[Job, ...]
    device_line: int = 1  # where the recipe names its device, for the error when this machine lacks it

    @property
    def root(self) -> Path:
        return self.path.parent

    def output(self, override: str | Path | None = None) -> Path:
        return (
            Path(override).expanduser()
            if override is not None
            else self.root / Path(self.recipe.output).expanduser()
        )

    def check_device(self) -> None:
        """The recipe's device is one this machine has, and trains in bf16 where the recipe asks it
        to: checked before any job runs."""
        from moecarve.devices import DeviceError, resolve_device

        if self.recipe.device is not None:
            try:
                resolve_device(self.recipe.device, "a batch")
            except DeviceError as err:
                raise RecipeError(f"{self.path}:{self.device_line}: device: {err.why}") from None
        for stage in ("recover", "esft"):
            if (getattr(self.recipe, stage) or {}).get("precision") == "bf16":
                from moecarve.tune.trainer import training_device

                try:
                    training_device(self.recipe.device, stage, "bf16")
                except ValueError as err:
                    raise RecipeError(f"{self.path}:{self.device_line}: {stage}.precision: {err}") from None


def load_recipe(path: str | Path) -> LoadedRecipe:
    """Parse and validate a recipe file and expand it into its jobs; raises RecipeError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path}")
    text = read_utf8(path)
    try:
        node = yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from err
    if node is None or not isinstance(node, yaml.MappingNode):
        raise RecipeError(f"{path}: a recipe is a YAML mapping (name, output, models, configs, stages)")
    _check_duplicate_keys(node, path)
    data = yaml.safe_load(text)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise _located(err, node, path, ()) from err
    jobs = tuple(_expand(recipe, node, path))
    return LoadedRecipe(recipe, path.resolve(), jobs, _line(node, ("device",)))


def _expand(recipe: Recipe, node, path: Path) -> list[Job]:
    """models x (configs [+ dense]) as jobs, each with its merged carve settings validated."""
    _check_carve_keys(recipe.carve, ("carve",), node, path)
    for m, model in enumerate(recipe.models):
        _check_carve_keys(model.carve, ("models", m, "carve"), node, path)
    for c, entry in enumerate(recipe.configs):
        _check_carve_keys(entry, ("configs", c), node, path, allow_name=True)
    if recipe.eval_ppl is not None:
        _check_text_source(recipe.eval_ppl.data, ("eval_ppl", "data"), node, path)
    stages = tuple(recipe.stages)
    options = {s: getattr(recipe, s).model_dump() for s in ("eval_ppl", "eval_tasks") if getattr(recipe, s)}
    if recipe.recover is not None:
        options["recover"] = _recover_options(recipe.recover, node, path)
        if recipe.eval_ppl is not None:
            _check_text_apart(options["recover"]["data"], ("recover", "data"), recipe.eval_ppl, node, path)
    if recipe.esft is not None:
        options["esft"] = _esft_options(recipe.esft, node, path)
        if recipe.eval_ppl is not None:
            _check_text_apart(options["esft"]["data"], ("esft", "data"), recipe.eval_ppl, node, path)
            general = options["esft"].get("mix_general")
            if general:  # its `protocol` is the BoolQ passages, as recover's default
                general = None if resources.is_protocol_text(general) else general
                _check_text_apart(general, ("esft", "mix_general"), recipe.eval_ppl, node, path)
    jobs, model_names = [], set()
    for m, model in enumerate(recipe.models):
        if model.name in model_names:
            loc = ("models", m, "name")
            raise RecipeError(f"{path}:{_line(node, loc)}: models[{m}].name: {model.name!r} is used twice")
        model_names.add(model.name)
        if recipe.dense:
            eval_stages = tuple(s for s in stages if s not in TRAINING_STAGES)
            dense_options = {key: value for key, value in options.items() if key in eval_stages}
            jobs.append(Job(f"{model.name}-dense", model, "dense", None, None, eval_stages, dense_options))
        config_names = set()
        for c, entry in enumerate(recipe.configs):
            # each level's preset is spelled out there, so a later level overrides it field by field
            settings = {**expand_preset(recipe.carve), **expand_preset(model.carve), **expand_preset(entry)}
            name, calib = settings.pop("name", None), settings.pop("calib", None)
            try:
                config = CarveConfig(**settings)
            except ValidationError as err:  # named where the failing setting is written
                key = err.errors()[0]["loc"][:1]
                levels = (
                    (entry, ("configs", c)),
                    (model.carve, ("models", m, "carve")),
                    (recipe.carve, ("carve",)),
                )
                written = next(
                    (loc for level, loc in levels if key and key[0] in (level or {})), ("configs", c)
                )
                raise _located(err, node, path, written) from err
            name = str(name or config.name)
            where = f"{path}:{_line(node, ('configs', c))}: configs[{c}]"
            if name in config_names:
                raise RecipeError(
                    f"{where}: the name {name!r} is used twice "
                    "(give `name:` to configurations that share S/A/E)"
                )
            if name == "dense" or re.fullmatch(NAME_PATTERN, name) is None:
                raise RecipeError(
                    f"{where}.name: {name!r} is reserved or not a plain name (letters, digits, _ . -)"
                )
            config_names.add(name)
            job_options = {**options, "carve": {"keep_model": recipe.keep_models}}
            jobs.append(Job(f"{model.name}-{name}", model, name, config, calib, stages, job_options))
    seen = set()
    for job in jobs:
        if job.name in seen:
            raise RecipeError(f"{path}: two jobs are named {job.name!r} (model-configuration); rename one")
        seen.add(job.name)
    return jobs


def _recover_options(section: dict, node, path: Path) -> dict:
    """The recover stage's settings, validated as `moecarve tune recover` takes them, in plain data."""
    from moecarve.tune.recover import RecoverConfig

    settings = {key: value for key, value in section.items() if key != "data"}
    try:
        config = RecoverConfig(**settings)
    except ValidationError as err:
        raise _located(err, node, path, ("recover",)) from err
    _check_text_source(section.get("data"), ("recover", "data"), node, path)
    return {**config.model_dump(mode="json"), "data": section.get("data")}


def _esft_options(section: dict, node, path: Path) -> dict:
    """The esft stage's settings: `moecarve esft score / select / train`'s, validated, in plain data."""
    from moecarve.esft.score import SCORES
    from moecarve.esft.train import EsftConfig

    where = f"{path}:{_line(node, ('esft',))}: esft"
    if not section.get("data"):
        raise RecipeError(f"{where}.data: missing (required): the task's JSONL or text file")
    data = section["data"]
    if not isinstance(data, str) or not _beside(path, data).is_file():
        where_data = f"{path}:{_line(node, ('esft', 'data'))}: esft.data"
        raise RecipeError(f"{where_data}: not a file: {data}{relative_to(str(data), path.resolve().parent)}")
    selection = {
        "score": section.get("score", "token"),
        "p": section.get("p", 0.2),
        "tokens": section.get("tokens", 131072),
    }
    if selection["score"] not in SCORES:
        raise RecipeError(f"{where}.score: one of {', '.join(SCORES)}, got {selection['score']!r}")
    p, tokens = selection["p"], selection["tokens"]
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
        raise RecipeError(f"{where}.p: a fraction in (0, 1], got {p!r}")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise RecipeError(f"{where}.tokens: a positive whole number, got {tokens!r}")
    settings = {key: value for key, value in section.items() if key not in ("data", *selection)}
    mix, ratio = settings.get("mix_general"), settings.get("mix_ratio", 0)
    if isinstance(ratio, int | float) and bool(mix) != (ratio > 0):
        key = "mix_general" if mix else "mix_ratio"
        raise RecipeError(
            f"{path}:{_line(node, ('esft', key))}: esft.{key}: esft.mix_general and esft.mix_ratio go "
            "together: a text (a file relative to the recipe, or protocol) and a ratio in (0, 1)"
        )
    if (
        mix
        and not resources.is_protocol_text(mix)
        and not (isinstance(mix, str) and _beside(path, mix).exists())
    ):
        raise RecipeError(
            f"{path}:{_line(node, ('esft', 'mix_general'))}: esft.mix_general: not found: {mix}"
            f"{relative_to(str(mix), path.resolve().parent)} (a text, or protocol)"
        )
    try:
        config = EsftConfig(**settings)
    except ValidationError as err:
        raise _located(err, node, path, ("esft",)) from err
    return {**config.model_dump(mode="json"), **selection, "data": section["data"]}


def _check_text_apart(data, key: tuple, eval_ppl: PplOptions, node, path: Path) -> None:
    """A training text (recover.data, esft.data, esft.mix_general) must not reach the tokens eval_ppl
    scores, the tail of the same text: of the BoolQ passages training holds out the protocol's
    tail; of any other text (a task file among them), nothing."""
    from moecarve.tune.data import PROTOCOL_TOKENS

    def text(value):
        protocol = resources.is_protocol_text(value)
        return "protocol" if protocol else str(_beside(path, value).resolve())

    if text(data) != text(eval_ppl.data):
        return
    where = f"{path}:{_line(node, key)}: {_dotted(key)}"
    scored = eval_ppl.windows * eval_ppl.length
    if text(data) != "protocol":
        raise RecipeError(f"{where}: the text eval_ppl scores: training would read its scored tail")
    if scored > PROTOCOL_TOKENS:
        raise RecipeError(
            f"{where}: eval_ppl scores the passages' last {scored} tokens, training holds out only "
            f"{PROTOCOL_TOKENS}: give {_dotted(key)} another text"
        )


def _check_carve_keys(section: dict, loc: tuple, node, path: Path, allow_name: bool = False) -> None:
    """Carve settings are CarveConfig fields plus `calib` (and `name` in a configuration)."""
    allowed = set(CarveConfig.model_fields) | {"calib"} | ({"name"} if allow_name else set())
    for key in section:
        if key not in allowed:
            raise RecipeError(
                f"{path}:{_line(node, (*loc, key))}: {_dotted((*loc, key))}: unknown carve setting "
                "(see CarveConfig in docs/carve.md)"
            )
    if "calib" in section:
        _check_text_source(section["calib"], (*loc, "calib"), node, path)


def _check_text_source(value, loc: tuple, node, path: Path) -> None:
    """A text setting (calib, eval_ppl.data) names a file or directory that exists relative to the
    recipe, or a hub dataset (a bare name): a path that is not there fails now, not after a carve."""
    from moecarve.carve.calib import looks_like_path

    where = f"{path}:{_line(node, loc)}: {_dotted(loc)}"
    if resources.is_protocol_text(value):
        return
    if not isinstance(value, str):
        raise RecipeError(f"{where}: a file, a directory or a hub dataset name, got {value!r}")
    local = _beside(path, value)
    # a name found from the working directory only would be read from there (as a hub name, it is
    # looked for there first): recipe paths are relative to the recipe
    if not local.exists() and (looks_like_path(value) or Path(value).expanduser().exists()):
        raise RecipeError(f"{where}: not found: {value}{relative_to(value, path.resolve().parent, why=True)}")


def relative_to(value: str, root: Path, why: bool = False) -> str:
    """How an error places a recipe path that is not there: a relative one by the directory it was
    looked for in (`why`: saying that recipe paths are relative to the recipe); an absolute one not."""
    if Path(value).expanduser().is_absolute():
        return ""
    note = f" (relative to {root})"
    return note + ": recipe paths are relative to the recipe, not to the working directory" if why else note


def _beside(recipe: Path, value: str) -> Path:
    """A path the recipe names: relative to the recipe file; to the file itself, not to a symlink
    to it, in these checks as in the run."""
    return recipe.resolve().parent / Path(value).expanduser()


def _dotted(loc: tuple) -> str:
    """A key's location as the error names it: configs[1].activ."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _located(err: ValidationError, node, path: Path, prefix: tuple) -> RecipeError:
    """The first validation error as `file:line: key.path: message`."""
    first = err.errors()[0]
    loc = (*prefix, *(part for part in first["loc"] if not str(part).startswith("function-")))
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "missing (required)"
    dotted = _dotted(loc) or "recipe"
    return RecipeError(f"{path}:{_line(node, loc)}: {dotted}: {message}")


def _line(node, loc) -> int:
    """1-based line of the deepest YAML node on `loc` (the key itself for mapping entries)."""
    line = node.start_mark.line
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == str(part):
                    line, child = key.start_mark.line, value
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
            line = child.start_mark.line
        if child is None:
            break
        node = child
    return line + 1


def _check_duplicate_keys(node, path: Path) -> None:
    """PyYAML keeps the last of two equal keys silently; a recipe refuses them."""
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key, value in node.value:
            if key.value in seen:
                raise RecipeError(f"{path}:{key.start_mark.line + 1}: {key.value}: duplicate key")
            seen.add(key.value)
            _check_duplicate_keys(value, path)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicate_keys(item, path)
