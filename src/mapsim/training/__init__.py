"""Training and scoring segmentation networks: ``mapsim train`` and ``mapsim evaluate``.

- :mod:`~mapsim.spec.train_spec`: the training spec (pydantic), read from YAML, TOML or JSON;
- :mod:`~mapsim.training.data`: loading, splitting, cropping and augmenting labelled images;
- :mod:`~mapsim.training.checkpoint`: best and last checkpoints (safetensors + JSON), cards;
- :mod:`~mapsim.training.loop`: the training loop with validation, resume and the CSV log;
- :mod:`~mapsim.training.predict`: a model's vessel mask for one image;
- :mod:`~mapsim.training.evaluate`: per-image and mean scores and panels of a model.
"""

from mapsim.training.loop import TrainResult, train
from mapsim.spec.train_spec import TrainSpec, load_train_spec, validate_train_spec

__all__ = ["TrainResult", "TrainSpec", "load_train_spec", "train", "validate_train_spec"]
