"""Exceptions raised by mapsim.

Every error a user can cause derives from :class:`MapsimError`; the command line prints its
message (no traceback) and exits with status 2. Messages name the offending thing and say how
to fix it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MapsimError(Exception):
    """Base class of every error mapsim reports to a user."""


def closest_matches(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Return up to ``n`` candidates that look like ``name`` (best first)."""
    candidates = list(candidates)
    matches = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not matches:
        lowered = name.lower()
        matches = [c for c in candidates if lowered in c.lower() or c.lower() in lowered][:n]
    return matches


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (a library's message can run to many lines), or
    its type's name when it has none: what mapsim quotes inside its own messages."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class UnknownNameError(MapsimError, KeyError):
    """A name (plugin, layer, model, ...) that is not registered or does not exist."""

    #: list the known names in the order given (True) or sorted (False)
    keep_order = False

    def __init__(self, kind: str, name: str, known: Iterable[str], hint: str = "") -> None:
        self.kind = kind
        self.name = name
        self.known = list(known) if self.keep_order else sorted(known)
        self.matches = closest_matches(name, self.known)
        lines = [f"unknown {kind} {name!r}."]
        if hint:
            lines.append(hint)
        if self.matches:
            lines.append(f"Closest matches: {', '.join(self.matches)}.")
        listing = ", ".join(self.known) if self.known else "(none)"
        if len(self.known) > 60:
            listing = ", ".join(self.known[:60]) + f", ... ({len(self.known)} in all)"
        lines.append(f"Known {kind}s: {listing}.")
        self.message = " ".join(lines)
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would add quotes around the message
        return self.message


class DuplicatePluginError(MapsimError):
    """Two plugins registered the same name for the same kind."""


class PluginLoadError(MapsimError):
    """A plugin's entry point could not be imported or broke while registering."""


class SpecError(MapsimError):
    """A run spec that cannot be read or does not validate."""


class ModelError(MapsimError):
    """A model that cannot be built or loaded."""


class WeightsError(ModelError):
    """A weights file that cannot be read or does not fit the model."""


class LayerNotFoundError(UnknownNameError):
    """A layer name or pattern that matches no module of the model (layers listed in model order)."""

    keep_order = True


class ImageError(MapsimError):
    """An image or label file that cannot be used."""


class ShapeMismatchError(MapsimError):
    """Maps that must share a spatial size do not."""


class ExtractionError(MapsimError):
    """The forward pass or the capture of activations failed."""


class OutputError(MapsimError):
    """The results directory cannot be written."""


class LayerOutputError(ExtractionError):
    """A layer whose output cannot be captured as one tensor (e.g. it returns a tuple).

    ``layer`` is the offending path; extractors raise this (rather than a bare
    :class:`ExtractionError`) so that :func:`describe_layers` can list such layers anyway.
    """

    def __init__(self, layer: str, message: str) -> None:
        self.layer = layer
        super().__init__(message)


class LayerNotRunError(ExtractionError):
    """Requested layers whose modules did not run during the forward pass (``layers``), e.g.
    containers such as ``nn.ModuleList`` that a model's forward never calls itself."""

    def __init__(self, layers: list[str], message: str) -> None:
        self.layers = list(layers)
        super().__init__(message)


class MapsimWarning(UserWarning):
    """Something a run did that its reader should know (e.g. two compared models that
    started from the same weights); the command line prints it as ``mapsim: warning: ...``."""
