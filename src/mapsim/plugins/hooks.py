"""The default extractor ``hooks``: forward hooks on named modules.

For an ordinary (eager) PyTorch model, a forward hook is registered on every requested module,
the model runs once under ``torch.inference_mode()``, and each module's output is kept
(detached and copied, so that a later in-place operation such as ``ReLU(inplace=True)``
cannot change it). The hooks are always removed afterwards, even when the forward pass fails.

:meth:`HooksExtractor.stream` is the engine's fast path: each output is handed to a callback
inside its hook (no copy kept), and the forward pass stops as soon as the last requested
module has run, so later layers (e.g. a classification head) cost nothing.

A layer path may select one call of a reused module and one tensor of a structured output
(``shared#2``, ``block[0]``, ``head['logits']``; :mod:`mapsim.models.selectors`): one hook is
registered per module, counts its calls, and picks the requested parts.

TorchScript models (``torch.jit.load``) cannot be hooked. For them the requested outputs are
computed by *chain replay*: the model's children are called one after the other, descending into
a child where a nested path is requested (``blocks.0.relu``), and at every level the replayed
chain must reproduce the module's own output. This works for sequential networks such as the
``fcn`` architecture and fails with a clear message for anything else (e.g. residual blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

import mapsim
from mapsim import (
    ExtractionError,
    LayerNotFoundError,
    LayerNotRunError,
    LayerOutputError,
    hookimpl,
)


class HooksExtractor(mapsim.Extractor):
    """Capture module outputs with forward hooks (chain replay for TorchScript models)."""

    name = "hooks"

    class Params(mapsim.Params):
        """``hooks`` has no parameters."""

    def layer_names(self, model: nn.Module) -> list[str]:
        """Every module path of ``model`` except the root, in ``named_modules()`` order."""
        return [name for name, _ in model.named_modules() if name]

    def extract(
        self, model: nn.Module, layers: Sequence[str], inputs: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Return ``{path: detached output}`` of the modules named in ``layers``.

        :raises LayerNotFoundError: a path is not a module of ``model``.
        :raises LayerOutputError: a layer's output is not one tensor, or it ran more than once.
        :raises ExtractionError: the forward pass failed (e.g. the input has the wrong number
            of channels), or a TorchScript model is not a plain chain of its children.
        """
        modules = _modules_with(model, layers)
        if isinstance(model, torch.jit.ScriptModule):
            selected = [la for la in layers if not mapsim.parse_layer(la).plain]
            if selected:
                raise ExtractionError(
                    f"layer {selected[0]!r}: call numbers and output selectors need forward "
                    "hooks, which TorchScript models do not have. Load the model through a "
                    "python factory instead."
                )
            return _replay_script(model, list(layers), inputs)
        return _extract_with_hooks(model, modules, list(layers), inputs)

    def stream(
        self,
        model: nn.Module,
        layers: Sequence[str],
        inputs: torch.Tensor,
        on_output: Callable[[str, torch.Tensor], None],
    ) -> bool:
        """Call ``on_output(path, output)`` inside each requested module's hook.

        The output is only valid during the call (copy what must be kept). The forward pass
        stops after the last requested module has run. Returns False, calling nothing, for a
        TorchScript model (use :meth:`extract`). Raises as :meth:`extract` does.
        """
        modules = _modules_with(model, layers)
        if isinstance(model, torch.jit.ScriptModule):
            return False
        _extract_with_hooks(model, modules, list(layers), inputs, on_output)
        return True


def _non_tensor_error(layer: str, value: Any) -> LayerOutputError:
    return LayerOutputError(
        layer,
        f"layer {layer!r} outputs a {mapsim.describe_output(value)}, not a tensor; mapsim can "
        "only compare layers whose output is one tensor of maps. Choose a module inside it or "
        "after it instead.",
    )


def _forward_error(inputs: torch.Tensor, exc: Exception) -> ExtractionError:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ExtractionError(
        f"the model failed on an input of shape {tuple(inputs.shape)} "
        f"(batch, channels, height, width): {message}. Check that the images have the number "
        "of channels the model expects and a size it accepts."
    )


class _StopForward(Exception):
    """Raised in the last requested hook to end the forward pass early."""


_SEEN = torch.empty(0)


def _extract_with_hooks(
    model: nn.Module,
    modules: dict[str, nn.Module],
    layers: list[str],
    inputs: torch.Tensor,
    on_output: Callable[[str, torch.Tensor], None] | None = None,
) -> dict[str, torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}
    handles = []
    # one hook per module; each layer path names a module, a call of it and selectors
    by_module: dict[str, list[tuple[str, Any]]] = {}
    for layer in layers:
        parsed = mapsim.parse_layer(layer)
        by_module.setdefault(parsed.module, []).append((layer, parsed))
    calls: dict[str, int] = {}

    def make_hook(path: str):
        wanted = by_module[path]

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            calls[path] = call = calls.get(path, 0) + 1
            for layer, parsed in wanted:
                if parsed.call is None and call > 1:
                    raise LayerOutputError(
                        layer,
                        f"layer {layer!r} ran more than once in one forward pass (the module "
                        f"is reused), so its output is ambiguous. Name one call, e.g. "
                        f"'{parsed.module}#1' or '{parsed.module}#2', or choose another layer "
                        "such as the module that contains it.",
                    )
                if parsed.call not in (None, call):
                    continue
                tensor = mapsim.select_output(layer, output)
                if on_output is not None:
                    captured[layer] = _SEEN  # the output itself is not kept
                    on_output(layer, tensor.detach())
                else:
                    # clone: a later in-place op (ReLU(inplace=True)) must not change it
                    captured[layer] = tensor.detach().clone()
            if on_output is not None and len(captured) == len(layers):
                raise _StopForward

        return hook

    try:
        for path in by_module:
            module = modules[path]
            if isinstance(module, torch.jit.ScriptModule):
                raise ExtractionError(
                    f"layer {path!r} is a TorchScript module, which cannot be hooked. Choose "
                    "a layer outside it, or load the model through a python factory instead."
                )
            handles.append(module.register_forward_hook(make_hook(path)))
        with torch.inference_mode():
            try:
                model(inputs)
            except _StopForward:
                pass
            except (RuntimeError, ValueError) as exc:
                raise _forward_error(inputs, exc) from None
    finally:
        for handle in handles:
            handle.remove()

    missing = [layer for layer in layers if layer not in captured]
    if missing:
        ran = [f"{m!r} ran {calls[mapsim.parse_layer(m).module]} time(s)" for m in missing
               if mapsim.parse_layer(m).module in calls]
        raise LayerNotRunError(
            missing,
            f"layer(s) {', '.join(repr(m) for m in missing)} did not run during the forward "
            "pass (the model's forward never calls them, calls them fewer times than the "
            "'#N' asks for, or calls them inside TorchScript code, which cannot be hooked)"
            + (f"; the module of {'; '.join(ran)}" if ran else "")
            + ". Choose layers that the forward pass uses."
        )
    if on_output is not None:
        return {}
    return {layer: captured[layer] for layer in layers}


def _not_a_chain(path: str, reason: str) -> ExtractionError:
    where = f"module {path!r}" if path else "the model"
    return ExtractionError(
        f"TorchScript modules cannot be hooked, so mapsim replays their children in order; "
        f"but the forward of {where} is not a plain chain of its children ({reason}). Load "
        "the model through a python factory (`python: package.module:factory`) or an "
        "architecture with a weights file instead."
    )


def _replay_script(
    model: torch.jit.ScriptModule, layers: list[str], inputs: torch.Tensor
) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        try:
            output = model(inputs)
        except (RuntimeError, ValueError) as exc:
            raise _forward_error(inputs, exc) from None
        captured: dict[str, torch.Tensor] = {}
        _replay_chain(model, "", inputs, output, set(layers), captured)
    return {layer: captured[layer] for layer in layers}


def _replay_chain(
    module: nn.Module,
    path: str,
    inputs: torch.Tensor,
    expected: Any,
    wanted: set[str],
    captured: dict[str, torch.Tensor],
) -> None:
    """Call ``module``'s children in order on ``inputs``, storing wanted outputs.

    ``expected`` is ``module(inputs)``; the chain's final output must match it.
    """
    children = list(module.named_children())
    if not children:
        raise _not_a_chain(path, "it has no children to replay")
    value: Any = inputs
    for name, child in children:
        child_path = f"{path}.{name}" if path else name
        if not isinstance(value, torch.Tensor):
            raise _not_a_chain(path, f"the child before {child_path!r} does not return a tensor")
        try:
            result = child(value)
        except Exception as exc:  # e.g. "Trace submodules cannot be called."
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise _not_a_chain(path, f"calling child {child_path!r} failed: {first}") from None
        if any(layer.startswith(child_path + ".") for layer in wanted):
            _replay_chain(child, child_path, value, result, wanted, captured)
        if child_path in wanted:
            if not isinstance(result, torch.Tensor):
                raise _non_tensor_error(child_path, result)
            captured[child_path] = result.detach().clone()
        value = result
    if not (
        isinstance(value, torch.Tensor)
        and isinstance(expected, torch.Tensor)
        and value.shape == expected.shape
        and torch.allclose(value, expected, rtol=1e-4, atol=1e-5)
    ):
        raise _not_a_chain(path, "calling its children in order gives a different output")


@hookimpl
def register_extractors(register) -> None:
    """Register the ``hooks`` extractor."""
    register(HooksExtractor)


def _modules_with(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    """The model's modules by path, after checking that every one of ``layers`` is there."""
    modules = dict(model.named_modules())
    known = [name for name in modules if name]
    for layer in layers:
        path = mapsim.parse_layer(layer).module
        if path not in known:
            raise LayerNotFoundError(
                "layer", path, known, hint="`mapsim layers` lists a model's layers."
            )
    return modules
