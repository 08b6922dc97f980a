"""Building models and loading their weights.

A model comes from exactly one of three sources:

- an **architecture** plugin (e.g. ``fcn``) built from its parameters;
- a **python factory** ``"package.module:factory"``, called with keyword arguments;
- a **TorchScript** file, loaded with ``torch.jit.load``.

Weights come from a file (``.safetensors``, or a ``torch.save`` of a state dict) or from
``pretrained:NAME`` (a file shipped inside mapsim). Without weights, an architecture or factory
model is initialised from a seed, so that the same seed always gives the same model and the
global random state is left untouched.

Weights saved by ``mapsim prune`` (a card with ``pruned.widths``) are loaded into the model
resized to the pruned widths (:mod:`mapsim.models.widths`).

Weights files are never unpickled freely: ``torch.load`` always runs with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.resources
import json
import pickle
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mapsim.errors import ModelError, WeightsError, first_line
from mapsim.api import Architecture
from mapsim.models.widths import apply_widths, pruned_widths, weights_card

PRETRAINED_PREFIX = "pretrained:"
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
_HOW_TO_SAVE = (
    "Save the weights as a plain state dict of tensors: "
    "`torch.save(model.state_dict(), path)` or "
    "`safetensors.torch.save_file(model.state_dict(), path)`."
)


@dataclass
class LoadedModel:
    """A model ready for extraction.

    :ivar name: the model's name in the spec.
    :ivar module: the network, in eval mode, on the CPU.
    :ivar in_channels: input channels the model expects (None when unknown).
    :ivar source: JSON-able record of how it was built and where its weights came from
        (``{"build": {...}, "weights": {...}}``), written into run.json.
    """

    name: str
    module: nn.Module
    in_channels: int | None
    source: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- building
def build_from_spec(name: str, mspec: Any, registry: Any, base_dir: Path | None = None) -> LoadedModel:
    """Build model ``name`` from a validated model spec (a run spec's ``models`` entry).

    Creates the architecture plugin named in the spec (if any), builds and loads the model with
    :func:`build_model` and applies the spec's ``in_channels``.
    """
    architecture = None
    if mspec.architecture is not None:
        architecture = registry.create("architecture", mspec.architecture.name,
                                       mspec.architecture.model_dump(exclude={"name"}))
    loaded = build_model(name, architecture=architecture, python=mspec.python,
                         kwargs=mspec.kwargs, torchscript=mspec.torchscript,
                         weights=mspec.weights, seed=mspec.seed, base_dir=base_dir)
    if mspec.in_channels is not None:
        loaded.in_channels = mspec.in_channels
    return loaded


def build_model(
    name: str,
    *,
    architecture: Architecture | None = None,
    python: str | None = None,
    kwargs: dict[str, Any] | None = None,
    torchscript: str | Path | None = None,
    weights: str | Path | None = None,
    seed: int = 0,
    base_dir: Path | None = None,
) -> LoadedModel:
    """Build the model ``name`` from exactly one of ``architecture``, ``python``, ``torchscript``.

    :param architecture: a constructed architecture plugin (e.g. ``fcn`` with its params).
    :param python: ``"package.module:factory"``; ``factory(**kwargs)`` must return an
        ``nn.Module``. ``base_dir`` is importable while the module is imported.
    :param kwargs: keyword arguments of the python factory.
    :param torchscript: path of a TorchScript file (``torch.jit.save``).
    :param weights: a weights file (``.safetensors`` or a ``torch.save`` state dict) or
        ``"pretrained:NAME"``; without it the model keeps its seeded random initialisation
        (TorchScript models keep their own weights).
    :param seed: seed of the random initialisation (the global RNG state is not changed).
    :param base_dir: directory relative paths are resolved against (default: the current one).
    :raises ModelError: the model cannot be built or loaded.
    :raises WeightsError: the weights cannot be read or do not fit the model.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    given = [
        label
        for label, value in (
            ("architecture", architecture),
            ("python", python),
            ("torchscript", torchscript),
        )
        if value is not None
    ]
    if len(given) != 1:
        found = ", ".join(given) if given else "none"
        raise ModelError(
            f"model {name!r} needs exactly one of architecture, python or torchscript "
            f"(got {found}). Keep one of them."
        )
    if kwargs and python is None:
        raise ModelError(
            f"model {name!r} has kwargs, which are only used with a python factory. Remove "
            "them, or pass parameters through the architecture instead."
        )

    if torchscript is not None:
        path = _resolve(torchscript, base)
        module = _load_torchscript(name, path)
        build: dict[str, Any] = {"torchscript": str(path), "sha256": file_sha256(path)}
        weights_info: dict[str, Any] = {"source": "torchscript"}
        in_channels = _guess_in_channels(module)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if architecture is not None:
                module = _build_architecture(name, architecture)
                build = {
                    "architecture": {
                        "name": architecture.name,
                        "params": architecture.params.model_dump(mode="json"),
                    }
                }
                in_channels = architecture.in_channels()
            else:
                module = _call_factory(name, str(python), kwargs or {}, base)
                build = {"python": python, "kwargs": _jsonable(kwargs or {})}
                in_channels = _guess_in_channels(module)
        weights_info = {"source": "random", "seed": seed}

    if weights is not None:
        path, weights_info = _weights_path(weights, base)
        state = load_state_dict_file(path)
        widths = pruned_widths(weights_card(path)) if torchscript is None else None
        if widths:  # a pruned model (mapsim prune): resized to its card's widths first
            apply_widths(module, widths, state, path)
            weights_info["pruned"] = True
        apply_weights(module, state, path)

    module = module.to("cpu").eval()
    return LoadedModel(
        name=name,
        module=module,
        in_channels=in_channels,
        source={"build": build, "weights": weights_info},
    )


def _resolve(path: str | Path, base: Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else base / path


def _module_from(name: str, what: str, build: Any, failed_hint: str, type_hint: str) -> nn.Module:
    """Call ``build()`` and check it gave an ``nn.Module``; errors name ``what`` was called."""
    try:
        module = build()
    except Exception as exc:
        raise ModelError(
            f"model {name!r}: {what} raised {type(exc).__name__}: {exc}. {failed_hint}"
        ) from exc
    if not isinstance(module, nn.Module):
        raise ModelError(
            f"model {name!r}: {what} returned a {type(module).__name__}, not a "
            f"torch.nn.Module. {type_hint}"
        )
    return module


def _build_architecture(name: str, architecture: Architecture) -> nn.Module:
    return _module_from(
        name, f"architecture {architecture.name!r}", architecture.build,
        "Check its parameters.", "Fix the plugin's build().",
    )


def _call_factory(name: str, spec: str, kwargs: dict[str, Any], base: Path) -> nn.Module:
    module_name, colon, attr_path = spec.partition(":")
    if not colon or not module_name or not attr_path:
        raise ModelError(
            f"model {name!r}: python factory {spec!r} must be written 'package.module:factory' "
            "(a module path, a colon, then the callable that returns the model)."
        )
    sys.path.insert(0, str(base))
    try:
        py_module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(
            f"model {name!r}: cannot import the module {module_name!r} of factory {spec!r}: "
            f"{exc}. Install the package that provides it, or put the module next to the spec."
        ) from exc
    except Exception as exc:
        raise ModelError(
            f"model {name!r}: importing the module {module_name!r} of factory {spec!r} failed: "
            f"{type(exc).__name__}: {exc}."
        ) from exc
    finally:
        try:
            sys.path.remove(str(base))
        except ValueError:
            pass

    factory: Any = py_module
    for part in attr_path.split("."):
        if not hasattr(factory, part):
            raise ModelError(
                f"model {name!r}: module {module_name!r} has no attribute {attr_path!r} "
                f"(factory {spec!r}). Check the name after the colon."
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise ModelError(
            f"model {name!r}: {spec!r} is a {type(factory).__name__}, not a callable. Name a "
            "function or class that returns the model."
        )
    return _module_from(
        name, f"factory {spec!r}", lambda: factory(**kwargs),
        f"Check its kwargs (given: {sorted(kwargs) or 'none'}).",
        "It must return the network itself.",
    )


def _load_torchscript(name: str, path: Path) -> nn.Module:
    if not path.is_file():
        raise ModelError(
            f"model {name!r}: TorchScript file {str(path)!r} does not exist. Check the path "
            "(relative paths are resolved against the spec's directory)."
        )
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        first = first_line(exc)
        raise ModelError(
            f"model {name!r}: {str(path)!r} is not a readable TorchScript file ({first}). "
            "Create one with `torch.jit.save(torch.jit.script(model), path)`."
        ) from exc


def _guess_in_channels(module: nn.Module) -> int | None:
    """The ``in_channels`` of the first Conv2d in module order (None when there is none)."""
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d):
            return int(sub.in_channels)
        is_script = isinstance(sub, torch.jit.ScriptModule)
        if is_script and getattr(sub, "original_name", "") == "Conv2d":
            weight = getattr(sub, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 4:
                return int(weight.shape[1]) * int(getattr(sub, "groups", 1))
    return None


def _jsonable(value: Any) -> Any:
    """``value`` with anything JSON cannot hold replaced by its repr."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


# --------------------------------------------------------------------------- weights files
def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _weights_format(path: Path) -> str:
    return "safetensors" if path.suffix.lower() == ".safetensors" else "torch"


def _weights_path(weights: str | Path, base: Path) -> tuple[Path, dict[str, Any]]:
    """The file behind ``weights`` and its run.json record."""
    text = str(weights)
    if text.startswith(PRETRAINED_PREFIX):
        pretrained = text[len(PRETRAINED_PREFIX) :]
        path = pretrained_path(pretrained)
        return path, {
            "source": "pretrained",
            "name": pretrained,
            "sha256": file_sha256(path),
            "format": "safetensors",
        }
    path = _resolve(weights, base)
    if not path.is_file():
        raise WeightsError(
            f"weights file {str(path)!r} does not exist. Check the path (relative paths are "
            "resolved against the spec's directory)."
        )
    return path, {
        "source": "file",
        "path": str(path),
        "sha256": file_sha256(path),
        "format": _weights_format(path),
    }


def _pretrained_dir() -> Any:
    return importlib.resources.files("mapsim") / "pretrained"


def pretrained_names() -> list[str]:
    """Names usable as ``weights: pretrained:NAME`` (the bundled ``.safetensors`` files)."""
    folder = _pretrained_dir()
    if not folder.is_dir():
        return []
    return sorted(
        entry.name[: -len(".safetensors")]
        for entry in folder.iterdir()
        if entry.is_file() and entry.name.endswith(".safetensors")
    )


def pretrained_path(name: str) -> Path:
    """The file of the bundled weights ``name``.

    :raises WeightsError: no such weights are bundled (the message lists those that are).
    """
    names = pretrained_names()
    if name not in names:
        available = (
            ", ".join(names) if names else "none are bundled in this version of mapsim"
        )
        raise WeightsError(
            f"unknown pretrained weights {name!r}; available: {available}. Use a weights file "
            "instead (weights: path/to/weights.safetensors)."
        )
    return Path(str(_pretrained_dir() / f"{name}.safetensors"))


def pretrained_card(name: str) -> dict[str, Any]:
    """The card of the bundled weights ``name`` (``NAME.json`` beside the weights): how they
    were trained (spec, command line, epochs, metrics) and which architecture they fit.

    :raises WeightsError: no such weights are bundled, or their card is missing or unreadable.
    """
    path = pretrained_path(name).with_suffix(".json")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsError(
            f"the card of the pretrained weights {name!r} ({path}) cannot be read: {exc}. "
            "Reinstall mapsim."
        ) from exc
    return card


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict of tensors from ``path``.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(..., weights_only=True)``. A checkpoint holding the state dict under
    ``state_dict``, ``model_state_dict`` or ``model`` is unwrapped, and a ``module.`` prefix
    common to every key (``nn.DataParallel``) is removed.

    :raises WeightsError: the file is missing, unreadable, or not a plain state dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist. Check the path.")
    if _weights_format(path) == "safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path), device="cpu")
        except Exception as exc:
            raise WeightsError(
                f"weights file {str(path)!r} is not a readable safetensors file "
                f"({type(exc).__name__}: {exc}). {_HOW_TO_SAVE}"
            ) from exc
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # e.g. "pickle protocol 4"
                state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "weights only" in str(exc).lower():
                reason = "it holds python objects other than tensors and containers"
            else:
                reason = "it is not a file written by torch.save"
            raise WeightsError(
                f"weights file {str(path)!r} is not a plain state dict of tensors ({reason}; "
                f"mapsim never unpickles arbitrary objects). {_HOW_TO_SAVE}"
            ) from None
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise WeightsError(
                f"weights file {str(path)!r} cannot be read as a state dict: it is not a file "
                f"written by torch.save or safetensors ({type(exc).__name__}: {first}). "
                f"{_HOW_TO_SAVE}"
            ) from None
    return _plain_state_dict(state, path)


def _is_tensor_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _plain_state_dict(state: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(state, Mapping) and not _is_tensor_dict(state):
        for key in _STATE_DICT_KEYS:
            if _is_tensor_dict(state.get(key)):
                state = state[key]
                break
    if not _is_tensor_dict(state):
        if isinstance(state, Mapping):
            bad = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
            what = (
                f"a dict whose entries {', '.join(bad[:5])} are not tensors"
                if bad
                else "an empty dict"
            )
        else:
            what = f"a {type(state).__name__}"
        raise WeightsError(
            f"weights file {str(path)!r} holds {what}, not a plain state dict of tensors. "
            f"{_HOW_TO_SAVE}"
        )
    state = dict(state)
    prefix = "module."
    if all(key.startswith(prefix) for key in state):
        state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


def _listing(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items)} in all)"
    return shown


def apply_weights(module: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load ``state`` into ``module`` strictly, after checking keys and shapes ourselves.

    A missing ``num_batches_tracked`` buffer (BatchNorm bookkeeping, unused in eval mode) is
    filled from the module, so files written by tools that drop it still load.

    :raises WeightsError: keys are missing or unexpected, or shapes differ (all listed at once).
    """
    expected = module.state_dict()
    state = dict(state)
    for key, value in expected.items():
        if key not in state and key.endswith("num_batches_tracked"):
            state[key] = value
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key} (file {tuple(state[key].shape)}, model {tuple(expected[key].shape)})"
        for key in expected
        if key in state and tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
        raise WeightsError(
            f"weights file {str(path)!r} does not fit the model: {'; '.join(problems)}. Check "
            "that the model's architecture parameters (e.g. depth, width, kernel_size) are the "
            "ones the weights were trained with."
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"weights file {str(path)!r} could not be loaded: {exc}") from exc
