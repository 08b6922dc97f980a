"""The forward pass's precision: a policy the user chooses, and a probe of what it costs.

``engine.precision`` picks how the networks run (the similarity step is the same in every
mode: centred float32 chunks, TF32 off, accumulated in float64):

* ``exact``: float32, TF32 off for the convolutions (float32 matrix products never use TF32
  in PyTorch's default settings, which mapsim keeps);
* ``tf32`` (default): convolutions in TF32 on GPUs that have it (Ampere and later), which is
  PyTorch's own default. On a CPU it is the same as ``exact``;
* ``fp16`` / ``bf16``: autocast to half precision / bfloat16 (on CUDA; bf16 also on the CPU;
  ``fp16`` on a CPU is slow and warned about, see :func:`check_precision`).

The similarity step always works on float32 values (half-precision maps are widened where
they are written into the moments). The probe runs the first image once more with the
``exact`` forward pass and records, per captured layer, the largest |delta r| between the two
passes over the Pearson correlations of the layer's maps with each other: what the policy
costs in the numbers a run reports, measured on the run's own data and networks. The probe is
queued (:func:`largest_differences`) and read (:meth:`PendingProbe.read`) apart: on a GPU the
device computes it while the host publishes the run's tables; one pass's maps are reduced to
their correlations before the other pass runs, so it holds one set of maps at a time.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from mapsim.engine.moments import compute_moments
from mapsim.errors import MapsimWarning

PRECISIONS = ("exact", "tf32", "fp16", "bf16")
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


@contextlib.contextmanager
def forward_precision(policy: str, device: torch.device) -> Iterator[None]:
    """Run the networks' forward passes inside this for ``policy`` on ``device``.

    Only the convolutions' TF32 switch is set (``exact``: off, ``tf32``: on); float32 matrix
    products keep PyTorch's default (no TF32), and the similarity step sets its own.
    """
    saved = _conv_tf32()
    _set_conv_tf32(policy == "tf32")
    try:
        if policy in _AUTOCAST:
            with torch.autocast(device.type, dtype=_AUTOCAST[policy]):
                yield
        else:
            yield
    finally:
        _set_conv_tf32(saved)


def _conv_tf32() -> bool:
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        return conv.fp32_precision == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


def _set_conv_tf32(on: bool) -> None:
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        conv.fp32_precision = "tf32" if on else "ieee"
    else:  # pragma: no cover - older torch
        torch.backends.cudnn.allow_tf32 = on


def check_precision(policy: str, device: torch.device) -> None:
    """Warn about ``fp16`` on a CPU: PyTorch runs float16 convolutions there without fast
    kernels (a 7x7 convolution of 64 maps took 260x as long as in float32 on a 2-core Xeon),
    so a spec written for a GPU would seem to hang."""
    if policy == "fp16" and device.type == "cpu":
        warnings.warn(
            "engine.precision 'fp16' on the CPU: float16 convolutions have no fast CPU "
            "kernels and can take hundreds of times as long as float32. Use 'exact' (or "
            "'tf32', the same on a CPU) or 'bf16', or run on a GPU (device: cuda).",
            MapsimWarning, stacklevel=3)


def differs_from_exact(policy: str, device: torch.device) -> bool:
    """Whether ``policy`` can give other numbers than ``exact`` on ``device``."""
    return policy in _AUTOCAST or (policy == "tf32" and device.type == "cuda")


def correlations(maps: torch.Tensor) -> torch.Tensor:
    """Pearson r (float64) between the maps (C, H, W) of one layer, NaN for dead maps, by
    the engine's own moments."""
    moments = compute_moments(maps.reshape(maps.shape[0], -1).float())
    g = moments.comoment
    d = torch.sqrt(torch.diagonal(g))
    denom = torch.outer(d, d)
    return torch.where(denom > 0, g / torch.where(denom > 0, denom, 1.0), torch.nan)


def layer_correlations(maps: Mapping[str, Mapping[str, torch.Tensor]]
                       ) -> dict[str, dict[str, torch.Tensor]]:
    """``{model: {layer: r}}``: :func:`correlations` of each captured layer of one pass."""
    return {model: {layer: correlations(m) for layer, m in layers.items()}
            for model, layers in maps.items()}


def largest_differences(policy_r: Mapping[str, Mapping[str, torch.Tensor]],
                        exact_r: Mapping[str, Mapping[str, torch.Tensor]]
                        ) -> dict[str, dict[str, torch.Tensor]]:
    """``{model: {layer: largest |delta r|}}`` between two passes' correlations of one image,
    as 0-d tensors on their device (nothing waits for the device); pairs with a dead map in
    either pass are left out, and a layer with no such pair gives 0."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for model, layers in exact_r.items():
        out[model] = {}
        for layer, exact in layers.items():
            delta = (policy_r[model][layer] - exact).abs()
            out[model][layer] = torch.where(torch.isfinite(delta), delta, 0.0).amax()
    return out


@dataclass
class PendingProbe:
    """A precision probe queued on the device: :meth:`read` waits for it and gives what
    ``run.json`` records as ``precision.forward_probe``."""

    #: the probed image's id (None when the probe did not run)
    image: str | None = None
    #: ``{model: {layer: largest |delta r|}}``, 0-d tensors on the device
    largest: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    #: why the probe did not run, or what stopped it
    note: dict[str, str] = field(default_factory=dict)

    def read(self) -> dict[str, Any]:
        """``{"image", "max_abs_delta_r": {model: {layer: float}}}``, or the note."""
        if self.image is None or self.note:
            return {**({} if self.image is None else {"image": self.image}), **self.note}
        keys = [(m, layer) for m, layers in self.largest.items() for layer in layers]
        values = (torch.stack([self.largest[m][layer] for m, layer in keys]).tolist()
                  if keys else [])
        out: dict[str, dict[str, float]] = {m: {} for m in self.largest}
        for (model, layer), value in zip(keys, values):
            out[model][layer] = float(value)
        return {"image": self.image, "max_abs_delta_r": out}
