"""The ``mapsim`` command line, mostly in-process through :func:`mapsim.cli.main`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

import mapsim
from mapsim.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
QUICKSTART = EXAMPLES / "quickstart.yaml"


def layer_rows(text: str) -> dict[str, tuple[str, str, int]]:
    """``{path: (type, shape, maps)}`` from the table ``mapsim layers`` prints."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["layer"])
    assert set(lines[start + 1].replace(" ", "")) == {"-"}
    rows = {}
    for line in lines[start + 2:]:
        path, kind, shape, maps = line.split()
        rows[path] = (kind, shape, int(maps))
    return rows


# --------------------------------------------------------------------------- validate
def test_validate_quickstart(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(QUICKSTART)]) == 0
    out, err = capsys.readouterr()
    assert "is valid" in out
    assert "2 model(s), 3 comparison(s), metrics: pearson" in out
    assert err == ""


def test_validate_reports_errors_with_status_2(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(QUICKSTART.read_text().replace("metrics:", "metircs:"))
    assert main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"mapsim: error: {path}: the spec is not valid")
    assert "metircs: unknown field; did you mean 'metrics'?" in err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage: mapsim" in capsys.readouterr().err


# --------------------------------------------------------------------------- schema
def test_schema_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "models" in schema["properties"]


def test_schema_out_writes_json_atomically(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "sub" / "schema.json"
    assert main(["schema", "--out", str(target)]) == 0
    assert f"wrote {target}" in capsys.readouterr().out
    with target.open() as handle:
        schema = json.load(handle)
    assert set(schema["properties"]) >= {"models", "layers", "images", "metrics", "aggregators"}
    assert "depth" in json.dumps(schema)
    # replacing an existing file leaves only the new file (no temporary file beside it)
    target.write_text("old")
    assert main(["schema", "--out", str(target)]) == 0
    assert json.loads(target.read_text()) == schema
    assert [p.name for p in target.parent.iterdir()] == ["schema.json"]


# --------------------------------------------------------------------------- plugins
def test_plugins_lists_the_builtins(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["kind", "name", "provided", "by", "entry", "point"]
    provider = f"mapsim {mapsim.__version__}"
    assert provider == "mapsim 0.1.0" == f"mapsim {version('mapsim')}"
    rows = {}
    for line in lines[1:]:
        kind, name, *rest = line.split()
        rows[(kind, name)] = " ".join(rest)
    for kind, name in [("metric", "pearson"), ("aggregator", "max"),
                       ("aggregator", "threshold"), ("aggregator", "pivot"),
                       ("architecture", "fcn"), ("extractor", "hooks"), ("dataset", "files")]:
        assert rows[(kind, name)].startswith(provider), (kind, name, rows)


# --------------------------------------------------------------------------- layers
def test_layers_of_inline_spec(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["layers", "{architecture: {name: fcn, depth: 3, width: 4}}",
                 "--input-size", "16", "20"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "input 1 x 1 x 16 x 20" in out
    rows = layer_rows(out)
    expected = ["blocks"] + [f"blocks.{i}{part}" for i in range(3)
                             for part in ("", ".conv", ".bn", ".relu")] + ["head"]
    assert list(rows) == expected
    for path in expected[:-1]:
        assert rows[path][1:] == ("1x4x16x20", 4), path
    assert rows["blocks.0.conv"][0] == "Conv2d"
    assert rows["head"] == ("Conv2d", "1x2x16x20", 2)  # the head has `classes` (2) maps


def test_layers_of_a_run_spec_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["layers", str(QUICKSTART), "--model", "cnn6", "--input-size", "8", "8"]) == 0
    out = capsys.readouterr().out
    assert "model 'cnn6'" in out
    rows = layer_rows(out)
    assert "blocks.5.relu" in rows and "blocks.6" not in rows
    assert rows["blocks.5"][1:] == ("1x16x8x8", 16)


def test_layers_first_model_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["layers", str(QUICKSTART), "--input-size", "8", "8"]) == 0
    rows = layer_rows(capsys.readouterr().out)
    assert "blocks.3" in rows and "blocks.4" not in rows  # cnn4


def test_layers_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["layers", str(QUICKSTART), "--model", "cnn5"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'cnn5'" in err and "cnn4, cnn6" in err
    assert main(["layers", "{architecture: {name: fcn, depth: six}}"]) == 2
    err = capsys.readouterr().err
    assert "architecture.depth: Input should be a valid integer" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- run
def test_run_quickstart_then_refuse_then_overwrite(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "res"
    assert main(["run", str(QUICKSTART), "--out", str(out_dir), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "3 image(s)" in out and str(out_dir) in out
    for name in ("max.csv", "pivot.csv", "summary.csv", "run.json"):
        assert (out_dir / name).is_file(), name
    info = json.loads((out_dir / "run.json").read_text())
    assert info["n_images"] == 3
    assert info["mapsim_version"] == mapsim.__version__
    first = (out_dir / "max.csv").read_text()

    assert main(["run", str(QUICKSTART), "--out", str(out_dir), "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("mapsim: error: ")
    assert "not empty" in err and "--overwrite" in err
    assert "Traceback" not in err
    assert (out_dir / "max.csv").read_text() == first  # untouched

    assert main(["run", str(QUICKSTART), "--out", str(out_dir), "--quiet", "--overwrite"]) == 0
    capsys.readouterr()
    assert (out_dir / "max.csv").read_text() == first  # seeded models: same results
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]  # no staging or old folders


# --------------------------------------------------------------------------- entry points
def test_python_dash_m_version() -> None:
    result = subprocess.run([sys.executable, "-m", "mapsim", "--version"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"mapsim {mapsim.__version__}"


def test_console_script_validate() -> None:
    script = shutil.which("mapsim", path=str(Path(sys.executable).parent)) or shutil.which("mapsim")
    if script is None:
        pytest.skip("the mapsim console script is not on PATH")
    result = subprocess.run([script, "validate", "no-such-spec.yaml"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("mapsim: error: cannot read the spec no-such-spec.yaml")


def test_validate_deep_builds_models_and_finds_layers_and_images(capsys) -> None:
    from mapsim.cli import main

    assert main(["validate", str(QUICKSTART), "--deep"]) == 0
    out = capsys.readouterr().out
    assert "models built, 7 layer(s) resolved, 3 image(s) found" in out
    invalid = QUICKSTART.parent / "invalid" / "unknown-layer.yaml"
    assert main(["validate", str(invalid)]) == 0
    assert "add --deep" in capsys.readouterr().out
    assert main(["validate", str(invalid), "--deep"]) == 2
    captured = capsys.readouterr()
    assert "is valid" not in captured.out
    assert "unknown layer 'block.1'" in captured.err and "Closest matches: blocks.1" in captured.err


@pytest.mark.parametrize("problem", ["pickle-weights", "unreadable-image"])
def test_bad_files_fail_cleanly_and_write_nothing(tmp_path, capsys, problem) -> None:
    import pickle

    from mapsim.cli import main

    image = tmp_path / "img.png"
    image.write_bytes((EXAMPLES / "data" / "vessels-1.png").read_bytes())
    model = {"architecture": {"name": "fcn", "depth": 1, "width": 2}}
    if problem == "pickle-weights":
        # a pickle of an arbitrary object, not a state dict: must be refused, never unpickled
        (tmp_path / "w.pt").write_bytes(pickle.dumps({"net": Path("x")}))
        model["weights"] = "w.pt"
        expected = "state dict"
    else:
        (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        expected = "broken.png"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"models": {"m": model}, "layers": {"m": "blocks.*"},
                                    "images": "*.png"}))
    out = tmp_path / "results"
    assert main(["run", str(spec), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mapsim: error: ") and expected in err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
