"""Run specs: pydantic models built from the registry, read from YAML, TOML or JSON.

Every plugin choice in a spec (architecture, extractor, dataset, metric, aggregator) is a tagged
union keyed by ``name`` whose members are the registered plugins' ``Params`` models, so a
plugin's parameters are validated exactly like the core's. A bare string stands for
``{name: <string>}``; ``images`` also accepts a path or glob string (the ``files`` dataset).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    model_validator,
)

from mapsim.errors import SpecError, UnknownNameError, closest_matches
from mapsim.registry import Registry, load_registry
from mapsim.spec.documents import parse_document, read_document

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover
    pass

DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?|mps)$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
NAME_RULE = "must start with a letter or digit and use only letters, digits, '_', '.' and '-'"
#: plain-language explanations of the spec's patterns, used in error messages
PATTERN_HINTS = {
    DEVICE_PATTERN: "use auto, cpu, cuda, cuda:N or mps",
    NAME_PATTERN: NAME_RULE,
}


class StrictModel(BaseModel):
    """Base of the spec's own models: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid")


def _choice_validator(kind: str, registry: Registry, string_field: str | None = None):
    """Turn ``"name"`` into ``{"name": "name"}`` and explain unknown names."""
    known = registry.names(kind)

    def validate(value: Any) -> Any:
        if isinstance(value, str):
            if value in known or string_field is None:
                value = {"name": value}
            else:
                value = {"name": "files", string_field: value}
        if isinstance(value, BaseModel):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"expected a {kind} name or a mapping with 'name'")
        name = value.get("name")
        if name is None:
            raise ValueError(f"missing 'name': one of {', '.join(known)}")
        if name not in known:
            matches = closest_matches(str(name), known)
            near = f" Closest: {', '.join(matches)}." if matches else ""
            raise ValueError(
                f"unknown {kind} {name!r}.{near} Registered {kind}s: {', '.join(known) or '(none)'}"
                " (install a plugin to add one; see `mapsim plugins`)"
            )
        return value

    return validate


def _choice_type(kind: str, registry: Registry, labelled: bool = False,
                 string_field: str | None = None) -> Any:
    """The tagged union of every registered plugin of ``kind``."""
    members = []
    for entry in registry.entries(kind):
        fields: dict[str, Any] = {"name": (Literal[entry.name], ...)}
        if labelled:
            fields["label"] = (
                str | None,
                Field(None, pattern=NAME_PATTERN,
                      description="Name used in the tables (default: the plugin name)."),
            )
        model = create_model(
            f"{kind.capitalize()}_{entry.name.replace('-', '_')}",
            __base__=entry.cls.Params,
            __doc__=(entry.cls.__doc__ or "").strip().splitlines()[0] if entry.cls.__doc__ else None,
            **fields,
        )
        members.append(model)
    if not members:
        union: Any = dict
    elif len(members) == 1:
        union = members[0]
    else:
        union = Annotated[Union[tuple(members)], Field(discriminator="name")]  # noqa: UP007
    names = tuple(registry.names(kind))
    accepted: Any = union
    if names:
        shorthand: Any = Literal[names] if string_field is None else str
        accepted = Union[shorthand, union]  # noqa: UP007
    return Annotated[union, BeforeValidator(_choice_validator(kind, registry, string_field),
                                            json_schema_input_type=accepted)]


class RoiSpec(StrictModel):
    """Restrict the compared pixels to each image's label mask."""

    dilate: int = Field(0, ge=0, description="Dilate the mask by this many pixels (disk).")


def _align_shorthand(value: Any) -> Any:
    """``align: smaller`` / ``larger`` stand for ``{to: ...}``; ``align: [H, W]`` for
    ``{size: [H, W]}``."""
    if isinstance(value, str):
        return {"to": value}
    if isinstance(value, (list, tuple)):
        return {"size": list(value)}
    return value


class AlignSpec(StrictModel):
    """How maps of different spatial sizes are brought onto one grid for comparison."""

    to: Literal["smaller", "larger"] | None = Field(
        None, description="smaller: area average to the smallest height and width of the "
        "compared maps; larger: bilinear (or nearest) to the largest.")
    size: tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]] | None = Field(
        None, description="A given grid [height, width] instead of 'to'.")
    mode: Literal["area", "bilinear", "nearest"] | None = Field(
        None, description="The resampling (default: area for smaller, bilinear for larger; "
        "for size, area where a map shrinks in both directions, else bilinear).")

    @model_validator(mode="after")
    def _one_target(self) -> AlignSpec:
        if (self.to is None) == (self.size is None):
            raise ValueError("engine.align needs exactly one of 'to' (smaller or larger) and "
                             "'size' ([height, width]), e.g. align: smaller")
        return self


def _tokens_shorthand(value: Any) -> Any:
    """``tokens: auto`` or ``tokens: true`` stand for ``{}`` (grid and class tokens inferred)."""
    return {} if value is True or value == "auto" else value


class TokenSpec(StrictModel):
    """Read (1, L, D) outputs (transformer tokens) as D maps on the patch grid."""

    grid: tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]] | None = Field(
        None, description="The patch grid [rows, columns]; default: the largest square grid "
        "that leaves at most 8 leading (class/register) tokens.")
    drop: int | None = Field(
        None, ge=0, description="Leading class/register tokens to drop; default: L minus "
        "the grid's size.")


class EngineSpec(StrictModel):
    """How similarities are computed."""

    dead_maps: Literal["exclude", "original"] = Field(
        "exclude",
        description="exclude: dead maps are flagged and left out of maxima and statistics; "
        "original: the original library's rule (both dead -> 1.0, one dead -> 0.0).",
    )
    dead_std: float = Field(1e-10, ge=0, description="A map whose std is <= this is dead.")
    chunk_pixels: int | None = Field(
        None, gt=0, description="Pixels multiplied at a time (default: automatic)."
    )
    roi: RoiSpec | None = None
    align: Annotated[AlignSpec | None, BeforeValidator(_align_shorthand)] = Field(
        None, description="Resample maps of different spatial sizes onto one grid: smaller, "
        "larger, [H, W] or {to|size, mode}. Default: maps must share a size.",
    )
    pooled: bool = Field(
        False, description="Also compute the tables from moments pooled over all images."
    )
    block_images: int = Field(
        16, ge=1,
        description="Images per block: the unit that the processes of a torchrun job share "
        "out and that --resume skips once done. Results do not depend on it, except for "
        "rounding in the summaries and pooled tables.",
    )
    precision: Literal["exact", "tf32", "fp16", "bf16"] = Field(
        "tf32",
        description="The forward pass: exact (float32, TF32 off), tf32 (PyTorch's default for "
        "convolutions on CUDA; the same as exact on a CPU), fp16 or bf16 (autocast). The "
        "similarity step is equally exact in every mode.",
    )
    precision_probe: bool = Field(
        True,
        description="Measure on the first image what the precision costs: the largest |delta "
        "r| per layer against an exact forward pass (recorded in run.json).",
    )
    fuse_batchnorm: bool = Field(
        True,
        description="Fold batch norms into the convolutions before them for the run (models "
        "that offer it, such as fcn; never where a conv or bn output is captured): one pass "
        "over the maps less per module, values equal up to float32 rounding. false: run the "
        "network exactly as built.",
    )


class StatisticsSpec(StrictModel):
    """How sure the across-image summaries are."""

    confidence: float | None = Field(
        0.95, gt=0, lt=1,
        description="Level of the bootstrap confidence intervals over images in summary.csv "
        "and layer_similarity_summary.csv (ci_low, ci_high); null: no intervals.",
    )
    resamples: int = Field(9999, ge=100, le=1_000_000,
                           description="Bootstrap resamples per interval.")
    spatial_null: bool = Field(
        True, description="Compute the spatial null in the same run (partner maps circularly "
        "shifted): baselines.csv (chance levels) and map_pvalues.csv; false: off.")
    seed: int = Field(0, ge=0, description="Seed of the null's shifts (drawn per image "
                      "index, not per process) and of the random sign flips.")
    fdr: float = Field(0.05, gt=0, lt=1, description="False-discovery rate of the "
                       "Benjamini-Hochberg decision in map_pvalues.csv (significant: q < fdr).")
    flips: int = Field(4999, ge=99, le=1_000_000, description="Random sign flips per map "
                       "p-value when 2**images exceeds it (else all flips are enumerated).")
    untrained: int = Field(0, ge=0, le=1000, description="The untrained baseline: the "
                           "comparisons again on this many random initialisations of the same "
                           "architectures (built-in/pretrained models only); 0: off.")


#: the kinds of pictures a run can draw (``output.pictures``), and those drawn by default
PICTURE_KINDS = ("heatmaps", "image-heatmaps", "histograms", "matrices", "groups",
                 "inter-groups")
DEFAULT_PICTURES = ("heatmaps", "histograms", "matrices", "groups")


class OutputSpec(StrictModel):
    """Where and what to write."""

    dir: str | None = Field(None, description="Results directory (default: results/<name>).")
    pairs: bool | Literal["csv", "parquet"] = Field(
        False, description="Also write every map pair: true or csv (pairs.csv: every ordered "
        "pair, self pairs included; large), parquet (pairs.parquet: columnar, zstd-compressed, "
        "each unordered pair once within a network; needs pyarrow, pip install "
        "'mapsim[parquet]').")
    plots: bool = Field(False, description="Draw pictures under plots/ (keeps map thumbnails "
                        "and similarity matrices of the first plot_images images).")
    report: bool = Field(False, description="Write report.html, one self-contained page "
                         "(implies plots).")
    plot_images: int = Field(1, ge=1, description="Images whose thumbnails and matrices are kept "
                             "for plots and the report.")
    pictures: list[Literal[(*PICTURE_KINDS, "all")]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(DEFAULT_PICTURES),
        description="Which pictures plots/ holds: heatmaps (the means over images, and "
        "pooled), image-heatmaps (one set per image; the report shows them either way), "
        "histograms, matrices, groups (each layer with itself), inter-groups (each layer with "
        "its closest layer of another model), or all.")


def _pair(value: Any) -> Any:
    if isinstance(value, str) and "," in value:
        value = [part.strip() for part in value.split(",")]
    if isinstance(value, (list, tuple)) and len(value) != 2:
        raise ValueError(
            f"a comparison is a pair [model_a, model_b] (the same model twice for intra-network); "
            f"got {len(value)} name(s)"
        )
    return value


def _layer_choice(value: Any) -> Any:
    """One model's layers: a path or pattern, a non-empty list of them, or {label: path}."""
    ok = (
        (isinstance(value, str) and value)
        or (isinstance(value, list) and value and all(isinstance(v, str) and v for v in value))
        or (isinstance(value, dict) and value
            and all(isinstance(k, str) and isinstance(v, str) and v for k, v in value.items()))
    )
    if not ok:
        raise ValueError(
            "expected a layer path or pattern ('blocks.*'), a non-empty list of them, or a "
            "mapping {label: path}"
        )
    return value


@functools.lru_cache(maxsize=8)
def _spec_models(registry: Registry) -> type[BaseModel]:
    Architecture = _choice_type("architecture", registry)
    Extractor = _choice_type("extractor", registry)
    Images = _choice_type("dataset", registry, string_field="paths")
    Metric = _choice_type("metric", registry, labelled=True)
    Aggregator = _choice_type("aggregator", registry)

    class ModelSpec(StrictModel):
        """One network: an architecture, a python factory or a TorchScript file."""

        architecture: Architecture | None = None  # type: ignore[valid-type]
        python: str | None = Field(
            None, description="'package.module:factory' returning an nn.Module."
        )
        kwargs: dict[str, Any] = Field(default_factory=dict,
                                       description="Keyword arguments of the python factory.")
        torchscript: str | None = Field(None, description="Path of a TorchScript file.")
        weights: str | None = Field(
            None,
            description="A .safetensors file, a state_dict file (loaded with weights_only=True) "
            "or pretrained:NAME. Default: seeded random initialisation.",
        )
        seed: int = Field(0, description="Seed of the random initialisation without weights.")
        in_channels: int | None = Field(
            None, ge=1, description="Input channels (default: the architecture's, else 1)."
        )
        extractor: Extractor = Field("hooks", validate_default=True)  # type: ignore[valid-type]
        tokens: Annotated[TokenSpec | None, BeforeValidator(_tokens_shorthand)] = Field(
            None, description="Read 3-D (1, L, D) layer outputs (transformer tokens) as D maps "
            "on the patch grid: auto, or {grid: [rows, cols], drop: N}.")

        @model_validator(mode="after")
        def _one_source(self) -> ModelSpec:
            given = [k for k in ("architecture", "python", "torchscript") if getattr(self, k)]
            if len(given) != 1:
                raise ValueError(
                    "give exactly one of 'architecture', 'python' or 'torchscript'"
                    + (f" (got {', '.join(given)})" if given else "")
                )
            if self.kwargs and not self.python:
                raise ValueError("'kwargs' is only used with 'python'")
            if self.torchscript and self.weights:
                raise ValueError("a TorchScript file carries its weights; drop 'weights'")
            return self

    LayerList = Annotated[list[str] | str | dict[str, str], BeforeValidator(_layer_choice)]

    class RunSpec(StrictModel):
        """A mapsim run: models, their layers, images, comparisons, metrics and aggregators."""

        name: str = Field("mapsim-run", pattern=NAME_PATTERN)
        models: dict[str, ModelSpec] = Field(min_length=1)
        layers: dict[str, LayerList] = Field(  # type: ignore[valid-type]
            description="Per model: layer paths or shell-style patterns (a list or one string), "
            "or a mapping {label: path} to name layers in the tables."
        )
        images: Images  # type: ignore[valid-type]
        comparisons: list[Annotated[tuple[str, str], BeforeValidator(
            _pair, json_schema_input_type=tuple[str, str] | str)]] | None = Field(
            None, description="Pairs [model_a, model_b]; default: each model with itself."
        )
        metrics: list[Metric] = Field(  # type: ignore[valid-type]
            default_factory=lambda: ["pearson"], min_length=1, validate_default=True
        )
        aggregators: list[Aggregator] = Field(  # type: ignore[valid-type]
            default_factory=lambda: ["max", "threshold", "pivot"], validate_default=True
        )
        engine: EngineSpec = Field(default_factory=EngineSpec)
        statistics: StatisticsSpec = Field(default_factory=StatisticsSpec)
        output: OutputSpec = Field(default_factory=OutputSpec)
        device: str = Field("auto", pattern=DEVICE_PATTERN)

        @model_validator(mode="after")
        def _consistent(self) -> RunSpec:
            models = list(self.models)
            for name in models:
                if not _valid_name(name):
                    raise ValueError(f"models: the name {name!r} {NAME_RULE}")
            for name in self.layers:
                if name not in self.models:
                    raise ValueError(_unknown_model("layers", name, models))
            for pair in self.pairs():
                for name in pair:
                    if name not in self.models:
                        raise ValueError(_unknown_model("comparisons", name, models))
                    if name not in self.layers:
                        raise ValueError(
                            f"layers: model {name!r} is compared but has no entry in 'layers'; "
                            f"add e.g. '{name}: [...]' with the layers to compare"
                        )
            labels = [m.label or m.name for m in self.metrics]
            duplicates = sorted({x for x in labels if labels.count(x) > 1})
            if duplicates:
                raise ValueError(
                    f"metrics: {duplicates[0]!r} is listed twice; give each a distinct 'label'"
                )
            aggs = [a.name for a in self.aggregators]
            if len(set(aggs)) != len(aggs):
                raise ValueError("aggregators: each aggregator may be listed once")
            return self

        def pairs(self) -> list[tuple[str, str]]:
            """The comparisons, defaulting to each model with itself.

            [a, b] and [b, a] are one comparison (both directions are always reported).
            """
            if self.comparisons is None:
                return [(m, m) for m in self.models]
            unique: dict[frozenset[str], tuple[str, str]] = {}
            for a, b in self.comparisons:
                unique.setdefault(frozenset((a, b)), (a, b))
            return list(unique.values())

        def digest(self) -> str:
            """sha256 of the canonical JSON of the validated spec."""
            text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
            return hashlib.sha256(text.encode()).hexdigest()

    return RunSpec


def _valid_name(name: str) -> bool:
    return re.match(NAME_PATTERN, name) is not None


def _unknown_model(where: str, name: str, models: list[str]) -> str:
    matches = closest_matches(name, models)
    near = f" Closest: {', '.join(matches)}." if matches else ""
    return f"{where}: the model {name!r} is not in 'models' ({', '.join(models)}).{near}"


def spec_model(registry: Registry | None = None) -> type[BaseModel]:
    """The ``RunSpec`` pydantic model for the plugins in ``registry`` (default: installed)."""
    return _spec_models(registry or load_registry())


def json_schema(registry: Registry | None = None) -> dict[str, Any]:
    """The JSON Schema of run specs."""
    return spec_model(registry).model_json_schema()


def format_validation_error(error: ValidationError, source: str, data: Any = None) -> str:
    """One line per problem: the field's path, what was wrong, what was given.

    ``data`` (the validated input) lets the path leave out the tags pydantic inserts for
    tagged unions (``aggregators.0.threshold.value`` -> ``aggregators.0.value``).
    """
    lines = [f"{source}: the spec is not valid ({error.error_count()} problem(s)):"]
    for item in error.errors(include_url=False):
        loc = ".".join(str(p) for p in _visible_loc(item["loc"], data))
        message = _message(item, loc)
        given = item.get("input")
        shown = "" if isinstance(given, (dict, list)) or given is None else f" (got {given!r})"
        if shown and repr(given) in message:  # the message already quotes it
            shown = ""
        lines.append(f"  {loc}: {message}{shown}" if loc else f"  {message}{shown}")
    return "\n".join(lines)


def _message(item: dict[str, Any], loc: str) -> str:
    """pydantic's message, reworded where its wording would puzzle a user."""
    kind = item["type"]
    if kind == "extra_forbidden":
        field = loc.rsplit(".", 1)[-1]
        if "." not in loc:
            top = list(spec_model().model_fields)
            matches = closest_matches(field, top)
            near = f"did you mean {matches[0]!r}? " if matches else ""
            return f"unknown field; {near}the fields of a spec are: {', '.join(top)}"
        return "unknown field; check its spelling (`mapsim schema` lists every allowed field)"
    if kind == "string_pattern_mismatch":
        hint = PATTERN_HINTS.get(item.get("ctx", {}).get("pattern"))
        if hint:
            return hint
    return item["msg"].removeprefix("Value error, ")


def _visible_loc(loc: tuple[Any, ...], data: Any) -> list[Any]:
    """``loc`` without union tags: parts that name no key of the input but its plugin name."""
    if data is None:  # no input to compare with: hide what looks like a generated model name
        return [p for p in loc if not _is_union_tag(p)]
    shown: list[Any] = []
    current: Any = data
    for part in loc:
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            current = current[part]
        elif isinstance(current, dict) and current.get("name") == part:
            continue  # the tag of the chosen union member
        elif isinstance(current, str) and part in (current, "files"):
            current = None  # the tag of a string shorthand: the plugin name, or 'files'
            continue
        else:
            current = None
        shown.append(part)
    return shown


def _is_union_tag(part: Any) -> bool:
    # left-to-right unions put the member's class name (Kind_name) into the error path
    return isinstance(part, str) and part[:1].isupper() and "_" in part


def validate_spec(data: dict[str, Any], source: str = "<spec>",
                  registry: Registry | None = None) -> BaseModel:
    """Validate a mapping as a run spec; errors become a :class:`SpecError` with field paths."""
    try:
        return spec_model(registry).model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, source, data)) from None


def load_spec(path: str | Path, registry: Registry | None = None) -> BaseModel:
    """Read and validate the run spec in ``path``."""
    return validate_spec(read_document(path), str(path), registry)


def read_model_spec(arg: str, model: str | None = None, *, registry: Registry | None = None,
                    base_dir: Path | None = None) -> tuple[str, Any, Path]:
    """Read a MODEL_SPEC argument: a run spec file (its model ``model``, default the first), a
    model spec file, or inline YAML/JSON such as ``'{architecture: {name: fcn, depth: 6}}'``.

    Returns ``(name, validated model spec, base directory)``; the base is the file's folder,
    else ``base_dir`` (default: the current directory). The name is ``model``, the run spec's
    key, or ``"model"``.
    """
    path = Path(arg)
    if path.suffix.lower() in (".yaml", ".yml", ".json", ".toml") and path.exists():
        data, base = read_document(path), path.resolve().parent
    else:
        data, base = parse_document(arg, "yaml", "MODEL_SPEC"), base_dir or Path.cwd()
    name = model
    if "models" in data:  # a whole run spec
        models = data["models"]
        if not isinstance(models, dict) or not models:
            raise SpecError(f"{arg}: 'models' must be a non-empty mapping")
        name = model or next(iter(models))
        if name not in models:
            raise UnknownNameError("model", name, models)
        data = models[name]
    model_spec = spec_model(registry).model_fields["models"].annotation.__args__[1]
    try:
        return name or "model", model_spec.model_validate(data), base
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, arg, data)) from None
