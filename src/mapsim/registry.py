"""Plugin discovery and the registries.

All plugins, the built-in ones included, are modules named by entry points in the ``mapsim``
group. :func:`load_registry` has pluggy load them
(:meth:`~pluggy.PluginManager.load_setuptools_entrypoints`), takes each one's provenance from
:meth:`~pluggy.PluginManager.list_plugin_distinfo` (distribution, version, entry-point name),
calls their ``register_*`` hooks with a ``register`` function that records that provider, and
returns a :class:`Registry`. Entry points are loaded at run time: the registry imports no
plugin module.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pluggy

from mapsim import hookspecs
from mapsim.errors import DuplicatePluginError, PluginLoadError, UnknownNameError
from mapsim.api import Aggregator, Architecture, Dataset, Extractor, Metric, Plugin
from mapsim.prune_api import PruneCriterion

ENTRY_POINT_GROUP = "mapsim"

#: registry kind -> (hook name, required base class)
KINDS: dict[str, tuple[str, type]] = {
    "metric": ("register_metrics", Metric),
    "aggregator": ("register_aggregators", Aggregator),
    "architecture": ("register_architectures", Architecture),
    "extractor": ("register_extractors", Extractor),
    "dataset": ("register_datasets", Dataset),
    "prune_criterion": ("register_prune_criteria", PruneCriterion),
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


def _collect(pm: pluggy.PluginManager, providers: dict[int, Provider]) -> Registry:
    """Call every registered plugin's ``register_*`` hooks; ``providers`` by ``id(plugin)``."""
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
    return _collect(pm, providers)


def _group_entry_points() -> list[tuple[md.Distribution, md.EntryPoint]]:
    """Every (distribution, entry point) of the ``mapsim`` group, in the order in which
    :meth:`pluggy.PluginManager.load_setuptools_entrypoints` visits them. Only for
    diagnostics: pluggy does the loading."""
    return [
        (dist, ep)
        for dist in md.distributions()
        for ep in dist.entry_points
        if ep.group == ENTRY_POINT_GROUP
    ]


def _canonical(dist: md.Distribution) -> str:
    """A distribution's name as pip compares names (PEP 503)."""
    return re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower()


def _describe(dist: md.Distribution, ep: md.EntryPoint) -> str:
    return f"{ep.name!r} ({ep.value}) from {dist.metadata['Name']} {dist.version}"


def _load_error(pm: pluggy.PluginManager, exc: Exception) -> PluginLoadError:
    """The error for an entry point that pluggy could not load or register.

    pluggy stops at the first entry point that fails (in the import of its module, or in
    registering it) and leaves it unregistered, so the failing one is the first of the group,
    in pluggy's order, whose name is not registered.
    """
    failed = next(
        ((dist, ep) for dist, ep in _group_entry_points()
         if not pm.has_plugin(ep.name) and not pm.is_blocked(ep.name)),
        None,
    )
    what = _describe(*failed) if failed else "(unknown entry point)"
    return PluginLoadError(
        f"cannot load the mapsim plugin {what}: {type(exc).__name__}: {exc}. "
        "Reinstall or uninstall that distribution."
    )


def _refuse_clashing_entry_points(pm: pluggy.PluginManager) -> None:
    """pluggy loads one entry point per name: a second distribution declaring a name already
    loaded would be skipped without a word, so refuse it naming both. The same distribution
    seen twice (an editable install plus a stale copy) is loaded once, quietly."""
    loaded: dict[str, tuple[md.Distribution, md.EntryPoint]] = {}
    for dist, ep in _group_entry_points():
        first = loaded.setdefault(ep.name, (dist, ep))
        if _canonical(first[0]) != _canonical(dist) and pm.has_plugin(ep.name):
            raise DuplicatePluginError(
                f"two distributions declare the mapsim plugin {_describe(*first)} and "
                f"{_describe(dist, ep)}: entry-point names must be unique. Uninstall one of "
                "the two distributions, or rename one of the entry points."
            )


def _load_entry_points(pm: pluggy.PluginManager) -> dict[int, Provider]:
    """Load the ``mapsim`` entry points into ``pm`` through pluggy; providers by
    ``id(plugin)``."""
    try:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    except Exception as exc:
        raise _load_error(pm, exc) from exc
    _refuse_clashing_entry_points(pm)
    providers = {
        id(plugin): Provider(
            distribution=dist.project_name,
            version=dist.version,
            entry_point=pm.get_name(plugin) or "unknown",
        )
        for plugin, dist in pm.list_plugin_distinfo()
    }
    if not any(p.distribution == "mapsim" for p in providers.values()):
        raise PluginLoadError(
            "mapsim's built-in plugins were not found through its entry points: mapsim is not "
            "installed as a distribution. Install it with `pip install -e .` from the source tree."
        )
    return providers


def discover() -> list[tuple[object, Provider]]:
    """Load every module named in the ``mapsim`` entry-point group, with its provider."""
    pm = _make_plugin_manager()
    providers = _load_entry_points(pm)
    return [(plugin, providers[id(plugin)]) for plugin, _ in pm.list_plugin_distinfo()]


@functools.lru_cache(maxsize=1)
def load_registry() -> Registry:
    """The registry of all installed plugins (cached; see :func:`reload_registry`)."""
    pm = _make_plugin_manager()
    return _collect(pm, _load_entry_points(pm))


def reload_registry() -> Registry:
    """Discard the cached registry and discover plugins again (after installing one)."""
    load_registry.cache_clear()
    return load_registry()
