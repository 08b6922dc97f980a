"""Rebuilding a pruned network: the channel widths its card records, applied to the model.

``mapsim prune`` saves a pruned model as a plain state dict (safetensors) and a card whose
``pruned.widths`` lists, for every convolution, transposed convolution, linear layer and
batch norm that lost channels, the attributes that size it (``in_channels``,
``out_channels``, ``groups``; ``in_features``, ``out_features``; ``num_features``). Loading
builds the model the card names (its unpruned architecture or python factory), sets those
attributes and gives the modules' parameters and buffers the shapes of the saved tensors, then
loads the weights strictly. Nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mapsim.errors import WeightsError

#: the metadata key of the card inside a mapsim safetensors file
META_KEY = "mapsim"
_ATTRIBUTES = {
    "Conv2d": ("in_channels", "out_channels", "groups"),
    "ConvTranspose2d": ("in_channels", "out_channels", "groups"),
    "Linear": ("in_features", "out_features"),
    "BatchNorm2d": ("num_features",),
}
_TYPES = {"Conv2d": nn.Conv2d, "ConvTranspose2d": nn.ConvTranspose2d, "Linear": nn.Linear,
          "BatchNorm2d": nn.BatchNorm2d}


def weights_card(path: str | Path) -> dict[str, Any] | None:
    """The card of a weights file: ``NAME.json`` beside it, else the JSON in a safetensors
    file's ``mapsim`` metadata; None when there is neither (or it cannot be read)."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    try:
        if sidecar.is_file():
            card = json.loads(sidecar.read_text(encoding="utf-8"))
            return card if isinstance(card, dict) else None
        if path.suffix.lower() == ".safetensors" and path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                text = (handle.metadata() or {}).get(META_KEY)
            card = json.loads(text) if text else None
            return card if isinstance(card, dict) else None
    except (OSError, ValueError):
        return None
    except Exception:  # safetensors' own error type: unreadable files are reported on load
        return None
    return None


def pruned_widths(card: dict[str, Any] | None) -> dict[str, dict[str, Any]] | None:
    """The ``pruned.widths`` of a card (None for a card of an unpruned model)."""
    pruned = (card or {}).get("pruned")
    if not isinstance(pruned, dict) or not isinstance(pruned.get("widths"), dict):
        return None
    return pruned["widths"]


@torch.no_grad()
def apply_widths(model: nn.Module, widths: dict[str, dict[str, Any]],
                 state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Resize the modules named in ``widths`` to the pruned model's, in place; their tensors
    take the shapes of ``state``'s (loaded next, strictly).

    :raises WeightsError: a module the model lacks or of another type (the weights were pruned
        from another network).
    """
    for name, attrs in widths.items():
        kind = attrs.get("type")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if kind not in _TYPES or not isinstance(module, _TYPES[kind]):
            found = "no such module" if module is None else f"a {type(module).__name__}"
            raise WeightsError(
                f"the pruned weights {str(path)!r} resize {name!r} (a {kind}), but the model "
                f"has {found} there: build the network the card names (its 'model': the "
                "architecture and parameters it was pruned from).")
        for attr in _ATTRIBUTES[kind]:
            value = attrs[attr]
            current = getattr(module, attr)
            setattr(module, attr, type(current)(value) if not isinstance(current, tuple)
                    else value)
        for pname, tensor in list(module.named_parameters(recurse=False)):
            key = f"{name}.{pname}"
            if key in state:
                setattr(module, pname, nn.Parameter(torch.empty_like(state[key], device="cpu"),
                                                    requires_grad=tensor.requires_grad))
        for bname, buffer in list(module.named_buffers(recurse=False)):
            key = f"{name}.{bname}"
            if key in state and buffer is not None:
                setattr(module, bname, torch.empty_like(state[key], device="cpu"))


__all__ = ["apply_widths", "pruned_widths", "weights_card"]
