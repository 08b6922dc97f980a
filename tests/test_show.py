"""`mapsim show` takes what the spec says: its layer labels and its own images."""

from __future__ import annotations

from pathlib import Path

import yaml

from mapsim.cli import main


def _spec(tmp_path: Path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "name": "show",
        "models": {"m": {"architecture": {"name": "fcn", "depth": 3, "width": 4}, "seed": 2}},
        "layers": {"m": {"first": "blocks.0", "last": "blocks.2"}},
        "images": {"name": "synthetic-vessels", "count": 3, "size": [32, 40], "seed": 6},
    }))
    return path


def test_a_spec_label_shows_the_same_maps_as_its_module_path(tmp_path, capsys):
    spec = _spec(tmp_path)
    assert main(["show", "maps", str(spec), "--layer", "last", "--image", "2",
                 "--out", str(tmp_path / "label.png")]) == 0
    assert main(["show", "maps", str(spec), "--layer", "blocks.2", "--image", "2",
                 "--out", str(tmp_path / "path.png")]) == 0
    assert (tmp_path / "label.png").read_bytes() == (tmp_path / "path.png").read_bytes()
    assert main(["show", "kernels", str(spec), "--layer", "first",
                 "--out", str(tmp_path / "k.png")]) == 0
    assert (tmp_path / "k.png").is_file()


def test_the_spec_images_are_numbered_and_checked(tmp_path, capsys):
    spec = _spec(tmp_path)
    assert main(["show", "maps", str(spec), "--layer", "first",
                 "--out", str(tmp_path / "a.png")]) == 0  # image 0 by default
    assert (tmp_path / "a.png").is_file() and "wrote" in capsys.readouterr().out
    assert main(["show", "maps", str(spec), "--layer", "first", "--image", "3"]) == 2
    assert "numbered 0 to 2" in capsys.readouterr().err
    model = "{architecture: {name: fcn, depth: 1, width: 2}}"
    assert main(["show", "maps", model, "--layer", "blocks.0"]) == 2
    assert "name an IMAGE file" in capsys.readouterr().err


def test_layers_lists_the_spec_labels(tmp_path, capsys):
    spec = _spec(tmp_path)
    assert main(["layers", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "labels in the spec (usable wherever a layer is named): first = blocks.0, " \
           "last = blocks.2" in out
