"""Plugin discovery and the registries.

All plugins, the built-in ones included, are modules named by entry points in the ``mapsim``
group. :func:`load_registry` imports them, calls their ``register_*`` hooks with a ``register``
function that records the providing distribution, and returns a :class:`Registry`.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pluggy

from mapsim import hookspecs
from mapsim.errors import DuplicatePluginError, PluginLoadError, UnknownNameError
from mapsim.api import Aggregator, Architecture, Dataset, Extractor, Metric, Plugin

ENTRY_POINT_GROUP = "mapsim"

#: registry kind -> (hook name, required base class)
KINDS: dict[str, tuple[str, type]] = {
    "metric": ("register_metrics", Metric),
    "aggregator": ("register_aggregators", Aggregator),
    "architecture": ("register_architectures", Architecture),
    "extractor": ("register_extractors", Extractor),
    "dataset": ("register_datasets", Dataset),
}


@dataclass(frozen=True)
class Provider:
    """Where a plugin came from."""

    distribution: str
    version: str
    entry_point: str

    def __str__(self) -> str:
        return f"{self.distribution} {self.version} ({self.entry_point})"

    def as_dict(self) -> dict[str, str]:
        return {
            "distribution": self.distribution,
            "version": self.version,
            "entry_point": self.entry_point,
        }


@dataclass(frozen=True)
class Entry:
    """One registered plugin class."""

    kind: str
    name: str
    cls: type[Plugin]
    provider: Provider


class Registry:
    """Registered plugin classes by kind and name."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}

    def add(self, kind: str, cls: type, provider: Provider) -> None:
        """Register ``cls`` as a ``kind``; duplicate names are refused naming both providers."""
        base = KINDS[kind][1]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginLoadError(
                f"{provider} registered {cls!r} as a {kind}, but it is not a subclass of "
                f"mapsim.{base.__name__}."
            )
        name = getattr(cls, "name", "")
        if not isinstance(name, str) or not name:
            raise PluginLoadError(f"{provider} registered {cls.__name__} without a name.")
        existing = self._entries[kind].get(name)
        if existing is not None:
            raise DuplicatePluginError(
                f"two plugins register the {kind} {name!r}: {existing.provider} and {provider}. "
                "Uninstall one of the two distributions, or rename one of the plugins."
            )
        self._entries[kind][name] = Entry(kind, name, cls, provider)

    def names(self, kind: str) -> list[str]:
        """Registered names of one kind, sorted."""
        return sorted(self._entries[kind])

    def entries(self, kind: str | None = None) -> list[Entry]:
        """Registered entries of one kind (or all), sorted by kind and name."""
        kinds = [kind] if kind else list(KINDS)
        return [self._entries[k][n] for k in kinds for n in sorted(self._entries[k])]

    def get(self, kind: str, name: str) -> Entry:
        """The entry of ``kind`` called ``name``; an unknown name lists the registered ones."""
        try:
            return self._entries[kind][name]
        except KeyError:
            raise UnknownNameError(
                kind,
                name,
                self._entries[kind],
                hint="Install the plugin that provides it, or check `mapsim plugins`.",
            ) from None

    def create(self, kind: str, name: str, params: Any = None, **kwargs: Any) -> Plugin:
        """Construct the plugin ``name`` with validated ``params`` (a model or a dict)."""
        cls = self.get(kind, name).cls
        if params is None or isinstance(params, dict):
            params = cls.Params.model_validate(params or {})
        return cls.create(params, **kwargs)

    def providers(self) -> dict[str, dict[str, dict[str, str]]]:
        """``{kind: {name: provider}}`` for run.json."""
        return {
            kind: {name: e.provider.as_dict() for name, e in sorted(entries.items())}
            for kind, entries in self._entries.items()
        }


def _make_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _entry_points() -> list[md.EntryPoint]:
    eps = md.entry_points(group=ENTRY_POINT_GROUP)
    # One distribution can be visible twice (e.g. an editable install plus a stale copy);
    # keep the first of identical (name, value) pairs.
    seen: set[tuple[str, str]] = set()
    unique = []
    for ep in eps:
        if (ep.name, ep.value) not in seen:
            seen.add((ep.name, ep.value))
            unique.append(ep)
    return unique


def build_registry(plugins: Iterable[tuple[object, Provider]]) -> Registry:
    """Build a registry from plugin objects (modules or instances) and their providers."""
    pm = _make_plugin_manager()
    providers: dict[int, Provider] = {}
    for plugin, provider in plugins:
        try:
            pm.register(plugin, name=f"{provider.distribution}:{provider.entry_point}")
        except ValueError as exc:
            raise PluginLoadError(f"plugin {provider} could not be registered: {exc}") from exc
        except pluggy.PluginValidationError as exc:
            raise PluginLoadError(f"plugin {provider} has an invalid hook: {exc}") from exc
        providers[id(plugin)] = provider

    registry = Registry()
    for kind, (hook_name, _) in KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            provider = providers[id(impl.plugin)]
            register = functools.partial(registry.add, kind, provider=provider)
            try:
                impl.function(register=register)
            except (DuplicatePluginError, PluginLoadError):
                raise
            except Exception as exc:
                raise PluginLoadError(
                    f"plugin {provider} failed in {hook_name}: {type(exc).__name__}: {exc}"
                ) from exc
    return registry


def discover() -> list[tuple[object, Provider]]:
    """Import every module named in the ``mapsim`` entry-point group."""
    found = []
    for ep in _entry_points():
        dist = ep.dist
        provider = Provider(
            distribution=dist.name if dist else "unknown",
            version=dist.version if dist else "unknown",
            entry_point=ep.name,
        )
        try:
            module = ep.load()
        except Exception as exc:
            raise PluginLoadError(
                f"cannot load the mapsim plugin {ep.name!r} ({ep.value}) from "
                f"{provider.distribution} {provider.version}: {type(exc).__name__}: {exc}. "
                "Reinstall or uninstall that distribution."
            ) from exc
        found.append((module, provider))
    if not any(p.distribution == "mapsim" for _, p in found):
        raise PluginLoadError(
            "mapsim's built-in plugins were not found through its entry points: mapsim is not "
            "installed as a distribution. Install it with `pip install -e .` from the source tree."
        )
    return found


@functools.lru_cache(maxsize=1)
def load_registry() -> Registry:
    """The registry of all installed plugins (cached; see :func:`reload_registry`)."""
    return build_registry(discover())


def reload_registry() -> Registry:
    """Discard the cached registry and discover plugins again (after installing one)."""
    load_registry.cache_clear()
    return load_registry()
