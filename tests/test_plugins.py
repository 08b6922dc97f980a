"""Plugin discovery, registries, provenance, duplicate and unknown names."""

from __future__ import annotations

import types

import pytest

import mapsim
from mapsim import hookspecs
from mapsim.errors import DuplicatePluginError, PluginLoadError, UnknownNameError
from mapsim.registry import KINDS, Provider, build_registry, load_registry

BUILTINS = {
    "metric": {"pearson", "cosine", "euclidean", "cka"},
    "aggregator": {"max", "min", "threshold", "pivot"},
    "architecture": {"fcn"},
    "extractor": {"hooks"},
    "dataset": {"files"},
}


def test_builtins_come_through_the_entry_points_with_provenance():
    registry = load_registry()
    for kind, names in BUILTINS.items():
        assert names <= set(registry.names(kind)), kind
        for name in names:
            provider = registry.get(kind, name).provider
            assert provider.distribution == "mapsim"
            assert provider.version == mapsim.__version__


def test_every_hookspec_is_implemented_by_a_builtin():
    """Like datasette's test: a hook without an implementation (and so a test) fails."""
    specs = {n for n in dir(hookspecs) if n.startswith("register_")}
    assert specs == {hook for hook, _ in KINDS.values()}
    registry = load_registry()
    for kind in KINDS:
        assert registry.names(kind), f"no built-in {kind}"


class _Metric(mapsim.Metric):
    name = "pearson"


def _plugin(**hooks):
    module = types.SimpleNamespace()
    for hook, classes in hooks.items():
        def impl(register, classes=classes):
            for cls in classes:
                register(cls)
        setattr(module, hook, mapsim.hookimpl(impl))
    return module


def test_a_duplicate_name_names_both_providers():
    from mapsim.plugins.metrics import pearson

    plugins = [
        (pearson, Provider("mapsim", "0.1.0", "pearson")),
        (_plugin(register_metrics=[_Metric]), Provider("mapsim-evil", "9.9", "evil")),
    ]
    with pytest.raises(DuplicatePluginError) as info:
        build_registry(plugins)
    message = str(info.value)
    assert "'pearson'" in message and "mapsim 0.1.0" in message and "mapsim-evil 9.9" in message


def test_unknown_name_lists_registered_names_and_closest_match():
    with pytest.raises(UnknownNameError) as info:
        load_registry().get("metric", "pearsn")
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert "Closest matches: pearson" in message
    assert "Known metrics:" in message and "pearson" in message


def test_registering_something_that_is_not_a_plugin_class_fails():
    with pytest.raises(PluginLoadError, match="not a subclass of mapsim.Metric"):
        build_registry([(_plugin(register_metrics=[dict]), Provider("bad", "1", "bad"))])


def test_a_hook_that_raises_is_reported_with_its_provider():
    def broken(register):
        raise RuntimeError("boom")

    module = types.SimpleNamespace(register_metrics=mapsim.hookimpl(broken))
    with pytest.raises(PluginLoadError, match=r"broken-dist 2\.0.*register_metrics.*boom"):
        build_registry([(module, Provider("broken-dist", "2.0", "x"))])


def test_registry_create_validates_params():
    from pydantic import ValidationError

    registry = load_registry()
    metric = registry.create("metric", "pearson", {"absolute": False})
    assert metric.params.absolute is False
    with pytest.raises(ValidationError):
        registry.create("metric", "pearson", {"absolut": False})


def test_providers_are_recorded_for_run_json():
    providers = load_registry().providers()
    assert providers["metric"]["pearson"]["distribution"] == "mapsim"
    assert providers["dataset"]["files"]["entry_point"] == "files"
