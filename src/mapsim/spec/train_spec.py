"""Training specs: what ``mapsim train SPEC`` reads (YAML, TOML or JSON, like run specs).

A training spec names a model (an architecture plugin or a python factory), a labelled data
set (any dataset plugin whose images carry labels, e.g. ``synthetic-vessels`` or ``folder``),
and the protocol: split, normalisation, augmentation, optimiser, epochs, batch size, crops,
seed, device and mixed precision. The model and data entries are the registry's tagged unions,
so a plugin's parameters are validated exactly as in a run spec, and errors name the field path.

Example::

    name: cnn6
    model: {architecture: {name: fcn, depth: 6, width: 64, kernel_size: 7}}
    data: {name: synthetic-vessels, count: 400, size: [256, 256], seed: 1}
    epochs: 60
    batch_size: 8
    optimizer: {name: sgd, lr: 0.01, momentum: 0.9}
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, Field, model_validator

from mapsim.registry import Registry, load_registry
from mapsim.spec.run_spec import (
    DEVICE_PATTERN,
    NAME_PATTERN,
    StrictModel,
    _choice_type,
    read_document,
)
from mapsim.spec.validation import validate_document

#: normalisations applied to every image (after the data set's own)
NORMALISATIONS = ("zscore", "minmax", "none")

#: fields that may change between a run and its resumption (they do not change the result of
#: the epochs already done)
RESUMABLE_CHANGES = ("epochs", "device", "output")


def _crop(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value, value]
    return value


class SplitSpec(StrictModel):
    """How the labelled images are split into training and validation images."""

    validation_fraction: float = Field(
        0.2, gt=0, lt=1,
        description="Share of the images kept for validation (the study: 0.2, i.e. 80/20).",
    )
    seed: int = Field(0, ge=0, description="Seed of the fixed random split.")


class AugmentSpec(StrictModel):
    """Random geometric augmentation of the training crops (off by default, as in the study)."""

    flips: bool = Field(False, description="Random horizontal and vertical flips.")
    rot90: bool = Field(False, description="Random rotations by 0, 90, 180 or 270 degrees.")


class OptimizerSpec(StrictModel):
    """The optimiser and its learning rate (constant, as in the study)."""

    name: Literal["sgd", "adam", "adamw"] = Field(
        "sgd", description="sgd (with momentum), adam or adamw."
    )
    lr: float = Field(0.01, gt=0, description="Learning rate (the study: 0.01).")
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum of sgd (ignored otherwise).")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay.")


class TrainOutputSpec(StrictModel):
    """Where the checkpoints, cards and log go."""

    dir: str | None = Field(
        None, description="Output folder (default: runs/<name>, relative to the spec's folder)."
    )


@functools.lru_cache(maxsize=8)
def _train_spec_model(registry: Registry) -> type[BaseModel]:
    Architecture = _choice_type("architecture", registry)
    Dataset = _choice_type("dataset", registry, string_field="paths")

    class TrainModelSpec(StrictModel):
        """The network to train: an architecture or a python factory, optionally with
        starting weights."""

        architecture: Architecture | None = None  # type: ignore[valid-type]
        python: str | None = Field(
            None, description="'package.module:factory' returning an nn.Module."
        )
        kwargs: dict[str, Any] = Field(default_factory=dict,
                                       description="Keyword arguments of the python factory.")
        weights: str | None = Field(
            None, description="Starting weights (a file or pretrained:NAME); default: a "
            "random initialisation from the spec's seed.",
        )

        @model_validator(mode="after")
        def _one_source(self) -> TrainModelSpec:
            given = [k for k in ("architecture", "python") if getattr(self, k)]
            if len(given) != 1:
                raise ValueError(
                    "give exactly one of 'architecture' or 'python'"
                    + (f" (got {', '.join(given)})" if given else "")
                )
            if self.kwargs and not self.python:
                raise ValueError("'kwargs' is only used with 'python'")
            return self

    Crop = Annotated[tuple[int, int] | None, BeforeValidator(_crop)]

    class TrainSpec(StrictModel):
        """A training run of a segmentation network (two output maps: background, vessel)."""

        name: str = Field("mapsim-train", pattern=NAME_PATTERN)
        model: TrainModelSpec
        data: Dataset = Field(  # type: ignore[valid-type]
            description="The labelled images; split into training and validation images "
            "unless 'validation' is given."
        )
        validation: Dataset | None = Field(  # type: ignore[valid-type]
            None, description="Separate validation images (then 'data' is used whole for "
            "training and 'split' is ignored).",
        )
        split: SplitSpec = Field(default_factory=SplitSpec)
        normalise: Literal["zscore", "minmax", "none"] = Field(
            "zscore", description="Per-image intensity normalisation applied to every image "
            "(also recorded in the checkpoint card, so evaluation uses the same).",
        )
        augment: AugmentSpec = Field(default_factory=AugmentSpec)
        crop: Crop = Field(  # type: ignore[valid-type]
            None, description="Train on random crops of this size (one number or [height, "
            "width]); default: whole images. Validation always uses whole images.",
        )
        epochs: int = Field(250, ge=1, description="Epochs (the study: 250).")
        batch_size: int = Field(1, ge=1, description="Images (or crops) per step.")
        optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
        loss: Literal["cross-entropy"] = Field(
            "cross-entropy", description="Pixel-wise cross-entropy on the two output maps."
        )
        seed: int = Field(0, ge=0, description="Seed of the initialisation, shuffling, crops "
                          "and augmentation.")
        device: str = Field("auto", pattern=DEVICE_PATTERN)
        amp: bool = Field(False, description="bfloat16 mixed precision on CUDA (ignored on CPU).")
        deterministic: bool = Field(
            True, description="Deterministic cuDNN algorithms on CUDA (CPU runs always are)."
        )
        output: TrainOutputSpec = Field(default_factory=TrainOutputSpec)

        @model_validator(mode="after")
        def _crop_positive(self) -> TrainSpec:
            if self.crop is not None and min(self.crop) < 1:
                raise ValueError(f"crop: sizes must be >= 1 (got {list(self.crop)})")
            return self

        def digest(self, ignore: tuple[str, ...] = ()) -> str:
            """sha256 of the canonical JSON of the spec, without the fields in ``ignore``."""
            data = self.model_dump(mode="json", exclude=set(ignore))
            text = json.dumps(data, sort_keys=True)
            return hashlib.sha256(text.encode()).hexdigest()

    return TrainSpec


def train_spec_model(registry: Registry | None = None) -> type[BaseModel]:
    """The ``TrainSpec`` pydantic model for the plugins in ``registry`` (default: installed)."""
    return _train_spec_model(registry or load_registry())


def validate_train_spec(data: dict[str, Any], source: str = "<training spec>",
                        registry: Registry | None = None) -> TrainSpec:
    """Validate a mapping as a training spec.

    :raises SpecError: one line per problem, each naming the field's path.
    """
    return validate_document(train_spec_model(registry), data, source, "training")


def load_train_spec(path: str | Path, registry: Registry | None = None) -> TrainSpec:
    """Read and validate the training spec in ``path`` (.yaml, .yml, .toml or .json)."""
    return validate_train_spec(read_document(path), str(path), registry)


#: the type of a validated training spec (built from the registry at run time)
TrainSpec = BaseModel
