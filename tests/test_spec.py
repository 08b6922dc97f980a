"""The spec layer: reading YAML/TOML/JSON, shorthands, defaults, error messages, schema, digest."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from mapsim.registry import load_registry
from mapsim.errors import MapsimError, SpecError
from mapsim.spec.run_spec import json_schema, load_spec, read_document, validate_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
QUICKSTART = EXAMPLES / "quickstart.yaml"

# examples/quickstart.yaml written by hand as TOML (top-level keys first, then the tables)
QUICKSTART_TOML = """\
name = "quickstart"
comparisons = [["cnn4", "cnn4"], ["cnn6", "cnn6"], ["cnn4", "cnn6"]]
metrics = ["pearson"]
aggregators = ["max", "min", {name = "threshold", value = 0.8}, "pivot"]
device = "auto"

[models.cnn4]
architecture = {name = "fcn", depth = 4, width = 16}
seed = 4

[models.cnn6]
architecture = {name = "fcn", depth = 6, width = 16}
seed = 6

[layers]
cnn4 = ["blocks.0", "blocks.1", "blocks.3"]
cnn6 = {L1 = "blocks.0", L2 = "blocks.1", L4 = "blocks.3", L6 = "blocks.5"}

[images]
name = "files"
paths = "data/vessels-*.png"
labels = "data/labels"

[engine]
dead_maps = "exclude"
pooled = true

[output]
dir = "../results/quickstart"
"""


def quickstart_data() -> dict[str, Any]:
    return yaml.safe_load(QUICKSTART.read_text())


def minimal(**changes: Any) -> dict[str, Any]:
    """A small valid spec (one fcn model), with top-level fields replaced by ``changes``."""
    data: dict[str, Any] = {
        "models": {"cnn": {"architecture": {"name": "fcn", "depth": 2, "width": 4}}},
        "layers": {"cnn": ["blocks.0"]},
        "images": "data/*.png",
    }
    data.update(changes)
    return data


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as info:
        validate_spec(data, "spec.yaml")
    return str(info.value)


def problem_lines(message: str) -> list[str]:
    """The per-problem lines of a formatted validation error, without indentation."""
    return [line.strip() for line in message.splitlines()[1:]]


# --------------------------------------------------------------------------- reading
def test_quickstart_validates_from_yaml() -> None:
    spec = load_spec(QUICKSTART)
    assert spec.name == "quickstart"
    assert list(spec.models) == ["cnn4", "cnn6"]
    assert spec.models["cnn6"].architecture.depth == 6
    assert spec.pairs() == [("cnn4", "cnn4"), ("cnn6", "cnn6"), ("cnn4", "cnn6")]
    assert [a.name for a in spec.aggregators] == ["max", "min", "threshold", "pivot"]
    assert spec.aggregators[2].value == 0.8
    assert spec.engine.pooled is True


def test_toml_and_json_give_the_same_model(tmp_path: Path) -> None:
    from_yaml = load_spec(QUICKSTART)
    toml_path = tmp_path / "quickstart.toml"
    toml_path.write_text(QUICKSTART_TOML)
    json_path = tmp_path / "quickstart.json"
    json_path.write_text(json.dumps(quickstart_data(), indent=2))
    assert load_spec(toml_path).model_dump() == from_yaml.model_dump()
    assert load_spec(json_path).model_dump() == from_yaml.model_dump()
    assert load_spec(toml_path).digest() == from_yaml.digest()


def test_yml_suffix_and_upper_case_suffix_are_yaml(tmp_path: Path) -> None:
    for name in ("spec.yml", "spec.YAML"):
        path = tmp_path / name
        path.write_text(QUICKSTART.read_text())
        assert load_spec(path).model_dump() == load_spec(QUICKSTART).model_dump()


def test_unknown_suffix_is_named(tmp_path: Path) -> None:
    path = tmp_path / "spec.ini"
    path.write_text("name = x\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert "'.ini'" in message
    assert "unknown spec format" in message
    assert ".yaml" in message and ".toml" in message and ".json" in message


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("models: {cnn: [unclosed\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "not valid YAML" in str(info.value)
    assert str(path) in str(info.value)


def test_invalid_toml_and_json(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("name = \n")
    (tmp_path / "a.json").write_text("{'name': 1}")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(tmp_path / "a.toml")
    with pytest.raises(SpecError, match="not valid JSON"):
        load_spec(tmp_path / "a.json")


def test_missing_file_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read the spec"):
        load_spec(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", ""])
def test_document_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match="must be a mapping of fields"):
        read_document(path)


def test_spec_error_is_a_mapsim_error() -> None:
    assert issubclass(SpecError, MapsimError)


# --------------------------------------------------------------------------- shorthands, defaults
def test_metric_string_shorthand() -> None:
    short = validate_spec(minimal(metrics=["pearson"]))
    long = validate_spec(minimal(metrics=[{"name": "pearson"}]))
    assert short.model_dump() == long.model_dump()
    assert short.metrics[0].name == "pearson"
    assert short.metrics[0].label is None


def test_images_string_is_the_files_dataset() -> None:
    spec = validate_spec(minimal(images="data/*.png"))
    assert spec.images.name == "files"
    assert spec.images.paths == "data/*.png"
    explicit = validate_spec(minimal(images={"name": "files", "paths": "data/*.png"}))
    assert spec.model_dump() == explicit.model_dump()


def test_defaults() -> None:
    data = minimal()
    data["models"]["other"] = {"architecture": {"name": "fcn", "depth": 1}}
    data["layers"]["other"] = "blocks.*"
    spec = validate_spec(data)
    assert [m.name for m in spec.metrics] == ["pearson"]
    assert [a.name for a in spec.aggregators] == ["max", "threshold", "pivot"]
    assert spec.comparisons is None
    assert spec.pairs() == [("cnn", "cnn"), ("other", "other")]
    assert spec.models["cnn"].extractor.name == "hooks"
    assert spec.models["cnn"].seed == 0
    assert spec.name == "mapsim-run"
    assert spec.device == "auto"
    assert spec.engine.dead_maps == "exclude"
    assert spec.output.dir is None


def test_comparison_strings_and_duplicates() -> None:
    data = minimal(comparisons=["cnn, other", ["other", "cnn"], "cnn,other"])
    data["models"]["other"] = {"architecture": {"name": "fcn", "depth": 1}}
    data["layers"]["other"] = ["blocks.0"]
    spec = validate_spec(data)
    # [b, a] repeats [a, b]: every inter comparison already reports both directions
    assert spec.pairs() == [("cnn", "other")]


@pytest.mark.parametrize("layers", [["blocks.0", "head"], "blocks.*", {"L1": "blocks.0"}])
def test_layer_forms(layers: Any) -> None:
    assert validate_spec(minimal(layers={"cnn": layers})).layers["cnn"] == layers


def test_metric_labels_allow_the_same_metric_twice() -> None:
    spec = validate_spec(minimal(metrics=["pearson", {"name": "pearson", "label": "second"}]))
    assert [m.label or m.name for m in spec.metrics] == ["pearson", "second"]


# --------------------------------------------------------------------------- error messages
def test_message_header_names_source_and_count() -> None:
    message = error_of(minimal(metircs=["pearson"], devise="cpu"))
    assert message.splitlines()[0] == "spec.yaml: the spec is not valid (2 problem(s)):"


def test_typo_in_top_level_field() -> None:
    data = quickstart_data()
    data["metircs"] = data.pop("metrics")
    lines = problem_lines(error_of(data))
    assert len(lines) == 1
    assert lines[0].startswith("metircs: unknown field; did you mean 'metrics'?")
    assert "the fields of a spec are: name, models, layers, images" in lines[0]


def test_friendly_messages_for_patterns_pairs_and_empty_layers() -> None:
    assert problem_lines(error_of(minimal(device="gpu"))) == [
        "device: use auto, cpu, cuda, cuda:N or mps (got 'gpu')"]
    lines = problem_lines(error_of(minimal(comparisons=[["cnn", "cnn", "cnn"]])))
    assert len(lines) == 1 and "a comparison is a pair [model_a, model_b]" in lines[0]
    assert "got 3 name(s)" in lines[0]
    lines = problem_lines(error_of(minimal(layers={"cnn": []})))
    assert len(lines) == 1 and lines[0].startswith("layers.cnn: expected a layer path")


def test_wrong_type_of_architecture_param() -> None:
    data = quickstart_data()
    data["models"]["cnn6"]["architecture"]["depth"] = "six"
    lines = problem_lines(error_of(data))
    assert len(lines) == 1
    assert lines[0].startswith("models.cnn6.architecture.depth: ")
    assert "valid integer" in lines[0]
    assert "(got 'six')" in lines[0]


def test_user_names_with_capitals_and_underscores_stay_in_the_path() -> None:
    # regression: such names were mistaken for pydantic union tags and left out of the path
    data = minimal()
    data["models"] = {"Cnn_4": {"architecture": {"name": "fcn", "depth": "six"}}}
    data["layers"] = {"Cnn_4": ["blocks.0"]}
    assert problem_lines(error_of(data))[0].startswith("models.Cnn_4.architecture.depth: ")


def test_union_tag_is_not_shown_in_the_path() -> None:
    # regression: the tagged-union tag appeared as if it were a field (aggregators.0.threshold.value)
    message = error_of(minimal(aggregators=["max", {"name": "threshold", "value": "high"}]))
    line = problem_lines(message)[0]
    assert line.startswith("aggregators.1.value: ")
    assert "(got 'high')" in line


def test_given_value_is_not_repeated() -> None:
    data = minimal()
    data["models"]["cnn"]["architecture"]["kernel_size"] = 4
    line = problem_lines(error_of(data))[0]
    assert line.startswith("models.cnn.architecture.kernel_size: kernel_size must be odd")
    assert line.count("(got 4)") == 1


@pytest.mark.parametrize("metric", ["pearsn", {"name": "pearsn"}])
def test_unknown_metric(metric: Any) -> None:
    message = error_of(minimal(metrics=[metric]))
    line = problem_lines(message)[0]
    assert line.startswith("metrics.0: ")
    assert "unknown metric 'pearsn'" in line
    assert "Closest: pearson" in line
    assert f"Registered metrics: {', '.join(load_registry().names('metric'))}" in line
    assert {"cka", "cosine", "euclidean", "pearson"} <= set(load_registry().names("metric"))
    assert "mapsim plugins" in line
    assert line.count("'pearsn'") == 1


@pytest.mark.parametrize(
    ("where", "value", "expected"),
    [
        ("aggregators", ["mx"], "unknown aggregator 'mx'. Closest: max"),
        ("architecture", {"name": "fnc", "depth": 2}, "unknown architecture 'fnc'. Closest: fcn"),
        ("extractor", "hook", "unknown extractor 'hook'. Closest: hooks"),
    ],
)
def test_unknown_plugins_of_other_kinds(where: str, value: Any, expected: str) -> None:
    data = minimal()
    if where == "aggregators":
        data["aggregators"] = value
    else:
        data["models"]["cnn"][where] = value
    assert expected in error_of(data)


def test_unknown_plugin_param() -> None:
    line = problem_lines(error_of(minimal(metrics=[{"name": "pearson", "absolut": True}])))[0]
    assert line.startswith("metrics.0.absolut: ")
    assert "unknown field" in line


def test_plugin_choice_without_name() -> None:
    line = problem_lines(error_of(minimal(metrics=[{"absolute": True}])))[0]
    names = ", ".join(load_registry().names("metric"))
    assert line == f"metrics.0: missing 'name': one of {names}"


def test_comparison_with_unknown_model() -> None:
    data = quickstart_data()
    data["comparisons"] = [["cnn4", "cnn5"]]
    message = error_of(data)
    assert "comparisons: the model 'cnn5' is not in 'models'" in message
    assert "(cnn4, cnn6)" in message
    assert "Closest: " in message


def test_layers_with_unknown_model() -> None:
    data = minimal()
    data["layers"]["cnm"] = ["blocks.0"]
    message = error_of(data)
    assert "layers: the model 'cnm' is not in 'models' (cnn)" in message


def test_compared_model_without_layers() -> None:
    data = minimal()
    data["models"]["other"] = {"architecture": {"name": "fcn", "depth": 1}}
    assert "model 'other' is compared but has no entry in 'layers'" in error_of(data)


def test_model_needs_exactly_one_source() -> None:
    data = minimal()
    data["models"]["cnn"]["python"] = "mymodels:make_net"
    line = problem_lines(error_of(data))[0]
    assert line.startswith("models.cnn: ")
    assert "exactly one of 'architecture', 'python' or 'torchscript'" in line
    assert "(got architecture, python)" in line

    data["models"]["cnn"] = {"seed": 1}
    assert "exactly one of" in error_of(data)


def test_kwargs_need_python_and_torchscript_has_no_weights() -> None:
    data = minimal()
    data["models"]["cnn"]["kwargs"] = {"depth": 3}
    assert "'kwargs' is only used with 'python'" in error_of(data)
    data["models"]["cnn"] = {"torchscript": "net.pt", "weights": "w.safetensors"}
    assert "drop 'weights'" in error_of(data)


def test_duplicate_metric_labels() -> None:
    message = error_of(minimal(metrics=["pearson", {"name": "pearson"}]))
    assert "metrics: 'pearson' is listed twice" in message
    assert "distinct 'label'" in message


def test_duplicate_aggregators() -> None:
    assert "each aggregator may be listed once" in error_of(minimal(aggregators=["max", "max"]))


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CPU"])
def test_bad_device(device: str) -> None:
    line = problem_lines(error_of(minimal(device=device)))[0]
    assert line.startswith("device: ")
    assert f"(got {device!r})" in line


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_good_devices(device: str) -> None:
    assert validate_spec(minimal(device=device)).device == device


def test_several_problems_are_reported_together() -> None:
    data = minimal(metrics=["pearsn"], device="gpu", engine={"dead_maps": "orig"})
    lines = problem_lines(error_of(data))
    assert [line.split(":")[0] for line in lines] == ["metrics.0", "engine.dead_maps", "device"]


def test_missing_required_fields() -> None:
    lines = problem_lines(error_of({"models": {"cnn": {"architecture": "fcn"}}}))
    assert "layers: Field required" in lines
    assert "images: Field required" in lines
    assert any(line.startswith("models.cnn.architecture.depth: Field required") for line in lines)


# --------------------------------------------------------------------------- schema, digest
def test_json_schema_has_plugin_definitions() -> None:
    schema = json_schema()
    assert isinstance(schema, dict)
    json.dumps(schema)  # JSON-serialisable
    defs = schema["$defs"]
    fcn = next(d for d in defs.values() if d.get("title", "").lower().endswith("fcn")
               or "depth" in d.get("properties", {}))
    assert {"depth", "width", "kernel_size"} <= set(fcn["properties"])
    assert "depth" in fcn["required"]
    assert schema["properties"]["metrics"]["type"] == "array"
    metric_item = json.dumps(schema["properties"]["metrics"]["items"])
    assert "pearson" in metric_item.lower()
    pearson = next(d for name, d in defs.items() if "pearson" in name.lower())
    assert pearson["properties"]["name"].get("const") == "pearson"
    aggregators = json.dumps(schema["properties"]["aggregators"])
    for name in ("max", "min", "threshold", "pivot"):
        assert f'"{name}"' in aggregators
    assert schema["additionalProperties"] is False


def test_quickstart_satisfies_the_json_schema() -> None:
    """Editors validate specs with the schema: it must accept the string shorthands."""
    import jsonschema

    jsonschema.validate(quickstart_data(), json_schema())
    shorthand = minimal(metrics=["pearson"], aggregators=["max", "pivot"],
                        comparisons=["cnn,cnn"])
    shorthand["images"] = "data/*.png"
    jsonschema.validate(shorthand, json_schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**shorthand, "metrics": ["pearsn"]}, json_schema())


def test_digest_is_stable_and_sensitive() -> None:
    a = validate_spec(quickstart_data())
    b = load_spec(QUICKSTART)
    assert a.digest() == b.digest()
    assert len(a.digest()) == 64
    # a shorthand and its long form are the same spec
    assert validate_spec(minimal(metrics=["pearson"])).digest() == validate_spec(
        minimal(metrics=[{"name": "pearson"}])
    ).digest()
    changed = quickstart_data()
    changed["models"]["cnn4"]["seed"] = 5
    assert validate_spec(changed).digest() != a.digest()
    changed = copy.deepcopy(quickstart_data())
    changed["aggregators"][2]["value"] = 0.7
    assert validate_spec(changed).digest() != a.digest()
