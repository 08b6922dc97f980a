"""Prune specs: what ``mapsim prune SPEC`` reads (YAML, TOML or JSON).

Example::

    name: prune-demo
    model: {architecture: {name: fcn, depth: 3, width: 8}, weights: best.safetensors}
    layers: [blocks.0, blocks.2]     # default: every layer whose maps another layer reads
    criteria: [correlation, correlation-compensated, l1, bn-gamma, random, hrank]
    sparsity: [0.25, 0.5]
    calibration: {name: synthetic-vessels, count: 4, size: [24, 24], seed: 1}
    evaluation: {name: synthetic-vessels, count: 4, size: [24, 24], seed: 2}
    finetune: {epochs: 1, data: {name: synthetic-vessels, count: 8, size: [24, 24]}}
    seeds: [0, 1, 2]
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from mapsim.errors import SpecError
from mapsim.registry import Registry, load_registry
from mapsim.spec.run_spec import (
    NAME_PATTERN,
    StrictModel,
    _choice_type,
    read_document,
)
from mapsim.spec.train_spec import NORMALISATIONS, train_spec_model
from mapsim.spec.validation import validate_document


@functools.lru_cache(maxsize=8)
def _prune_spec_model(registry: Registry) -> type[BaseModel]:
    Criterion = _choice_type("prune_criterion", registry)
    Dataset = _choice_type("dataset", registry, string_field="paths")
    ModelSpec = train_spec_model(registry).model_fields["model"].annotation

    class FinetuneSpec(StrictModel):
        """Training after pruning (cross-entropy, SGD with momentum 0.9, whole images)."""

        epochs: int = Field(0, ge=0, description="Epochs of fine-tuning (0: none).")
        data: Dataset | None = Field(  # type: ignore[valid-type]
            None, description="Labelled training images (required when epochs > 0).")
        lr: float = Field(0.01, gt=0, description="Learning rate.")
        batch_size: int = Field(1, ge=1, description="Images per step.")

    class PruneSpec(StrictModel):
        """Prune a network with several criteria at several sparsities and score it."""

        name: str = Field("mapsim-prune", pattern=NAME_PATTERN)
        model: ModelSpec  # type: ignore[valid-type]
        layers: list[str] | None = Field(
            None, description="Module paths of the layers to prune (fcn: blocks.N; unet: "
            "encoder.0.1, decoder.1, ...); default: every layer whose maps another layer "
            "reads.")
        per_layer: bool = Field(
            False, description="Prune each layer alone (a row per layer) instead of all of "
            "them together.")
        criteria: list[Criterion] = Field(  # type: ignore[valid-type]
            min_length=1, description="Criteria to compare (registered prune criteria).")
        sparsity: list[float] = Field(
            default_factory=lambda: [0.25, 0.5],
            description="Fractions of each layer's maps to remove, each in [0, 1).")
        threshold: bool = Field(
            False, description="Also prune with the criteria that have a threshold "
            "(correlation) at their threshold, without a sparsity.")
        calibration: Dataset = Field(  # type: ignore[valid-type]
            description="Images whose maps give the statistics (moments, ranks).")
        evaluation: Dataset = Field(  # type: ignore[valid-type]
            description="Labelled images scored before and after fine-tuning.")
        finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
        normalise: str = Field("zscore", description=f"One of {', '.join(NORMALISATIONS)}.")
        seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
        tolerance: float = Field(
            0.01, ge=0, description="IoU drop prune_answer.csv accepts (the study's 0.01).")
        save_models: bool = Field(
            False, description="Save every pruned (and fine-tuned) model as safetensors + "
            "card under models/.")
        device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N.")
        backend: Literal["auto", "torch-pruning", "chain"] = Field(
            "auto", description="Channel removal: Torch-Pruning's dependency graph (any "
            "traceable model; pip install 'mapsim[prune]'), the fcn chain without it, or "
            "auto (Torch-Pruning when installed).")

        @field_validator("sparsity")
        @classmethod
        def _in_range(cls, values: list[float]) -> list[float]:
            bad = [v for v in values if not 0 <= v < 1]
            if bad:
                raise ValueError(f"sparsity {bad} outside [0, 1): give fractions of the maps "
                                 "of each layer, e.g. [0.25, 0.5]")
            return values

        @field_validator("normalise")
        @classmethod
        def _norm(cls, value: str) -> str:
            if value not in NORMALISATIONS:
                raise ValueError(f"normalise must be one of {', '.join(NORMALISATIONS)}")
            return value

    return PruneSpec


def prune_spec_model(registry: Registry | None = None) -> type[BaseModel]:
    """The ``PruneSpec`` pydantic model for the installed plugins."""
    return _prune_spec_model(registry or load_registry())


def validate_prune_spec(data: dict[str, Any], source: str = "<prune spec>",
                        registry: Registry | None = None) -> Any:
    """Validate a mapping as a prune spec.

    :raises SpecError: one line per problem, each naming the field's path.
    """
    try:
        spec = validate_document(prune_spec_model(registry), data, source, "prune")
    except SpecError as exc:
        raise SpecError(str(exc).replace("`mapsim schema`", "`mapsim schema --kind prune`")) \
            from None
    if spec.finetune.epochs and spec.finetune.data is None:
        raise SpecError(f"{source}: finetune.data is required when finetune.epochs > 0")
    return spec


def load_prune_spec(path: str | Path, registry: Registry | None = None) -> Any:
    """Read and validate the prune spec in ``path`` (.yaml, .yml, .toml or .json)."""
    return validate_prune_spec(read_document(path), str(path), registry)


def prune_json_schema(registry: Registry | None = None) -> dict[str, Any]:
    """The JSON Schema of prune specs (``mapsim schema --kind prune``)."""
    return prune_spec_model(registry).model_json_schema()


#: fields only a prune spec has: a document with one of them (and no ``models``) is one
PRUNE_FIELDS = {"criteria", "calibration", "sparsity", "per_layer", "finetune", "evaluation"}


def spec_kind(path: str | Path) -> str:
    """``prune`` for a document with a field of :data:`PRUNE_FIELDS` and no ``models``, else
    ``run``; a file that cannot be read is left to the run spec's reader to report."""
    try:
        data = read_document(path)
    except Exception:
        return "run"
    if isinstance(data, dict) and "models" not in data and PRUNE_FIELDS & set(data):
        return "prune"
    return "run"
