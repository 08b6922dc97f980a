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


# --- discovery through pluggy's load_setuptools_entrypoints ---------------------------------


def test_every_builtin_entry_point_is_loaded_once_with_its_own_name():
    from mapsim.registry import discover

    found = discover()
    builtins = [p for _, p in found if p.distribution == "mapsim"]
    names = [p.entry_point for p in builtins]
    assert len(names) == len(set(names))
    assert {"pearson", "cka", "aggregators", "fcn", "hooks", "files"} <= set(names)
    registry = load_registry()
    assert registry.get("metric", "cka").provider.entry_point == "cka"
    assert registry.get("aggregator", "max").provider.entry_point == "aggregators"
    assert str(registry.get("extractor", "hooks").provider) == (
        f"mapsim {mapsim.__version__} (hooks)")


def _fake_distribution(root, name: str, version: str, entry_points: dict[str, str],
                       modules: dict[str, str]):
    """A folder for sys.path holding ``name``'s dist-info (entry points in the mapsim group)
    and the given modules, as ``pip install --target`` would leave it."""
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{ep} = {value}\n" for ep, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[mapsim]\n{lines}")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(source)
    return root


_GOOD_PLUGIN = """
import mapsim

class Spare(mapsim.Aggregator):
    name = "spare-{tag}"

    def aggregate(self, sim, tables):
        return {{}}

@mapsim.hookimpl
def register_aggregators(register):
    register(Spare)
"""


@pytest.fixture
def fresh_imports(monkeypatch):
    """Undo sys.path and sys.modules changes of a test (the fake plugins' modules)."""
    import sys

    before = set(sys.modules)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield monkeypatch
    for name in set(sys.modules) - before:
        if name.startswith("fake_mapsim_"):
            del sys.modules[name]


def test_a_plugin_that_fails_to_import_names_its_entry_point_and_distribution(
        tmp_path, fresh_imports):
    from mapsim.registry import discover

    root = _fake_distribution(
        tmp_path / "site", "broken-plugin", "1.2", {"zz-broken": "fake_mapsim_broken"},
        {"fake_mapsim_broken": "import a_module_that_does_not_exist\n"})
    fresh_imports.syspath_prepend(str(root))
    with pytest.raises(PluginLoadError) as info:
        discover()
    message = str(info.value)
    assert "'zz-broken' (fake_mapsim_broken) from broken-plugin 1.2" in message
    assert "ModuleNotFoundError" in message and "a_module_that_does_not_exist" in message
    assert "Reinstall or uninstall that distribution." in message
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_a_plugin_with_an_invalid_hook_names_its_entry_point(tmp_path, fresh_imports):
    from mapsim.registry import discover

    source = ("import mapsim\n@mapsim.hookimpl\n"
              "def register_metrics(register, extra):\n    pass\n")
    root = _fake_distribution(tmp_path / "site", "odd-plugin", "0.3",
                              {"odd": "fake_mapsim_odd"}, {"fake_mapsim_odd": source})
    fresh_imports.syspath_prepend(str(root))
    with pytest.raises(PluginLoadError, match=r"'odd' \(fake_mapsim_odd\) from odd-plugin 0\.3"):
        discover()


def test_a_distribution_seen_twice_is_loaded_once(tmp_path, fresh_imports):
    """An editable install plus a stale copy of the same distribution: one plugin."""
    from mapsim.registry import build_registry, discover

    for copy in ("editable", "stale"):
        root = _fake_distribution(
            tmp_path / copy, "twice-plugin", "1.0", {"twice": "fake_mapsim_twice"},
            {"fake_mapsim_twice": _GOOD_PLUGIN.format(tag="twice")})
        fresh_imports.syspath_prepend(str(root))
    found = [p for _, p in discover() if p.distribution == "twice-plugin"]
    assert found == [Provider("twice-plugin", "1.0", "twice")]
    registry = build_registry(discover())
    assert registry.get("aggregator", "spare-twice").provider == found[0]


def test_two_distributions_declaring_one_entry_point_name_are_refused(tmp_path, fresh_imports):
    from mapsim.registry import discover

    for dist in ("first-plugin", "second-plugin"):
        module = f"fake_mapsim_{dist.split('-')[0]}"
        root = _fake_distribution(tmp_path / dist, dist, "2.0", {"clash": module},
                                  {module: _GOOD_PLUGIN.format(tag=dist)})
        fresh_imports.syspath_prepend(str(root))
    with pytest.raises(DuplicatePluginError) as info:
        discover()
    message = str(info.value)
    assert "first-plugin 2.0" in message and "second-plugin 2.0" in message
    assert "'clash'" in message


def test_mapsim_not_installed_as_a_distribution_is_explained(monkeypatch):
    import importlib.metadata as md

    from mapsim.registry import discover

    everything = md.distributions
    monkeypatch.setattr(md, "distributions", lambda **kw: [
        d for d in everything(**kw) if d.metadata["Name"] != "mapsim"])
    with pytest.raises(PluginLoadError, match="mapsim is not installed as a distribution"):
        discover()
