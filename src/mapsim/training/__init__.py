"""Training and scoring segmentation networks: ``mapsim train`` and ``mapsim evaluate``.

- :mod:`~mapsim.spec.train_spec`: the training spec (pydantic), read from YAML, TOML or JSON;
- :mod:`~mapsim.training.data`: loading, splitting, cropping and augmenting labelled images;
- :mod:`~mapsim.training.checkpoint`: best and last checkpoints (safetensors + JSON), cards;
- :mod:`~mapsim.training.loop`: the training loop with validation, resume and the CSV log;
- :mod:`~mapsim.training.predict`: a model's vessel mask for one image;
- :mod:`~mapsim.training.evaluate`: per-image and mean scores and panels of a model.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainResult", "TrainSpec", "load_train_spec", "train", "validate_train_spec"]

#: imported on first use (torch is not loaded by ``mapsim --help``)
_LAZY = {"TrainResult": "mapsim.training.loop", "train": "mapsim.training.loop",
         "TrainSpec": "mapsim.spec.train_spec", "load_train_spec": "mapsim.spec.train_spec",
         "validate_train_spec": "mapsim.spec.train_spec"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mapsim.training' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
