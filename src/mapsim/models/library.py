"""Models from libraries through ``python:``, built from a configuration (nothing downloaded).

Any library model can be compared through a ``python: package.module:factory`` of one's own
that returns the ``nn.Module``. For Hugging Face ``transformers`` mapsim ships the factory:

.. code-block:: yaml

    models:
      vit:
        python: mapsim.models.library:transformers_model
        kwargs: {model: ViTModel, config: {image_size: 64, patch_size: 8, num_channels: 1}}
        seed: 0
        tokens: auto

builds ``transformers.ViTModel(transformers.ViTConfig(image_size=64, ...))`` with the model's
seeded random initialisation; ``from_pretrained`` is never called, so nothing is fetched from
a hub. Configuration fields the model's config class does not know are refused (the config
classes would keep a misspelt field silently). ``options`` go to the model's constructor (e.g.
``add_pooling_layer: false``). The model is put in evaluation mode.

``transformers`` is optional: ``pip install "mapsim[hf]"`` (it is also in the ``test``
extra). The paths of a library's modules are the library's and may change between its
versions; ``mapsim layers`` lists them.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from torch import nn

from mapsim.errors import SpecError


def transformers_model(model: str, config: dict[str, Any] | None = None,
                       **options: Any) -> nn.Module:
    """A ``transformers`` model class ``model`` (e.g. ``ViTModel``, ``ConvNextModel``) built
    from its config class with the fields ``config``, randomly initialised, in eval mode.

    :raises SpecError: transformers is not installed, ``model`` is not one of its model
        classes, or ``config`` has fields that the model's config class does not know.
    """
    try:
        import transformers
    except ImportError as exc:
        raise SpecError(
            "python: mapsim.models.library:transformers_model needs the transformers package "
            f"({exc}); install it with pip install \"mapsim[hf]\" (or pip install transformers)"
        ) from None
    cls = getattr(transformers, str(model), None)
    config_class = getattr(cls, "config_class", None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module) and config_class is not None):
        names = [n for n in dir(transformers) if n.endswith("Model") and not n.startswith("TF")]
        close = difflib.get_close_matches(str(model), names, n=3)
        raise SpecError(
            f"kwargs.model {model!r} is not a model class of transformers "
            f"{transformers.__version__}"
            + (f"; did you mean {', '.join(close)}?" if close else "")
            + " Give a class name such as ViTModel or ConvNextModel"
        )
    fields = dict(config or {})
    known = set(config_class().to_dict())
    unknown = sorted(set(fields) - known)
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise SpecError(
            f"kwargs.config of {model} has field(s) that {config_class.__name__} does not know: "
            f"{', '.join(hints)}. Its fields are listed by "
            f"transformers.{config_class.__name__}().to_dict()"
        )
    module = cls(config_class(**fields), **options)
    return module.eval()
